"""Input statistics per encoder: the mean, std and input range its pretrained weights expect.

They come from the encoder's pretrained configuration, which the family's backend reads
(:mod:`pipeline.models.backends`), also when training from scratch (``encoder_weights=null``: the
default pretrained configuration's statistics), so a later fine-tune from pretrained weights sees
inputs normalized the same way:

* ``tu-<timm name>``: timm's pretrained config of that name (with its tag, or timm's default
  tag); ViT-style models often use mean = std = 0.5.
* smp's own encoders: their pretrained settings (the smp-hub ``config.json`` when it is cached;
  else the ImageNet statistics except the few families whose original weights were trained
  otherwise: Inception/Xception 0.5/0.5, DPN).
* torchvision and transformers families: ImageNet (the statistics of their image processors).

The statistics are stored in each checkpoint; prediction uses what the checkpoint says
(a checkpoint without them is read as ImageNet's).
"""

from __future__ import annotations

from pipeline.data.transforms import Preprocessing
from pipeline.models.registry import get_spec


def encoder_preprocessing(model: str, encoder: str | None = None) -> Preprocessing:
    """The preprocessing of ``model`` with ``encoder`` (None: the family's default encoder)."""
    spec = get_spec(model)
    return spec.backend.preprocessing(spec, encoder)
