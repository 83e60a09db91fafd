"""The plan of a budgeted run: which recipe, how many epochs, which TTA sets are tried, and the
minutes each stage is expected to take, so that the whole run uses most of the budget (at least
0.8) and never more than it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pipeline.core.errors import PipelineError
from pipeline.core.tables import format_table
from pipeline.engine.train_config import TrainConfig
from pipeline.inference.tta import view_cost
from pipeline.planning.budget import format_duration
from pipeline.planning.probe import Recipe, Throughput

MIN_EPOCHS = 4  # a recipe that cannot train this many epochs is not planned
TARGET_EPOCHS = 24  # a portfolio plan (screening, folds, ensembles) gives every run at least this many
SIZE_EPOCHS = 12  # the single-recipe plan: the largest size that still gets this many epochs is preferred
STAGE_OVERHEAD_S = 6.0  # start-up of one stage process (imports, reading the data)
EPOCH_OVERHEAD_S = 3.0  # per epoch: checkpoint, metrics, curves
OOF_SCALE = TrainConfig.oof_scale  # validation maps are stored at this fraction of the trained side
DEFAULT_CHECKPOINT_MB = 60.0  # a plan read back from an older plan.json, made before the probe measured it
VALIDATIONS = 6  # a budgeted run validates about this many times (and always at its last epoch)
# Each image of a written prediction set, beyond its forward pass: its class maps resized, scored at the
# image's own size and stored near the trained size, in seconds per class-megapixel of the trained size
# (ccp, 59 classes, on a 2-core CPU: 0.047 to 0.094 a set at 192x128 and 320x192, 1.6 and 2.9 minutes
# for two OOF sets of 156 images and 200 test images, of which the forward passes took 8 and 19 s)
MAPS_S_PER_CLASS_MPX = 0.065


@dataclass
class Plan:
    throughput: Throughput
    epochs: int
    train_s: float  # the training stage's time budget (training + validation)
    n_train: int
    n_val: int
    n_test: int
    tta_candidates: list[str]
    stages_s: dict[str, float] = field(default_factory=dict)
    budget_s: float = 0.0
    disk_mb: float = 0.0
    epoch_images: int = 0  # images one epoch goes through (repeat-factor sampling repeats rare ones); 0: n_train
    model_options: dict = field(default_factory=dict)  # the family builder's options (probe and training)
    progressive: float = 0.0  # share of the epochs trained at the progressive-resizing size
    candidates: dict = field(default_factory=dict)  # family:encoder -> the weights record each candidate starts from

    @property
    def recipe(self):
        return self.throughput.recipe

    @property
    def weights(self) -> dict:
        """The recipe's starting weights (a :mod:`pipeline.models.pretrained` record; empty: from scratch)."""
        return dict(self.candidates.get(f"{self.recipe.model}:{self.recipe.encoder}") or {})

    @property
    def images_per_epoch(self) -> int:
        return self.epoch_images or self.n_train

    @property
    def planned_s(self) -> float:
        return sum(self.stages_s.values())

    def table(self) -> str:
        r = self.recipe
        rows = [
            ["recipe", f"{r.model} / {r.encoder}, {r.size[0]}x{r.size[1]}, batch {r.batch}"],
            *[[f"  {k}", str(v)] for k, v in sorted(self.model_options.items())],
            ["weights", describe_weights(self.weights)],
            *(
                [["candidates", ", ".join(f"{m} ({r.get('source', 'scratch')})" for m, r in self.candidates.items())]]
                if self.candidates
                else []
            ),
            [
                "training",
                f"about {self.epochs} epochs on {self.n_train} images"
                + (
                    f" ({self.images_per_epoch} per epoch, rare classes repeated)"
                    if self.images_per_epoch != self.n_train
                    else ""
                )
                + (
                    f", the first {int(self.progressive * self.epochs)} at a smaller size (progressive resizing)"
                    if int(self.progressive * self.epochs)
                    else ""
                )
                + f", validated on {self.n_val} (fold 0); sized to its time after 2 epochs",
            ],
            [
                "measured",
                f"{self.throughput.step_s:.3f} s per step"
                + (f" ({self.throughput.low_step_s:.3f} s smaller)" if self.throughput.low_step_s else "")
                + f", {self.throughput.image_s * 1000:.1f} ms per image",
            ],
            ["TTA tried on OOF", ", ".join(self.tta_candidates)],
            *[[f"stage: {k}", format_duration(v)] for k, v in self.stages_s.items()],
            [
                "planned",
                f"{format_duration(self.planned_s)} of {format_duration(self.budget_s)} "
                f"({self.planned_s / max(self.budget_s, 1e-9):.0%})",
            ],
            ["disk", f"about {self.disk_mb:.0f} MB"],
        ]
        return format_table(["plan", ""], rows)


def describe_weights(record: dict) -> str:
    """One line for a weight record: where the encoder's weights come from, the file and its sha256."""
    from pipeline.models.pretrained import WeightSource

    return WeightSource.from_dict(record).describe() if record else "none (random init)"


def candidate_size(size: tuple[int, int], fraction: float, divisor: int) -> tuple[int, int]:
    """A candidate recipe's input size: ``fraction`` of the data's most common ``size`` (H, W), each
    side rounded to a multiple of the model's divisor (at least 32), never below one."""
    d = max(32, int(divisor))
    return max(d, round(size[0] * fraction / d) * d), max(d, round(size[1] * fraction / d) * d)


def val_every(epochs: int) -> int:
    """Epochs between validations of a budgeted run: validation is for the curve and the best
    checkpoint, and on a CPU it costs about a tenth of an epoch, so it runs about VALIDATIONS times
    (not every epoch of an 11-epoch run, as flooring the ratio would)."""
    return max(1, round(epochs / VALIDATIONS))


def epoch_seconds(t: Throughput, epoch_images: int, n_val: int, progressive: float = 0.0) -> float:
    """Mean seconds of an epoch; with ``progressive``, that share of the epochs steps at the smaller size."""
    steps = max(1, epoch_images // t.recipe.batch)
    step_s = (1 - progressive) * t.step_s + progressive * (t.low_step_s or t.step_s)
    return steps * step_s + n_val * t.image_s + EPOCH_OVERHEAD_S


def maps_seconds(t: Throughput, num_classes: int) -> float:
    """Seconds per image of one written prediction set beyond the forward pass."""
    h, w = t.recipe.size
    return MAPS_S_PER_CLASS_MPX * num_classes * h * w / 1e6


def predict_seconds(
    t: Throughput, n_val: int, n_test: int, tta: list[str], num_classes: int = 0, chosen_views: int = 2
) -> float:
    """OOF predictions with each TTA set and the test predictions with the chosen one (``chosen_views``
    views), each image written with its ``num_classes`` maps (:func:`maps_seconds`)."""
    maps_s = maps_seconds(t, num_classes)
    val = sum(view_cost(name) for name in tta) * n_val * t.image_s + len(tta) * n_val * maps_s
    return val + chosen_views * n_test * t.image_s + n_test * maps_s


def disk_mb(
    t: Throughput, n_val: int, n_test: int, tta: list[str], num_classes: int, oof_scale: float = OOF_SCALE
) -> float:
    """Megabytes a budgeted run writes: ``best.pt`` and ``last.pt``, float16 probability maps of the
    validation images for the training's own OOF store and each TTA set tried (at ``oof_scale`` of
    the trained side), and of the test images with the chosen set (at the trained size)."""
    h, w = t.recipe.size
    checkpoints = 2 * (t.checkpoint_mb or DEFAULT_CHECKPOINT_MB)
    val = (1 + len(tta)) * n_val * num_classes * h * w * 2 * oof_scale**2
    test = n_test * num_classes * h * w * 2
    return checkpoints + (val + test) / 1e6


def make_plan(
    candidates: list[Throughput],
    budget_s: float,
    n_train: int,
    n_val: int,
    n_test: int,
    tta: list[str],
    num_classes: int,
    epoch_images: int | None = None,
    oof_scale: float = OOF_SCALE,
    progressive: float = 0.0,
) -> Plan:
    """The largest recipe that trains at least SIZE_EPOCHS epochs (the largest size, then the larger
    model: the larger checkpoint, else the slower step, which a noisy probe can invert; else the one
    with most epochs),
    with training sized to use what the other stages leave of ``budget_s``.  ``epoch_images``: the
    images one epoch goes through when repeat-factor sampling repeats some (default ``n_train``)."""
    per_epoch = epoch_images or n_train
    options = []
    for t in candidates:
        fixed = {
            "train set-up": STAGE_OVERHEAD_S * 2,
            "predict (OOF with each TTA, test)": predict_seconds(t, n_val, n_test, tta, num_classes) * 1.2
            + STAGE_OVERHEAD_S * len(tta)
            + STAGE_OVERHEAD_S,
            "ensemble, submit, score": STAGE_OVERHEAD_S * 4 + 0.02 * (n_val + n_test),
        }
        train_s = budget_s * 0.97 - sum(fixed.values())
        epochs = int(train_s // epoch_seconds(t, per_epoch, n_val, progressive))
        options.append((t, epochs, train_s, fixed))
    feasible = [o for o in options if o[1] >= MIN_EPOCHS]
    if not feasible:
        best = max(options, key=lambda o: o[1])
        raise PipelineError(
            f"a budget of {format_duration(budget_s)} is too short: the fastest recipe "
            f"({best[0].recipe.name}) fits {max(best[1], 0)} epochs, at least {MIN_EPOCHS} are needed"
        )
    rich = [o for o in feasible if o[1] >= SIZE_EPOCHS]
    pool = rich or feasible
    t, epochs, train_s, fixed = (
        max(pool, key=lambda o: (o[0].recipe.size[0] * o[0].recipe.size[1], o[0].checkpoint_mb, o[0].step_s))
        if rich
        else max(pool, key=lambda o: o[1])
    )
    stages = {"train (fold 0)": train_s, **fixed}
    disk = disk_mb(t, n_val, n_test, tta, num_classes, oof_scale)
    plan = Plan(t, epochs, train_s, n_train, n_val, n_test, tta, stages, budget_s, math.ceil(disk), per_epoch)
    plan.progressive = progressive
    return plan


def plan_to_dict(plan: Plan) -> dict:
    t = plan.throughput
    return {
        "recipe": {
            "model": t.recipe.model,
            "encoder": t.recipe.encoder,
            "size": list(t.recipe.size),
            "batch": t.recipe.batch,
        },
        "step_s": t.step_s,
        "image_s": t.image_s,
        "checkpoint_mb": t.checkpoint_mb,
        "low_step_s": t.low_step_s,
        "progressive": plan.progressive,
        "epochs": plan.epochs,
        "train_s": plan.train_s,
        "n_train": plan.n_train,
        "n_val": plan.n_val,
        "n_test": plan.n_test,
        "tta": list(plan.tta_candidates),
        "stages_s": plan.stages_s,
        "budget_s": plan.budget_s,
        "disk_mb": plan.disk_mb,
        "epoch_images": plan.images_per_epoch,
        "model_options": plan.model_options,
        "candidates": plan.candidates,
    }


def plan_from_dict(d: dict) -> Plan:
    r = d["recipe"]
    t = Throughput(
        Recipe(r["model"], r["encoder"], tuple(r["size"]), int(r["batch"])),
        d["step_s"],
        d["image_s"],
        float(d.get("checkpoint_mb", 0.0)),
        float(d.get("low_step_s", 0.0)),
    )
    return Plan(
        t,
        int(d["epochs"]),
        float(d["train_s"]),
        int(d["n_train"]),
        int(d["n_val"]),
        int(d["n_test"]),
        list(d["tta"]),
        dict(d["stages_s"]),
        float(d["budget_s"]),
        float(d["disk_mb"]),
        int(d.get("epoch_images", 0)),
        dict(d.get("model_options", {})),
        float(d.get("progressive", 0.0)),
        dict(d.get("candidates") or {}),
    )
