"""The budget planner: a pure function of the dataset fingerprint, each candidate recipe's measured
(or profiled) seconds per step and per predicted image, and the budget, that returns the stages of a
budgeted run with their minutes and disk.

Plans, richest first; the first that fits with at least ``TARGET_EPOCHS`` epochs a run is taken,
with as many epochs (up to ``EPOCHS_CAP``) as the budget allows:

4. screening by successive halving on fold 0, two or three families of survivors on all k folds,
   their ensemble, a pseudo-label round (the strongest survivor retrained on every fold with the test
   images' pseudo labels), and the reserve;
3. the same without the pseudo-label round;
2. screening, and the winner on all k folds, or, when not every fold fits, a refit on all labelled
   images (``partial="refit"``, the default) or as many folds as fit, at least 3 (``partial="folds"``);
1. the single-recipe plan (:func:`pipeline.planning.plan.make_plan`: one recipe, fold 0).

Within a level: more families, then all folds before a refit, then more candidates screened, then more
epochs.  Costs are worst cases: at every rung of the screening the most expensive candidates are the
ones promoted.  The reserve prices what comes after training: OOF predictions with each TTA set (its
views counted by their pixels), test predictions, ensemble weights, post-processing tuning, the
submission and its score."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from pipeline.core.errors import PipelineError
from pipeline.core.tables import format_table
from pipeline.inference.tta import view_cost
from pipeline.planning.budget import format_duration
from pipeline.planning.fingerprint import Fingerprint
from pipeline.planning.plan import (
    DEFAULT_CHECKPOINT_MB,
    MIN_EPOCHS,
    OOF_SCALE,
    STAGE_OVERHEAD_S,
    TARGET_EPOCHS,
    Plan,
    epoch_seconds,
    make_plan,
    maps_seconds,
    plan_to_dict,
)
from pipeline.planning.probe import Throughput

EPOCHS_CAP = 60  # beyond this the budget buys more models, folds and a pseudo-label round, not longer runs
MAX_FAMILIES = 3  # an ensemble of two or three families (the contest's gain: +0.01 to +0.03)
BUDGET_SHARE = 0.97  # the plan leaves this share of the budget's end unplanned (stage start-ups, noise)
PREDICT_SAFETY = 1.2  # predictions are priced 20% above their measured seconds
ENSEMBLE_S_PER_IMAGE = 0.02  # weight search on OOF maps, per image and member (CPU work)
POSTPROCESS_S_PER_IMAGE = 0.05  # post-processing tuned on OOF maps (min-area sweeps), per image
SUBMIT_S_PER_IMAGE = 0.02  # encoding, validating and scoring a submission, per test image
MIN_FOLDS = 3  # with partial="folds", the fewest folds a winner is given


@dataclass(frozen=True)
class Candidate:
    """One portfolio recipe as the planner sees it: its family and its cost on the device."""

    name: str
    family: str
    throughput: Throughput
    weights: str = ""  # where its weights come from, one line

    def epoch_s(self, images: float, n_val: int) -> float:
        return epoch_seconds(self.throughput, int(round(images)), n_val)


@dataclass
class Stage:
    name: str
    seconds: float
    disk_mb: float = 0.0
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "seconds": round(self.seconds, 1),
            "disk_mb": round(self.disk_mb),
            "detail": self.detail,
        }


@dataclass
class Schedule:
    level: int
    kind: str
    budget_s: float
    fingerprint: Fingerprint
    k: int
    tta: list[str]
    epochs: int = 0
    screened: list[Candidate] = field(default_factory=list)
    rungs: list[dict[str, int]] = field(default_factory=list)  # epoch of each comparison, runs compared, promoted
    families: int = 0  # families of survivors in the ensemble
    folds: int = 0  # folds each survivor trains (fold 0 included)
    refit: bool = False
    pseudo: bool = False
    stages: list[Stage] = field(default_factory=list)
    single: Plan | None = None  # level 1: the single-recipe plan
    device: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def planned_s(self) -> float:
        return self.single.planned_s if self.single else sum(s.seconds for s in self.stages)

    @property
    def disk_mb(self) -> float:
        return self.single.disk_mb if self.single else sum(s.disk_mb for s in self.stages)

    def to_dict(self) -> dict[str, Any]:
        return {
            "level": self.level,
            "kind": self.kind,
            "budget_s": self.budget_s,
            "planned_s": round(self.planned_s, 1),
            "disk_mb": round(self.disk_mb),
            "device": self.device,
            "fingerprint": self.fingerprint.to_dict(),
            "k": self.k,
            "tta": list(self.tta),
            "epochs": self.epochs,
            "screened": [
                {
                    "name": c.name,
                    "family": c.family,
                    "model": c.throughput.recipe.model,
                    "encoder": c.throughput.recipe.encoder,
                    "size": list(c.throughput.recipe.size),
                    "batch": c.throughput.recipe.batch,
                    "step_s": c.throughput.step_s,
                    "image_s": c.throughput.image_s,
                    "weights": c.weights,
                }
                for c in self.screened
            ],
            "rungs": self.rungs,
            "families": self.families,
            "folds": self.folds,
            "refit": self.refit,
            "pseudo": self.pseudo,
            "stages": [s.to_dict() for s in self.stages],
            "single": plan_to_dict(self.single) if self.single else None,
            "notes": self.notes,
        }

    def table(self) -> str:
        """The plan as a table: the single-recipe plan's own table at level 1, else the screened
        candidates, then the stage list."""
        head = [
            ["data", self.fingerprint.describe()],
            ["device", self.device],
            ["plan", f"level {self.level}: {self.kind}"],
        ]
        if self.single is not None:
            return format_table(["plan", ""], head) + "\n\n" + self.single.table()
        n_val = self.fingerprint.n_val(self.k)
        images = self.fingerprint.n_train(self.k) * self.fingerprint.epoch_factor
        rows = [
            [
                c.name,
                c.family,
                f"{c.throughput.recipe.size[0]}x{c.throughput.recipe.size[1]}",
                c.throughput.recipe.batch,
                f"{c.throughput.step_s:.3f}",
                f"{c.throughput.image_s * 1000:.1f}",
                format_duration(c.epoch_s(images, n_val)),
                c.weights,
            ]
            for c in self.screened
        ]
        screened = format_table(["screened", "family", "size", "batch", "s/step", "ms/image", "epoch", "weights"], rows)
        stage_rows = [[s.name, format_duration(s.seconds), f"{s.disk_mb:,.0f}", s.detail] for s in self.stages]
        stage_rows.append(
            [
                "total",
                format_duration(self.planned_s),
                f"{self.disk_mb:,.0f}",
                f"{self.planned_s / max(self.budget_s, 1e-9):.0%} of {format_duration(self.budget_s)}",
            ]
        )
        parts = [format_table(["plan", ""], head), screened, format_table(["stage", "time", "disk MB", ""], stage_rows)]
        if self.notes:
            parts.append("\n".join(f"- {n}" for n in self.notes))
        return "\n\n".join(parts)


# --------------------------------------------------------------------------- costs


def round_robin(candidates: list[Candidate]) -> list[Candidate]:
    """The candidates in the order screening takes them: the first of each family (in portfolio order),
    then the second of each, ...: a smaller screen still compares different families."""
    by_family: dict[str, list[Candidate]] = {}
    for c in candidates:
        by_family.setdefault(c.family, []).append(c)
    out: list[Candidate] = []
    for i in range(max((len(v) for v in by_family.values()), default=0)):
        out += [v[i] for v in by_family.values() if i < len(v)]
    return out


def worst_families(candidates: list[Candidate], cost, n: int) -> list[Candidate]:
    """The ``n`` costliest candidates of distinct families: the survivors a worst case promotes."""
    best: dict[str, Candidate] = {}
    for c in candidates:
        if c.family not in best or cost(c) > cost(best[c.family]):
            best[c.family] = c
    return sorted(best.values(), key=cost, reverse=True)[:n]


def rungs_of(n: int, survivors: int, epochs: int) -> list[dict[str, int]]:
    """Successive halving on fold 0: all ``n`` runs are compared at a quarter of the schedule, the better
    half (at least ``survivors``) at half of it, and ``survivors`` finish it.  Promoted runs go on with
    their schedule (no restart)."""
    marks = sorted({max(1, epochs // 4), max(1, epochs // 2), epochs})
    counts = [n, max(survivors, math.ceil(n / 2)), survivors][-len(marks) :]
    counts = [min(c, n) for c in counts]
    return [
        {"epoch": e, "runs": c, "promoted": (counts[i + 1] if i + 1 < len(counts) else c)}
        for i, (e, c) in enumerate(zip(marks, counts, strict=True))
    ]


@dataclass(frozen=True)
class _Shape:
    """One candidate plan: how many screened, families kept, folds, refit, pseudo, epochs."""

    n: int
    families: int
    folds: int
    refit: bool
    pseudo: bool
    epochs: int


class _Pricer:
    def __init__(self, fp: Fingerprint, k: int, tta: list[str], oof_scale: float):
        self.fp, self.k, self.tta, self.oof_scale = fp, k, list(tta), oof_scale
        self.n_val = fp.n_val(k)
        self.train_images = fp.n_train(k) * fp.epoch_factor
        self.views = [view_cost(t) for t in self.tta]
        self.test_views = max(self.views)  # the chosen set is not known before: the costliest

    def epoch(self, c: Candidate) -> float:
        return c.epoch_s(self.train_images, self.n_val)

    def run(self, c: Candidate, epochs: int, images: float | None = None, n_val: int | None = None) -> float:
        n_val = self.n_val if n_val is None else n_val
        images = self.train_images if images is None else images
        return STAGE_OVERHEAD_S * 2 + epochs * c.epoch_s(images, n_val)

    def map_mb(self, c: Candidate, images: float, scale: float) -> float:
        h, w = c.throughput.recipe.size
        return images * self.fp.num_classes * h * w * 2 * scale**2 / 1e6

    def ckpt_mb(self, c: Candidate) -> float:
        return c.throughput.checkpoint_mb or DEFAULT_CHECKPOINT_MB

    def predictions(self, c: Candidate, oof_folds: int, test_runs: int, tta_sets: int | None = None) -> float:
        views = self.views if tta_sets is None else [self.test_views] * tta_sets
        oof = sum(views) * oof_folds * self.n_val * c.throughput.image_s
        test = test_runs * self.test_views * self.fp.n_test * c.throughput.image_s
        written = len(views) * oof_folds * self.n_val + test_runs * self.fp.n_test  # images
        starts = STAGE_OVERHEAD_S * (len(views) * oof_folds + test_runs)
        maps = written * maps_seconds(c.throughput, self.fp.num_classes)
        return (oof + test + maps) * PREDICT_SAFETY + starts

    def stages(self, pool: list[Candidate], shape: _Shape) -> list[Stage]:
        screened = pool[: shape.n]
        kept = worst_families(screened, self.epoch, shape.families)
        out = [self.screen(screened, kept, shape), *self.training(kept, shape)]
        return out + self.reserve(kept, shape)

    def screen(self, screened: list[Candidate], kept: list[Candidate], shape: _Shape) -> Stage:
        rungs = rungs_of(shape.n, shape.families, shape.epochs)
        by_cost = sorted(screened, key=self.epoch, reverse=True)
        seconds, start = 0.0, 0
        for i, rung in enumerate(rungs):
            members = kept if i == len(rungs) - 1 else by_cost[: rung["runs"]]
            seconds += sum((rung["epoch"] - start) * self.epoch(c) + STAGE_OVERHEAD_S * 2 for c in members)
            start = rung["epoch"]
        disk = sum(2 * self.ckpt_mb(c) + self.map_mb(c, self.n_val, self.oof_scale) for c in screened)
        if shape.n == 1:  # nothing to compare: the one candidate trains straight through
            return Stage("screen 1 on fold 0 (none: the only candidate)", seconds, disk, f"{shape.epochs} epochs")
        detail = ", ".join(f"{r['runs']} compared at epoch {r['epoch']}" for r in rungs)
        return Stage(
            f"screen {shape.n} on fold 0 (successive halving)",
            seconds,
            disk,
            detail + f"; {shape.families} go{'es' * (shape.families == 1)} on",
        )

    def training(self, kept: list[Candidate], shape: _Shape) -> list[Stage]:
        """The survivors' further folds, or the winner's refit on all labelled images."""
        fp, e, out = self.fp, shape.epochs, []
        if shape.folds > 1:
            more = shape.folds - 1
            out.append(
                Stage(
                    f"folds 1-{more} of {shape.families} survivor{'s' * (shape.families > 1)}",
                    sum(more * self.run(c, e) for c in kept),
                    sum(more * (2 * self.ckpt_mb(c) + self.map_mb(c, self.n_val, self.oof_scale)) for c in kept),
                    f"{e} epochs each, {fp.n_train(self.k)} training images",
                )
            )
        if shape.refit:
            c = kept[0]
            out.append(
                Stage(
                    "refit the winner on all labelled images",
                    self.run(c, e, fp.n_labelled * fp.epoch_factor, 0),
                    2 * self.ckpt_mb(c),
                    f"{e} epochs, {fp.n_labelled} images, no validation (fold 0's OOF chooses TTA and post-processing)",
                )
            )
        return out

    def reserve(self, kept: list[Candidate], shape: _Shape) -> list[Stage]:
        """What follows training: predictions, the ensemble, the pseudo-label round, post-processing, submission."""
        fp, e = self.fp, shape.epochs
        test_runs = shape.folds + (1 if shape.refit else 0)
        # a multi-run plan keeps its test maps at the OOF scale (the ensemble averages many of them)
        test_scale = self.oof_scale if test_runs > 1 else 1.0
        oof_images = shape.folds * self.n_val
        out = [
            Stage(
                f"predict: OOF with each TTA set ({', '.join(self.tta)}), test",
                sum(self.predictions(c, shape.folds, test_runs) for c in kept),
                sum(
                    self.map_mb(c, len(self.tta) * oof_images, self.oof_scale)
                    + self.map_mb(c, test_runs * fp.n_test, test_scale)
                    for c in kept
                ),
                f"{test_runs} test run{'s' * (test_runs > 1)} per survivor",
            ),
            Stage(
                "ensemble (weights on OOF)",
                STAGE_OVERHEAD_S * 2 + ENSEMBLE_S_PER_IMAGE * (oof_images + fp.n_test) * max(1, len(kept)),
                0.0,
                f"{len(kept)} famil{'ies' if len(kept) > 1 else 'y'}, {len(kept) * test_runs} models",
            ),
        ]
        if shape.pseudo:
            c = kept[0]  # the costliest survivor stands for the strongest
            images = fp.n_train(self.k) * fp.epoch_factor + fp.n_test
            out.append(
                Stage(
                    "pseudo-label round",
                    self.k * self.run(c, e, images) + self.predictions(c, self.k, self.k, tta_sets=1),
                    self.k * (2 * self.ckpt_mb(c) + self.map_mb(c, self.n_val + fp.n_test, self.oof_scale)),
                    f"the strongest survivor on all {self.k} folds with the {fp.n_test} test images' pseudo labels, "
                    f"{e} epochs; then the ensemble again",
                )
            )
        post = STAGE_OVERHEAD_S * 2 + POSTPROCESS_S_PER_IMAGE * oof_images
        out.append(Stage("post-processing tuned on OOF", post, 0.0, "kept only when the selection rule accepts it"))
        out.append(Stage("submit, validate, score", STAGE_OVERHEAD_S * 3 + SUBMIT_S_PER_IMAGE * fp.n_test, 0.0, ""))
        return out


def _largest_epochs(
    pricer: _Pricer,
    pool: list[Candidate],
    shape: _Shape,
    usable_s: float,
    least: int = TARGET_EPOCHS,
    most: int = EPOCHS_CAP,
) -> tuple[int, list[Stage]]:
    """The most epochs (``least``..``most``) with which ``shape`` fits; 0 when none does."""
    lo, hi, found = least, most, (0, [])
    while lo <= hi:  # the cost grows with the epochs
        mid = (lo + hi) // 2
        stages = pricer.stages(pool, replace(shape, epochs=mid))
        if sum(s.seconds for s in stages) <= usable_s:
            found, lo = (mid, stages), mid + 1
        else:
            hi = mid - 1
    return found


def _shapes(pool: list[Candidate], k: int, partial: str):
    """Candidate shapes, richest first (see the module's docstring)."""
    families = len({c.family for c in pool})

    def screens(f: int):
        for n in range(len(pool), max(f, min(2, len(pool))) - 1, -1):  # a pool of one: no screen
            if len({c.family for c in pool[:n]}) >= f:
                yield n

    for level, pseudo in ((4, True), (3, False)):
        for f in range(min(MAX_FAMILIES, families), 1, -1):
            for n in screens(f):
                yield level, _Shape(n, f, k, False, pseudo, 0)
    for n in screens(1):
        yield 2, _Shape(n, 1, k, False, False, 0)
    if partial == "refit":
        for n in screens(1):
            yield 2, _Shape(n, 1, 1, True, False, 0)
    else:
        for folds in range(k - 1, MIN_FOLDS - 1, -1):
            for n in screens(1):
                yield 2, _Shape(n, 1, folds, False, False, 0)


KINDS = {
    4: "screen, {f} families x {k} folds, ensemble, pseudo-label round",
    3: "screen, {f} families x {k} folds, ensemble",
    2: "screen, the winner on {folds} folds",
}


def _schedule_of(
    level: int,
    shape: _Shape,
    pool: list[Candidate],
    stages: list[Stage],
    *,
    budget_s: float,
    fp: Fingerprint,
    k: int,
    tta: list[str],
    device: str,
    max_epochs: int,
) -> Schedule:
    kind = KINDS[level].format(f=shape.families, k=k, folds=shape.folds)
    if shape.refit:
        kind = "screen, the winner on fold 0 and refit on all labelled images"
    return Schedule(
        level,
        kind,
        budget_s,
        fp,
        k,
        tta,
        shape.epochs,
        pool[: shape.n],
        rungs_of(shape.n, shape.families, shape.epochs),
        shape.families,
        shape.folds,
        shape.refit,
        shape.pseudo,
        stages,
        device=device,
        notes=[
            f"costs are worst cases: the costliest candidates are taken as the ones promoted; "
            f"{shape.epochs} epochs (at most {max_epochs}) for every run",
        ],
    )


def plan_schedule(
    fp: Fingerprint,
    candidates: list[Candidate],
    single: list[Throughput],
    budget_s: float,
    k: int = 5,
    tta: list[str] | None = None,
    oof_scale: float = OOF_SCALE,
    progressive: float = 0.0,
    partial: str = "refit",
    device: str = "",
    level: int | None = None,
    max_screen: int | None = None,
    max_epochs: int = EPOCHS_CAP,
) -> Schedule:
    """The richest plan that fits ``budget_s`` (see the module's docstring).  ``candidates``: the
    portfolio recipes that may be screened, with their costs; ``single``: the single-recipe plan's
    throughputs (its recipe at each candidate size), planned by ``make_plan`` when nothing richer fits.
    ``level``: only plans of that level, with as few as MIN_EPOCHS epochs a run (a measurement, not a
    default; PipelineError when none fits); ``max_screen``: screen at most that many candidates (1: none,
    the first candidate is the winner)."""
    tta = list(tta or ["none", "hflip"])
    if partial not in ("refit", "folds"):
        raise ValueError(f"partial must be refit or folds, got {partial!r}")
    if level is not None and level not in (1, 2, 3, 4):
        raise ValueError(f"level must be 1, 2, 3 or 4, got {level!r}")
    pricer = _Pricer(fp, k, tta, oof_scale)
    pool = round_robin(candidates)[:max_screen]
    usable_s = budget_s * BUDGET_SHARE
    least = min(max_epochs, TARGET_EPOCHS if level is None else MIN_EPOCHS)
    for shape_level, shape in _shapes(pool, k, partial):
        if level is not None and shape_level != level:
            continue
        epochs, stages = _largest_epochs(pricer, pool, shape, usable_s, least, max_epochs)
        if not epochs:
            continue
        common = dict(budget_s=budget_s, fp=fp, k=k, tta=tta, device=device, max_epochs=max_epochs)
        return _schedule_of(shape_level, replace(shape, epochs=epochs), pool, stages, **common)
    if level not in (None, 1):
        raise PipelineError(
            f"no plan of level {level} fits {format_duration(budget_s)} with {MIN_EPOCHS} epochs a run "
            f"({len(pool)} candidate{'s' * (len(pool) != 1)}, k={k}, partial={partial})"
        )
    n_train, n_val = fp.n_train(k), fp.n_val(k)
    plan = make_plan(
        single,
        budget_s,
        n_train,
        n_val,
        fp.n_test,
        tta,
        fp.num_classes,
        int(round(n_train * fp.epoch_factor)),
        oof_scale=oof_scale,
        progressive=progressive,
    )
    return Schedule(
        1, "the single-recipe plan (one recipe, fold 0)", budget_s, fp, k, tta, plan.epochs, single=plan, device=device
    )
