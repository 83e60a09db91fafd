"""Benchmark: the pipeline's torch CRF (mean field over a local window) against ``pydensecrf2``.

Both refine the same noisy probabilities of a synthetic image whose colours follow its
class map (blobs, ``--classes`` classes, Gaussian noise on the colours), with the same
number of mean-field iterations and the pipeline's default kernel parameters (a Gaussian
spatial term and a bilateral term; pydensecrf2's permutohedral filter is exact over the
whole image, ours sums over a window).  Reported: milliseconds per image (median of
``--repeats``) and the pixel accuracy against the true class map before and after each CRF.
pydensecrf2 is optional (``pip install pydensecrf2``: it compiles a C++ extension); without
it only the pipeline's row is printed.

    .venv/bin/python benchmarks/bench_crf.py [--size 256 256] [--classes 11] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from bench_rle import blob_label_map
from results import Goal, save

from pipeline.inference.crf import CRFParams, dense_crf


def noisy_case(rng: np.random.Generator, height: int, width: int, classes: int) -> tuple[np.ndarray, ...]:
    labels = blob_label_map(rng, height, width, classes).astype(np.int64)
    palette = rng.integers(0, 256, (classes, 3))
    image = np.clip(palette[labels] + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)
    logits = np.eye(classes, dtype=np.float32)[labels].transpose(2, 0, 1) * 2.0
    logits += rng.normal(0, 1.6, logits.shape).astype(np.float32)
    probs = torch.from_numpy(logits).softmax(0).numpy()
    return labels, image, probs


def pydensecrf_refine(probs: np.ndarray, image: np.ndarray, p: CRFParams):
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    k, h, w = probs.shape
    crf = dcrf.DenseCRF2D(w, h, k)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    crf.addPairwiseGaussian(sxy=p.sigma_xy, compat=p.w_spatial)
    crf.addPairwiseBilateral(
        sxy=p.sigma_xy_bilateral, srgb=p.sigma_rgb, rgbim=np.ascontiguousarray(image), compat=p.w_bilateral
    )
    return np.array(crf.inference(p.iterations)).reshape(k, h, w)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", nargs=2, type=int, default=(256, 256), metavar=("H", "W"))
    parser.add_argument("--classes", type=int, default=11)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (pydensecrf2 uses one)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    params = CRFParams()
    labels, image, probs = noisy_case(np.random.default_rng(args.seed), *args.size, args.classes)
    methods = {f"pipeline (torch, window {params.window})": lambda: dense_crf(probs, image, params)}
    try:
        import pydensecrf.densecrf  # noqa: F401

        methods["pydensecrf2 (permutohedral, whole image)"] = lambda: pydensecrf_refine(probs, image, params)
    except ImportError:
        print("pydensecrf2 is not installed: its row is left out (pip install pydensecrf2)")
    times: dict[str, list[float]] = {name: [] for name in methods}
    outputs = {name: fn() for name, fn in methods.items()}  # warm-up, and the maps to score
    for _ in range(args.repeats):
        for name, fn in methods.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    before = float((probs.argmax(0) == labels).mean())
    print(
        f"{args.size[0]}x{args.size[1]}, {args.classes} classes, {params.iterations} iterations, "
        f"torch threads {torch.get_num_threads()}; pixel accuracy without CRF {before:.4f}"
    )
    width = max(len(n) for n in methods)
    print(f"{'method':<{width}}  {'ms/image':>9}  {'accuracy':>8}  {'x':>6}")
    ours = statistics.median(next(iter(times.values())))
    for name, values in times.items():
        ms = statistics.median(values)
        acc = float((outputs[name].argmax(0) == labels).mean())
        print(f"{name:<{width}}  {ms:>9.1f}  {acc:>8.4f}  {ms / ours:>5.2f}x")
    print("(x = time of the row / time of the pipeline's CRF)")
    goals = []
    if len(times) == 2:
        theirs = statistics.median(list(times.values())[1])
        goals.append(Goal("pydensecrf2 time / pipeline CRF time", theirs / ours, "report", 0.0))
    save(
        "bench_crf",
        goals,
        settings=dict(size=list(args.size), classes=args.classes, threads=args.threads, **params.as_dict()),
        ms_per_image={n: statistics.median(v) for n, v in times.items()},
        accuracy={"none": before, **{n: float((o.argmax(0) == labels).mean()) for n, o in outputs.items()}},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
