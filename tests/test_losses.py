"""Loss values against hand computations on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.core.errors import PipelineError
from pipeline.models import UnknownNameError
from pipeline.models.losses import (
    CrossEntropyLoss,
    DiceLoss,
    FocalLoss,
    LovaszSoftmaxLoss,
    WeightedSumLoss,
    build_loss,
    list_losses,
    parse_loss_spec,
)

IGNORE = 255

# Two pixels, two classes: pixel a has logits (2, 0), pixel b has logits (0, 1).
LOGITS = torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]]]])  # 1 x 2 x 1 x 2
TARGET = torch.tensor([[[0, 1]]])  # 1 x 1 x 2
# log-probabilities and probabilities by hand
LA0, LA1 = 2 - math.log(math.e**2 + 1), -math.log(math.e**2 + 1)
LB0, LB1 = -math.log(1 + math.e), 1 - math.log(1 + math.e)
PA0, PA1, PB0, PB1 = (math.exp(v) for v in (LA0, LA1, LB0, LB1))


def value(spec: str, logits=LOGITS, target=TARGET, **kw) -> float:
    return float(build_loss(spec, num_classes=logits.shape[1], **kw)(logits, target))


def random_case(seed: int, n: int = 2, k: int = 4, h: int = 5, w: int = 6, ignored: int = 4):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, h, w, generator=g) * 2
    target = torch.randint(0, k, (n, h, w), generator=g)
    flat = target.view(-1)
    flat[torch.randperm(flat.numel(), generator=g)[:ignored]] = IGNORE
    return logits, target


def test_list_losses():
    assert list_losses() == ["ce", "dice", "focal", "lovasz"]


# ----------------------------------------------------------------------------- cross entropy


def test_ce_plain_matches_hand():
    assert value("ce") == pytest.approx((-LA0 - LB1) / 2, rel=1e-6)


def test_ce_class_weights_match_hand():
    expected = (1 * -LA0 + 3 * -LB1) / (1 + 3)
    assert value("ce", class_weights=[1.0, 3.0]) == pytest.approx(expected, rel=1e-6)


def test_ce_ignore_index_drops_pixel():
    target = torch.tensor([[[0, IGNORE]]])
    assert value("ce", target=target) == pytest.approx(-LA0, rel=1e-6)
    assert value("ce", target=torch.tensor([[[7, 1]]]), ignore_index=7) == pytest.approx(-LB1, rel=1e-6)


def test_ce_label_smoothing_matches_hand():
    eps, k = 0.2, 2
    pix_a = (1 - eps) * -LA0 + eps / k * (-LA0 - LA1)
    pix_b = (1 - eps) * -LB1 + eps / k * (-LB0 - LB1)
    assert value("ce", label_smoothing=eps) == pytest.approx((pix_a + pix_b) / 2, rel=1e-6)


def test_ce_label_smoothing_with_weights_matches_hand():
    eps, k, w = 0.2, 2, (1.0, 3.0)
    pix_a = (1 - eps) * w[0] * -LA0 + eps / k * (w[0] * -LA0 + w[1] * -LA1)
    pix_b = (1 - eps) * w[1] * -LB1 + eps / k * (w[0] * -LB0 + w[1] * -LB1)
    expected = (pix_a + pix_b) / (w[0] + w[1])
    assert value("ce", label_smoothing=eps, class_weights=list(w)) == pytest.approx(expected, rel=1e-6)


def test_ce_equals_torch_on_random_case():
    logits, target = random_case(0)
    w = [0.5, 1.0, 2.0, 3.0]
    got = build_loss("ce", 4, class_weights=w, label_smoothing=0.1)(logits, target)
    ref = F.cross_entropy(logits, target, weight=torch.tensor(w), ignore_index=IGNORE, label_smoothing=0.1)
    assert float(got) == pytest.approx(float(ref), rel=1e-6)


@pytest.mark.parametrize("name", ["ce", "dice", "focal", "lovasz"])
def test_all_ignored_gives_zero_and_finite_grad(name):
    logits = LOGITS.clone().requires_grad_(True)
    loss = build_loss(name, 2, class_weights=[1.0, 2.0])(logits, torch.full((1, 1, 2), IGNORE))
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert torch.isfinite(logits.grad).all()


# ----------------------------------------------------------------------------- dice


@pytest.mark.parametrize("s", [1.0, 0.0])
def test_dice_matches_hand(s):
    d0 = (2 * PA0 + s) / (PA0 + PB0 + 1 + s)
    d1 = (2 * PB1 + s) / (PA1 + PB1 + 1 + s)
    assert value("dice", smooth=s) == pytest.approx(1 - (d0 + d1) / 2, rel=1e-6)


def test_dice_ignore_index_and_present_classes():
    target = torch.tensor([[[0, IGNORE]]])
    d0 = (2 * PA0 + 1) / (PA0 + 1 + 1)
    d1 = (0 + 1) / (PA1 + 1)  # class 1 absent: only its predicted mass on pixel a counts
    assert value("dice", target=target) == pytest.approx(1 - (d0 + d1) / 2, rel=1e-6)
    assert value("dice", target=target, classes="present") == pytest.approx(1 - d0, rel=1e-6)


def test_dice_class_weights_weight_the_class_mean():
    d0 = (2 * PA0 + 1) / (PA0 + PB0 + 1 + 1)
    d1 = (2 * PB1 + 1) / (PA1 + PB1 + 1 + 1)
    expected = (1 * (1 - d0) + 3 * (1 - d1)) / 4
    assert value("dice", class_weights=[1.0, 3.0]) == pytest.approx(expected, rel=1e-6)


def test_dice_perfect_prediction_is_zero():
    target = torch.tensor([[[0, 1, 1, 0]]])
    logits = F.one_hot(target, 2).permute(0, 3, 1, 2).float() * 100
    assert value("dice", logits=logits, target=target, smooth=0.0) == pytest.approx(0.0, abs=1e-6)


# ----------------------------------------------------------------------------- focal


def test_focal_gamma_zero_equals_ce():
    logits, target = random_case(1)
    w = [1.0, 0.5, 2.0, 1.5]
    focal = build_loss("focal", 4, gamma=0.0, class_weights=w)(logits, target)
    ce = build_loss("ce", 4, class_weights=w)(logits, target)
    assert float(focal) == pytest.approx(float(ce), rel=1e-6)
    assert value("focal", gamma=0.0) == pytest.approx(value("ce"), rel=1e-6)


def test_focal_gamma_two_matches_hand():
    expected = ((1 - PA0) ** 2 * -LA0 + (1 - PB1) ** 2 * -LB1) / 2
    # float32 rounding of 1 - p limits the agreement to about 1e-6 relative
    assert value("focal", gamma=2.0) == pytest.approx(expected, rel=1e-5)
    assert value("focal", target=torch.tensor([[[0, IGNORE]]]), gamma=2.0) == pytest.approx(
        (1 - PA0) ** 2 * -LA0, rel=1e-5
    )


def test_focal_default_gamma_is_two():
    assert FocalLoss(2).gamma == 2.0


# ----------------------------------------------------------------------------- lovasz


def test_lovasz_hand_worked_case():
    # pixel 1: p = (0.5, 0.5); pixel 2: p = (0.25, 0.75); target (0, 1).
    # class 0: errors (0.5 fg, 0.25 bg) -> Jaccard steps (1, 0) -> 0.5
    # class 1: errors (0.5 bg, 0.25 fg) -> Jaccard steps (0.5, 0.5) -> 0.375
    logits = torch.tensor([[[[0.0, 0.0]], [[0.0, math.log(3.0)]]]])
    assert value("lovasz", logits=logits) == pytest.approx((0.5 + 0.375) / 2, rel=1e-6)


def reference_lovasz(probs, labels, num_classes, classes="present"):
    """Lovasz extension by its definition: Jaccard loss |M| / |fg u M| of growing error sets M."""
    losses = []
    for c in range(num_classes):
        fg = {i for i, y in enumerate(labels) if y == c}
        if classes == "present" and not fg:
            continue
        errors = [abs((1.0 if i in fg else 0.0) - p[c]) for i, p in enumerate(probs)]
        order = sorted(range(len(errors)), key=lambda i: -errors[i])
        total, prev, mispredicted = 0.0, 0.0, set()
        for i in order:
            mispredicted.add(i)
            jac = len(mispredicted) / len(fg | mispredicted)
            total += errors[i] * (jac - prev)
            prev = jac
        losses.append(total)
    return sum(losses) / len(losses)


@pytest.mark.parametrize("classes", ["present", "all"])
@pytest.mark.parametrize("seed", [2, 3])
def test_lovasz_equals_reference(seed, classes):
    logits, target = random_case(seed, k=5)
    target[target == 4] = 3  # class 4 absent from the target
    probs = logits.softmax(1).permute(0, 2, 3, 1).reshape(-1, 5)
    labels = target.reshape(-1)
    keep = labels != IGNORE
    ref = reference_lovasz(probs[keep].tolist(), labels[keep].tolist(), 5, classes)
    got = build_loss("lovasz", 5, classes=classes)(logits, target)
    assert float(got) == pytest.approx(ref, rel=1e-5)


def test_lovasz_per_image_is_mean_of_images():
    logits, target = random_case(4)
    per_image = build_loss("lovasz", 4, per_image=True)(logits, target)
    single = LovaszSoftmaxLoss(4)
    expected = (single(logits[:1], target[:1]) + single(logits[1:], target[1:])) / 2
    assert float(per_image) == pytest.approx(float(expected), rel=1e-6)


# ----------------------------------------------------------------------------- sums and errors


@pytest.mark.parametrize(
    "spec, parts",
    [
        ("0.7*ce+0.3*dice", [(0.7, "ce"), (0.3, "dice")]),
        ("ce+dice", [(1.0, "ce"), (1.0, "dice")]),
        ("1*ce+0.5*lovasz", [(1.0, "ce"), (0.5, "lovasz")]),
        (" 0.25 * CE + 2e-1*Focal ", [(0.25, "ce"), (0.2, "focal")]),
    ],
)
def test_weighted_sum_equals_parts(spec, parts):
    logits, target = random_case(5)
    loss = build_loss(spec, 4, class_weights=[1.0, 2.0, 1.0, 0.5])
    assert isinstance(loss, WeightedSumLoss)
    total = loss(logits, target)
    expected = sum(w * build_loss(n, 4, class_weights=[1.0, 2.0, 1.0, 0.5])(logits, target) for w, n in parts)
    assert float(total) == pytest.approx(float(expected), rel=1e-6)
    assert set(loss.last_parts) == {n for _, n in parts}


def test_weighted_sum_gradient_finite():
    logits, target = random_case(6)
    logits.requires_grad_(True)
    build_loss("0.4*ce+0.2*dice+0.2*focal+0.2*lovasz", 4)(logits, target).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_parse_loss_spec():
    assert parse_loss_spec("0.7*ce+0.3*DICE") == [(0.7, "ce"), (0.3, "dice")]
    assert parse_loss_spec("ce + 1e-1*lovasz") == [(1.0, "ce"), (0.1, "lovasz")]


def test_single_name_returns_plain_loss():
    assert isinstance(build_loss("CE", 3), CrossEntropyLoss)
    assert isinstance(build_loss("dice", 3), DiceLoss)


def test_unknown_loss_lists_valid_names():
    with pytest.raises(UnknownNameError) as err:
        build_loss("0.5*ce+0.5*iou", 3)
    assert isinstance(err.value, PipelineError)
    for name in list_losses():
        assert name in str(err.value)


@pytest.mark.parametrize("spec", ["", "ce+", "ce*0.5", "-1*ce", "0.5*"])
def test_malformed_spec_errors(spec):
    with pytest.raises(PipelineError):
        build_loss(spec, 3)


def test_bad_options_error():
    with pytest.raises(PipelineError, match="gamma"):
        build_loss("ce", 3, gamma=2.0)
    with pytest.raises(PipelineError, match="3 classes"):
        build_loss("ce", 3, class_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="3 classes"):
        build_loss("ce", 3)(torch.zeros(1, 4, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))


def test_losses_default_to_the_metric_modules_ignore_index():
    import inspect

    from pipeline.evaluation.metrics import IGNORE_INDEX
    from pipeline.models import losses

    for obj in (
        losses.build_loss,
        losses.CrossEntropyLoss,
        losses.DiceLoss,
        losses.FocalLoss,
        losses.LovaszSoftmaxLoss,
    ):
        assert inspect.signature(obj).parameters["ignore_index"].default == IGNORE_INDEX
