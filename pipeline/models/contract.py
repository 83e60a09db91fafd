"""What a model family promises the engine and inference.

A family's module (``nn.Module``) fulfils this contract:

* ``forward(images)`` takes ``N x 3 x H x W`` float images, normalized with the family's
  preprocessing (below), and returns its *outputs*: for most families the logits
  ``N x K x H x W`` at the input size; a family with its own output head may return any
  structure (for example class and mask logits of mask classification).
* ``compute_loss(outputs, masks)`` (optional): the family's own loss against ``N x H x W``
  class maps in which 255 is ignored. Without it the engine applies the configured loss
  (``loss=``) to the logits.  ``loss_description`` (optional) names what that loss is, for
  the message that asks for ``loss=model``.
* ``targets = "instances"`` (optional; class maps otherwise): the family trains on the objects
  of each image, an :class:`~pipeline.data.instances.InstanceTargets` batch (per image the
  masks, boxes and labels of its objects), which ``compute_loss`` receives instead of class
  maps; the engine builds them from the annotation file's instances (and from the connected
  components of pseudo-label maps).  Such a ``compute_loss`` takes class maps as well (their
  connected components are the objects).
* ``to_probabilities(outputs)`` (optional): class probabilities ``N x K x H x W`` at the
  input size, summing to 1 over K. Without it, softmax over the logits.
* its input statistics (mean, std, input range) come from its encoder's pretrained
  configuration (:func:`pipeline.models.preprocessing.encoder_preprocessing`); the engine
  has the data layer apply them and records them in every checkpoint, and prediction
  applies what the checkpoint records.

Training, validation, TTA, out-of-fold and test prediction go only through
:func:`model_loss` and :func:`model_probabilities`, so a family that brings its own loss
and head plugs in without special cases in the loop.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The module behind DistributedDataParallel / torch.compile / AveragedModel wrappers."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        for attr in ("_orig_mod", "module"):
            inner = getattr(model, attr, None)
            if isinstance(inner, nn.Module):
                model = inner
                break
    return model


def has_own_loss(model: nn.Module) -> bool:
    """Whether the family brings its own loss (``compute_loss``); it then trains with ``loss=model``."""
    return callable(getattr(unwrap(model), "compute_loss", None))


def wants_instances(model: nn.Module) -> bool:
    """Whether the family trains on instance targets (``targets = "instances"``) rather than class maps."""
    return getattr(unwrap(model), "targets", "classes") == "instances"


def own_loss_description(model: nn.Module) -> str:
    """What the family's own loss is (its ``loss_description``), for messages."""
    return str(getattr(unwrap(model), "loss_description", "the family's compute_loss"))


def model_loss(model: nn.Module, outputs: Any, masks: Any, criterion: nn.Module | None) -> torch.Tensor:
    """The training loss of ``outputs`` (from ``model(images)``) against ``masks`` (class maps, or the
    instance targets of a family that trains on them)."""
    own = getattr(unwrap(model), "compute_loss", None)
    if callable(own):
        return own(outputs, masks)
    if criterion is None:
        raise ValueError("this model has no loss of its own: a criterion is required")
    return criterion(outputs, masks)


def model_probabilities(model: nn.Module, outputs: Any) -> torch.Tensor:
    """Class probabilities ``N x K x H x W`` (float32) of ``outputs``."""
    own = getattr(unwrap(model), "to_probabilities", None)
    if callable(own):
        return own(outputs).float()
    return outputs.float().softmax(1)


def predict_probabilities(model: nn.Module, images: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Forward (under autocast when ``dtype`` is given) and probabilities, float32."""
    with torch.autocast(images.device.type, dtype=dtype, enabled=dtype is not None):
        outputs = model(images)
    return model_probabilities(model, outputs)
