"""Where training and inference run: device, mixed precision, processes, loader workers.

``configure_runtime`` applies the settings a GPU user expects (cuDNN autotuning for fixed
input sizes, TF32 matrix products); each is a no-op on a CPU.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist
import torch.nn as nn

from pipeline.core.errors import PipelineError

log = logging.getLogger(__name__)

AMP_MODES = ("auto", "bf16", "fp16", "off")


def resolve_device(name: str) -> torch.device:
    """``auto``: the process's CUDA device when there is one (``LOCAL_RANK`` under torchrun), else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PipelineError(f"device={name} requested but CUDA is not available")
    return dev


def cpu_bf16_native() -> bool:
    """Whether this CPU computes bfloat16 convolutions and matrix products natively (AVX512-BF16
    or AMX through oneDNN). Elsewhere bf16 autocast is emulated and slower than float32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


# the first CUDA compute capability that computes bfloat16 natively (Ampere: A100, RTX 30); below it (T4,
# V100, P100) torch.cuda.is_bf16_supported() still answers True through emulation, without tensor cores
NATIVE_BF16_CAPABILITY = (8, 0)
PRECISIONS = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def cuda_bf16_native(device: torch.device) -> bool:
    """Whether the GPU computes bfloat16 natively (compute capability 8.0 or newer)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return tuple(torch.cuda.get_device_capability(index)) >= NATIVE_BF16_CAPABILITY


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype of ``mode`` on ``device``; None means full precision.

    CUDA: ``auto`` is bf16 where the GPU computes it natively (compute capability 8.0 or newer: A100,
    H100, RTX 30/40), else fp16 with the gradient scaler (T4, V100, P100: their tensor cores compute
    fp16, and bf16 would run emulated). CPU: ``auto`` and ``bf16`` are bf16 on a CPU with native bf16,
    full precision elsewhere; fp16 is never used on a CPU."""
    if mode not in AMP_MODES:
        raise PipelineError(f"amp: unknown {mode!r}; known: {', '.join(AMP_MODES)}")
    if mode == "off":
        return None
    if device.type == "cpu":
        return torch.bfloat16 if mode in ("auto", "bf16") and cpu_bf16_native() else None
    if device.type != "cuda":
        return None
    if mode == "bf16" or (mode == "auto" and cuda_bf16_native(device)):
        return torch.bfloat16
    return torch.float16


def wants_grad_scaler(dtype: torch.dtype | None) -> bool:
    """fp16 gradients underflow without loss scaling; bf16 and fp32 need none."""
    return dtype == torch.float16


def precision_name(dtype: torch.dtype | None) -> str:
    """What a run records of its precision: ``bf16``, ``fp16 with the gradient scaler`` or ``fp32``."""
    return PRECISIONS[dtype] + (" with the gradient scaler" if wants_grad_scaler(dtype) else "")


def channels_last_pays(device: torch.device) -> bool:
    """Whether convolutions run faster with channels_last (NHWC) memory on ``device``: on CUDA (tensor
    cores) and on a CPU (oneDNN); the measurements are in docs/measurements.md (Speed, channels_last)."""
    return device.type in ("cuda", "cpu")


def default_workers(device: torch.device) -> int:
    """Loader processes when ``num_workers`` is unset: on a GPU the CPU only feeds it; on a CPU
    the workers compete with the model's own threads (docs/measurements.md, Speed: loader workers on a
    2-core CPU)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device.type == "cuda":
        return max(0, min(8, cpus - 1))
    return max(0, min(4, cpus // 2 - 1))


def loader_options(device: torch.device, workers: int, prefetch_factor: int = 2) -> dict:
    """DataLoader keyword arguments: persistent workers with prefetch when there are workers,
    pinned memory on CUDA."""
    opts: dict = {"num_workers": workers, "pin_memory": device.type == "cuda"}
    if workers > 0:
        opts.update(persistent_workers=True, prefetch_factor=prefetch_factor)
    return opts


def configure_runtime(
    device: torch.device, *, cudnn_benchmark: bool = True, tf32: bool = True, threads: int | None = None
) -> dict[str, bool]:
    """Process-wide speed settings; returns what was switched on (for the log)."""
    if threads:
        torch.set_num_threads(threads)
    applied = {"cudnn_benchmark": False, "tf32": False}
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = bool(cudnn_benchmark)  # inputs have one fixed size
        torch.backends.cuda.matmul.allow_tf32 = bool(tf32)
        torch.backends.cudnn.allow_tf32 = bool(tf32)
        applied = {"cudnn_benchmark": bool(cudnn_benchmark), "tf32": bool(tf32)}
    return applied


def maybe_compile(model: nn.Module, enabled: bool) -> nn.Module:
    """``torch.compile(model)`` when ``enabled`` (the returned module shares the parameters)."""
    if not enabled:
        return model
    log.info("compiling the model with torch.compile (the first steps are slower)")
    return torch.compile(model)


class Dist:
    """Process-group facts; a single process when not launched by torchrun."""

    def __init__(self, device: torch.device):
        self.enabled = int(os.environ.get("WORLD_SIZE", "1")) > 1
        if self.enabled and not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend=backend)
        self.rank = dist.get_rank() if self.enabled else 0
        self.world = dist.get_world_size() if self.enabled else 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def sync_buffers(self, module: nn.Module) -> None:
        """Give every rank rank 0's buffers (BatchNorm running statistics) before evaluation."""
        if self.enabled:
            for buf in module.buffers():
                dist.broadcast(buf.data, 0)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """DistributedDataParallel around ``model`` when there are several processes."""
        if not self.enabled:
            return model
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
