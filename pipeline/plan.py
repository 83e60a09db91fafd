"""Plan stage: ``make plan BUDGET=2h [DEVICE_PROFILE=h100] [FINGERPRINT=recycle-trash]``.

Prints what a budgeted run would do with the budget, without training: the plan of the one planner
(:mod:`pipeline.planning.planner`) that ``make all`` executes, with minutes and disk per stage.  Costs
come from the probe on this device, or from a device profile (``configs/devices/<name>.yaml``); the
data from ``DATA_DIR`` or a fingerprint file.  The plan is kept in ``work/<NAME>/plan.json`` with its
stamp and printed to ``plan.txt``: ``make all`` with the same NAME, data, budget and settings on the
same device executes it as printed, without probing again (a plan for another device profile is
planned again there, with a line that says so).  ``save_profile=FILE`` writes the probe's figures as a
device profile."""

from __future__ import annotations

import logging
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.config import ConfigError, stage_main
from pipeline.engine.runtime import amp_dtype, precision_name
from pipeline.planning.budget import format_duration, parse_budget
from pipeline.planning.devices import DeviceProfile, Measured, read_device_profile, save_device_profile
from pipeline.planning.fingerprint import Fingerprint, fingerprint_of, read_fingerprint
from pipeline.planning.measure import Costs, ProbeCosts, ProfileCosts
from pipeline.planning.processes import WorkspaceLock
from pipeline.planning.settings import BudgetPlan, BudgetSettings, probe_costs

log = logging.getLogger(__name__)


@dataclass
class PlanConfig(BudgetSettings):
    # a device profile (configs/devices/<name>.yaml or a path): plan for that device; null: probe this one
    device_profile: str | None = None
    # a dataset fingerprint (configs/fingerprints/<name>.yaml or a path); null: read data_dir's annotations
    fingerprint: str | None = None
    # take the recipes' weights as available (a plan for another machine); null: true with a device
    # profile, false with the probe (a recipe is then used only when its weights resolve here)
    assume_weights: bool | None = None
    save_profile: str | None = None  # write the probe's figures here as a device profile

    def validate(self) -> None:
        super().validate()
        if self.save_profile and self.device_profile:
            raise ConfigError("save_profile writes what the probe measures: it cannot be combined with device_profile")


def data_fingerprint(cfg: PlanConfig, rfs_threshold: float | None) -> Fingerprint:
    if cfg.fingerprint:
        return read_fingerprint(cfg.fingerprint)
    from pipeline.data import load_coco

    coco = load_coco(cfg.data_dir, "train_all.json")
    test = load_coco(cfg.data_dir, "test.json", require_annotations=False)
    return fingerprint_of(coco, test, coco.image_ids, rfs_threshold)


def planning(cfg: PlanConfig) -> BudgetPlan:
    """The planning of ``cfg``: the data's fingerprint, the device's costs, the recipes usable there."""
    recipe_cfg = cfg.recipe_config()
    fp = data_fingerprint(cfg, recipe_cfg.rfs_threshold)
    costs: Costs
    if cfg.device_profile:
        costs = ProfileCosts(read_device_profile(cfg.device_profile))
    else:
        share = float("inf") if cfg.save_profile else None  # a profile holds every recipe size
        costs = probe_costs(cfg, fp, recipe_cfg, parse_budget(cfg.budget), share)
    assume = (cfg.device_profile is not None) if cfg.assume_weights is None else bool(cfg.assume_weights)
    return BudgetPlan(cfg, fp, costs, recipe_cfg, assume)


def save_profile(plan: BudgetPlan, path: str) -> Path:
    """The probe's figures as a device profile: every usable recipe at each of its sizes (also those
    this budget did not need), each as it was measured."""
    import torch

    costs = plan.costs
    assert isinstance(costs, ProbeCosts)
    for r, _ in plan.offers:
        for fraction in plan.settings.sizes or r.sizes:
            costs.price(r, plan.size(r, fraction))
    measured: dict[str, list[Measured]] = {}
    for (name, size), t in sorted(costs.measured.items(), key=lambda kv: (kv[0][0], kv[0][1][0] * kv[0][1][1])):
        measured.setdefault(name, []).append(Measured(size, t.recipe.batch, t.step_s, t.image_s, t.checkpoint_mb))
    profile = DeviceProfile(
        Path(path).stem,
        costs.kind,
        f"{platform.machine()}, {os.cpu_count()} cores, {costs.device} with {torch.get_num_threads()} torch threads, "
        "measured by the probe",
        gpus=costs.slots if costs.kind == "gpu" else 1,
        cpus=os.cpu_count() or 0,
        precision=precision_name(amp_dtype("auto", costs.device)).split()[0],
        measured=measured,
    )
    return save_device_profile(profile, path)


def run(cfg: PlanConfig) -> dict[str, Any]:
    cfg.validate()
    plan = planning(cfg)
    schedule = plan.schedule(parse_budget(cfg.budget))
    ws = Path(cfg.work_dir) / cfg.name
    ws.mkdir(parents=True, exist_ok=True)
    with WorkspaceLock(ws):  # never beside a make all of the same NAME
        text = plan.write(ws, schedule, "make plan")
    log.info("plan for %s:\n%s", format_duration(schedule.budget_s), text)
    log.info("written to %s", ws / "plan.json")
    out: dict[str, Any] = {"schedule": schedule.to_dict(), "text": text, "path": str(ws / "plan.json")}
    if cfg.save_profile:
        out["profile"] = str(save_profile(plan, cfg.save_profile))
        log.info("device profile written to %s", out["profile"])
    return out


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main(PlanConfig, run, argv, "Plan a budgeted run without training (make plan)")


if __name__ == "__main__":
    raise SystemExit(main())
