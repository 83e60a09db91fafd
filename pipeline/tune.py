"""Hyper-parameter tuning stage: ``make tune STUDY=<name> TRIALS=N [FOLD=0] [SPACE=...] [STORAGE=...]``.

An Optuna study whose trials call :func:`pipeline.engine.trainer.train`.  Each trial's training config
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

import logging
import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import optuna

from pipeline.core.config import ConfigError, parse_overrides, stage_main
from pipeline.core.errors import PipelineError
from pipeline.tuning.space import (
    load_space,
)
from pipeline.tuning.study import (
    make_pruner,
    make_sampler,
    open_storage,
    storage_url,
    worker_seed,
)
from pipeline.tuning.trials import (
    TrainFn,
    TrialObjective,
    base_train_config,
    split_train_args,
)
from pipeline.tuning.tune_config import TuneConfig

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- search space


# ----------------------------------------------------------------------------- trial configs


# ----------------------------------------------------------------------------- pruning


# ----------------------------------------------------------------------------- storage


# ----------------------------------------------------------------------------- samplers, pruners


def _log_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    seconds = trial.duration.total_seconds() if trial.duration is not None else float("nan")
    value = "-" if trial.value is None else f"{trial.value:.4f}"
    folds = trial.user_attrs.get("fold_values")
    best = "-"
    if any(t.state == optuna.trial.TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        best = f"{study.best_value:.4f} (trial {study.best_trial.number})"
    log.info(
        "trial %d %s: value %s%s in %.1f s, best %s; params %s; run %s",
        trial.number,
        trial.state.name,
        value,
        f" (folds {', '.join(f'{v:.4f}' for v in folds)})" if folds and len(folds) > 1 else "",
        seconds,
        best,
        trial.params,
        trial.user_attrs.get("run_dir", "-"),
    )


# ----------------------------------------------------------------------------- run
def run(cfg: TuneConfig, train_fn: TrainFn | None = None) -> optuna.Study:
    """Run ``cfg.trials`` trials of study ``cfg.study`` (created, or continued when it exists).

    ``train_fn(train_cfg, epoch_callback) -> TrainResult`` trains one fold; default
    :func:`pipeline.engine.trainer.train`.
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
        pruner=make_pruner(cfg.pruner, cfg.pruner_startup_trials, cfg.pruner_warmup_steps),
        direction=cfg.direction,
        load_if_exists=True,
    )
    if study.direction.name.lower() != cfg.direction:
        raise ConfigError(
            f"study {cfg.study!r} in {url} was created with direction={study.direction.name.lower()}, not "
            f"{cfg.direction}"
        )
    study.set_user_attr("space", space.path)
    log.info(
        "study %s (%s): %d trial(s) already, running %d more on fold(s) %s; sampler %s (seed %d, worker %d), pruner %s",
        cfg.study,
        url,
        len(existing),
        cfg.trials,
        cfg.fold_list(),
        cfg.sampler,
        seed,
        worker,
        cfg.pruner,
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
        cfg.study,
        len(done),
        ", ".join(f"{k.lower()} {v}" for k, v in states.items() if v),
        time.perf_counter() - t0,
    )
    return study


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main(TuneConfig, run, argv, "Optuna study over training settings (make tune)")


if __name__ == "__main__":
    raise SystemExit(main())
