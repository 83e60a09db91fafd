"""The two loops of training: one epoch of optimizer steps, and an evaluation pass."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from pipeline.core.errors import PipelineError
from pipeline.evaluation.metrics import confusion_matrix_torch
from pipeline.models.contract import model_loss, predict_probabilities

if TYPE_CHECKING:
    from pipeline.engine.view import LoopView

log = logging.getLogger(__name__)

LOSS_CHECK_EVERY = 20  # batches between checks of the running loss


class LossCheck:
    """The running mean loss of an epoch, read every ``LOSS_CHECK_EVERY`` batches without making the loop wait
    for the GPU.

    On CUDA each read starts a copy of the sum to pinned host memory behind the queued work and returns the
    copy started at the previous read, ``LOSS_CHECK_EVERY`` batches earlier and long finished (its event is
    waited for, which costs nothing then).  A blocking ``.item()`` instead drains the GPU's queue, and the
    loop's lead over the GPU is lost at every check (docs/measurements.md, Speed: the loss check).  Elsewhere
    (CPU) a read is the value itself.  A non-finite loss is thus seen at most ``LOSS_CHECK_EVERY`` batches
    late, and at the epoch's end in any case.
    """

    def __init__(self, device: torch.device, delayed: bool | None = None) -> None:
        self.cuda = device.type == "cuda"
        self.delayed = self.cuda if delayed is None else delayed
        self.pending: tuple[torch.Tensor, int, int, torch.cuda.Event | None] | None = None

    def read(self, loss_sum: torch.Tensor, seen: int, batch: int) -> tuple[float, int] | None:
        """(mean loss, the batch it was read at), or None at the first delayed read."""
        if not self.delayed:
            return loss_sum.item() / seen, batch
        host = torch.empty((), dtype=loss_sum.dtype, pin_memory=self.cuda)
        host.copy_(loss_sum.detach(), non_blocking=self.cuda)
        event = None
        if self.cuda:
            event = torch.cuda.Event()
            event.record()
        previous, self.pending = self.pending, (host, seen, batch, event)
        if previous is None:
            return None
        value, n, at, done = previous
        if done is not None:
            done.synchronize()
        return float(value) / n, at


def _non_finite(value: float, epoch: int, batch: int, last: str) -> PipelineError:
    return PipelineError(
        f"non-finite loss ({value}) at epoch {epoch}, batch {batch}: training stopped; the last good checkpoint "
        f"is {last} (lower lr=, set grad_clip=, or amp=off)"
    )


def _optimizer_step(t: LoopView) -> None:
    if t.cfg.grad_clip:
        t.scaler.unscale_(t.optimizer)
        torch.nn.utils.clip_grad_norm_(t.model.parameters(), t.cfg.grad_clip)
    t.scaler.step(t.optimizer)
    t.scaler.update()
    t.optimizer.zero_grad(set_to_none=True)
    t.scheduler.step()
    for hook in t.hooks:
        hook.on_step_end(t)


def _forward_backward(t: LoopView, images: torch.Tensor, masks: Any, weight: float) -> torch.Tensor:
    with torch.autocast(t.device.type, dtype=t.dtype, enabled=t.dtype is not None):
        out = t.net(images)
        if not isinstance(out, torch.Tensor):  # a family's own outputs: its own loss, as it computes it
            loss = model_loss(t.model, out, masks, t.criterion)
    if isinstance(out, torch.Tensor):  # logits: the loss in fp32 whatever the autocast dtype
        out = out.float()
        if t.channels_last:
            out = out.contiguous()  # the losses' softmax over dim 1 is faster on NCHW logits
        loss = model_loss(t.model, out, masks, t.criterion)
    t.scaler.scale(loss * (weight / t.cfg.accum_steps)).backward()
    return loss.detach()


# PyTorch's CUDA kernels index with 32 bits in places and refuse a tensor of 2**31 elements or more (a large
# batch at a large size, while memory is left: docs/measurements.md, Speed: the index limit)
INDEX_LIMIT_MARKS = ("INT_MAX", "32-bit index", "canUse32BitIndexMath")
# an allocator's failure that reaches Python as a plain RuntimeError, not torch.OutOfMemoryError: the CUDA
# runtime's (``CUDA error: out of memory``), cuBLAS's workspace and cuDNN's
ALLOCATION_MARKS = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED")
OUT_OF_MEMORY = "out of memory"
INDEX_LIMIT = "a kernel's 32-bit index limit"


def too_large(exc: BaseException) -> str | None:
    """Why a batch failed that fewer images would pass: :data:`OUT_OF_MEMORY`, :data:`INDEX_LIMIT`, or None
    for any other error."""
    if isinstance(exc, torch.OutOfMemoryError):
        return OUT_OF_MEMORY
    if isinstance(exc, RuntimeError) and any(mark in str(exc) for mark in ALLOCATION_MARKS):
        return OUT_OF_MEMORY
    if isinstance(exc, RuntimeError) and any(mark in str(exc) for mark in INDEX_LIMIT_MARKS):
        return INDEX_LIMIT
    return None


def backward_batch(t: LoopView, images: torch.Tensor, masks: Any) -> torch.Tensor:
    """Forward and backward of one loader batch; returns its loss (detached).

    The batch goes through in micro-batches of ``t.micro_batch`` images (all at once while
    it is None), each loss weighted by its share of the batch, so the gradient is that of the
    whole batch.  On an out-of-memory error, or a kernel's refusal of a tensor past its 32-bit
    index limit (:func:`too_large`), the micro-batch is halved, which doubles the
    gradient accumulation and keeps the effective batch: the gradients of the current
    accumulation window are dropped (a failed backward may have left part of them) and this
    batch is done again.  At one image per micro-batch the error is raised, with advice.
    """
    n = images.shape[0]
    while True:
        size = min(t.micro_batch or n, n)
        try:
            if size >= n:
                return _forward_backward(t, images, masks, 1.0)
            total = torch.zeros((), device=images.device)
            for start in range(0, n, size):
                part = slice(start, start + size)
                share = images[part].shape[0] / n
                total += share * _forward_backward(t, images[part], masks[part], share).float()
            return total
        except RuntimeError as exc:  # torch.OutOfMemoryError is one
            why = too_large(exc)
            if why is None:
                raise
            t.optimizer.zero_grad(set_to_none=True)
            if t.device.type == "cuda":
                torch.cuda.empty_cache()
            if size <= 1:
                raise PipelineError(
                    f"{why} with one image per micro-batch at size {tuple(images.shape[-2:])}: "
                    "lower img_size=, use amp=bf16/fp16 or a smaller encoder"
                ) from exc
            t.micro_batch = (size + 1) // 2
            log.warning(
                "%s with micro-batches of %d images: now %d (gradient accumulation x%d, effective batch "
                "%d unchanged); this accumulation window's gradients were dropped",
                why,
                size,
                t.micro_batch,
                math.ceil(n / t.micro_batch) * t.cfg.accum_steps,
                n * t.cfg.accum_steps,
            )


def shrink_batch(images: torch.Tensor, masks: Any, size: tuple[int, int]) -> tuple[torch.Tensor, Any]:
    """A batch at ``size``: images area-averaged (antialiased bilinear), masks by nearest neighbour
    (instance targets resize themselves, :class:`~pipeline.data.instances.InstanceTargets`)."""
    small = torch.nn.functional.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)
    if not isinstance(masks, torch.Tensor):
        return small, masks.resized(size)
    labels = torch.nn.functional.interpolate(masks[:, None].float(), size=size, mode="nearest")[:, 0]
    return small, labels.to(masks.dtype)


def train_one_epoch(t: LoopView, epoch: int) -> tuple[float, float]:
    """``t.batches`` micro-batches with gradient accumulation; returns (mean loss over all
    processes, seconds)."""
    from tqdm import tqdm

    t.sampler.set_epoch(epoch)
    t.net.train()
    started = time.perf_counter()
    loss_sum = torch.zeros((), device=t.device, dtype=torch.float64)
    seen = 0
    check = LossCheck(t.device)
    t.optimizer.zero_grad(set_to_none=True)
    last = str(t.folder.last) if t.folder.last.exists() else "not written yet"
    bar = tqdm(t.train_loader, total=t.batches, desc=f"epoch {epoch}", leave=False, disable=not t.show_progress)
    size = t.input_size(epoch)
    for i, (images, masks, _) in enumerate(bar):
        if i >= t.batches:
            break
        images = images.to(t.device, non_blocking=True)
        masks = masks.to(t.device, non_blocking=True)
        if tuple(images.shape[-2:]) != size:
            images, masks = shrink_batch(images, masks, size)
        if t.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        last_micro = (i + 1) % t.cfg.accum_steps == 0 or i + 1 == t.batches
        skip_sync = t.dist.enabled and not last_micro
        with t.net.no_sync() if skip_sync else contextlib.nullcontext():
            loss = backward_batch(t, images, masks)
        loss_sum += loss.double()
        seen += 1
        if last_micro:
            _optimizer_step(t)
        if (i + 1) % LOSS_CHECK_EVERY == 0:
            read = check.read(loss_sum, seen, i)
            if read is not None:
                if not math.isfinite(read[0]):
                    raise _non_finite(read[0], epoch, read[1], last)
                bar.set_postfix(loss=f"{read[0]:.4f}")
    stats = t.dist.all_sum(torch.stack([loss_sum, torch.tensor(float(seen), device=t.device, dtype=torch.float64)]))
    train_loss = float(stats[0] / stats[1])
    if not math.isfinite(train_loss):
        raise _non_finite(train_loss, epoch, t.batches - 1, last)
    return train_loss, time.perf_counter() - started


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    num_classes: int,
    device: torch.device,
    dtype: torch.dtype | None,
    channels_last: bool = False,
    max_batches: int | None = None,
    progress: bool = False,
    on_probs: Callable[[torch.Tensor, dict], None] | None = None,
) -> np.ndarray:
    """Confusion matrix of ``model`` on ``loader``; predictions scored at each image's own size.

    ``on_probs(probs K x h x w, meta)`` receives every image's probabilities at the input size.
    """
    from tqdm import tqdm

    model.eval()
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    for i, (images, masks, metas) in enumerate(tqdm(loader, desc="val", leave=False, disable=not progress)):
        if max_batches is not None and i >= max_batches:
            break
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        probs = predict_probabilities(model, images, dtype)
        if isinstance(masks, torch.Tensor) and masks.shape[-2:] == probs.shape[-2:]:
            cm += confusion_matrix_torch(probs.argmax(1), masks.to(device), num_classes)
            if on_probs is not None:
                for p, meta in zip(probs, metas, strict=False):
                    on_probs(p, meta)
            continue
        for p, m, meta in zip(probs, masks, metas, strict=False):
            if on_probs is not None:
                on_probs(p, meta)
            full = torch.nn.functional.interpolate(p[None], size=tuple(m.shape), mode="bilinear", align_corners=False)[
                0
            ]
            cm += confusion_matrix_torch(full.argmax(0), m.to(device), num_classes)
    return cm.cpu().numpy()
