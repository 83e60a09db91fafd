"""The budgeted auto-pilot: budgets, stamps, plans, and a tiny budgeted run that re-runs in seconds."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import namedtuple
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import fixed_costs

import pipeline.autopilot as autopilot_mod
from pipeline.autopilot import AutopilotConfig, run
from pipeline.core.errors import ConfigError, PipelineError
from pipeline.models.pretrained import WeightSource
from pipeline.planning.budget import BudgetClock, parse_budget
from pipeline.planning.costs import MAPS_S_PER_CLASS_MPX, MIN_EPOCHS, SIZE_EPOCHS, Recipe, maps_seconds, val_every
from pipeline.planning.fingerprint import Fingerprint
from pipeline.planning.planner import Rules, plan_schedule
from pipeline.planning.portfolio import read_portfolio
from pipeline.planning.probe import checkpoint_bytes
from pipeline.planning.schedule import Schedule, Stage, StageKind
from pipeline.planning.stamps import Stamps, stamp_key


@pytest.mark.parametrize(
    "text, seconds", [("20m", 1200), ("2h", 7200), ("90m", 5400), ("1h30m", 5400), ("45s", 45), ("600", 600), (90, 90)]
)
def test_budgets_parse(text, seconds):
    assert parse_budget(text) == seconds


@pytest.mark.parametrize("bad", ["", "20 minutes", "-5m", "0", "m", "2x"])
def test_bad_budgets_are_clear_errors(bad):
    with pytest.raises(ConfigError, match="BUDGET="):
        parse_budget(bad)


def test_the_clock_keeps_what_was_spent_across_a_restart(tmp_path):
    clock = BudgetClock(tmp_path / "state.json", 100, every=0.05)
    time.sleep(0.2)
    clock.add_stage("train", 12.5)
    clock.close()
    again = BudgetClock(tmp_path / "state.json", 100)
    assert again.spent_before >= 0.2 and again.stages == {"train": 12.5}
    assert again.remaining() < 100 - 0.2
    again.close()


def test_stamps_follow_contents_and_settings_not_file_times(tmp_path):
    src, out = tmp_path / "in.json", tmp_path / "out.csv"
    src.write_text("a")
    out.write_text("x")
    stamps = Stamps(tmp_path / "stamps")
    key = stamp_key({"k": 5}, [src])
    stamps.mark("folds", key, [out])
    assert stamps.done("folds", stamp_key({"k": 5}, [src]))
    src.touch()  # a new time, the same content
    assert stamps.done("folds", stamp_key({"k": 5}, [src]))
    assert not stamps.done("folds", stamp_key({"k": 4}, [src]))
    src.write_text("b")
    assert not stamps.done("folds", stamp_key({"k": 5}, [src]))
    src.write_text("a")
    out.unlink()  # a missing output re-runs the stage
    assert not stamps.done("folds", key)


LITE0, LITE2 = read_portfolio().tier("cpu")[:2]
FP = Fingerprint(n_labelled=1000, n_test=200, size=(256, 256), num_classes=12)  # 800 training, 200 validation


def one_recipe(figures, budget_s: float, fp: Fingerprint = FP, recipes=(LITE0, LITE2), **rules) -> Schedule:
    """The one-recipe plan (level 1) of pretrained ``recipes`` priced with fixed ``figures``."""
    found = [(r, WeightSource("assumed")) for r in recipes]
    return plan_schedule(fp, found, fixed_costs(figures), budget_s, Rules(level=1, **rules))


def by_side(steps: dict[int, float], ckpt_mb: float = 0.0):
    """Figures of every recipe: seconds per step of 8 images at each side, an image at a twentieth."""
    return lambda recipe, size: (steps[size[0]], steps[size[0]] / 20, ckpt_mb) if size[0] in steps else None


def stage(s: Schedule, kind: StageKind) -> Stage:
    return next(st for st in s.stages if st.kind == kind)


def test_the_plan_prices_writing_each_prediction_set_with_its_classes():
    figures = by_side({128: 0.2})
    few = one_recipe(figures, 1200, recipes=(LITE0,), sizes=(0.5,), tta=("none", "hflip"))
    many = one_recipe(figures, 1200, replace(FP, num_classes=48), recipes=(LITE0,), sizes=(0.5,), tta=("none", "hflip"))
    t = few.screened[0].throughput
    assert maps_seconds(t, 12) == pytest.approx(MAPS_S_PER_CLASS_MPX * 12 * 128 * 128 / 1e6)
    assert maps_seconds(t.scaled((256, 256), 8), 12) == pytest.approx(4 * maps_seconds(t, 12))  # trained pixels
    extra = stage(many, StageKind.PREDICT).seconds - stage(few, StageKind.PREDICT).seconds
    # two OOF sets and the test set, each image written with 36 more classes, priced 20% above
    assert extra == pytest.approx((2 * 200 + 200) * (maps_seconds(t, 48) - maps_seconds(t, 12)) * 1.2)
    assert extra > 0 and many.epochs <= few.epochs and many.planned_s <= 0.97 * 1200


def test_at_the_chosen_size_the_larger_model_is_the_larger_checkpoint_even_when_it_timed_faster():
    def figures(checkpoints: bool):
        def f(recipe, size):  # a noisy probe timed Lite2 faster than Lite0
            step = 0.45 if recipe is LITE2 else 0.48
            return step, 0.01, (120.0 if recipe is LITE2 else 75.0) if checkpoints else 0.0

        return f

    for recipes in ((LITE0, LITE2), (LITE2, LITE0)):
        s = one_recipe(figures(True), 1200, recipes=recipes, sizes=(0.5,))
        assert s.epochs >= SIZE_EPOCHS and s.screened[0].recipe is LITE2
    unmeasured = one_recipe(figures(False), 1200, sizes=(0.5,))  # no checkpoint size: the slower step
    assert unmeasured.screened[0].recipe is LITE0


def test_the_plan_uses_most_of_the_budget_and_prefers_the_largest_size_that_trains_enough():
    figures = by_side({128: 0.2, 256: 0.35})
    plan = one_recipe(figures, 1200, recipes=(LITE0,), sizes=(0.5, 1.0))
    (c,) = plan.screened
    assert c.size == (256, 256) and plan.epochs >= SIZE_EPOCHS  # the larger one still trains enough
    assert c.name == "unet-lite0-256x256" and plan.stretch == 3  # not the recipe's own size (0.75)
    assert 0.8 * 1200 <= plan.planned_s <= 0.97 * 1200
    assert Schedule.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    # a shorter budget: the large size no longer trains enough epochs, the small one does
    short = one_recipe(figures, 480, recipes=(LITE0,), sizes=(0.5, 1.0))
    assert short.screened[0].size == (128, 128) and short.epochs >= SIZE_EPOCHS and short.planned_s <= 480
    alone = one_recipe(figures, 480, recipes=(LITE0,), sizes=(1.0,))
    assert alone.screened[0].size == (256, 256) and alone.epochs < SIZE_EPOCHS
    # shorter still: no size trains enough epochs, so the one that trains most is taken
    shorter = one_recipe(figures, 330, recipes=(LITE0,), sizes=(0.5, 1.0))
    assert shorter.screened[0].size == (128, 128) and MIN_EPOCHS <= shorter.epochs < SIZE_EPOCHS
    with pytest.raises(PipelineError, match="too short"):
        one_recipe(figures, 60, recipes=(LITE0,), sizes=(1.0,))
    # repeat-factor sampling makes an epoch longer: the plan counts the images an epoch goes through
    repeated = one_recipe(figures, 480, replace(FP, epoch_factor=1.5), recipes=(LITE0,), sizes=(0.5,))
    assert repeated.epochs < short.epochs
    screen = stage(repeated, StageKind.SCREEN).detail
    assert (
        "(1200 per epoch, rare classes repeated)" in screen and "per epoch" not in stage(short, StageKind.SCREEN).detail
    )
    # validation about VALIDATIONS times a run, every epoch for short runs
    assert [val_every(e) for e in (1, 5, 6, 8, 11, 12, 25, 60)] == [1, 1, 1, 1, 2, 2, 4, 10]


def test_the_disk_estimate_counts_the_measured_checkpoint_and_every_store():
    from pipeline.engine.checkpoint import serialize
    from pipeline.models import build_model

    # the probe's checkpoint size is what a checkpoint of the model and its AdamW state takes
    model = build_model("unet", 5, encoder="tu-mobilenetv3_small_050", encoder_weights=None)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 3, 64, 64)).mean().backward()
    opt.step()
    written = len(serialize({"model": model.state_dict(), "optimizer": opt.state_dict()}))
    assert checkpoint_bytes(model) == pytest.approx(written, rel=0.05)

    # best.pt and last.pt, OOF maps for the training and each TTA set at a quarter of the pixels,
    # test maps at the trained size, float16; the image cache: every labelled image (3 bytes a pixel) and
    # its map (1) at the trained size
    fp = Fingerprint(n_labelled=50, n_test=20, size=(64, 32), num_classes=7)  # 10 validation images
    plan = one_recipe(lambda r, size: (0.1, 0.01, 100.0), 600, fp, recipes=(LITE0,), sizes=(1.0,))
    expected = 2 * 100.0 + (3 * 10 * 7 * 64 * 32 * 2 / 4 + 20 * 7 * 64 * 32 * 2 + 50 * 64 * 32 * 4) / 1e6
    assert plan.screened[0].size == (64, 32) and plan.disk_mb == pytest.approx(expected)
    assert Schedule.from_dict(json.loads(json.dumps(plan.to_dict()))).screened[0].throughput.checkpoint_mb == 100.0


def test_a_progressive_phase_is_probed_and_planned_at_its_own_step_time():
    from pipeline.planning.probe import probe

    t = probe(
        Recipe("unet", "tu-mobilenetv3_small_050", (256, 128), 2), 5, torch.device("cpu"), repeats=3, low_scale=0.5
    )
    assert 0 < t.low_step_s < t.step_s  # the step at 128x64 is measured, and cheaper (a quarter of the pixels)
    assert (
        probe(Recipe("unet", "tu-mobilenetv3_small_050", (64, 64), 2), 5, torch.device("cpu"), repeats=1).low_step_s
        == 0
    )
    # a plan with 70% of its epochs at a step of a third of the time trains more epochs, and says so
    figures = lambda r, size: (0.3, 0.01, 0.0, 0.1)  # noqa: E731
    plain = one_recipe(figures, 600, recipes=(LITE0,), sizes=(0.5,))
    progressive = one_recipe(figures, 600, recipes=(LITE0,), sizes=(0.5,), progressive=0.7)
    assert progressive.epochs > plain.epochs
    first = int(0.7 * progressive.epochs)
    detail = stage(progressive, StageKind.SCREEN).detail
    assert f"the first {first} at a smaller size" in detail and "at a smaller size" not in plain.table()
    assert Schedule.from_dict(json.loads(json.dumps(progressive.to_dict()))) == progressive


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="BUDGET="):
        AutopilotConfig(budget="soon").validate()
    with pytest.raises(ConfigError, match="sizes must be fractions"):
        AutopilotConfig(sizes=[0.0]).validate()
    with pytest.raises(ConfigError, match="recipes: name at least one"):
        AutopilotConfig(recipes=[]).validate()
    with pytest.raises(ConfigError, match="model_options"):
        AutopilotConfig(model_options={"unet": 3}).validate()


LIGHT = [64, 32, 16, 16, 8]


@pytest.mark.slow
def test_a_tiny_budgeted_run_ends_in_a_scored_submission_and_reruns_in_seconds(demo_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = AutopilotConfig(
        data_dir=str(demo_data),
        budget="150s",
        name="t",
        sizes=[0.5],
        tta=["none", "hflip"],
        progress=False,
        threads=2,
        model_options={"unet": {"decoder_channels": LIGHT}, "fpn": {"decoder_dropout": 0.5}},
    )
    import pipeline.planning.probe as probe_mod

    probed = []
    real_build = probe_mod.build_model
    monkeypatch.setattr(probe_mod, "build_model", lambda *a, **kw: probed.append(kw) or real_build(*a, **kw))
    started = time.monotonic()
    first = run(cfg)
    spent = time.monotonic() - started
    assert spent <= 1.1 * 150
    ws = Path("work/t")
    # U-Net's options (a lighter decoder): measured by the probe, trained, and named in the plan
    light = LIGHT
    assert probed and all(kw["decoder_channels"] == light and "decoder_dropout" not in kw for kw in probed)
    (ckpt,) = (ws / "runs").glob("*/fold0/best.pt")
    assert (
        torch.load(ckpt, map_location="cpu", weights_only=False)["config"]["model_options"]["decoder_channels"] == light
    )
    assert "decoder_channels" in (ws / "plan.txt").read_text()
    for name in ("plan.txt", "summary.txt", "state.json", "ensembles/t/weights.yaml", "score.json"):
        assert (ws / name).is_file(), name
    # the plan and the summary a person reads fit 100 columns; the weights file is named from
    # site-packages there, and plan.json keeps its absolute path
    for name in ("plan.txt", "summary.txt"):
        too_wide = [line for line in (ws / name).read_text().splitlines() if len(line) > 100]
        assert not too_wide, f"{name}:\n" + "\n".join(too_wide)
    summary = (ws / "summary.txt").read_text()
    assert re.search(r"^weights of \S+ +package site-packages/", summary, re.M), summary
    assert re.search(r"^workspace +work/t$", summary, re.M), summary
    weights_path = json.loads((ws / "plan.json").read_text())["schedule"]["screened"][0]["weights"]["path"]
    assert Path(weights_path).is_absolute() and weights_path not in summary
    assert Path(first["submission"]).is_file() and 0 <= first["score"]["miou"] <= 1
    assert first["tta"] in ("none", "hflip")
    state = json.loads((ws / "state.json").read_text())
    assert {"folds", "probe", "train", "ensemble", "submit", "score"} <= set(state["stages"])
    # trained at about half size: test maps are stored at about the trained size (no coarser), not at
    # each image's (64x96)
    (test_store,) = (ws / "runs").glob(f"*/fold0/test_{first['tta']}/meta.json")
    train_h, train_w = json.loads(test_store.read_text())["train_size"]
    _, h, w = np.load(next(test_store.parent.glob("*.npy"))).shape
    assert h < 64 and w < 96 and h >= train_h - 1 and w >= train_w - 1
    # the plan's disk estimate (measured checkpoint size, every store) is near what the run wrote
    written_mb = sum(f.stat().st_size for f in ws.rglob("*") if f.is_file()) / 1e6
    planned_mb = json.loads((ws / "plan.json").read_text())["schedule"]["disk_mb"]
    assert 0.7 * planned_mb <= written_mb <= 1.3 * planned_mb, (written_mb, planned_mb)
    before = Path(first["submission"]).read_bytes()
    # a re-run has nothing left to write: a nearly full disk does not refuse it
    monkeypatch.setattr(autopilot_mod.shutil, "disk_usage", lambda p: DiskUsage(10**12, 10**12, 10**6))
    started = time.monotonic()
    second = run(cfg)  # every stage's stamp matches
    assert time.monotonic() - started < 20
    assert Path(second["submission"]).read_bytes() == before and second["score"]["miou"] == first["score"]["miou"]


DiskUsage = namedtuple("DiskUsage", "total used free")  # what shutil.disk_usage returns


def test_a_disk_too_small_for_the_plan_is_refused_before_training(demo_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(autopilot_mod.shutil, "disk_usage", lambda p: DiskUsage(10**12, 10**12, 5 * 10**6))
    # refused before any training, so the budget is only what plans: ample, for a plan even on a loaded machine
    cfg = AutopilotConfig(
        data_dir=str(demo_data), budget="10m", name="t", sizes=[0.5], progress=False, threads=2, level=1
    )
    with pytest.raises(PipelineError, match=r"work/t: the plan writes about \d+ MB more .* disk has 5 MB free"):
        run(cfg)
    ws = Path("work/t")
    assert (ws / "plan.txt").is_file() and not (ws / "runs").exists()  # planned, nothing trained


@pytest.mark.slow
def test_a_make_all_killed_mid_training_resumes_its_run(demo_data, tmp_path):
    """make all is killed once fold 0 has its first last.pt; the re-run (same arguments, less budget
    left, so another time_budget) resumes that run rather than refusing it or starting afresh."""
    import os
    import signal
    import subprocess
    import sys

    args = [
        f"data_dir={demo_data}",
        "budget=150s",
        "name=k",
        "sizes=[0.5]",
        "tta=[none]",
        "progress=false",
        "threads=2",
        f"model_options={json.dumps({'unet': {'decoder_channels': LIGHT}})}",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "pipeline.autopilot", *args]
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(command, cwd=tmp_path, env=env, start_new_session=True, stdout=log, stderr=log)
    runs = tmp_path / "work" / "k" / "runs"
    deadline = time.monotonic() + 180
    while not list(runs.glob("*/fold0/last.pt")) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    (last,) = runs.glob("*/fold0/last.pt")
    epochs_before = len(torch.load(last, map_location="cpu", weights_only=False)["history"])
    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed" in again.stderr and "another config" not in again.stderr
    history = torch.load(last.parent / "last.pt", map_location="cpu", weights_only=False)["history"]
    assert len(history) >= epochs_before and not list(last.parent.parent.glob("old-fold0-*"))
    assert (tmp_path / "submissions" / "k.csv").is_file()


def test_a_sigterm_stops_the_running_stage_with_the_budgeted_run(tmp_path):
    pid_file = tmp_path / "stage.pid"
    stage = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    script = tmp_path / "pilot.py"
    script.write_text(
        "import subprocess, sys\n"
        "from pipeline.autopilot import stop_on_sigterm\n"
        "stop_on_sigterm()\n"
        f"subprocess.run([sys.executable, '-c', {stage!r}], check=False)\n"
    )
    pilot = subprocess.Popen([sys.executable, str(script)], cwd=Path(__file__).resolve().parents[1])
    deadline = time.monotonic() + 60
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    stage_pid = int(pid_file.read_text())
    pilot.send_signal(signal.SIGTERM)
    assert pilot.wait(timeout=30) == 128 + signal.SIGTERM
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(stage_pid, 0)
        except ProcessLookupError:
            break  # the stage's process is gone, not training on in the workspace
        time.sleep(0.1)
    else:
        os.kill(stage_pid, signal.SIGKILL)
        raise AssertionError("the stage's process outlived the budgeted run it belongs to")


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel's parent-death signal is Linux's")
def test_a_sigkilled_run_takes_its_stage_with_it(tmp_path):
    """SIGKILL runs no handler in the run: the kernel ends its stage, which would otherwise train on,
    orphaned, beside the re-run that resumes the workspace."""
    pid_file = tmp_path / "stage.pid"
    stage = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    script = tmp_path / "pilot.py"
    script.write_text(
        f"import sys\nfrom pipeline.planning.processes import run_stage\nrun_stage([sys.executable, '-c', {stage!r}])\n"
    )
    pilot = subprocess.Popen([sys.executable, str(script)], cwd=Path(__file__).resolve().parents[1])
    deadline = time.monotonic() + 60
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    stage_pid = int(pid_file.read_text())
    assert alive(stage_pid)
    pilot.kill()  # the run's process only, not its process group
    assert pilot.wait(timeout=30) == -signal.SIGKILL
    deadline = time.monotonic() + 10
    while alive(stage_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if alive(stage_pid):
        os.kill(stage_pid, signal.SIGKILL)
        raise AssertionError("the stage's process outlived the SIGKILLed run it belongs to")


def test_one_run_per_workspace_and_a_killed_runs_lock_is_released(demo_data, tmp_path):
    from pipeline.planning.processes import WorkspaceLock

    ws = tmp_path / "work" / "x"
    ws.mkdir(parents=True)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom pipeline.planning.processes import WorkspaceLock\n"
            "lock = WorkspaceLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(120)",
            str(ws),
        ],
        cwd=Path(__file__).resolve().parents[1],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        cfg = AutopilotConfig(data_dir=str(demo_data), work_dir=str(tmp_path / "work"), name="x", budget="60s")
        with pytest.raises(PipelineError, match=rf"{ws}: another run is using this workspace \(pid {holder.pid}\)"):
            run(cfg)
        assert [p.name for p in ws.iterdir()] == [".lock"]  # refused before it wrote anything
    finally:
        holder.kill()
        holder.wait()
    with WorkspaceLock(ws):  # the kernel released the killed holder's lock
        with pytest.raises(PipelineError, match=rf"pid {os.getpid()}"):
            WorkspaceLock(ws).acquire()
    WorkspaceLock(ws).acquire().release()  # and this one's, on release
