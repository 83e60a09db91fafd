"""Training loader throughput per loader process: today's decoding path against the image cache.

``decode``   ``SegmentationDataset`` as training ran it before the cache: read the JPEG (cv2), the
             ground-truth map from the built mask cache (PNG), ``Resize`` to the training size and the
             ``light`` augmentation, normalise to float32 3xHxW on the CPU.
``cache``    ``CachedTrainingImages``: the image and its map from the memory-mapped image cache (built
             before timing), the same transform (its ``Resize`` leaves the rows as they are), returned
             as uint8; the normalisation happens on the GPU after the copy (``DeviceBatches``).
``cache + normalise on the CPU``  the ``cache`` loader with ``DeviceBatches`` on the CPU: what the
             normalisation costs where the device is the CPU itself.

Every method draws the same items with the same per-item seeds through a one-process ``DataLoader``
(batch 8, the pipeline's collate), as a loader worker does, with one torch thread; the timed passes are
interleaved between the methods and the median pass is reported.  Before timing, the normalised
inputs of ``cache`` are compared with ``decode``'s item by item (they must be equal).  The demo's
512x512 JPEGs always run; ``--data-dir`` adds datasets in the contest layout (each at its own
training size, the most common image size rounded up to 32), all in one run.

    python benchmarks/bench_loader.py [--data-dir ../shared/datasets/ccp] [--n 96] [--repeats 3]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from bench_dataset import make_demo
from results import Goal, save
from torch.utils.data import DataLoader

from pipeline.data import MaskCache, SegmentationDataset, build_transform, collate, image_size_from_data, load_coco
from pipeline.data.image_cache import CachedTrainingImages, DeviceBatches, ImageCache, normalize_batch
from pipeline.engine.sampling import EpochSeededDataset

log = logging.getLogger("bench_loader")
BATCH = 8


def loader(dataset, n: int) -> DataLoader:
    keys = [(0, i) for i in range(n)]
    return DataLoader(EpochSeededDataset(dataset, seed=0), batch_size=BATCH, sampler=keys, collate_fn=collate)


def one_pass(batches) -> float:
    t0 = time.perf_counter()
    for _ in batches:
        pass
    return time.perf_counter() - t0


def measure(data_dir: Path, n: int, repeats: int, work: Path, label: str) -> dict:
    coco = load_coco(data_dir, "train_all.json")
    ids = coco.image_ids[:n]
    size = image_size_from_data(coco)
    masks = MaskCache(coco, work / "masks")
    masks.build(ids, progress=False)
    t0 = time.perf_counter()
    cache = ImageCache(coco, size, work / "images", masks).build(progress=False)
    build_s = time.perf_counter() - t0
    transform = build_transform("light", size)
    decode = SegmentationDataset(coco, ids, transform, masks)
    cached = CachedTrainingImages(cache, ids, transform)

    same = 0
    for (x_ref, m_ref, _), (x_u8, m_u8, _) in zip(loader(decode, len(ids)), loader(cached, len(ids)), strict=True):
        same += int(torch.equal(x_ref, normalize_batch(x_u8)) and torch.equal(m_ref, m_u8.long())) * len(x_ref)
    methods = {
        "decode": lambda: loader(decode, len(ids)),
        "cache": lambda: loader(cached, len(ids)),
        "cache + normalise on the CPU": lambda: DeviceBatches(
            loader(cached, len(ids)), torch.device("cpu"), decode.preprocessing
        ),
    }
    one_pass(methods["decode"]())  # warm the page cache and the imports alike for every method
    one_pass(methods["cache"]())
    passes: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, make in methods.items():
            passes[name].append(one_pass(make()))
    seconds = {name: statistics.median(p) for name, p in passes.items()}
    log.info(
        "%s: %d images at %dx%d; image cache built in %.1f s (%.0f MB); cached inputs equal: %d/%d",
        label,
        len(ids),
        size[0],
        size[1],
        build_s,
        cache.nbytes / 1e6,
        same,
        len(ids),
    )
    return {"label": label, "n": len(ids), "size": list(size), "seconds": seconds, "same": same, "build_s": build_s}


def table(results: list[dict]) -> str:
    rows = [("data", "size", "method", "images/s", "ms/image", "vs decode")]
    for r in results:
        ref = r["seconds"]["decode"]
        for name, sec in r["seconds"].items():
            size = f"{r['size'][0]}x{r['size'][1]}"
            rows.append(
                (r["label"], size, name, f"{r['n'] / sec:.1f}", f"{1000 * sec / r['n']:.2f}", f"{ref / sec:.2f}x")
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(v.ljust(w) if i < 3 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths, strict=True)))
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", action="append", default=[], help="a dataset to add (contest layout)")
    parser.add_argument("--size", type=int, default=512, help="the demo images' side")
    parser.add_argument("--n", type=int, default=96, help="images per dataset")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench_loader.") as tmp:
        work = Path(tmp)
        log.info("rendering %d demo images of %dx%d ...", args.n, args.size, args.size)
        datasets = [(make_demo(work, args.size, args.n, 16), f"demo {args.size}")]
        datasets += [(Path(d), Path(d).name) for d in args.data_dir]
        results = [measure(d, args.n, args.repeats, work / f"cache{i}", label) for i, (d, label) in enumerate(datasets)]
    print(table(results))
    demo = results[0]["seconds"]
    goals = [Goal(f"{results[0]['label']}: cache images/s / decode images/s", demo["decode"] / demo["cache"], ">=", 2)]
    goals += [
        Goal(f"{r['label']}: cache / decode", r["seconds"]["decode"] / r["seconds"]["cache"], "report", 0)
        for r in results[1:]
    ]
    save(
        "bench_loader",
        goals,
        settings=dict(images=args.n, repeats=args.repeats, batch=BATCH, threads=1, augment="light"),
        results=results,
    )
    return 0 if all(r["same"] == r["n"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
