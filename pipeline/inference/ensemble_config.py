"""The ensemble stage's settings (``make ensemble``), importable without the stage (the auto-pilot builds
them)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.core.errors import ConfigError
from pipeline.inference.ensemble import METHODS, split_paths
from pipeline.inference.postprocessing import POSTPROCESSORS


@dataclass
class EnsembleConfig:
    runs: list[str] = field(default_factory=list)  # runs/<exp> or runs/<exp>/fold<k>; spaces or commas
    tta: str = "auto"  # auto: the only TTA present in each member; none: the stores without TTA
    data_dir: str = "data/demo"
    ann_file: str = "train_all.json"
    method: str = "mean"
    tune: bool = True
    tune_bias: bool = False  # a per-class bias on log-probabilities (method mean), kept if its cross-fitted gain holds
    bias_range: float = 3.0  # bias values tried: -bias_range .. bias_range by bias_step
    bias_step: float = 0.5
    bias_sweeps: int = 2  # coordinate-ascent sweeps over the classes
    # greedy ensemble selection with replacement (Caruana et al. 2004): at most this many additions; 0: off
    greedy_rounds: int = 20
    n_trials: int = 100  # weight trials (TPE)
    seed: int = 0
    out_dir: str = "ensembles"
    name: str = "ensemble"
    max_images: int | None = None  # subsample the OOF images (seeded) for speed
    n_boot: int = 1000  # bootstrap replicates of every interval and of the selection rule (seeded by seed)
    level: float = 0.9  # level of the intervals
    test_ann: str = "test.json"  # its number of images is the test-set size of the shake-up estimate
    test_images: int | None = None  # test-set size when data_dir has no test_ann (None: the OOF images)
    public_share: float = 0.5  # share of the test images on the public leaderboard
    shakeup_splits: int = 1000  # random public/private splits of the shake-up estimate
    # a post-processor (none, min_area, crf, ...), or several simplest first (min_area,crf): each tuned on OOF,
    # one kept only by the selection rule
    postprocess: str = "none"
    progress: bool = True

    def validate(self) -> None:
        self.runs = split_paths(self.runs)
        if not self.runs:
            raise ConfigError('runs is required: experiment folders such as runs="runs/unet-demo runs/fpn-demo"')
        unknown = [n for n in str(self.postprocess).split(",") if n.strip() not in POSTPROCESSORS]
        if unknown:
            raise ConfigError(f"postprocess: unknown {unknown[0]!r}; known: {', '.join(POSTPROCESSORS.names())}")
        if self.method not in METHODS:
            raise ConfigError(f"method: unknown {self.method!r}; known: {', '.join(METHODS)}")
        if self.greedy_rounds < 0:
            raise ConfigError(f"greedy_rounds must be >= 0, got {self.greedy_rounds}")
        if self.n_trials < 0:
            raise ConfigError(f"n_trials must be >= 0, got {self.n_trials}")
        if self.bias_range <= 0 or not 0 < self.bias_step <= self.bias_range:
            raise ConfigError(
                "bias_range and bias_step must be positive, the step at most the range; "
                f"got {self.bias_range} and {self.bias_step}"
            )
        if self.bias_sweeps < 1:
            raise ConfigError(f"bias_sweeps must be at least 1, got {self.bias_sweeps}")
        if self.max_images is not None and self.max_images < 1:
            raise ConfigError(f"max_images must be at least 1, got {self.max_images}")
        if not self.name.strip():
            raise ConfigError("name must not be empty")
        if self.n_boot < 1 or self.shakeup_splits < 1:
            raise ConfigError(f"n_boot and shakeup_splits must be >= 1, got {self.n_boot} and {self.shakeup_splits}")
        if not 0 < self.level < 1 or not 0 < self.public_share < 1:
            raise ConfigError(f"level and public_share must lie in (0, 1), got {self.level} and {self.public_share}")
        if self.test_images is not None and self.test_images < 2:
            raise ConfigError(f"test_images must be at least 2, got {self.test_images}")
