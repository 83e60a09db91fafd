"""TTA: paired transforms round-trip, every set returns an equivariant model's output, probabilities are averaged."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.errors import PipelineError
from pipeline.inference.tta import TTAModel, View, compose_d4, list_tta, parse_tta, scaled_size

ALL_SETS = list_tta() + ["ms+flip", "d4+ms", "hflip+flip", "flip+d4"]


class LogProbs(nn.Module):
    """Input channels are already class probabilities; returns their log (softmax gives them back).

    Pointwise, so it commutes with flips, rotations and (convex) bilinear resizes.
    """

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(x.shape))
        return x.clamp_min(1e-12).log()


def smooth_probs(n: int, k: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Low-frequency class probabilities (bilinear resizes nearly invert each other on them)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, k, 3, 3, generator=g) * 2
    return F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True).softmax(1)


def random_probs(n: int, k: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, h, w, generator=g) * 3).softmax(1)


# ----------------------------------------------------------------------------- names and sets
def test_list_and_view_counts():
    assert list_tta() == ["none", "hflip", "flip", "d4", "ms"]
    assert len(parse_tta("none")) == 1
    assert len(parse_tta("hflip")) == 2
    assert len(parse_tta("flip")) == 3
    assert len(parse_tta("d4")) == 8
    assert len(parse_tta("ms")) == 6
    assert len(parse_tta("ms", scales=[0.5, 1.0, 1.5, 2.0])) == 8
    assert sorted({v.scale for v in parse_tta("ms", scales=[0.5, 1.0, 1.5])}) == [0.5, 1.0, 1.5]


@pytest.mark.parametrize(
    "a,b", [("ms", "flip"), ("hflip", "flip"), ("d4", "flip"), ("ms", "d4"), ("ms", "hflip"), ("none", "d4")]
)
def test_combined_sets_are_the_product_without_duplicates(a, b):
    combined = parse_tta(f"{a}+{b}")
    keys = [v.key for v in combined]
    assert len(keys) == len(set(keys))
    expected = {x.compose(y).key for x in parse_tta(a) for y in parse_tta(b)}
    assert set(keys) == expected
    # the product of the geometric parts as functions, checked on a probe
    probe = torch.arange(6.0).reshape(1, 1, 2, 3)
    for x, y in itertools.product(parse_tta(a), parse_tta(b)):
        assert torch.equal(x.compose(y).geometric(probe), y.geometric(x.geometric(probe)))


def test_view_counts_of_combinations():
    assert len(parse_tta("ms+flip")) == 3 * 4  # {id, h} x {id, h, v} = {id, h, v, rot180} per scale
    assert len(parse_tta("hflip+flip")) == 4
    assert len(parse_tta("d4+flip")) == 8
    assert len(parse_tta("ms+d4")) == 24
    assert len(parse_tta("flip+flip")) == 4


def test_unknown_names_list_valid_ones():
    with pytest.raises(PipelineError) as err:
        parse_tta("d8")
    for name in list_tta():
        assert name in str(err.value)
    with pytest.raises(PipelineError, match="'rot'"):
        parse_tta("flip+rot")
    with pytest.raises(PipelineError, match="scales"):
        parse_tta("ms", scales=[0.0, 1.0])
    with pytest.raises(PipelineError, match="known"):
        TTAModel(LogProbs(), "mirror")


# ----------------------------------------------------------------------------- paired transforms
def test_d4_elements_are_distinct_and_named():
    probe = torch.arange(6.0).reshape(1, 1, 2, 3)
    views = parse_tta("d4")
    outs = {(tuple(v.geometric(probe).shape), tuple(v.geometric(probe).flatten().tolist())) for v in views}
    assert len(outs) == 8
    by_name = {v.name: v for v in views}
    x = torch.randn(2, 3, 5, 7)
    assert torch.equal(by_name["hflip"].augment(x), x.flip(-1))
    assert torch.equal(by_name["vflip"].augment(x), x.flip(-2))
    assert torch.equal(by_name["transpose"].augment(x), x.transpose(-2, -1))
    assert torch.equal(by_name["rot90"].augment(x), torch.rot90(x, 1, (-2, -1)))
    assert torch.equal(by_name["rot180"].augment(x), x.flip(-2).flip(-1))


def test_compose_d4_matches_function_composition():
    probe = torch.arange(6.0).reshape(1, 1, 2, 3)
    els = [(k, f) for k in range(4) for f in (False, True)]
    for a, b in itertools.product(els, els):
        c = compose_d4(a, b)
        assert torch.equal(View(1.0, *c).geometric(probe), View(1.0, *b).geometric(View(1.0, *a).geometric(probe)))


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (2, 4, 6, 10), (1, 1, 5, 3)])
def test_every_geometric_pair_round_trips_exactly(shape):
    x = torch.randn(*shape)
    for v in parse_tta("d4"):
        a = v.augment(x, divisor=1)
        expected_hw = (shape[3], shape[2]) if v.swaps else (shape[2], shape[3])
        assert tuple(a.shape[-2:]) == expected_hw
        assert tuple(a.shape[-2:]) == v.input_size(shape[-2:], 1)
        assert torch.equal(v.deaugment(a), x)
        assert torch.equal(v.deaugment(a, shape[-2:]), x)


def test_scale_pairs_restore_size_and_nearly_invert():
    x = smooth_probs(2, 4, 48, 80)
    for v in parse_tta("ms+d4", scales=[0.5, 1.0, 1.5]):
        a = v.augment(x, divisor=16)
        assert a.shape[-2] % 16 == 0 and a.shape[-1] % 16 == 0
        assert tuple(a.shape[-2:]) == v.input_size((48, 80), 16)
        back = v.deaugment(a, (48, 80))
        assert back.shape == x.shape
        assert torch.allclose(back, x, atol=0.03), v.name
        if v.scale == 1.0:
            assert torch.equal(back, x)


def test_scaled_size_rounds_to_divisor():
    assert scaled_size((512, 512), 0.75, 32) == (384, 384)
    assert scaled_size((512, 384), 1.25, 32) == (640, 480)
    assert scaled_size((64, 64), 0.75, 32) == (64, 64)  # 48 -> nearest multiple of 32
    assert scaled_size((64, 64), 0.1, 32) == (32, 32)  # never below one divisor
    assert scaled_size((50, 70), 1.0, 32) == (50, 70)  # scale 1 keeps any size
    assert scaled_size((64, 96), 0.5, 1) == (32, 48)


# ----------------------------------------------------------------------------- the model wrapper
@pytest.mark.parametrize("name", ALL_SETS)
@pytest.mark.parametrize("hw", [(32, 32), (32, 48)])
def test_every_set_returns_an_equivariant_models_probabilities(name, hw):
    x = random_probs(2, 5, *hw) if "ms" not in name else smooth_probs(2, 5, *hw)
    tta = TTAModel(LogProbs(), name, scales=[0.5, 1.0, 1.5], divisor=8)
    out = tta(x)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.allclose(out.sum(1), torch.ones(2, *hw), atol=1e-5)
    atol = 0.03 if "ms" in name else 1e-5
    assert torch.allclose(out, x, atol=atol), name


def test_views_of_one_size_share_one_forward_call():
    model = LogProbs()
    x = random_probs(3, 4, 16, 16)
    TTAModel(model, "d4", divisor=1)(x)
    assert model.calls == [(24, 4, 16, 16)]

    model.calls.clear()
    TTAModel(model, "d4", divisor=1)(random_probs(3, 4, 16, 24))  # transposes swap the shape
    assert sorted(model.calls) == [(12, 4, 16, 24), (12, 4, 24, 16)]

    model.calls.clear()
    TTAModel(model, "ms", scales=[0.5, 1.0, 2.0], divisor=8)(x)
    assert sorted(model.calls) == [(6, 4, 8, 8), (6, 4, 16, 16), (6, 4, 32, 32)]

    model.calls.clear()
    out = TTAModel(model, "d4", divisor=1, max_batch=6)(x)
    assert all(c[0] <= 6 for c in model.calls) and sum(c[0] for c in model.calls) == 24
    assert torch.allclose(out, x, atol=1e-5)

    model.calls.clear()
    out = TTAModel(model, "flip", divisor=1, max_batch=2)(x)  # fewer images per call than the batch
    assert all(c[0] <= 2 for c in model.calls) and sum(c[0] for c in model.calls) == 9
    assert torch.allclose(out, x, atol=1e-5)


@pytest.mark.parametrize("max_batch", [1, 2, 5, 7, 100])
def test_max_batch_does_not_change_the_result(max_batch):
    x = torch.randn(3, 3, 16, 24)
    conv = nn.Conv2d(3, 4, 3, padding=1)  # not equivariant: the views really differ
    with torch.no_grad():
        ref = TTAModel(conv, "d4+ms", scales=[0.5, 1.0], divisor=8)(x)
        out = TTAModel(conv, "d4+ms", scales=[0.5, 1.0], divisor=8, max_batch=max_batch)(x)
    assert torch.allclose(out, ref, atol=1e-6)


def test_wrapper_matches_the_naive_average_of_deaugmented_views():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 24)
    conv = nn.Conv2d(3, 5, 3, padding=1)
    for name in ("d4", "ms+flip", "d4+ms"):
        views = parse_tta(name, scales=[0.5, 1.5])
        with torch.no_grad():
            naive = sum(v.deaugment(conv(v.augment(x, 8)).softmax(1), x.shape[-2:]) for v in views) / len(views)
            out = TTAModel(conv, name, scales=[0.5, 1.5], divisor=8)(x)
        assert out.is_contiguous() and torch.allclose(out, naive, atol=1e-5), name


def test_gradients_flow_through_the_wrapper():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    out = TTAModel(conv, "d4+ms", scales=[0.5, 1.0], divisor=8)(torch.randn(2, 3, 16, 16))
    (out[:, 1] ** 2).sum().backward()
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all() and conv.weight.grad.abs().sum() > 0


class Ramp(nn.Module):
    """Not flip-equivariant: class-1 logit grows with the column index, class 0 is zero."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        ramp = torch.linspace(-6.0, 2.0, w).expand(n, 1, h, w)
        return torch.cat([torch.zeros_like(ramp), ramp], 1)


def test_average_is_over_probabilities_not_logits():
    x = torch.zeros(1, 3, 4, 8)
    out = TTAModel(Ramp(), "hflip", divisor=1)(x)
    logits = Ramp()(x)
    p = logits.softmax(1)
    expected = (p + p.flip(-1)) / 2
    assert torch.allclose(out, expected, atol=1e-6)
    wrong = ((logits + logits.flip(-1)) / 2).softmax(1)
    assert not torch.allclose(out, wrong, atol=1e-2)
    # none is the plain softmax of the model
    assert torch.allclose(TTAModel(Ramp(), "none")(x), p, atol=1e-7)


def test_wraps_a_registry_model_and_stays_a_module():
    from pipeline.models import build_model

    torch.manual_seed(0)
    net = build_model("unet", num_classes=3, encoder="resnet18", encoder_weights=None).eval()
    tta = TTAModel(net, "ms+hflip", scales=[0.5, 1.0])
    assert isinstance(tta, nn.Module) and tta.divisor == net.input_divisor
    assert list(tta.parameters())  # the wrapped model's parameters are visible
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        out = tta.eval()(x)
        plain = net(x).softmax(1)
        manual = (plain + net(x.flip(-1)).softmax(1).flip(-1)) / 2
    assert out.shape == (2, 3, 64, 64)
    assert torch.allclose(out.sum(1), torch.ones(2, 64, 64), atol=1e-5)
    assert torch.allclose(TTAModel(net, "hflip")(x), manual, atol=1e-5)
