"""Weight averaging: the mean of several weight sets (top-k checkpoints) and stochastic weight
averaging over the last epochs, with BatchNorm statistics recomputed on training images (the
running statistics of averaged weights are not the average of the running statistics)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_write_bytes
from pipeline.engine.checkpoint import serialize
from pipeline.engine.hooks import Hook

if TYPE_CHECKING:
    from pipeline.engine.view import HookView

log = logging.getLogger(__name__)


def average_states(states: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Element-wise mean of floating-point tensors; integer tensors (counters) from the first state."""
    if not states:
        raise PipelineError("nothing to average")
    keys = list(states[0])
    for i, s in enumerate(states[1:], 1):
        if list(s) != keys:
            raise PipelineError(f"weight set {i} has other tensors than the first ({sorted(set(s) ^ set(keys))[:5]})")
    out = {}
    for k in keys:
        t = states[0][k]
        out[k] = torch.stack([s[k].float() for s in states]).mean(0).to(t.dtype) if t.is_floating_point() else t.clone()
    return out


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def recompute_bn(model: nn.Module, loader, device: torch.device, max_batches: int | None = None) -> int:
    """Recompute every BatchNorm's running statistics as the plain mean over the batches of ``loader``
    (``(images, ...)`` tuples); returns the number of batches used.

    A BatchNorm is reset when the first batch reaches it: one that the training-mode forward never
    runs (the heads of a family that runs them in its loss, as Mask R-CNN's RoI heads) keeps its
    statistics."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    momenta = {m: m.momentum for m in norms}
    reached: set[int] = set()

    def reset_on_first_call(module: nn.Module, args: Any) -> None:
        if id(module) not in reached:
            reached.add(id(module))
            module.reset_running_stats()
            module.momentum = None  # cumulative average

    handles = [m.register_forward_pre_hook(reset_on_first_call) for m in norms]
    was_training = model.training
    model.train()
    n = 0
    try:
        for n, batch in enumerate(loader, 1):
            if max_batches is not None and n > max_batches:
                n -= 1
                break
            model(batch[0].to(device))
    finally:
        for handle in handles:
            handle.remove()
        for m, momentum in momenta.items():
            m.momentum = momentum
        model.train(was_training)
    return n


class SWAHook(Hook):
    """Averages the weights after each of the last ``epochs`` epochs; at the end recomputes the
    BatchNorm statistics on the training images, validates the average and writes ``swa.pt``
    (a checkpoint the predict stage takes with ``checkpoint=swa``)."""

    state_key = "swa"

    def __init__(self, model: nn.Module, epochs: int):
        from torch.optim.swa_utils import AveragedModel

        self.epochs = epochs
        self.swa = AveragedModel(model, use_buffers=False)

    def on_epoch_end(self, trainer: HookView, row: dict[str, Any]) -> None:
        if row["epoch"] >= trainer.end_epoch - self.epochs:
            self.swa.update_parameters(trainer.model)

    def on_train_end(self, trainer: HookView) -> None:
        if int(self.swa.n_averaged) == 0 or not trainer.dist.main:
            return
        model = self.swa.module
        batches = recompute_bn(model, trainer.train_loader, trainer.device, trainer.batches)
        row = trainer.evaluate_model(model)
        state = trainer.checkpoint_state(trainer.history[-1]["epoch"] if trainer.history else 0)
        state.update(
            model=model.state_dict(), ema=None, swa_val_miou=row["val_miou"], swa_epochs=int(self.swa.n_averaged)
        )
        atomic_write_bytes(trainer.folder.checkpoint("swa"), serialize(state))
        log.info(
            "SWA of the last %d epochs (BatchNorm from %d batches): val mIoU %.4f -> %s",
            int(self.swa.n_averaged),
            batches,
            row["val_miou"],
            trainer.folder.checkpoint("swa"),
        )

    def state_dict(self) -> Any:
        return self.swa.state_dict()

    def load_state_dict(self, state: Any) -> None:
        if state is not None:
            self.swa.load_state_dict(state)
