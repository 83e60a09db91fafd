"""Benchmark: cost of TTA sets through ``TTAModel`` against no TTA, on the same model and inputs.

Every set runs the same random batch through ``TTAModel(model, set)`` under
``torch.inference_mode``; one warm-up call per set is excluded and the median of
``--repeats`` timed calls is reported (the sets are timed in turns, one call each per
round).  ``--max-batch auto`` caps the images per forward call as ``pipeline.predict`` does
(one view of the batch at a time on a CPU, all views at once on a GPU); with a cap, ``d4``
is also timed with all 8 views in one call.  Goal: ``d4`` (8 views) at most 8.5x ``none``.

    .venv/bin/python benchmarks/bench_tta.py [--model unet] [--encoder resnet18] [--size 256 256]
        [--batch 4] [--classes 11] [--device cpu|cuda|auto] [--amp off|fp16|bf16] [--repeats 5]
        [--sets none flip d4 ms] [--max-batch auto|none|N] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from pipeline.engine.runtime import amp_dtype, resolve_device
from pipeline.inference.tta import TTAModel, auto_max_batch
from pipeline.models import build_model


def time_interleaved(
    fns: dict[str, Callable[[], object]], device: torch.device, repeats: int, warmup: int = 1
) -> dict[str, float]:
    """Median wall time in milliseconds of each function, warm-up calls excluded.

    The functions are timed in turns (one call each per round), so a slow phase of the
    machine affects every set alike instead of one set.
    """

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync()
    results: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync()
            results[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(v) for name, v in results.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="unet")
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--size", nargs=2, type=int, default=(256, 256), metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--classes", type=int, default=11)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 or auto")
    parser.add_argument("--amp", choices=("off", "auto", "fp16", "bf16"), default="off")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sets", nargs="+", default=["none", "flip", "d4", "ms"])
    parser.add_argument("--scales", nargs="+", type=float, default=[0.75, 1.0, 1.25])
    parser.add_argument(
        "--max-batch",
        default="auto",
        help="images per forward call: auto (as pipeline.predict: one view of the batch at a time on "
        "a CPU, all views at once on a GPU), none (all views at once) or a number",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = amp_dtype(args.amp, device)
    torch.manual_seed(args.seed)
    model = (
        build_model(args.model, num_classes=args.classes, encoder=args.encoder, encoder_weights=None).to(device).eval()
    )
    x = torch.randn(args.batch, 3, *args.size, device=device)
    sets = ["none"] + [s for s in args.sets if s != "none"]

    if args.max_batch == "auto":
        max_batch = auto_max_batch(device, args.batch)
    else:
        max_batch = None if args.max_batch == "none" else int(args.max_batch)
    variants = [(name, max_batch) for name in sets]
    if max_batch is not None and "d4" in sets:
        variants.append(("d4", None))  # the same views in one call, for comparison

    def label(name: str, mb: int | None) -> str:
        return name if mb == max_batch else f"{name} [max_batch={mb or 'all'}]"

    models = {
        label(name, mb): TTAModel(model, name, scales=args.scales, max_batch=mb, dtype=dtype).eval()
        for name, mb in variants
    }
    with torch.inference_mode():
        times = time_interleaved({key: (lambda m=m: m(x)) for key, m in models.items()}, device, args.repeats)
    rows = [(key, len(m.views), times[key]) for key, m in models.items()]

    amp = str(dtype).replace("torch.", "") if dtype is not None else "off"
    print(
        f"{args.model}-{args.encoder}, batch {args.batch}, {args.size[0]}x{args.size[1]}, {args.classes} classes, "
        f"device {device}, amp {amp}, threads {torch.get_num_threads()}, max_batch {max_batch or 'all'}; "
        f"median of {args.repeats} interleaved rounds (warm-up excluded)"
    )
    width = max(10, *(len(r[0]) for r in rows))
    print(f"{'set':<{width}} {'views':>5} {'ms/batch':>10} {'vs none':>8} {'per view':>9}")
    base = rows[0][2]
    for name, views, ms in rows:
        print(f"{name:<{width}} {views:>5} {ms:>10.1f} {ms / base:>7.2f}x {ms / base / views:>8.2f}x")
    print("(vs none = time of the set / time without TTA; per view = that ratio / number of views)")
    d4 = [r for r in rows if r[0] == "d4"]
    if d4:
        ratio = d4[0][2] / base
        print(f"d4 goal <= 8.5x none: {'met' if ratio <= 8.5 else 'NOT met'} ({ratio:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
