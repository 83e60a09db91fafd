"""Model registry: every segmentation architecture is built by name with ``build_model``.

``build_model("unet", num_classes=K, encoder="resnet34")`` returns a module whose forward
takes ``N x C x H x W`` and returns logits ``N x K x H x W`` at the input size.  ``K`` comes
from the annotation file, never from code.  Names are case-insensitive.

Families (``list_models()``; the smp rows follow the installed segmentation-models-pytorch):

===============================  ===========  ====================================  =======  ==================  ===
name                             family       default encoder                       divisor  test encoder        min
===============================  ===========  ====================================  =======  ==================  ===
unet                             smp          resnet34                              1        resnet18            64
unetplusplus                     smp          resnet34                              32       resnet18            64
manet                            smp          resnet34                              32       resnet18            64
linknet                          smp          resnet34                              32       resnet18            64
fpn                              smp          resnet34                              32       resnet18            64
pspnet                           smp          resnet34                              8        resnet18            64
deeplabv3                        smp          resnet34                              8        resnet18            64
deeplabv3plus                    smp          resnet34                              16       resnet18            64
pan                              smp          resnet34                              16       resnet18            128
upernet                          smp          resnet34                              32       tu-test_convnext    64
segformer                        smp          mit_b2                                32       mit_b0              64
dpt                              smp          tu-vit_base_patch16_224.augreg_in21k  16       tu-test_vit         64
mask2former                      hf           swin-tiny                             32       test-swin           64
maskformer                       hf           swin-tiny                             32       test-swin           64
hf_upernet                       hf           convnext-tiny                         32       test-convnext       64
hf_segformer                     hf           mit-b0                                32       mit-test            64
tv_fcn_resnet50                  torchvision  resnet50 (fixed)                      1        resnet50            64
tv_fcn_resnet101                 torchvision  resnet101 (fixed)                     1        resnet101           64
tv_deeplabv3_resnet50            torchvision  resnet50 (fixed)                      1        resnet50            64
tv_deeplabv3_resnet101           torchvision  resnet101 (fixed)                     1        resnet101           64
tv_deeplabv3_mobilenet_v3_large  torchvision  mobilenet_v3_large (fixed)            1        mobilenet_v3_large  64
tv_lraspp_mobilenet_v3_large     torchvision  mobilenet_v3_large (fixed)            1        mobilenet_v3_large  64
===============================  ===========  ====================================  =======  ==================  ===

- smp families take any encoder of ``list_encoders()`` or any ``tu-<timm model name>``
  (``tu-convnext_tiny``, ``tu-swin_...``, ``tu-<name>.<pretrained tag>``); DPT takes only
  ViT-style ``tu-`` encoders and is built with ``dynamic_img_size=True`` so any multiple of
  the patch size works (pass ``dynamic_img_size=False`` to get the fixed timm input size).
- hf families are transformers' implementations (:mod:`pipeline.models.hf`): ``mask2former``
  and ``maskformer`` are mask classification (their own outputs, loss and probabilities through
  the family contract; train with ``loss=model``), ``hf_upernet`` / ``hf_segformer`` return
  logits.  Their encoders are backbone presets with random weights; a whole
  segmentation-pretrained model comes with ``pretrained=<hub id or local folder>``.
- "divisor": height and width must be multiples of it (``input_divisor(name, encoder)``;
  it depends on the encoder and on ``encoder_depth`` / ``encoder_output_stride``).  A 1
  means any size: smp's Unet and the torchvision models resize internally.  Heads whose
  logits come out smaller than the input are upsampled bilinearly to the input size.
- "min" is the smallest square test input: PAN's pyramid pooling needs 128.
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
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.errors import PipelineError, UnknownNameError
from pipeline.core.registry import Registry

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What the registry knows about one model family."""

    name: str
    family: str  # "smp", "torchvision" or "hf" (transformers)
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
    "tv_deeplabv3_mobilenet_v3_large": (
        "deeplabv3_mobilenet_v3_large",
        "mobilenet_v3_large",
        "MobileNet_V3_Large_Weights",
    ),
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
def _specs() -> dict[str, ModelSpec]:
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
    from pipeline.models import hf

    for name, fam in hf.FAMILIES.items():
        specs[name] = ModelSpec(
            name=name,
            family="hf",
            arch=fam.model_class,
            default_encoder=fam.default_encoder,
            divisor=32,
            test_encoder=fam.test_encoder,
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


@functools.lru_cache(maxsize=1)
def model_registry() -> Registry:
    """Family name -> builder ``(num_classes, **options) -> SegmentationNet``; built on first use
    (the smp rows follow the installed segmentation-models-pytorch)."""
    registry: Registry = Registry("model")
    aliases: dict[str, list[str]] = {}
    for alias, name in _ALIASES.items():
        aliases.setdefault(name, []).append(alias)
    for name, spec in _specs().items():
        encoder = f"{spec.default_encoder}{' (fixed)' if spec.fixed_encoder else ''}"
        registry.add(
            name,
            functools.partial(build_model, name),
            f"{spec.family}; default encoder {encoder}",
            tuple(aliases.get(name, ())),
        )
    return registry


def list_models() -> list[str]:
    """Registry names of every model family (smp architectures first, then torchvision)."""
    return model_registry().names()


def list_encoders() -> list[str]:
    """smp's own encoder names; any ``tu-<timm model name>`` is accepted as well."""
    return list(_smp().encoders.get_encoder_names())


def get_spec(name: str) -> ModelSpec:
    """The ``ModelSpec`` of a family (case-insensitive, aliases too); unknown names list the valid ones."""
    return _specs()[model_registry().key(name)]


def default_encoder(name: str) -> str:
    """The encoder a family is built with when ``encoder`` is not given."""
    return get_spec(name).default_encoder


def _resolve_encoder(spec: ModelSpec, encoder: str | None) -> str:
    if encoder is None or str(encoder).strip() == "":
        return spec.default_encoder
    enc = str(encoder).strip()
    if spec.family == "hf":
        from pipeline.models import hf

        return hf.resolve_encoder(spec.name, enc)
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
    if spec.family == "hf":
        from pipeline.models import hf

        return hf.input_divisor(spec.name, encoder)
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
        self.architecture: dict[str, Any] | None = None  # set when built from a whole pretrained model

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
    pretrained: str | Path | None = None,
    architecture: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered model with ``num_classes`` output classes.

    Weights, in this order of precedence (the first given wins; the others are ignored
    with a log line): ``pretrained`` (a whole segmentation-pretrained model, hub id or
    local folder: backbone and decoder loaded, the classifier rebuilt for ``num_classes``;
    transformers families and smp-hub checkpoints), ``weights`` (a local whole-model or
    encoder-only state dict loaded after building, no download), ``encoder_weights``
    (pretrained encoder weights to download: ``"imagenet"`` or another smp weight name;
    ``None`` for random).  ``architecture``: a checkpoint's record of a model built from
    ``pretrained``, to rebuild the same network offline (random weights, then the
    checkpoint's state).  ``kwargs`` go to ``smp.create_model``, the torchvision builder
    or the transformers config.
    """
    spec = get_spec(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise PipelineError(f"num_classes must be a positive integer (from the annotation file), got {num_classes!r}")
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise PipelineError(f"in_channels must be a positive integer, got {in_channels!r}")
    if pretrained is not None and str(pretrained).strip().lower() in ("", "none", "null"):
        pretrained = None
    if pretrained is not None:
        for key, value in (("weights", weights), ("encoder_weights", encoder_weights)):
            if value is not None:
                log.info("pretrained=%s given: %s=%s is not used", pretrained, key, value)
        weights = encoder_weights = None
    if spec.family == "hf":
        hf_model = _build_hf(spec, num_classes, encoder, encoder_weights, in_channels, pretrained, architecture, kwargs)
        return _load_local(hf_model, weights)
    if pretrained is not None or architecture is not None:
        return _build_smp_pretrained(spec, num_classes, pretrained, architecture, in_channels)
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
        divisor = _built_smp_divisor(net, _smp_divisor(type(net), enc, {**spec.default_kwargs, **kwargs}))
    else:
        net = _build_torchvision(spec, num_classes, encoder_weights, in_channels, kwargs)
        divisor = 1
    return _load_local(_wrap(net, spec, enc, num_classes, in_channels, divisor), weights)


def _built_smp_divisor(net: nn.Module, fallback: int) -> int:
    """Input divisor of a built smp network: its encoder's output stride (1 when any size works)."""
    if not getattr(net, "requires_divisible_input_shape", True):
        return fallback
    return int(getattr(net.encoder, "output_stride", fallback))


def _wrap(net: nn.Module, spec: ModelSpec, encoder: str, num_classes: int, in_channels: int, divisor: int):
    return SegmentationNet(
        net,
        arch=spec.name,
        family=spec.family,
        encoder_name=encoder,
        num_classes=num_classes,
        in_channels=in_channels,
        input_divisor=divisor,
    )


def _load_local(model: nn.Module, weights: str | Path | None) -> nn.Module:
    """``model`` with a local whole-model or encoder-only state dict loaded (when given)."""
    if weights is not None:
        from pipeline.models.weights import load_weights

        load_weights(model, weights)
    return model


def _build_hf(
    spec: ModelSpec,
    num_classes: int,
    encoder: str | None,
    encoder_weights: str | None,
    in_channels: int,
    pretrained: str | Path | None,
    architecture: Mapping[str, Any] | None,
    kwargs: Mapping[str, Any],
) -> nn.Module:
    from pipeline.models import hf

    if in_channels != 3:
        raise PipelineError(f"model {spec.name!r} takes 3-channel images, got in_channels={in_channels}")
    if encoder_weights is not None:
        log.warning(
            "%s: encoder_weights=%s does not apply (its backbone presets start from random weights); a whole "
            "segmentation-pretrained model comes with pretrained=<hub id or folder>, e.g. %s",
            spec.name,
            encoder_weights,
            hf.FAMILIES[spec.name].hub_example,
        )
    if pretrained is not None:
        return hf.from_pretrained(spec.name, pretrained, num_classes)
    return hf.build(spec.name, num_classes, encoder, kwargs, architecture)


def _build_smp_pretrained(
    spec: ModelSpec,
    num_classes: int,
    pretrained: str | Path | None,
    architecture: Mapping[str, Any] | None,
    in_channels: int,
) -> SegmentationNet:
    """An smp model from a whole pretrained checkpoint (smp-hub id or a ``save_pretrained`` folder),
    its segmentation head rebuilt for ``num_classes``; or rebuilt offline from ``architecture``."""
    smp = _smp()
    if spec.family != "smp":
        raise PipelineError(
            f"pretrained= (a whole segmentation-pretrained model) is not available for {spec.name!r}: use weights= "
            f"(a local state dict) or encoder_weights="
        )
    if architecture is not None:
        config = {k: v for k, v in dict(architecture["config"]).items() if not k.startswith("_")}
        config.update(classes=num_classes, encoder_weights=None)
        net = getattr(smp, architecture["class"])(**config)
    else:
        source = Path(str(pretrained)).expanduser()
        where = str(source) if source.is_dir() else str(pretrained)
        try:
            net = smp.from_pretrained(where, classes=num_classes, strict=False)
        except (OSError, ValueError) as exc:
            raise PipelineError(
                f"pretrained={pretrained}: cannot load it ({str(exc).splitlines()[0][:200]}). Without access to the "
                f"model hub, download it where there is (huggingface-cli download {pretrained} --local-dir DIR, or "
                f"model.save_pretrained(DIR)) and pass pretrained=DIR; pretrained=null trains from random weights"
            ) from exc
        if type(net).__name__.lower() != spec.arch.lower():
            raise PipelineError(
                f"pretrained={pretrained} is a {type(net).__name__}, not model {spec.name!r}: set model= to match"
            )
        log.info(
            "%s: whole model loaded from %s (segmentation head rebuilt for %d classes)", spec.name, where, num_classes
        )
    config = dict(net.config)
    enc = str(config.get("encoder_name", spec.default_encoder))
    divisor = _built_smp_divisor(net, spec.divisor if getattr(net, "requires_divisible_input_shape", True) else 1)
    model = _wrap(net, spec, enc, num_classes, in_channels, divisor)
    model.architecture = {"family": spec.name, "class": type(net).__name__, "config": config}
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
    if encoder.startswith("tu-") and "swin" in encoder and "strict_img_size" not in options:
        options["strict_img_size"] = False  # timm's Swin takes any multiple of 32, not only its pretraining size
    if spec.arch == "dpt" and _vit_reduction(encoder[3:]) != 16:
        raise PipelineError(
            f"model 'dpt' takes ViT encoders with 16-pixel patches (e.g. tu-vit_small_patch16_dinov3); "
            f"{encoder} has {_vit_reduction(encoder[3:])}-pixel patches, which smp's DPT decoder cannot fuse: "
            f"use model=hf_upernet encoder=dinov2-small (or dinov2-base) for DINOv2"
        )
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
        raise PipelineError(
            f"cannot build model {spec.name!r} with encoder {encoder!r} and options {options}: {exc}"
        ) from exc


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
    for qualname, conv in module.named_modules():  # noqa: B007 - the first conv's name is used after the loop
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
