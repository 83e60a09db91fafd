"""What a budgeted run's work costs, in one place: the constants that price or bound it (each name
says its unit: ``_S`` seconds, ``_MB`` megabytes, ``_EPOCHS`` epochs, ``_FRACTION`` a share of a
whole, ``_FACTOR`` a multiplier) and the formulas that turn a recipe's measured seconds per step and
per image into seconds of an epoch, of written predictions and megabytes on disk.

Where a figure was fitted on a run, docs/measurements.md holds the run (data, budget, command,
result); the planner only reads the values."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.engine.train_config import TrainConfig


@dataclass(frozen=True)
class Recipe:
    """What the probe measures: a model on an encoder (or a whole model's hub id) at a size and batch."""

    model: str
    encoder: str
    size: tuple[int, int]  # (H, W)
    batch: int

    @property
    def name(self) -> str:
        return f"{self.model}-{self.encoder}-{self.size[0]}x{self.size[1]}"


@dataclass(frozen=True)
class Throughput:
    """A recipe's cost on a device, measured by the probe or read from a device profile."""

    recipe: Recipe
    step_s: float  # one optimizer step of ``batch`` images, loop overhead included
    image_s: float  # prediction of one image (one view)
    checkpoint_mb: float = 0.0  # one checkpoint file (weights and AdamW's two moments); 0: not measured
    low_step_s: float = 0.0  # one step at the progressive-resizing size; 0: not measured (no progressive phase)

    def to_dict(self) -> dict[str, Any]:
        r = self.recipe
        return {
            "model": r.model,
            "encoder": r.encoder,
            "size": list(r.size),
            "batch": r.batch,
            "step_s": self.step_s,
            "image_s": self.image_s,
            "checkpoint_mb": self.checkpoint_mb,
            "low_step_s": self.low_step_s,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Throughput:
        recipe = Recipe(str(d["model"]), str(d["encoder"]), (int(d["size"][0]), int(d["size"][1])), int(d["batch"]))
        return cls(recipe, float(d["step_s"]), float(d["image_s"]), float(d["checkpoint_mb"]), float(d["low_step_s"]))

    def scaled(self, size: Sequence[int], batch: int) -> Throughput:
        """This measurement at another size and batch, in proportion to the pixels a step goes through."""
        pixels = size[0] * size[1] / (self.recipe.size[0] * self.recipe.size[1])
        recipe = Recipe(self.recipe.model, self.recipe.encoder, (int(size[0]), int(size[1])), int(batch))
        step = self.step_s * pixels * batch / self.recipe.batch
        low = self.low_step_s * pixels * batch / self.recipe.batch
        return Throughput(recipe, step, self.image_s * pixels, self.checkpoint_mb, low)


# --------------------------------------------------------------------------- budget shares
PLANNED_BUDGET_FRACTION = 0.97  # a plan fills at most this share; the rest absorbs stage start-ups and noise
PROBE_BUDGET_FRACTION = 0.08  # the probe measures no further recipe once it has used this share
RUN_SLACK_FACTOR = 1.25  # a time-budgeted run may take this much more than its even share of the time left
MIN_RUN_S = 30.0  # the least time budget any training run is given

# --------------------------------------------------------------------------- epochs a run
MIN_EPOCHS = 4  # a recipe that cannot train this many epochs is not planned
SIZE_EPOCHS = 12  # the single-recipe plan prefers the largest size that still trains this many
TARGET_EPOCHS = 24  # a plan of several runs (screening, folds, ensembles) gives each at least this many
MAX_EPOCHS = 60  # beyond this the budget buys more models, folds and a pseudo-label round, not longer runs
# a run that is the plan's only one may train up to this many times its planned epochs when it runs
# faster than priced (its time budget sizes it after its second epoch)
SINGLE_RUN_STRETCH_FACTOR = 3
VALIDATIONS = 6  # a budgeted run validates about this many times (and always at its last epoch)

# --------------------------------------------------------------------------- shapes of a plan
MAX_FAMILIES = 3  # an ensemble of two or three families
MIN_FOLDS = 3  # with partial=folds, the fewest folds a winner is given
# the single-recipe plan's sizes below the recipes' own, tried (smallest last) before a budget is refused
SMALLER_SIZE_FRACTIONS = (0.375, 0.25)
MIN_SIDE_PX = 32  # no candidate side is below this (nor below the model's input divisor)

# --------------------------------------------------------------------------- seconds of work
# what the training loop adds to the bare model's step (loading, augmentation, loss, bookkeeping): the
# probe's step is multiplied by it
LOOP_OVERHEAD_FACTOR = 1.15
STAGE_START_S = 6.0  # start-up of one stage process (imports, reading the data)
EPOCH_OVERHEAD_S = 3.0  # per epoch: checkpoint, metrics, curves
PREDICT_SAFETY_FACTOR = 1.2  # predictions are priced this much above their measured seconds
# each image of a written prediction set, beyond its forward pass: its class maps resized, scored at
# the image's own size and stored near the trained size, per class-megapixel of the trained size
MAPS_S_PER_CLASS_MPX = 0.065
ENSEMBLE_S_PER_IMAGE = 0.02  # weight search on OOF maps, per image and member
POSTPROCESS_S_PER_IMAGE = 0.05  # post-processing tuned on OOF maps (min-area sweeps), per image
# the dense CRF on one image at its working side (256 pixels), per class and per host core; its tuning tries
# each of its candidate weights on every OOF image, and the chosen one runs on every test image
# (benchmarks/bench_crf.py, docs/measurements.md)
CRF_S_PER_IMAGE_CLASS = 0.41
SUBMIT_S_PER_IMAGE = 0.02  # encoding, validating and scoring a submission, per test image
FOLDS_S_PER_IMAGE = 0.02  # the folds stage: perceptual hashes of the labelled images, per image
# the image cache: decoding a labelled image, resizing it and its ground-truth map to the training size and
# writing both, per megapixel of that size (the image cache's build time in benchmarks/bench_loader.py)
IMAGE_CACHE_S_PER_MPX = 0.1
PROBE_BUILD_S = 3.0  # the probe: building one recipe's model
PROBE_STEPS = 6  # the probe: steps (and batched forwards) timed per recipe and size, its warm-up included

# --------------------------------------------------------------------------- disk
DEFAULT_CHECKPOINT_MB = 60.0  # one checkpoint where the probe measured none
OOF_SCALE = TrainConfig.oof_scale  # validation maps are stored at this fraction of the trained side


def epoch_seconds(t: Throughput, epoch_images: int, n_val: int, progressive: float = 0.0) -> float:
    """Mean seconds of an epoch; with ``progressive``, that share of the epochs steps at the smaller size."""
    steps = max(1, epoch_images // t.recipe.batch)
    step_s = (1 - progressive) * t.step_s + progressive * (t.low_step_s or t.step_s)
    return steps * step_s + n_val * t.image_s + EPOCH_OVERHEAD_S


def maps_seconds(t: Throughput, num_classes: int) -> float:
    """Seconds per image of one written prediction set beyond the forward pass."""
    h, w = t.recipe.size
    return MAPS_S_PER_CLASS_MPX * num_classes * h * w / 1e6


def crf_seconds(num_classes: int, cores: int) -> float:
    """Seconds of the dense CRF on one image on a host with ``cores`` cores."""
    return CRF_S_PER_IMAGE_CLASS * num_classes / max(1, cores)


def image_cache_mb(n_images: int, sizes: Sequence[Sequence[int]], num_classes: int) -> float:
    """Megabytes of the image caches of ``n_images`` labelled images at each training size."""
    from pipeline.data.image_cache import cache_bytes

    return sum(cache_bytes(n_images, size, num_classes) for size in {tuple(map(int, s)) for s in sizes}) / 1e6


def image_cache_seconds(n_images: int, sizes: Sequence[Sequence[int]]) -> float:
    """Seconds of building those caches."""
    return sum(IMAGE_CACHE_S_PER_MPX * n_images * h * w / 1e6 for h, w in {tuple(map(int, s)) for s in sizes})


def probe_seconds(t: Throughput) -> float:
    """Seconds the probe takes to measure one recipe at one size: its model built, its steps and
    batched forwards timed (the progressive-resizing size's steps too where it measured them)."""
    return PROBE_BUILD_S + PROBE_STEPS * (t.step_s + t.low_step_s + t.recipe.batch * t.image_s)


def checkpoint_mb(t: Throughput) -> float:
    return t.checkpoint_mb or DEFAULT_CHECKPOINT_MB


def maps_mb(t: Throughput, images: float, num_classes: int, scale: float) -> float:
    """Megabytes of float16 class maps of ``images`` stored at ``scale`` of the trained side."""
    h, w = t.recipe.size
    return images * num_classes * h * w * 2 * scale**2 / 1e6


def makespan(seconds: Sequence[float], slots: int) -> float:
    """Wall seconds of independent jobs on ``slots`` devices by list scheduling, the longest first: each
    job goes to the device that frees first."""
    loads = [0.0] * max(1, int(slots))
    for s in sorted(seconds, reverse=True):
        loads[loads.index(min(loads))] += s
    return max(loads)


def val_every(epochs: int) -> int:
    """Epochs between validations of a budgeted run: about VALIDATIONS times a run (validation is for
    the curve and the best checkpoint), every epoch for short runs."""
    return max(1, round(epochs / VALIDATIONS))


def candidate_size(size: Sequence[int], fraction: float, divisor: int) -> tuple[int, int]:
    """A candidate's input size: ``fraction`` of the data's most common ``size`` (H, W), each side
    rounded to a multiple of the model's divisor (at least MIN_SIDE_PX), never below one."""
    d = max(MIN_SIDE_PX, int(divisor))
    return max(d, round(size[0] * fraction / d) * d), max(d, round(size[1] * fraction / d) * d)


def store_scale(train_size: Sequence[int], test_size: Sequence[int], multi: bool = False) -> float:
    """The scale test maps are stored at: about the trained size (the model's own resolution), not each
    image's, so 4 to 5 times less is written when training ran at half size; the submission resizes them
    to the image bilinearly as it would have.  ``multi``: one of many test runs an ensemble averages,
    kept at the OOF maps' scale."""
    (th, tw), (h, w) = train_size, test_size
    return min(1.0, max(th / h, tw / w)) * (OOF_SCALE if multi else 1.0)
