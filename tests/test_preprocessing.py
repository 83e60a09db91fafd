"""Preprocessing belongs to the encoder: statistics from its pretrained config, stored in the
checkpoint, applied by prediction; old checkpoints read as ImageNet's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import folds as folds_stage
from pipeline.core.config import build_config
from pipeline.data import IMAGENET, Preprocessing, normalize
from pipeline.data.store import ProbReader
from pipeline.inference.predictor import PredictConfig, predict
from pipeline.models.preprocessing import encoder_preprocessing
from pipeline.train import TrainConfig, run


@pytest.mark.parametrize(
    "model, encoder, mean",
    [
        ("unet", "resnet18", IMAGENET.mean),
        ("unet", "tu-test_resnet", (0.5, 0.5, 0.5)),
        ("upernet", "tu-test_convnext", (0.5, 0.5, 0.5)),
        ("dpt", None, (0.5, 0.5, 0.5)),  # default tu-vit_base_patch16_224.augreg_in21k
        ("unet", "tu-mobilenetv3_small_050", IMAGENET.mean),
        ("unet", "inceptionv4", (0.5, 0.5, 0.5)),
        ("tv_fcn_resnet50", None, IMAGENET.mean),
    ],
)
def test_statistics_come_from_the_encoders_pretrained_config(model, encoder, mean):
    prep = encoder_preprocessing(model, encoder)
    assert prep.mean == pytest.approx(mean) and len(prep.std) == 3


def test_smp_encoders_read_the_cached_smp_hub_config_before_the_offline_statistics(tmp_path, monkeypatch):
    import segmentation_models_pytorch as smp

    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    offline = encoder_preprocessing("unet", "dpn68")
    assert offline.mean == pytest.approx((124 / 255, 117 / 255, 104 / 255)) and offline.input_range == (0.0, 1.0)
    setting = smp.encoders.encoders["dpn68"]["pretrained_settings"]["imagenet"]
    repo = tmp_path / "hf" / "hub" / ("models--" + setting["repo_id"].replace("/", "--"))
    config = repo / "snapshots" / setting["revision"] / "config.json"
    config.parent.mkdir(parents=True)
    config.write_text(json.dumps({"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6], "input_range": [0, 1]}))
    cached = encoder_preprocessing("unet", "dpn68")
    assert (cached.mean, cached.std) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    assert setting["repo_id"] in cached.source


def test_normalize_applies_mean_std_and_input_range():
    img = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10
    prep = Preprocessing((0.1, 0.2, 0.3), (0.5, 0.25, 2.0), (0.0, 255.0), "test")
    expected = (
        torch.from_numpy(img).permute(2, 0, 1).float() - torch.tensor([0.1, 0.2, 0.3]).view(3, 1, 1)
    ) / torch.tensor([0.5, 0.25, 2.0]).view(3, 1, 1)
    assert torch.allclose(normalize(img, prep), expected, atol=1e-4)
    assert Preprocessing.from_dict(None) == IMAGENET and Preprocessing.from_dict(prep.as_dict()) == prep


@pytest.mark.slow
def test_checkpoint_records_the_statistics_and_prediction_uses_them(demo_data_square, tmp_path):
    folds_stage.run(
        folds_stage.FoldsConfig(data_dir=str(demo_data_square), out_dir=str(tmp_path), k=3, seed=0, pixel_stats=False)
    )
    cfg = build_config(
        TrainConfig,
        overrides=dict(
            data_dir=str(demo_data_square),
            folds_file=str(tmp_path / "folds.csv"),
            runs_dir=str(tmp_path / "runs"),
            cache_dir=str(tmp_path / "cache"),
            model="unet",
            encoder="tu-test_resnet",
            encoder_weights=None,
            experiment="p",
            epochs=1,
            batch_size=8,
            num_workers=0,
            progress=False,
            plot=False,
            save_oof=False,
            img_size=[64],
        ),
    )
    result = run(cfg)
    best = result.run_dir / "best.pt"
    ckpt = torch.load(best, map_location="cpu", weights_only=False)
    assert ckpt["preprocessing"]["mean"] == [0.5, 0.5, 0.5] and "timm" in ckpt["preprocessing"]["source"]

    def predicted(checkpoint: Path, out: str) -> ProbReader:
        return ProbReader(
            predict(
                PredictConfig(
                    run_dir=str(result.run_dir),
                    data_dir=str(demo_data_square),
                    split="val",
                    tta="none",
                    checkpoint=str(checkpoint),
                    out_dir=str(tmp_path / out),
                    progress=False,
                    num_workers=0,
                )
            )
        )

    own = predicted(best, "own")
    assert own.meta["preprocessing"]["mean"] == [0.5, 0.5, 0.5]
    # prediction normalizes as training did: the validation score of the checkpoint is reproduced
    assert own.meta["miou_full_resolution"] == pytest.approx(ckpt["best_metric"], abs=1e-6)
    # a checkpoint written before statistics were stored is read as ImageNet's
    del ckpt["preprocessing"]
    old = tmp_path / "old.pt"
    torch.save(ckpt, old)
    legacy = predicted(old, "legacy")
    assert legacy.meta["preprocessing"]["mean"] == pytest.approx(list(IMAGENET.mean))
    i = own.image_ids[0]
    assert not torch.allclose(own.load(i), legacy.load(i), atol=1e-3)
    assert json.loads((tmp_path / "own" / "meta.json").read_text())["preprocessing"]["source"].startswith("timm")
