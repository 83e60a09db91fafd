"""Honest selection: bootstrap intervals of the dataset-level mIoU, paired gains, the rule, shake-up."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.evaluation import selection as sel
from pipeline.evaluation.metrics import mean_iou
from pipeline.evaluation.selection import (
    Interval,
    bootstrap_miou,
    format_interval,
    iou_statistics,
    paired_gain,
    resampled_miou,
    select,
    shakeup,
)


def random_cms(n: int, k: int, seed: int, hit: int = 400) -> np.ndarray:
    """``(n, k, k)`` per-image matrices: a strong diagonal plus off-diagonal noise."""
    rng = np.random.default_rng(seed)
    cms = rng.integers(0, 40, size=(n, k, k)).astype(np.int64)
    cms[:, np.arange(k), np.arange(k)] += rng.integers(0, hit, size=(n, k))
    return cms


def improved(cms: np.ndarray, images, amount: int = 20) -> np.ndarray:
    """A copy where ``amount`` pixels of each off-diagonal cell (0 -> 1) of ``images`` become correct."""
    out = cms.copy()
    for i in images:
        moved = min(amount, int(out[i, 0, 1]))
        out[i, 0, 1] -= moved
        out[i, 0, 0] += moved
    return out


def test_identical_images_give_a_zero_width_interval_at_the_point():
    one = random_cms(1, 5, seed=0)[0]
    cms = np.repeat(one[None], 30, axis=0)
    iv = bootstrap_miou(cms, n_boot=200, seed=3)
    assert iv.low == iv.point == iv.high
    assert iv.point == pytest.approx(mean_iou(one), rel=1e-12)  # a sum of equal matrices has the same mIoU


def test_identity_resample_is_the_dataset_level_miou_not_the_mean_of_images():
    cms = random_cms(12, 4, seed=1)
    cms[0] = 0
    cms[0, 3, 3] = 5  # an image with one class only: its own mIoU is 1
    stats = iou_statistics(cms)
    whole = resampled_miou(stats, np.ones((1, 12), dtype=np.int64))[0]
    assert whole == pytest.approx(mean_iou(cms.sum(axis=0)), rel=1e-12)
    assert whole != pytest.approx(np.mean([mean_iou(c) for c in cms]), rel=1e-3)
    assert bootstrap_miou(cms, n_boot=50).point == pytest.approx(mean_iou(cms.sum(axis=0)), rel=1e-12)
    # any count vector is the mIoU of the correspondingly weighted sum of matrices
    counts = np.random.default_rng(0).integers(0, 4, size=(5, 12))
    expected = [mean_iou(np.tensordot(c, cms, axes=1)) for c in counts]
    np.testing.assert_allclose(resampled_miou(stats, counts), expected, rtol=1e-12)


def test_bootstrap_matches_a_naive_resampling_of_summed_matrices():
    cms = random_cms(40, 6, seed=2)
    n_boot, seed = 300, 11
    draws = np.random.default_rng(seed).integers(0, 40, size=(n_boot, 40))  # one chunk: the same stream
    naive = np.array([mean_iou(cms[d].sum(axis=0)) for d in draws])
    low, high = np.quantile(naive, [0.05, 0.95])
    iv = bootstrap_miou(cms, n_boot=n_boot, seed=seed, level=0.9)
    assert iv.low == pytest.approx(low, rel=1e-12) and iv.high == pytest.approx(high, rel=1e-12)
    assert iv.low < iv.point < iv.high
    wide = bootstrap_miou(cms, n_boot=n_boot, seed=seed, level=0.99)
    assert wide.low <= iv.low and wide.high >= iv.high


def test_chunks_of_replicates_change_nothing(monkeypatch):
    cms = random_cms(25, 5, seed=4)
    whole = bootstrap_miou(cms, n_boot=101, seed=5)
    monkeypatch.setattr(sel, "CHUNK_ENTRIES", 25 * 7)  # 7 replicates per chunk
    assert bootstrap_miou(cms, n_boot=101, seed=5) == whole


def test_huge_counts_stay_exact():
    cms = random_cms(6, 3, seed=6) * (1 << 44)  # sums beyond 2**53: the int64 path
    iv = bootstrap_miou(cms, n_boot=20)
    assert iv.point == pytest.approx(mean_iou(cms.sum(axis=0)), rel=1e-12)


def test_seeded_and_deterministic():
    cms = random_cms(30, 5, seed=7)
    assert bootstrap_miou(cms, n_boot=200, seed=1) == bootstrap_miou(cms, n_boot=200, seed=1)
    assert bootstrap_miou(cms, n_boot=200, seed=1) != bootstrap_miou(cms, n_boot=200, seed=2)
    b = improved(cms, range(30))
    assert paired_gain(cms, b, n_boot=200, seed=1) == paired_gain(cms, b, n_boot=200, seed=1)
    assert shakeup(cms, n_splits=100, seed=1) == shakeup(cms, n_splits=100, seed=1)
    assert select([("a", cms), ("b", b)], n_boot=200, seed=1) == select([("a", cms), ("b", b)], n_boot=200, seed=1)


def test_paired_gain_of_a_candidate_with_itself_is_exactly_zero():
    cms = random_cms(20, 4, seed=8)
    assert paired_gain(cms, cms.copy(), n_boot=300) == Interval(0.0, 0.0, 0.0)


def test_paired_gain_uses_the_same_resamples_for_both():
    cms = random_cms(50, 5, seed=9)
    better = improved(cms, range(50))
    gain = paired_gain(cms, better, n_boot=500)
    assert gain.point == pytest.approx(mean_iou(better.sum(0)) - mean_iou(cms.sum(0)), rel=1e-9)
    assert 0 < gain.low <= gain.point <= gain.high
    # unpaired intervals overlap widely, the paired one does not: the pairing removes the image variance
    a, b = bootstrap_miou(cms, n_boot=500), bootstrap_miou(better, n_boot=500)
    assert b.low < a.high and gain.high - gain.low < (a.high - a.low) / 3


def test_select_accepts_a_candidate_better_on_every_image():
    cms = random_cms(50, 5, seed=10)
    result = select([("simple", cms), ("complex", improved(cms, range(50)))], n_boot=500)
    assert result.chosen == "complex" and result.index == 1
    (row,) = result.comparisons
    assert row.current == "simple" and row.candidate == "complex" and row.accepted and row.low > 0


def test_select_refuses_a_candidate_better_on_a_single_image_among_many():
    cms = random_cms(60, 5, seed=11)
    one = improved(cms, [17], amount=40)
    assert mean_iou(one.sum(0)) > mean_iou(cms.sum(0))  # better on OOF, but only through one image
    result = select([("simple", cms), ("complex", one)], n_boot=1000)
    assert result.chosen == "simple" and result.index == 0
    (row,) = result.comparisons
    assert row.gain > 0 and row.low <= 0 and not row.accepted


def test_select_never_accepts_a_tie():
    cms = random_cms(30, 4, seed=12)
    assert select([("a", cms), ("b", cms.copy())], n_boot=200).chosen == "a"
    swapped = cms[::-1].copy()  # other images, the same sum: an exact tie at dataset level
    result = select({"a": cms, "b": swapped}, n_boot=200)
    assert result.chosen == "a" and result.comparisons[0].gain == 0 and not result.comparisons[0].accepted
    with pytest.raises(ValueError, match="unique"):
        select([("a", cms), ("a", cms)])
    with pytest.raises(ValueError, match="at least one"):
        select([])


def test_select_compares_each_candidate_with_the_current_choice():
    base = random_cms(50, 5, seed=13)
    better = improved(base, range(50), amount=10)
    noise = improved(better, [3], amount=30)  # a tiny gain over `better`: refused
    best = improved(better, range(50), amount=15)
    result = select([("base", base), ("better", better), ("noise", noise), ("best", best)], n_boot=500)
    assert [(c.current, c.candidate, c.accepted) for c in result.comparisons] == [
        ("base", "better", True),
        ("better", "noise", False),
        ("better", "best", True),
    ]
    assert result.chosen == "best" and result.index == 3
    d = result.as_dict()
    assert d["chosen"] == "best" and d["n_boot"] == 500 and len(d["comparisons"]) == 3
    assert set(d["comparisons"][0]) == {"current", "candidate", "gain", "low", "high", "accepted"}


def test_shakeup_of_identical_images_is_zero():
    cms = np.repeat(random_cms(1, 4, seed=14), 20, axis=0)
    s = shakeup(cms, n_splits=200, seed=0)
    assert s.abs_gap == Interval(0.0, 0.0, 0.0) and s.gap == Interval(0.0, 0.0, 0.0)
    assert (s.test_images, s.public_images, s.private_images) == (20, 10, 10)


def test_shakeup_depends_on_the_test_size():
    cms = random_cms(200, 5, seed=15, hit=200)
    small = shakeup(cms, n_splits=400, seed=0, test_images=20, public_share=0.3)
    large = shakeup(cms, n_splits=400, seed=0, test_images=180)
    assert (small.public_images, small.private_images, small.with_replacement) == (6, 14, False)
    assert small.abs_gap.point > large.abs_gap.point > 0
    assert small.abs_gap.low <= small.abs_gap.point <= small.abs_gap.high
    assert small.gap.low < 0 < small.gap.high  # a random split favours neither part
    bigger = shakeup(cms, n_splits=50, test_images=500)
    assert bigger.with_replacement and bigger.test_images == 500
    d = small.as_dict()
    assert d["abs_gap"] == small.abs_gap.as_dict() and d["n_splits"] == 400
    with pytest.raises(ValueError, match="public_share"):
        shakeup(cms, public_share=1.0)


def test_format_interval_and_errors():
    assert format_interval(Interval(0.61234, 0.598, 0.62549)) == "0.6123 [0.5980, 0.6255]"
    assert format_interval({"point": 0.5, "low": 0.25, "high": 0.75}, digits=2) == "0.50 [0.25, 0.75]"
    with pytest.raises(ValueError, match="n_images, K, K"):
        bootstrap_miou(np.zeros((3, 4), dtype=np.int64))
    with pytest.raises(ValueError, match="integer"):
        bootstrap_miou(np.zeros((2, 3, 3)))
    with pytest.raises(ValueError, match="differ"):
        paired_gain(random_cms(3, 3, 0), random_cms(4, 3, 0))
    with pytest.raises(ValueError, match="level"):
        bootstrap_miou(random_cms(3, 3, 0), level=1.5)
