"""The throughput probe: seconds per training step and per predicted image of candidate recipes
on this device, measured on random tensors of the recipe's size (a few steps after a warm-up)."""

from __future__ import annotations

import logging
import statistics
import time

import torch

from pipeline.engine.runtime import amp_dtype, channels_last_pays
from pipeline.inference.tta import scaled_size
from pipeline.models import build_model, param_groups
from pipeline.planning.costs import LOOP_OVERHEAD_FACTOR, PROBE_STEPS, Recipe, Throughput

log = logging.getLogger(__name__)


def _time(fn, repeats: int) -> float:
    fn()  # warm-up (allocations, kernels)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def probe(
    recipe: Recipe,
    num_classes: int,
    device: torch.device,
    amp: str = "auto",
    repeats: int = PROBE_STEPS - 1,
    options: dict | None = None,
    low_scale: float | None = None,
) -> Throughput:
    """Measure ``recipe`` on ``device``: a forward/backward/AdamW step and a batched forward.
    ``options``: the family builder's options the run will train with (a lighter decoder);
    ``low_scale``: also time a step at that share of the size (the progressive-resizing phase).
    Each figure is the median of ``repeats`` timings: on a shared CPU three were not enough (the demo's
    probe timed Lite2 faster than Lite0 at the same size in two runs of four)."""
    torch.manual_seed(0)
    model = build_model(recipe.model, num_classes, encoder=recipe.encoder, encoder_weights=None, **(options or {}))
    model = model.to(device)
    last = channels_last_pays(device)  # as the trainer and the predict stage run it
    if last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(param_groups(model, 1e-4, 1e-4, 1e-4))
    dtype = amp_dtype(amp, device)
    x, y = _batch(recipe.batch, recipe.size, num_classes, device, last)

    def step(x=x, y=y) -> None:
        model.train()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(x).contiguous(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    @torch.no_grad()
    def infer() -> None:
        model.eval()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    step_s = _time(step, repeats) * LOOP_OVERHEAD_FACTOR
    checkpoint_mb = checkpoint_bytes(model) / 1e6
    image_s = _time(infer, repeats) / recipe.batch
    log.info(
        "probe %s, batch %d: %.3f s per step, %.4f s per predicted image", recipe.name, recipe.batch, step_s, image_s
    )
    low_step_s = 0.0
    if low_scale is not None and low_scale < 1:
        size = scaled_size(recipe.size, low_scale, int(getattr(model, "input_divisor", 1)))
        small = _batch(recipe.batch, size, num_classes, device, last)
        low_step_s = _time(lambda: step(*small), repeats) * LOOP_OVERHEAD_FACTOR
        log.info("probe %s at %dx%d (progressive resizing): %.3f s per step", recipe.name, *size, low_step_s)
    return Throughput(recipe, step_s, image_s, checkpoint_mb, low_step_s)


def _batch(n: int, size, num_classes: int, device: torch.device, channels_last: bool):
    x = torch.randn(n, 3, *size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, num_classes, (n, *size), device=device)


def checkpoint_bytes(model: torch.nn.Module) -> int:
    """About the size of one checkpoint of ``model``: its weights and buffers, and AdamW's two
    moments of every trainable weight (held in float32 whatever the training precision)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    moments = sum(2 * p.numel() * 4 for p in model.parameters() if p.requires_grad)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return weights + moments + buffers
