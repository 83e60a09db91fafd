"""Benchmark: peak memory of the ensemble and submit stages as the number of images doubles.

Synthetic data: ``--members`` (10) members, each with one fold whose ``oof/`` and
``test_flip/`` stores hold noisy one-hot probabilities (``--classes`` 11, uint8 stores) of
``--size`` (256x256) images; the ground truth is a COCO file of random rectangles.  For
each image count (50 -> 100 -> 200) each stage runs in a fresh subprocess:

* tune: ``pipeline.ensemble.run`` with ``--trials`` weight trials on every OOF image;
* submit: ``pipeline.submit.run`` (rle, validated) of that ensemble on the test images.

The child reports ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` after the imports and at
the end.  Goal: the peak stays flat as the image count doubles.

    .venv/bin/python benchmarks/bench_ensemble.py [--images 50 100 200] [--members 10] [--trials 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from results import Goal, save


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ----------------------------------------------------------------------------- data
def rectangles(rng: np.random.Generator, h: int, w: int, n_cats: int, n: int) -> list[tuple[int, list[float], float]]:
    """``n`` random rectangles as (category index 1.., polygon, area)."""
    out = []
    for _ in range(n):
        y0, x0 = int(rng.integers(0, h - 8)), int(rng.integers(0, w - 8))
        y1, x1 = int(rng.integers(y0 + 8, h + 1)), int(rng.integers(x0 + 8, w + 1))
        out.append((int(rng.integers(1, n_cats + 1)), [x0, y0, x1, y0, x1, y1, x0, y1], float((y1 - y0) * (x1 - x0))))
    return out


def label_map(rects, h: int, w: int) -> np.ndarray:
    out = np.zeros((h, w), dtype=np.uint8)
    for cat, poly, _ in sorted(rects, key=lambda r: -r[2]):
        x0, y0, x1, y1 = int(poly[0]), int(poly[1]), int(poly[4]), int(poly[5])
        out[y0:y1, x0:x1] = cat
    return out


def noisy(labels: np.ndarray, k: int, margin: float, rng: np.random.Generator) -> np.ndarray:
    p = rng.random((k, *labels.shape), dtype=np.float32) ** 3
    p += margin * (np.arange(k, dtype=np.uint8)[:, None, None] == labels[None])
    p /= p.sum(0, keepdims=True)
    return p


def make_data(root: Path, n_max: int, sizes: list[int], members: int, k: int, h: int, w: int, seed: int) -> None:
    """COCO files train_<n>.json / test_<n>.json (first n images) and the members' stores."""
    from tqdm import tqdm

    from pipeline.demo import CATEGORIES
    from pipeline.inference.store import ProbWriter

    rng = np.random.default_rng(seed)
    names = [CATEGORIES[i % len(CATEGORIES)] + ("" if i < len(CATEGORIES) else f" {i}") for i in range(k - 1)]
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(names)]
    class_names = ["Background"] + names
    split = {}
    for kind in ("train", "test"):
        images, anns, maps = [], [], []
        for i in range(n_max):
            image_id = i + 1
            images.append({"id": image_id, "file_name": f"{kind}/{image_id:05d}.jpg", "height": h, "width": w})
            rects = rectangles(rng, h, w, k - 1, int(rng.integers(1, 6)))
            for cat, poly, area in rects:
                anns.append(
                    {
                        "id": len(anns) + 1,
                        "image_id": image_id,
                        "category_id": cat,
                        "segmentation": [poly],
                        "area": area,
                        "bbox": [poly[0], poly[1], poly[4] - poly[0], poly[5] - poly[1]],
                        "iscrowd": 0,
                    }
                )
            maps.append(label_map(rects, h, w))
        split[kind] = (images, maps)
        for n in sizes:
            keep = {im["id"] for im in images[:n]}
            data = {"images": images[:n], "categories": cats}
            if kind == "train":
                data["annotations"] = [a for a in anns if a["image_id"] in keep]
            (root / f"{kind}_{n}.json").write_text(json.dumps(data))
    for m in tqdm(range(members), desc="member stores"):
        margin = 0.6 + 0.15 * m
        fold = root / "runs" / f"m{m:02d}" / "fold0"
        for store, kind in (("oof", "train"), ("test_flip", "test")):
            images, maps = split[kind]
            with ProbWriter(fold / store, class_names, dtype="uint8") as writer:
                for im, lab in zip(images, maps, strict=False):
                    writer.write(im["id"], im["file_name"], h, w, noisy(lab, k, margin, rng))


# ----------------------------------------------------------------------------- workers
def worker(args: argparse.Namespace) -> None:
    import torch

    from pipeline.ensemble import EnsembleConfig
    from pipeline.ensemble import run as ensemble
    from pipeline.submit import SubmitConfig
    from pipeline.submit import run as submit

    torch.set_num_threads(max(1, args.threads))
    root = Path(args.root)
    base = rss_mib()
    start, cpu = time.perf_counter(), cpu_seconds()
    if args.worker == "tune":
        runs = sorted(str(p) for p in (root / "runs").iterdir())
        ensemble(
            EnsembleConfig(
                runs=runs,
                data_dir=str(root),
                ann_file=f"train_{args.n}.json",
                n_trials=args.trials,
                out_dir=str(root / "ensembles"),
                name=f"n{args.n}",
                progress=False,
            )
        )
    else:
        submit(
            SubmitConfig(
                name=f"n{args.n}",
                ensemble=str(root / "ensembles" / f"n{args.n}" / "weights.yaml"),
                data_dir=str(root),
                test_ann=f"test_{args.n}.json",
                out_dir=str(root / "submissions"),
                progress=False,
            )
        )
    print(
        json.dumps(
            {"base": base, "peak": rss_mib(), "seconds": time.perf_counter() - start, "cpu": cpu_seconds() - cpu}
        )
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", nargs="+", type=int, default=[50, 100, 200])
    parser.add_argument("--members", type=int, default=10)
    parser.add_argument("--classes", type=int, default=11, help="number of classes, background included")
    parser.add_argument("--size", nargs=2, type=int, default=(256, 256), metavar=("H", "W"))
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each stage")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", default=None, help="where the synthetic stores go (default: a temporary folder)")
    parser.add_argument("--worker", choices=("tune", "submit"), help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    sizes = sorted(args.images)
    root = Path(tempfile.mkdtemp(prefix="bench_ensemble_", dir=args.work_dir))
    try:
        t0 = time.perf_counter()
        make_data(root, sizes[-1], sizes, args.members, args.classes, args.size[0], args.size[1], args.seed)
        print(
            f"synthetic data: {args.members} members x {sizes[-1]} OOF + {sizes[-1]} test images, "
            f"{args.size[0]}x{args.size[1]}, {args.classes} classes, uint8 stores ({time.perf_counter() - t0:.0f} s)"
        )
        rows = []
        for n in sizes:
            for stage in ("tune", "submit"):
                cmd = [
                    sys.executable,
                    __file__,
                    "--worker",
                    stage,
                    "--root",
                    str(root),
                    "--n",
                    str(n),
                    "--trials",
                    str(args.trials),
                    "--threads",
                    str(args.threads),
                ]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode:
                    sys.stderr.write(done.stderr[-4000:])
                    return done.returncode
                rec = json.loads(done.stdout.strip().splitlines()[-1])
                rows.append((stage, n, rec["base"], rec["peak"], rec["seconds"], rec["cpu"]))
        print(
            f"\nmembers={args.members}  classes={args.classes}  size={args.size[0]}x{args.size[1]}  "
            f"trials={args.trials} (+{1 + args.members} reference combinations)"
        )
        print(
            f"{'stage':<7} {'images':>6} {'RSS after imports MiB':>22} {'peak RSS MiB':>13} {'time s':>8} {'CPU s':>8}"
        )
        for stage in ("tune", "submit"):
            for s, n, base, peak, secs, cpu in rows:
                if s == stage:
                    print(f"{s:<7} {n:>6} {base:>22.0f} {peak:>13.0f} {secs:>8.1f} {cpu:>8.1f}")
        peaks = {(s, n): peak for s, n, _, peak, _, _ in rows}
        save(
            "bench_ensemble",
            [
                Goal(
                    f"{stage} peak RSS at {sizes[-1]} images / at {sizes[0]}",
                    peaks[stage, sizes[-1]] / peaks[stage, sizes[0]],
                    "<=",
                    1.1,
                )
                for stage in ("tune", "submit")
            ],
            settings=dict(members=args.members, classes=args.classes, size=list(args.size), trials=args.trials),
            peak_rss_mib={f"{s} {n}": peak for (s, n), peak in peaks.items()},
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
