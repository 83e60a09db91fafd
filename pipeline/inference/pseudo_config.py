"""The pseudo-label stage's settings (``make pseudo``), importable without the stage (the auto-pilot
builds them)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.core.errors import ConfigError


@dataclass
class PseudoConfig:
    name: str = "pseudo"  # an ensemble name (ensembles/<name>/weights.yaml) and the output folder name
    ensemble: str | None = None  # a weights.yaml (default ensembles/<name>/weights.yaml)
    runs: list[str] | None = None  # or: the plain mean of these runs' test stores
    tta: str = "auto"  # with runs: auto, the only TTA present; none: the stores without TTA
    ensembles_dir: str = "ensembles"
    data_dir: str = "data/demo"
    test_ann: str = "test.json"
    threshold: float = 0.9
    class_thresholds: dict[str, float] = field(default_factory=dict)  # class name -> threshold
    out_dir: str = "pseudo"
    progress: bool = True

    def validate(self) -> None:
        if not self.name.strip() or "/" in self.name:
            raise ConfigError(f"name must be a plain folder name, got {self.name!r}")
        for key, t in {"threshold": self.threshold, **self.class_thresholds}.items():
            if not 0 < float(t) <= 1:
                raise ConfigError(f"threshold of {key!r} must be in (0, 1], got {t}")
