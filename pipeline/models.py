"""Model registry: every segmentation architecture is built by name with ``build_model``.

``build_model("unet", num_classes=K, encoder="resnet34")`` returns a module whose forward
takes ``N x C x H x W`` and returns logits ``N x K x H x W`` at the input size.  ``K`` comes
from the annotation file, never from code.  Names are case-insensitive.

Families (``list_models()``; the smp rows follow the installed segmentation-models-pytorch):

==================================  ===========  ==========================================  =======  ======================  ========
name                                family       default encoder                             divisor  test encoder (CPU)      min size
==================================  ===========  ==========================================  =======  ======================  ========
unet                                smp          resnet34                                    1        resnet18                64
unetplusplus                        smp          resnet34                                    32       resnet18                64
manet                               smp          resnet34                                    32       resnet18                64
linknet                             smp          resnet34                                    32       resnet18                64
fpn                                 smp          resnet34                                    32       resnet18                64
pspnet                              smp          resnet34                                    8        resnet18                64
deeplabv3                           smp          resnet34                                    8        resnet18                64
deeplabv3plus                       smp          resnet34                                    16       resnet18                64
pan                                 smp          resnet34                                    16       resnet18                128
upernet                             smp          resnet34                                    32       tu-test_convnext        64
segformer                           smp          mit_b2                                      32       mit_b0                  64
dpt                                 smp          tu-vit_base_patch16_224.augreg_in21k        16       tu-test_vit             64
tv_fcn_resnet50                     torchvision  resnet50 (fixed)                            1        resnet50                64
tv_fcn_resnet101                    torchvision  resnet101 (fixed)                           1        resnet101               64
tv_deeplabv3_resnet50               torchvision  resnet50 (fixed)                            1        resnet50                64
tv_deeplabv3_resnet101              torchvision  resnet101 (fixed)                           1        resnet101               64
tv_deeplabv3_mobilenet_v3_large     torchvision  mobilenet_v3_large (fixed)                  1        mobilenet_v3_large      64
tv_lraspp_mobilenet_v3_large        torchvision  mobilenet_v3_large (fixed)                  1        mobilenet_v3_large      64
==================================  ===========  ==========================================  =======  ======================  ========

- smp families take any encoder of ``list_encoders()`` or any ``tu-<timm model name>``
  (``tu-convnext_tiny``, ``tu-swin_...``, ``tu-<name>.<pretrained tag>``); DPT takes only
  ViT-style ``tu-`` encoders and is built with ``dynamic_img_size=True`` so any multiple of
  the patch size works (pass ``dynamic_img_size=False`` to get the fixed timm input size).
- "divisor": height and width must be multiples of it (``input_divisor(name, encoder)``;
  it depends on the encoder and on ``encoder_depth`` / ``encoder_output_stride``).  A 1
  means any size: smp's Unet and the torchvision models resize internally.  Heads whose
  logits come out smaller than the input are upsampled bilinearly to the input size.
- "min size" is the smallest square test input: PAN's pyramid pooling needs 128.
- Models with global pooling (PSPNet, DeepLabV3 ASPP, PAN) need a batch of 2 or more in
  training mode (BatchNorm on a 1x1 map).
- ``encoder_weights="imagenet"`` downloads through smp / timm / torchvision (for ``tu-``
  encoders any non-null value means timm's pretrained tag in the name; for torchvision
  families it means the ImageNet backbone, the segmentation head stays random).
  ``weights="/path/file"`` loads a local whole-model or encoder-only state dict instead.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import logging
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.utils import PipelineError

log = logging.getLogger(__name__)

__all__ = [
    "ModelSpec",
    "SegmentationNet",
    "UnknownNameError",
    "LoadReport",
    "build_model",
    "list_models",
    "list_encoders",
    "get_spec",
    "default_encoder",
    "input_divisor",
    "load_weights",
    "load_state_dict_into",
    "encoder_parameters",
    "decoder_parameters",
    "param_groups",
]


class UnknownNameError(PipelineError):
    """A name that no registry knows; the message lists the valid names."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What the registry knows about one model family."""

    name: str
    family: str  # "smp" or "torchvision"
    arch: str  # smp architecture key or torchvision builder name
    default_encoder: str
    divisor: int  # input-size divisor with the default encoder and settings
    test_encoder: str  # small encoder for CPU tests
    min_test_size: int = 64
    fixed_encoder: bool = False  # torchvision families have one backbone
    default_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)


_SMP_OVERRIDES: dict[str, dict[str, Any]] = {
    "pan": {"min_test_size": 128},
    "upernet": {"test_encoder": "tu-test_convnext"},
    "segformer": {"default_encoder": "mit_b2", "test_encoder": "mit_b0"},
    "dpt": {"test_encoder": "tu-test_vit", "default_kwargs": {"dynamic_img_size": True}},
}

# registry name -> (torchvision builder, backbone, ImageNet weights enum of the backbone)
_TV_FAMILIES: dict[str, tuple[str, str, str]] = {
    "tv_fcn_resnet50": ("fcn_resnet50", "resnet50", "ResNet50_Weights"),
    "tv_fcn_resnet101": ("fcn_resnet101", "resnet101", "ResNet101_Weights"),
    "tv_deeplabv3_resnet50": ("deeplabv3_resnet50", "resnet50", "ResNet50_Weights"),
    "tv_deeplabv3_resnet101": ("deeplabv3_resnet101", "resnet101", "ResNet101_Weights"),
    "tv_deeplabv3_mobilenet_v3_large": ("deeplabv3_mobilenet_v3_large", "mobilenet_v3_large", "MobileNet_V3_Large_Weights"),
    "tv_lraspp_mobilenet_v3_large": ("lraspp_mobilenet_v3_large", "mobilenet_v3_large", "MobileNet_V3_Large_Weights"),
}

_ALIASES = {
    "unet++": "unetplusplus",
    "deeplabv3+": "deeplabv3plus",
    **{builder: name for name, (builder, _, _) in _TV_FAMILIES.items()},
}

_OFFLINE_HINT = (
    "Without network access either pass weights=/path/file (a whole-model or encoder-only "
    "state dict saved on disk) or set encoder_weights=null to start from random weights; "
    "files downloaded once are cached under $TORCH_HOME and $HF_HOME."
)


def _smp():
    import segmentation_models_pytorch as smp

    return smp


def _smp_arch_defaults(arch_cls: type) -> dict[str, Any]:
    params = inspect.signature(arch_cls.__init__).parameters
    return {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}


def _smp_divisor(arch_cls: type, encoder: str, kwargs: Mapping[str, Any]) -> int:
    defaults = _smp_arch_defaults(arch_cls)
    if encoder.startswith("tu-") and arch_cls.__name__.lower() == "dpt":
        return _vit_reduction(encoder[3:])
    if not getattr(arch_cls, "requires_divisible_input_shape", True):
        return 1
    depth = int(kwargs.get("encoder_depth", defaults.get("encoder_depth", 5)))
    stride = kwargs.get("encoder_output_stride", defaults.get("encoder_output_stride", 32)) or 32
    return int(min(int(stride), 2**depth))


@functools.lru_cache(maxsize=64)
def _vit_reduction(timm_name: str) -> int:
    """Patch size (feature reduction) of a ViT-style timm model, without allocating it."""
    match = re.search(r"patch(\d+)", timm_name)
    if match:
        return int(match.group(1))
    import timm

    try:
        with torch.device("meta"):
            vit = timm.create_model(timm_name, pretrained=False)
        return int(vit.feature_info[-1]["reduction"])
    except (RuntimeError, ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
        log.debug("cannot read the patch size of %s (%s); assuming 16", timm_name, exc)
        return 16


@functools.lru_cache(maxsize=1)
def _registry() -> dict[str, ModelSpec]:
    smp = _smp()
    specs: dict[str, ModelSpec] = {}
    for arch, arch_cls in smp.MODEL_ARCHITECTURES_MAPPING.items():
        over = _SMP_OVERRIDES.get(arch, {})
        enc = over.get("default_encoder", _smp_arch_defaults(arch_cls).get("encoder_name", "resnet34"))
        kwargs = dict(over.get("default_kwargs", {}))
        specs[arch] = ModelSpec(
            name=arch,
            family="smp",
            arch=arch,
            default_encoder=enc,
            divisor=_smp_divisor(arch_cls, enc, kwargs),
            test_encoder=over.get("test_encoder", "resnet18"),
            min_test_size=over.get("min_test_size", 64),
            default_kwargs=kwargs,
        )
    for name, (builder, backbone, _) in _TV_FAMILIES.items():
        specs[name] = ModelSpec(
            name=name,
            family="torchvision",
            arch=builder,
            default_encoder=backbone,
            divisor=1,
            test_encoder=backbone,
            fixed_encoder=True,
        )
    return specs


def list_models() -> list[str]:
    """Registry names of every model family (smp architectures first, then torchvision)."""
    return list(_registry())


def list_encoders() -> list[str]:
    """smp's own encoder names; any ``tu-<timm model name>`` is accepted as well."""
    return list(_smp().encoders.get_encoder_names())


def get_spec(name: str) -> ModelSpec:
    """The ``ModelSpec`` of a family (case-insensitive); unknown names list the valid ones."""
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    specs = _registry()
    if key not in specs:
        close = difflib.get_close_matches(key, list(specs), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UnknownNameError(f"unknown model {name!r}{hint}; valid names: {', '.join(specs)}")
    return specs[key]


def default_encoder(name: str) -> str:
    """The encoder a family is built with when ``encoder`` is not given."""
    return get_spec(name).default_encoder


def _resolve_encoder(spec: ModelSpec, encoder: str | None) -> str:
    if encoder is None or str(encoder).strip() == "":
        return spec.default_encoder
    enc = str(encoder).strip()
    if spec.fixed_encoder:
        if enc.lower() != spec.default_encoder:
            raise UnknownNameError(
                f"model {spec.name!r} has a fixed backbone; valid encoder: {spec.default_encoder} "
                f"(or leave encoder unset); pick an smp family for other encoders"
            )
        return spec.default_encoder
    if enc.lower().startswith("tu-"):
        import timm

        timm_name = enc[3:]
        if not timm.is_model(timm_name):
            base = timm_name.split(".")[0]
            close = difflib.get_close_matches(base, timm.list_models(), n=5)
            hint = f"; close timm names: {', '.join(close)}" if close else ""
            raise UnknownNameError(
                f"unknown encoder {enc!r}: {timm_name!r} is not a model of the installed timm "
                f"{timm.__version__}{hint}; see timm.list_models()"
            )
        return "tu-" + timm_name
    if spec.arch == "dpt":
        raise UnknownNameError(
            f"model 'dpt' needs a ViT-style timm encoder written tu-<timm name>, e.g. "
            f"{spec.default_encoder} or {spec.test_encoder}; got {enc!r}"
        )
    smp = _smp()
    names = smp.encoders.get_encoder_names()
    for candidate in (enc, enc.lower()):
        if candidate in names:
            return candidate
        is_equiv = getattr(smp.encoders, "is_equivalent_to_timm_universal", None)
        if is_equiv is not None and is_equiv(candidate):
            return candidate
    close = difflib.get_close_matches(enc.lower(), names, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise UnknownNameError(
        f"unknown encoder {enc!r}{hint}; valid smp encoders: {', '.join(names)}; "
        f"any timm model is accepted as tu-<timm name> (e.g. tu-convnext_tiny)"
    )


def input_divisor(name: str, encoder: str | None = None, **kwargs: Any) -> int:
    """Height and width of inputs must be multiples of this (1: any size works).

    ``kwargs`` are the model options that change it (``encoder_depth``,
    ``encoder_output_stride``).  The built model carries the same value as
    ``model.input_divisor``.
    """
    spec = get_spec(name)
    if spec.family == "torchvision":
        return 1
    enc = _resolve_encoder(spec, encoder)
    arch_cls = _smp().MODEL_ARCHITECTURES_MAPPING[spec.arch]
    return _smp_divisor(arch_cls, enc, {**spec.default_kwargs, **kwargs})


class SegmentationNet(nn.Module):
    """A registry model: forward returns logits ``N x K x H x W`` at the input size.

    The wrapped network is ``self.net``; ``self.encoder`` is its encoder (smp) or backbone
    (torchvision).
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        arch: str,
        family: str,
        encoder_name: str,
        num_classes: int,
        in_channels: int,
        input_divisor: int,
    ) -> None:
        super().__init__()
        self.net = net
        self.arch = arch
        self.family = family
        self.encoder_name = encoder_name
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.input_divisor = input_divisor

    @property
    def encoder(self) -> nn.Module:
        return self.net.backbone if self.family == "torchvision" else self.net.encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        if isinstance(out, Mapping):
            out = out["out"]
        if out.shape[-2:] != x.shape[-2:]:
            out = F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return out

    def extra_repr(self) -> str:
        return (
            f"arch={self.arch}, encoder={self.encoder_name}, num_classes={self.num_classes}, "
            f"in_channels={self.in_channels}, input_divisor={self.input_divisor}"
        )


def build_model(
    name: str,
    num_classes: int,
    encoder: str | None = None,
    encoder_weights: str | None = None,
    weights: str | Path | None = None,
    in_channels: int = 3,
    **kwargs: Any,
) -> SegmentationNet:
    """Build a registered model with ``num_classes`` output channels.

    ``encoder_weights``: pretrained encoder weights to download (``"imagenet"`` or another
    smp weight name; ``None`` for random).  ``weights``: a local whole-model or
    encoder-only state dict loaded after building (no download is then attempted).
    ``kwargs`` go to ``smp.create_model`` or the torchvision builder.
    """
    spec = get_spec(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise PipelineError(f"num_classes must be a positive integer (from the annotation file), got {num_classes!r}")
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise PipelineError(f"in_channels must be a positive integer, got {in_channels!r}")
    for key in ("aux_params", "activation"):
        if kwargs.get(key) is not None:
            raise PipelineError(
                f"{key}={kwargs[key]!r} is not supported: registry models return one logits tensor "
                f"(apply softmax outside the model)"
            )
    enc = _resolve_encoder(spec, encoder)
    if weights is not None:
        weights = Path(weights)
        if not weights.is_file():
            raise PipelineError(f"{weights}: weights file not found")
        if encoder_weights is not None:
            log.info("weights=%s given: not downloading encoder weights %r", weights, encoder_weights)
            encoder_weights = None
    if spec.family == "smp":
        net = _build_smp(spec, enc, num_classes, encoder_weights, in_channels, kwargs)
        divisor = _smp_divisor(type(net), enc, {**spec.default_kwargs, **kwargs})
        if getattr(net, "requires_divisible_input_shape", True):
            divisor = int(getattr(net.encoder, "output_stride", divisor))
    else:
        net = _build_torchvision(spec, num_classes, encoder_weights, in_channels, kwargs)
        divisor = 1
    model = SegmentationNet(
        net,
        arch=spec.name,
        family=spec.family,
        encoder_name=enc,
        num_classes=num_classes,
        in_channels=in_channels,
        input_divisor=divisor,
    )
    if weights is not None:
        load_weights(model, weights)
    return model


def _build_smp(
    spec: ModelSpec,
    encoder: str,
    num_classes: int,
    encoder_weights: str | None,
    in_channels: int,
    kwargs: Mapping[str, Any],
) -> nn.Module:
    smp = _smp()
    weights: Any = encoder_weights
    if encoder_weights is not None:
        is_equiv = getattr(smp.encoders, "is_equivalent_to_timm_universal", lambda _: False)
        if encoder.startswith("tu-") or is_equiv(encoder):
            weights = True  # the timm pretrained tag is part of the encoder name
        else:
            available = list(smp.encoders.encoders[encoder]["pretrained_settings"])
            if encoder_weights not in available:
                raise UnknownNameError(
                    f"unknown encoder_weights {encoder_weights!r} for encoder {encoder!r}; "
                    f"valid: {', '.join(available)} or null (random init)"
                )
    options = {**spec.default_kwargs, **kwargs}
    try:
        return smp.create_model(
            spec.arch,
            encoder_name=encoder,
            encoder_weights=weights,
            in_channels=in_channels,
            classes=num_classes,
            **options,
        )
    except OSError as exc:
        if weights is None:
            raise
        raise PipelineError(
            f"could not download encoder weights {encoder_weights!r} for {spec.name} / {encoder}: {exc}. "
            + _OFFLINE_HINT
        ) from exc
    except (KeyError, ValueError, TypeError, RuntimeError, AttributeError) as exc:
        raise PipelineError(f"cannot build model {spec.name!r} with encoder {encoder!r} and options {options}: {exc}") from exc


def _build_torchvision(
    spec: ModelSpec,
    num_classes: int,
    encoder_weights: str | None,
    in_channels: int,
    kwargs: Mapping[str, Any],
) -> nn.Module:
    import torchvision.models as tvm
    from torchvision.models import segmentation as tvseg

    _, backbone, weights_enum = _TV_FAMILIES[spec.name]
    weights_backbone = None
    if encoder_weights is not None:
        if str(encoder_weights).lower() != "imagenet":
            raise UnknownNameError(
                f"unknown encoder_weights {encoder_weights!r} for {spec.name}; valid: imagenet "
                f"(the {backbone} ImageNet backbone) or null (random init)"
            )
        weights_backbone = getattr(tvm, weights_enum).IMAGENET1K_V1
    options: dict[str, Any] = {"weights": None, "weights_backbone": weights_backbone, "num_classes": num_classes}
    if not spec.arch.startswith("lraspp"):
        options["aux_loss"] = False
    options.update(kwargs)
    try:
        net = getattr(tvseg, spec.arch)(**options)
    except OSError as exc:
        raise PipelineError(
            f"could not download the ImageNet {backbone} backbone for {spec.name}: {exc}. " + _OFFLINE_HINT
        ) from exc
    except (TypeError, ValueError) as exc:
        raise PipelineError(f"cannot build model {spec.name!r} with options {options}: {exc}") from exc
    if in_channels != 3:
        _set_in_channels(net.backbone, in_channels, pretrained=weights_backbone is not None)
    return net


def _set_in_channels(module: nn.Module, in_channels: int, pretrained: bool) -> None:
    """Replace the first convolution so it takes ``in_channels`` channels.

    Pretrained kernels are cycled over the new channels and rescaled, as smp does.
    """
    for qualname, conv in module.named_modules():
        if isinstance(conv, nn.Conv2d):
            break
    else:
        raise PipelineError(f"{type(module).__name__} has no convolution to adapt to in_channels={in_channels}")
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        conv.bias is not None,
        conv.padding_mode,
    )
    if pretrained:
        with torch.no_grad():
            idx = torch.arange(in_channels) % conv.in_channels
            new.weight.copy_(conv.weight[:, idx] * (conv.in_channels / in_channels))
            if conv.bias is not None:
                new.bias.copy_(conv.bias)
    parent_name, _, child = qualname.rpartition(".")
    parent = module.get_submodule(parent_name) if parent_name else module
    setattr(parent, child, new)


# ----------------------------------------------------------------------------- weights


@dataclasses.dataclass
class LoadReport:
    """What ``load_weights`` did: ``kind`` is "whole model" or "encoder only"."""

    source: str
    kind: str
    loaded: int
    missing: list[str]
    unexpected: list[str]
    mismatched: list[str]


_STRIP_ALWAYS = ("module.", "_orig_mod.")
_SOURCE_PREFIXES = ("", "model.", "net.", "encoder.", "backbone.", "features.", "model.encoder.", "model.backbone.")


def _read_weights_file(path: Path) -> Any:
    if not path.is_file():
        raise PipelineError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (OSError, RuntimeError, ValueError) as exc:
            raise PipelineError(f"{path}: not a readable safetensors file: {exc}") from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        log.info("%s holds objects other than tensors; loading it with full unpickling (only load files you trust)", path)
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        raise PipelineError(f"{path}: not a readable torch file: {exc}") from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, AttributeError, ImportError) as exc:
        raise PipelineError(f"{path}: not a readable torch file: {exc}") from exc


def _tensors_of(obj: Any) -> dict[str, torch.Tensor] | None:
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, Mapping):
        tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    return None


def _extract_state_dict(obj: Any, source: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict", "model_state_dict", "net"):
            if key in obj:
                tensors = _tensors_of(obj[key])
                if tensors:
                    return tensors
    tensors = _tensors_of(obj)
    if tensors:
        return tensors
    raise PipelineError(
        f"{source}: holds no state dict (expected a mapping of parameter names to tensors, "
        f"or one under 'model' / 'state_dict')"
    )


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _STRIP_ALWAYS:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def _short(keys: list[str], n: int = 8) -> str:
    head = ", ".join(keys[:n])
    return head + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def load_state_dict_into(model: SegmentationNet, state_dict: Mapping[str, torch.Tensor], source: str = "state dict") -> LoadReport:
    """Load a whole-model or encoder-only state dict into a registry model.

    Keys may carry ``module.`` / ``_orig_mod.`` prefixes, come from the bare smp or
    torchvision network, from the encoder alone, or from a plain timm / torchvision
    classification backbone; the key mapping that matches most tensors wins.  Tensors
    whose shape differs (e.g. a head for another class count) are skipped with a warning.
    Raises ``PipelineError`` naming ``source`` when the file matches neither layout.
    """
    target = model.state_dict()
    enc_prefix = "net.backbone." if model.family == "torchvision" else "net.encoder."
    target_prefixes = ("", "net.", enc_prefix, enc_prefix + "model.")
    cleaned = {_strip(k): v for k, v in state_dict.items()}
    best: tuple[int, dict[str, torch.Tensor], list[str]] | None = None
    for sp in _SOURCE_PREFIXES:
        kept = {k[len(sp):]: v for k, v in cleaned.items() if k.startswith(sp)}
        dropped = [k for k in cleaned if not k.startswith(sp)]
        for tp in target_prefixes:
            mapped = {tp + k: v for k, v in kept.items()}
            score = sum(1 for k, v in mapped.items() if k in target and target[k].shape == v.shape)
            if best is None or score > best[0]:
                best = (score, mapped, dropped)
    assert best is not None
    score, mapped, dropped = best
    matched = {k: v for k, v in mapped.items() if k in target and target[k].shape == v.shape}
    mismatched = [
        f"{k} {tuple(v.shape)} (model {tuple(target[k].shape)})"
        for k, v in mapped.items()
        if k in target and target[k].shape != v.shape
    ]
    unexpected = dropped + [k for k in mapped if k not in target]
    enc_keys = [k for k in target if k.startswith(enc_prefix)]
    dec_keys = [k for k in target if not k.startswith(enc_prefix)]
    enc_cover = sum(k in matched for k in enc_keys) / max(len(enc_keys), 1)
    if not cleaned or score < 0.5 * len(cleaned) or enc_cover < 0.5:
        raise PipelineError(
            f"{source}: matches neither the whole model nor its encoder ({model.arch} / "
            f"{model.encoder_name}, {model.num_classes} classes): {score} of {len(cleaned)} tensors fit; "
            f"file keys: {_short(list(cleaned), 5)}; model keys: {_short(list(target), 5)}"
        )
    whole = sum(k in matched for k in dec_keys) / max(len(dec_keys), 1) > 0.5
    kind = "whole model" if whole else "encoder only"
    missing = [k for k in (target if whole else enc_keys) if k not in matched]
    merged = dict(target)
    merged.update(matched)
    model.load_state_dict(merged)
    log.info("%s: loaded %d of %d tensors (%s)", source, len(matched), len(target), kind)
    if missing:
        log.warning("%s: %d missing key(s) left at their initial values: %s", source, len(missing), _short(missing))
    if unexpected:
        log.warning("%s: %d unexpected key(s) ignored: %s", source, len(unexpected), _short(unexpected))
    if mismatched:
        log.warning("%s: %d key(s) with another shape skipped: %s", source, len(mismatched), _short(mismatched))
    return LoadReport(str(source), kind, len(matched), missing, unexpected, mismatched)


def load_weights(model: SegmentationNet, path: str | Path) -> LoadReport:
    """Load a local weights file (``.pt``/``.pth``/``.ckpt`` or ``.safetensors``) into ``model``.

    Accepts a state dict, a pipeline checkpoint (``{'model': state_dict, ...}``) or
    ``{'state_dict': ...}``, for the whole model or for its encoder only.
    """
    path = Path(path)
    obj = _read_weights_file(path)
    return load_state_dict_into(model, _extract_state_dict(obj, str(path)), str(path))


# ----------------------------------------------------------------------------- param groups


def _unwrap(model: nn.Module) -> nn.Module:
    while True:
        inner = getattr(model, "module", None)  # DataParallel, DDP, AveragedModel
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)  # torch.compile
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _encoder_of(model: nn.Module) -> nn.Module:
    model = _unwrap(model)
    for attr in ("encoder", "backbone"):
        enc = getattr(model, attr, None)
        if isinstance(enc, nn.Module):
            return enc
    net = getattr(model, "net", None)
    if isinstance(net, nn.Module) and net is not model:
        return _encoder_of(net)
    raise PipelineError(f"{type(model).__name__} has no encoder or backbone submodule; cannot split its parameters")


def encoder_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters of the encoder (smp ``encoder``, torchvision ``backbone``)."""
    return [p for p in _encoder_of(model).parameters() if p.requires_grad]


def decoder_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters outside the encoder (decoder and heads)."""
    enc_ids = {id(p) for p in _encoder_of(model).parameters()}
    return [p for p in _unwrap(model).parameters() if p.requires_grad and id(p) not in enc_ids]


_NORM_TYPES: tuple[type, ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def _no_decay_ids(model: nn.Module) -> set[int]:
    """Biases, norm-layer parameters, 1-d parameters and those a timm model lists as no-decay."""
    ids: set[int] = set()
    for module in model.modules():
        is_norm = isinstance(module, _NORM_TYPES) or type(module).__name__.lower().endswith("norm")
        for p in module.parameters(recurse=False):
            if is_norm or p.ndim <= 1:
                ids.add(id(p))
        no_wd = getattr(module, "no_weight_decay", None)
        if callable(no_wd):
            names = set(no_wd())
            for pname, p in module.named_parameters():
                if pname in names:
                    ids.add(id(p))
    return ids


def _iter_split(params: list[nn.Parameter], no_decay: set[int]) -> Iterator[tuple[bool, list[nn.Parameter]]]:
    yield True, [p for p in params if id(p) not in no_decay]
    yield False, [p for p in params if id(p) in no_decay]


def param_groups(
    model: nn.Module,
    encoder_lr: float,
    decoder_lr: float,
    weight_decay: float = 0.0,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups: encoder and decoder learning rates, no decay on biases and norms.

    Returns up to four groups named ``encoder``, ``encoder_no_decay``, ``decoder``,
    ``decoder_no_decay`` (empty ones left out); each trainable parameter is in exactly one.
    """
    no_decay = _no_decay_ids(_unwrap(model))
    groups: list[dict[str, Any]] = []
    for part, params, lr in (
        ("encoder", encoder_parameters(model), encoder_lr),
        ("decoder", decoder_parameters(model), decoder_lr),
    ):
        for decay, chosen in _iter_split(params, no_decay):
            if chosen:
                groups.append(
                    {
                        "name": part if decay else f"{part}_no_decay",
                        "params": chosen,
                        "lr": float(lr),
                        "weight_decay": float(weight_decay) if decay else 0.0,
                    }
                )
    return groups
