"""Segmentation losses by name: ``ce``, ``dice``, ``focal``, ``lovasz`` and weighted sums.

``build_loss("0.7*ce+0.3*dice", num_classes=K)`` returns a module called as
``loss(logits N x K x H x W, target N x H x W long)``.  Pixels whose target equals
``ignore_index`` count for nothing in every loss.  ``class_weights`` (one per class)
weight each class's term in every loss (pixel weights in ``ce`` / ``focal``, the class
mean in ``dice`` / ``lovasz``); ``label_smoothing`` applies to ``ce`` terms.  Other keyword
options go to the terms that take them: ``gamma`` (focal, default 2), ``smooth`` (dice,
default 1), ``classes`` ("all" or "present": dice default "all", lovasz default
"present"), ``per_image`` (lovasz, default False).

A batch whose pixels are all ignored gives a loss of 0 (with a gradient of 0).
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.errors import PipelineError
from pipeline.core.labels import IGNORE_INDEX
from pipeline.core.registry import Registry, UnknownNameError

log = logging.getLogger(__name__)

__all__ = [
    "CrossEntropyLoss",
    "DiceLoss",
    "FocalLoss",
    "LovaszSoftmaxLoss",
    "WeightedSumLoss",
    "build_loss",
    "list_losses",
    "parse_loss_spec",
]

_CLASS_MODES = ("all", "present")


class _SegLoss(nn.Module):
    """Shared checks and class weights of the per-pixel losses."""

    def __init__(
        self, num_classes: int, ignore_index: int = IGNORE_INDEX, class_weights: Sequence[float] | None = None
    ) -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        weight = None if class_weights is None else torch.as_tensor(list(class_weights), dtype=torch.float32)
        self.register_buffer("weight", weight, persistent=False)

    def _check(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        if logits.ndim != 4 or target.ndim != 3:
            raise ValueError(
                f"expected logits N x K x H x W and target N x H x W, got {tuple(logits.shape)} and "
                f"{tuple(target.shape)}"
            )
        if logits.shape[1] != self.num_classes:
            raise ValueError(
                f"logits have {logits.shape[1]} channels, the loss was built for {self.num_classes} classes"
            )
        if logits.shape[0] != target.shape[0] or logits.shape[2:] != target.shape[1:]:
            raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ in batch or size")

    def _class_mean(self, per_class: torch.Tensor, present: torch.Tensor | None) -> torch.Tensor:
        """(Weighted) mean of per-class losses over all classes, or over ``present`` ones."""
        w = torch.ones_like(per_class) if self.weight is None else self.weight.to(per_class)
        if present is not None:
            w = w * present.to(per_class)
        return (per_class * w).sum() / w.sum().clamp_min(torch.finfo(per_class.dtype).tiny)


class CrossEntropyLoss(_SegLoss):
    """Pixel-wise cross entropy with class weights, label smoothing and an ignore index.

    Same value as ``torch.nn.functional.cross_entropy`` (mean over valid pixels,
    normalised by the summed weights of their target classes).
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = IGNORE_INDEX,
        class_weights: Sequence[float] | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(num_classes, ignore_index, class_weights)
        if not 0.0 <= label_smoothing < 1.0:
            raise PipelineError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = float(label_smoothing)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self._check(logits, target)
        logits = logits.float()
        valid = target != self.ignore_index
        total = F.cross_entropy(
            logits,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            reduction="sum",
        )
        if self.weight is None:
            denom = valid.sum().to(total)
        else:
            denom = (self.weight.to(total)[target.masked_fill(~valid, 0)] * valid).sum()
        return total / denom.clamp_min(torch.finfo(total.dtype).tiny)


class DiceLoss(_SegLoss):
    """Multiclass soft Dice: ``1 - mean_c (2 |P_c T_c| + s) / (|P_c| + |T_c| + s)``.

    ``P`` are softmax probabilities, ``T`` one-hot targets, sums over the batch and the
    valid pixels.  ``classes="present"`` averages only over classes present in the target.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = IGNORE_INDEX,
        class_weights: Sequence[float] | None = None,
        smooth: float = 1.0,
        classes: str = "all",
    ) -> None:
        super().__init__(num_classes, ignore_index, class_weights)
        if classes not in _CLASS_MODES:
            raise PipelineError(f"dice: classes must be one of {', '.join(_CLASS_MODES)}, got {classes!r}")
        if smooth < 0:
            raise PipelineError(f"dice: smooth must be >= 0, got {smooth}")
        self.smooth = float(smooth)
        self.classes = classes

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self._check(logits, target)
        valid = target != self.ignore_index
        probs = logits.float().softmax(dim=1) * valid.unsqueeze(1)
        # per-class sums without a one-hot tensor (K times the pixels): the true class's probability
        # of every valid pixel, summed per class, and the pixel count per class
        labels = target[valid]
        true_p = probs.gather(1, target.masked_fill(~valid, 0).unsqueeze(1)).squeeze(1)[valid]
        inter = torch.zeros(self.num_classes, dtype=probs.dtype, device=probs.device).scatter_add(0, labels, true_p)
        count = torch.bincount(labels, minlength=self.num_classes).to(probs)
        card = probs.sum((0, 2, 3)) + count
        dice = (2.0 * inter + self.smooth) / (card + self.smooth).clamp_min(torch.finfo(probs.dtype).tiny)
        present = count > 0 if self.classes == "present" else None
        return self._class_mean(1.0 - dice, present)


class FocalLoss(_SegLoss):
    """Focal loss ``-(1 - p_t)^gamma log p_t`` averaged over valid pixels.

    With class weights the mean is normalised by the summed weights, so ``gamma=0``
    equals ``CrossEntropyLoss`` exactly.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = IGNORE_INDEX,
        class_weights: Sequence[float] | None = None,
        gamma: float = 2.0,
    ) -> None:
        super().__init__(num_classes, ignore_index, class_weights)
        if gamma < 0:
            raise PipelineError(f"focal: gamma must be >= 0, got {gamma}")
        self.gamma = float(gamma)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self._check(logits, target)
        valid = target != self.ignore_index
        safe = target.masked_fill(~valid, 0)
        logpt = logits.float().log_softmax(dim=1).gather(1, safe.unsqueeze(1)).squeeze(1)
        loss = -logpt
        if self.gamma > 0:
            loss = loss * (1.0 - logpt.exp()).clamp_min(1e-12).pow(self.gamma)
        w = valid.to(loss)
        if self.weight is not None:
            w = w * self.weight.to(loss)[safe]
        return (loss * w).sum() / w.sum().clamp_min(torch.finfo(loss.dtype).tiny)


def _lovasz_grad(fg_sorted: torch.Tensor) -> torch.Tensor:
    """Gradient of the Lovasz extension of the Jaccard loss, per column (class)."""
    gts = fg_sorted.sum(0)
    intersection = gts - fg_sorted.cumsum(0)
    union = gts + (1.0 - fg_sorted).cumsum(0)
    jaccard = 1.0 - intersection / union
    if fg_sorted.shape[0] > 1:
        jaccard = torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]], dim=0)
    return jaccard


class LovaszSoftmaxLoss(_SegLoss):
    """Lovasz-Softmax (Berman et al. 2018) on softmax probabilities.

    ``classes="present"`` (default) averages over classes present in the valid target
    pixels, ``"all"`` over every class; ``per_image=True`` averages per-image losses.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = IGNORE_INDEX,
        class_weights: Sequence[float] | None = None,
        classes: str = "present",
        per_image: bool = False,
    ) -> None:
        super().__init__(num_classes, ignore_index, class_weights)
        if classes not in _CLASS_MODES:
            raise PipelineError(f"lovasz: classes must be one of {', '.join(_CLASS_MODES)}, got {classes!r}")
        self.classes = classes
        self.per_image = bool(per_image)

    def _flat(self, probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of probabilities ``N x K x H x W`` against ``N x H x W`` pooled over pixels."""
        probs = probs.permute(0, 2, 3, 1).reshape(-1, self.num_classes)
        labels = target.reshape(-1)
        valid = labels != self.ignore_index
        probs, labels = probs[valid], labels[valid]
        if labels.numel() == 0:
            return probs.sum() * 0.0
        fg = F.one_hot(labels, self.num_classes).to(probs)
        errors = (fg - probs).abs()
        errors_sorted, order = errors.sort(dim=0, descending=True)
        fg_sorted = fg.gather(0, order)
        per_class = (errors_sorted * _lovasz_grad(fg_sorted)).sum(0)
        present = fg.sum(0) > 0 if self.classes == "present" else None
        return self._class_mean(per_class, present)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self._check(logits, target)
        probs = logits.float().softmax(dim=1)
        if self.per_image:
            return torch.stack([self._flat(probs[i : i + 1], target[i : i + 1]) for i in range(probs.shape[0])]).mean()
        return self._flat(probs, target)


class WeightedSumLoss(nn.Module):
    """``sum_i w_i * loss_i``; the last unweighted parts are kept (detached) in ``last_parts``."""

    def __init__(self, terms: Sequence[tuple[float, str, nn.Module]]) -> None:
        super().__init__()
        self.coefficients = [float(w) for w, _, _ in terms]
        self.names: list[str] = []
        for _, name, _ in terms:
            unique, k = name, 2
            while unique in self.names:
                unique, k = f"{name}{k}", k + 1
            self.names.append(unique)
        self.parts = nn.ModuleDict({n: m for n, (_, _, m) in zip(self.names, terms, strict=False)})
        self.last_parts: dict[str, torch.Tensor] = {}

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        total: torch.Tensor | None = None
        parts: dict[str, torch.Tensor] = {}
        for coef, name in zip(self.coefficients, self.names, strict=False):
            value = self.parts[name](logits, target)
            parts[name] = value.detach()
            total = coef * value if total is None else total + coef * value
        self.last_parts = parts
        assert total is not None
        return total

    def extra_repr(self) -> str:
        return " + ".join(f"{c:g}*{n}" for c, n in zip(self.coefficients, self.names, strict=False))


LOSSES: Registry = Registry("loss")
LOSSES.add("ce", CrossEntropyLoss, "cross-entropy (class_weights, label_smoothing)")
LOSSES.add("dice", DiceLoss, "soft Dice over classes")
LOSSES.add("focal", FocalLoss, "focal loss (gamma)")
LOSSES.add("lovasz", LovaszSoftmaxLoss, "Lovasz-softmax (IoU surrogate)")

_NUMBER = r"(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_TERM = re.compile(rf"^\s*(?:(?P<coef>{_NUMBER})\s*\*\s*)?(?P<name>[A-Za-z_][A-Za-z0-9_]*)\s*$")


CLASS_WEIGHT_MODES = ("inverse_sqrt",)
WEIGHT_CLIP = (0.1, 10.0)  # the smallest and largest class weight of a frequency mode


def frequency_class_weights(pixel_counts: Sequence[float], mode: str = "inverse_sqrt") -> list[float]:
    """Class weights from the training images' pixel counts per class: ``inverse_sqrt`` gives
    sqrt(median frequency / frequency), so a class a hundred times rarer than the median class
    weighs ten times more and Background, the most frequent, less than one; clipped to
    :data:`WEIGHT_CLIP`.  A class with no training pixel gets 1 (no pixel of it is ever weighted)."""
    if mode not in CLASS_WEIGHT_MODES:
        raise PipelineError(f"class_weights: unknown mode {mode!r}; known: {', '.join(CLASS_WEIGHT_MODES)}")
    counts = np.asarray(pixel_counts, dtype=np.float64)
    present = counts > 0
    if not present.any():
        return [1.0] * len(counts)
    freq = counts / counts.sum()
    median = float(np.median(freq[present]))
    weights = np.ones(len(counts))
    weights[present] = np.clip(np.sqrt(median / freq[present]), *WEIGHT_CLIP)
    return [float(w) for w in weights]


def list_losses() -> list[str]:
    """Loss names usable alone or in weighted sums such as ``0.7*ce+0.3*dice``."""
    return LOSSES.names()


def parse_loss_spec(spec: str) -> list[tuple[float, str]]:
    """``"0.7*ce+0.3*dice"`` -> ``[(0.7, "ce"), (0.3, "dice")]``; unknown names raise ``UnknownNameError``."""
    return _parse(spec)


def _parse(spec: str) -> list[tuple[float, str]]:
    if not isinstance(spec, str) or not spec.strip():
        raise PipelineError(f"loss spec must be a non-empty string such as 'ce' or '0.7*ce+0.3*dice', got {spec!r}")
    terms = []
    for raw in re.split(r"(?<![0-9][eE])\+", spec):
        match = _TERM.match(raw)
        if match is None:
            raise PipelineError(
                f"loss spec {spec!r}: cannot read term {raw.strip()!r}; write name or weight*name joined by +, "
                f"e.g. 0.7*ce+0.3*dice; valid names: {', '.join(LOSSES.names())}"
            )
        name = match.group("name").lower()
        if name not in LOSSES:
            raise UnknownNameError(
                f"unknown loss {match.group('name')!r} in {spec!r}; valid names: {', '.join(LOSSES.names())}"
            )
        coef = float(match.group("coef")) if match.group("coef") is not None else 1.0
        terms.append((coef, name))
    return terms


def _options(cls: type) -> set[str]:
    return set(inspect.signature(cls.__init__).parameters) - {"self", "num_classes", "ignore_index", "class_weights"}


def build_loss(
    spec: str,
    num_classes: int,
    ignore_index: int = IGNORE_INDEX,
    class_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    **kwargs: Any,
) -> nn.Module:
    """Build a loss from ``"ce"``, ``"dice"``, ``"focal"``, ``"lovasz"`` or a sum like ``"0.7*ce+0.3*dice"``.

    A single unweighted name returns that loss; anything else a ``WeightedSumLoss``.
    """
    terms = _parse(spec)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise PipelineError(f"num_classes must be an integer >= 2 (background included), got {num_classes!r}")
    if class_weights is not None:
        class_weights = [float(w) for w in class_weights]
        if len(class_weights) != num_classes:
            raise PipelineError(f"class_weights has {len(class_weights)} values for {num_classes} classes")
        if any(w < 0 for w in class_weights) or sum(class_weights) <= 0:
            raise PipelineError(f"class_weights must be >= 0 with a positive sum, got {class_weights}")
    names = {name for _, name in terms}
    accepted = set().union(*(_options(LOSSES.get(n)) for n in names))
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise PipelineError(
            f"unknown loss option(s) {', '.join(unknown)} for {spec!r}; options of these losses: "
            f"{', '.join(sorted(accepted - {'label_smoothing'})) or 'none'}"
        )
    if label_smoothing and "ce" not in names:
        log.warning("label_smoothing=%s has no effect on %r (it applies to ce terms)", label_smoothing, spec)
    options = dict(kwargs, label_smoothing=label_smoothing)
    built = []
    for coef, name in terms:
        cls = LOSSES.get(name)
        own = {k: v for k, v in options.items() if k in _options(cls)}
        built.append((coef, name, cls(num_classes, ignore_index=ignore_index, class_weights=class_weights, **own)))
    if len(built) == 1 and built[0][0] == 1.0:
        return built[0][2]
    return WeightedSumLoss(built)
