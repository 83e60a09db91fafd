"""Plan stage: ``make plan BUDGET=2h [DEVICE_PROFILE=h100] [FINGERPRINT=recycle-trash]``.

Prints what a budgeted run would do with the budget, without training: the screened recipes of the
portfolio (``configs/recipes/portfolio.yaml``), the successive-halving rungs, the folds or refit of
the survivors, the ensemble, the pseudo-label round and the reserve, with minutes and disk per stage
(:mod:`pipeline.planning.schedule`); small budgets reduce to the single-recipe plan ``make all``
runs today.  Costs come from the probe on this device, or from a device profile
(``configs/devices/<name>.yaml``); the data from ``DATA_DIR`` or a fingerprint file.  The plan is
written to ``work/<NAME>/plan.json`` (under ``schedule``, beside what ``make all`` keeps there) and
``plan_schedule.txt``; ``save_profile=FILE`` writes the probe's figures as a device profile."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.config import ConfigError, build_config, stage_main
from pipeline.core.io import atomic_write_text
from pipeline.engine.train_config import TrainConfig
from pipeline.planning.budget import format_duration, parse_budget
from pipeline.planning.devices import DeviceProfile, Measured, read_device_profile, save_device_profile
from pipeline.planning.fingerprint import Fingerprint, fingerprint_of, read_fingerprint
from pipeline.planning.plan import candidate_size
from pipeline.planning.portfolio import PORTFOLIO, PortfolioRecipe, read_portfolio, usable
from pipeline.planning.probe import Recipe, Throughput
from pipeline.planning.schedule import Candidate, Schedule, plan_schedule

log = logging.getLogger(__name__)

BUDGET_RECIPE = Path(__file__).resolve().parent / "configs" / "recipes" / "budget.yaml"


@dataclass
class PlanConfig:
    data_dir: str = "data/demo"
    budget: str = "20m"
    name: str = "auto"  # the plan goes to work/<name>/plan.json
    work_dir: str = "work"
    # a device profile (configs/devices/<name>.yaml or a path): plan for that device; null: probe this one
    device_profile: str | None = None
    # a dataset fingerprint (configs/fingerprints/<name>.yaml or a path); null: read data_dir's annotations
    fingerprint: str | None = None
    # take the recipes' weights as available (a plan for another machine); null: true with a device
    # profile, false with the probe (a recipe is then used only when its weights resolve here)
    assume_weights: bool | None = None
    scratch: bool = True  # the from-scratch recipes may be screened (on a GPU only without 2 pretrained ones)
    k: int = 5
    tta: list[str] = field(default_factory=lambda: ["none", "hflip"])  # tried on OOF, simplest first
    partial: str = "refit"  # when the winner cannot train every fold: refit on all labelled images, or folds
    portfolio: str | None = None  # default pipeline/configs/recipes/portfolio.yaml
    recipe: str | None = None  # the budgeted runs' training recipe (default configs/recipes/budget.yaml)
    weights_dir: str = "weights"
    device: str = "auto"  # the probe's device
    threads: int | None = None
    save_profile: str | None = None  # write the probe's figures here as a device profile

    def validate(self) -> None:
        parse_budget(self.budget)
        if not self.name.strip() or "/" in self.name:
            raise ConfigError(f"name must be a plain folder name, got {self.name!r}")
        if self.k < 2:
            raise ConfigError(f"k must be at least 2, got {self.k}")
        if self.partial not in ("refit", "folds"):
            raise ConfigError(f"partial: expected refit or folds, got {self.partial!r}")
        if not self.tta:
            raise ConfigError("tta needs at least one candidate set")
        if self.save_profile and self.device_profile:
            raise ConfigError("save_profile writes what the probe measures: it cannot be combined with device_profile")


def data_fingerprint(cfg: PlanConfig, rfs_threshold: float | None) -> Fingerprint:
    if cfg.fingerprint:
        return read_fingerprint(cfg.fingerprint)
    from pipeline.data import load_coco

    coco = load_coco(cfg.data_dir, "train_all.json")
    test = load_coco(cfg.data_dir, "test.json", require_annotations=False)
    return fingerprint_of(coco, test, coco.image_ids, rfs_threshold)


def recipe_size(fp: Fingerprint, recipe: PortfolioRecipe, fraction: float) -> tuple[int, int]:
    """The recipe's input size at ``fraction`` of the data's most common size, in multiples of its
    divisor (at least 32), as ``make all`` sizes its candidates."""
    from pipeline.models import input_divisor

    return candidate_size(fp.size, fraction, input_divisor(recipe.model, None if recipe.pretrained else recipe.encoder))


def probe_recipe(r: PortfolioRecipe, size: tuple[int, int]) -> Recipe:
    return Recipe(r.model, r.encoder or str(r.pretrained), size, r.batch)


class Costs:
    """Seconds per step and per image of the portfolio's recipes: from a device profile, or measured
    here by the probe (each recipe and size once)."""

    def __init__(self, cfg: PlanConfig, fp: Fingerprint, profile: DeviceProfile | None, recipe_cfg: TrainConfig):
        self.cfg, self.fp, self.profile, self.recipe_cfg = cfg, fp, profile, recipe_cfg
        self.measured: dict[tuple[str, tuple[int, int]], Throughput] = {}
        self.device = None
        # the progressive-resizing share's size, probed too when the recipe trains one
        self.low_scale = recipe_cfg.progressive_scale if recipe_cfg.progressive else None
        if profile is None:
            from pipeline.engine.runtime import resolve_device

            self.device = resolve_device(cfg.device)
            if cfg.threads:
                import torch

                torch.set_num_threads(cfg.threads)

    @property
    def kind(self) -> str:
        if self.profile is not None:
            return self.profile.kind
        return "gpu" if self.device.type == "cuda" else "cpu"

    def describe(self) -> str:
        if self.profile is not None:
            p = self.profile
            return f"{p.name} ({p.description or p.kind}; profile {p.source})"
        return f"{self.device} (measured here by the probe)"

    def single(self, fp: Fingerprint, recipes: list[PortfolioRecipe], budget_s: float) -> list[Throughput]:
        """The single-recipe plan's throughputs: each recipe at each of its sizes; on this device
        measured as ``make all`` measures them (smallest size up, larger ones left out once they
        cannot train SIZE_EPOCHS epochs)."""
        sized = [(r, recipe_size(fp, r, s)) for r in recipes for s in sorted(set(r.sizes))]
        if self.profile is not None:
            return [self(r, size) for r, size in sized]
        from pipeline.planning.measure import measure_candidates

        portfolio = {probe_recipe(r, size): r for r, size in sized}
        k = self.cfg.k
        found, _ = measure_candidates(
            list(portfolio),
            fp.num_classes,
            self.device,
            budget_s,
            lambda: budget_s,
            int(round(fp.n_train(k) * fp.epoch_factor)),
            fp.n_val(k),
            progressive=self.recipe_cfg.progressive,
            measure=lambda recipe: self(portfolio[recipe], recipe.size),  # one probe per recipe and size
        )
        if self.cfg.save_profile:  # a profile holds every size, also those this budget leaves out
            for r, size in sized:
                self(r, size)
        return found

    def __call__(self, r: PortfolioRecipe, size: tuple[int, int]) -> Throughput:
        if self.profile is not None:
            return self.profile.throughput(r, size, r.batch)
        key = (r.name, size)
        if key not in self.measured:
            from pipeline.planning.probe import probe

            options = {"pretrained": r.pretrained} if r.pretrained else {}
            self.measured[key] = probe(
                probe_recipe(r, size), self.fp.num_classes, self.device, options=options, low_scale=self.low_scale
            )
        return self.measured[key]


def build_schedule(cfg: PlanConfig) -> tuple[Schedule, Costs, list[str]]:
    """The plan of ``cfg``, the costs it was priced with, and the lines that say what it assumed."""
    recipe_cfg = build_config(TrainConfig, Path(cfg.recipe) if cfg.recipe else BUDGET_RECIPE)
    fp = data_fingerprint(cfg, recipe_cfg.rfs_threshold)
    profile = read_device_profile(cfg.device_profile) if cfg.device_profile else None
    assume = (profile is not None) if cfg.assume_weights is None else bool(cfg.assume_weights)
    costs = Costs(cfg, fp, profile, recipe_cfg)
    portfolio = read_portfolio(cfg.portfolio or PORTFOLIO)
    found = usable(portfolio.tier(costs.kind), cfg.weights_dir, assume)
    if not cfg.scratch or (costs.kind == "gpu" and sum(w.pretrained for _, w in found) >= 2):
        # on a GPU with pretrained candidates, from-scratch runs are not worth a screening slot
        found = [(r, w) for r, w in found if not r.scratch]
    if not found:
        raise ConfigError(
            f"{portfolio.source}: no recipe of the {costs.kind} tier can be used here (weights, scratch=false)"
        )
    # the single-recipe plan: as make all, the recipes with pretrained weights (else those from scratch);
    # measured first, so that the screen reuses what the probe measured
    pretrained = [(r, w) for r, w in found if w.pretrained]
    single_pool = pretrained or found
    single = costs.single(fp, [r for r, _ in single_pool], parse_budget(cfg.budget))
    screened = [Candidate(r.name, r.family, costs(r, recipe_size(fp, r, r.size)), w.describe()) for r, w in found]
    schedule = plan_schedule(
        fp,
        screened,
        single,
        parse_budget(cfg.budget),
        k=cfg.k,
        tta=list(cfg.tta),
        oof_scale=recipe_cfg.oof_scale,
        progressive=recipe_cfg.progressive,
        partial=cfg.partial,
        device=costs.describe(),
    )
    if schedule.single is not None:
        schedule.single.candidates = {r.key: w.to_dict() for r, w in single_pool}
    lines = [
        f"data from {fp.source}",
        *(
            ["device figures: estimates (see the profile's header)"]
            if profile is not None and profile.estimated
            else []
        ),
        "weights: "
        + ("assumed available (assume_weights=true)" if assume else "resolved here; recipes without them left out"),
        f"portfolio: {portfolio.source}: {len(found)} of {len(portfolio.tier(costs.kind))} recipes "
        f"of the {costs.kind} tier usable",
    ]
    return schedule, costs, lines


def write_plan(ws: Path, schedule: Schedule, text: str) -> Path:
    """``plan.json`` keeps what ``make all`` wrote there (its key and plan) and gains ``schedule``."""
    ws.mkdir(parents=True, exist_ok=True)
    path = ws / "plan.json"
    saved: dict[str, Any] = {}
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not JSON ({exc}); move it away to plan again") from exc
        if not isinstance(saved, dict):
            raise ConfigError(f"{path}: expected a JSON object, got {type(saved).__name__}")
    saved["schedule"] = schedule.to_dict()
    atomic_write_text(path, json.dumps(saved, indent=2))
    atomic_write_text(ws / "plan_schedule.txt", text + "\n")
    return path


def save_profile(costs: Costs, path: str) -> Path:
    """The probe's figures as a device profile (each recipe at the size it was measured at)."""
    import os
    import platform

    import torch

    measured: dict[str, list[Measured]] = {}
    for (name, size), t in sorted(costs.measured.items(), key=lambda kv: (kv[0][0], kv[0][1][0] * kv[0][1][1])):
        measured.setdefault(name, []).append(Measured(size, t.recipe.batch, t.step_s, t.image_s, t.checkpoint_mb))
    profile = DeviceProfile(
        Path(path).stem,
        costs.kind,
        f"{platform.machine()}, {os.cpu_count()} cores, {costs.device} with {torch.get_num_threads()} torch threads, "
        "measured by the probe",
        measured,
    )
    return save_device_profile(profile, path)


def run(cfg: PlanConfig) -> dict[str, Any]:
    cfg.validate()
    schedule, costs, lines = build_schedule(cfg)
    text = "\n".join(lines) + "\n\n" + schedule.table()
    log.info("plan for %s:\n%s", format_duration(schedule.budget_s), text)
    path = write_plan(Path(cfg.work_dir) / cfg.name, schedule, text)
    log.info("written to %s", path)
    out: dict[str, Any] = {"schedule": schedule.to_dict(), "text": text, "path": str(path)}
    if cfg.save_profile:
        out["profile"] = str(save_profile(costs, cfg.save_profile))
        log.info("device profile written to %s", out["profile"])
    return out


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main(PlanConfig, run, argv, "Plan a budgeted run without training (make plan)")


if __name__ == "__main__":
    raise SystemExit(main())
