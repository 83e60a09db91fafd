"""Benchmark: cost of TTA sets through ``TTAModel`` against no TTA, on the same model and inputs.

Every set runs the same random batch through ``TTAModel(model, set)`` under
``torch.inference_mode``; one warm-up call per set is excluded and the median of
``--repeats`` timed calls is reported (the sets are timed in turns, one call each per
round).  ``--max-batch auto`` caps the images per forward call as ``pipeline.predict`` does
(one view of the batch at a time on a CPU, all views at once on a GPU); with a cap, ``d4``
is also timed with all 8 views in one call.  Goal: ``d4`` (8 views) at most 8.5x ``none``.

Reference: the ``ttach`` library's per-view loop (``SegmentationTTAWrapper`` with its ``d4``
transforms, one view per forward call) around the same model with a softmax on its output,
so both average probabilities; the outputs are checked to agree before timing.  Goal:
``d4`` through ``TTAModel`` at least 1.5x faster than ttach on a GPU, where the views of a
batch go through the model together; on a CPU the ratio is reported.

    .venv/bin/python benchmarks/bench_tta.py [--model unet] [--encoder resnet18] [--size 256 256]
        [--batch 4] [--classes 11] [--device cpu|cuda|auto] [--amp off|fp16|bf16] [--repeats 5]
        [--sets none flip d4 ms] [--max-batch auto|none|N] [--threads N] [--no-ttach]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from results import Goal, save

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
    parser.add_argument("--no-ttach", action="store_true", help="leave out the ttach reference")
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
    fns = {key: (lambda m=m: m(x)) for key, m in models.items()}
    views = {key: len(m.views) for key, m in models.items()}
    reference = None if args.no_ttach or "d4" not in sets else ttach_d4(model, dtype)
    if reference is not None:
        with torch.inference_mode():
            ours, theirs = models["d4"](x), reference(x)
        diff = float((ours.float() - theirs.float()).abs().max())
        if diff > (1e-4 if dtype is None else 2e-2):
            raise SystemExit(f"TTAModel d4 and ttach d4 disagree (max |difference| {diff:.2e})")
        fns["d4 (ttach, per-view loop)"] = lambda: reference(x)
        views["d4 (ttach, per-view loop)"] = 8
    with torch.inference_mode():
        times = time_interleaved(fns, device, args.repeats)
    rows = [(key, views[key], times[key]) for key in fns]

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
    goals = []
    if "d4" in times:
        goals.append(Goal("d4 time / none time", times["d4"] / base, "<=", 8.5))
        if reference is not None:
            goals.append(
                Goal(
                    "ttach d4 time / TTAModel d4 time",
                    times["d4 (ttach, per-view loop)"] / times["d4"],
                    ">=",
                    1.5,
                    applies_on="cuda",
                )
            )
    save(
        "bench_tta",
        goals,
        device=str(device),
        settings=dict(
            model=f"{args.model}-{args.encoder}",
            batch=args.batch,
            size=list(args.size),
            classes=args.classes,
            amp=amp,
            threads=torch.get_num_threads(),
            max_batch=max_batch,
        ),
        ms_per_batch={name: ms for name, _, ms in rows},
    )
    return 0


def ttach_d4(model: torch.nn.Module, dtype: torch.dtype | None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """ttach's d4 loop around ``model`` with a softmax on its output (None when ttach is missing)."""
    try:
        import ttach
    except ImportError:
        print("ttach is not installed: its reference row is left out (pip install ttach)")
        return None

    class Softmax(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
                return self.inner(x).float().softmax(1)

    return ttach.SegmentationTTAWrapper(Softmax(model).eval(), ttach.aliases.d4_transform(), merge_mode="mean")


if __name__ == "__main__":
    raise SystemExit(main())
