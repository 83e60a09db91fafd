"""Honest selection: bootstrap intervals of the dataset-level mIoU and the one rule for every choice.

The unit is the image: a candidate (an ensemble member, a set of weights, a bias, a TTA set,
a post-processing step) is described by one KxK confusion matrix per out-of-fold image, as an
``(n_images, K, K)`` int64 array, every candidate over the same images in the same order.

* :func:`bootstrap_miou`: the dataset-level mIoU (README, Contracts: one confusion matrix summed
  over the images, mean IoU over classes with a non-zero union) with a percentile bootstrap
  interval; each replicate resamples the images with replacement and recomputes the mIoU from
  the summed matrices (never a mean of per-image mIoUs).
* :func:`paired_gain`: the interval of mIoU(b) - mIoU(a), the same resampled images for both.
* :func:`select`: the rule.  Candidates are ordered simplest first; a more complex candidate
  replaces the current choice only if its paired gain's interval lies above zero (lower bound
  > 0, so never on a tie).
* :func:`shakeup`: how far public and private leaderboard scores of a test set of a given size
  may lie apart, from random public/private splits of the OOF images.

Speed and memory: a replicate's summed matrix is ``counts @ matrices`` where ``counts`` is a
(replicates x images) matrix of how often each image was drawn.  Only the diagonal, the row sums
and the column sums of the summed matrix enter the IoU, and they are linear in the matrices,
so each image is first reduced to those 3K numbers; replicates are processed in chunks of at
most :data:`CHUNK_ENTRIES` count-matrix entries, and the IoU is vectorized over a chunk.
Everything is seeded: the same seed gives the same replicates.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

CHUNK_ENTRIES = 1 << 22  # entries of one chunk's count matrix (float64: 32 MiB)
EXACT_FLOAT = 2**53  # float64 sums of integers are exact below this


@dataclass(frozen=True)
class Interval:
    """A point estimate with the bounds of an interval around it."""

    point: float
    low: float
    high: float

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


def format_interval(iv: Interval | Mapping[str, float], digits: int = 4) -> str:
    """``"0.6123 [0.5980, 0.6255]"`` (an :class:`Interval` or its ``as_dict``)."""
    d = iv.as_dict() if isinstance(iv, Interval) else iv
    return f"{d['point']:.{digits}f} [{d['low']:.{digits}f}, {d['high']:.{digits}f}]"


# ----------------------------------------------------------------------------- building blocks
def as_per_image(per_image_cms) -> np.ndarray:
    """``(n_images, K, K)`` int64 array of per-image confusion matrices; ValueError otherwise."""
    cms = np.asarray(per_image_cms)
    if cms.ndim != 3 or cms.shape[1] != cms.shape[2] or cms.shape[0] == 0:
        raise ValueError(f"expected per-image confusion matrices of shape (n_images, K, K), got {cms.shape}")
    if cms.dtype.kind not in "iu":
        raise ValueError(f"confusion matrices must hold integer counts, got {cms.dtype}")
    return cms.astype(np.int64, copy=False)


def iou_statistics(per_image_cms) -> np.ndarray:
    """Per image: true positives, ground-truth and predicted pixels of every class, ``(n_images, 3K)``.

    These are linear in the matrix, so the statistics of a sum of matrices are the sum of
    their statistics.  int64, exact.
    """
    cms = as_per_image(per_image_cms)
    tp = np.diagonal(cms, axis1=1, axis2=2)
    return np.concatenate([tp, cms.sum(axis=2), cms.sum(axis=1)], axis=1)


def miou_of_statistics(stats: np.ndarray) -> np.ndarray:
    """Dataset-level mIoU of every row of summed statistics ``(..., 3K)`` (NaN where no class has a union)."""
    stats = np.asarray(stats, dtype=np.float64)
    k = stats.shape[-1] // 3
    tp, gt, pred = stats[..., :k], stats[..., k : 2 * k], stats[..., 2 * k :]
    union = gt + pred - tp
    valid = union > 0
    iou = np.divide(tp, union, out=np.zeros_like(tp), where=valid)
    n_valid = valid.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_valid > 0, iou.sum(axis=-1) / np.maximum(n_valid, 1), np.nan)


def resampled_miou(stats: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """mIoU of each replicate: ``counts`` (replicates x images) times the per-image statistics.

    ``counts[r, i]`` is how often image i is in replicate r (a row of ones is the whole set).
    """
    stats = np.asarray(stats)
    counts = np.asarray(counts)
    if counts.shape[-1] != stats.shape[0]:
        raise ValueError(f"counts cover {counts.shape[-1]} images, the statistics {stats.shape[0]}")
    k = stats.shape[1] // 3
    per_image_total = int(stats[:, k : 2 * k].sum(axis=1).max(initial=0))  # bounds every statistic of an image
    if int(counts.sum(axis=-1).max(initial=0)) * per_image_total < EXACT_FLOAT:
        sums = counts.astype(np.float64) @ stats.astype(np.float64)  # BLAS; exact integers
    else:
        sums = counts.astype(np.int64) @ stats.astype(np.int64)
    return miou_of_statistics(sums)


def _bootstrap_counts(n_images: int, n_boot: int, seed: int, chunk: int | None = None) -> Iterator[np.ndarray]:
    """Count matrices of ``n_boot`` resamples with replacement of ``n_images`` images, chunk by chunk."""
    rng = np.random.default_rng(seed)
    chunk = chunk or max(1, CHUNK_ENTRIES // n_images)
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        draws = rng.integers(0, n_images, size=(b, n_images))
        draws += np.arange(b)[:, None] * n_images
        yield np.bincount(draws.reshape(-1), minlength=b * n_images).reshape(b, n_images)


def _replicates(stats_list: Sequence[np.ndarray], n_boot: int, seed: int) -> np.ndarray:
    """``(len(stats_list), n_boot)`` bootstrap mIoUs, the same resamples for every candidate."""
    n = stats_list[0].shape[0]
    if any(s.shape[0] != n for s in stats_list):
        raise ValueError(f"candidates cover different numbers of images: {[s.shape[0] for s in stats_list]}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    out = np.empty((len(stats_list), n_boot))
    done = 0
    for counts in _bootstrap_counts(n, n_boot, seed):
        for j, stats in enumerate(stats_list):
            out[j, done : done + counts.shape[0]] = resampled_miou(stats, counts)
        done += counts.shape[0]
    return out


def _bounds(values: np.ndarray, level: float) -> tuple[float, float]:
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    tail = (1 - level) / 2
    values = values[~np.isnan(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    low, high = np.quantile(values, [tail, 1 - tail])
    return float(low), float(high)


def _whole(stats: np.ndarray) -> float:
    return float(resampled_miou(stats, np.ones((1, stats.shape[0]), dtype=np.int64))[0])


# ----------------------------------------------------------------------------- intervals
def bootstrap_miou(per_image_cms, n_boot: int = 1000, seed: int = 0, level: float = 0.9) -> Interval:
    """Dataset-level mIoU of the summed matrices with its percentile bootstrap interval over images."""
    stats = iou_statistics(per_image_cms)
    low, high = _bounds(_replicates([stats], n_boot, seed)[0], level)
    return Interval(_whole(stats), low, high)


def paired_gain(cms_a, cms_b, n_boot: int = 1000, seed: int = 0, level: float = 0.9) -> Interval:
    """mIoU(b) - mIoU(a) with its paired bootstrap interval (the same resampled images for both)."""
    a, b = iou_statistics(cms_a), iou_statistics(cms_b)
    if a.shape != b.shape:
        raise ValueError(f"candidates differ in shape: {a.shape} and {b.shape} (same images and classes needed)")
    reps = _replicates([a, b], n_boot, seed)
    low, high = _bounds(reps[1] - reps[0], level)
    return Interval(_whole(b) - _whole(a), low, high)


# ----------------------------------------------------------------------------- the rule
@dataclass(frozen=True)
class Comparison:
    """One step of :func:`select`: ``candidate`` against the choice so far."""

    current: str
    candidate: str
    gain: float
    low: float
    high: float
    accepted: bool

    def as_dict(self) -> dict[str, Any]:
        return {k: (float(v) if isinstance(v, float) else v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Selection:
    chosen: str
    index: int  # position of the chosen candidate in the ordered candidates
    comparisons: list[Comparison]
    n_boot: int
    seed: int
    level: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "chosen": self.chosen,
            "rule": RULE,
            "level": float(self.level),
            "n_boot": int(self.n_boot),
            "seed": int(self.seed),
            "comparisons": [c.as_dict() for c in self.comparisons],
        }


RULE = (
    "candidates ordered simplest first; a more complex candidate replaces the current choice only if "
    "the paired bootstrap interval over images of its OOF mIoU gain lies above zero"
)


def select(
    candidates: Sequence[tuple[str, Any]] | Mapping[str, Any], n_boot: int = 1000, seed: int = 0, level: float = 0.9
) -> Selection:
    """Apply the rule to ``(name, per-image matrices)`` pairs ordered simplest -> most complex.

    Every comparison uses the same seed, hence the same resampled images.  A candidate is
    accepted when its gain over the current choice is positive and the lower bound of the
    gain's interval is above zero; a tie is never accepted.
    """
    items = list(candidates.items()) if isinstance(candidates, Mapping) else list(candidates)
    if not items:
        raise ValueError("select needs at least one candidate")
    names = [str(name) for name, _ in items]
    if len(set(names)) != len(names):
        raise ValueError(f"candidate names must be unique: {names}")
    stats = [iou_statistics(cms) for _, cms in items]
    reps = _replicates(stats, n_boot, seed)
    points = [_whole(s) for s in stats]
    current, table = 0, []
    for j in range(1, len(items)):
        low, high = _bounds(reps[j] - reps[current], level)
        gain = points[j] - points[current]
        accepted = bool(gain > 0 and low > 0)
        table.append(Comparison(names[current], names[j], gain, low, high, accepted))
        if accepted:
            current = j
    return Selection(names[current], current, table, n_boot, seed, level)


# ----------------------------------------------------------------------------- shake-up
@dataclass(frozen=True)
class Shakeup:
    """Distribution of public - private mIoU over random splits of a test set of ``test_images``."""

    test_images: int
    public_images: int
    private_images: int
    n_splits: int
    with_replacement: bool  # the test set is larger than the OOF set: images drawn with replacement
    abs_gap: Interval  # |public - private|: median and the ``level`` range
    gap: Interval  # public - private
    level: float

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["abs_gap"], d["gap"] = self.abs_gap.as_dict(), self.gap.as_dict()
        return d


def _split_counts(
    n: int, size: int, n_public: int, n_splits: int, rng: np.random.Generator, replace: bool
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(public counts, private counts) of random splits, chunk by chunk."""
    chunk = max(1, CHUNK_ENTRIES // max(n, size))
    for start in range(0, n_splits, chunk):
        b = min(chunk, n_splits - start)
        if replace:
            draws = rng.integers(0, n, size=(b, size))
        else:
            draws = np.argsort(rng.random((b, n)), axis=1)[:, :size]
        draws = draws + np.arange(b)[:, None] * n
        parts = []
        for part in (draws[:, :n_public], draws[:, n_public:]):
            parts.append(np.bincount(part.reshape(-1), minlength=b * n).reshape(b, n))
        yield parts[0], parts[1]


def shakeup(
    per_image_cms,
    public_share: float = 0.5,
    n_splits: int = 1000,
    seed: int = 0,
    test_images: int | None = None,
    level: float = 0.9,
) -> Shakeup:
    """Public/private shake-up for a test set of ``test_images`` images (default: as many as OOF images).

    Each split draws ``test_images`` OOF images (without replacement when there are enough,
    else with replacement), puts ``round(public_share * test_images)`` of them (at least one,
    at most all but one) in the public part and the rest in the private part, and scores
    both parts at dataset level.
    """
    stats = iou_statistics(per_image_cms)
    n = stats.shape[0]
    size = n if test_images is None else int(test_images)
    if size < 2:
        raise ValueError(f"a shake-up needs at least 2 test images, got {size}")
    if not 0 < public_share < 1:
        raise ValueError(f"public_share must lie in (0, 1), got {public_share}")
    if n_splits < 1:
        raise ValueError(f"n_splits must be at least 1, got {n_splits}")
    n_public = min(size - 1, max(1, round(public_share * size)))
    rng = np.random.default_rng(seed)
    replace = size > n
    gaps = []
    for public, private in _split_counts(n, size, n_public, n_splits, rng, replace):
        gaps.append(resampled_miou(stats, public) - resampled_miou(stats, private))
    gap = np.concatenate(gaps)
    summaries = []
    for values in (np.abs(gap), gap):
        finite = values[~np.isnan(values)]
        median = float(np.median(finite)) if finite.size else float("nan")
        summaries.append(Interval(median, *_bounds(values, level)))
    return Shakeup(size, n_public, size - n_public, n_splits, replace, summaries[0], summaries[1], level)


def format_shakeup(s: Shakeup | Mapping[str, Any]) -> str:
    """One sentence for a report."""
    d = s.as_dict() if isinstance(s, Shakeup) else s
    pct = round(100 * d["level"])
    return (
        f"{d['test_images']} test images ({d['public_images']} public, {d['private_images']} private), "
        f"{d['n_splits']} random splits of the OOF images{' drawn with replacement' if d['with_replacement'] else ''}: "
        f"|public - private| median {d['abs_gap']['point']:.4f}, {pct}% range "
        f"[{d['abs_gap']['low']:.4f}, {d['abs_gap']['high']:.4f}]; public - private median "
        f"{d['gap']['point']:+.4f}, {pct}% range [{d['gap']['low']:+.4f}, {d['gap']['high']:+.4f}]"
    )
