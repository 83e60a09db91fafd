"""End to end: data -> folds -> train (2 folds) -> predict (val + test, hflip) -> ensemble -> submit -> score.

Every stage is called as ``make <stage>`` calls it: ``run(build_config(Config, config_file, [key=value ...]))``
with the Makefile's arguments, from the working directory (here ``tmp_path``), so the stages hand
over through the same relative files: ``folds/folds.csv``, ``runs/<exp>/fold<k>/``,
``ensembles/<name>/weights.yaml`` and ``submissions/<name>.csv``.  The scores are then recomputed
on an independent path (RLE decoding, ground-truth rasterization, confusion matrices) from the
files alone.
"""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline import demo as demo_stage
from pipeline import ensemble as ensemble_stage
from pipeline import folds as folds_stage
from pipeline import predict as predict_stage
from pipeline import score as score_stage
from pipeline import submit as submit_stage
from pipeline import train as train_stage
from pipeline.core.config import build_config
from pipeline.data import load_coco
from pipeline.data.store import ProbReader
from pipeline.evaluation.metrics import confusion_matrix, mean_iou
from pipeline.submission.rle import decode_label_map

ROOT = Path(__file__).resolve().parents[1]
DATA = "data/demo"  # the Makefile's DATA_DIR
EXP = "e2e"
NAME = "e2e"
TTA = "hflip"
FOLDS = (0, 1)
N_TRAIN, N_TEST, HEIGHT, WIDTH = 24, 6, 64, 96
TINY_TRAIN = [
    "model=unet",
    "encoder=tu-mobilenetv3_small_050",
    "encoder_weights=null",
    "epochs=2",
    "batch_size=4",
    "lr=3e-3",
    "warmup_epochs=0",
    "augment=light",
    "num_workers=0",
    "threads=2",
    "progress=false",
    "plot=false",
]


def stage(module, cls, args: list[str], config_file: str | Path | None = None):
    """``python -m pipeline.<stage> [--config FILE] key=value ...`` without the subprocess."""
    return module.run(build_config(cls, config_file, args))


def read_submission(path: Path) -> tuple[list[str], list[list[str]]]:
    csv.field_size_limit(2**31 - 1)
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    return rows[0], rows[1:]


@pytest.mark.slow
def test_pipeline_from_data_to_score(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    # make data ARGS="n_train=24 n_test=6 height=64 width=96 seed=0"
    out = stage(
        demo_stage,
        demo_stage.DemoConfig,
        [
            f"out_dir={DATA}",
            "overwrite=true",
            f"n_train={N_TRAIN}",
            f"n_test={N_TEST}",
            f"height={HEIGHT}",
            f"width={WIDTH}",
            "seed=0",
        ],
    )
    assert Path(out) == Path(DATA)
    for name in ("train_all.json", "test.json", "test_gt.json"):
        assert (tmp_path / DATA / name).is_file(), name

    # make folds K=2 SEED=42 ARGS="pixel_stats=false"
    stage(
        folds_stage,
        folds_stage.FoldsConfig,
        [f"data_dir={DATA}", "k=2", "seed=42", "out_dir=folds/", "pixel_stats=false"],
    )
    folds = pd.read_csv(tmp_path / "folds" / "folds.csv")
    assert sorted(folds["image_id"]) == list(range(N_TRAIN)) and sorted(folds["fold"].unique()) == list(FOLDS)

    for f in FOLDS:
        # make train FOLD=f CONFIG= MODEL=unet ARGS="experiment=e2e <tiny>"
        # (MODEL=unet layers pipeline/configs/unet.yaml)
        result = stage(
            train_stage,
            train_stage.TrainConfig,
            [
                f"data_dir={DATA}",
                "folds_file=folds/folds.csv",
                f"fold={f}",
                "resume=true",
                f"experiment={EXP}",
                *TINY_TRAIN,
            ],
            config_file=ROOT / "pipeline" / "configs" / "unet.yaml",
        )
        run_dir = Path("runs") / EXP / f"fold{f}"
        assert Path(result.run_dir) == run_dir and result.epochs_done == 2
        for name in ("config.yaml", "metrics.csv", "last.pt", "best.pt", "oof/index.csv"):
            assert (tmp_path / run_dir / name).is_file(), f"fold{f}/{name}"
        assert list(pd.read_csv(run_dir / "metrics.csv")["epoch"]) == [0, 1]
        assert 0.0 <= result.best_miou <= 1.0

        # make predict RUN=runs/e2e/fold<f> SPLIT=val|test TTA=hflip ARGS="num_workers=0 progress=false"
        for split, store in (("val", f"oof_{TTA}"), ("test", f"test_{TTA}")):
            written = stage(
                predict_stage,
                predict_stage.PredictConfig,
                [
                    f"run_dir={run_dir}",
                    f"data_dir={DATA}",
                    f"tta={TTA}",
                    f"split={split}",
                    "num_workers=0",
                    "progress=false",
                ],
            )
            assert Path(written) == run_dir / store
            assert (tmp_path / run_dir / store / "index.csv").is_file() and (
                tmp_path / run_dir / store / "meta.json"
            ).is_file()
        val_ids = sorted(int(i) for i in folds.loc[folds.fold == f, "image_id"])
        assert sorted(ProbReader(run_dir / f"oof_{TTA}").image_ids) == val_ids
        assert sorted(ProbReader(run_dir / f"test_{TTA}").image_ids) == list(range(N_TEST))

    # make ensemble RUNS="runs/e2e" NAME=e2e ARGS="tta=hflip tune_bias=true n_trials=20 progress=false"
    stage(
        ensemble_stage,
        ensemble_stage.EnsembleConfig,
        [
            f"runs=runs/{EXP}",
            f"data_dir={DATA}",
            f"name={NAME}",
            f"tta={TTA}",
            "tune_bias=true",
            "n_trials=20",
            "progress=false",
        ],
    )
    weights_file = tmp_path / "ensembles" / NAME / "weights.yaml"
    assert weights_file.is_file() and (tmp_path / "ensembles" / NAME / "report.md").is_file()
    saved = yaml.safe_load(weights_file.read_text())
    (member,) = saved["members"]
    assert member["oof_stores"] == [str(Path("runs") / EXP / f"fold{f}" / f"oof_{TTA}") for f in FOLDS]
    assert member["test_stores"] == [str(Path("runs") / EXP / f"fold{f}" / f"test_{TTA}") for f in FOLDS]
    assert saved["weights"] == [1.0] and saved["oof"]["n_images"] == N_TRAIN

    # the recorded OOF mIoU, recomputed from the oof_hflip stores (quantised to 1/255 as the ensemble's cache does)
    coco = load_coco(DATA, "train_all.json")
    bias = None if saved["bias"] is None else np.asarray(saved["bias"], np.float32)[:, None, None]
    cm = np.zeros((coco.num_classes,) * 2, dtype=np.int64)
    for store in member["oof_stores"]:
        reader = ProbReader(store)
        for image_id in reader.image_ids:
            p = np.rint(reader.load(image_id).numpy() * 255) / np.float32(255)
            score = p if bias is None else np.log(np.maximum(p, 1e-6)) + bias
            h, w = p.shape[1:]
            target = cv2.resize(coco.mask(image_id), (w, h), interpolation=cv2.INTER_NEAREST)
            cm += confusion_matrix(score.argmax(0), target, coco.num_classes)
    assert 0.0 < saved["oof"]["ensemble_miou"] <= 1.0
    assert saved["oof"]["ensemble_miou"] == pytest.approx(mean_iou(cm), abs=2e-3)

    # make submit NAME=e2e FORMAT=rle ARGS="progress=false"  (reads ensembles/e2e/weights.yaml)
    manifest = stage(
        submit_stage, submit_stage.SubmitConfig, [f"name={NAME}", "format=rle", f"data_dir={DATA}", "progress=false"]
    )
    sub = Path("submissions") / f"{NAME}.csv"
    assert (tmp_path / sub).is_file() and (tmp_path / sub.with_suffix(".json")).is_file()
    assert manifest["ensemble"] == str(Path("ensembles") / NAME / "weights.yaml") and manifest["validated"]
    test = load_coco(DATA, "test_gt.json")
    category_ids = [int(c["id"]) for c in test.categories if test.cat_to_index[int(c["id"])] != 0]
    header, rows = read_submission(tmp_path / sub)
    assert header == ["image_id", "class_id", "EncodedPixels"]
    assert len(rows) == manifest["rows"] == N_TEST * len(category_ids)
    pairs = [(name, int(cid)) for name, cid, _ in rows]
    assert len(set(pairs)) == len(pairs)
    assert set(pairs) == {(im["file_name"], c) for im in test.images for c in category_ids}

    # make score SUB=submissions/e2e.csv GT=data/demo/test_gt.json
    scored = stage(score_stage, score_stage.ScoreConfig, [f"sub={sub}", f"gt={DATA}/test_gt.json", f"data_dir={DATA}"])
    assert isinstance(scored["miou"], float) and 0.0 <= scored["miou"] <= 1.0
    assert scored["n_images"] == N_TEST and scored["format"] == "rle"

    # the same mIoU from the CSV and test_gt.json alone
    by_image: dict[str, dict[int, str]] = {}
    for name, cid, rle in rows:
        by_image.setdefault(name, {})[test.cat_to_index[int(cid)]] = rle
    cm = np.zeros((test.num_classes,) * 2, dtype=np.int64)
    for im in test.images:
        h, w = int(im["height"]), int(im["width"])
        assert (h, w) == (HEIGHT, WIDTH)
        pred = decode_label_map(by_image[im["file_name"]], (h, w))
        cm += confusion_matrix(pred, test.mask(int(im["id"])), test.num_classes)
    assert scored["miou"] == pytest.approx(mean_iou(cm), abs=1e-9)
