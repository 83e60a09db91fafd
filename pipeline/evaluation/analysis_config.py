"""The error-analysis stage's settings (``make analyze``), importable without the stage (the auto-pilot
builds them)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.core.errors import ConfigError


@dataclass
class AnalyzeConfig:
    runs: list[str] = field(default_factory=list)  # members (their OOF stores), plain mean
    name: str | None = None  # or an ensemble: ensembles/<name>/weights.yaml (its weights, bias, method)
    tta: str = "auto"  # with runs: auto, the only TTA present; none: the stores without TTA
    ensembles_dir: str = "ensembles"
    data_dir: str = "data/demo"
    ann_file: str = "train_all.json"
    out_dir: str = "reports/analyze"
    threshold: float = 0.9  # "confident" for the label-error ranking
    worst: int = 8
    n_boot: int = 1000
    seed: int = 0
    progress: bool = True

    def validate(self) -> None:
        if not self.runs and not self.name:
            raise ConfigError('give runs="runs/a runs/b" or name=<ensemble>')
        if not 0.5 <= self.threshold < 1:
            raise ConfigError(f"threshold must be in [0.5, 1), got {self.threshold}")
