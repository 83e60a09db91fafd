"""Input statistics per encoder: the mean, std and input range its pretrained weights expect.

They come from the encoder's pretrained configuration, also when training from scratch
(``encoder_weights=null``: the default pretrained configuration's statistics), so a later
fine-tune from pretrained weights sees inputs normalized the same way:

* ``tu-<timm name>``: timm's pretrained config of that name (with its tag, or timm's default
  tag); ViT-style models often use mean = std = 0.5.
* smp's own encoders: their pretrained settings; the ImageNet statistics except the few
  families whose original weights were trained otherwise (Inception/Xception: 0.5/0.5, DPN).
* torchvision and transformers families: ImageNet (the statistics of their image processors).

The statistics are stored in each checkpoint; prediction uses what the checkpoint says
(a checkpoint without them is read as ImageNet's).
"""

from __future__ import annotations

import logging

from pipeline.data.transforms import IMAGENET, Preprocessing
from pipeline.models.registry import _resolve_encoder, get_spec

log = logging.getLogger(__name__)

_HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
# smp encoders whose pretrained settings are not ImageNet's (prefix -> mean, std)
_SMP_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "inceptionv4": _HALF,
    "inceptionresnetv2": _HALF,
    "xception": _HALF,
    "dpn": ((124 / 255, 117 / 255, 104 / 255), (1 / (0.0167 * 255),) * 3),
}


def _timm_preprocessing(timm_name: str) -> Preprocessing:
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(timm_name)
    except (RuntimeError, ValueError, KeyError) as exc:
        log.debug("no timm pretrained config for %s (%s)", timm_name, exc)
        cfg = None
    if cfg is None or cfg.mean is None or cfg.std is None:
        return Preprocessing(source=f"imagenet (timm has no pretrained config for {timm_name})")
    return Preprocessing(
        tuple(float(v) for v in cfg.mean),
        tuple(float(v) for v in cfg.std),
        (0.0, 1.0),
        f"timm pretrained config of {timm_name}",
    )


def encoder_preprocessing(model: str, encoder: str | None = None) -> Preprocessing:
    """The preprocessing of ``model`` with ``encoder`` (None: the family's default encoder)."""
    spec = get_spec(model)
    if spec.family in ("torchvision", "hf"):
        return IMAGENET
    enc = _resolve_encoder(spec, encoder)
    if enc.startswith("tu-"):
        return _timm_preprocessing(enc[3:])
    for prefix, (mean, std) in _SMP_STATS.items():
        if enc.startswith(prefix):
            return Preprocessing(mean, std, (0.0, 1.0), f"pretrained settings of {enc}")
    return IMAGENET
