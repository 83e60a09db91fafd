"""Post-processors of fused predictions, by name.

A post-processor takes the fused class probabilities ``K x H x W`` (float32) of one image
and its class-index map ``H x W`` and returns the final class-index map; parameters come from
the caller.  Submit applies the one named by ``postprocess=`` and records it in its manifest.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from pipeline.core.registry import Registry

PostProcessor = Callable[..., np.ndarray]

POSTPROCESSORS: Registry = Registry("post-processor")


@POSTPROCESSORS.register("none", "the fused argmax as it is")
def _identity(labels: np.ndarray, probs: np.ndarray | None = None, **params: Any) -> np.ndarray:
    return labels


def postprocess(name: str, labels: np.ndarray, probs: np.ndarray | None = None, **params: Any) -> np.ndarray:
    """Apply the post-processor ``name`` (unknown names list the known ones)."""
    return POSTPROCESSORS.get(name)(labels, probs, **params)


def _thresholds(min_area: Any, num_classes: int) -> np.ndarray:
    """Per-class minimum areas from a list (index = class) or a mapping {class index: pixels}."""
    out = np.zeros(num_classes, dtype=np.int64)
    items = min_area.items() if isinstance(min_area, dict) else enumerate(min_area or [])
    for c, v in items:
        if 0 <= int(c) < num_classes:
            out[int(c)] = int(v)
    return out


@POSTPROCESSORS.register(
    "min_area", "per class, connected regions smaller than min_area[class] pixels go to the surrounding majority class"
)
def min_area(labels: np.ndarray, probs: np.ndarray | None = None, *, min_area: Any = None, **_: Any) -> np.ndarray:
    """Remove small regions: every 8-connected region of class c smaller than ``min_area[c]``
    pixels takes the most common class on its one-pixel outer border (Background when the
    border is all class c, which cannot happen for a region smaller than the image)."""
    import cv2

    labels = np.asarray(labels)
    k = int(labels.max()) + 1 if probs is None else int(probs.shape[0])
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
