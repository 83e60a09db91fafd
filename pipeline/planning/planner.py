"""The budget planner, the one place a budgeted run is planned (``make plan`` and ``make all`` alike):
a function of the dataset fingerprint, the recipes a run may use, what each costs on the device, and
the budget, returning a :class:`~pipeline.planning.schedule.Schedule` whose stages carry their minutes and disk, which
the executor (:mod:`pipeline.planning.executor`) runs exactly.

Plans, richest first; the first that fits with at least ``TARGET_EPOCHS`` epochs a run is taken,
with as many epochs (up to ``max_epochs``) as the budget allows:

4. screening by successive halving on fold 0, two or three families of survivors on all k folds,
   their ensemble, a pseudo-label round (the strongest survivor retrained on every fold with the test
   images' pseudo labels), and the reserve;
3. the same without the pseudo-label round;
2. screening, and the winner on all k folds, or, when not every fold fits, a refit on all labelled
   images (``partial="refit"``, the default) or as many folds as fit, at least 3 (``partial="folds"``);
1. one recipe on fold 0, the shape of the others with one candidate and no screen, its run sized to
   its time.  Its candidates are the pretrained recipes (else those from scratch) at each of their
   sizes: the largest size that still trains ``SIZE_EPOCHS`` epochs (the larger model there, by its
   checkpoint's size), else the size that trains most epochs.  When none trains ``MIN_EPOCHS``, the
   planner tries what a competitor would, in order: smaller sizes (down to a quarter of the images'),
   then the from-scratch recipes; when nothing fits, the refusal names the least budget that would.

Within a level: more families, then all folds before a refit, then more candidates screened, then more
epochs.  Costs are worst cases: at every rung of the screening the most expensive candidates are the
ones promoted.  Every plan starts with its set-up (the folds and the probe, priced from what the probe
measures) and keeps a reserve for what follows training: OOF predictions with each TTA set (its views
counted by their pixels), test predictions, ensemble weights, post-processing tuning, the submission
and its score."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

from pipeline.core.errors import ConfigError, PipelineError
from pipeline.inference.postprocessing.crf import CRF_CANDIDATES
from pipeline.inference.tta import view_cost
from pipeline.models.pretrained import WeightSource
from pipeline.planning.budget import format_duration
from pipeline.planning.costs import (
    ENSEMBLE_S_PER_IMAGE,
    FOLDS_S_PER_IMAGE,
    MAX_EPOCHS,
    MAX_FAMILIES,
    MIN_EPOCHS,
    MIN_FOLDS,
    OOF_SCALE,
    PLANNED_BUDGET_FRACTION,
    POSTPROCESS_S_PER_IMAGE,
    PREDICT_SAFETY_FACTOR,
    SINGLE_RUN_STRETCH_FACTOR,
    SIZE_EPOCHS,
    SMALLER_SIZE_FRACTIONS,
    STAGE_START_S,
    SUBMIT_S_PER_IMAGE,
    TARGET_EPOCHS,
    Throughput,
    candidate_size,
    checkpoint_mb,
    crf_seconds,
    epoch_seconds,
    image_cache_mb,
    image_cache_seconds,
    makespan,
    maps_mb,
    maps_seconds,
    probe_seconds,
)
from pipeline.planning.fingerprint import Fingerprint
from pipeline.planning.portfolio import PortfolioRecipe
from pipeline.planning.schedule import Candidate, Schedule, Stage, StageKind

# --------------------------------------------------------------------------- what the planner reads


@dataclass(frozen=True)
class Rules:
    """The settings a run gives the planner."""

    k: int = 5
    # TTA sets tried on OOF, simplest first; None: BASE_TTA, with EXTRA_TTA where the budget affords them
    tta: tuple[str, ...] | None = ("none", "hflip")
    # post-processors tuned on OOF, simplest first; None: BASE_POSTPROCESS, with EXTRA_POSTPROCESS where affordable
    postprocess: tuple[str, ...] | None = ("min_area",)
    cpus: int = 1  # the host's cores (the CPU work after training: the CRF)
    partial: str = "refit"  # when the winner cannot train every fold: a refit on all labelled images, or folds
    level: int | None = None  # only plans of this level, with as few as MIN_EPOCHS epochs a run
    max_screen: int | None = None  # screen at most this many candidates (1: none)
    max_epochs: int = MAX_EPOCHS
    slots: int = 1  # devices that run the plan's independent jobs side by side
    sizes: tuple[float, ...] | None = None  # the one-recipe plan's size fractions (None: each recipe's own)
    oof_scale: float = OOF_SCALE
    progressive: float = 0.0  # share of the epochs trained at the progressive-resizing size

    def check(self) -> None:
        if self.partial not in ("refit", "folds"):
            raise ValueError(f"partial must be refit or folds, got {self.partial!r}")
        if self.level is not None and self.level not in (1, 2, 3, 4):
            raise ValueError(f"level must be 1, 2, 3 or 4, got {self.level!r}")


class Costs(Protocol):
    """What a recipe costs on the device (:mod:`pipeline.planning.measure`): ``exact`` asks for that
    very size; otherwise a measurement of the recipe at another size may be scaled by pixels.  None:
    not measured (the probe has used its share of the budget)."""

    kind: str

    def price(self, recipe: PortfolioRecipe, size: tuple[int, int], exact: bool = True) -> Throughput | None: ...

    def probed(self) -> list[Throughput]: ...


Offer = tuple[PortfolioRecipe, WeightSource]  # a recipe a run can use, with the weights it starts from


# --------------------------------------------------------------------------- costs of a shape


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


def worst_families(candidates: list[Candidate], cost: Callable[[Candidate], float], n: int) -> list[Candidate]:
    """The ``n`` costliest candidates of distinct families: the survivors a worst case promotes."""
    best: dict[str, Candidate] = {}
    for c in candidates:
        if c.family not in best or cost(c) > cost(best[c.family]):
            best[c.family] = c
    return sorted(best.values(), key=cost, reverse=True)[:n]


def rungs_of(n: int, survivors: int, epochs: int) -> list[dict[str, int]]:
    """Successive halving on fold 0: all ``n`` runs are compared at a quarter of the schedule, the better
    half (at least ``survivors``) at half of it, and ``survivors`` finish it.  Promoted runs go on with
    their schedule (no restart).  One candidate: nothing is compared."""
    if n < 2:
        return []
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
    epochs: int = 0


ONE_RUN = _Shape(1, 1, 1, False, False)  # level 1: one candidate on fold 0
BASE_TTA, EXTRA_TTA = ("none", "hflip"), ("ms", "d4")  # the multi-scale and dihedral sets when affordable
BASE_POSTPROCESS, EXTRA_POSTPROCESS = ("min_area",), ("crf",)
CRF_PASSES = 1 + len(CRF_CANDIDATES)  # the CRF's tuning: every OOF image without it and with each candidate


class Pricer:
    """Seconds and megabytes of every stage of a shape, from the candidates' costs."""

    def __init__(self, fp: Fingerprint, rules: Rules, probed: Callable[[], list[Throughput]]):
        self.fp, self.k, self.tta, self.oof_scale = fp, rules.k, list(rules.tta), rules.oof_scale
        self.progressive, self.probed, self.slots = rules.progressive, probed, rules.slots
        self.post, self.cpus = list(rules.postprocess or ()), rules.cpus
        self.on = f", {self.slots} devices side by side" if self.slots > 1 else ""
        self.n_val = fp.n_val(self.k)
        self.train_images = fp.n_train(self.k) * fp.epoch_factor
        self.views = [view_cost(t) for t in self.tta]
        self.test_views = max(self.views)  # the chosen set is not known before: the costliest

    def epoch(self, c: Candidate, images: float | None = None, n_val: int | None = None) -> float:
        images = self.train_images if images is None else images
        return epoch_seconds(c.throughput, int(round(images)), self.n_val if n_val is None else n_val, self.progressive)

    def run(self, c: Candidate, epochs: int, images: float | None = None, n_val: int | None = None) -> float:
        return STAGE_START_S * 2 + epochs * self.epoch(c, images, n_val)

    def map_mb(self, c: Candidate, images: float, scale: float) -> float:
        return maps_mb(c.throughput, images, self.fp.num_classes, scale)

    def prediction_jobs(self, c: Candidate, oof_folds: int, test_runs: int, tta_sets: int | None = None) -> list[float]:
        """Seconds of each prediction stage: every fold's OOF with each TTA set, every test run (with the
        costliest set: the chosen one is not known before); each image written with its class maps."""
        views = self.views if tta_sets is None else [self.test_views] * tta_sets
        maps = maps_seconds(c.throughput, self.fp.num_classes)
        oof = [(v * self.n_val * c.throughput.image_s + self.n_val * maps) for v in views] * oof_folds
        test = [self.test_views * self.fp.n_test * c.throughput.image_s + self.fp.n_test * maps] * test_runs
        return [s * PREDICT_SAFETY_FACTOR + STAGE_START_S for s in oof + test]

    def predictions(self, c: Candidate, oof_folds: int, test_runs: int, tta_sets: int | None = None) -> float:
        """The seconds of all of ``c``'s prediction stages, one after another."""
        return sum(self.prediction_jobs(c, oof_folds, test_runs, tta_sets))

    def wall(self, jobs: list[float]) -> float:
        """Wall seconds of independent jobs on the plan's devices."""
        return makespan(jobs, self.slots)

    def setup(self, trained: list[Candidate]) -> Stage:
        """Folds, the probe, and the image caches of the trained sizes (the only disk this stage takes)."""
        probed, fp = self.probed(), self.fp
        sizes = [c.size for c in trained]
        folds = STAGE_START_S + FOLDS_S_PER_IMAGE * fp.n_labelled
        seconds = folds + sum(probe_seconds(t) for t in probed) + image_cache_seconds(fp.n_labelled, sizes)
        cache_mb = image_cache_mb(fp.n_labelled, sizes, fp.num_classes)
        shown = ", ".join(sorted({f"{h}x{w}" for h, w in sizes}))
        detail = f"{len(probed)} recipe sizes probed; images decoded once at {shown} (image cache)"
        return Stage(StageKind.SETUP, "set-up: folds, probe, image cache", seconds, cache_mb, detail)

    def stages(self, pool: list[Candidate], shape: _Shape) -> list[Stage]:
        screened = pool[: shape.n]
        kept = worst_families(screened, self.epoch, shape.families)
        return [
            self.setup(screened),
            self.screen(screened, kept, shape),
            *self.training(kept, shape),
            *self.reserve(kept, shape),
        ]

    def screen(self, screened: list[Candidate], kept: list[Candidate], shape: _Shape) -> Stage:
        e, disk = (
            shape.epochs,
            sum(2 * checkpoint_mb(c.throughput) + self.map_mb(c, self.n_val, self.oof_scale) for c in screened),
        )
        if shape.n == 1:  # nothing to compare: the one candidate trains straight through
            fp, c = self.fp, screened[0]
            per_epoch = int(round(self.train_images))
            repeated = f" ({per_epoch} per epoch, rare classes repeated)" if per_epoch != fp.n_train(self.k) else ""
            smaller = int(self.progressive * e)
            resized = f", the first {smaller} at a smaller size (progressive resizing)" if smaller else ""
            detail = f"{e} epochs on {fp.n_train(self.k)} images{repeated}{resized}, validated on {self.n_val}"
            return Stage(StageKind.SCREEN, "train fold 0 (one candidate, no screen)", self.run(c, e), disk, detail)
        rungs = rungs_of(shape.n, shape.families, e)
        by_cost = sorted(screened, key=self.epoch, reverse=True)
        seconds, start = 0.0, 0
        for i, rung in enumerate(rungs):  # the runs of a rung side by side on the devices
            members = kept if i == len(rungs) - 1 else by_cost[: rung["runs"]]
            seconds += self.wall([(rung["epoch"] - start) * self.epoch(c) + STAGE_START_S * 2 for c in members])
            start = rung["epoch"]
        detail = ", ".join(f"{r['runs']} compared at epoch {r['epoch']}" for r in rungs)
        detail += f"; {shape.families} go{'es' * (shape.families == 1)} on{self.on}"
        return Stage(StageKind.SCREEN, f"screen {shape.n} on fold 0 (successive halving)", seconds, disk, detail)

    def training(self, kept: list[Candidate], shape: _Shape) -> list[Stage]:
        """The survivors' further folds, or the winner's refit on all labelled images."""
        fp, e, out = self.fp, shape.epochs, []
        if shape.folds > 1:
            more = shape.folds - 1
            out.append(
                Stage(
                    StageKind.FOLDS,
                    f"folds 1-{more} of {shape.families} survivor{'s' * (shape.families > 1)}",
                    self.wall([self.run(c, e) for c in kept for _ in range(more)]),
                    sum(
                        more * (2 * checkpoint_mb(c.throughput) + self.map_mb(c, self.n_val, self.oof_scale))
                        for c in kept
                    ),
                    f"{e} epochs each, {fp.n_train(self.k)} training images{self.on}",
                )
            )
        if shape.refit:
            c = kept[0]
            out.append(
                Stage(
                    StageKind.REFIT,
                    "refit the winner on all labelled images",
                    self.run(c, e, fp.n_labelled * fp.epoch_factor, 0),
                    2 * checkpoint_mb(c.throughput),
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
                StageKind.PREDICT,
                f"predict: OOF with each TTA set ({', '.join(self.tta)}), test",
                self.wall([s for c in kept for s in self.prediction_jobs(c, shape.folds, test_runs)]),
                sum(
                    self.map_mb(c, len(self.tta) * oof_images, self.oof_scale)
                    + self.map_mb(c, test_runs * fp.n_test, test_scale)
                    for c in kept
                ),
                f"{test_runs} test run{'s' * (test_runs > 1)} per survivor{self.on}",
            ),
            Stage(
                StageKind.ENSEMBLE,
                "ensemble (weights on OOF), its analysis",
                STAGE_START_S * 2 + ENSEMBLE_S_PER_IMAGE * (oof_images + fp.n_test) * max(1, len(kept)),
                0.0,
                f"{len(kept)} famil{'ies' if len(kept) > 1 else 'y'}, {len(kept) * test_runs} models",
            ),
        ]
        if shape.pseudo:
            c = kept[0]  # the costliest survivor stands for the strongest
            images = fp.n_train(self.k) * fp.epoch_factor + fp.n_test
            out.append(
                Stage(
                    StageKind.PSEUDO,
                    "pseudo-label round",
                    self.wall([self.run(c, e, images)] * self.k)
                    + self.wall(self.prediction_jobs(c, self.k, self.k, 1)),
                    self.k * (2 * checkpoint_mb(c.throughput) + self.map_mb(c, self.n_val + fp.n_test, self.oof_scale)),
                    f"the strongest survivor on all {self.k} folds with the {fp.n_test} test images' pseudo labels, "
                    f"{e} epochs{self.on}; then the ensemble again",
                )
            )
        crf_s = crf_seconds(fp.num_classes, self.cpus) if "crf" in self.post else 0.0
        post = POSTPROCESS_S_PER_IMAGE * oof_images * ("min_area" in self.post) + crf_s * CRF_PASSES * oof_images
        names = ", ".join(self.post) or "none"
        out.append(
            Stage(StageKind.POSTPROCESS, f"post-processing tuned on OOF ({names})", post, 0.0, "one kept by the rule")
        )
        submit = STAGE_START_S * 2 + (SUBMIT_S_PER_IMAGE + crf_s) * fp.n_test
        out.append(Stage(StageKind.SUBMIT, "submit, validate, score", submit))
        return out

    def fits(
        self, pool: list[Candidate], shape: _Shape, usable_s: float, least: int, most: int
    ) -> tuple[int, list[Stage]]:
        """The most epochs (``least``..``most``) with which ``shape`` fits ``usable_s``; (0, []) when none does."""
        lo, hi, found = least, most, (0, [])
        while lo <= hi:  # the cost grows with the epochs
            mid = (lo + hi) // 2
            stages = self.stages(pool, replace(shape, epochs=mid))
            if sum(s.seconds for s in stages) <= usable_s:
                found, lo = (mid, stages), mid + 1
            else:
                hi = mid - 1
        return found


# --------------------------------------------------------------------------- the planner


def _shapes(pool: list[Candidate], k: int, partial: str):
    """Shapes of levels 4 to 2, richest first (see the module's docstring)."""
    families = len({c.family for c in pool})

    def screens(f: int):
        for n in range(len(pool), max(f, min(2, len(pool))) - 1, -1):  # a pool of one: no screen
            if len({c.family for c in pool[:n]}) >= f:
                yield n

    for level, pseudo in ((4, True), (3, False)):
        for f in range(min(MAX_FAMILIES, families), 1, -1):
            for n in screens(f):
                yield level, _Shape(n, f, k, False, pseudo)
    for n in screens(1):
        yield 2, _Shape(n, 1, k, False, False)
    if partial == "refit":
        for n in screens(1):
            yield 2, _Shape(n, 1, 1, True, False)
    else:
        for folds in range(k - 1, MIN_FOLDS - 1, -1):
            for n in screens(1):
                yield 2, _Shape(n, 1, folds, False, False)


def _description(level: int, shape: _Shape, k: int) -> str:
    if level == 1:
        return "one recipe on fold 0, its run sized to its time"
    if shape.refit:
        return "screen, the winner on fold 0 and refit on all labelled images"
    if level == 2:
        return f"screen, the winner on {shape.folds} folds"
    pseudo = ", pseudo-label round" if shape.pseudo else ""
    return f"screen, {shape.families} families x {k} folds, ensemble{pseudo}"


class Planner:
    """One planning of one budget: the candidates it prices (in a fixed order, so that a probe and a
    device profile ask for the same measurements) and the shape it takes."""

    def __init__(
        self,
        fp: Fingerprint,
        offers: list[Offer],
        costs: Costs,
        rules: Rules,
        divisor: Callable[[PortfolioRecipe], int],
        model_options: dict[str, dict[str, Any]] | None = None,
    ):
        rules.check()
        if not offers:
            raise ConfigError("no recipe to plan with: none of the portfolio's recipes can be used here")
        self.fp, self.offers, self.costs, self.rules = fp, offers, costs, rules
        self.divisor, self.options = divisor, dict(model_options or {})
        tta, post = self.variants()[-1]  # the one-recipe plan's (its budget goes to its epochs)
        self.pricer = Pricer(fp, replace(rules, tta=tta, postprocess=post), costs.probed)
        self.unmeasured: list[str] = []  # options the costs could not price (the probe had used its share)

    def size(self, recipe: PortfolioRecipe, fraction: float) -> tuple[int, int]:
        return candidate_size(self.fp.size, fraction, self.divisor(recipe))

    def candidate(self, recipe: PortfolioRecipe, weights: WeightSource, t: Throughput) -> Candidate:
        """Named after its recipe, with its size when the recipe is planned at a size not its own."""
        own = self.size(recipe, recipe.size)
        name = recipe.name if t.recipe.size == own else f"{recipe.name}-{t.recipe.size[0]}x{t.recipe.size[1]}"
        options = dict(self.options.get(recipe.model, {})) if not recipe.pretrained else {}
        return Candidate(name, recipe, t, weights.to_dict(), options)

    def single_pools(self) -> list[list[tuple[Offer, list[float]]]]:
        """The one-recipe plan's options in the order a competitor tries them: the pretrained recipes (else
        those from scratch) at their sizes; the same at smaller sizes; the recipes from scratch."""
        pretrained = [o for o in self.offers if o[1].pretrained]
        scratch = [o for o in self.offers if not o[1].pretrained]
        base = pretrained or scratch

        def own(r: PortfolioRecipe) -> list[float]:
            return sorted(set(self.rules.sizes or r.sizes))

        def smaller(r: PortfolioRecipe) -> list[float]:
            return sorted(f for f in SMALLER_SIZE_FRACTIONS if f < min(own(r)))

        pools = [[(o, own(o[0])) for o in base], [(o, smaller(o[0])) for o in base]]
        if pretrained and scratch:
            pools.append([(o, sorted(own(o[0]) + smaller(o[0]))) for o in scratch])
        return pools

    def price_single(
        self, pool: list[tuple[Offer, list[float]]], usable_s: float, exact: bool = True
    ) -> list[tuple[Candidate, int]]:
        """Each option of ``pool`` with the epochs it fits, each recipe from its smallest size up, leaving out
        the larger sizes once one cannot train SIZE_EPOCHS epochs.  ``exact``: each size measured; else a
        recipe measured at another size is priced from it, scaled by pixels."""
        out = []
        for (recipe, weights), fractions in pool:
            seen: set[tuple[int, int]] = set()
            for fraction in fractions:
                size = self.size(recipe, fraction)
                if size in seen:
                    continue
                seen.add(size)
                t = self.costs.price(recipe, size, exact=exact)
                if t is None:
                    self.unmeasured.append(f"{recipe.name} at {size[0]}x{size[1]}")
                    break
                c = self.candidate(recipe, weights, t)
                epochs, _ = self.pricer.fits([c], ONE_RUN, usable_s, 1, self.rules.max_epochs)
                out.append((c, epochs))
                if epochs < SIZE_EPOCHS:
                    break  # its larger sizes would train fewer epochs still
        return out

    def screening_pools(self) -> list[list[Candidate]]:
        """The candidates a screen takes, in its order (:func:`round_robin`): every usable recipe, then, when
        the large tier is among them, the recipes without it (for budgets that cannot afford it)."""
        pool = []
        for recipe, weights in self.offers:
            t = self.costs.price(recipe, self.size(recipe, recipe.size), exact=False)
            if t is not None:
                pool.append(self.candidate(recipe, weights, t))
        smaller = [c for c in pool if not c.recipe.large]
        pools = [pool] + ([smaller] if smaller and len(smaller) < len(pool) else [])
        return [round_robin(p)[: self.rules.max_screen] for p in pools]

    def variants(self) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
        """The TTA sets and post-processors a plan may try on OOF, richest first: the run's own when it gave
        them, else the extra ones (multi-scale and dihedral TTA, the CRF) where the budget affords them."""
        tta = [self.rules.tta] if self.rules.tta else [BASE_TTA + EXTRA_TTA[:i] for i in range(len(EXTRA_TTA), -1, -1)]
        posts = (
            [self.rules.postprocess]
            if self.rules.postprocess is not None
            else [
                BASE_POSTPROCESS + EXTRA_POSTPROCESS,
                BASE_POSTPROCESS,
            ]
        )
        return [(t, p) for t in tta for p in posts]

    def richer(self, budget_s: float, device: str) -> Schedule | None:
        """The richest plan of levels 4 to 2 that fits (level by level; within one, the large recipes before
        the pool without them, then the richest TTA and post-processing, then the shapes); None when none."""
        rules, usable_s = self.rules, budget_s * PLANNED_BUDGET_FRACTION
        pools = self.screening_pools()
        full = pools[0]
        least = min(rules.max_epochs, TARGET_EPOCHS if rules.level is None else MIN_EPOCHS)
        for level in (4, 3, 2):
            if rules.level is not None and level != rules.level:
                continue
            for pool in pools:
                for tta, post in self.variants():
                    pricer = Pricer(self.fp, replace(self.rules, tta=tta, postprocess=post), self.costs.probed)
                    for shape_level, shape in _shapes(pool, rules.k, rules.partial):
                        if shape_level != level:
                            continue
                        epochs, stages = pricer.fits(pool, shape, usable_s, least, rules.max_epochs)
                        if epochs:
                            shape = replace(shape, epochs=epochs)
                            return self._schedule(level, shape, pool, stages, budget_s, device, tta, post)
        if rules.level is not None:
            raise PipelineError(
                f"no plan of level {rules.level} fits {format_duration(budget_s)} with {MIN_EPOCHS} epochs a "
                f"run ({len(full)} candidate{'s' * (len(full) != 1)}, k={rules.k}, partial={rules.partial})"
            )
        return None

    def schedule(self, budget_s: float, device: str = "") -> Schedule:
        rules, usable_s = self.rules, budget_s * PLANNED_BUDGET_FRACTION
        pools = self.single_pools()
        single = self.price_single(pools[0], usable_s) if rules.level in (None, 1) else []
        if rules.level != 1:
            found = self.richer(budget_s, device)
            if found is not None:
                return found
        tried = []
        for i, pool in enumerate(pools):
            options = single if i == 0 else self.price_single(pool, usable_s, exact=False)
            tried += options
            feasible = [(c, e) for c, e in options if e >= MIN_EPOCHS]
            if feasible:
                c = self.one_recipe(feasible)
                epochs, stages = self.pricer.fits([c], ONE_RUN, usable_s, MIN_EPOCHS, rules.max_epochs)
                if epochs:  # the probes of the later pools are part of the set-up
                    shape = replace(ONE_RUN, epochs=epochs)
                    tta, post = self.variants()[-1]  # one run's budget goes to its epochs
                    return self._schedule(1, shape, [c], stages, budget_s, device, tta, post)
        raise PipelineError(self.refusal(tried, budget_s))

    @staticmethod
    def one_recipe(feasible: list[tuple[Candidate, int]]) -> Candidate:
        """The largest size that still trains SIZE_EPOCHS epochs, the larger model there (the larger
        checkpoint, else the slower step); else the option that trains most epochs."""
        rich = [c for c, e in feasible if e >= SIZE_EPOCHS]
        if rich:
            return max(rich, key=lambda c: (c.size[0] * c.size[1], c.throughput.checkpoint_mb, c.throughput.step_s))
        return max(feasible, key=lambda ce: ce[1])[0]

    def refusal(self, tried: list[tuple[Candidate, int]], budget_s: float) -> str:
        """Why nothing fits, and the least budget that would: the cheapest option at MIN_EPOCHS epochs."""
        left_out = ""
        if self.unmeasured:
            left_out = f" ({', '.join(self.unmeasured)} not measured: the probe had used its share of the budget)"
        if not tried:
            return f"a budget of {format_duration(budget_s)} is too short: no recipe could be measured{left_out}"
        need = {
            c.name: sum(s.seconds for s in self.pricer.stages([c], replace(ONE_RUN, epochs=MIN_EPOCHS)))
            / PLANNED_BUDGET_FRACTION
            for c, _ in tried
        }
        cheapest, _ = min(tried, key=lambda ce: need[ce[0].name])
        most = max(tried, key=lambda ce: ce[1])
        minutes = math.ceil(need[cheapest.name] / 60)
        return (
            f"a budget of {format_duration(budget_s)} is too short: the option that trains most epochs "
            f"({most[0].name}, {most[0].size[0]}x{most[0].size[1]}) fits {max(most[1], 0)}, at least {MIN_EPOCHS} "
            f"are needed after trying {len(tried)} recipe sizes down to a quarter of the images' and the "
            f"recipes from scratch{left_out}; the least plan ({cheapest.name} for {MIN_EPOCHS} epochs) needs "
            f"{format_duration(need[cheapest.name])}: BUDGET={minutes}m or more"
        )

    def _schedule(
        self,
        level: int,
        shape: _Shape,
        pool: list[Candidate],
        stages: list[Stage],
        budget_s: float,
        device: str,
        tta: tuple[str, ...],
        post: tuple[str, ...],
    ) -> Schedule:
        notes = [f"{shape.epochs} epochs (at most {self.rules.max_epochs}) for every run"]
        if shape.n > 1:
            notes.insert(0, "costs are worst cases: the costliest candidates are taken as the ones promoted")
        stretch = SINGLE_RUN_STRETCH_FACTOR if level == 1 else 1
        if stretch > 1:
            notes = [f"about {shape.epochs} epochs, sized to its time after 2 (up to {stretch} times as many)"]
        return Schedule(
            level,
            _description(level, shape, self.rules.k),
            budget_s,
            self.fp,
            self.rules.k,
            list(tta),
            shape.epochs,
            pool[: shape.n],
            rungs_of(shape.n, shape.families, shape.epochs),
            shape.families,
            shape.folds,
            shape.refit,
            shape.pseudo,
            stages,
            stretch,
            self.rules.slots,
            device,
            notes,
            list(post),
        )


def plan_schedule(
    fp: Fingerprint,
    offers: list[Offer],
    costs: Costs,
    budget_s: float,
    rules: Rules | None = None,
    divisor: Callable[[PortfolioRecipe], int] = lambda r: 32,
    model_options: dict[str, dict[str, Any]] | None = None,
    device: str = "",
) -> Schedule:
    """The richest plan that fits ``budget_s`` (see the module's docstring).  ``offers``: the recipes a
    run may use with their weights; ``costs``: what each costs on the device; ``divisor``: the input
    divisor of a recipe's model; ``model_options``: each family's builder options."""
    return Planner(fp, offers, costs, rules or Rules(), divisor, model_options).schedule(budget_s, device)
