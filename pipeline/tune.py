"""Hyper-parameter tuning stage: ``make tune STUDY=<name> TRIALS=N [FOLD=0] [SPACE=...] [STORAGE=...]``.

An Optuna study whose trials call :func:`pipeline.train.run`.  Each trial's training config
is layered: the TrainConfig defaults (with ``save_oof`` and ``plot`` off), then
``base_config``, then ``data_dir`` / ``folds_file``, then ``train_args``, then the values
sampled from the search space (:func:`load_space`), with ``experiment=<study>-t<number>``
and ``runs_dir``.  The objective is the mean best validation mIoU over the trial's folds.
Each validated epoch is reported to the pruner at a global step
``fold_index * epochs + epoch`` (steps never repeat across folds), or on the first fold only
with ``prune_first_fold_only=true``.

Storage: ``studies/<study>.db`` (SQLite) by default, any SQLAlchemy URL
(``postgresql+psycopg2://...``), or ``journal:<path>`` (an Optuna journal file).  Running
``make tune`` again continues the study.  With a database storage, trials send heartbeats;
a trial whose worker died (e.g. killed) is marked FAILED by the next worker once its
heartbeat is ``grace_period`` seconds old and is queued again with the same parameters (at
most ``max_retry`` times).  The retried copy keeps the original trial's run folder, so its
training continues from the killed run's ``last.pt``.  Journal files have no heartbeats.

Several workers may share one storage.  The sampler seed of a worker is derived from
``seed``, its worker index and the number of trials already in the study:
``worker_id`` when given (use 0, 1, 2, ... for a reproducible parallel run), else 0 when no
trial of the study is running, else the process id; workers started at the same moment
should therefore be given distinct ``worker_id`` values.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import logging
import math
import os
import random
import re
import shlex
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Sequence

import optuna

from pipeline.config import ConfigError, apply_mapping, parse_overrides, read_yaml_mapping, stage_main, to_dict
from pipeline.utils import PipelineError

if TYPE_CHECKING:
    from pipeline.train import TrainConfig, TrainResult

log = logging.getLogger(__name__)

DEFAULT_SPACE = "pipeline/configs/search_space.yaml"
STUDIES_DIR = "studies"
SAMPLERS = ("tpe", "random", "cmaes")
PRUNERS = ("median", "hyperband", "none")
DIRECTIONS = ("maximize", "minimize")
# training settings every trial starts from (before base_config): per-trial OOF maps and plots are not needed
TRIAL_DEFAULTS: dict[str, Any] = {"save_oof": False, "plot": False}
# keys the tuner sets for each trial; a search space may not sample them
TUNER_KEYS = ("experiment", "runs_dir", "fold", "resume")
SPEC_TYPES = ("categorical", "float", "int", "fixed")
LOSS_WEIGHT = re.compile(r"loss_(?P<term>[a-z_]+?)_weight")
_STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_MAX_COMBINATIONS = 50_000

EpochCallback = Callable[[int, dict[str, Any]], None]
TrainFn = Callable[["TrainConfig", EpochCallback], "TrainResult"]


@dataclass
class TuneConfig:
    study: str = "demo"
    trials: int = 20  # trials this worker runs; the study may already hold others
    space: str = DEFAULT_SPACE
    storage: str | None = None  # None: sqlite studies/<study>.db; an SQLAlchemy URL; or journal:<path>
    sampler: str = "tpe"  # tpe | random | cmaes (float/int parameters only)
    pruner: str = "median"  # median | hyperband | none
    pruner_startup_trials: int = 3  # median: finished trials before pruning starts
    pruner_warmup_steps: int = 1  # median: reported steps of a trial before it may be pruned
    seed: int = 42
    worker_id: int | None = None  # None: 0 when no trial is running, else the process id
    folds: list[int] = field(default_factory=lambda: [0])  # a trial trains each and reports the mean
    fold: int | None = None  # shortcut for folds=[fold] (used when folds is left at [0])
    prune_first_fold_only: bool = False
    base_config: str | None = None  # training YAML layered under the sampled parameters
    train_args: list[str] = field(default_factory=list)  # fixed key=value training overrides
    data_dir: str | None = None
    folds_file: str | None = None
    runs_dir: str = "runs/tune"
    heartbeat_interval: int = 60  # seconds; 0: no heartbeats
    grace_period: int = 120  # seconds without a heartbeat before a running trial counts as dead
    max_retry: int = 3  # times a dead worker's trial is queued again
    timeout: float | None = None  # seconds this worker keeps starting trials
    direction: str = "maximize"

    def validate(self) -> None:
        if not _STUDY_NAME.fullmatch(self.study):
            raise ConfigError(f"study: {self.study!r} must be letters, digits, '_', '.' or '-' (it names files and folders)")
        if self.trials < 1:
            raise ConfigError(f"trials must be at least 1, got {self.trials}")
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"sampler: unknown {self.sampler!r}; known: {', '.join(SAMPLERS)}")
        if self.pruner not in PRUNERS:
            raise ConfigError(f"pruner: unknown {self.pruner!r}; known: {', '.join(PRUNERS)}")
        if self.direction not in DIRECTIONS:
            raise ConfigError(f"direction: unknown {self.direction!r}; known: {', '.join(DIRECTIONS)}")
        folds = self.fold_list()
        if not folds or any(f < 0 for f in folds) or len(set(folds)) != len(folds):
            raise ConfigError(f"folds must be distinct fold numbers >= 0, got {folds}")
        if self.heartbeat_interval < 0:
            raise ConfigError(f"heartbeat_interval must be >= 0 (0: off), got {self.heartbeat_interval}")
        if self.heartbeat_interval and self.grace_period <= self.heartbeat_interval:
            raise ConfigError(
                f"grace_period ({self.grace_period}) must exceed heartbeat_interval ({self.heartbeat_interval})"
            )
        if self.max_retry < 0 or self.pruner_startup_trials < 0 or self.pruner_warmup_steps < 0:
            raise ConfigError("max_retry, pruner_startup_trials and pruner_warmup_steps must be >= 0")
        if self.timeout is not None and self.timeout <= 0:
            raise ConfigError(f"timeout must be positive seconds or null, got {self.timeout}")

    def fold_list(self) -> list[int]:
        """The folds of every trial: ``fold`` when given and ``folds`` is left at its default."""
        if self.fold is not None and list(self.folds) == [0]:
            return [int(self.fold)]
        return [int(f) for f in self.folds]


# ----------------------------------------------------------------------------- search space
class _Any:
    """Placeholder for the value of a float/int parameter while walking the space."""

    def __repr__(self) -> str:
        return "<sampled>"


_ANY = _Any()


def _encode(value: Any) -> Any:
    """Optuna categorical choices must be scalars: lists and mappings travel as JSON text."""
    return json.dumps(value) if isinstance(value, (list, tuple, dict)) else value


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of the search space (a TrainConfig key or a loss weight)."""

    key: str
    name: str  # Optuna parameter name (``key`` or ``key[cond]`` for a conditional variant)
    kind: str  # categorical | float | int | fixed
    choices: tuple[Any, ...] = ()
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    value: Any = None
    when: tuple[tuple[str, tuple[Any, ...]], ...] = ()

    def applies(self, values: Mapping[str, Any]) -> bool:
        return all(k in values and values[k] in allowed for k, allowed in self.when)

    def finite_values(self) -> list[Any]:
        """Every value this parameter can take, or ``[_ANY]`` for a float/int range."""
        if self.kind == "categorical":
            return list(self.choices)
        if self.kind == "fixed":
            return [self.value]
        return [_ANY]

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.kind == "categorical":
            encoded = [_encode(c) for c in self.choices]
            picked = trial.suggest_categorical(self.name, encoded)
            return self.choices[encoded.index(picked)]
        if self.kind == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return self.value


@dataclass
class SearchSpace:
    path: str
    params: list[ParamSpec]

    @property
    def keys(self) -> list[str]:
        return list(dict.fromkeys(p.key for p in self.params))

    @property
    def has_categorical(self) -> bool:
        return any(p.kind == "categorical" or p.when for p in self.params)

    def sample(self, trial: optuna.Trial) -> dict[str, Any]:
        """Sampled and fixed values of the parameters that apply to this trial, in file order."""
        values: dict[str, Any] = {}
        for p in self.params:
            if p.applies(values):
                if p.key in values:
                    raise ConfigError(f"{self.path}: {p.key}: two variants apply to the same trial")
                values[p.key] = p.suggest(trial)
        return values


def _train_config_cls():
    from pipeline.train import TrainConfig

    return TrainConfig


def _check_value(path: str, key: str, value: Any) -> Any:
    """Coerce ``value`` as TrainConfig would and validate it; errors name the file and key."""
    m = LOSS_WEIGHT.fullmatch(key)
    if m:
        if not _is_number(value) or value < 0 or not math.isfinite(value):
            raise ConfigError(f"{path}: {key}: a loss weight must be a number >= 0, got {value!r}")
        return float(value)
    cls = _train_config_cls()
    cfg = apply_mapping(cls(), {key: value}, path)
    try:
        cfg.validate()
    except PipelineError as exc:
        raise ConfigError(f"{path}: {key}={value!r}: {exc}") from exc
    return getattr(cfg, key)


def _parse_when(path: str, key: str, raw: Any, defined: Mapping[str, list[ParamSpec]]) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{path}: {key}: when must be a mapping such as {{model: unet}}, got {raw!r}")
    out = []
    for ref, allowed in raw.items():
        ref = str(ref)
        if ref not in defined:
            above = ", ".join(defined) or "none"
            raise ConfigError(f"{path}: {key}: when refers to {ref!r}, which is not a parameter defined above it (defined: {above})")
        variants = defined[ref]
        if any(v.kind not in ("categorical", "fixed") for v in variants):
            raise ConfigError(f"{path}: {key}: when may only refer to categorical or fixed parameters; {ref!r} is {variants[0].kind}")
        allowed_t = tuple(allowed) if isinstance(allowed, list) else (allowed,)
        if not allowed_t:
            raise ConfigError(f"{path}: {key}: when {ref}: an empty list of values")
        possible = [c for v in variants for c in v.finite_values()]
        for a in allowed_t:
            if a not in possible:
                raise ConfigError(
                    f"{path}: {key}: when {ref}={a!r} can never hold; {ref} takes one of {possible}"
                )
        out.append((ref, allowed_t))
    return tuple(out)


def _parse_spec(path: str, key: str, raw: Any, defined: Mapping[str, list[ParamSpec]]) -> ParamSpec:
    if not isinstance(raw, dict):
        return ParamSpec(key, key, "fixed", value=_check_value(path, key, raw))
    if "type" not in raw:
        raise ConfigError(
            f"{path}: {key}: a mapping needs type: one of {', '.join(SPEC_TYPES)} (for a fixed value write the value itself)"
        )
    kind = raw["type"]
    if kind not in SPEC_TYPES:
        raise ConfigError(f"{path}: {key}: unknown type {kind!r}; known: {', '.join(SPEC_TYPES)}")
    allowed_fields = {
        "categorical": {"choices"},
        "float": {"low", "high", "log", "step"},
        "int": {"low", "high", "log", "step"},
        "fixed": {"value"},
    }[kind] | {"type", "when"}
    unknown = sorted(set(raw) - allowed_fields)
    if unknown:
        raise ConfigError(f"{path}: {key}: unknown field(s) {', '.join(unknown)} for type {kind}; allowed: {', '.join(sorted(allowed_fields))}")
    when = _parse_when(path, key, raw["when"], defined) if "when" in raw else ()
    if kind == "fixed":
        if "value" not in raw:
            raise ConfigError(f"{path}: {key}: type fixed needs value:")
        return ParamSpec(key, key, kind, value=_check_value(path, key, raw["value"]), when=when)
    if kind == "categorical":
        choices = raw.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{path}: {key}: categorical needs a non-empty list of choices, got {choices!r}")
        checked = [_check_value(path, key, c) for c in choices]
        encoded = [json.dumps(_encode(c), sort_keys=True) for c in checked]
        if len(set(encoded)) != len(encoded):
            raise ConfigError(f"{path}: {key}: repeated choices in {choices}")
        return ParamSpec(key, key, kind, choices=tuple(checked), when=when)
    for bound in ("low", "high"):
        if bound not in raw:
            raise ConfigError(f"{path}: {key}: type {kind} needs low: and high:")
        if not _is_number(raw[bound]) or (kind == "int" and not float(raw[bound]).is_integer()):
            raise ConfigError(f"{path}: {key}: {bound} must be {'an integer' if kind == 'int' else 'a number'}, got {raw[bound]!r}")
    low, high = raw["low"], raw["high"]
    log_scale = raw.get("log", False)
    if not isinstance(log_scale, bool):
        raise ConfigError(f"{path}: {key}: log must be true or false, got {log_scale!r}")
    if low >= high:
        raise ConfigError(f"{path}: {key}: low ({low}) must be below high ({high})")
    if log_scale and low <= 0:
        raise ConfigError(f"{path}: {key}: log: true needs low > 0, got {low}")
    step = raw.get("step")
    if step is not None:
        if not _is_number(step) or step <= 0 or (kind == "int" and not float(step).is_integer()):
            raise ConfigError(f"{path}: {key}: step must be a positive {'integer' if kind == 'int' else 'number'}, got {step!r}")
        if step > high - low:
            raise ConfigError(f"{path}: {key}: step {step} is larger than high - low ({high - low})")
        if log_scale and (kind == "float" or step != 1):
            raise ConfigError(f"{path}: {key}: log: true cannot be combined with {'step' if kind == 'float' else 'a step other than 1'}")
    for bound in (low, high):
        _check_value(path, key, int(bound) if kind == "int" else float(bound))
    return ParamSpec(key, key, kind, low=low, high=high, step=step, log=log_scale, when=when)


def _condition_label(when: tuple[tuple[str, tuple[Any, ...]], ...]) -> str:
    return ",".join(f"{k}={'|'.join(str(v) for v in vals)}" for k, vals in when)


def _check_combination(path: str, values: Mapping[str, Any], seen: set) -> None:
    """Model/encoder names, image sizes and loss weights of one assignment of the finite parameters."""
    model = values.get("model")
    encoder = values.get("encoder")
    img_size = values.get("img_size")
    if model is not None and model is not _ANY and encoder is not _ANY:
        key = ("model", model, encoder, json.dumps(img_size) if img_size is not _ANY else "any")
        if key not in seen:
            seen.add(key)
            from pipeline import models as model_registry

            try:
                divisor = model_registry.input_divisor(model, encoder)
            except PipelineError as exc:
                raise ConfigError(f"{path}: model={model} encoder={encoder}: {exc}") from exc
            if isinstance(img_size, list):
                sides = img_size if len(img_size) == 2 else img_size * 2
                if any(int(s) % divisor for s in sides):
                    raise ConfigError(f"{path}: img_size {img_size} is not a multiple of {divisor}, which model={model} encoder={encoder} needs")
    weights = sorted(k for k in values if LOSS_WEIGHT.fullmatch(k))
    loss = values.get("loss")
    if weights and isinstance(loss, str):
        key = ("loss", loss, tuple(weights))
        if key not in seen:
            seen.add(key)
            compose_loss(loss, {LOSS_WEIGHT.fullmatch(k).group("term"): 1.0 for k in weights}, path)


def _walk(space: SearchSpace) -> None:
    """Visit every assignment of the categorical/fixed parameters in file order: variants of one
    key must never apply together, every parameter must apply somewhere, and each assignment's
    model, encoder, image size and loss weights must fit together."""
    params = space.params
    active = [False] * len(params)
    seen: set = set()
    count = 0

    def visit(i: int, values: dict[str, Any]) -> None:
        nonlocal count
        if count > _MAX_COMBINATIONS:
            return
        if i == len(params):
            count += 1
            _check_combination(space.path, values, seen)
            return
        p = params[i]
        if not p.applies(values):
            visit(i + 1, values)
            return
        if p.key in values:
            shown = ", ".join(f"{k}={v!r}" for k, v in values.items() if v is not _ANY)
            raise ConfigError(f"{space.path}: {p.key}: more than one variant applies when {shown}; make their `when` conditions exclusive")
        active[i] = True
        for v in p.finite_values():
            values[p.key] = v
            visit(i + 1, values)
        del values[p.key]

    visit(0, {})
    if count > _MAX_COMBINATIONS:
        log.info("%s: more than %d combinations of categorical values; checked the first ones only", space.path, _MAX_COMBINATIONS)
        return
    for p, was_active in zip(params, active):
        if not was_active:
            raise ConfigError(f"{space.path}: {p.key}: its condition when {_condition_label(p.when)} never holds")


def load_space(path: str | Path) -> SearchSpace:
    """Read and strictly check a search-space YAML (format: the header of the default file)."""
    path_s = str(path)
    data = read_yaml_mapping(path)
    if not data:
        raise ConfigError(f"{path_s}: the search space defines no parameters")
    known = {f.name for f in dataclasses.fields(_train_config_cls())}
    from pipeline.models.losses import list_losses

    terms = list_losses()
    defined: dict[str, list[ParamSpec]] = {}
    params: list[ParamSpec] = []
    for raw_key, raw in data.items():
        key = str(raw_key)
        m = LOSS_WEIGHT.fullmatch(key)
        if key in TUNER_KEYS:
            raise ConfigError(f"{path_s}: {key}: set by the tuner for each trial; it cannot be searched")
        if m and m.group("term") not in terms:
            raise ConfigError(f"{path_s}: {key}: unknown loss term {m.group('term')!r}; loss weights are loss_<term>_weight with term one of {', '.join(terms)}")
        if key not in known and not m:
            raise ConfigError(
                f"{path_s}: unknown key {key!r}; keys are TrainConfig keys ({', '.join(sorted(known - set(TUNER_KEYS)))}) "
                f"or loss_<term>_weight"
            )
        is_variants = isinstance(raw, list) and raw and all(isinstance(r, dict) and "when" in r for r in raw)
        if isinstance(raw, list) and raw and any(isinstance(r, dict) and "when" in r for r in raw) and not is_variants:
            raise ConfigError(f"{path_s}: {key}: a list of variants needs `when` in every item")
        specs = [_parse_spec(path_s, key, r, defined) for r in (raw if is_variants else [raw])]
        if len(specs) > 1:
            specs = [dataclasses.replace(s, name=f"{key}[{_condition_label(s.when)}]") for s in specs]
        defined[key] = specs
        params.extend(specs)
    space = SearchSpace(path_s, params)
    _walk(space)
    return space


def compose_loss(loss: str, weights: Mapping[str, float], source: str) -> str:
    """``compose_loss("ce+dice", {"dice": 0.4})`` -> ``"1*ce+0.4*dice"``; other terms keep their weights."""
    from pipeline.models.losses import parse_loss_spec

    terms = parse_loss_spec(loss)
    names = [n for _, n in terms]
    for term in weights:
        if term not in names:
            raise ConfigError(f"{source}: loss_{term}_weight is set but loss {loss!r} has no {term} term (guard it with when: {{loss: [...]}})")
    return "+".join(f"{float(weights.get(n, c)):.6g}*{n}" for c, n in terms)


# ----------------------------------------------------------------------------- trial configs
def split_train_args(items: Iterable[str]) -> list[str]:
    """``["epochs=3 lr=1e-3", "augment=none"]`` -> one ``key=value`` per item (shell-style quoting)."""
    out: list[str] = []
    for item in items:
        out.extend(shlex.split(item))
    return out


def base_train_config(cfg: TuneConfig) -> "TrainConfig":
    """Defaults -> tuner defaults -> base_config -> data_dir/folds_file -> train_args (no sampled values yet)."""
    cls = _train_config_cls()
    train = apply_mapping(cls(), TRIAL_DEFAULTS, "tune defaults")
    if cfg.base_config:
        train = apply_mapping(train, read_yaml_mapping(cfg.base_config), cfg.base_config)
    paths = {k: v for k, v in (("data_dir", cfg.data_dir), ("folds_file", cfg.folds_file)) if v is not None}
    if paths:
        train = apply_mapping(train, paths, "tune config")
    args = parse_overrides(split_train_args(cfg.train_args))
    tuner_set = sorted(set(args) & set(TUNER_KEYS))
    if tuner_set:
        raise ConfigError(f"train_args: {', '.join(tuner_set)} are set by the tuner (use runs_dir=/folds= of the tune config)")
    train = apply_mapping(train, args, "train_args")
    train.validate()
    return train


def trial_train_config(
    base: "TrainConfig", values: Mapping[str, Any], experiment: str, runs_dir: str, fold: int, source: str
) -> "TrainConfig":
    """The base training config with a trial's sampled values (loss weights folded into ``loss``)."""
    values = dict(values)
    weights = {LOSS_WEIGHT.fullmatch(k).group("term"): float(values.pop(k)) for k in list(values) if LOSS_WEIGHT.fullmatch(k)}
    if weights:
        values["loss"] = compose_loss(values.get("loss", base.loss), weights, source)
    train = apply_mapping(base, values, source)
    train = apply_mapping(train, {"experiment": experiment, "runs_dir": runs_dir, "fold": fold, "resume": True}, "tuner")
    train.validate()
    return train


# ----------------------------------------------------------------------------- pruning
def global_step(fold_index: int, epoch: int, epochs: int) -> int:
    """Step of an epoch in a multi-fold trial: fold ``i`` owns steps ``[i * epochs, (i + 1) * epochs)``."""
    return fold_index * epochs + epoch


def pruning_callback(trial: optuna.Trial, fold_index: int, epochs: int, report: bool = True) -> EpochCallback:
    """The ``epoch_callback`` of :func:`pipeline.train.run`: reports val mIoU at the global step
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


def _train_run(cfg: "TrainConfig", epoch_callback: EpochCallback) -> "TrainResult":
    """pipeline.train.run; out-of-memory fails only the trial."""
    import torch

    from pipeline.train import run as train_run

    try:
        return train_run(cfg, epoch_callback=epoch_callback)
    except torch.cuda.OutOfMemoryError as exc:
        raise PipelineError(f"{cfg.experiment}: out of GPU memory (batch_size={cfg.batch_size}, img_size={cfg.img_size})") from exc
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def retried_from(trial: optuna.Trial) -> int | None:
    """Number of the dead worker's trial that ``trial`` retries, or None for a fresh trial."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        origin = RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen)
    return None if origin is None else int(origin)


class TrialObjective:
    """Objective of one study: sample, build the trial's TrainConfig, train each fold, return the mean best mIoU."""

    def __init__(self, cfg: TuneConfig, space: SearchSpace, base: "TrainConfig", train_fn: TrainFn | None = None):
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
        train = trial_train_config(self.base, values, f"{self.cfg.study}-t{number}", self.cfg.runs_dir, self.folds[0], source)
        run_dirs = [dataclasses.replace(train, fold=f).run_dir() for f in self.folds]
        if origin is None:
            for d in run_dirs:
                if (d / "last.pt").exists():
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


# ----------------------------------------------------------------------------- storage
def storage_url(study: str, storage: str | None) -> str:
    """``storage`` or the default ``sqlite:///studies/<study>.db``."""
    if storage:
        return storage
    return f"sqlite:///{Path(STUDIES_DIR) / f'{study}.db'}"


def _sqlite_path(url: str) -> Path | None:
    if url.startswith("sqlite:///") and ":memory:" not in url:
        return Path(url[len("sqlite:///"):].split("?", 1)[0])
    return None


def open_storage(
    url: str,
    *,
    heartbeat_interval: int | None = None,
    grace_period: int | None = None,
    max_retry: int | None = None,
    must_exist: bool = False,
) -> optuna.storages.BaseStorage:
    """An Optuna storage for an SQLAlchemy URL (with heartbeats and retries of dead trials when
    ``heartbeat_interval`` is given) or ``journal:<path>``.  ``must_exist`` refuses to create a
    new SQLite or journal file."""
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = Path(url[len("journal:"):])
        if not path.name:
            raise ConfigError(f"storage: {url!r} needs a file name, e.g. journal:studies/demo.log")
        if must_exist and not path.is_file():
            raise PipelineError(f"{path}: journal file not found (run make tune first)")
        path.parent.mkdir(parents=True, exist_ok=True)
        if heartbeat_interval:
            log.warning("journal storage has no heartbeats: a trial whose worker dies stays RUNNING (use a database storage to retry it)")
        return JournalStorage(JournalFileBackend(str(path)))
    if "://" not in url:
        raise ConfigError(f"storage: {url!r} is neither an SQLAlchemy URL (sqlite:///file.db, postgresql+psycopg2://...) nor journal:<path>")
    import sqlalchemy.exc

    engine_kwargs: dict[str, Any] = {}
    sqlite = _sqlite_path(url)
    if sqlite is not None:
        if must_exist and not sqlite.is_file():
            raise PipelineError(f"{sqlite}: study database not found (run make tune first)")
        sqlite.parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs["connect_args"] = {"timeout": 60}  # workers wait for each other's writes
    else:
        engine_kwargs["pool_pre_ping"] = True
    kwargs: dict[str, Any] = {}
    if heartbeat_interval:
        from optuna.storages import RetryHeartbeatStaleTrialCallback

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            kwargs = dict(
                heartbeat_interval=int(heartbeat_interval),
                grace_period=int(grace_period) if grace_period else None,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=max_retry),
            )
    for attempt in range(3):
        try:
            with _file_lock(sqlite), warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)
        except ImportError as exc:
            raise PipelineError(f"storage {url!r}: the database driver is not installed ({exc})") from exc
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError) as exc:
            # two workers creating the tables of a new database at once: the loser retries
            if attempt == 2:
                raise PipelineError(f"storage {url!r}: cannot open ({type(exc).__name__}: {exc})") from exc
            log.debug("opening %s failed (%s); retrying", url, exc)
            time.sleep(0.5 + random.random())
        except sqlalchemy.exc.SQLAlchemyError as exc:
            raise PipelineError(f"storage {url!r}: cannot open ({type(exc).__name__}: {exc})") from exc
    raise AssertionError("unreachable")


@contextlib.contextmanager
def _file_lock(path: Path | None) -> Iterator[None]:
    """Exclusive ``flock`` on an SQLite file while its tables are created (no-op for other storages)."""
    if path is None:
        yield
        return
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on POSIX
        yield
        return
    with open(path, "ab") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def load_existing_study(study: str, storage: str | None) -> optuna.Study:
    """An existing study (for reports); a missing one lists the studies of the storage."""
    url = storage_url(study, storage)
    store = open_storage(url, must_exist=True)
    try:
        return optuna.load_study(study_name=study, storage=store)
    except KeyError as exc:
        names = optuna.get_all_study_names(store)
        raise PipelineError(f"study {study!r} not found in {url}; studies there: {', '.join(names) or 'none'}") from exc


# ----------------------------------------------------------------------------- samplers, pruners
def worker_seed(seed: int, worker: int, n_existing: int) -> int:
    """Sampler seed of a worker: distinct per worker index and per number of trials already in the study."""
    return (seed + 1_000_003 * worker + 7_919 * n_existing) % (2**31 - 1)


def make_sampler(name: str, seed: int, space: SearchSpace) -> optuna.samplers.BaseSampler:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "tpe":
            # constant_liar keeps parallel workers from proposing the points running trials already hold
            return optuna.samplers.TPESampler(seed=seed, constant_liar=True)
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if space.has_categorical:
            keys = sorted({p.key for p in space.params if p.kind == "categorical" or p.when})
            raise ConfigError(f"sampler=cmaes samples float/int parameters only; {space.path} has categorical or conditional ones: {', '.join(keys)} (use sampler=tpe)")
        if importlib.util.find_spec("cmaes") is None:
            raise ConfigError("sampler=cmaes needs the cmaes package (pip install cmaes)")
        return optuna.samplers.CmaEsSampler(seed=seed)


def make_pruner(cfg: TuneConfig) -> optuna.pruners.BasePruner:
    if cfg.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=cfg.pruner_startup_trials, n_warmup_steps=cfg.pruner_warmup_steps)
    if cfg.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource="auto", reduction_factor=3)
    return optuna.pruners.NopPruner()


def _log_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    seconds = trial.duration.total_seconds() if trial.duration is not None else float("nan")
    value = "-" if trial.value is None else f"{trial.value:.4f}"
    folds = trial.user_attrs.get("fold_values")
    best = "-"
    if any(t.state == optuna.trial.TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        best = f"{study.best_value:.4f} (trial {study.best_trial.number})"
    log.info(
        "trial %d %s: value %s%s in %.1f s, best %s; params %s; run %s",
        trial.number, trial.state.name, value, f" (folds {', '.join(f'{v:.4f}' for v in folds)})" if folds and len(folds) > 1 else "",
        seconds, best, trial.params, trial.user_attrs.get("run_dir", "-"),
    )


# ----------------------------------------------------------------------------- run
def run(cfg: TuneConfig, train_fn: TrainFn | None = None) -> optuna.Study:
    """Run ``cfg.trials`` trials of study ``cfg.study`` (created, or continued when it exists).

    ``train_fn(train_cfg, epoch_callback) -> TrainResult`` trains one fold; default
    :func:`pipeline.train.run`.
    """
    cfg.validate()
    space = load_space(cfg.space)
    base = base_train_config(cfg)
    searched = sorted(set(parse_overrides(split_train_args(cfg.train_args))) & set(space.keys))
    if searched:
        log.warning("train_args sets %s, which %s samples: the sampled values win", ", ".join(searched), space.path)
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    url = storage_url(cfg.study, cfg.storage)
    storage = open_storage(
        url, heartbeat_interval=cfg.heartbeat_interval or None, grace_period=cfg.grace_period, max_retry=cfg.max_retry
    )
    try:
        existing = optuna.load_study(study_name=cfg.study, storage=storage).get_trials(deepcopy=False)
    except KeyError:
        existing = []
    running = sum(t.state == optuna.trial.TrialState.RUNNING for t in existing)
    worker = cfg.worker_id if cfg.worker_id is not None else (os.getpid() if running else 0)
    seed = worker_seed(cfg.seed, worker, len(existing))
    study = optuna.create_study(
        study_name=cfg.study,
        storage=storage,
        sampler=make_sampler(cfg.sampler, seed, space),
        pruner=make_pruner(cfg),
        direction=cfg.direction,
        load_if_exists=True,
    )
    if study.direction.name.lower() != cfg.direction:
        raise ConfigError(f"study {cfg.study!r} in {url} was created with direction={study.direction.name.lower()}, not {cfg.direction}")
    study.set_user_attr("space", space.path)
    log.info(
        "study %s (%s): %d trial(s) already, running %d more on fold(s) %s; sampler %s (seed %d, worker %d), pruner %s",
        cfg.study, url, len(existing), cfg.trials, cfg.fold_list(), cfg.sampler, seed, worker, cfg.pruner,
    )
    objective = TrialObjective(cfg, space, base, train_fn)
    t0 = time.perf_counter()
    study.optimize(
        objective,
        n_trials=cfg.trials,
        timeout=cfg.timeout,
        catch=(PipelineError,),
        callbacks=[_log_trial],
        gc_after_trial=True,
    )
    done = study.get_trials(deepcopy=False)
    states = {s.name: sum(t.state == s for t in done) for s in optuna.trial.TrialState}
    log.info(
        "study %s: %s trial(s) in storage (%s) after %.1f s",
        cfg.study, len(done), ", ".join(f"{k.lower()} {v}" for k, v in states.items() if v), time.perf_counter() - t0,
    )
    return study


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main(TuneConfig, run, argv, "Optuna study over training settings (make tune)")


if __name__ == "__main__":
    raise SystemExit(main())
