"""Extensions of the training loop.

A :class:`Hook` is called at fixed points of :class:`pipeline.engine.trainer.Trainer`;
techniques attach here instead of editing the loop:

* ``on_train_start(trainer)``: after building and resuming, before the first epoch;
* ``on_step_end(trainer)``: after every optimizer step;
* ``on_epoch_end(trainer, row)``: after validation and the checkpoint of an epoch (``row``
  is the epoch's metrics row); may set ``trainer.stop`` to end training;
* ``on_train_end(trainer)``: after the last epoch;
* ``on_run_end(trainer, scores)``: after the out-of-fold store is written, with the run's scores
  (``best_val_miou``, ``best_epoch``, ``epochs``, ``oof_miou``; NaN where there is none), or with None
  when training ended with an error (a tracker closes its run here, as failed or finished).

A hook with state to resume (EMA weights, counters) names a ``state_key`` and implements
``state_dict`` / ``load_state_dict``; the checkpoint stores it under that key.  A hook may
offer the model to evaluate (``evaluation_model``), as EMA does.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from pipeline.engine.view import HookView

log = logging.getLogger(__name__)


class Hook:
    state_key: str | None = None

    def on_train_start(self, trainer: HookView) -> None:
        pass

    def on_step_end(self, trainer: HookView) -> None:
        pass

    def on_epoch_end(self, trainer: HookView, row: dict[str, Any]) -> None:
        pass

    def on_train_end(self, trainer: HookView) -> None:
        pass

    def on_run_end(self, trainer: HookView, scores: dict[str, float] | None) -> None:
        pass

    def evaluation_model(self) -> nn.Module | None:
        return None

    def state_dict(self) -> Any:
        return None

    def load_state_dict(self, state: Any) -> None:
        pass


class EMAHook(Hook):
    """Exponential moving average of the weights (and buffers), updated after every optimizer
    step; validation, ``best.pt`` and prediction use the averaged copy."""

    state_key = "ema"

    def __init__(self, model: nn.Module, decay: float):
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        self.ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)

    def on_step_end(self, trainer: HookView) -> None:
        self.ema.update_parameters(trainer.model)

    def evaluation_model(self) -> nn.Module:
        return self.ema.module

    def state_dict(self) -> Any:
        return self.ema.state_dict()

    def load_state_dict(self, state: Any) -> None:
        if state is not None:
            self.ema.load_state_dict(state)


class EarlyStopping(Hook):
    """Stops when val mIoU has not improved for ``patience`` validated epochs (0: never)."""

    def __init__(self, patience: int, val_every: int):
        self.patience, self.val_every = patience, val_every
        self.stale = 0

    def on_train_start(self, trainer: HookView) -> None:
        h = trainer.history
        self.stale = h[-1]["epoch"] - trainer.best_epoch if h and trainer.best_epoch >= 0 else 0
        self._check(trainer)

    def on_epoch_end(self, trainer: HookView, row: dict[str, Any]) -> None:
        if math.isnan(row["val_miou"]):
            return
        self.stale = 0 if trainer.best_epoch == row["epoch"] else self.stale + self.val_every
        self._check(trainer)

    def _check(self, trainer: HookView) -> None:
        if self.patience and self.stale >= self.patience and not trainer.stop:
            trainer.stop = True
            log.info("early stop: no improvement for %d epochs", self.patience)


HAND_EPOCHS = 0.25  # a lengthened run keeps this share of an epoch's time in hand (the last one also writes OOF maps)


class TimeBudget(Hook):
    """Keeps a run inside ``seconds`` of wall time (training and validation of this process).

    After every epoch the mean epoch time so far projects the finish; when the planned epochs
    no longer fit, the run is shortened to the epochs that do and the learning-rate schedule is
    re-sized to end with them (cosine/poly decay over the new horizon), so a run that falls
    behind its plan shortens and never overruns.  A run this hook shortened that later goes
    faster than projected (the first epochs carry the caches' start-up) gets the time back: it
    is lengthened again, up to the configured epochs, keeping a quarter of an epoch's time in hand.  The
    current length is saved in checkpoints.  With progressive resizing the epochs at the small size
    and at the full size are timed apart, and each remaining epoch is projected at its own size.
    """

    state_key = "time_budget"

    def __init__(self, seconds: float):
        self.seconds = float(seconds)
        self.end_epoch: int | None = None

    def on_train_start(self, trainer: HookView) -> None:
        self.started = self.mark = time.monotonic()
        self.durations: list[tuple[bool, float]] = []  # (trained at the progressive low size, seconds)
        if self.end_epoch is not None:
            trainer.resize(self.end_epoch)

    def _epoch_costs(self, trainer: HookView) -> tuple[float, float]:
        """Projected seconds of a full-size and of a low-size epoch.  The first epoch carries start-up
        costs (loader, caches, first checkpoint): it counts only while it is the only one; later the
        mean, which carries the share of the epochs that validate and of the occasional slow one.  A
        size not measured yet is projected from the other by the ratio of pixels."""
        timed = self.durations[1:] if len(self.durations) > 1 else self.durations
        full = [d for low, d in timed if not low]
        low = [d for low, d in timed if low]
        ratio = trainer.sizes.low_area_ratio
        full_s = statistics.fmean(full) if full else statistics.fmean(low) / ratio
        low_s = statistics.fmean(low) if low else full_s * ratio
        return full_s, low_s

    @staticmethod
    def _fits(trainer: HookView, done: int, seconds: float, costs: tuple[float, float]) -> int:
        """The largest end epoch (at most the configured epochs) whose remaining epochs, at ``costs``
        (full-size and low-size seconds), fit ``seconds``."""
        full_s, low_s = costs
        end = done
        for candidate in range(done + 1, trainer.cfg.epochs + 1):
            low = trainer.sizes.low_epochs(candidate)
            cost = sum(low_s if e < low else full_s for e in range(done, candidate))
            if cost <= seconds:
                end = candidate
        return end

    def on_epoch_end(self, trainer: HookView, row: dict[str, Any]) -> None:
        now = time.monotonic()
        epoch = row["epoch"]
        low = trainer.sizes.size(epoch, trainer.end_epoch) != trainer.sizes.full
        self.durations.append((low, now - self.mark))
        self.mark = now
        left = self.seconds - (now - self.started)
        if len(self.durations) == 1 and left >= 2 * self.durations[0][1]:
            return
        costs = self._epoch_costs(trainer)
        full_s = costs[0]
        done = epoch + 1
        fits = self._fits(trainer, done, max(0.0, left), costs)
        # ahead of a shortened plan: a quarter of an epoch kept in hand (a whole one left time unused:
        # docs/measurements.md, "Time budgets and planning figures")
        longer = self._fits(trainer, done, max(0.0, left - HAND_EPOCHS * full_s), costs)
        if fits < trainer.end_epoch:
            end = fits
        elif self.end_epoch is not None and longer > trainer.end_epoch:
            end = longer
        else:
            return
        log.info(
            "time budget: %.0f s of %.0f s used, %.1f s per epoch: %d epochs instead of %d",
            now - self.started,
            self.seconds,
            full_s,
            end,
            trainer.end_epoch,
        )
        self.end_epoch = end
        trainer.resize(end)

    def state_dict(self) -> Any:
        return {"end_epoch": self.end_epoch}

    def load_state_dict(self, state: Any) -> None:
        if state:
            self.end_epoch = state.get("end_epoch")


class EpochCallback(Hook):
    """Calls ``fn(epoch, row)`` after every validated epoch (the tuner reports to its pruner
    here and may raise to prune)."""

    def __init__(self, fn: Callable[[int, dict[str, Any]], None]):
        self.fn = fn

    def on_epoch_end(self, trainer: HookView, row: dict[str, Any]) -> None:
        if not math.isnan(row["val_miou"]):
            self.fn(row["epoch"], row)
