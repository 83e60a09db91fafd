"""The transformers backend: mask classification and whole segmentation models (Hugging Face).

``mask2former`` and ``maskformer`` (mask classification: N queries, each a class and a
mask) and ``hf_upernet`` / ``hf_segformer`` (per-pixel logits) are the library's own
implementations; this module only adapts them to the family contract
(:mod:`pipeline.models.contract`).

Mask classification
    ``forward`` returns the class logits ``N x Q x (K + 1)`` (the last is "no object"),
    the mask logits ``N x Q x h x w`` (a quarter of the input size), the auxiliary
    predictions of the decoder layers while training, and the input size.
    ``compute_loss`` is the model's own: Hungarian matching of queries to the classes
    present in each image, then class cross-entropy, mask binary cross-entropy and dice on
    sampled points, with the auxiliary layers (``get_loss_dict``/``get_loss`` of the model).
    The semantic map becomes one binary mask per class present; ignore pixels (255, and
    the unconfident pixels of pseudo-labels) belong to no mask, background's included, so
    they count as neither background nor any class (as in Mask2Former's own semantic
    mapper: they are zero in every target mask).
    ``to_probabilities``: softmax class scores (no-object dropped) times sigmoid masks,
    summed over queries, resized to the input size and normalised over classes.

Encoders of these families are backbone presets built offline (``swin-tiny`` ...
``swin-large``, ``resnet50``, ``convnext-tiny`` ... ``convnext-xlarge``; ``test-swin`` is a tiny one
for CPU tests); a whole segmentation-pretrained model comes from ``pretrained=<hub id or local
folder>`` (see :func:`from_pretrained`), whose own backbone and decoder are then used.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.errors import ConfigError, PipelineError, UnknownNameError
from pipeline.core.labels import IGNORE_INDEX
from pipeline.models.backends.base import Backend, BuildRequest, ModelSpec, require_safetensors

log = logging.getLogger(__name__)

STAGES = ["stage1", "stage2", "stage3", "stage4"]


def _swin(embed_dim: int, depths: list[int], heads: list[int], window: int = 7) -> Callable[[], Any]:
    def make():
        from transformers import SwinConfig

        return SwinConfig(
            embed_dim=embed_dim, depths=depths, num_heads=heads, window_size=window, out_features=list(STAGES)
        )

    return make


def _resnet50():
    from transformers import ResNetConfig

    return ResNetConfig(depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048], out_features=list(STAGES))


def _convnext(hidden: list[int], depths: list[int]) -> Callable[[], Any]:
    def make():
        from transformers import ConvNextConfig

        return ConvNextConfig(hidden_sizes=hidden, depths=depths, out_features=list(STAGES))

    return make


def _beit(hidden: int, layers: int, heads: int, out: list[int]) -> Callable[[], Any]:
    def make():
        from transformers import BeitConfig

        # add_fpn: four scales (1/4 .. 1/32) from the plain ViT, as BEiT's own UperNet recipe
        return BeitConfig(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=4 * hidden,
            use_relative_position_bias=True,
            add_fpn=True,
            out_indices=out,
        )

    return make


def _dinov2(hidden: int, layers: int, heads: int, out: list[int]) -> Callable[[], Any]:
    def make():
        from transformers import Dinov2Config

        return Dinov2Config(
            hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, patch_size=14, out_indices=out
        )

    return make


# backbone preset -> its transformers config (built offline; pretrained= brings trained ones)
BACKBONES: dict[str, Callable[[], Any]] = {
    "swin-tiny": _swin(96, [2, 2, 6, 2], [3, 6, 12, 24]),
    "swin-small": _swin(96, [2, 2, 18, 2], [3, 6, 12, 24]),
    "swin-base": _swin(128, [2, 2, 18, 2], [4, 8, 16, 32], window=12),
    "swin-large": _swin(192, [2, 2, 18, 2], [6, 12, 24, 48], window=12),
    "resnet50": _resnet50,
    "convnext-tiny": _convnext([96, 192, 384, 768], [3, 3, 9, 3]),
    "convnext-small": _convnext([96, 192, 384, 768], [3, 3, 27, 3]),
    "convnext-base": _convnext([128, 256, 512, 1024], [3, 3, 27, 3]),
    "convnext-large": _convnext([192, 384, 768, 1536], [3, 3, 27, 3]),
    "convnext-xlarge": _convnext([256, 512, 1024, 2048], [3, 3, 27, 3]),
    "beit-base": _beit(768, 12, 12, [4, 6, 8, 12]),
    "beit-large": _beit(1024, 24, 16, [8, 12, 16, 24]),
    "dinov2-small": _dinov2(384, 12, 6, [3, 6, 9, 12]),
    "dinov2-base": _dinov2(768, 12, 12, [3, 6, 9, 12]),
    "test-swin": _swin(16, [1, 1, 1, 1], [1, 1, 1, 1], window=4),
    "test-convnext": _convnext([8, 16, 24, 32], [1, 1, 1, 1]),
    "test-beit": _beit(32, 4, 2, [1, 2, 3, 4]),
    "test-dinov2": _dinov2(32, 4, 2, [1, 2, 3, 4]),
}
# plain-ViT backbones: only the per-pixel UperNet takes them (mask classification wants a pyramid)
VIT_BACKBONES = ("beit-base", "beit-large", "dinov2-small", "dinov2-base", "test-beit", "test-dinov2")

# heads of the test backbones: small enough for a CPU test
_TEST_HEADS: dict[str, dict[str, Any]] = {
    "mask2former": dict(
        feature_size=32,
        mask_feature_size=32,
        hidden_dim=32,
        encoder_feedforward_dim=64,
        encoder_layers=1,
        decoder_layers=2,
        num_attention_heads=2,
        dim_feedforward=64,
        num_queries=8,
        train_num_points=256,
    ),
    "maskformer": dict(mask_feature_size=32, fpn_feature_size=32, num_queries=8),
    "hf_upernet": dict(hidden_size=32, auxiliary_channels=16),
    "hf_segformer": dict(),
}


@dataclasses.dataclass(frozen=True)
class HFFamily:
    name: str
    kind: str  # "mask" (mask classification) or "semantic" (per-pixel logits)
    model_class: str  # transformers class
    config_class: str
    default_encoder: str
    test_encoder: str
    hub_example: str  # a segmentation-pretrained checkpoint of the family on the hub
    encoder_path: str  # the encoder's submodule in the built model (HFSegmentationNet)


FAMILIES: dict[str, HFFamily] = {
    f.name: f
    for f in (
        HFFamily(
            "mask2former",
            "mask",
            "Mask2FormerForUniversalSegmentation",
            "Mask2FormerConfig",
            "swin-tiny",
            "test-swin",
            "facebook/mask2former-swin-large-ade-semantic",
            "hf.model.pixel_level_module.encoder",
        ),
        HFFamily(
            "maskformer",
            "mask",
            "MaskFormerForInstanceSegmentation",
            "MaskFormerConfig",
            "swin-tiny",
            "test-swin",
            "facebook/maskformer-swin-base-ade",
            "hf.model.pixel_level_module.encoder",
        ),
        HFFamily(
            "hf_upernet",
            "semantic",
            "UperNetForSemanticSegmentation",
            "UperNetConfig",
            "convnext-tiny",
            "test-convnext",
            "openmmlab/upernet-convnext-small",
            "hf.backbone",
        ),
        HFFamily(
            "hf_segformer",
            "semantic",
            "SegformerForSemanticSegmentation",
            "SegformerConfig",
            "mit-b0",
            "mit-test",
            "nvidia/segformer-b0-finetuned-ade-512-512",
            "hf.segformer",
        ),
    )
}

MASK_CLASSIFICATION = tuple(name for name, f in FAMILIES.items() if f.kind == "mask")

# SegFormer has its own encoder (Mix Transformer) sizes instead of a backbone config
_SEGFORMER_SIZES: dict[str, dict[str, Any]] = {
    "mit-b0": dict(hidden_sizes=[32, 64, 160, 256], depths=[2, 2, 2, 2], decoder_hidden_size=256),
    "mit-b2": dict(hidden_sizes=[64, 128, 320, 512], depths=[3, 4, 6, 3], decoder_hidden_size=768),
    "mit-b5": dict(hidden_sizes=[64, 128, 320, 512], depths=[3, 6, 40, 3], decoder_hidden_size=768),
    "mit-test": dict(
        hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 1, 1], decoder_hidden_size=32
    ),
}


def encoders_of(family: str) -> list[str]:
    if family == "hf_segformer":
        return list(_SEGFORMER_SIZES)
    if family == "hf_upernet":
        return list(BACKBONES)
    return [b for b in BACKBONES if b not in VIT_BACKBONES]


def input_divisor(family: str, encoder: str | None = None, config: Any = None) -> int:
    """Height and width must be multiples of this: the patch size of a DINOv2 backbone, else 32."""
    backbone = getattr(config, "backbone_config", None) if config is not None else None
    if backbone is None and encoder is not None and family != "hf_segformer":
        backbone = BACKBONES[resolve_encoder(family, encoder)]()
    if getattr(backbone, "model_type", "") == "dinov2":
        return int(backbone.patch_size)
    return 32


def resolve_encoder(family: str, encoder: str | None) -> str:
    fam = FAMILIES[family]
    if encoder is None or str(encoder).strip() == "":
        return fam.default_encoder
    names = encoders_of(family)
    enc = str(encoder).strip().lower()
    if enc not in names:
        raise UnknownNameError(
            f"unknown encoder {encoder!r} for model {family!r}; valid: {', '.join(names)} "
            f"(or a whole segmentation-pretrained model with pretrained=<hub id or folder>, e.g. {fam.hub_example})"
        )
    return enc


def _transformers():
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - a dependency of the project
        raise PipelineError(
            "the transformers package is needed for this model family: pip install transformers"
        ) from exc
    return transformers


def _labels(num_classes: int) -> dict[str, Any]:
    id2label = {i: f"class_{i}" for i in range(num_classes)}
    return {"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}


def make_config(family: str, encoder: str, num_classes: int, options: Mapping[str, Any]) -> Any:
    """The transformers config of ``family`` with ``encoder`` and ``num_classes`` (no weights)."""
    tf = _transformers()
    fam = FAMILIES[family]
    config_cls = getattr(tf, fam.config_class)
    values: dict[str, Any] = dict(_TEST_HEADS[family]) if encoder.startswith(("test-", "mit-test")) else {}
    if family == "hf_segformer":
        values.update(_SEGFORMER_SIZES[encoder])
    elif family == "maskformer":
        backbone = BACKBONES[encoder]()
        from transformers import DetrConfig

        decoder = DetrConfig(
            **(
                dict(
                    d_model=32,
                    encoder_layers=1,
                    decoder_layers=2,
                    encoder_attention_heads=2,
                    decoder_attention_heads=2,
                    encoder_ffn_dim=64,
                    decoder_ffn_dim=64,
                )
                if encoder.startswith("test-")
                else {}
            )
        )
        values.update(backbone_config=backbone, decoder_config=decoder)
    else:
        values["backbone_config"] = BACKBONES[encoder]()
    values.update(options)
    values.update(_labels(num_classes))
    try:
        return config_cls(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"cannot configure model {family!r} with options {dict(options)}: {exc}") from exc


class HFSegmentationNet(nn.Module):
    """A transformers per-pixel segmentation model: ``forward`` returns logits at the input size."""

    def __init__(self, hf: nn.Module, *, arch: str, encoder_name: str, num_classes: int) -> None:
        super().__init__()
        self.hf = hf
        self.arch = arch
        self.family = "hf"
        self.encoder_name = encoder_name
        self.num_classes = num_classes
        self.in_channels = 3
        self.input_divisor = input_divisor(arch, config=hf.config)
        self.encoder_path = FAMILIES[arch].encoder_path
        self.load_report: dict[str, list[str]] | None = None

    @property
    def encoder(self) -> nn.Module:
        return self.get_submodule(self.encoder_path)

    @property
    def architecture(self) -> dict[str, Any]:
        """What rebuilds this model without downloading: the transformers config as a dict."""
        return {"family": self.arch, "config": self.hf.config.to_dict()}

    def forward(self, x: torch.Tensor) -> Any:
        logits = self.hf(pixel_values=x).logits
        if logits.shape[-2:] != x.shape[-2:]:
            logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits

    def extra_repr(self) -> str:
        return f"arch={self.arch}, encoder={self.encoder_name}, num_classes={self.num_classes}"


class MaskClassificationNet(HFSegmentationNet):
    """Mask2Former / MaskFormer under the family contract: its own outputs, loss and probabilities."""

    loss_description = (
        "mask classification: Hungarian matching, class cross-entropy, mask binary cross-entropy and dice"
    )

    def forward(self, x: torch.Tensor) -> Any:
        out = self.hf(pixel_values=x, output_auxiliary_logits=self.training)
        return {
            "class": out.class_queries_logits,
            "masks": out.masks_queries_logits,
            "aux": out.auxiliary_logits if self.training else None,
            "size": tuple(x.shape[-2:]),
        }

    def compute_loss(self, outputs: Any, masks: torch.Tensor) -> torch.Tensor:
        class_labels, mask_labels = targets_of(masks)
        aux = outputs["aux"]
        if aux is not None:
            aux = [{k: v.float() for k, v in layer.items()} for layer in aux]
        losses = self.hf.get_loss_dict(
            outputs["masks"].float(), outputs["class"].float(), mask_labels, class_labels, aux
        )
        return self.hf.get_loss(losses)

    def to_probabilities(self, outputs: Any) -> torch.Tensor:
        classes = outputs["class"].float().softmax(-1)[..., :-1]  # drop "no object"
        masks = outputs["masks"].float().sigmoid()
        seg = torch.einsum("nqk,nqhw->nkhw", classes, masks)
        if seg.shape[-2:] != tuple(outputs["size"]):
            seg = F.interpolate(seg, size=outputs["size"], mode="bilinear", align_corners=False)
        seg = seg.clamp_min(0) + 1e-6  # a pixel no query claims becomes uniform, not 0/0
        return seg / seg.sum(1, keepdim=True)


def _net_class(family: str) -> type[HFSegmentationNet]:
    return MaskClassificationNet if FAMILIES[family].kind == "mask" else HFSegmentationNet


def targets_of(masks: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per image: the classes present (ignore excluded) and one binary mask per class.

    Ignore pixels are zero in every mask, so they belong to no class, background included.
    """
    class_labels, mask_labels = [], []
    for m in masks:
        present = torch.unique(m)
        present = present[present != IGNORE_INDEX]
        class_labels.append(present.long())
        mask_labels.append((m[None] == present[:, None, None]).float())
    return class_labels, mask_labels


def build(
    family: str, num_classes: int, encoder: str | None, options: Mapping[str, Any], architecture: Mapping | None = None
) -> HFSegmentationNet:
    """A randomly initialised model: from ``architecture`` (a checkpoint's record) or the presets."""
    tf = _transformers()
    fam = FAMILIES[family]
    if architecture is not None:
        config_cls = getattr(tf, fam.config_class)
        config = config_cls.from_dict(dict(architecture["config"]))
        enc = str(encoder or fam.default_encoder)
    else:
        enc = resolve_encoder(family, encoder)
        config = make_config(family, enc, num_classes, options)
    hf = getattr(tf, fam.model_class)(config)
    return _net_class(family)(hf, arch=family, encoder_name=enc, num_classes=num_classes)


def from_pretrained(family: str, source: str | Path, num_classes: int) -> HFSegmentationNet:
    """A whole segmentation-pretrained model: backbone and decoder loaded, classifier rebuilt.

    ``source`` is a local folder (``save_pretrained`` / ``huggingface-cli download
    --local-dir``) or a hub id, its weights read from ``.safetensors`` only (a folder of pickled
    weights is refused: ``make weights FROM=<folder>`` converts it); tensors whose shape depends on
    the class count are new and listed in the log and in ``model.load_report``.
    """
    tf = _transformers()
    fam = FAMILIES[family]
    model_cls = getattr(tf, fam.model_class)
    local = Path(source).expanduser()
    where = str(local) if local.is_dir() else str(source)
    if not local.is_dir() and (str(source).startswith((".", "/", "~")) or local.suffix):
        raise PipelineError(f"pretrained={source}: no such folder (a folder written by save_pretrained is expected)")
    require_safetensors(local, str(source))
    try:
        hf, info = model_cls.from_pretrained(
            where, ignore_mismatched_sizes=True, output_loading_info=True, use_safetensors=True, **_labels(num_classes)
        )
    except OSError as exc:
        raise PipelineError(
            f"pretrained={source}: cannot load it ({str(exc).splitlines()[0][:200]}). Without access to the model hub, "
            f"download it where there is (huggingface-cli download {fam.hub_example if local.is_dir() else source} "
            f"--local-dir DIR, or save_pretrained(DIR)) and pass pretrained=DIR; pretrained=null trains from "
            f"random weights"
        ) from exc
    except (ValueError, TypeError, KeyError) as exc:
        raise PipelineError(f"pretrained={source}: not a {fam.model_class} checkpoint ({exc})") from exc
    new = sorted(set(info.get("missing_keys", [])) | {str(m[0]) for m in info.get("mismatched_keys", [])})
    log.info(
        "%s: whole model loaded from %s; %d tensors new for %d classes (%s)%s",
        family,
        where,
        len(new),
        num_classes,
        ", ".join(new[:8]) + (" ..." if len(new) > 8 else ""),
        f"; unused: {len(info.get('unexpected_keys', []))}" if info.get("unexpected_keys") else "",
    )
    model = _net_class(family)(hf, arch=family, encoder_name=f"pretrained:{source}", num_classes=num_classes)
    model.load_report = {"new": new, "unexpected": sorted(info.get("unexpected_keys", []))}
    return model


class HFBackend(Backend):
    """transformers' implementations; their backbone presets start from random weights (no ImageNet
    encoder weights to resolve), a whole segmentation-pretrained model comes with ``pretrained=``."""

    name = "hf"
    has_encoder_weights = False

    def specs(self) -> list[ModelSpec]:
        return [
            ModelSpec(
                name=name,
                backend=self,
                arch=fam.model_class,
                default_encoder=fam.default_encoder,
                divisor=32,
                test_encoder=fam.test_encoder,
            )
            for name, fam in FAMILIES.items()
        ]

    def resolve_encoder(self, spec: ModelSpec, encoder: str) -> str:
        return resolve_encoder(spec.name, encoder)

    def input_divisor(self, spec: ModelSpec, encoder: str | None, options: Mapping[str, Any]) -> int:
        return input_divisor(spec.name, encoder)

    def build(self, spec: ModelSpec, request: BuildRequest) -> nn.Module:
        r = request
        if r.in_channels != 3:
            raise PipelineError(f"model {spec.name!r} takes 3-channel images, got in_channels={r.in_channels}")
        if r.encoder_weights is not None:
            log.warning(
                "%s: encoder_weights=%s does not apply (its backbone presets start from random weights); a whole "
                "segmentation-pretrained model comes with pretrained=<hub id or folder>, e.g. %s",
                spec.name,
                r.encoder_weights,
                FAMILIES[spec.name].hub_example,
            )
        if r.pretrained is not None:
            return from_pretrained(spec.name, r.pretrained, r.num_classes)
        return build(spec.name, r.num_classes, r.encoder, r.options, r.architecture)


BACKEND = HFBackend()
