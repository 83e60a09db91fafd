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
