"""Optimizers and learning-rate schedules by name (registries list what they know)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from pipeline.core.registry import Registry
from pipeline.models import param_groups

OPTIMIZERS = Registry("optimizer")
SCHEDULERS = Registry("scheduler")


@OPTIMIZERS.register("adamw", "AdamW with decoupled weight decay")
def _adamw(groups: list[dict[str, Any]], cfg) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


@OPTIMIZERS.register("sgd", "SGD with Nesterov momentum")
def _sgd(groups: list[dict[str, Any]], cfg) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """Encoder and decoder parameter groups (``encoder_lr``, ``lr``), no decay on biases and norms."""
    encoder_lr = cfg.encoder_lr if cfg.encoder_lr is not None else cfg.lr
    groups = param_groups(model, encoder_lr, cfg.lr, cfg.weight_decay, cfg.layer_decay)
    return OPTIMIZERS.get(cfg.optimizer)(groups, cfg)


def _warmup(step: int, warmup_steps: int) -> float | None:
    return (step + 1) / warmup_steps if warmup_steps and step < warmup_steps else None


def _progress(step: int, total: int, warmup: int) -> float:
    return min(1.0, (step - warmup) / max(1, total - warmup))


class Horizon:
    """The number of optimizer steps a schedule decays over; a time budget may shorten it."""

    def __init__(self, total: int, warmup: int):
        self.total, self.warmup = total, warmup


def _lambda(shape: Callable[[float, Any], float], cfg, horizon: Horizon) -> Callable[[int], float]:
    def f(step: int) -> float:
        w = _warmup(step, horizon.warmup)
        return w if w is not None else shape(_progress(step, horizon.total, horizon.warmup), cfg)

    return f


def _lambda_scheduler(shape: Callable[[float, Any], float]):
    def build(optimizer: torch.optim.Optimizer, cfg, total: int, warmup: int):
        horizon = Horizon(total, warmup)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lambda(shape, cfg, horizon))
        scheduler.horizon = horizon  # re-sized by pipeline.engine.hooks.TimeBudget
        return scheduler

    return build


SCHEDULERS.add(
    "cosine",
    _lambda_scheduler(lambda t, cfg: cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))),
    "linear warmup, then cosine decay to min_lr_ratio x lr",
)
SCHEDULERS.add(
    "poly",
    _lambda_scheduler(lambda t, cfg: cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * (1 - t) ** cfg.poly_power),
    "linear warmup, then polynomial decay (poly_power) to min_lr_ratio x lr",
)
SCHEDULERS.add("constant", _lambda_scheduler(lambda t, cfg: 1.0), "linear warmup, then a constant lr")


@SCHEDULERS.register("onecycle", "torch's OneCycleLR (warmup share from warmup_epochs)")
def _onecycle(optimizer: torch.optim.Optimizer, cfg, total: int, warmup: int):
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=[g["lr"] for g in optimizer.param_groups],
        total_steps=total,
        pct_start=min(0.5, max(warmup / total, 0.01)),
        final_div_factor=1.0 / max(cfg.min_lr_ratio, 1e-6) / 25.0,
    )


def build_scheduler(cfg, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """The schedule of ``cfg.scheduler`` over ``epochs x steps_per_epoch`` optimizer steps."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    return SCHEDULERS.get(cfg.scheduler)(optimizer, cfg, total, warmup)


def scheduler_state(scheduler) -> dict[str, Any]:
    """The scheduler's state as plain values (its horizon as ``{total, warmup}``, not the object)."""
    state = scheduler.state_dict()
    horizon = state.pop("horizon", None)
    if horizon is not None:
        state["horizon"] = {"total": int(horizon.total), "warmup": int(horizon.warmup)}
    return state


def load_scheduler_state(scheduler, state: dict[str, Any]) -> None:
    """Restore :func:`scheduler_state`: the stored horizon goes into the horizon its schedule reads."""
    state = dict(state)
    stored = state.pop("horizon", None)
    horizon = getattr(scheduler, "horizon", None)
    if stored is not None and horizon is not None:
        horizon.total, horizon.warmup = int(stored["total"]), int(stored["warmup"])
    scheduler.load_state_dict(state)


def resize_schedule(scheduler, total_steps: int) -> bool:
    """Make a schedule decay over ``total_steps`` steps from now on (the learning rate of the next
    step follows the new horizon); False for schedules without a horizon (onecycle)."""
    horizon = getattr(scheduler, "horizon", None)
    if horizon is None:
        return False
    horizon.total = max(1, int(total_steps))
    return True
