"""segmentation_models_pytorch: its architectures with its own encoders or any ``tu-<timm name>``.

Every architecture of the installed smp is a family (``smp.MODEL_ARCHITECTURES_MAPPING``);
``_OVERRIDES`` holds what differs from smp's defaults.  Preprocessing comes from the encoder's
pretrained config: timm's for ``tu-`` encoders, smp's own settings for its encoders (the
``config.json`` of the smp-hub repo the weights download from, read from the local cache).
"""

from __future__ import annotations

import difflib
import functools
import inspect
import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.core.errors import PipelineError, UnknownNameError
from pipeline.data.transforms import IMAGENET, Preprocessing
from pipeline.models.backends.base import (
    OFFLINE_HINT,
    Backend,
    BuildRequest,
    HubFiles,
    ModelSpec,
    SegmentationNet,
    hf_cached,
    local_weights_first,
    reject_extra_outputs,
    require_safetensors,
)

log = logging.getLogger(__name__)

ENCODER_PATH = "net.encoder"

_OVERRIDES: dict[str, dict[str, Any]] = {
    "pan": {"min_test_size": 128},
    "upernet": {"test_encoder": "tu-test_convnext"},
    "segformer": {"default_encoder": "mit_b2", "test_encoder": "mit_b0"},
    "dpt": {"test_encoder": "tu-test_vit", "default_kwargs": {"dynamic_img_size": True}},
}

_HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
# the statistics of smp's own encoders whose pretrained settings are not ImageNet's (prefix -> mean,
# std), as their smp-hub config.json gives them: used when that file is not in the local cache
_OFFLINE_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "inceptionv4": _HALF,
    "inceptionresnetv2": _HALF,
    "xception": _HALF,
    "dpn": ((124 / 255, 117 / 255, 104 / 255), (1 / (0.0167 * 255),) * 3),
}


def _smp():
    import segmentation_models_pytorch as smp

    return smp


def _arch_defaults(arch_cls: type) -> dict[str, Any]:
    params = inspect.signature(arch_cls.__init__).parameters
    return {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}


def _divisor(arch_cls: type, encoder: str, kwargs: Mapping[str, Any]) -> int:
    defaults = _arch_defaults(arch_cls)
    if encoder.startswith("tu-") and arch_cls.__name__.lower() == "dpt":
        return vit_reduction(encoder[3:])
    if not getattr(arch_cls, "requires_divisible_input_shape", True):
        return 1
    depth = int(kwargs.get("encoder_depth", defaults.get("encoder_depth", 5)))
    stride = kwargs.get("encoder_output_stride", defaults.get("encoder_output_stride", 32)) or 32
    return int(min(int(stride), 2**depth))


def _built_divisor(net: nn.Module, fallback: int) -> int:
    """Input divisor of a built smp network: its encoder's output stride (1 when any size works)."""
    if not getattr(net, "requires_divisible_input_shape", True):
        return fallback
    return int(getattr(net.encoder, "output_stride", fallback))


@functools.lru_cache(maxsize=64)
def vit_reduction(timm_name: str) -> int:
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


def _timm_cfg(timm_name: str) -> Any:
    from timm.models import get_pretrained_cfg

    try:
        return get_pretrained_cfg(timm_name)
    except (RuntimeError, ValueError, KeyError) as exc:
        log.debug("no timm pretrained config for %s (%s)", timm_name, exc)
        return None


def timm_preprocessing(timm_name: str) -> Preprocessing:
    """Mean, std and input range of timm's pretrained config of ``timm_name`` (ImageNet's without one)."""
    cfg = _timm_cfg(timm_name)
    if cfg is None or cfg.mean is None or cfg.std is None:
        return Preprocessing(source=f"imagenet (timm has no pretrained config for {timm_name})")
    return Preprocessing(
        tuple(float(v) for v in cfg.mean),
        tuple(float(v) for v in cfg.std),
        (0.0, 1.0),
        f"timm pretrained config of {timm_name}",
    )


def _pretrained_setting(encoder: str) -> tuple[str, Mapping[str, Any]] | None:
    """The default pretrained setting of an smp encoder (``imagenet`` where it has one, else its first)."""
    settings = _smp().encoders.encoders.get(encoder, {}).get("pretrained_settings", {})
    if not settings:
        return None
    key = "imagenet" if "imagenet" in settings else next(iter(settings))
    return key, settings[key]


def _smp_preprocessing(encoder: str) -> Preprocessing:
    """smp's own pretrained settings of ``encoder``: its smp-hub ``config.json`` when the local cache
    holds it, else the known statistics (ImageNet's but for the few families in ``_OFFLINE_STATS``)."""
    setting = _pretrained_setting(encoder)
    config = None
    if setting is not None and setting[1].get("repo_id"):
        config = hf_cached(setting[1]["repo_id"], ("config.json",), setting[1].get("revision"))
    if config is not None:
        try:
            values = json.loads(Path(config).read_text())
            return Preprocessing(
                tuple(float(v) for v in values["mean"]),
                tuple(float(v) for v in values["std"]),
                tuple(float(v) for v in values.get("input_range", (0, 1))),
                f"smp pretrained settings of {encoder} ({setting[1]['repo_id']})",
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.debug("%s: unreadable smp pretrained config (%s)", config, exc)
    for prefix, (mean, std) in _OFFLINE_STATS.items():
        if encoder.startswith(prefix):
            return Preprocessing(mean, std, (0.0, 1.0), f"pretrained settings of {encoder}")
    return IMAGENET


class SmpBackend(Backend):
    name = "smp"

    def specs(self) -> list[ModelSpec]:
        specs = []
        for arch, arch_cls in _smp().MODEL_ARCHITECTURES_MAPPING.items():
            over = _OVERRIDES.get(arch, {})
            enc = over.get("default_encoder", _arch_defaults(arch_cls).get("encoder_name", "resnet34"))
            kwargs = dict(over.get("default_kwargs", {}))
            specs.append(
                ModelSpec(
                    name=arch,
                    backend=self,
                    arch=arch,
                    default_encoder=enc,
                    divisor=_divisor(arch_cls, enc, kwargs),
                    test_encoder=over.get("test_encoder", "resnet18"),
                    min_test_size=over.get("min_test_size", 64),
                    default_kwargs=kwargs,
                )
            )
        return specs

    def aliases(self) -> dict[str, str]:
        return {"unet++": "unetplusplus", "deeplabv3+": "deeplabv3plus"}

    def encoder_names(self) -> list[str]:
        """smp's own encoder names; any ``tu-<timm model name>`` is accepted as well."""
        return list(_smp().encoders.get_encoder_names())

    def resolve_encoder(self, spec: ModelSpec, encoder: str) -> str:
        enc = str(encoder).strip()
        if enc.lower().startswith("tu-"):
            return resolve_timm(enc)
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

    def input_divisor(self, spec: ModelSpec, encoder: str | None, options: Mapping[str, Any]) -> int:
        enc = self.encoder_of(spec, encoder)
        arch_cls = _smp().MODEL_ARCHITECTURES_MAPPING[spec.arch]
        return _divisor(arch_cls, enc, {**spec.default_kwargs, **options})

    def build(self, spec: ModelSpec, request: BuildRequest) -> nn.Module:
        r = request
        if r.pretrained is not None or r.architecture is not None:
            return _build_pretrained(spec, r.num_classes, r.pretrained, r.architecture, r.in_channels)
        reject_extra_outputs(r.options)
        enc = self.encoder_of(spec, r.encoder)
        encoder_weights = local_weights_first(r.weights, r.encoder_weights)
        net = _create(spec, enc, r.num_classes, encoder_weights, r.in_channels, r.options)
        divisor = _built_divisor(net, _divisor(type(net), enc, {**spec.default_kwargs, **r.options}))
        return _wrap(net, spec, enc, r.num_classes, r.in_channels, divisor)

    def preprocessing(self, spec: ModelSpec, encoder: str | None) -> Preprocessing:
        enc = self.encoder_of(spec, encoder)
        if enc.startswith("tu-"):
            return timm_preprocessing(enc[3:])
        return _smp_preprocessing(enc)

    def hub_files(self, spec: ModelSpec, encoder: str) -> HubFiles:
        if encoder.startswith("tu-"):
            return timm_hub_files(encoder[3:])
        repos: list[tuple[str, tuple[str, ...], str | None]] = []
        urls: list[str] = []
        settings = _smp().encoders.encoders.get(encoder, {}).get("pretrained_settings", {}).get("imagenet")
        if settings:
            repos.append((settings["repo_id"], ("model.safetensors",), settings.get("revision")))
        return repos, urls


def timm_hub_files(timm_name: str) -> HubFiles:
    """Where timm downloads ``timm_name``'s pretrained weights from: its Hugging Face repo and file
    names, and its url (from timm's pretrained config)."""
    repos: list[tuple[str, tuple[str, ...], str | None]] = []
    urls: list[str] = []
    cfg = _timm_cfg(timm_name)
    if cfg is not None:
        if cfg.hf_hub_id:
            files = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else ("model.safetensors", "pytorch_model.bin")
            repos.append((cfg.hf_hub_id, files, None))
        if cfg.url:
            urls.append(cfg.url)
    return repos, urls


def resolve_timm(enc: str) -> str:
    """``tu-<timm name>`` of an installed timm model; an unknown name lists close ones."""
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


def _wrap(net: nn.Module, spec: ModelSpec, encoder: str, num_classes: int, in_channels: int, divisor: int):
    return SegmentationNet(
        net,
        arch=spec.name,
        family=spec.family,
        encoder_name=encoder,
        num_classes=num_classes,
        in_channels=in_channels,
        input_divisor=divisor,
        encoder_path=ENCODER_PATH,
    )


def _build_pretrained(
    spec: ModelSpec,
    num_classes: int,
    pretrained: str | Path | None,
    architecture: Mapping[str, Any] | None,
    in_channels: int,
) -> SegmentationNet:
    """An smp model from a whole pretrained checkpoint (smp-hub id or a ``save_pretrained`` folder, whose
    weights load from ``model.safetensors`` only), its segmentation head rebuilt for ``num_classes``; or
    rebuilt offline from ``architecture``."""
    smp = _smp()
    if architecture is not None:
        config = {k: v for k, v in dict(architecture["config"]).items() if not k.startswith("_")}
        config.update(classes=num_classes, encoder_weights=None)
        net = getattr(smp, architecture["class"])(**config)
    else:
        source = Path(str(pretrained)).expanduser()
        where = str(source) if source.is_dir() else str(pretrained)
        require_safetensors(source, str(pretrained))
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
    divisor = _built_divisor(net, spec.divisor if getattr(net, "requires_divisible_input_shape", True) else 1)
    model = _wrap(net, spec, enc, num_classes, in_channels, divisor)
    model.architecture = {"family": spec.name, "class": type(net).__name__, "config": config}
    return model


def _create(
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
    if spec.arch == "dpt" and vit_reduction(encoder[3:]) != 16:
        raise PipelineError(
            f"model 'dpt' takes ViT encoders with 16-pixel patches (e.g. tu-vit_small_patch16_dinov3); "
            f"{encoder} has {vit_reduction(encoder[3:])}-pixel patches, which smp's DPT decoder cannot fuse: "
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
            + OFFLINE_HINT
        ) from exc
    except (KeyError, ValueError, TypeError, RuntimeError, AttributeError) as exc:
        raise PipelineError(
            f"cannot build model {spec.name!r} with encoder {encoder!r} and options {options}: {exc}"
        ) from exc


BACKEND = SmpBackend()
