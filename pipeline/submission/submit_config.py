"""The submit stage's settings (``make submit``): importable without the stage, as the auto-pilot builds them."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.core.errors import ConfigError
from pipeline.inference.ensemble import split_paths
from pipeline.submission.formats import check_format_options


@dataclass
class SubmitConfig:
    name: str = "submission"
    ensemble: str | None = None  # a weights.yaml; default <ensembles_dir>/<name>/weights.yaml when it exists
    runs: list[str] | None = None  # or: plain average of these members' test stores
    tta: str = "auto"  # with runs: which test_<tta> stores (auto: the only one present; none: without TTA)
    ensembles_dir: str = "ensembles"
    data_dir: str = "data/demo"
    test_ann: str = "test.json"
    format: str = "auto"  # auto: the header of <data_dir>/sample_submission.csv, else rle; rle; dense
    order: str = "F"  # F: column-major (the contest's), C: row-major
    dense_size: list[int] = field(default_factory=lambda: [256, 256])
    out_dir: str = "submissions"
    check: bool = True  # run the validator on the written file before it replaces the old one
    postprocess: str = "auto"  # auto: the ensemble's postprocess.yaml (chosen on OOF) when it has one; none
    progress: bool = True

    def __post_init__(self) -> None:
        if self.runs is not None:
            self.runs = split_paths(self.runs)

    def validate(self) -> None:
        if self.postprocess not in ("auto", "none"):
            raise ConfigError(f"postprocess: unknown {self.postprocess!r}; known: auto, none")
        """Raise ConfigError on bad settings."""
        if not self.name.strip() or "/" in self.name:
            raise ConfigError(f"name must be a plain file name, got {self.name!r}")
        check_format_options(self.format, self.order, self.dense_size, allow_auto=True)
        if self.ensemble and self.runs:
            raise ConfigError("give either ensemble=<weights.yaml> or runs=..., not both")
        if self.runs is not None and not self.runs:
            raise ConfigError("runs is empty")
