"""A per-class bias on log-probabilities, tuned on out-of-fold maps for dataset-level mIoU.

A model trained on imbalanced classes is under-confident on its rare classes: their pixels often
rank second behind Background or a frequent neighbour, so the argmax never names them and their
IoU is zero.  Adding ``b_c`` to ``log p_c`` before the argmax moves the decision boundary class by
class.  Dataset-level mIoU is a sum of per-class ratios, so the bias is tuned by coordinate ascent:
one class at a time, every value of a grid is tried with the other classes' biases fixed, and the
best is kept; a few sweeps over the classes.  Each try is cheap: with the top two adjusted scores
of every pixel kept, changing one class's bias is a comparison and a bincount.

Fifty-odd values tuned on a few hundred images flatter themselves, so the gain is estimated by
cross-fitting: the bias tuned on one half of the images is scored on the other half, and the two
held-out halves make the per-image confusion matrices that the selection rule compares with no
bias.  When it is accepted, the bias used for the test images is tuned on all of them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.core.labels import IGNORE_INDEX
from pipeline.evaluation.metrics import mean_iou

log = logging.getLogger(__name__)

MAX_ELEMENTS = 30_000_000  # classes x sampled pixels held in memory (float32), about 120 MB
LOG_FLOOR = 1e-6


@dataclass
class BiasSamples:
    """Log-probabilities (K x P), ground truth (P) and image index (P) of sampled OOF pixels."""

    logp: np.ndarray
    gt: np.ndarray
    image: np.ndarray

    @property
    def num_classes(self) -> int:
        return int(self.logp.shape[0])

    def subset(self, images: np.ndarray) -> BiasSamples:
        keep = np.isin(self.image, images)
        return BiasSamples(self.logp[:, keep], self.gt[keep], self.image[keep])


def collect_samples(
    maps, num_classes: int, total_pixels: int, seed: int = 0, max_elements: int = MAX_ELEMENTS
) -> BiasSamples:
    """Sample pixels of ``maps`` ((image index, K x h x w probabilities, h x w ground truth) per image)
    at one rate chosen so that at most ``max_elements`` log-probabilities are held."""
    rate = min(1.0, max_elements / max(1, num_classes * total_pixels))
    rng = np.random.default_rng(seed)
    logps, gts, images = [], [], []
    for index, probs, gt in maps:
        p = np.asarray(probs, np.float32).reshape(num_classes, -1)
        g = np.asarray(gt).reshape(-1)
        keep = (g != IGNORE_INDEX) & (g < num_classes)
        if rate < 1.0:
            keep &= rng.random(g.size) < rate
        if not keep.any():
            continue
        logps.append(np.log(np.maximum(p[:, keep], np.float32(LOG_FLOOR))))
        gts.append(g[keep].astype(np.int64))
        images.append(np.full(int(keep.sum()), index, dtype=np.int64))
    if not logps:
        return BiasSamples(np.zeros((num_classes, 0), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64))
    return BiasSamples(np.concatenate(logps, axis=1), np.concatenate(gts), np.concatenate(images))


def _confusion(pred: np.ndarray, gt: np.ndarray, k: int) -> np.ndarray:
    return np.bincount(gt * k + pred, minlength=k * k).reshape(k, k)


def _top_two(score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    cols = np.arange(score.shape[1])
    first = score.argmax(0)
    s1 = score[first, cols]  # a copy (fancy indexing): it also restores the scores below
    score[first, cols] = -np.inf
    second = score.argmax(0)
    s2 = score[second, cols]
    score[first, cols] = s1
    return first, s1, second, s2


def bias_grid(limit: float, step: float) -> np.ndarray:
    """Candidate bias values: ``-limit .. limit`` by ``step`` (0 included)."""
    n = int(round(limit / step))
    return np.arange(-n, n + 1, dtype=np.float32) * np.float32(step)


def tune_class_bias(samples: BiasSamples, grid: Sequence[float], sweeps: int = 2) -> tuple[np.ndarray, float, float]:
    """Coordinate ascent of a per-class bias (Background's stays 0: only differences matter) on the
    dataset-level mIoU of ``samples``; returns (bias, mIoU without, mIoU with)."""
    k = samples.num_classes
    bias = np.zeros(k, np.float32)
    if samples.gt.size == 0 or k < 2:
        return bias, float("nan"), float("nan")
    logp, gt = samples.logp, samples.gt
    score = logp.copy()
    first, s1, second, s2 = _top_two(score)
    start = best = mean_iou(_confusion(first, gt, k))
    grid = np.asarray(grid, np.float32)
    for _ in range(max(1, sweeps)):
        improved = False
        for c in range(1, k):
            other = np.where(first == c, second, first)
            other_s = np.where(first == c, s2, s1)
            own = logp[c]
            best_v = bias[c]
            for v in grid:
                if v == bias[c]:
                    continue
                pred = np.where(own + v > other_s, c, other)
                value = mean_iou(_confusion(pred, gt, k))
                if value > best + 1e-12:
                    best, best_v = value, v
            if best_v != bias[c]:
                score[c] += best_v - bias[c]
                bias[c] = best_v
                first, s1, second, s2 = _top_two(score)
                improved = True
        if not improved:
            break
    return bias, float(start), float(best)


def halves(n_images: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded split of image indices ``0..n_images-1`` into two halves."""
    order = np.random.default_rng(seed).permutation(n_images)
    return np.sort(order[: n_images // 2]), np.sort(order[n_images // 2 :])
