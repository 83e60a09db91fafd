"""The one metric module: confusion matrix first, then IoU / mIoU.

Rules (CONTEST.md): one KxK confusion matrix accumulated over all scored images (rows =
ground truth, columns = prediction); pixels whose ground truth equals ``ignore_index``
are skipped; IoU_c = TP / (TP + FP + FN); mIoU is the mean over classes whose union is
non-zero (Background included).  Classes with an empty union get IoU = NaN and are left
out of the mean.  Validation, out-of-fold scoring, the tuner's objective and the
submission scorer all call these functions.
"""
from __future__ import annotations

import numpy as np

IGNORE_INDEX = 255


def confusion_matrix(pred, target, num_classes: int, ignore_index: int | None = IGNORE_INDEX) -> np.ndarray:
    """KxK int64 confusion matrix of one or many label maps (numpy arrays or torch tensors)."""
    if hasattr(pred, "detach"):
        return confusion_matrix_torch(pred, target, num_classes, ignore_index).cpu().numpy()
    pred = np.asarray(pred)
    target = np.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground-truth shape {target.shape}")
    t = target.reshape(-1).astype(np.int64, copy=False)
    p = pred.reshape(-1).astype(np.int64, copy=False)
    keep = (t >= 0) & (t < num_classes)
    if ignore_index is not None:
        keep &= t != ignore_index
    if not keep.all():
        t = t[keep]
        p = p[keep]
    if p.size and (p.min() < 0 or p.max() >= num_classes):
        raise ValueError(f"predicted class index out of range [0, {num_classes})")
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def confusion_matrix_torch(pred, target, num_classes: int, ignore_index: int | None = IGNORE_INDEX):
    """Same as :func:`confusion_matrix` on torch tensors, staying on their device."""
    import torch

    t = target.reshape(-1).long()
    p = pred.reshape(-1).long()
    keep = (t >= 0) & (t < num_classes)
    if ignore_index is not None:
        keep &= t != ignore_index
    t = t[keep]
    p = p[keep]
    return torch.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_per_class(cm: np.ndarray) -> np.ndarray:
    """IoU of every class; NaN where the class has an empty union (absent and never predicted)."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, tp / np.where(union > 0, union, 1), np.nan)


def mean_iou(cm: np.ndarray) -> float:
    """Dataset-level mIoU: mean IoU over classes with a non-zero union."""
    ious = iou_per_class(cm)
    valid = ~np.isnan(ious)
    return float(ious[valid].mean()) if valid.any() else float("nan")


def pixel_accuracy(cm: np.ndarray) -> float:
    cm = np.asarray(cm)
    total = cm.sum()
    return float(np.trace(cm) / total) if total else float("nan")


def image_level_miou(preds, targets, num_classes: int, ignore_index: int | None = IGNORE_INDEX) -> float:
    """Optional variant: the mean over images of each image's own mIoU (never the default)."""
    scores = [mean_iou(confusion_matrix(p, t, num_classes, ignore_index)) for p, t in zip(preds, targets)]
    scores = [s for s in scores if not np.isnan(s)]
    return float(np.mean(scores)) if scores else float("nan")


class MeanIoU:
    """Accumulates a confusion matrix batch by batch."""

    def __init__(self, num_classes: int, ignore_index: int | None = IGNORE_INDEX):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.cm = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, pred, target) -> None:
        self.cm += confusion_matrix(pred, target, self.num_classes, self.ignore_index)

    def add_confusion(self, cm) -> None:
        self.cm += np.asarray(cm, dtype=np.int64)

    def per_class(self) -> np.ndarray:
        return iou_per_class(self.cm)

    def compute(self) -> float:
        return mean_iou(self.cm)
