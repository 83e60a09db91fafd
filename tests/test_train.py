"""Training stage: files, learning, exact resume after SIGKILL, non-finite loss, DDP (gloo)."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import small_train_config

from pipeline.core.config import build_config
from pipeline.core.errors import PipelineError
from pipeline.data import MaskCache, SegmentationDataset, ValDataset, collate, load_coco
from pipeline.data.store import ProbReader
from pipeline.engine.checkpoint import load_checkpoint_model
from pipeline.engine.loop import evaluate
from pipeline.evaluation.metrics import confusion_matrix, mean_iou
from pipeline.train import TrainConfig, run

ROOT = Path(__file__).resolve().parents[1]


def small_cfg(data: Path, folds: Path, runs: Path, **kw) -> TrainConfig:
    return small_train_config(data, folds, runs, **kw)


def cli_args(cfg: TrainConfig) -> list[str]:
    from pipeline.core.config import to_dict

    out = []
    for k, v in to_dict(cfg).items():
        if v is None:
            out.append(f"{k}=null")
        elif isinstance(v, list):
            out.append(f"{k}=[{','.join(map(str, v))}]")
        else:
            out.append(f"{k}={v}")
    return out


def trivial_miou(data: Path, folds: Path, fold: int) -> float:
    coco = load_coco(data, "train_all.json")
    table = pd.read_csv(folds)
    ids = table.loc[table.fold == fold, "image_id"].tolist()
    cm = sum(confusion_matrix(np.zeros_like(m), m, coco.num_classes) for m in (coco.mask(i) for i in ids))
    return mean_iou(cm)


@pytest.mark.slow
def test_training_writes_every_file_and_learns(demo_data_square, folds_file, tmp_path):
    cfg = small_cfg(demo_data_square, folds_file, tmp_path, epochs=8)
    result = run(cfg)
    d = result.run_dir
    assert d == tmp_path / "t" / "fold0"
    for name in ("config.yaml", "metrics.csv", "last.pt", "best.pt", "curves.png", "oof/index.csv", "oof/meta.json"):
        assert (d / name).is_file(), name
    metrics = pd.read_csv(d / "metrics.csv")
    assert list(metrics["epoch"]) == list(range(8))
    assert {"train_loss", "lr", "val_miou", "iou_Background", "iou_Battery"} <= set(metrics.columns)
    assert metrics["train_loss"].iloc[-1] < metrics["train_loss"].iloc[0]
    assert result.best_miou == pytest.approx(metrics["val_miou"].max(), abs=1e-9)
    assert result.best_miou > trivial_miou(demo_data_square, folds_file, 0) + 0.02

    # the resolved config is stored in the run folder and in the checkpoint
    reloaded = build_config(TrainConfig, d / "config.yaml")
    assert reloaded == cfg
    model, ckpt_cfg, ckpt = load_checkpoint_model(d / "best.pt")
    assert ckpt_cfg == cfg and ckpt["epoch"] == result.best_epoch
    assert ckpt["class_names"][0] == "Background" and ckpt["num_classes"] == 11
    # on a CPU too the model comes back in channels_last memory (faster convolutions), computing the same
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    plain = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), plain(x), atol=1e-4)

    # out-of-fold probabilities: every validation image, half the training size, rows sum to 1
    table = pd.read_csv(folds_file)
    val_ids = sorted(table.loc[table.fold == 0, "image_id"])
    oof = ProbReader(d / "oof")
    assert sorted(oof.image_ids) == val_ids
    p = oof.load(val_ids[0])
    assert p.shape == (11, 32, 32)
    assert torch.allclose(p.sum(0), torch.ones(32, 32), atol=5e-3)
    # the stored OOF maps reproduce the checkpoint's validation score at the image size
    coco = load_coco(demo_data_square)
    cm = sum(confusion_matrix(oof.load(i, (64, 64)).argmax(0).numpy(), coco.mask(i), 11) for i in val_ids)
    assert abs(mean_iou(cm) - result.best_miou) < 0.03


def test_resume_never_mixes_configs(demo_data_square, folds_file, tmp_path):
    """A run folder with last.pt resumes only with the same config (but for the resumable keys); a
    changed encoder or lr is refused naming the keys and leaves last.pt and config.yaml untouched;
    resume=false moves the old folder aside (never deleting it) and trains afresh."""
    cfg = small_cfg(demo_data_square, folds_file, tmp_path, epochs=1, save_oof=False, plot=False, img_size=[32])
    run(cfg)
    folder = cfg.run_dir()
    last, config = (folder / "last.pt").read_bytes(), (folder / "config.yaml").read_bytes()
    changed = dict(epochs=1, save_oof=False, plot=False, img_size=[32], encoder="mobilenet_v2", lr=1e-4)
    with pytest.raises(PipelineError, match="another config") as err:
        run(small_cfg(demo_data_square, folds_file, tmp_path, **changed))
    message = str(err.value)
    assert "encoder: 'resnet18' -> 'mobilenet_v2'" in message and "lr: 0.003 -> 0.0001" in message
    assert "EXP=" in message and "RESUME=0" in message
    assert (folder / "last.pt").read_bytes() == last and (folder / "config.yaml").read_bytes() == config

    # a longer schedule (epochs is resumable) continues the same run
    more = run(small_cfg(demo_data_square, folds_file, tmp_path, epochs=2, save_oof=False, plot=False, img_size=[32]))
    assert [row["epoch"] for row in more.history] == [0, 1]

    fresh = run(small_cfg(demo_data_square, folds_file, tmp_path, **changed, resume=False))
    assert [row["epoch"] for row in fresh.history] == [0]
    aside = [d for d in folder.parent.iterdir() if d.name.startswith("old-fold0-")]
    assert len(aside) == 1 and (aside[0] / "last.pt").is_file()
    assert build_config(TrainConfig, aside[0] / "config.yaml").encoder == "resnet18"
    assert build_config(TrainConfig, folder / "config.yaml").encoder == "mobilenet_v2"


@pytest.mark.slow
def test_resume_after_sigkill_reproduces_uninterrupted_run(demo_data_square, folds_file, tmp_path):
    kw = dict(
        epochs=4,
        save_oof=False,
        plot=False,
        ema=True,
        ema_decay=0.9,
        accum_steps=2,
        batch_size=4,
        encoder="tu-mobilenetv3_small_050",
    )
    full = small_cfg(demo_data_square, folds_file, tmp_path / "a", **kw)
    run(full)
    expected = (full.run_dir() / "metrics.csv").read_text()

    cfg = small_cfg(demo_data_square, folds_file, tmp_path / "b", **kw)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.train", *cli_args(cfg)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    metrics = cfg.run_dir() / "metrics.csv"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().strip().splitlines()) >= 3:  # header + epochs 0, 1
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpt = torch.load(cfg.run_dir() / "last.pt", map_location="cpu", weights_only=False)
    assert 1 <= ckpt["epoch"] < 3, "killed too late to test resuming"

    run(cfg)  # resumes automatically from last.pt
    assert (cfg.run_dir() / "metrics.csv").read_text() == expected


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(demo_data_square, folds_file, tmp_path, monkeypatch):
    cfg = small_cfg(demo_data_square, folds_file, tmp_path, epochs=1, save_oof=False, plot=False)
    run(cfg)
    last = cfg.run_dir() / "last.pt"
    before = last.read_bytes()

    import pipeline.engine.trainer as train_mod

    class NanLoss(torch.nn.Module):
        def forward(self, logits, target):
            return logits.mean() * float("nan")

    monkeypatch.setattr(train_mod, "build_loss", lambda *a, **k: NanLoss())
    with pytest.raises(PipelineError, match="non-finite loss"):
        run(small_cfg(demo_data_square, folds_file, tmp_path, epochs=2, save_oof=False, plot=False))
    assert last.read_bytes() == before
    assert len(pd.read_csv(cfg.run_dir() / "metrics.csv")) == 1


def test_unknown_names_are_listed(demo_data_square, folds_file, tmp_path):
    with pytest.raises(PipelineError, match="unet"):
        run(small_cfg(demo_data_square, folds_file, tmp_path, model="no_such_net"))
    with pytest.raises(PipelineError, match="known"):
        small_cfg(demo_data_square, folds_file, tmp_path, augment="wild")
    with pytest.raises(PipelineError, match="fold 7"):
        run(small_cfg(demo_data_square, folds_file, tmp_path, fold=7))


def test_crop_trains_on_windows_and_validates_the_whole_image(demo_data_square, folds_file, tmp_path):
    """``crop_size`` trains on random windows of the ``img_size`` image; validation, the OOF maps
    and the checkpoint's size are the whole image's.  A window larger than the image is refused."""
    cfg = small_cfg(
        demo_data_square,
        folds_file,
        tmp_path,
        img_size=[64, 64],
        crop_size=[32, 32],
        epochs=1,
        plot=False,
        oof_scale=1.0,
    )
    result = run(cfg)
    assert np.isfinite(result.history[-1]["val_miou"])
    ckpt = torch.load(cfg.run_dir() / "best.pt", map_location="cpu", weights_only=False)
    assert ckpt["img_size"] == [64, 64]
    oof = ProbReader(cfg.run_dir() / "oof")
    assert {oof.stored_size(i) for i in oof.image_ids} == {(64, 64)}
    with pytest.raises(PipelineError, match="crop_size 96x32 is larger than the training size 64x64"):
        run(small_cfg(demo_data_square, folds_file, tmp_path / "bad", img_size=[64, 64], crop_size=[96, 32]))
    with pytest.raises(PipelineError, match="crop_size must be"):
        small_cfg(demo_data_square, folds_file, tmp_path / "bad", crop_size=[0, 32])


@pytest.mark.slow
def test_ddp_two_process_gloo_matches_single_process_metric(demo_data_square, folds_file, tmp_path):
    cfg = small_cfg(demo_data_square, folds_file, tmp_path, epochs=1, batch_size=4, save_oof=False, plot=False)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=29517",
        "-m",
        "pipeline.train",
        *cli_args(cfg),
        "threads=1",
    ]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = pd.read_csv(cfg.run_dir() / "metrics.csv")
    assert len(metrics) == 1

    model, _, _ = load_checkpoint_model(cfg.run_dir() / "best.pt")
    coco = load_coco(demo_data_square)
    table = pd.read_csv(folds_file)
    val_ids = table.loc[table.fold == 0, "image_id"].tolist()
    ds = ValDataset(SegmentationDataset(coco, val_ids, None, MaskCache(coco, tmp_path / "cache")), (64, 64))
    loader = torch.utils.data.DataLoader(ds, batch_size=5, collate_fn=collate)
    cm = evaluate(model, loader, coco.num_classes, torch.device("cpu"), None)
    assert mean_iou(cm) == pytest.approx(metrics["val_miou"].iloc[0], abs=1e-6)


@pytest.mark.slow
def test_a_run_paused_at_stop_epoch_and_continued_equals_an_uninterrupted_one(demo_data_square, folds_file, tmp_path):
    """Successive-halving rungs: the schedule is the one of ``epochs`` from the start, so a run paused
    after 2 epochs (validated there, OOF written) and continued to 4 repeats the 4-epoch run exactly;
    its learning rate never steps back up."""
    kw = dict(epochs=4, plot=False, batch_size=4, encoder="tu-mobilenetv3_small_050")
    full = small_cfg(demo_data_square, folds_file, tmp_path / "a", **kw)
    run(full)
    expected = pd.read_csv(full.run_dir() / "metrics.csv")

    paused = small_cfg(demo_data_square, folds_file, tmp_path / "b", stop_epoch=2, **kw)
    run(paused)
    first = pd.read_csv(paused.run_dir() / "metrics.csv")
    assert list(first.epoch) == [0, 1] and not np.isnan(first.val_miou.iloc[-1])  # validated at the pause
    assert (paused.run_dir() / "oof" / "meta.json").is_file()
    run(small_cfg(demo_data_square, folds_file, tmp_path / "b", **kw))  # stop_epoch=None: to the end
    got = pd.read_csv(paused.run_dir() / "metrics.csv")
    pd.testing.assert_frame_equal(got, expected)
    assert got.lr.iloc[1:].is_monotonic_decreasing  # after the warm-up epoch the rate only falls


def test_stop_epoch_and_time_budget_are_refused_together(demo_data_square, folds_file, tmp_path):
    from pipeline.core.errors import ConfigError

    with pytest.raises(ConfigError, match="stop_epoch"):
        small_cfg(demo_data_square, folds_file, tmp_path, stop_epoch=2, time_budget=60.0).validate()


def test_the_epoch_log_says_when_an_epoch_is_not_validated(demo_data_square, folds_file, tmp_path, caplog):
    """An epoch between validations reads "not validated (best none yet)", not NaN and -1."""
    cfg = small_cfg(demo_data_square, folds_file, tmp_path, epochs=2, val_every=2, plot=False)
    with caplog.at_level("INFO", logger="pipeline.engine.trainer"):
        run(cfg)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert len(lines) == 2
    assert "not validated (best none yet)" in lines[0] and "nan" not in lines[0]
    assert "val mIoU" in lines[1] and "@ 1)" in lines[1]
