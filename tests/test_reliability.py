"""Reliability: kills at named points while a temporary file exists, then a re-run completes and
no partial file stands where a good one stood; write failures are clear errors; a fixed seed
gives identical metrics."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]


def digest(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def stage(args: list[str], fault: str | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if fault:
        env["PIPELINE_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True)


def leftovers(folder: Path) -> list[Path]:
    return sorted(folder.rglob(".*.tmp"))


@pytest.fixture(scope="module")
def trained(demo_data_square, folds_file, tmp_path_factory):
    runs = tmp_path_factory.mktemp("rel")
    args = [
        "pipeline.train",
        f"data_dir={demo_data_square}",
        f"folds_file={folds_file}",
        f"runs_dir={runs}",
        f"cache_dir={runs / 'cache'}",
        "model=unet",
        "encoder=tu-mobilenetv3_small_050",
        "encoder_weights=null",
        "experiment=r",
        "img_size=[64]",
        "batch_size=8",
        "num_workers=0",
        "progress=false",
        "plot=false",
    ]
    return runs, args


@pytest.mark.slow
def test_kill_while_writing_last_pt_then_resume(trained):
    runs, args = trained
    assert stage([*args, "epochs=1"]).returncode == 0
    folder = runs / "r" / "fold0"
    before = {n: digest(folder / n) for n in ("last.pt", "best.pt", "metrics.csv")}
    killed = stage([*args, "epochs=2"], fault="before-rename:last.pt")
    assert killed.returncode == -9
    assert leftovers(folder), "the kill must strike while a temporary file exists"
    assert {n: digest(folder / n) for n in before} == before  # the good files are untouched
    done = stage([*args, "epochs=2"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert (folder / "metrics.csv").read_text().count("\n") == 3  # header + 2 epochs


@pytest.mark.slow
def test_kill_while_writing_a_store_an_ensemble_and_a_submission(trained, demo_data_square, tmp_path):
    runs, _ = trained
    run_dir = runs / "r" / "fold0"
    pred = [
        "pipeline.predict",
        f"run_dir={run_dir}",
        f"data_dir={demo_data_square}",
        "tta=none",
        "progress=false",
        "num_workers=0",
    ]
    assert stage(pred).returncode == 0
    store = run_dir / "test_none"
    index = digest(store / "index.csv")
    killed = stage(pred, fault="before-rename:index.csv")
    assert killed.returncode == -9 and leftovers(store) and digest(store / "index.csv") == index
    assert stage(pred).returncode == 0
    ens = [
        "pipeline.ensemble",
        f"runs={runs / 'r'}",
        "tta=none",
        f"data_dir={demo_data_square}",
        f"out_dir={tmp_path / 'ensembles'}",
        "name=e",
        "n_trials=3",
        "progress=false",
    ]
    done = stage(ens)
    assert done.returncode == 0, done.stderr[-2000:]
    weights = tmp_path / "ensembles" / "e" / "weights.yaml"
    weights_before = digest(weights)
    killed = stage(ens, fault="before-rename:weights.yaml")
    assert killed.returncode == -9 and leftovers(weights.parent) and digest(weights) == weights_before
    assert stage(ens).returncode == 0 and yaml.safe_load(weights.read_text())["members"]
    sub = [
        "pipeline.submit",
        "name=s",
        f"runs={runs / 'r'}",
        "tta=none",
        f"data_dir={demo_data_square}",
        f"out_dir={tmp_path}",
        "progress=false",
    ]
    assert stage(sub).returncode == 0
    csv_before = digest(tmp_path / "s.csv")
    killed = stage(sub, fault="before-rename:s.csv")
    assert killed.returncode == -9 and digest(tmp_path / "s.csv") == csv_before
    assert stage(sub).returncode == 0 and digest(tmp_path / "s.csv") == csv_before  # same inputs, same file


@pytest.mark.parametrize("errno_name", ["EACCES", "ENOSPC", "EROFS"])
def test_a_read_only_folder_or_a_full_disk_is_a_clear_error(tmp_path, monkeypatch, errno_name):
    import errno

    target = tmp_path / "out.txt"
    atomic_write_text(target, "good")
    real = os.replace

    def failing(src, dst):
        raise OSError(getattr(errno, errno_name), os.strerror(getattr(errno, errno_name)))

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(PipelineError, match="out.txt: cannot write"):
        atomic_write_text(target, "new")
    monkeypatch.setattr(os, "replace", real)
    assert target.read_text() == "good" and not leftovers(tmp_path)


@pytest.mark.slow
def test_two_runs_with_one_seed_give_identical_metrics(trained, tmp_path):
    runs, args = trained
    outs = []
    for name in ("a", "b"):
        done = stage(
            [
                *[a for a in args if not a.startswith(("runs_dir", "experiment"))],
                f"runs_dir={tmp_path}",
                f"experiment={name}",
                "epochs=2",
                "save_oof=false",
                "augment=strong",
            ]
        )
        assert done.returncode == 0, done.stderr[-2000:]
        outs.append((tmp_path / name / "fold0" / "metrics.csv").read_text())
    assert outs[0] == outs[1]
