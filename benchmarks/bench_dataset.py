"""Dataset ``__getitem__`` throughput: mask cache (PNG) versus per-item pycocotools rasterizing.

``ours``      ``SegmentationDataset`` with transform ``none`` and a ``MaskCache`` that is
              fully built before timing: read JPEG (cv2), read mask PNG, normalize,
              return (float32 3xHxW, int64 HxW, meta).
``baseline``  the official baseline's dataset: ``COCO(ann_file)``; per item ``cv2.imread``,
              ``cv2.cvtColor``, float32 ``/ 255``; ``coco.loadAnns(coco.getAnnIds(...))``
              sorted by ``area`` descending (stable, so ties keep file order) and painted
              with ``masks[coco.annToMask(ann) == 1] = class_index`` (later ones on top, as
              the mask rule of README, Contracts says); returned as a 3xHxW tensor and an int64 mask.

Both read the same images in the same order and the same number of items; warm-up items
are run first and not timed; each method is timed over ``--repeats`` passes (interleaved
between the methods) and the median pass is reported.  ``torch`` runs with ``--threads`` threads (1, as in a DataLoader
worker).  Before timing, the masks of both methods are compared item by item.

    python benchmarks/bench_dataset.py                      # 200 demo images, 512x512, in a temp dir
    python benchmarks/bench_dataset.py --data-dir data/demo # an existing dataset
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from results import Goal, save

from pipeline.data import MaskCache, SegmentationDataset, build_transform, load_coco

log = logging.getLogger("bench_dataset")


class BaselineDataset:
    """The official baseline's per-item rasterizing dataset (no transform)."""

    def __init__(self, data_dir: str | Path, ann_file: str | Path, image_ids: Sequence[int] | None = None):
        from pycocotools.coco import COCO

        with contextlib.redirect_stdout(io.StringIO()):
            self.coco = COCO(str(ann_file))
        self.data_dir = Path(data_dir)
        cats = self.coco.dataset["categories"]
        self.class_of = {int(c["id"]): k + 1 for k, c in enumerate(cats)}  # k-th category in file order
        self.image_ids = (
            list(image_ids) if image_ids is not None else [int(im["id"]) for im in self.coco.dataset["images"]]
        )

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, idx: int):
        info = self.coco.loadImgs(self.image_ids[idx])[0]
        images = cv2.imread(os.path.join(self.data_dir, info["file_name"]))
        images = cv2.cvtColor(images, cv2.COLOR_BGR2RGB).astype(np.float32)
        images /= 255.0
        anns = self.coco.loadAnns(self.coco.getAnnIds(imgIds=info["id"]))
        anns = sorted(anns, key=lambda a: a["area"], reverse=True)
        masks = np.zeros((info["height"], info["width"]))
        for ann in anns:
            masks[self.coco.annToMask(ann) == 1] = self.class_of[int(ann["category_id"])]
        masks = masks.astype(np.int8)
        return torch.from_numpy(images.transpose(2, 0, 1)), torch.from_numpy(masks).long(), info


def time_methods(
    methods: dict[str, Callable[[int], object]], n_items: int, warmup: int, repeats: int
) -> dict[str, list[float]]:
    """Seconds per pass over items 0..n_items-1 for each method.

    Each method first runs ``warmup`` untimed items; the timed passes of the methods are
    interleaved (A, B, A, B, ...) so that a change in machine load hits all of them alike.
    """
    for get in methods.values():
        for i in range(min(warmup, n_items)):
            get(i)
    passes: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, get in methods.items():
            t0 = time.perf_counter()
            for i in range(n_items):
                get(i)
            passes[name].append(time.perf_counter() - t0)
    return passes


def make_demo(root: Path, size: int, n: int, max_objects: int = 8) -> Path:
    from pipeline.demo import DemoConfig, run

    return run(
        DemoConfig(
            out_dir=str(root / "data"), n_train=n, n_test=1, height=size, width=size, seed=0, max_objects=max_objects
        )
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data-dir", default=None, help="existing dataset (default: render a demo dataset in a temp dir)"
    )
    parser.add_argument("--ann-file", default="train_all.json")
    parser.add_argument("--size", type=int, default=512, help="demo image side (only without --data-dir)")
    parser.add_argument("--n", type=int, default=200, help="demo images / items to time")
    parser.add_argument(
        "--max-objects",
        type=int,
        default=8,
        help="demo objects per image at most (16 gives about the contest's 8 annotations per image)",
    )
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a DataLoader worker uses 1)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="bench_dataset.") as tmp:
        tmp_path = Path(tmp)
        if args.data_dir:
            data_dir = Path(args.data_dir)
        else:
            log.info("rendering %d demo images of %dx%d ...", args.n, args.size, args.size)
            data_dir = make_demo(tmp_path, args.size, args.n, args.max_objects)
        coco = load_coco(data_dir, args.ann_file)
        ids = coco.image_ids[: args.n]
        cache = MaskCache(coco, tmp_path / "masks")
        t0 = time.perf_counter()
        cache.build(ids, progress=False)
        build_s = time.perf_counter() - t0
        ours = SegmentationDataset(coco, ids, transform=build_transform("none", None), cache=cache)
        base = BaselineDataset(data_dir, coco.path, ids)

        same = 0
        for i in range(len(ids)):
            _, m_ours, _ = ours[i]
            _, m_base, _ = base[i]
            same += bool(torch.equal(m_ours, m_base))
        n_anns = sum(len(coco.annotations(i)) for i in ids)
        h, w = int(coco.image(ids[0])["height"]), int(coco.image(ids[0])["width"])
        log.info(
            "%d items (%dx%d, %.1f annotations per image); mask cache built before timing in %.2f s; "
            "masks identical: %d/%d; warm-up %d items; median of %d passes; torch threads %d",
            len(ids),
            h,
            w,
            n_anns / max(len(ids), 1),
            build_s,
            same,
            len(ids),
            args.warmup,
            args.repeats,
            torch.get_num_threads(),
        )

        methods = {"baseline (pycocotools per item)": base.__getitem__, "ours (mask cache PNG)": ours.__getitem__}
        passes = time_methods(methods, len(ids), args.warmup, args.repeats)
        results = {name: statistics.median(p) for name, p in passes.items()}
        ref = results["baseline (pycocotools per item)"]
        rows = [("method", "items/s", "ms/item", "ratio")]
        for name, sec in results.items():
            rows.append((name, f"{len(ids) / sec:.1f}", f"{1000 * sec / len(ids):.2f}", f"{ref / sec:.2f}x"))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = [
            "  ".join(v.ljust(wd) if i == 0 else v.rjust(wd) for i, (v, wd) in enumerate(zip(r, widths, strict=False)))
            for r in rows
        ]
        lines.insert(1, "  ".join("-" * wd for wd in widths))
        print("\n".join(lines))
        save(
            "bench_dataset",
            [Goal("ours items/s / baseline items/s", ref / results["ours (mask cache PNG)"], ">=", 5)],
            settings=dict(
                items=len(ids),
                size=[h, w],
                annotations_per_image=n_anns / max(len(ids), 1),
                threads=torch.get_num_threads(),
                data_dir=args.data_dir or "demo (temporary)",
            ),
            seconds_per_pass=results,
        )
    return 0 if same == len(ids) else 1


if __name__ == "__main__":
    raise SystemExit(main())
