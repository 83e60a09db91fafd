"""make all executing a plan of level 2-4: successive-halving screening on fold 0, more folds, the
ensemble across folds and families, the pseudo-label round, and kills mid-screening and mid-ensemble."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import fixed_costs

from pipeline.core.errors import PipelineError
from pipeline.engine.train_config import TrainConfig
from pipeline.models.pretrained import WeightSource
from pipeline.planning.costs import store_scale
from pipeline.planning.executor import effective_rungs, promote
from pipeline.planning.fingerprint import Fingerprint
from pipeline.planning.planner import Rules, plan_schedule
from pipeline.planning.portfolio import read_portfolio

ROOT = Path(__file__).resolve().parents[1]


def entry(name: str, family: str, miou: float) -> dict:
    return {"name": name, "family": family, "miou": {"point": miou, "low": miou, "high": miou}}


def test_the_final_promotion_keeps_the_best_of_each_family_first():
    entries = [entry("a1", "a", 0.5), entry("a2", "a", 0.49), entry("b1", "b", 0.4), entry("c1", "c", 0.3)]
    assert promote(entries, 2, final=False) == {"a1", "a2"}  # an early rung: the best two
    assert promote(entries, 2, final=True) == {"a1", "b1"}  # before the last rung: two families
    assert promote(entries, 4, final=True) == {"a1", "b1", "c1", "a2"}


def test_rungs_that_promote_every_run_are_not_paused_at():
    rungs = [{"epoch": 2, "runs": 3, "promoted": 2}, {"epoch": 4, "runs": 2, "promoted": 2}, {"epoch": 8, "runs": 2}]
    assert [r["epoch"] for r in effective_rungs(rungs, 8)] == [2, 8]
    assert effective_rungs([], 5) == [{"epoch": 5, "runs": 1, "promoted": 1}]


FP = Fingerprint(n_labelled=800, n_test=200, size=(256, 384), num_classes=12)


def test_test_maps_are_stored_near_the_trained_size_and_at_the_oof_scale_when_many_are_averaged():
    assert store_scale((128, 192), (275, 412)) == pytest.approx(192 / 412)  # the larger side's ratio
    assert store_scale((128, 192), (275, 412), multi=True) == pytest.approx(192 / 412 * TrainConfig.oof_scale)
    assert store_scale((512, 512), (275, 412)) == 1.0  # never above the images' own size


def test_a_forced_level_trains_fewer_epochs_and_refuses_when_it_cannot_fit():
    lite0, lite2 = read_portfolio().tier("cpu")[:2]
    found = [(lite0, WeightSource("assumed")), (lite2, WeightSource("assumed"))]  # one family
    step = {lite0.name: 1.0, lite2.name: 1.2}
    costs = lambda: fixed_costs(lambda r, size: (step[r.name], step[r.name] / 20, 0.0))  # noqa: E731

    def plan(budget_s: float, **rules):
        return plan_schedule(FP, found, costs(), budget_s, Rules(k=5, sizes=(0.5,), **rules))

    free = plan(3600)
    assert free.level == 1  # 24 epochs of a screen and a refit do not fit an hour
    forced = plan(3600, level=2, partial="folds")
    assert forced.level == 2 and 4 <= forced.epochs < 24 and forced.folds >= 3 and not forced.refit
    assert forced.planned_s <= 3600
    # 30 minutes: 5 folds of 4 epochs do not fit, a refit or 3-4 folds do (no screen: max_screen=1); the
    # maps each fold's OOF and test predictions write take the minutes below that (25 minutes fit no fold plan)
    refit = plan(1800, level=2, partial="refit", max_screen=1)
    assert refit.refit and refit.folds == 1 and [c.name for c in refit.screened] == ["unet-lite0"]
    assert not refit.rungs  # one candidate: nothing compared, it trains straight through
    folds = plan(1800, level=2, partial="folds", max_screen=1)
    assert not folds.refit and 3 <= folds.folds < 5 and refit.epochs >= folds.epochs  # 2 runs against 3-4
    capped = plan(1800, level=2, partial="refit", max_screen=1, max_epochs=5)
    assert capped.epochs == 5
    with pytest.raises(PipelineError, match="no plan of level 4 fits"):
        plan(3600, level=4)  # one family: no cross-family ensemble


PORTFOLIO = """recipes:
  - {name: tiny-unet, tier: cpu, family: unet, model: unet, encoder: tu-mobilenetv3_small_050, weights: none,
     size: 1.0, batch: 8, lr: 0.002}
  - {name: tiny-fpn, tier: cpu, family: fpn, model: fpn, encoder: tu-mobilenetv3_small_050, weights: none,
     size: 1.0, batch: 8, lr: 0.002}
  - {name: tiny-unet-slow, tier: cpu, family: unet, model: unet, encoder: tu-mobilenetv3_small_050, weights: none,
     size: 1.0, batch: 8, lr: 0.00001}
"""


def wait_for(condition, proc: subprocess.Popen, log: Path, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, log.read_text()[-3000:]
    assert condition(), "timed out: " + log.read_text()[-3000:]


def kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_make_all_screens_trains_two_folds_ensembles_pseudo_labels_and_resumes_after_kills(demo_data, tmp_path):
    """Level 4 on tiny images: three recipes of two families screened (one out at the first rung, its
    checkpoints deleted), two survivors of distinct families on 2 folds, their ensemble, the pseudo-label
    round, a scored submission; killed mid-screening and mid-ensemble, each re-run continues (finished
    rungs and runs are not trained again), and a last re-run takes seconds."""
    (tmp_path / "portfolio.yaml").write_text(PORTFOLIO)
    args = [
        f"data_dir={demo_data}",
        "budget=20m",
        "name=t",
        "level=4",
        "k=2",
        "max_epochs=4",
        f"portfolio={tmp_path / 'portfolio.yaml'}",
        "encoder_weights=null",
        "sizes=[1.0]",
        "tta=[none]",
        "progress=false",
        "threads=2",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "pipeline.autopilot", *args]
    ws = tmp_path / "work" / "t"

    def start(name: str) -> tuple[subprocess.Popen, Path]:
        log = tmp_path / f"{name}.log"
        out = open(log, "w")
        return subprocess.Popen(command, cwd=tmp_path, env=env, start_new_session=True, stdout=out, stderr=out), log

    first, log1 = start("first")  # killed once the first rung is scored (the survivors train on)
    wait_for(lambda: (ws / "screen.json").is_file(), first, log1)
    kill(first)
    ladder = json.loads((ws / "screen.json").read_text())["rungs"]
    assert len(ladder) == 1 and [e["promoted"] for e in ladder[0]["entries"]].count(False) == 1

    second, log2 = start("second")  # killed while the first ensemble is being chosen
    wait_for(lambda: "ensemble-t: pipeline.ensemble" in log2.read_text(), second, log2, 600)
    kill(second)
    assert "train-tiny-fpn-fold0-e1:" not in log2.read_text()  # the scored rung is not trained again
    # rung 1 pauses its runs at epoch 1; the final rung runs on under a time budget from what is left
    rung1 = [line for line in log1.read_text().splitlines() if "-fold0-e1: pipeline.train" in line]
    assert len(rung1) == 3 and all("stop_epoch=1" in line and "time_budget" not in line for line in rung1)
    final = [line for line in log2.read_text().splitlines() if re.search(r"train-[\w-]+-fold0: pipeline.train", line)]
    assert len(final) == 2 and all("time_budget=" in line and "stop_epoch" not in line for line in final)
    assert not (ws / "ensembles" / "t" / "weights.yaml").exists()

    third = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert third.returncode == 0, third.stderr[-3000:]
    ladder = json.loads((ws / "screen.json").read_text())["rungs"]
    for survivor in (e["name"] for e in ladder[-1]["entries"]):  # trained by the killed run, not again
        assert f"train-{survivor}-fold1: unchanged, skipped" in third.stderr
    assert [r["epoch"] for r in ladder] == [1, 4]
    out = {e["name"] for e in ladder[0]["entries"] if not e["promoted"]}
    survivors = [e["name"] for e in ladder[-1]["entries"]]
    assert len(out) == 1 and len(survivors) == 2
    assert {s.split("-")[1] for s in survivors} == {"unet", "fpn"}  # one of each family
    (loser,) = out
    assert not (ws / "runs" / loser / "fold0" / "best.pt").exists()  # disk for the folds
    for s in survivors:
        for fold in (0, 1):
            assert (ws / "runs" / s / f"fold{fold}" / "test_none" / "meta.json").is_file()
    pseudo = [p for p in (ws / "runs").iterdir() if p.name.endswith("-pseudo")]
    assert len(pseudo) == 1 and {p.name for p in pseudo[0].iterdir()} >= {"fold0", "fold1"}
    for fold in (0, 1):  # each fold's pseudo-labels come from that fold's models only
        manifest = json.loads((ws / "pseudo" / f"t-fold{fold}" / "manifest.json").read_text())
        assert all(f"fold{fold}" in r for r in manifest["source"]["runs"]), manifest["source"]
    weights = (ws / "ensembles" / "t" / "weights.yaml").read_text()
    assert all(s in weights for s in survivors)
    summary = (ws / "summary.txt").read_text()
    for text in ("screen epoch 1", "screen epoch 4", "out", "promoted", "fold 0, fold 1", "pseudo-label round"):
        assert text in summary, text
    assert (tmp_path / "submissions" / "t.csv").is_file() and (ws / "score.json").is_file()
    state = json.loads((ws / "state.json").read_text())
    assert state["spent_s"] <= 1.1 * 20 * 60

    before = (tmp_path / "submissions" / "t.csv").read_bytes()
    started = time.monotonic()
    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert time.monotonic() - started < 60 and "pipeline.train" not in again.stderr
    assert (tmp_path / "submissions" / "t.csv").read_bytes() == before


def stores(ws: Path) -> dict[str, bytes]:
    """Every probability map, ensemble weight file and the submission a run wrote, by path."""
    found = [p for p in (ws / "runs").rglob("*.npy") if p.parent.name.endswith(("_none", "oof"))]
    found += list((ws / "ensembles").rglob("weights.yaml"))
    return {str(p.relative_to(ws)): p.read_bytes() for p in found}


@pytest.mark.slow
def test_two_device_slots_run_jobs_side_by_side_and_write_what_one_slot_writes(demo_data, tmp_path):
    """A CPU given two slots (gpus=2) and one thread a job: the screen's two runs and the predictions run
    side by side (their logged times overlap, each with its own log); killed while two jobs run, the run
    resumes and finishes; its maps, ensemble weights and submission equal those of one slot."""
    (tmp_path / "portfolio.yaml").write_text(PORTFOLIO)
    args = [
        f"data_dir={demo_data}",
        "budget=24h",
        "name=t",
        "level=2",
        "partial=folds",
        "k=2",
        "max_screen=2",
        "max_epochs=2",
        f"portfolio={tmp_path / 'portfolio.yaml'}",
        "encoder_weights=null",
        "tta=[none]",
        "progress=false",
        "threads=1",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}

    def command(slots: int) -> list[str]:
        return [sys.executable, "-m", "pipeline.autopilot", *args, f"gpus={slots}"]

    for slots in (1, 2):
        (tmp_path / f"s{slots}").mkdir()
    one = subprocess.run(command(1), cwd=tmp_path / "s1", env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]

    cwd, ws = tmp_path / "s2", tmp_path / "s2" / "work" / "t"
    log = cwd / "first.log"
    with open(log, "w") as out:
        first = subprocess.Popen(command(2), cwd=cwd, env=env, start_new_session=True, stdout=out, stderr=out)
    wait_for(lambda: len(list((ws / "logs").glob("train-*.log"))) >= 2, first, log)  # both screen runs started
    kill(first)
    again = subprocess.run(command(2), cwd=cwd, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    jobs = [json.loads(line) for line in (ws / "jobs.jsonl").read_text().splitlines()]
    trains = [j for j in jobs if j["name"].startswith("train-") and j["name"].endswith("fold0")]
    assert len(trains) == 2 and {j["slot"] for j in trains} == {0, 1}
    a, b = trains
    assert a["start"] < b["end"] and b["start"] < a["end"]  # side by side
    assert all((ws / "logs" / f"{j['name']}.log").is_file() for j in trains)
    assert "devices" in (ws / "summary.txt").read_text()
    single = stores(tmp_path / "s1" / "work" / "t")
    assert len(single) >= 5 and stores(ws) == single
    assert (cwd / "submissions" / "t.csv").read_bytes() == (tmp_path / "s1" / "submissions" / "t.csv").read_bytes()
