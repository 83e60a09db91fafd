"""``min_area``: for each class, regions smaller than a minimum area go to their surroundings.

The minimum areas are fractions of the image's pixels (so they carry from the OOF resolution to each
test image's own size), chosen class by class on OOF mIoU from a short list of candidates."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.evaluation.metrics import confusion_matrix, mean_iou
from pipeline.inference.postprocessing.base import POSTPROCESSORS, PostProcessor, Tuned

AREA_FRACTIONS = (0.0, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)  # candidate minimum areas, fractions of the image


def _thresholds(min_area: Any, num_classes: int) -> np.ndarray:
    """Per-class minimum areas from a list (index = class) or a mapping {class index: pixels}."""
    out = np.zeros(num_classes, dtype=np.int64)
    items = min_area.items() if isinstance(min_area, dict) else enumerate(min_area or [])
    for c, v in items:
        if 0 <= int(c) < num_classes:
            out[int(c)] = int(v)
    return out


def remove_small_regions(labels: np.ndarray, min_area: Any, num_classes: int | None = None) -> np.ndarray:
    """Every 8-connected region of class c smaller than ``min_area[c]`` pixels (a list indexed by
    class or a mapping) takes the most common class on its one-pixel outer border (Background when
    the border is all class c, which cannot happen for a region smaller than the image)."""
    import cv2

    labels = np.asarray(labels)
    k = int(labels.max()) + 1 if num_classes is None else int(num_classes)
    limits = _thresholds(min_area, max(k, int(labels.max()) + 1))
    out = labels.copy()
    h, w = labels.shape
    for c in np.flatnonzero(limits > 0):
        mask = (labels == c).astype(np.uint8)
        if not mask.any():
            continue
        n, comp, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        for j in range(1, n):
            x, y, bw, bh, area = stats[j]
            if area >= limits[c]:
                continue
            y0, y1, x0, x1 = max(0, y - 1), min(h, y + bh + 1), max(0, x - 1), min(w, x + bw + 1)
            region = comp[y0:y1, x0:x1] == j
            ring = cv2.dilate(region.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool) & ~region
            border = labels[y0:y1, x0:x1][ring]
            border = border[border != c]
            out[y0:y1, x0:x1][region] = np.bincount(border).argmax() if border.size else 0
    return out


def pixel_thresholds(fractions: dict[int, float], shape: tuple[int, int]) -> dict[int, int]:
    """Minimum areas in pixels of an image of ``shape`` from fractions of its area."""
    return {int(c): int(round(f * shape[0] * shape[1])) for c, f in fractions.items() if f > 0}


def _cms(maps: Sequence[tuple[np.ndarray, np.ndarray]], k: int, fractions: dict[int, float]) -> np.ndarray:
    out = np.zeros((len(maps), k, k), dtype=np.int64)
    for i, (labels, gt) in enumerate(maps):
        pred = remove_small_regions(labels, pixel_thresholds(fractions, labels.shape)) if fractions else labels
        out[i] = confusion_matrix(pred, gt, k)
    return out


def tune_min_area(
    maps: Sequence[tuple[np.ndarray, np.ndarray]], num_classes: int, candidates: Iterable[float] = AREA_FRACTIONS
) -> Tuned:
    """Per-class minimum areas chosen one class at a time on OOF mIoU (only classes that are predicted:
    a class never predicted has no region to remove)."""
    if not maps:
        raise PipelineError("no out-of-fold maps to tune post-processing on")
    fractions: dict[int, float] = {}
    base = _cms(maps, num_classes, {})
    best = mean_iou(base.sum(0))
    predicted = set(np.unique(np.concatenate([np.unique(labels) for labels, _ in maps])).tolist())
    for c in sorted(predicted - {0}):
        for f in candidates:
            if f <= 0:
                continue
            trial = {**fractions, c: f}
            score = mean_iou(_cms(maps, num_classes, trial).sum(0))
            if score > best:
                best, fractions[c] = score, f
    params = {"min_area_fraction": {int(c): float(f) for c, f in fractions.items()}}
    return Tuned(params, base, _cms(maps, num_classes, fractions))


def _apply(params: dict[str, Any], labels: np.ndarray, probs=None, image=None) -> np.ndarray:
    fractions = {int(c): float(f) for c, f in params["min_area_fraction"].items()}
    return remove_small_regions(labels, pixel_thresholds(fractions, labels.shape))


DESCRIPTION = "per class, connected regions smaller than a tuned share of the image go to the surrounding majority"
POSTPROCESSORS.add(
    "min_area",
    PostProcessor("min_area", DESCRIPTION, lambda oof, k, seed: tune_min_area(oof.label_maps(), k), _apply),
    DESCRIPTION,
)
