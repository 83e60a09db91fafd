"""Benchmark: run-length encode and decode ALL classes of one class-index map.

Compares ``pipeline.submission.rle`` (one pass over the map for every class) with the classic per-class
Kaggle numpy function (one call per class on ``mask == c``, plus its decode loop) and with
pycocotools (``mask.encode`` of the HxWxK Fortran-ordered uint8 stack of per-class masks,
plus ``mask.decode``).  All three are timed side by side in one run and checked to agree.

    .venv/bin/python benchmarks/bench_rle.py [--size H W] [--classes K] [--dtype uint8|int64]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
from results import Goal, save

from pipeline.submission.rle import decode_label_map, encode_label_map


def blob_label_map(
    rng: np.random.Generator, height: int, width: int, num_classes: int, n_blobs: int | None = None, dtype=np.uint8
) -> np.ndarray:
    """A realistic class map: background with overlapping ellipses and rectangles of classes 1..K-1.

    Every foreground class gets at least one blob; blob sizes scale with the image.
    """
    label_map = np.zeros((height, width), dtype=dtype)
    n_blobs = n_blobs if n_blobs is not None else max(2 * (num_classes - 1), 12)
    classes = np.concatenate(
        [np.arange(1, num_classes), rng.integers(1, num_classes, max(n_blobs - num_classes + 1, 0))]
    )
    scale = min(height, width)
    for cls in rng.permutation(classes):
        a, b = rng.uniform(0.03, 0.22, size=2) * scale + 1
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        y0, y1 = int(max(cy - a, 0)), int(min(cy + a + 1, height))
        x0, x1 = int(max(cx - b, 0)), int(min(cx + b + 1, width))
        if y1 <= y0 or x1 <= x0:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1]
        if rng.random() < 0.7:
            inside = ((yy - cy) / a) ** 2 + ((xx - cx) / b) ** 2 <= 1
        else:
            inside = np.ones((y1 - y0, x1 - x0), dtype=bool)
        label_map[y0:y1, x0:x1][inside] = cls
    return label_map


# ----------------------------------------------------------------------------- the baselines
def classic_encode(img: np.ndarray) -> str:
    """The classic Kaggle run-length encoder of one binary mask (column-major, from 1)."""
    pixels = np.concatenate([[0], img.flatten(order="F"), [0]])
    runs = np.where(pixels[1:] != pixels[:-1])[0] + 1
    runs[1::2] -= runs[::2]
    return " ".join(str(x) for x in runs)


def classic_decode(mask_rle: str, shape: tuple[int, int]) -> np.ndarray:
    """The classic Kaggle decoder of one ``EncodedPixels`` string (a loop over runs)."""
    s = mask_rle.split()
    starts, lengths = [np.asarray(x, dtype=int) for x in (s[0:][::2], s[1:][::2])]
    starts -= 1
    ends = starts + lengths
    img = np.zeros(shape[0] * shape[1], dtype=np.uint8)
    for lo, hi in zip(starts, ends, strict=False):
        img[lo:hi] = 1
    return img.reshape(shape, order="F")


def classic_encode_all(label_map: np.ndarray, classes: list[int]) -> dict[int, str]:
    return {c: classic_encode(label_map == c) for c in classes}


def classic_decode_all(rles: dict[int, str], shape: tuple[int, int]) -> np.ndarray:
    label_map = np.zeros(shape, dtype=np.uint8)
    for c, rle in rles.items():
        label_map[classic_decode(rle, shape) == 1] = c
    return label_map


def coco_masks(label_map: np.ndarray, classes: list[int]) -> np.ndarray:
    return np.asfortranarray((label_map[:, :, None] == np.asarray(classes)[None, None, :]).astype(np.uint8))


def coco_to_label_map(masks: np.ndarray, classes: list[int]) -> np.ndarray:
    label_map = np.zeros(masks.shape[:2], dtype=np.uint8)
    for k, c in enumerate(classes):
        label_map[masks[:, :, k] == 1] = c
    return label_map


# ----------------------------------------------------------------------------- timing
def time_ms(fn: Callable[[], object], min_seconds: float = 0.2, rounds: int = 7) -> float:
    """Median over ``rounds`` of the mean time of one call, in milliseconds."""
    fn()
    number = 1
    while True:
        start = time.perf_counter()
        for _ in range(number):
            fn()
        if time.perf_counter() - start >= min_seconds / rounds or number >= 1 << 16:
            break
        number *= 2
    results = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        results.append((time.perf_counter() - start) / number * 1e3)
    return statistics.median(results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", nargs=2, type=int, default=(512, 512), metavar=("H", "W"))
    parser.add_argument("--classes", type=int, default=11, help="number of classes, background included")
    parser.add_argument("--dtype", choices=("uint8", "int64"), default="uint8", help="dtype of the class map")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    height, width = args.size
    classes = list(range(args.classes))
    rng = np.random.default_rng(args.seed)
    label_map = blob_label_map(rng, height, width, args.classes, dtype=np.dtype(args.dtype))
    shape = (height, width)

    ours = encode_label_map(label_map, classes)
    classic = classic_encode_all(label_map, classes)
    if ours != classic:
        raise SystemExit("pipeline.submission.rle and the classic encoder disagree")
    if not (
        np.array_equal(decode_label_map(ours, shape), label_map)
        and np.array_equal(classic_decode_all(classic, shape), label_map)
    ):
        raise SystemExit("a decoder does not give the class map back")

    from pycocotools import mask as mask_util

    masks = coco_masks(label_map, classes)
    coco_rles = mask_util.encode(masks)
    if not np.array_equal(coco_to_label_map(mask_util.decode(coco_rles), classes), label_map):
        raise SystemExit("pycocotools round trip does not give the class map back")

    n_runs = sum(len(s.split()) // 2 for s in ours.values())
    rows = [
        (
            "pipeline.submission.rle (encode_label_map / decode_label_map)",
            time_ms(lambda: encode_label_map(label_map, classes)),
            time_ms(lambda: decode_label_map(ours, shape)),
        ),
        (
            "classic Kaggle function, once per class",
            time_ms(lambda: classic_encode_all(label_map, classes)),
            time_ms(lambda: classic_decode_all(classic, shape)),
        ),
        (
            "pycocotools, map -> HxWxK masks -> RLE -> map",
            time_ms(lambda: mask_util.encode(coco_masks(label_map, classes))),
            time_ms(lambda: coco_to_label_map(mask_util.decode(coco_rles), classes)),
        ),
        (
            "pycocotools, encode/decode calls only (masks given)",
            time_ms(lambda: mask_util.encode(masks)),
            time_ms(lambda: mask_util.decode(coco_rles)),
        ),
    ]
    print(
        f"class map {height}x{width} {args.dtype}, {args.classes} classes (all encoded, background included), "
        f"{n_runs} runs, column-major; ms per map (median of 7 rounds)"
    )
    name_width = max(len(r[0]) for r in rows)
    print(f"{'method':<{name_width}}  {'encode ms':>10}  {'decode ms':>10}  {'encode x':>9}  {'decode x':>9}")
    base_enc, base_dec = rows[0][1], rows[0][2]
    for name, enc, dec in rows:
        print(f"{name:<{name_width}}  {enc:>10.3f}  {dec:>10.3f}  {enc / base_enc:>8.1f}x  {dec / base_dec:>8.1f}x")
    print("(x = time of the row / time of pipeline.submission.rle: how many times faster pipeline.submission.rle is)")
    _, classic_enc, classic_dec = rows[1]
    _, coco_enc, coco_dec = rows[2]
    save(
        "bench_rle",
        [
            Goal("classic encode time / ours", classic_enc / base_enc, ">=", 10),
            Goal("classic decode time / ours", classic_dec / base_dec, ">=", 10),
            Goal("pycocotools encode time / ours", coco_enc / base_enc, ">=", 5),
            Goal("pycocotools decode time / ours", coco_dec / base_dec, ">=", 5),
        ],
        settings=dict(size=[height, width], classes=args.classes, dtype=args.dtype),
        ms_per_map={name: {"encode": enc, "decode": dec} for name, enc, dec in rows},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
