"""format=auto: the data folder's sample_submission.csv decides the submission format (else rle)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline import autopilot as autopilot_mod
from pipeline.autopilot import Autopilot, AutopilotConfig
from pipeline.core.config import ConfigError
from pipeline.core.errors import PipelineError
from pipeline.data import load_coco
from pipeline.data.store import ProbWriter
from pipeline.planning import executor
from pipeline.submission.formats import SAMPLE_SUBMISSION, resolve_format
from pipeline.submit import SubmitConfig
from pipeline.submit import run as submit
from pipeline.validate import ValidateConfig
from pipeline.validate import run as validate

RLE_HEADER = "image_id,class_id,EncodedPixels"
DENSE_HEADER = "image_id,PredictionString"


def write_sample(folder: Path, header: str, encoding: str = "utf-8") -> Path:
    path = folder / SAMPLE_SUBMISSION
    path.write_text(f"{header}\nbatch_01_vt/0001.jpg,0 0 0\n", encoding=encoding)
    return path


@pytest.fixture
def data(demo_data, tmp_path) -> Path:
    """A copy of the tiny demo data (the shared one stays read-only), without a sample submission."""
    return Path(shutil.copytree(demo_data, tmp_path / "data"))


@pytest.fixture(scope="module")
def run_dir(demo_data, tmp_path_factory) -> Path:
    """An experiment folder with one fold of random test probabilities."""
    root = tmp_path_factory.mktemp("auto_run") / "exp"
    test = load_coco(demo_data, "test.json", require_annotations=False)
    rng = np.random.default_rng(0)
    with ProbWriter(root / "fold0" / "test_none", test.class_names) as w:
        for im in test.images:
            h, wd = int(im["height"]), int(im["width"])
            p = rng.random((test.num_classes, h // 2, wd // 2)).astype(np.float32)
            w.write(int(im["id"]), im["file_name"], h, wd, p / p.sum(0, keepdims=True))
    return root


# ----------------------------------------------------------------------------- resolve_format
def test_the_sample_header_decides_and_no_sample_means_rle(tmp_path):
    assert resolve_format("auto", tmp_path) == ("rle", f"no {tmp_path / SAMPLE_SUBMISSION}, so the Kaggle convention")
    sample = write_sample(tmp_path, DENSE_HEADER)
    assert resolve_format("auto", tmp_path) == ("dense", f"header of {sample}")
    write_sample(tmp_path, RLE_HEADER)
    assert resolve_format("auto", str(tmp_path)) == ("rle", f"header of {sample}")
    write_sample(tmp_path, " image_id , PredictionString", encoding="utf-8-sig")  # a BOM, spaces
    assert resolve_format("auto", tmp_path)[0] == "dense"


def test_explicit_formats_stand_for_themselves_whatever_the_sample_says(tmp_path):
    write_sample(tmp_path, "id,mask")
    assert resolve_format("rle", tmp_path) == ("rle", "given")
    assert resolve_format("dense", tmp_path) == ("dense", "given")
    with pytest.raises(ConfigError, match="unknown 'png'; known: auto, rle, dense"):
        resolve_format("png", tmp_path)


@pytest.mark.parametrize("header", ["id,mask", "image_id,class_id", "", "image_id,PredictionString,extra"])
def test_an_unknown_sample_header_is_an_error_naming_the_file_the_header_and_the_known_ones(tmp_path, header):
    sample = write_sample(tmp_path, header)
    with pytest.raises(PipelineError) as err:
        resolve_format("auto", tmp_path)
    text = str(err.value)
    assert str(sample) in text and f"header {header!r}" in text
    assert f"{RLE_HEADER} (rle)" in text and f"{DENSE_HEADER} (dense)" in text


# ----------------------------------------------------------------------------- submit
def submit_cfg(data: Path, run_dir: Path, out: Path, **kw) -> SubmitConfig:
    return SubmitConfig(name="sub", runs=[str(run_dir)], data_dir=str(data), out_dir=str(out), progress=False, **kw)


def test_submit_defaults_to_auto_and_writes_dense_when_the_sample_says_so(data, run_dir, tmp_path, caplog):
    assert SubmitConfig().format == "auto"
    sample = write_sample(data, DENSE_HEADER)
    with caplog.at_level("INFO", logger="pipeline.submit"):
        out = submit(submit_cfg(data, run_dir, tmp_path / "subs"))
    assert f"format auto -> dense (header of {sample})" in caplog.text
    csv_path = tmp_path / "subs" / "sub.csv"
    csv.field_size_limit(2**31 - 1)
    with open(csv_path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    test = load_coco(data, "test.json", require_annotations=False)
    assert rows[0] == DENSE_HEADER.split(",") and [r[0] for r in rows[1:]] == [im["file_name"] for im in test.images]
    assert {len(r[1].split()) for r in rows[1:]} == {256 * 256}
    assert validate(ValidateConfig(sub=str(csv_path), data_dir=str(data))) == []  # validate's auto: the CSV's header
    manifest = json.loads((tmp_path / "subs" / "sub.json").read_text())
    assert manifest["format"] == "dense" and manifest["format_reason"] == f"header of {sample}"
    assert manifest["dense_size"] == [256, 256] and manifest["order"] is None
    assert manifest["config"]["format"] == "auto" and out["rows"] == len(test.images)


def test_submit_auto_without_a_sample_writes_rle_and_explicit_formats_ignore_the_sample(data, run_dir, tmp_path):
    submit(submit_cfg(data, run_dir, tmp_path / "a"))
    manifest = json.loads((tmp_path / "a" / "sub.json").read_text())
    assert manifest["format"] == "rle" and manifest["order"] == "F"
    assert manifest["format_reason"] == f"no {data / SAMPLE_SUBMISSION}, so the Kaggle convention"
    assert (tmp_path / "a" / "sub.csv").read_text().splitlines()[0] == RLE_HEADER
    write_sample(data, DENSE_HEADER)
    submit(submit_cfg(data, run_dir, tmp_path / "b", format="rle"))
    manifest = json.loads((tmp_path / "b" / "sub.json").read_text())
    assert manifest["format"] == "rle" and manifest["format_reason"] == "given"
    assert (tmp_path / "b" / "sub.csv").read_bytes() == (tmp_path / "a" / "sub.csv").read_bytes()


def test_submit_auto_beside_a_bad_sample_fails_before_writing(data, run_dir, tmp_path):
    sample = write_sample(data, "id,mask")
    with pytest.raises(PipelineError, match="sample_submission.csv: header 'id,mask'") as err:
        submit(submit_cfg(data, run_dir, tmp_path / "subs"))
    assert str(sample) in str(err.value)
    assert not (tmp_path / "subs" / "sub.csv").exists()


# ----------------------------------------------------------------------------- auto-pilot
def test_the_autopilot_config_accepts_format_auto_by_default():
    assert AutopilotConfig().format == "auto"
    for fmt in ("auto", "rle", "dense"):
        AutopilotConfig(format=fmt).validate()
    with pytest.raises(ConfigError, match="format: unknown 'png'; known: auto, rle, dense"):
        AutopilotConfig(format="png").validate()


def test_the_autopilot_stamps_the_resolved_format_and_passes_auto_on(data, tmp_path, monkeypatch):
    commands: list[list[str]] = []

    def fake_run_stage(command):  # the submit stage's process: writes its two outputs
        commands.append(command)
        out = Path(next(a for a in command if a.startswith("out_dir=")).split("=", 1)[1])
        out.mkdir(parents=True, exist_ok=True)
        (out / "t.csv").write_text("csv\n")
        (out / "t.json").write_text("{}\n")
        return 0

    monkeypatch.setattr(autopilot_mod, "run_stage", fake_run_stage)
    weights = tmp_path / "weights.yaml"
    weights.write_text("members: []\n")

    def submit_step(fmt: str = "auto") -> Autopilot:
        cfg = AutopilotConfig(
            data_dir=str(data), name="t", format=fmt, work_dir=str(tmp_path / "work"), submissions_dir=str(tmp_path)
        )
        pilot = Autopilot(cfg)
        try:
            assert executor.submit(pilot, weights) == tmp_path / "t.csv"
        finally:
            pilot.clock.close()
        return pilot

    assert submit_step().format == "rle"  # no sample file
    assert len(commands) == 1 and "format=auto" in commands[0]  # passed on: the stage records why
    submit_step()
    assert len(commands) == 1  # same resolved format: skipped
    write_sample(data, RLE_HEADER)
    pilot = submit_step()
    assert len(commands) == 1 and pilot.format_reason.startswith("header of")  # still rle: skipped
    write_sample(data, DENSE_HEADER)
    assert submit_step().format == "dense"
    assert len(commands) == 2 and commands[1] == commands[0]  # the resolved format changed: run again
    submit_step()
    assert len(commands) == 2
    submit_step("dense")  # explicit: its own stamp, the one it had before format=auto existed
    assert len(commands) == 3 and "format=dense" in commands[2]
    write_sample(data, "id,mask")
    with pytest.raises(PipelineError, match="id,mask"):  # refused before any work
        Autopilot(AutopilotConfig(data_dir=str(data), name="bad", work_dir=str(tmp_path / "work")))
    assert not (tmp_path / "work" / "bad").exists()
