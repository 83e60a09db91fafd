"""Every registered family builds and trains one step on a CPU; weights files load; param groups split."""

from __future__ import annotations

import logging
import re

import pytest
import torch
from torch import nn

from pipeline.core.errors import PipelineError
from pipeline.models import (
    SegmentationNet,
    UnknownNameError,
    build_model,
    decoder_parameters,
    default_encoder,
    encoder_parameters,
    get_spec,
    input_divisor,
    list_encoders,
    list_models,
    load_weights,
    param_groups,
)
from pipeline.models import registry as M
from pipeline.models.backends.torchvision import set_in_channels
from pipeline.models.contract import has_own_loss, model_loss, model_probabilities

torch.set_num_threads(2)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

SMP_NAMES = [
    "unet", "unetplusplus", "manet", "linknet", "fpn", "pspnet",
    "deeplabv3", "deeplabv3plus", "pan", "upernet", "segformer", "dpt",
]  # fmt: skip
TV_NAMES = [
    "tv_fcn_resnet50", "tv_fcn_resnet101", "tv_deeplabv3_resnet50", "tv_deeplabv3_resnet101",
    "tv_deeplabv3_mobilenet_v3_large", "tv_lraspp_mobilenet_v3_large",
]  # fmt: skip


def tiny(name: str, num_classes: int, **kw) -> SegmentationNet:
    torch.manual_seed(0)
    return build_model(name, num_classes, encoder=get_spec(name).test_encoder, encoder_weights=None, **kw)


def batch(size: int | tuple[int, int], channels: int = 3, n: int = 2) -> torch.Tensor:
    h, w = (size, size) if isinstance(size, int) else size
    return torch.randn(n, channels, h, w, generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------- registry


def test_registry_has_every_installed_smp_architecture_and_torchvision_family():
    import segmentation_models_pytorch as smp

    names = list_models()
    assert set(smp.MODEL_ARCHITECTURES_MAPPING) <= set(names)
    assert set(SMP_NAMES) <= set(names)
    assert names[-len(TV_NAMES) - 1 :] == [*TV_NAMES, "maskrcnn"]  # torchvision's, then its instance segmentation
    assert len(names) == len(set(names))


def test_docstring_table_matches_specs():
    rows = {}
    for line in (M.__doc__ or "").splitlines():
        parts = re.split(r"\s{2,}", line.strip())
        if len(parts) == 6 and parts[0] in list_models():
            rows[parts[0]] = parts
    assert set(rows) == set(list_models())
    for name, (_, family, enc, divisor, test_enc, min_size) in rows.items():
        spec = get_spec(name)
        assert (family, enc.replace(" (fixed)", ""), int(divisor), test_enc, int(min_size)) == (
            spec.family, spec.default_encoder, spec.divisor, spec.test_encoder, spec.min_test_size
        )  # fmt: skip


def test_defaults_and_encoder_list():
    assert default_encoder("UNet") == "resnet34"
    assert default_encoder("segformer") == "mit_b2"
    assert default_encoder("dpt").startswith("tu-vit_")
    assert default_encoder("tv_deeplabv3_mobilenet_v3_large") == "mobilenet_v3_large"
    encoders = list_encoders()
    assert {"resnet18", "resnet34", "mit_b0", "efficientnet-b0"} <= set(encoders)
    assert not any(e.startswith("tu-") for e in encoders)


def test_input_divisor_values():
    assert input_divisor("fpn", "resnet18") == 32
    assert input_divisor("fpn", "resnet18", encoder_depth=4) == 16
    assert input_divisor("deeplabv3plus") == 16
    assert input_divisor("deeplabv3", encoder_output_stride=16) == 16
    assert input_divisor("unet") == 1
    assert input_divisor("dpt", "tu-vit_small_patch14_dinov2") == 14
    assert input_divisor("dpt", "tu-test_vit") == 16
    assert input_divisor("tv_fcn_resnet50") == 1


# ----------------------------------------------------------------------------- every family, one step


@pytest.mark.parametrize("num_classes", [5, 12])
@pytest.mark.parametrize("name", list_models())
def test_family_builds_trains_one_step_and_takes_non_square_input(name, num_classes):
    spec = get_spec(name)
    model = tiny(name, num_classes)
    model.train()
    size = spec.min_test_size
    x = batch(size)
    target = torch.randint(0, num_classes, (2, size, size), generator=torch.Generator().manual_seed(2))
    outputs = model(x)  # through the family contract: logits, or a family's own outputs and loss
    assert model_probabilities(model, outputs).shape == (2, num_classes, size, size)
    model_loss(model, outputs, target, None if has_own_loss(model) else nn.CrossEntropyLoss()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert model.num_classes == num_classes
    assert model.input_divisor == input_divisor(name, spec.test_encoder)
    assert size % model.input_divisor == 0
    model.eval()  # a non-square input (height x 1.5 height) works as well
    with torch.no_grad():
        probs = model_probabilities(model, model(batch((size, size * 3 // 2))))
    assert probs.shape == (2, num_classes, size, size * 3 // 2)
    assert torch.allclose(probs.sum(1), torch.ones(()), atol=1e-4)


def test_any_size_when_divisor_is_one():
    model = tiny("unet", 4).eval()
    with torch.no_grad():
        assert model(batch((70, 54))).shape == (2, 4, 70, 54)


def test_names_are_case_insensitive_with_aliases():
    assert isinstance(build_model("UNet++", 3, encoder="ResNet18"), SegmentationNet)
    model = build_model("DeepLabV3+", 3, encoder="resnet18")
    assert model.arch == "deeplabv3plus" and model.encoder_name == "resnet18"
    assert build_model("lraspp_mobilenet_v3_large", 3).arch == "tv_lraspp_mobilenet_v3_large"


def test_tu_encoder_and_in_channels():
    model = build_model("fpn", 4, encoder="tu-test_resnet", in_channels=5).eval()
    tv = build_model("tv_lraspp_mobilenet_v3_large", 4, in_channels=1).eval()
    with torch.no_grad():
        assert model(batch(64, channels=5)).shape == (2, 4, 64, 64)
        assert tv(batch(64, channels=1)).shape == (2, 4, 64, 64)


def test_first_conv_adaptation_keeps_pretrained_response():
    stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1))
    old = stem[0]
    set_in_channels(stem, 6, pretrained=True)
    x = batch(8)
    with torch.no_grad():
        assert torch.allclose(stem(torch.cat([x, x], 1)), old(x), atol=1e-5)


# ----------------------------------------------------------------------------- errors


def test_unknown_model_lists_valid_names():
    with pytest.raises(UnknownNameError) as err:
        build_model("unetttt", 3)
    assert isinstance(err.value, PipelineError)
    for name in list_models():
        assert name in str(err.value)


def test_unknown_encoder_lists_smp_encoders_and_tu():
    with pytest.raises(UnknownNameError) as err:
        build_model("unet", 3, encoder="resnet1888")
    msg = str(err.value)
    assert "resnet18" in msg and "mit_b0" in msg and "efficientnet-b7" in msg and "tu-" in msg


def test_unknown_timm_encoder_says_so():
    with pytest.raises(UnknownNameError, match="timm"):
        build_model("unet", 3, encoder="tu-not_a_timm_model")


def test_family_specific_encoder_errors():
    with pytest.raises(UnknownNameError, match="tu-"):
        build_model("dpt", 3, encoder="resnet18")
    with pytest.raises(UnknownNameError, match="resnet50"):
        build_model("tv_fcn_resnet50", 3, encoder="resnet18")
    with pytest.raises(UnknownNameError, match="imagenet"):
        build_model("unet", 3, encoder="resnet18", encoder_weights="imagenet22k")
    with pytest.raises(UnknownNameError, match="imagenet"):
        build_model("tv_fcn_resnet50", 3, encoder_weights="coco")
    with pytest.raises(PipelineError, match="aux_params"):
        build_model("unet", 3, encoder="resnet18", aux_params={"classes": 3})


def _no_network(*args, **kwargs):
    raise OSError("no network")


def test_smp_download_failure_explains_offline_options(monkeypatch):
    import segmentation_models_pytorch as smp

    monkeypatch.setattr(smp.encoders, "hf_hub_download", _no_network)
    with pytest.raises(PipelineError) as err:
        build_model("unet", 3, encoder="resnet18", encoder_weights="imagenet")
    assert "weights=" in str(err.value) and "encoder_weights=null" in str(err.value)


def test_torchvision_download_failure_explains_offline_options(monkeypatch):
    import torchvision.models._api as tv_api

    monkeypatch.setattr(tv_api, "load_state_dict_from_url", _no_network)
    with pytest.raises(PipelineError) as err:
        build_model("tv_lraspp_mobilenet_v3_large", 3, encoder_weights="imagenet")
    assert "weights=" in str(err.value) and "encoder_weights=null" in str(err.value)


# ----------------------------------------------------------------------------- weights files


def _same_output(a: nn.Module, b: nn.Module, x: torch.Tensor) -> bool:
    a.eval(), b.eval()
    with torch.no_grad():
        return torch.equal(a(x), b(x))


def test_whole_model_checkpoint_loads(tmp_path):
    src = tiny("unet", 5)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.01)
    path = tmp_path / "best.pt"
    state = {f"module.{k}": v for k, v in src.state_dict().items()}
    torch.save({"model": state, "epoch": 3, "config": {"lr": 1e-3}}, path)
    assert not _same_output(src, tiny("unet", 5), batch(64))
    dst = build_model("unet", 5, encoder="resnet18", weights=path)
    assert _same_output(src, dst, batch(64))


def test_bare_network_state_dict_loads(tmp_path):
    src = tiny("tv_lraspp_mobilenet_v3_large", 4)
    path = tmp_path / "tv.pth"
    torch.save({"state_dict": src.net.state_dict()}, path)
    dst = build_model("tv_lraspp_mobilenet_v3_large", 4, weights=path, encoder_weights="imagenet")
    assert _same_output(src, dst, batch(64))


def test_encoder_only_file_loads(tmp_path):
    src = tiny("fpn", 5)
    path = tmp_path / "encoder.pt"
    torch.save(src.encoder.state_dict(), path)
    torch.manual_seed(123)
    dst = build_model("fpn", 5, encoder="resnet18")
    report = load_weights(dst, path)
    assert report.kind == "encoder only" and not report.missing and not report.unexpected
    src.eval(), dst.eval()
    x = batch(64)
    with torch.no_grad():
        for a, b in zip(src.encoder(x), dst.encoder(x), strict=False):
            assert torch.equal(a, b)
        assert not torch.equal(src(x), dst(x))  # the decoder keeps its own initialisation


def test_torchvision_backbone_and_timm_files_load(tmp_path):
    src = tiny("tv_deeplabv3_mobilenet_v3_large", 3)
    path = tmp_path / "backbone.pt"
    torch.save({f"features.{k}": v for k, v in src.encoder.state_dict().items()}, path)
    dst = build_model("tv_deeplabv3_mobilenet_v3_large", 3, weights=path)
    x = batch(64)
    src.eval(), dst.eval()
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(src.encoder(x).values(), dst.encoder(x).values(), strict=False))

    tu_src = build_model("unet", 3, encoder="tu-test_resnet")
    tu_path = tmp_path / "timm.pt"
    torch.save(tu_src.encoder.model.state_dict(), tu_path)  # keys as in a plain timm model
    tu_dst = build_model("unet", 3, encoder="tu-test_resnet")
    assert load_weights(tu_dst, tu_path).kind == "encoder only"
    for a, b in zip(tu_src.encoder.parameters(), tu_dst.encoder.parameters(), strict=False):
        assert torch.equal(a, b)


def test_other_class_count_skips_head_and_logs(tmp_path, caplog):
    src = tiny("unet", 5)
    state = dict(src.state_dict())
    state["junk.weight"] = torch.zeros(2)
    state.pop("net.decoder.blocks.0.conv1.0.weight")
    path = tmp_path / "k5.pt"
    torch.save(state, path)
    dst = build_model("unet", 7, encoder="resnet18")
    with caplog.at_level(logging.WARNING, logger="pipeline.models"):
        report = load_weights(dst, path)
    assert report.kind == "whole model"
    assert report.unexpected == ["junk.weight"]
    assert report.missing[0] == "net.decoder.blocks.0.conv1.0.weight"
    assert any("segmentation_head" in m for m in report.mismatched)
    text = caplog.text
    assert "missing" in text and "unexpected" in text and "another shape" in text
    for a, b in zip(src.encoder.parameters(), dst.encoder.parameters(), strict=False):
        assert torch.equal(a, b)


def test_missing_and_unmatched_weights_files_error(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(PipelineError, match=re.escape(str(missing))):
        build_model("unet", 3, encoder="resnet18", weights=missing)
    junk = tmp_path / "junk.pt"
    torch.save({"foo.weight": torch.zeros(3, 3)}, junk)
    with pytest.raises(PipelineError, match=re.escape(str(junk))):
        build_model("unet", 3, encoder="resnet18", weights=junk)
    other = tmp_path / "other_arch.pt"
    torch.save(tiny("tv_lraspp_mobilenet_v3_large", 3).state_dict(), other)
    with pytest.raises(PipelineError, match="matches neither"):
        build_model("unet", 3, encoder="resnet18", weights=other)
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    with pytest.raises(PipelineError, match=re.escape(str(text))):
        build_model("unet", 3, encoder="resnet18", weights=text)


# ----------------------------------------------------------------------------- parameter groups


@pytest.mark.parametrize("name", ["unet", "segformer", "dpt", "tv_lraspp_mobilenet_v3_large"])
def test_param_groups_cover_trainable_parameters_once(name):
    model = tiny(name, 4)
    frozen = next(model.encoder.parameters())
    frozen.requires_grad_(False)
    groups = param_groups(nn.DataParallel(model), encoder_lr=1e-4, decoder_lr=1e-3, weight_decay=0.05)
    ids = [id(p) for g in groups for p in g["params"]]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(ids) == len(set(ids)) and set(ids) == trainable and id(frozen) not in ids

    enc = {id(p) for p in encoder_parameters(model)}
    dec = {id(p) for p in decoder_parameters(model)}
    assert enc and dec and not enc & dec and enc | dec == trainable
    by_name = {g["name"]: g for g in groups}
    assert {"encoder", "encoder_no_decay", "decoder", "decoder_no_decay"} == set(by_name)
    assert {id(p) for p in by_name["encoder"]["params"] + by_name["encoder_no_decay"]["params"]} == enc
    assert by_name["encoder"]["lr"] == 1e-4 and by_name["decoder_no_decay"]["lr"] == 1e-3
    assert by_name["decoder"]["weight_decay"] == 0.05 and by_name["encoder_no_decay"]["weight_decay"] == 0.0

    no_decay = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    for module in model.modules():
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if pname == "bias" or isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)):
                assert id(p) in no_decay, (type(module).__name__, pname)
            elif isinstance(module, (nn.Conv2d, nn.Linear)) and pname == "weight":
                assert id(p) not in no_decay, (type(module).__name__, pname)
    torch.optim.AdamW(groups)  # accepted as is
