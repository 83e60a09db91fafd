"""The budget planner (planning/schedule.py), the device profiles and `make plan`, on fake throughputs."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest

from pipeline.core.errors import ConfigError, PipelineError
from pipeline.models.pretrained import WeightSource
from pipeline.planning.budget import parse_budget
from pipeline.planning.costs import (
    MAX_EPOCHS,
    PREDICT_SAFETY_FACTOR,
    STAGE_START_S,
    Recipe,
    Throughput,
    makespan,
    maps_seconds,
)
from pipeline.planning.devices import DEVICES, DeviceProfile, Estimate, Measured, read_device_profile
from pipeline.planning.fingerprint import Fingerprint, read_fingerprint
from pipeline.planning.measure import ProfileCosts
from pipeline.planning.planner import Pricer, Rules, plan_schedule, round_robin, rungs_of
from pipeline.planning.portfolio import offers, read_portfolio
from pipeline.planning.schedule import FORMAT_VERSION, Candidate, Schedule, StageKind

CONTEST = read_fingerprint("recycle-trash")
CCP = Fingerprint(804, 200, (412, 275), 59, 24, 4, 1.52)

# fake CPU figures of the kind the probe measures on a 2-core machine (seconds per step of 8 images at
# 320x224; per predicted image)
CPU = DeviceProfile(
    "fake-cpu",
    "cpu",
    measured={
        "unet-lite0": [Measured((320, 224), 8, 2.2, 0.045, 75.0)],
        "unet-lite2": [Measured((320, 224), 8, 3.4, 0.07, 120.0)],
        "unet-resnet18-scratch": [Measured((320, 224), 8, 2.6, 0.05, 172.0)],
    },
)


def plan(fp: Fingerprint, profile: DeviceProfile, budget: str, **rules) -> Schedule:
    """The plan of the shipped portfolio's tier for ``profile``, its weights taken as there."""
    found = offers(read_portfolio(), profile.kind, None, assume=True, memory_gb=profile.memory_gb)
    costs = ProfileCosts(profile)
    costs.use(rules.get("slots", 1))
    return plan_schedule(fp, found, costs, parse_budget(budget), Rules(**rules))


def test_20_cpu_minutes_give_one_pretrained_recipe_on_fold_0():
    s = plan(CCP, CPU, "20m")
    assert s.level == 1 and len(s.screened) == 1 and s.folds == 1 and not s.refit and not s.rungs
    (c,) = s.screened
    assert c.pretrained and c.family == "unet" and s.stretch == 3
    # no size trains 12 epochs: the one that trains most, the smallest of the recipes' own sizes
    assert 4 <= s.epochs < 12 and c.size == (192, 128) and c.name == "unet-lite0-192x128"
    assert [st.kind for st in s.stages] == [
        StageKind.SETUP,
        StageKind.SCREEN,
        StageKind.PREDICT,
        StageKind.ENSEMBLE,
        StageKind.POSTPROCESS,
        StageKind.SUBMIT,
    ]
    assert 0.8 * 1200 <= s.planned_s <= 0.97 * 1200 and "one recipe on fold 0" in s.table()
    # the contest's 3,272 images of 512x512 in 20 CPU-minutes: the recipes' own sizes (from half the
    # images') train fewer than 4 epochs, a quarter of the images' size trains enough
    small = plan(CONTEST, CPU, "20m")
    assert small.level == 1 and small.epochs >= 4 and small.screened[0].size == (128, 128)
    # 10 minutes fit no size: the refusal names the least budget that fits, and that budget plans
    with pytest.raises(PipelineError, match=r"too short: .*BUDGET=(\d+)m or more") as refused:
        plan(CONTEST, CPU, "10m")
    least = int(re.search(r"BUDGET=(\d+)m", str(refused.value)).group(1))
    assert 10 < least <= 20 and plan(CONTEST, CPU, f"{least}m").epochs >= 4


def test_2h_on_an_h100_screens_two_or_more_and_gives_the_winner_folds_or_a_refit():
    h100 = read_device_profile("h100")
    s = plan(CONTEST, h100, "2h")
    assert s.level == 2 and len(s.screened) >= 2 and (s.folds >= 3 or s.refit)
    assert s.epochs >= 24 and s.planned_s <= parse_budget("2h")
    assert len({c.family for c in s.screened}) >= 2  # a screen compares families first
    kinds = [st.kind for st in s.stages]
    assert kinds[:2] == [StageKind.SETUP, StageKind.SCREEN] and kinds[-1] == StageKind.SUBMIT
    assert s.rungs[-1]["runs"] == 1 and s.rungs[0]["runs"] == len(s.screened)
    # the partial-folds rule instead: as many folds as fit, at least 3
    folds = plan(CONTEST, h100, "2h", partial="folds")
    assert folds.planned_s <= parse_budget("2h") and (folds.level == 1 or folds.folds >= 3)


def test_24h_on_an_h100_screens_four_or_more_and_ensembles_families_on_every_fold_with_pseudo_labels():
    s = plan(CONTEST, read_device_profile("h100"), "24h")
    assert s.level == 4 and len(s.screened) >= 4 and s.families >= 2 and s.folds == 5 and s.pseudo
    assert s.planned_s <= parse_budget("24h")
    # most of the budget is used, unless the plan already has all it can buy: every recipe screened, the
    # most families, every fold, the most epochs a run
    offered = offers(read_portfolio(), "gpu", None, assume=True)
    at_caps = len(s.screened) == len(offered) and s.families == 3 and s.epochs == MAX_EPOCHS
    assert s.planned_s >= 0.8 * parse_budget("24h") or at_caps
    assert any(st.kind == StageKind.PSEUDO for st in s.stages) and s.disk_mb > 0
    d = s.to_dict()
    assert json.loads(json.dumps(d))["level"] == 4 and len(d["screened"]) == len(s.screened)


@pytest.mark.parametrize("device", ["cpu", "h100"])
def test_no_plan_exceeds_its_budget_and_richer_plans_need_more_budget(device):
    profile = CPU if device == "cpu" else read_device_profile("h100")
    for fp in (CONTEST, CCP):
        levels = []
        for budget in ("5m", "20m", "45m", "1h30m", "2h", "4h", "8h", "12h", "24h", "48h", "96h"):
            try:
                s = plan(fp, profile, budget)
            except PipelineError:  # too short for even the one-recipe plan
                levels.append(0)
                continue
            assert s.planned_s <= parse_budget(budget), (fp.source, budget, s.to_dict())
            levels.append(s.level)
        assert levels == sorted(levels), (device, fp.source, levels)
    assert levels[-1] >= 2


def tiny_candidate(name: str, family: str, step_s: float, size=(64, 64)) -> Candidate:
    recipe = replace(read_portfolio().tier("cpu")[0], name=name, family=family)
    return Candidate(name, recipe, Throughput(Recipe("unet", name, size, 8), step_s, step_s / 20))


def test_screening_is_priced_at_its_worst_case():
    fp = Fingerprint(100, 10, (64, 64), 3)
    lite0, lite2 = read_portfolio().tier("cpu")[:2]
    found = [(lite0, WeightSource("assumed")), (replace(lite2, family="unet"), WeightSource("assumed"))]
    rungs = rungs_of(2, 1, 24)
    assert rungs == [
        {"epoch": 6, "runs": 2, "promoted": 1},
        {"epoch": 12, "runs": 1, "promoted": 1},
        {"epoch": 24, "runs": 1, "promoted": 1},
    ]
    assert rungs_of(1, 1, 24) == []  # one candidate: nothing compared
    s = plan_schedule(fp, found, ProfileCosts(CPU), 10 * 3600, Rules(sizes=(1.0,)))
    assert s.level == 2 and s.families == 1 and s.folds == 5  # one family: no ensemble of families
    assert s.stages[0].kind == StageKind.SETUP
    screen = s.stages[1]
    pricer = Pricer(fp, Rules(), list)
    cheap, pricey = sorted(s.screened, key=pricer.epoch)
    e_cheap, e_pricey = pricer.epoch(cheap), pricer.epoch(pricey)
    epochs = s.epochs
    quarter, half = epochs // 4, epochs // 2
    # both to a quarter, then the costlier alone to the end (12 s of start-ups per run and rung)
    expected = quarter * (e_cheap + e_pricey) + (epochs - quarter) * e_pricey + 4 * 2 * STAGE_START_S
    assert half > quarter and screen.seconds == pytest.approx(expected)
    a, b, c = tiny_candidate("cheap", "a", 0.1), tiny_candidate("pricey", "a", 0.2), tiny_candidate("other", "b", 0.1)
    assert [x.name for x in round_robin([a, b, c])] == ["cheap", "other", "pricey"]


def test_a_schedule_round_trips_through_its_file_and_another_format_is_refused():
    s = plan(CONTEST, read_device_profile("h100"), "24h")
    again = Schedule.from_dict(json.loads(json.dumps(s.to_dict())))
    assert again == s and again.table() == s.table()
    one = plan(CCP, CPU, "20m")
    assert Schedule.from_dict(json.loads(json.dumps(one.to_dict()))) == one
    from pipeline.planning.schedule import PlanFormatError

    old = {k: v for k, v in s.to_dict().items() if k != "format"}  # what an earlier version wrote
    with pytest.raises(PlanFormatError, match="format None"):
        Schedule.from_dict(old)
    broken = {**s.to_dict(), "stages": [{"kind": "train?"}]}
    with pytest.raises(ConfigError, match="malformed plan"):
        Schedule.from_dict(broken)


def test_device_profiles_scale_measurements_by_pixels_and_estimate_from_flops(tmp_path):
    lite0 = next(r for r in read_portfolio().recipes if r.name == "unet-lite0")
    t = CPU.throughput(lite0, (640, 224), 16)
    assert t.step_s == pytest.approx(2.2 * 2 * 2) and t.image_s == pytest.approx(0.045 * 2)
    two = DeviceProfile(
        "two", "cpu", measured={"unet-lite0": [Measured((64, 64), 8, 0.1, 0.01), Measured((512, 512), 8, 9.0, 0.5)]}
    )
    assert two.throughput(lite0, (96, 96), 8).step_s == pytest.approx(0.1 * 9 / 4)  # the nearer measurement
    h100 = read_device_profile("h100")
    assert h100.kind == "gpu" and h100.estimated and "989" in h100.estimate.derivation
    upernet = next(r for r in read_portfolio().recipes if r.name == "upernet-convnext-small")
    t = h100.throughput(upernet, (512, 512), 8)
    flops = 8 * 0.262144 * upernet.gmacs_per_mpx * 1e9 * 6
    assert t.step_s == pytest.approx(flops / (989e12 * h100.estimate.train_utilisation) + 0.02)
    assert t.checkpoint_mb == pytest.approx(upernet.params_m * 12)
    # the loader caps a light recipe, the more so when two jobs' loaders share the host
    capped = Estimate(989, 0.06, 0.1, loader_images_per_s=100)
    assert capped.step_s(lite0, (512, 512), 8) == pytest.approx(0.08)
    assert capped.step_s(lite0, (512, 512), 8, sharing=2) == pytest.approx(0.16)
    with pytest.raises(ConfigError, match="no measurement of recipe 'upernet-convnext-small'"):
        CPU.throughput(upernet, (512, 512), 8)
    bad = tmp_path / "d.yaml"
    bad.write_text("name: d\nkind: tpu\nestimate: {peak_tflops: 1, train_utilisation: 0.1, predict_utilisation: 0.1}\n")
    with pytest.raises(ConfigError, match=r"d\.yaml: kind"):
        read_device_profile(bad)
    bad.write_text("name: d\nkind: cpu\nmeasured: {x: {size: [32], batch: 1, step_s: 1, image_s: 1}}\n")
    with pytest.raises(ConfigError, match=r"d\.yaml: measured\.x"):
        read_device_profile(bad)
    with pytest.raises(ConfigError, match="no file .*nope.yaml; known: .*h100"):
        read_device_profile("nope")


def test_the_shipped_cpu_profile_measures_every_cpu_recipe():
    cpu = read_device_profile("cpu-2core")
    assert cpu.kind == "cpu" and not cpu.estimated
    assert {r.name for r in read_portfolio().tier("cpu")} <= set(cpu.measured)


def test_make_plan_keeps_the_plan_with_its_stamp_and_prints_it(tmp_path):
    from pipeline.plan import PlanConfig, run

    ws = tmp_path / "work" / "x"
    ws.mkdir(parents=True)
    (ws / "plan.json").write_text(json.dumps({"key": "abc", "plan": {"epochs": 3}}))  # an earlier version's
    cfg = PlanConfig(
        budget="24h", name="x", work_dir=str(tmp_path / "work"), device_profile="h100", fingerprint="recycle-trash"
    )
    out = run(cfg)
    saved = json.loads((ws / "plan.json").read_text())
    assert saved["format"] == FORMAT_VERSION and saved["planned_by"] == "make plan" and saved["key"]
    assert saved["planned_for"]["device"] == "profile h100"
    assert saved["schedule"]["level"] == 4 and saved["schedule"] == out["schedule"]
    assert "assume_weights=true" in out["text"] and "pseudo-label round" in out["text"]
    assert (ws / "plan.txt").read_text().strip() == out["text"].strip()
    with pytest.raises(ConfigError, match="save_profile"):
        run(PlanConfig(device_profile="h100", save_profile=str(tmp_path / "p.yaml")))


@pytest.mark.parametrize("budget", ["2h", "24h"])
def test_make_plans_table_fits_100_columns_with_short_paths_and_plan_json_keeps_them_whole(tmp_path, budget):
    """What `make plan BUDGET=... DEVICE_PROFILE=h100 FINGERPRINT=recycle-trash` prints and writes to
    plan.txt: every line within TEXT_WIDTH, the profile and fingerprint named from the package root;
    plan.json keeps the absolute paths."""
    from pipeline.core.tables import TEXT_WIDTH
    from pipeline.plan import PlanConfig, run
    from pipeline.planning.devices import read_device_profile

    cfg = PlanConfig(
        budget=budget, name="w", work_dir=str(tmp_path / "work"), device_profile="h100", fingerprint="recycle-trash"
    )
    out = run(cfg)
    printed = (tmp_path / "work" / "w" / "plan.txt").read_text()
    assert printed == out["text"] + "\n"
    too_wide = [line for line in printed.splitlines() if len(line) > TEXT_WIDTH]
    assert TEXT_WIDTH == 100 and not too_wide, "\n".join(too_wide)
    assert all(line == line.rstrip() for line in printed.splitlines())
    assert "data from pipeline/configs/fingerprints/recycle-trash.yaml" in printed
    assert "profile pipeline/configs/devices/h100.yaml" in re.sub(r"\s+", " ", printed)
    # keys stay in a narrow column, the values beside them (not pushed to the right margin)
    assert re.search(r"^TTA tried on OOF +none, hflip", printed, re.M)
    saved = json.loads((tmp_path / "work" / "w" / "plan.json").read_text())
    profile = str(read_device_profile("h100").source)
    assert profile.startswith("/") and profile in saved["schedule"]["device"]


def test_make_plan_probes_this_device_and_saves_a_profile_it_can_plan_from(demo_data, tmp_path):
    from pipeline.plan import PlanConfig, run

    portfolio = tmp_path / "portfolio.yaml"
    portfolio.write_text(
        "recipes:\n"
        "  - {name: a, tier: cpu, family: unet, model: unet, encoder: tu-mobilenetv3_small_050, weights: none,"
        " size: 0.25, batch: 2, gmacs_per_mpx: 1, params_m: 1}\n"
        "  - {name: b, tier: cpu, family: fpn, model: fpn, encoder: tu-mobilenetv3_small_050, weights: none,"
        " size: 0.25, batch: 2}\n"
    )
    profile = tmp_path / "mine.yaml"
    common = dict(data_dir=str(demo_data), name="p", work_dir=str(tmp_path / "w"), portfolio=str(portfolio))
    measured = run(PlanConfig(budget="3h", save_profile=str(profile), threads=1, **common))
    s = measured["schedule"]
    assert s["level"] >= 2 and {c["name"] for c in s["screened"]} == {"a", "b"}
    assert s["fingerprint"]["n_labelled"] > 0 and s["planned_s"] <= parse_budget("3h")
    saved = read_device_profile(profile)
    assert saved.kind == "cpu" and set(saved.measured) == {"a", "b"}
    again = run(PlanConfig(budget="3h", device_profile=str(profile), **common))["schedule"]
    assert again["level"] == s["level"] and again["epochs"] == pytest.approx(s["epochs"], abs=1)


def test_the_plans_price_each_written_prediction_set_with_its_classes():
    c = plan(CCP, CPU, "20m").screened[0]
    few = Fingerprint(804, 200, (412, 275), 11, 4, 0, 1.52)
    rules = Rules(k=5, tta=("none", "hflip"), oof_scale=0.5)
    cost = {fp.num_classes: Pricer(fp, rules, list).predictions(c, 2, 3) for fp in (few, CCP)}
    written = 2 * 2 * CCP.n_val(5) + 3 * CCP.n_test  # 2 TTA sets of 2 OOF folds, 3 test runs
    per_image = maps_seconds(c.throughput, 59) - maps_seconds(c.throughput, 11)
    assert cost[59] - cost[11] == pytest.approx(written * per_image * PREDICT_SAFETY_FACTOR)


def test_the_wall_time_of_jobs_on_several_devices_is_list_scheduling_the_longest_first():
    assert makespan([5, 4, 3, 3, 3], 2) == 10  # 5 | 4, 3 on the second | 3 on the first | 3 on the second
    assert makespan([3, 3, 3, 3], 2) == 6 and makespan([3, 3, 3, 3], 1) == 12 and makespan([], 2) == 0
    assert makespan([7, 1, 1], 4) == 7  # no job is split
    # a plan's stage on two devices costs the makespan of its jobs
    fp, t4x2 = CONTEST, read_device_profile("kaggle-t4x2")
    one, two = plan(fp, t4x2, "24h", slots=1, level=3), plan(fp, t4x2, "24h", slots=2, level=3)
    folds = next(st for st in two.stages if st.kind == StageKind.FOLDS)
    pricer = Pricer(fp, Rules(slots=2), list)
    kept = sorted(two.screened, key=pricer.epoch, reverse=True)
    kept = [next(c for c in kept if c.family == f) for f in dict.fromkeys(c.family for c in kept)][: two.families]
    jobs = [pricer.run(c, two.epochs) for c in kept for _ in range(two.folds - 1)]
    assert folds.seconds == pytest.approx(makespan(jobs, 2)) and folds.seconds < sum(jobs)
    assert "2 devices side by side" in folds.detail and two.slots == 2 and one.slots == 1


def test_two_t4s_buy_a_richer_plan_or_the_same_one_sooner_and_24h_on_an_h100_still_plans_level_4():
    t4x2 = read_device_profile("kaggle-t4x2")
    assert t4x2.gpus == 2 and t4x2.cpus == 4 and t4x2.precision == "fp16"
    for budget in ("2h", "9h"):
        one, two = plan(CONTEST, t4x2, budget, slots=1), plan(CONTEST, t4x2, budget, slots=2)
        richer = (two.level, two.folds, two.families, two.epochs) > (one.level, one.folds, one.families, one.epochs)
        assert richer or two.planned_s < one.planned_s, (budget, one.to_dict(), two.to_dict())
        assert two.planned_s <= parse_budget(budget)
    assert plan(CONTEST, read_device_profile("h100"), "24h").level == 4
    for name in ("t4", "v100", "a100", "h100", "h200", "kaggle-t4x2"):
        p = read_device_profile(name)
        assert p.kind == "gpu" and p.precision in ("bf16", "fp16") and p.estimate is not None, name
        assert "Measured on an H200" in (DEVICES / f"{name}.yaml").read_text(), name  # says where figures come from


def test_a_day_on_an_h100_screens_the_large_tier_and_tries_multi_scale_tta_and_the_crf_on_oof():
    h100 = read_device_profile("h100")
    day = plan(CONTEST, h100, "24h", tta=None, postprocess=None, cpus=h100.cpus)
    assert day.level == 4 and any(c.recipe.large for c in day.screened)
    assert "ms" in day.tta and "crf" in day.postprocess and day.planned_s <= parse_budget("24h")
    # two hours: every screened recipe's schedule is in the plan, which fits, at 24 epochs or more
    short = plan(CONTEST, h100, "2h", tta=None, postprocess=None, cpus=h100.cpus)
    assert short.planned_s <= 0.97 * parse_budget("2h") and short.epochs >= 24
    screen = next(st for st in short.stages if st.kind == StageKind.SCREEN)
    pricer = Pricer(CONTEST, Rules(tta=tuple(short.tta), postprocess=tuple(short.postprocess)), list)
    assert all(pricer.run(c, short.rungs[0]["epoch"]) <= screen.seconds for c in short.screened)
    # a T4's 16 GB hold no large recipe's training step: none is offered there
    t4 = read_device_profile("t4")
    assert not [r for r, _ in offers(read_portfolio(), "gpu", None, assume=True, memory_gb=t4.memory_gb) if r.large]
    small = plan(CONTEST, t4, "24h", tta=None, postprocess=None)
    assert not any(c.recipe.large for c in small.screened)


def test_given_tta_and_post_processing_are_the_plans_own():
    fixed = plan(CONTEST, read_device_profile("h100"), "24h", tta=("none",), postprocess=("min_area",))
    assert fixed.tta == ["none"] and fixed.postprocess == ["min_area"]
    one = plan(CCP, CPU, "20m", tta=None, postprocess=None)
    assert one.level == 1 and one.tta == ["none", "hflip"] and one.postprocess == ["min_area"]
