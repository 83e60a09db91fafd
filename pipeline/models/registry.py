"""Model registry: every segmentation architecture is built by name with ``build_model``.

The families come from the backends (:mod:`pipeline.models.backends`, one per model library);
each family's spec names the backend that builds it, so this module never asks which library
a family is from.

``build_model("unet", num_classes=K, encoder="resnet34")`` returns a module whose forward
takes ``N x C x H x W`` and returns logits ``N x K x H x W`` at the input size.  ``K`` comes
from the annotation file, never from code.  Names are case-insensitive.

Families (``list_models()``; the smp rows follow the installed segmentation-models-pytorch):

===============================  ===========  ====================================  =======  ====================  ===
name                             family       default encoder                       divisor  test encoder          min
===============================  ===========  ====================================  =======  ====================  ===
unet                             smp          resnet34                              1        resnet18              64
unetplusplus                     smp          resnet34                              32       resnet18              64
manet                            smp          resnet34                              32       resnet18              64
linknet                          smp          resnet34                              32       resnet18              64
fpn                              smp          resnet34                              32       resnet18              64
pspnet                           smp          resnet34                              8        resnet18              64
deeplabv3                        smp          resnet34                              8        resnet18              64
deeplabv3plus                    smp          resnet34                              16       resnet18              64
pan                              smp          resnet34                              16       resnet18              128
upernet                          smp          resnet34                              32       tu-test_convnext      64
segformer                        smp          mit_b2                                32       mit_b0                64
dpt                              smp          tu-vit_base_patch16_224.augreg_in21k  16       tu-test_vit           64
mask2former                      hf           swin-tiny                             32       test-swin             64
maskformer                       hf           swin-tiny                             32       test-swin             64
hf_upernet                       hf           convnext-tiny                         32       test-convnext         64
hf_segformer                     hf           mit-b0                                32       mit-test              64
tv_fcn_resnet50                  torchvision  resnet50 (fixed)                      1        resnet50              64
tv_fcn_resnet101                 torchvision  resnet101 (fixed)                     1        resnet101             64
tv_deeplabv3_resnet50            torchvision  resnet50 (fixed)                      1        resnet50              64
tv_deeplabv3_resnet101           torchvision  resnet101 (fixed)                     1        resnet101             64
tv_deeplabv3_mobilenet_v3_large  torchvision  mobilenet_v3_large (fixed)            1        mobilenet_v3_large    64
tv_lraspp_mobilenet_v3_large     torchvision  mobilenet_v3_large (fixed)            1        mobilenet_v3_large    64
maskrcnn                         detection    resnet50                              32       tu-test_efficientnet  64
===============================  ===========  ====================================  =======  ====================  ===

- smp families take any encoder of ``list_encoders()`` or any ``tu-<timm model name>``
  (``tu-convnext_tiny``, ``tu-swin_...``, ``tu-<name>.<pretrained tag>``); DPT takes only
  ViT-style ``tu-`` encoders and is built with ``dynamic_img_size=True`` so any multiple of
  the patch size works (pass ``dynamic_img_size=False`` to get the fixed timm input size).
- hf families are transformers' implementations (:mod:`pipeline.models.backends.hf`): ``mask2former``
  and ``maskformer`` are mask classification (their own outputs, loss and probabilities through
  the family contract; train with ``loss=model``), ``hf_upernet`` / ``hf_segformer`` return
  logits.  Their encoders are backbone presets with random weights; a whole
  segmentation-pretrained model comes with ``pretrained=<hub id or local folder>``.
- ``maskrcnn`` (:mod:`pipeline.models.backends.detection`) is instance segmentation: torchvision's
  Mask R-CNN trained on each image's objects with its own losses (train with ``loss=model``), its
  detections read out as class probabilities.  ``encoder=resnet50`` is torchvision's
  ``maskrcnn_resnet50_fpn_v2`` (COCO weights where they resolve); ``tu-<timm name>`` puts an FPN
  on a timm encoder.
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

import functools
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from pipeline.core.errors import PipelineError
from pipeline.core.registry import Registry
from pipeline.models.backends import BACKENDS, BuildRequest, ModelSpec, SegmentationNet, smp
from pipeline.models.weights import load_weights

log = logging.getLogger(__name__)

__all__ = [
    "ModelSpec",
    "SegmentationNet",
    "build_model",
    "default_encoder",
    "get_spec",
    "input_divisor",
    "list_encoders",
    "list_models",
    "model_registry",
    "resolve_encoder",
]


@functools.lru_cache(maxsize=1)
def _specs() -> dict[str, ModelSpec]:
    return {spec.name: spec for backend in BACKENDS for spec in backend.specs()}


@functools.lru_cache(maxsize=1)
def model_registry() -> Registry:
    """Family name -> builder ``(num_classes, **options) -> model``; built on first use
    (the smp rows follow the installed segmentation-models-pytorch)."""
    registry: Registry = Registry("model")
    aliases: dict[str, list[str]] = {}
    for backend in BACKENDS:
        for alias, name in backend.aliases().items():
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
    """Registry names of every model family (smp architectures first, then transformers, torchvision, and
    torchvision's instance segmentation)."""
    return model_registry().names()


def list_encoders() -> list[str]:
    """smp's own encoder names; any ``tu-<timm model name>`` is accepted as well."""
    return smp.BACKEND.encoder_names()


def get_spec(name: str) -> ModelSpec:
    """The ``ModelSpec`` of a family (case-insensitive, aliases too); unknown names list the valid ones."""
    return _specs()[model_registry().key(name)]


def default_encoder(name: str) -> str:
    """The encoder a family is built with when ``encoder`` is not given."""
    return get_spec(name).default_encoder


def resolve_encoder(spec: ModelSpec, encoder: str | None) -> str:
    """The library's name of ``encoder`` for ``spec``'s family (None or empty: its default encoder)."""
    return spec.backend.encoder_of(spec, encoder)


def input_divisor(name: str, encoder: str | None = None, **kwargs: Any) -> int:
    """Height and width of inputs must be multiples of this (1: any size works).

    ``kwargs`` are the model options that change it (``encoder_depth``,
    ``encoder_output_stride``).  The built model carries the same value as
    ``model.input_divisor``.
    """
    spec = get_spec(name)
    return spec.backend.input_divisor(spec, encoder, kwargs)


def build_model(
    name: str,
    num_classes: int,
    encoder: str | None = None,
    encoder_weights: str | None = None,
    weights: str | Path | None = None,
    in_channels: int = 3,
    pretrained: str | Path | None = None,
    architecture: Mapping[str, Any] | None = None,
    trust_pickle: Sequence[str] = (),
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
    checkpoint's state).  ``trust_pickle``: files that may be unpickled in full (``weights``
    is read as data otherwise, see :func:`~pipeline.models.weights.read_weights_file`).
    ``kwargs`` go to ``smp.create_model``, the torchvision builder or the transformers config.
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
    request = BuildRequest(
        num_classes, encoder, encoder_weights, weights, in_channels, pretrained, architecture, kwargs
    )
    model = spec.backend.build(spec, request)
    if weights is not None:
        load_weights(model, weights, trust_pickle)
    return model
