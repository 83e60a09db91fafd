"""The tuning stage's config (``make tune``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.core.errors import ConfigError
from pipeline.tuning.study import _STUDY_NAME, DEFAULT_SPACE, DIRECTIONS, PRUNERS, SAMPLERS


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
            raise ConfigError(
                f"study: {self.study!r} must be letters, digits, '_', '.' or '-' (it names files and folders)"
            )
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
