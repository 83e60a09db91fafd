"""Training-step throughput: ``pipeline.train`` against the same model's bare loop.

``pipeline.train`` here means the real thing: the dataset reading JPEGs and cached masks,
augmentation, the DataLoader, the loss, AdamW, the scheduler, gradient clipping and the
per-step bookkeeping; its per-epoch training time is read from the run's ``timing.csv``
(validation is timed apart and left out).  The bare loop runs forward + backward +
AdamW step on random tensors of the same batch and size.  Both are timed side by side
in this process; epoch 0 of the pipeline and the first steps of the bare loop are
warm-up and not counted.  Goal: pipeline / bare >= 0.9.

The bare loop computes in the precision the pipeline picks (``amp=auto``: bf16 on CUDA and
on a CPU with native bf16).  A second table compares autocast modes with fp32 on the bare
loop, each also in channels_last memory: bf16 on such a CPU; bf16/fp16 with ``--device cuda``.

    python benchmarks/bench_train.py [--size 256] [--batch 8] [--batches 12] [--workers 1]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch
from results import Goal, save

from pipeline import folds as folds_stage
from pipeline.core.config import build_config
from pipeline.demo import DemoConfig
from pipeline.demo import run as make_demo
from pipeline.engine.runtime import amp_dtype, channels_last_pays, cpu_bf16_native
from pipeline.models import build_model, param_groups
from pipeline.models.losses import build_loss
from pipeline.train import TrainConfig
from pipeline.train import run as train


def pipeline_step(cfg: TrainConfig, batches: int) -> float:
    """Seconds per training step of ``pipeline.train`` (epoch 0 is warm-up and not counted)."""
    result = train(cfg)
    timing = pd.read_csv(result.run_dir / "timing.csv")
    return float(timing["train_s"].iloc[1:].median()) / batches


def bare_loop(
    args, num_classes: int, device: torch.device, amp: torch.dtype | None = None, channels_last: bool = False
) -> float:
    """Seconds per step of forward + backward + AdamW on random tensors (median over steps)."""
    torch.manual_seed(0)
    model = build_model(args.model, num_classes=num_classes, encoder=args.encoder, encoder_weights=None).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(param_groups(model, 1e-3, 1e-3, 1e-4))
    crit = build_loss("ce", num_classes).to(device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    y = torch.randint(0, num_classes, (args.batch, args.size, args.size), device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    model.train()
    times = []
    for i in range(args.batches + 3):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            out = model(x)
            loss = crit(out.contiguous() if channels_last else out, y)  # as pipeline.engine.loop does
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        loss.item()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="unet")
    p.add_argument("--encoder", default="resnet18")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--batches", type=int, default=12, help="timed steps per epoch")
    p.add_argument("--epochs", type=int, default=3, help="pipeline epochs (the first is warm-up)")
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: the pipeline's own choice)")
    p.add_argument("--augment", default="light")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n = args.batch * args.batches * 2
        data = make_demo(DemoConfig(out_dir=str(tmp / "data"), n_train=n, n_test=1, height=args.size, width=args.size))
        folds_stage.run(folds_stage.FoldsConfig(data_dir=str(data), out_dir=str(tmp / "folds"), k=2, pixel_stats=False))
        cfg = build_config(
            TrainConfig,
            overrides=dict(
                data_dir=str(data),
                folds_file=str(tmp / "folds" / "folds.csv"),
                runs_dir=str(tmp / "runs"),
                cache_dir=str(tmp / "cache"),
                model=args.model,
                encoder=args.encoder,
                encoder_weights=None,
                epochs=args.epochs,
                batch_size=args.batch,
                max_train_batches=args.batches,
                max_val_batches=1,
                augment=args.augment,
                num_workers=args.workers,
                device=args.device,
                save_oof=False,
                plot=False,
                progress=False,
                experiment="bench",
                img_size=[args.size],
            ),
        )
        pipe_step = pipeline_step(cfg, args.batches)
        # the same run in NCHW memory, side by side: what channels_last is worth in the real loop
        nchw_step = pipeline_step(replace(cfg, channels_last=False, experiment="bench-nchw"), args.batches)
        dtype = amp_dtype(cfg.amp, device)
        cl = channels_last_pays(device)
        bare_step = bare_loop(args, 11, device, dtype, cl)

    memory = "channels_last" if cl else "NCHW"
    rows = [
        (f"bare forward+backward (random tensors, {memory})", bare_step, 1.0),
        (f"pipeline.train (loader, augment, loss, optimizer, bookkeeping; {memory})", pipe_step, bare_step / pipe_step),
        ("pipeline.train, channels_last=false", nchw_step, bare_step / nchw_step),
    ]
    print(
        f"\n{args.model}-{args.encoder}, batch {args.batch}, {args.size}x{args.size}, device {args.device}, "
        f"torch threads {torch.get_num_threads()}, loader workers "
        f"{args.workers if args.workers is not None else 'auto'}, augment {args.augment}, "
        f"autocast {str(dtype).replace('torch.', '') if dtype else 'off'}"
    )
    print(f"{'method':80s} {'ms/step':>9s} {'img/s':>8s} {'throughput vs bare':>19s}")
    for name, step, ratio in rows:
        print(f"{name:80s} {step * 1000:9.1f} {args.batch / step:8.1f} {ratio:19.3f}")
    amp_rows = {}

    modes = []
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
        modes = [
            ("fp32", None, False),
            ("fp32 + channels_last", None, True),
            ("bf16", torch.bfloat16, False),
            ("bf16 + channels_last", torch.bfloat16, True),
            ("fp16 + channels_last", torch.float16, True),
        ]
    elif cpu_bf16_native():
        where = f"this CPU ({torch.backends.cpu.get_cpu_capability()}, native bf16)"
        modes = [
            ("fp32", None, False),
            ("fp32 + channels_last", None, True),
            ("bf16", torch.bfloat16, False),
            ("bf16 + channels_last", torch.bfloat16, True),
        ]
    if modes:
        print(f"\nmixed precision on {where} (bare loop, same batch and size)")
        measured = {(dtype, cl): bare_step}  # the pipeline's own precision and memory are timed above
        print(f"{'mode':40s} {'ms/step':>9s} {'speed-up':>9s}")
        for name, amp, cl in modes:
            if (amp, cl) not in measured:
                measured[(amp, cl)] = bare_loop(args, 11, device, amp, cl)
            t, fp32 = measured[(amp, cl)], measured[(None, False)]
            print(f"{name:40s} {t * 1000:9.1f} {fp32 / t:9.2f}")
            amp_rows[name] = t
    save(
        "bench_train",
        [Goal("pipeline.train throughput / bare forward+backward", bare_step / pipe_step, ">=", 0.9)],
        device=str(device),
        settings=dict(
            model=f"{args.model}-{args.encoder}",
            batch=args.batch,
            size=args.size,
            workers=args.workers,
            augment=args.augment,
            threads=torch.get_num_threads(),
            autocast=str(dtype).replace("torch.", "") if dtype else "off",
        ),
        seconds_per_step={name: step for name, step, _ in rows},
        mixed_precision_seconds_per_step=amp_rows,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
