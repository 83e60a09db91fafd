"""Benchmark: score a test-set-sized batch of label maps with ``pipeline.evaluation.metrics`` on one core.

819 predicted 512x512 class maps (11 classes) against ground truth with ignored (255)
pixels: accumulate one confusion matrix with ``MeanIoU.update`` image by image, then mIoU.
Timed side by side with the plain int64 ``bincount`` confusion matrix; both must agree.

    .venv/bin/python benchmarks/bench_score.py [--images N] [--size H W] [--classes K] [--pred-dtype int64]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse
import statistics
import sys
import time

import numpy as np
from bench_rle import blob_label_map
from results import Goal, save

from pipeline.evaluation.metrics import IGNORE_INDEX, MeanIoU, _confusion_matrix_generic, mean_iou


def make_pair(rng: np.random.Generator, height: int, width: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """A ground-truth map with an ignored band, and a plausible prediction of it (shifted, with wrong blobs)."""
    gt = blob_label_map(rng, height, width, num_classes)
    pred = np.roll(gt, tuple(rng.integers(-6, 7, size=2)), axis=(0, 1))
    noise = blob_label_map(rng, height, width, num_classes, n_blobs=4)
    np.copyto(pred, noise, where=noise > 0)
    if rng.random() < 0.5:
        y = int(rng.integers(0, height))
        gt[y : y + max(height // 64, 1)] = IGNORE_INDEX
    return pred, gt


def score_fast(preds, gts, num_classes: int) -> tuple[np.ndarray, float]:
    meter = MeanIoU(num_classes)
    for pred, gt in zip(preds, gts, strict=False):
        meter.update(pred, gt)
    return meter.cm, meter.compute()


def score_plain(preds, gts, num_classes: int) -> tuple[np.ndarray, float]:
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    for pred, gt in zip(preds, gts, strict=False):
        cm += _confusion_matrix_generic(pred, gt, num_classes, IGNORE_INDEX)
    return cm, mean_iou(cm)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=819)
    parser.add_argument("--size", nargs=2, type=int, default=(512, 512), metavar=("H", "W"))
    parser.add_argument("--classes", type=int, default=11, help="number of classes, background included")
    parser.add_argument("--pred-dtype", choices=("uint8", "int64"), default="uint8")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)

    height, width = args.size
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    pairs = [make_pair(rng, height, width, args.classes) for _ in range(args.images)]
    preds = [p.astype(args.pred_dtype) for p, _ in pairs]
    gts = [g for _, g in pairs]
    del pairs
    made = time.perf_counter() - start

    timings: dict[str, list[float]] = {
        "pipeline.evaluation.metrics (MeanIoU.update per image)": [],
        "plain int64 bincount": [],
    }
    results = {}
    for _ in range(args.repeats):
        for name, fn in zip(timings, (score_fast, score_plain), strict=False):
            start = time.perf_counter()
            results[name] = fn(preds, gts, args.classes)
            timings[name].append(time.perf_counter() - start)
    (cm_fast, miou_fast), (cm_plain, miou_plain) = results.values()
    if not np.array_equal(cm_fast, cm_plain):
        raise SystemExit("the two confusion matrices differ")

    n_pixels = args.images * height * width
    print(
        f"{args.images} maps {height}x{width}, {args.classes} classes, predictions {args.pred_dtype}, "
        f"ground truth uint8 with {IGNORE_INDEX} ignored; one core; data made in {made:.1f} s"
    )
    print(
        f"mIoU {miou_fast:.6f} (plain: {miou_plain:.6f}); {n_pixels / 1e6:.0f} M pixels; median of {args.repeats} runs"
    )
    base = statistics.median(timings["pipeline.evaluation.metrics (MeanIoU.update per image)"])
    name_width = max(len(name) for name in timings)
    print(f"{'method':<{name_width}}  {'total s':>8}  {'ms/map':>7}  {'ns/pixel':>8}  {'x':>6}")
    for name, values in timings.items():
        t = statistics.median(values)
        print(
            f"{name:<{name_width}}  {t:>8.3f}  {t / args.images * 1e3:>7.3f}  {t / n_pixels * 1e9:>8.2f}  "
            f"{t / base:>5.1f}x"
        )
    save(
        "bench_score",
        [Goal(f"seconds to score {args.images} maps {height}x{width}", base, "<=", 1.0, unit=" s")],
        settings=dict(images=args.images, size=[height, width], classes=args.classes, pred_dtype=args.pred_dtype),
        seconds={name: statistics.median(v) for name, v in timings.items()},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
