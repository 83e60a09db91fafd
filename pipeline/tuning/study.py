"""Optuna storages (SQLite, SQLAlchemy URLs, journal files) with heartbeats, samplers, pruners
and the facts shared by the tuner and its report.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import random
import re
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna

from pipeline.core.config import ConfigError
from pipeline.core.errors import PipelineError
from pipeline.core.io import exclusive_lock
from pipeline.tuning.space import (
    SearchSpace,
)

log = logging.getLogger(__name__)


DEFAULT_SPACE = "pipeline/configs/search_space.yaml"


STUDIES_DIR = "studies"


SAMPLERS = ("tpe", "random", "cmaes")


PRUNERS = ("median", "hyperband", "none")


DIRECTIONS = ("maximize", "minimize")


_STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def retried_from(trial: optuna.Trial) -> int | None:
    """Number of the dead worker's trial that ``trial`` retries, or None for a fresh trial."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        origin = RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen)
    return None if origin is None else int(origin)


def storage_url(study: str, storage: str | None) -> str:
    """``storage`` or the default ``sqlite:///studies/<study>.db``."""
    if storage:
        return storage
    return f"sqlite:///{Path(STUDIES_DIR) / f'{study}.db'}"


def _sqlite_path(url: str) -> Path | None:
    if url.startswith("sqlite:///") and ":memory:" not in url:
        return Path(url[len("sqlite:///") :].split("?", 1)[0])
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

        path = Path(url[len("journal:") :])
        if not path.name:
            raise ConfigError(f"storage: {url!r} needs a file name, e.g. journal:studies/demo.log")
        if must_exist and not path.is_file():
            raise PipelineError(f"{path}: journal file not found (run make tune first)")
        path.parent.mkdir(parents=True, exist_ok=True)
        if heartbeat_interval:
            log.warning(
                "journal storage has no heartbeats: a trial whose worker dies stays RUNNING (use a database "
                "storage to retry it)"
            )
        return JournalStorage(JournalFileBackend(str(path)))
    if "://" not in url:
        raise ConfigError(
            f"storage: {url!r} is neither an SQLAlchemy URL (sqlite:///file.db, postgresql+psycopg2://...) nor "
            "journal:<path>"
        )
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
    with exclusive_lock(path):
        yield


def load_existing_study(study: str, storage: str | None) -> optuna.Study:
    """An existing study (for reports); a missing one lists the studies of the storage."""
    url = storage_url(study, storage)
    store = open_storage(url, must_exist=True)
    try:
        return optuna.load_study(study_name=study, storage=store)
    except KeyError as exc:
        names = optuna.get_all_study_names(store)
        raise PipelineError(f"study {study!r} not found in {url}; studies there: {', '.join(names) or 'none'}") from exc


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
            raise ConfigError(
                f"sampler=cmaes samples float/int parameters only; {space.path} has categorical or conditional "
                f"ones: {', '.join(keys)} (use sampler=tpe)"
            )
        if importlib.util.find_spec("cmaes") is None:
            raise ConfigError("sampler=cmaes needs the cmaes package (pip install cmaes)")
        return optuna.samplers.CmaEsSampler(seed=seed)


def make_pruner(name: str, startup_trials: int = 3, warmup_steps: int = 1) -> optuna.pruners.BasePruner:
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=warmup_steps)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource="auto", reduction_factor=3)
    return optuna.pruners.NopPruner()
