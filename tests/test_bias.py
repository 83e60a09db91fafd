"""Per-class bias on log-probabilities by coordinate ascent (pipeline.inference.bias)."""

from __future__ import annotations

import numpy as np

from pipeline.evaluation.metrics import confusion_matrix, mean_iou
from pipeline.inference.bias import BiasSamples, bias_grid, collect_samples, halves, tune_class_bias


def three_class_samples(n: int = 300) -> BiasSamples:
    """Class 2's pixels rank it second behind Background (0.5 against 0.3); classes 0 and 1 are clear."""
    rows = {0: [0.8, 0.1, 0.1], 1: [0.3, 0.6, 0.1], 2: [0.5, 0.2, 0.3]}
    gt = np.repeat([0, 1, 2], n)
    probs = np.array([rows[int(g)] for g in gt], np.float32).T
    return BiasSamples(np.log(probs), gt.astype(np.int64), np.arange(gt.size) % 10)


def test_the_bias_recovers_a_class_that_always_ranks_second():
    samples = three_class_samples()
    assert mean_iou(confusion_matrix(samples.logp.argmax(0), samples.gt, 3)) < 0.7
    bias, before, after = tune_class_bias(samples, bias_grid(3.0, 0.5))
    assert bias[0] == 0.0  # only differences matter: Background's stays put
    # class 2 wins its pixels only with b2 - b0 > log(0.5/0.3) and b2 - b1 > log(0.2/0.3) ...
    # ... and keeps off Background's with b2 < log(0.8/0.1) and class 1's with b2 - b1 < log(0.6/0.1)
    assert np.log(0.5 / 0.3) < bias[2] < np.log(0.8 / 0.1)
    assert after == 1.0 and before < after
    pred = (samples.logp + bias[:, None]).argmax(0)
    assert (pred == samples.gt).all()


def test_no_bias_moves_when_the_argmax_is_already_right():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 4, size=2000)
    logits = rng.normal(size=(4, gt.size)).astype(np.float32) + 6.0 * (np.arange(4)[:, None] == gt[None])
    samples = BiasSamples(logits - np.log(np.exp(logits).sum(0)), gt, np.zeros_like(gt))
    bias, before, after = tune_class_bias(samples, bias_grid(1.0, 0.5))
    assert before == after == 1.0 and not bias.any()


def test_collect_samples_caps_memory_drops_ignored_pixels_and_keeps_image_indices():
    k, h, w = 5, 20, 30
    rng = np.random.default_rng(1)
    maps = []
    for i in range(4):
        gt = rng.integers(0, k, size=(h, w))
        gt[0] = 255  # an ignored row
        maps.append((i, rng.dirichlet(np.ones(k), size=(h, w)).transpose(2, 0, 1), gt))
    full = collect_samples(iter(maps), k, 4 * h * w)
    assert full.logp.shape == (k, 4 * (h - 1) * w) and (full.gt != 255).all()
    assert sorted(np.unique(full.image).tolist()) == [0, 1, 2, 3]
    capped = collect_samples(iter(maps), k, 4 * h * w, max_elements=k * 1000)
    assert 700 < capped.gt.size < 1300  # about a thousand of the 2400 pixels
    half = capped.subset(np.array([1, 3]))
    assert set(np.unique(half.image).tolist()) == {1, 3}


def test_grid_and_halves():
    assert bias_grid(1.0, 0.5).tolist() == [-1.0, -0.5, 0.0, 0.5, 1.0]
    a, b = halves(11, seed=0)
    assert len(a) == 5 and len(b) == 6 and sorted(np.concatenate([a, b]).tolist()) == list(range(11))
    assert halves(11, seed=0)[0].tolist() == a.tolist()
