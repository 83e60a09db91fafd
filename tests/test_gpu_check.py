"""benchmarks/gpu_check.py: the smoke run on a CPU writes every section with sane figures (never a GPU's)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
SECTIONS = ["environment", "train", "loader", "inference", "device_profile", "memory", "e2e"]


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_sections_are_the_issues_in_order():
    assert list(load_script().SECTIONS) == SECTIONS


def test_a_missing_package_stops_the_check_with_its_name(monkeypatch, tmp_path):
    gc = load_script()
    monkeypatch.setattr(gc, "NEEDED", {**gc.NEEDED, "no_such_module_xyz": "no-such-package"})
    monkeypatch.setattr(gc, "WHEELS", tmp_path / ".whl")  # no wheels to install
    with pytest.raises(
        SystemExit, match=r"missing Python packages: no_such_module_xyz \(pip package no-such-package\)"
    ):
        gc.ensure_packages()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_without_a_gpu_and_without_smoke_it_says_so_and_fails(tmp_path):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert "needs a CUDA GPU" in done.stderr and "--smoke" in done.stderr
    assert not (tmp_path / "gpu_check.json").exists()


def positive(value) -> bool:
    return isinstance(value, (int, float)) and value > 0


def check_inference_profile_memory(s: dict) -> None:
    """The inference, device_profile and memory sections of a smoke run."""
    inference = s["inference"]
    tta = {(i["model"], i["tta"]): i for i in inference["items"]}
    assert {t for _, t in tta} == {"none", "hflip", "d4", "ms"} and len(tta) == 12
    assert tta[("unet", "d4")]["views"] == 8 and all(positive(i["images_per_s"]) for i in tta.values())
    sliding = inference["sliding"]
    assert sliding["size"] == [128, 128] and sliding["windows_per_image"] >= 4 and positive(sliding["images_per_s"])

    profile = s["device_profile"]
    assert set(profile["recipes"]) == {
        "unet-resnet18-64x64",
        "upernet-tu-convnext_tiny-64x64",
        "segformer-mit_b2-64x64",
    }
    for entry in profile["recipes"].values():
        for key in ("step_s", "image_s", "probe_step_s", "probe_image_s", "checkpoint_mb"):
            assert positive(entry[key]), key
        assert entry["batch"] == 2 and entry["size"] == [64, 64]
    assert "step_s" in profile["format"] and "image_s" in profile["format"]
    # the device profile make plan reads: every recipe of this device's tier that builds without a hub
    from pipeline.planning.devices import read_device_profile
    from pipeline.planning.portfolio import read_portfolio

    written = read_device_profile(profile["profile"])
    assert written.kind == "cpu" and written.gpus == 1 and not written.estimated
    assert set(written.measured) == {r.name for r in read_portfolio().tier("cpu")} and not profile["skipped"]
    assert all(m[0].size == (64, 64) and m[0].step_s > 0 for m in written.measured.values())
    assert "measured by `make gpu-check` on" in Path(profile["profile"]).read_text()

    memory = s["memory"]
    assert len(memory["items"]) == 3 and all(i["largest_batch"] >= 2 for i in memory["items"])
    fallback = memory["oom_fallback"]
    assert (
        fallback["simulated"]
        and fallback["fell_back"]
        and fallback["micro_batch"] == 1
        and positive(fallback["step_s"])
    )


@pytest.mark.slow
def test_the_smoke_run_writes_every_section_with_sane_figures(tmp_path):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path), "--work", str(tmp_path / "work")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert report["smoke"] is True and report["device"] == "cpu"
    assert list(report["sections"]) == SECTIONS
    for name, rec in report["sections"].items():
        assert rec["status"] == "ok", (name, rec.get("error"))
        assert 0 <= rec["seconds"] <= 1.5 * rec["cap_s"] + 30 + (200 if name == "e2e" else 0)
    s = report["sections"]

    env = s["environment"]
    assert env["torch"] == torch.__version__ and env["gpu"] is None and env["device"] == "cpu"
    assert env["packages"]["segmentation-models-pytorch"]["version"] and env["packages"]["albumentations"]["version"]

    train = s["train"]
    labels = [i["label"] for i in train["items"]]
    assert labels[0] == "unet/resnet18 bf16 + channels_last" and not train["errors"]
    assert {(i["model"], i["encoder"]) for i in train["items"]} == {
        ("unet", "resnet18"),
        ("upernet", "tu-convnext_tiny"),
        ("segformer", "mit_b2"),
    }
    assert {(i["amp"] != "off", i["channels_last"]) for i in train["items"] if i["model"] == "unet"} >= {
        (False, True),
        (False, False),
    }
    compiled = [i for i in train["items"] if i["compile"]]
    assert len(compiled) == 1 and compiled[0]["compile_backend"] == "aot_eager"
    for item in train["items"]:
        assert positive(item["pipeline_images_per_s"]) and positive(item["bare_images_per_s"])
        assert 0 < item["ratio"] < 10 and item["peak_mb"] is None  # no GPU memory on a CPU
        assert item["ratio"] == pytest.approx(item["bare_step_s"] / item["pipeline_step_s"])

    loader = s["loader"]
    assert positive(loader["images_per_s"]) and loader["images"] > 0 and loader["workers"] >= 0
    step = next(i for i in train["items"] if i["label"] == loader["step_label"])  # the pipeline's default mode
    assert step["channels_last"] and not step["compile"] and step["model"] == "unet"
    assert loader["step_images_per_s"] == step["pipeline_images_per_s"] and positive(loader["ratio"])

    check_inference_profile_memory(s)

    e2e = s["e2e"]
    assert e2e["rc"] == 0 and 0 <= e2e["miou"] <= 1 and positive(e2e["wall_s"])
    assert "recipe" in e2e["plan"] and "test mIoU" in e2e["summary"] and "train" in e2e["stages_s"]

    goals = {g["measure"]: g for g in report["goals"]}
    assert all(g["status"] == "report" for m, g in goals.items() if g["applies_on"] == "cuda")  # never judged here
    assert goals["OOM fallback: micro-batch / batch"]["status"] == "met"
    assert "section" in done.stdout and "training step" in done.stdout and "goal" in done.stdout
