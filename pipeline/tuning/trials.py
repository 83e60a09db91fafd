"""A trial: its training config layered like the training stage's (defaults, base.yaml, the
family overlay of the trial's model, tuner defaults, base file, data paths, fixed overrides,
sampled values), its pruning report and its objective.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import optuna

from pipeline.core.config import ConfigError, layer, parse_overrides, split_args, to_dict
from pipeline.core.errors import PipelineError
from pipeline.core.layout import RunFolder
from pipeline.engine.train_config import TrainConfig, train_layer_parts
from pipeline.engine.trainer import TrainResult
from pipeline.tuning.space import (
    LOSS_WEIGHT,
    TRIAL_DEFAULTS,
    TUNER_KEYS,
    SearchSpace,
    _train_config_cls,
    compose_loss,
)
from pipeline.tuning.study import (
    retried_from,
)
from pipeline.tuning.tune_config import TuneConfig

log = logging.getLogger(__name__)


EpochCallback = Callable[[int, dict[str, Any]], None]


TrainFn = Callable[["TrainConfig", EpochCallback], "TrainResult"]


def split_train_args(items: Iterable[str]) -> list[str]:
    """``["epochs=3 lr=1e-3", "augment=none"]`` -> one ``key=value`` per item, each item split as the
    stages split ``ARGS`` (:func:`pipeline.core.config.split_args`: shell-style quoting, and values
    with spaces such as ``loss_options={classes: present}`` kept whole)."""
    return [arg for item in items for arg in split_args(item)]


def base_train_config(cfg: TuneConfig, model: str | None = None) -> TrainConfig:
    """A trial's training config before its sampled values: the training stage's composition
    (:func:`pipeline.engine.train_config.train_layers`: defaults < ``base.yaml`` < the family overlay of
    ``model`` (a sampled one; default: the model the files and arguments name) < ``base_config`` <
    data_dir/folds_file and ``train_args``), with the tuner's defaults (no OOF maps, no plots)
    right above the family layers so that files and ``train_args`` can still set them."""
    cls = _train_config_cls()
    paths = {k: v for k, v in (("data_dir", cfg.data_dir), ("folds_file", cfg.folds_file)) if v is not None}
    args = parse_overrides(split_train_args(cfg.train_args))
    tuner_set = sorted(set(args) & set(TUNER_KEYS))
    if tuner_set:
        raise ConfigError(
            f"train_args: {', '.join(tuner_set)} are set by the tuner (use runs_dir=/folds= of the tune config)"
        )
    family, files = train_layer_parts(cfg.base_config, {**paths, **args}, model=model)
    layers = [*family, ("tune defaults", TRIAL_DEFAULTS), *files, ("tune config", paths), ("train_args", args)]
    train = layer(cls(), *layers)
    train.validate()
    return train


def trial_train_config(
    base: TrainConfig, values: Mapping[str, Any], experiment: str, runs_dir: str, fold: int, source: str
) -> TrainConfig:
    """The base training config with a trial's sampled values (loss weights folded into ``loss``)."""
    values = dict(values)
    weights = {
        LOSS_WEIGHT.fullmatch(k).group("term"): float(values.pop(k)) for k in list(values) if LOSS_WEIGHT.fullmatch(k)
    }
    if weights:
        values["loss"] = compose_loss(values.get("loss", base.loss), weights, source)
    tuner = {"experiment": experiment, "runs_dir": runs_dir, "fold": fold, "resume": True}
    train = layer(base, (source, values), ("tuner", tuner))
    train.validate()
    return train


def global_step(fold_index: int, epoch: int, epochs: int) -> int:
    """Step of an epoch in a multi-fold trial: fold ``i`` owns steps ``[i * epochs, (i + 1) * epochs)``."""
    return fold_index * epochs + epoch


def pruning_callback(trial: optuna.Trial, fold_index: int, epochs: int, report: bool = True) -> EpochCallback:
    """The epoch callback of a trial's training (an :class:`pipeline.engine.hooks.EpochCallback`):
    reports val mIoU at the global step
    and raises ``optuna.TrialPruned`` when the pruner says so (nothing when ``report`` is off)."""

    def callback(epoch: int, row: dict[str, Any]) -> None:
        if not report:
            return
        value = float(row["val_miou"])
        if not math.isfinite(value):
            return
        step = global_step(fold_index, epoch, epochs)
        trial.report(value, step)
        if trial.should_prune():
            raise optuna.TrialPruned(f"val mIoU {value:.4f} at step {step} (fold index {fold_index}, epoch {epoch})")

    return callback


def _train_run(cfg: TrainConfig, epoch_callback: EpochCallback) -> TrainResult:
    """The training engine with the pruning callback as a hook; out-of-memory (or a kernel's 32-bit index
    limit) outside the training step's micro-batch fallback fails only the trial."""
    import torch

    from pipeline.engine.hooks import EpochCallback
    from pipeline.engine.loop import too_large
    from pipeline.engine.trainer import train

    try:
        return train(cfg, [EpochCallback(epoch_callback)])
    except RuntimeError as exc:
        why = too_large(exc)
        if why is None:
            raise
        raise PipelineError(f"{cfg.experiment}: {why} (batch_size={cfg.batch_size}, img_size={cfg.img_size})") from exc
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class TrialObjective:
    """Objective of one study: sample, build the trial's TrainConfig, train each fold, return the mean best mIoU."""

    def __init__(self, cfg: TuneConfig, space: SearchSpace, base: TrainConfig, train_fn: TrainFn | None = None):
        self.cfg = cfg
        self.space = space
        self.base = base
        self.folds = cfg.fold_list()
        self.train_fn = train_fn or _train_run

    def __call__(self, trial: optuna.Trial) -> float:
        origin = retried_from(trial)
        number = origin if origin is not None else trial.number
        values = self.space.sample(trial)
        source = f"{self.space.path} (trial {trial.number})"
        model = values.get("model")
        # a sampled model brings its own family overlay, layered where the training stage layers it
        base = self.base if model in (None, self.base.model) else base_train_config(self.cfg, str(model))
        experiment = f"{self.cfg.study}-t{number}"
        train = trial_train_config(base, values, experiment, self.cfg.runs_dir, self.folds[0], source)
        run_dirs = [dataclasses.replace(train, fold=f).run_dir() for f in self.folds]
        if origin is None:
            for d in run_dirs:
                if RunFolder(d).last.exists():
                    raise PipelineError(
                        f"{d / 'last.pt'} exists from an earlier study named {self.cfg.study!r}; remove "
                        f"{Path(self.cfg.runs_dir) / (self.cfg.study + '-t*')} or choose another study= or runs_dir="
                    )
        trial.set_user_attr("config", to_dict(train))
        trial.set_user_attr("run_dir", str(Path(train.runs_dir) / train.experiment_name))
        trial.set_user_attr("run_dirs", [str(d) for d in run_dirs])
        scores: list[float] = []
        for i, fold in enumerate(self.folds):
            fold_cfg = dataclasses.replace(train, fold=fold)
            report = i == 0 or not self.cfg.prune_first_fold_only
            result = self.train_fn(fold_cfg, pruning_callback(trial, i, fold_cfg.epochs, report))
            if not math.isfinite(result.best_miou):
                raise PipelineError(f"{result.run_dir}: training gave no validation mIoU")
            scores.append(float(result.best_miou))
            trial.set_user_attr("fold_values", scores)
        return float(sum(scores) / len(scores))
