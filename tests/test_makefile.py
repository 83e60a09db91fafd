"""The Makefile's defaults agree with the stages: run folders and tuning profiles."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def dry_run(*args: str) -> str:
    out = subprocess.run(
        ["make", "-n", "--no-print-directory", *args], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("extra", [[], ["FOLD=2"], ["CONFIG=pipeline/configs/fpn.yaml"]])
def test_predict_reads_the_run_folder_that_train_writes(extra):
    train = dry_run("train", "MODEL=fpn", *extra)
    predict = dry_run("predict", "MODEL=fpn", *extra)
    experiment = re.search(r"\bexperiment=(\S+)", train).group(1)
    fold = re.search(r"\bfold=(\S+)", train).group(1)
    run_dir = re.search(r"\brun_dir=(\S+)", predict).group(1)
    assert run_dir == f"runs/{experiment}/fold{fold}"


def test_tuning_profile_is_explicit_not_guessed_from_the_data_path():
    full = dry_run("tune", "DATA_DIR=data/demo")
    assert "search_space_demo" not in full and "train_args" not in full
    demo = dry_run("tune", "PROFILE=demo", "DATA_DIR=/elsewhere")
    assert "space=pipeline/configs/search_space_demo.yaml" in demo and "max_train_batches=8" in demo
    assert "PROFILE" in subprocess.run(["make", "help"], cwd=ROOT, capture_output=True, text=True).stdout


def stage_argv(line: str) -> list[str]:
    """The words bash would give the stage for a dry-run line (the quoting included)."""
    import shlex

    return shlex.split(line)


def test_args_with_spaces_and_quotes_reach_the_stage_whole():
    from pipeline.core.config import split_args

    args = "model_options={unet: {decoder_channels: [128, 64, 32, 16, 16]}} class_thresholds={Battery: 0.7} name=it's"
    argv = stage_argv(dry_run("train", f"ARGS={args}"))
    assert argv[argv.index("--args") + 1] == args
    assert split_args("loss_options={classes: present} lr=1e-4") == ["loss_options={classes: present}", "lr=1e-4"]


def test_submit_takes_runs_and_the_format_defaults_to_auto():
    line = dry_run("submit", "RUNS=runs/unet runs/fpn")
    assert 'runs="runs/unet runs/fpn"' in line and "format=auto" in line
    assert "runs=" not in dry_run("submit", "NAME=best")
    assert "format=auto" in dry_run("all")


def test_top_k_is_the_averaging_count_and_k_the_fold_count():
    assert "k=5" in dry_run("average", "TOP_K=5").split()
    assert "k=5" not in dry_run("average", "K=5").split()
    assert "k=7" in dry_run("folds", "K=7").split()


def test_predict_png_and_images():
    assert "png=true" in dry_run("predict", "PNG=1").split()
    assert "png=true" not in dry_run("predict").split()
    assert "images=shots" in dry_run("predict", "PNG=1", "IMAGES=shots").split()


def test_a_tuned_config_trains_into_its_own_experiment(tmp_path):
    best = tmp_path / "best.yaml"
    best.write_text("model: fpn\nexperiment: lr-study-best\nlr: 0.001\n")
    train = dry_run("train", f"CONFIG={best}")
    assert f"--config {best}" in train and "experiment=lr-study-best" in train
    assert "run_dir=runs/lr-study-best/fold0" in dry_run("predict", f"CONFIG={best}")
    plain = tmp_path / "mine.yaml"
    plain.write_text("model: fpn\nexperiment: null\n")
    assert "experiment=mine" in dry_run("train", f"CONFIG={plain}")
    assert f"base_config={best}" in dry_run("tune", f"CONFIG={best}")


def test_help_lists_every_variable():
    text = (ROOT / "Makefile").read_text()
    variables = re.findall(r"^([A-Z_]+)\s*\?=", text, re.M)
    shown = subprocess.run(["make", "help"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    missing = [v for v in variables if not re.search(rf"\b{v}=", shown)]
    assert len(variables) > 30 and not missing, missing
