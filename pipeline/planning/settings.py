"""What ``make plan`` and ``make all`` share: the settings of a budgeted run's plan
(:class:`BudgetSettings`, the base of both stages' configs), the recipes the run can use on its device,
the stamp that says whether a plan kept in the workspace still holds, and ``plan.json`` itself.

A plan is kept in ``work/<NAME>/plan.json`` with its stamp: a hash of everything it depends on (the
data's fingerprint, the budget, the settings, the recipes with their weights, the portfolio and
training recipe files, and the device).  ``make all`` executes a kept plan whose stamp matches
without probing again, so ``make plan`` followed by ``make all`` runs the plan that was printed; a
plan made for another device, other settings or by another version is planned again, with a line
that says why."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.config import build_config, yaml_layers
from pipeline.core.errors import ConfigError, PipelineError
from pipeline.core.io import atomic_write_text
from pipeline.core.tables import readable_lines
from pipeline.engine.train_config import TrainConfig
from pipeline.inference.postprocessing import POSTPROCESSORS
from pipeline.inference.tta import TTA_SETS
from pipeline.planning.budget import parse_budget
from pipeline.planning.costs import MAX_EPOCHS, candidate_size
from pipeline.planning.fingerprint import Fingerprint
from pipeline.planning.measure import Costs, ProbeCosts
from pipeline.planning.planner import Rules, plan_schedule
from pipeline.planning.portfolio import PORTFOLIO, PortfolioRecipe, offers, read_portfolio
from pipeline.planning.schedule import FORMAT_VERSION, PlanFormatError, Schedule
from pipeline.planning.stamps import stamp_key

log = logging.getLogger(__name__)

BUDGET_RECIPE = Path(__file__).resolve().parents[1] / "configs" / "recipes" / "budget.yaml"
PLAN_JSON, PLAN_TEXT = "plan.json", "plan.txt"


@dataclass
class BudgetSettings:
    data_dir: str = "data/demo"
    budget: str = "20m"  # wall time for everything after set-up: 20m, 2h, 1h30m, 90s
    name: str = "auto"  # the workspace work/<name>/ (plan.json, plan.txt, ...)
    work_dir: str = "work"
    k: int = 5  # folds
    # TTA sets tried on OOF, simplest first; null: none and hflip, with ms and d4 where the budget affords them
    tta: list[str] | None = None
    # post-processors tuned on OOF, simplest first, one kept by the selection rule (none, min_area, crf, ...);
    # null: min_area, with crf where the budget affords it
    postprocess: list[str] | None = None
    # the plan's level: null, the richest that fits the budget; 1 one recipe on fold 0; 2 screening and the
    # winner on more folds or a refit; 3 two or three families on all folds; 4 and a pseudo-label round.
    # A level given here may train as few as 4 epochs a run (a measurement, not a default)
    level: int | None = None
    partial: str = "refit"  # when the winner cannot train every fold: refit on all labelled images, or folds
    max_screen: int | None = None  # screen at most this many recipes (1: the first, no screen)
    max_epochs: int = MAX_EPOCHS  # every run trains at most this many epochs (its planned ones)
    portfolio: str | None = None  # the recipes a run may use (default pipeline/configs/recipes/portfolio.yaml)
    recipes: list[str] | None = None  # only these recipes of the portfolio (names); null: every one of the tier
    # the one-recipe plan's candidate sizes as fractions of the images' most common size; null: each
    # recipe's own `sizes` (smaller ones down to a quarter are tried before a budget is refused)
    sizes: list[float] | None = None
    recipe: str | None = None  # the training recipe (its base: chain first); default configs/recipes/budget.yaml
    # each family's builder options (probe and training alike), e.g. {unet: {decoder_channels: [128, 64, 32, 16,
    # 16]}}; families not named are built as their library builds them
    model_options: dict[str, dict] = field(default_factory=dict)
    encoder_weights: str | None = "auto"  # auto: folder > cache > package > download; null: the scratch recipes
    weights_dir: str = "weights"  # the weights folder (make weights) looked at first
    device: str = "auto"  # the device the probe measures and the runs train on
    # GPUs that run the plan's independent jobs side by side, one process each; null: every visible one (a
    # device profile: its count). A CPU is one slot: a larger value there splits its threads among as many
    # jobs, which trains no faster
    gpus: int | None = None
    threads: int | None = None  # torch threads of every job (null: the cores shared among the jobs on a CPU)

    def validate(self) -> None:
        parse_budget(self.budget)
        if self.level is not None and self.level not in (1, 2, 3, 4):
            raise ConfigError(f"level must be 1, 2, 3, 4 or null, got {self.level!r}")
        if self.partial not in ("refit", "folds"):
            raise ConfigError(f"partial: expected refit or folds, got {self.partial!r}")
        if self.max_epochs < 1:
            raise ConfigError(f"max_epochs must be at least 1, got {self.max_epochs}")
        if self.max_screen is not None and self.max_screen < 1:
            raise ConfigError(f"max_screen must be at least 1 or null, got {self.max_screen}")
        if not self.name.strip() or "/" in self.name:
            raise ConfigError(f"name must be a plain folder name, got {self.name!r}")
        if self.k < 2:
            raise ConfigError(f"k must be at least 2, got {self.k}")
        if self.gpus is not None and self.gpus < 1:
            raise ConfigError(f"gpus must be at least 1 or null (every visible GPU), got {self.gpus}")
        if self.tta is not None and not self.tta:
            raise ConfigError("tta needs at least one candidate set, or null for the planner's choice")
        if self.tta is not None:
            unknown = [t for t in self.tta if t not in TTA_SETS]
            if unknown:
                raise ConfigError(f"tta: unknown {unknown[0]!r}; known: {', '.join(TTA_SETS.names())}")
        if self.postprocess is not None:
            unknown = [n for n in self.postprocess if n not in POSTPROCESSORS]
            if unknown:
                raise ConfigError(f"postprocess: unknown {unknown[0]!r}; known: {', '.join(POSTPROCESSORS.names())}")
        if self.recipes is not None and not self.recipes:
            raise ConfigError("recipes: name at least one portfolio recipe, or null for all")
        if self.sizes is not None and (not self.sizes or any(not 0 < s <= 2 for s in self.sizes)):
            raise ConfigError(f"sizes must be fractions of the image size in (0, 2], got {self.sizes}")
        if not isinstance(self.model_options, dict) or any(
            not isinstance(v, dict) for v in self.model_options.values()
        ):
            raise ConfigError(f"model_options must map a family to its options, got {self.model_options!r}")

    def training_recipe(self) -> Path:
        return Path(self.recipe) if self.recipe else BUDGET_RECIPE

    def recipe_files(self) -> list[Path]:
        """Every file of the training recipe's ``base:`` chain: a changed one plans and trains again."""
        return [Path(source) for source, _ in yaml_layers(self.training_recipe())]

    def recipe_config(self) -> TrainConfig:
        """The training recipe as the training stage will read it."""
        return build_config(TrainConfig, self.training_recipe())


def probe_costs(
    settings: BudgetSettings, fp: Fingerprint, recipe_cfg: TrainConfig, budget_s: float, share: float | None = None
) -> ProbeCosts:
    """The costs the throughput probe measures on this device, with the run's builder options; ``share``
    of the budget it may take (default PROBE_BUDGET_FRACTION)."""
    low = recipe_cfg.progressive_scale if recipe_cfg.progressive else None
    options = settings.model_options
    if share is None:
        return ProbeCosts(settings.device, settings.threads, fp.num_classes, budget_s, options, low)
    return ProbeCosts(settings.device, settings.threads, fp.num_classes, budget_s, options, low, share)


def slots_of(settings: BudgetSettings, costs: Costs) -> int:
    """How many jobs run side by side: ``gpus`` (at most the GPUs there are), else every device."""
    if settings.gpus is None:
        return costs.devices
    if costs.kind == "gpu" and settings.gpus > costs.devices:
        raise ConfigError(f"gpus={settings.gpus}, but {costs.description} has {costs.devices}")
    return settings.gpus


class BudgetPlan:
    """The planning of one budgeted run: the recipes it can use on the device, the stamp of what its
    plan depends on, and the plan itself (:func:`pipeline.planning.planner.plan_schedule`)."""

    def __init__(
        self, settings: BudgetSettings, fp: Fingerprint, costs: Costs, recipe_cfg: TrainConfig, assume: bool = False
    ):
        self.settings, self.fp, self.costs, self.recipe_cfg, self.assume = settings, fp, costs, recipe_cfg, assume
        self.portfolio = read_portfolio(settings.portfolio or PORTFOLIO)
        self.offers = offers(
            self.portfolio,
            costs.kind,
            settings.weights_dir,
            settings.encoder_weights,
            assume,
            settings.recipes,
            costs.memory_gb,
        )
        self.slots = slots_of(settings, costs)
        costs.use(self.slots)
        self.rules = Rules(
            slots=self.slots,
            cpus=costs.cpus,
            k=settings.k,
            tta=tuple(settings.tta) if settings.tta else None,
            postprocess=tuple(settings.postprocess) if settings.postprocess is not None else None,
            partial=settings.partial,
            level=settings.level,
            max_screen=settings.max_screen,
            max_epochs=settings.max_epochs,
            sizes=tuple(settings.sizes) if settings.sizes else None,
            oof_scale=recipe_cfg.oof_scale,
            progressive=recipe_cfg.progressive,
        )
        self.planned_for: dict[str, Any] = {
            "format": FORMAT_VERSION,
            "budget_s": parse_budget(settings.budget),
            "fingerprint": {k: v for k, v in fp.to_dict().items() if k != "source"},
            "device": costs.identity,
            "recipes": {r.name: w.to_dict() for r, w in self.offers},
            "rules": asdict(self.rules),
            "model_options": settings.model_options,
        }
        self.key = stamp_key(self.planned_for, [Path(self.portfolio.source), *settings.recipe_files()])

    def divisor(self, recipe: PortfolioRecipe) -> int:
        """The input divisor of ``recipe``'s model, with the run's builder options."""
        from pipeline.models import input_divisor

        if recipe.pretrained:
            return input_divisor(recipe.model, None)
        return input_divisor(recipe.model, recipe.encoder, **self.settings.model_options.get(recipe.model, {}))

    def size(self, recipe: PortfolioRecipe, fraction: float) -> tuple[int, int]:
        """``recipe``'s input size at ``fraction`` of the data's most common size."""
        return candidate_size(self.fp.size, fraction, self.divisor(recipe))

    def schedule(self, budget_s: float) -> Schedule:
        """The plan of ``budget_s`` (the configured budget less what earlier, killed attempts spent)."""
        return plan_schedule(
            self.fp,
            self.offers,
            self.costs,
            budget_s,
            self.rules,
            self.divisor,
            self.settings.model_options,
            device=self.costs.description,
        )

    def kept(self, ws: Path) -> Schedule | None:
        """The plan kept in ``ws/plan.json`` when its stamp matches this planning; None (with a line that
        says why) when there is none, or it was made for another device, other settings or by another
        version of the pipeline."""
        path = ws / PLAN_JSON
        if not path.is_file():
            return None
        try:
            saved = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PipelineError(f"{path}: not JSON ({exc}); move it away to plan again") from exc
        if not isinstance(saved, dict):
            raise PipelineError(f"{path}: expected a JSON object; move it away to plan again")
        if saved.get("format") != FORMAT_VERSION:
            log.warning("%s was written by another version of the pipeline: planning again", path)
            return None
        if saved.get("key") != self.key:
            before = saved.get("planned_for") or {}
            changed = sorted(k for k in {*before, *self.planned_for} if before.get(k) != self.planned_for.get(k))
            if "device" in changed:
                log.warning(
                    "%s was planned for %s, this run is on %s: planning again",
                    path,
                    before.get("device"),
                    self.planned_for["device"],
                )
            else:
                log.info("%s was planned for other %s: planning again", path, ", ".join(changed) or "files")
            return None
        try:
            schedule = Schedule.from_dict(saved.get("schedule"), str(path))
        except PlanFormatError as exc:
            log.warning("%s: planning again", exc)
            return None
        log.info("%s (made by %s) still holds: executing it as printed", path, saved.get("planned_by", "?"))
        return schedule

    def head(self) -> list[str]:
        """What the plan assumed: where the data, the device figures and the weights come from."""
        tier = self.portfolio.tier(self.costs.kind)
        weights = "assumed available (assume_weights=true)" if self.assume else "resolved here"
        return [
            f"data from {self.fp.source}",
            *self.costs.notes,
            f"weights: {weights}; recipes without them left out",
            f"portfolio: {self.portfolio.source}: {len(self.offers)} of {len(tier)} recipes of the "
            f"{self.costs.kind} tier usable",
        ]

    def text(self, schedule: Schedule) -> str:
        """The plan as printed: what it assumed (:meth:`head`), then its table."""
        return readable_lines(self.head(), indent="  ") + "\n\n" + schedule.table()

    def write(self, ws: Path, schedule: Schedule, planned_by: str) -> str:
        """Keep ``schedule`` in ``ws/plan.json`` with its stamp, and its table (after :meth:`head`) in
        ``ws/plan.txt``; returns that text."""
        ws.mkdir(parents=True, exist_ok=True)
        record = {
            "format": FORMAT_VERSION,
            "key": self.key,
            "planned_by": planned_by,
            "planned_for": self.planned_for,
            "schedule": schedule.to_dict(),
        }
        text = self.text(schedule)
        atomic_write_text(ws / PLAN_JSON, json.dumps(record, indent=2))
        atomic_write_text(ws / PLAN_TEXT, text + "\n")
        return text
