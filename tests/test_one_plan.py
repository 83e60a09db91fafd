"""One planner for make plan and make all: the same data, budget and device give the same plan.json
schedule; a kept plan is executed as printed (no second probe) while its stamp holds, and planned again,
saying why, for another device or version; before refusing a budget the planner tries smaller sizes
and the recipes from scratch, and a refusal names the least budget that fits."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from conftest import fixed_costs

import pipeline.planning.measure as measure_mod
from pipeline.autopilot import Autopilot, AutopilotConfig
from pipeline.core.errors import PipelineError
from pipeline.models.pretrained import SCRATCH, WeightSource
from pipeline.plan import PlanConfig
from pipeline.plan import run as make_plan
from pipeline.planning.costs import MIN_EPOCHS, PLANNED_BUDGET_FRACTION, Throughput, candidate_size
from pipeline.planning.devices import read_device_profile
from pipeline.planning.fingerprint import Fingerprint
from pipeline.planning.measure import Here
from pipeline.planning.planner import Planner, Rules, plan_schedule
from pipeline.planning.portfolio import read_portfolio
from pipeline.planning.schedule import FORMAT_VERSION

# two families whose ImageNet weights come with the installed Lite packages, and one from scratch, in the
# GPU tier (with gmacs, so the H100 profile prices them)
GPU_PORTFOLIO = """recipes:
  - {name: unet-lite0, tier: gpu, family: unet, model: unet, encoder: tu-tf_efficientnet_lite0, weights: imagenet,
     size: 1.0, batch: 8, lr: 0.001, encoder_lr: 0.0003, gmacs_per_mpx: 45, params_m: 6.3}
  - {name: fpn-lite0, tier: gpu, family: fpn, model: fpn, encoder: tu-tf_efficientnet_lite0, weights: imagenet,
     size: 1.0, batch: 8, lr: 0.001, encoder_lr: 0.0003, gmacs_per_mpx: 30, params_m: 5.0}
  - {name: unet-r18-scratch, tier: gpu, family: unet-scratch, model: unet, encoder: resnet18, weights: none,
     size: 1.0, batch: 8, gmacs_per_mpx: 80, params_m: 14.3}
"""
# the CPU figures of the shipped 2-core profile, eighty times slower: the tiny data then plans one recipe in 20m
CPU_SLOWER = 80


def fake_probe(portfolio: str | None, profile: str, factor: float = 1.0):
    """The probe replaced by fixed seconds per recipe and size: ``profile``'s figures (times ``factor``)."""
    shipped = read_portfolio(portfolio) if portfolio else read_portfolio()
    recipes = {(r.model, r.encoder or r.pretrained): r for r in shipped.recipes}
    device = read_device_profile(profile)
    probed = []

    def probe(recipe, num_classes, device_, options=None, low_scale=None) -> Throughput:
        probed.append((recipe.model, recipe.encoder, recipe.size))
        t = device.throughput(recipes[(recipe.model, recipe.encoder)], recipe.size, recipe.batch)
        return Throughput(t.recipe, t.step_s * factor, t.image_s * factor, t.checkpoint_mb or 50.0)

    return probe, probed


@pytest.fixture
def gpu(monkeypatch):
    """This machine taken for a GPU (the probe is replaced, so nothing runs on it)."""
    monkeypatch.setattr(
        measure_mod, "this_device", lambda setting, threads=None: Here(torch.device("cuda"), "fake H100", 1, 80.0)
    )


@pytest.mark.parametrize(
    "device, budget, level",
    [("cpu", "20m", 1), ("gpu", "2h", 4), ("gpu", "24h", 4)],
)
def test_make_plan_and_make_all_plan_the_same_schedule(
    device, budget, level, demo_data, tmp_path, monkeypatch, request
):
    monkeypatch.chdir(tmp_path)
    portfolio = None
    if device == "gpu":
        request.getfixturevalue("gpu")
        portfolio = tmp_path / "portfolio.yaml"
        portfolio.write_text(GPU_PORTFOLIO)
    profile, factor = ("h100", 1.0) if device == "gpu" else ("cpu-2core", CPU_SLOWER)
    probe, probed = fake_probe(str(portfolio) if portfolio else None, profile, factor)
    monkeypatch.setattr(measure_mod, "probe", probe)
    common = dict(data_dir=str(demo_data), budget=budget, threads=2, portfolio=str(portfolio) if portfolio else None)
    printed = make_plan(PlanConfig(name="p", **common))
    made_plan = len(probed)
    pilot = Autopilot(AutopilotConfig(name="a", progress=False, **common))
    try:
        schedule, key, text = pilot.plan()  # make all, stopped after planning
    finally:
        pilot.clock.close()
    assert len(probed) == 2 * made_plan  # each probed the same recipe sizes
    by_plan = json.loads(Path("work/p/plan.json").read_text())
    by_all = json.loads(Path("work/a/plan.json").read_text())
    assert by_plan["schedule"] == by_all["schedule"] == printed["schedule"] == schedule.to_dict()
    assert by_plan["key"] == by_all["key"] == key and by_plan["planned_by"] == "make plan"
    assert schedule.level == level and schedule.planned_s <= 0.97 * schedule.budget_s
    if device == "gpu":  # two pretrained recipes on a GPU: the one from scratch is not screened
        assert {c.name for c in schedule.screened} == {"unet-lite0", "fpn-lite0"}
        assert schedule.device.startswith("fake H100")
    else:
        assert schedule.screened[0].pretrained and schedule.stretch == 3
    assert Path("work/p/plan.txt").read_text() == Path("work/a/plan.txt").read_text() == text + "\n"


def test_make_all_executes_the_plan_make_plan_kept_and_plans_again_for_another_device(
    demo_data, tmp_path, monkeypatch, caplog
):
    monkeypatch.chdir(tmp_path)
    probe, probed = fake_probe(None, "cpu-2core", CPU_SLOWER)
    monkeypatch.setattr(measure_mod, "probe", probe)
    common = dict(data_dir=str(demo_data), budget="20m", threads=2, name="x")
    printed = make_plan(PlanConfig(**common))["schedule"]
    probed.clear()

    def planned_by_make_all() -> tuple[dict, float]:
        pilot = Autopilot(AutopilotConfig(progress=False, **common))
        try:
            return pilot.plan()[0].to_dict(), pilot.clock.stages.get("probe", 0.0)
        finally:
            pilot.clock.close()

    with caplog.at_level(logging.INFO):
        kept, probe_s = planned_by_make_all()
    assert kept == printed and not probed and probe_s == 0.0  # executed as printed, no second probe
    assert "(made by make plan) still holds" in caplog.text
    # the same workspace on another device: planned again, saying so
    monkeypatch.setattr(
        measure_mod, "this_device", lambda setting, threads=None: Here(torch.device("cpu"), "other cpu", 1, 0.0)
    )
    caplog.clear()
    with caplog.at_level(logging.INFO):
        again, _ = planned_by_make_all()
    assert probed and "was planned for cpu, 2 torch threads, this run is on other cpu: planning again" in caplog.text
    saved = json.loads(Path("work/x/plan.json").read_text())
    assert saved["planned_by"] == "make all" and saved["planned_for"]["device"] == "other cpu"
    # a plan.json an earlier version wrote (no format) is planned again, never misread
    Path("work/x/plan.json").write_text(json.dumps({"key": saved["key"], "plan": {"epochs": 3}, "executes": {}}))
    caplog.clear()
    with caplog.at_level(logging.INFO):
        planned_by_make_all()
    assert "written by another version of the pipeline: planning again" in caplog.text
    assert json.loads(Path("work/x/plan.json").read_text())["format"] == FORMAT_VERSION


# a held-out set of greyscale images at 320x480, as a new user brings one
HELD_OUT = Fingerprint(n_labelled=1495, n_test=300, size=(320, 480), num_classes=8)


def per_pixel(step_per_mpx: dict[str, float]):
    """Seconds per step of 8 images in proportion to their pixels, per recipe; an image at a twentieth."""

    def figures(recipe, size):
        step = step_per_mpx[recipe.name] * size[0] * size[1] / 1e6
        return step, step / 20, 50.0

    return figures


def test_before_refusing_a_budget_the_planner_tries_smaller_sizes_then_the_scratch_recipe():
    portfolio = read_portfolio()
    lite0, lite2, scratch = portfolio.tier("cpu")
    found = [(lite0, WeightSource("assumed")), (lite2, WeightSource("assumed")), (scratch, SCRATCH)]

    def plan(figures, budget_s):
        return plan_schedule(HELD_OUT, found, fixed_costs(figures), budget_s, Rules(level=1))

    slow = per_pixel({"unet-lite0": 40.0, "unet-lite2": 55.0, "unet-resnet18-scratch": 45.0})
    # 10 minutes: at the recipes' own sizes (from half the images' up) nothing trains 4 epochs, which
    # the one-recipe rules alone refused
    own = Planner(HELD_OUT, found, fixed_costs(slow), Rules(level=1), lambda r: 32)
    options = own.price_single(own.single_pools()[0], 600 * PLANNED_BUDGET_FRACTION)
    assert options and all(e < MIN_EPOCHS for _, e in options)
    smaller = plan(slow, 600)
    (c,) = smaller.screened
    assert c.recipe.name == "unet-lite0" and c.size[0] < 160 and smaller.epochs >= MIN_EPOCHS
    assert c.name == f"unet-lite0-{c.size[0]}x{c.size[1]}"
    assert c.size in [candidate_size(HELD_OUT.size, f, 32) for f in (0.375, 0.25)]  # down to a quarter
    # pretrained recipes too slow at every size, the lighter one from scratch fits: it is taken
    heavy = per_pixel({"unet-lite0": 120.0, "unet-lite2": 150.0, "unet-resnet18-scratch": 12.0})
    fallback = plan(heavy, 600)
    assert fallback.screened[0].recipe.name == "unet-resnet18-scratch" and not fallback.screened[0].pretrained
    assert fallback.epochs >= MIN_EPOCHS
    # below every option: refused, naming the least budget, which then plans
    with pytest.raises(PipelineError, match=r"too short: .*needs [\d.]+m: BUDGET=(\d+)m or more") as refused:
        plan(heavy, 120)
    least = int(re.search(r"BUDGET=(\d+)m", str(refused.value)).group(1))
    assert plan(heavy, least * 60).epochs >= MIN_EPOCHS
    with pytest.raises(PipelineError, match="too short"):
        plan(heavy, (least - 1) * 60 * 0.9)
