"""What the training loop and the hooks see of a trainer: two small Protocols, so that they depend on
a contract rather than on :class:`pipeline.engine.trainer.Trainer` (which imports them)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from pipeline.core.layout import RunFolder
    from pipeline.engine.runtime import Dist
    from pipeline.engine.sizes import SizeSchedule
    from pipeline.engine.train_config import TrainConfig


class HookView(Protocol):
    """A trainer as its hooks see it: the run's settings and state, and the few things they may do
    (stop it, move its last epoch, evaluate a model, take a checkpoint's state)."""

    cfg: TrainConfig
    model: torch.nn.Module
    history: list[dict[str, Any]]
    best_epoch: int
    stop: bool
    end_epoch: int
    sizes: SizeSchedule
    dist: Dist
    device: torch.device
    train_loader: Any
    batches: int
    folder: RunFolder

    def resize(self, end_epoch: int) -> None: ...

    def evaluate_model(self, model: torch.nn.Module) -> dict[str, Any]: ...

    def checkpoint_state(self, epoch: int) -> dict[str, Any]: ...


class LoopView(Protocol):
    """A trainer as the training loop sees it: what one step needs (model, loss, optimizer, scaler,
    precision, memory format, the micro-batch it may halve) and what one epoch goes through."""

    cfg: TrainConfig
    device: torch.device
    dtype: torch.dtype | None
    net: torch.nn.Module  # the model as it runs (wrapped for several processes)
    model: torch.nn.Module
    criterion: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    hooks: list[Any]
    micro_batch: int | None
    channels_last: bool
    dist: Dist
    sampler: Any
    train_loader: Any
    batches: int
    folder: RunFolder
    show_progress: bool

    def input_size(self, epoch: int) -> tuple[int, int]: ...
