"""The one metric module: confusion matrix first, then IoU / mIoU.

Rules (README, Contracts): one KxK confusion matrix accumulated over all scored images (rows =
ground truth, columns = prediction); pixels whose ground truth equals ``ignore_index``
are skipped; IoU_c = TP / (TP + FP + FN); mIoU is the mean over classes whose union is
non-zero (Background included).  Classes with an empty union get IoU = NaN and are left
out of the mean.  Validation, out-of-fold scoring, the tuner's objective and the
submission scorer all call these functions.
"""

from __future__ import annotations

import numpy as np

from pipeline.core.labels import IGNORE_INDEX


def confusion_matrix(pred, target, num_classes: int, ignore_index: int | None = IGNORE_INDEX) -> np.ndarray:
    """KxK int64 confusion matrix of one or many label maps (numpy arrays or torch tensors)."""
    if hasattr(pred, "detach"):
        return confusion_matrix_torch(pred, target, num_classes, ignore_index).cpu().numpy()
    pred = np.asarray(pred)
    target = np.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground-truth shape {target.shape}")
    cm = _confusion_matrix_small_codes(pred, target, num_classes, ignore_index)
    if cm is None:
        cm = _confusion_matrix_generic(pred, target, num_classes, ignore_index)
    return cm


def _confusion_matrix_generic(
    pred: np.ndarray, target: np.ndarray, num_classes: int, ignore_index: int | None
) -> np.ndarray:
    """Plain version for any dtype and class count: int64 codes ``target * K + pred``, one bincount."""
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


_CHUNK = 1 << 21  # pixels per step of the fast path: bounds its temporaries to a few MB


def _small_unsigned(a: np.ndarray, limit: int, dtype) -> np.ndarray | None:
    """``a`` as ``dtype`` when it is an integer array with values in [0, limit], else None."""
    if a.dtype == bool:
        return a.view(np.uint8).astype(dtype, copy=False)
    if a.dtype.kind not in "iu":
        return None
    if a.dtype.itemsize > np.dtype(dtype).itemsize or a.dtype.kind == "i":
        if a.min() < 0 or a.max() > limit:
            return None
    return a.astype(dtype, copy=False)


def _count_codes(codes: np.ndarray, n_codes: int) -> np.ndarray:
    """``np.bincount(codes, minlength=n_codes)`` of small unsigned codes, faster on label maps.

    Label maps are mostly long runs of one code, so each run is counted once, weighted by
    its length.  When runs are short, uint8 codes are counted two at a time (as uint16
    words, 65,536 bins, folded back), which halves the work of ``np.bincount``.
    """
    change = np.flatnonzero(codes[1:] != codes[:-1])
    if change.size < codes.size // 8:
        starts = np.empty(change.size + 1, dtype=np.intp)
        starts[0] = 0
        np.add(change, 1, out=starts[1:])
        lengths = np.diff(starts, append=codes.size)
        return np.bincount(codes[starts], weights=lengths, minlength=n_codes).astype(np.int64)  # exact below 2**53
    if codes.dtype == np.uint8 and codes.size >= 2:
        even = codes.size - codes.size % 2
        words = np.bincount(codes[:even].view(np.uint16), minlength=1 << 16).reshape(256, 256)
        counts = words.sum(axis=0) + words.sum(axis=1)  # word = one code + 256 * the next, either way round
        if even < codes.size:
            counts[codes[-1]] += 1
        return counts[:n_codes]
    return np.bincount(codes, minlength=n_codes)


def _confusion_matrix_small_codes(
    pred: np.ndarray, target: np.ndarray, num_classes: int, ignore_index: int | None
) -> np.ndarray | None:
    """Same counts as the generic path with 8- or 16-bit codes, or None when it does not apply.

    Applies to integer maps with K <= 15 (uint8 codes) or K <= 255 (uint16 codes), targets
    in the code type's range and every prediction in [0, K).  The code of a pixel is
    ``min(target, K) * K + pred``, so unscored pixels (target >= K or the ignore index) land
    in a K+1-th row that is dropped.
    """
    k = int(num_classes)
    if not 1 <= k <= 255 or pred.size == 0:
        return None
    dtype = np.uint8 if k <= 15 else np.uint16
    t = _small_unsigned(target.reshape(-1), int(np.iinfo(dtype).max), dtype)
    if t is None:
        return None
    if pred.dtype.kind not in "biu" or pred.min() < 0 or pred.max() >= k:
        return None  # the generic path decides whether unscored pixels make this an error
    p = pred.reshape(-1).astype(dtype, copy=False)
    ignore_inside = ignore_index is not None and 0 <= ignore_index < k
    n_codes = k * (k + 1)
    counts = np.zeros(n_codes, dtype=np.int64)
    for lo in range(0, t.size, _CHUNK):
        tc = t[lo : lo + _CHUNK]
        codes = np.minimum(tc, dtype(k))
        if ignore_inside:
            np.putmask(codes, tc == ignore_index, k)
        codes *= dtype(k)
        codes += p[lo : lo + _CHUNK]
        counts += _count_codes(codes, n_codes)
    return counts[: k * k].reshape(k, k)


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
    scores = [mean_iou(confusion_matrix(p, t, num_classes, ignore_index)) for p, t in zip(preds, targets, strict=False)]
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
