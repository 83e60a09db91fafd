"""Prediction stage on a tiny trained run: test and out-of-fold stores, TTA, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import folds as folds_stage
from pipeline import train as train_stage
from pipeline.core.config import build_config
from pipeline.core.errors import PipelineError
from pipeline.data import MaskCache, SegmentationDataset, ValDataset, collate, load_coco
from pipeline.data.store import ProbReader
from pipeline.engine.checkpoint import load_checkpoint_model
from pipeline.engine.loop import evaluate
from pipeline.evaluation.metrics import confusion_matrix, mean_iou
from pipeline.predict import PredictConfig, main, run


@pytest.fixture(scope="module")
def trained(demo_data_square, tmp_path_factory):
    """(data_dir, run_dir, folds_file) of a one-epoch unet-resnet18 run on fold 0."""
    tmp = tmp_path_factory.mktemp("predict_run")
    folds_stage.run(
        folds_stage.FoldsConfig(data_dir=str(demo_data_square), out_dir=str(tmp), k=3, seed=0, pixel_stats=False)
    )
    cfg = train_stage.TrainConfig(
        data_dir=str(demo_data_square),
        folds_file=str(tmp / "folds.csv"),
        runs_dir=str(tmp),
        cache_dir=str(tmp / "cache"),
        model="unet",
        encoder="resnet18",
        encoder_weights=None,
        experiment="t",
        epochs=1,
        batch_size=8,
        lr=3e-3,
        warmup_epochs=0.0,
        num_workers=0,
        threads=2,
        progress=False,
        plot=False,
        amp="off",  # full precision, as the predictions below
    )
    result = train_stage.run(cfg)
    return demo_data_square, result.run_dir, tmp / "folds.csv"


def cfg_for(trained, tmp_path: Path, **kw) -> PredictConfig:
    data, run_dir, _ = trained
    # full precision: the stored maps are compared with the model's own float32 outputs
    base = dict(run_dir=str(run_dir), data_dir=str(data), num_workers=0, progress=False, batch_size=3, amp="off")
    base.update(kw)
    if "out_dir" not in kw:
        base["out_dir"] = str(tmp_path / f"{base.get('split', 'test')}_{base.get('tta', 'flip')}")
    return build_config(PredictConfig, overrides=base)


def val_ids(folds_file: Path, fold: int = 0) -> list[int]:
    table = pd.read_csv(folds_file)
    return sorted(int(i) for i in table.loc[table.fold == fold, "image_id"])


def test_split_test_writes_every_image_at_its_own_size(trained, tmp_path):
    data, run_dir, _ = trained
    out = run(cfg_for(trained, tmp_path, tta="d4"))
    test = json.loads((data / "test.json").read_text())
    reader = ProbReader(out)
    assert sorted(reader.image_ids) == sorted(im["id"] for im in test["images"])
    index = pd.read_csv(out / "index.csv")
    assert sorted(index["file_name"]) == sorted(im["file_name"] for im in test["images"])
    for im in test["images"]:
        p = reader.load(im["id"])
        assert p.shape == (11, im["height"], im["width"])
        assert torch.allclose(p.sum(0), torch.ones(im["height"], im["width"]), atol=5e-3)
        assert (p >= 0).all()
    meta = json.loads((out / "meta.json").read_text())
    assert meta["tta"] == "d4" and len(meta["tta_views"]) == 8
    assert meta["source"] == str(run_dir / "best.pt") and meta["class_names"][0] == "Background"
    assert meta["dtype"] == "float16" and meta["train_size"] == [64, 64]


def test_default_out_dir_store_scale_and_uint8(trained, tmp_path):
    data, run_dir, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    out = run(
        cfg_for(
            trained,
            tmp_path,
            run_dir=str(copy),
            out_dir=None,
            tta="ms+hflip",
            scales=[0.5, 1.0],
            store_scale=0.5,
            dtype="uint8",
        )
    )
    assert out == copy / "test_ms+hflip"
    reader = ProbReader(out)
    assert reader.dtype == "uint8" and len(reader) == 8
    image_id = reader.image_ids[0]
    assert np.load(out / f"{image_id}.npy").dtype == np.uint8
    assert reader.load(image_id).shape == (11, 32, 32)
    assert reader.load(image_id, (64, 64)).shape == (11, 64, 64)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["scales"] == [0.5, 1.0] and len(meta["tta_views"]) == 4


def test_split_val_writes_the_fold_at_the_oof_size_and_scores_it(trained, tmp_path):
    data, run_dir, folds_file = trained
    out = run(cfg_for(trained, tmp_path, split="val", tta="flip"))
    reader = ProbReader(out)
    ids = val_ids(folds_file)
    assert sorted(reader.image_ids) == ids
    oof = ProbReader(run_dir / "oof")
    for i in ids:
        assert reader.load(i).shape == oof.load(i).shape == (11, 32, 32)
    # the recorded mIoU is that of the written maps at the image size
    coco = load_coco(data)
    cm = sum(confusion_matrix(reader.load(i, (64, 64)).argmax(0).numpy(), coco.mask(i), 11) for i in ids)
    assert reader.meta["miou"] == pytest.approx(mean_iou(cm), abs=1e-9)
    assert reader.meta["stored_size"] == [32, 32] and reader.meta["fold"] == 0 and reader.meta["split"] == "val"
    assert set(reader.meta["iou_per_class"]) == set(coco.class_names)


def test_tta_none_agrees_with_the_models_own_validation(trained, tmp_path):
    data, run_dir, folds_file = trained
    out = run(cfg_for(trained, tmp_path, split="val", tta="none"))
    reader = ProbReader(out)
    ids = val_ids(folds_file)
    model, tcfg, ckpt = load_checkpoint_model(run_dir / "best.pt")
    coco = load_coco(data)
    ds = ValDataset(SegmentationDataset(coco, ids, None, MaskCache(coco, tmp_path / "cache")), (64, 64))
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate)
    cm = evaluate(model, loader, coco.num_classes, torch.device("cpu"), None)
    assert reader.meta["miou_full_resolution"] == pytest.approx(mean_iou(cm), abs=1e-6)
    assert reader.meta["miou"] == pytest.approx(mean_iou(cm), abs=0.03)
    # per image: the stored maps are the model's own probabilities, with the same argmax
    with torch.inference_mode():
        for images, _, metas in loader:
            own = model(images).softmax(1)
            small = torch.nn.functional.interpolate(own, size=(32, 32), mode="bilinear", align_corners=False)
            for p, meta in zip(small, metas, strict=False):
                stored = reader.load(meta["image_id"])
                assert torch.allclose(stored, p, atol=2e-3)
                top2 = p.topk(2, dim=0).values
                clear = (top2[0] - top2[1]) > 4e-3  # float16 storage may only flip near-ties
                assert clear.float().mean() > 0.5
                assert torch.equal(stored.argmax(0)[clear], p.argmax(0)[clear])
    # the trained checkpoint's recorded validation score (and that of its oof/ store) is reproduced
    assert reader.meta["miou_full_resolution"] == pytest.approx(ckpt["best_metric"], abs=1e-6)
    assert reader.meta["oof_miou_without_tta"] == pytest.approx(reader.meta["miou_full_resolution"], abs=1e-6)


def test_missing_checkpoint_and_bad_inputs_name_the_file(trained, tmp_path):
    data, run_dir, _ = trained
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(PipelineError, match="best.pt: checkpoint not found"):
        run(cfg_for(trained, tmp_path, run_dir=str(empty)))
    with pytest.raises(PipelineError, match="nope.pt"):
        run(cfg_for(trained, tmp_path, checkpoint=str(tmp_path / "nope.pt")))
    with pytest.raises(PipelineError, match="run folder not found"):
        run(cfg_for(trained, tmp_path, run_dir=str(tmp_path / "absent")))
    with pytest.raises(PipelineError, match="known: none, hflip, flip, d4, ms"):
        cfg_for(trained, tmp_path, tta="d8")
    with pytest.raises(PipelineError, match="split"):
        cfg_for(trained, tmp_path, split="train")

    # a test file listing an image that is not on disk: nothing is written
    bad = tmp_path / "data"
    shutil.copytree(data, bad)
    test = json.loads((bad / "test.json").read_text())
    missing = bad / test["images"][0]["file_name"]
    missing.unlink()
    out = tmp_path / "never"
    with pytest.raises(PipelineError, match=str(missing)):
        run(cfg_for(trained, tmp_path, data_dir=str(bad), out_dir=str(out)))
    assert not (out / "index.csv").exists()
    # categories that differ from the checkpoint's
    test["categories"] = test["categories"][:3]
    (bad / "other.json").write_text(json.dumps(test))
    with pytest.raises(PipelineError, match="other.json"):
        run(cfg_for(trained, tmp_path, data_dir=str(data), test_ann=str(bad / "other.json")))


def test_main_returns_2_on_errors_and_0_on_success(trained, tmp_path, caplog):
    data, run_dir, _ = trained
    assert main([f"run_dir={tmp_path / 'absent'}", f"data_dir={data}", "progress=false"]) == 2
    assert "run folder not found" in caplog.text
    out = tmp_path / "cli"
    args = [f"run_dir={run_dir}", f"data_dir={data}", "tta=hflip", "num_workers=0", "progress=false", f"out_dir={out}"]
    assert main(args) == 0
    assert len(ProbReader(out)) == 8


def test_non_square_test_images_are_stored_at_their_own_size(trained, tmp_path):
    from conftest import make_demo

    other = make_demo(tmp_path / "ns", n_train=4, n_test=3, height=48, width=80, seed=3)
    out = run(cfg_for(trained, tmp_path, data_dir=str(other), tta="d4+ms", scales=[0.5, 1.0]))
    reader = ProbReader(out)
    assert len(reader) == 3
    for image_id in reader.image_ids:
        row = reader.row(image_id)
        assert (row.height, row.width, row.stored_height, row.stored_width) == (48, 80, 48, 80)
        p = reader.load(image_id)
        assert p.shape == (11, 48, 80)
        assert torch.allclose(p.sum(0), torch.ones(48, 80), atol=5e-3)
    assert len(reader.meta["tta_views"]) == 16
