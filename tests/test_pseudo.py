"""Pseudo-labels: thresholds, the manifest and its round, and training that never validates on them."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

from pipeline.core.config import build_config
from pipeline.data import load_coco
from pipeline.data.store import ProbWriter
from pipeline.engine.trainer import Trainer
from pipeline.inference.pseudo_labels import pseudo_map
from pipeline.pseudo import PseudoConfig
from pipeline.pseudo import run as make_pseudo
from pipeline.train import TrainConfig


def test_pseudo_map_keeps_confident_pixels_only():
    probs = np.zeros((3, 2, 2), np.float32)
    probs[:, 0, 0] = [0.95, 0.05, 0.0]  # confident background
    probs[:, 0, 1] = [0.2, 0.8, 0.0]  # class 1 at 0.8: below 0.9, above its own 0.7
    probs[:, 1, 0] = [0.1, 0.1, 0.8]  # class 2 at 0.8: below 0.9
    probs[:, 1, 1] = [0.0, 0.0, 1.0]
    out = pseudo_map(probs, 0.9, {1: 0.7})
    np.testing.assert_array_equal(out, [[0, 1], [255, 2]])


@pytest.fixture(scope="module")
def pseudo_dir(demo_data_square, tmp_path_factory):
    """Pseudo-labels from a fake run whose test store holds random probabilities."""
    root = tmp_path_factory.mktemp("pseudo")
    test = load_coco(demo_data_square, "test.json", require_annotations=False)
    rng = np.random.default_rng(0)
    with ProbWriter(root / "runs" / "x" / "fold0" / "test_none", test.class_names, "float16", {}) as w:
        for im in test.images:
            logits = rng.normal(size=(test.num_classes, int(im["height"]), int(im["width"]))).astype(np.float32) * 4
            p = np.exp(logits) / np.exp(logits).sum(0, keepdims=True)
            w.write(int(im["id"]), im["file_name"], int(im["height"]), int(im["width"]), p)
    manifest = make_pseudo(
        PseudoConfig(
            name="p",
            runs=[str(root / "runs" / "x")],
            tta="none",
            data_dir=str(demo_data_square),
            threshold=0.6,
            out_dir=str(root / "out"),
            progress=False,
        )
    )
    return root / "out" / "p", manifest, test


def test_pseudo_labels_respect_the_threshold_and_record_the_round(pseudo_dir):
    folder, manifest, test = pseudo_dir
    assert manifest["round"] == 1 and manifest["threshold"] == 0.6
    assert len(manifest["images"]) == len(test.images) and 0 < manifest["confident_share"] < 1
    saved = json.loads((folder / "manifest.json").read_text())
    assert saved["images"] == manifest["images"]
    for entry in manifest["images"]:
        m = cv2.imread(str(folder / entry["file"]), cv2.IMREAD_UNCHANGED)
        assert set(np.unique(m)) <= set(range(test.num_classes)) | {255}
        assert (m != 255).mean() == pytest.approx(entry["confident_share"])


@pytest.mark.parametrize("image_cache", [False, True])
def test_training_adds_pseudo_images_to_training_only(pseudo_dir, demo_data_square, folds_file, tmp_path, image_cache):
    folder, manifest, test = pseudo_dir
    cfg = build_config(
        TrainConfig,
        overrides=dict(
            data_dir=str(demo_data_square),
            folds_file=str(folds_file),
            runs_dir=str(tmp_path / "runs"),
            cache_dir=str(tmp_path / "cache"),
            model="unet",
            encoder="tu-mobilenetv3_small_050",
            encoder_weights=None,
            img_size=[64],
            epochs=1,
            batch_size=4,
            num_workers=0,
            progress=False,
            pseudo_dir=str(folder),
            image_cache=image_cache,
        ),
    )
    trainer = Trainer(cfg)
    n_train = len(trainer.train_ids)
    assert len(trainer.train_loader.dataset) == n_train + len(test.images)
    # validation serves the fold's labelled images only (file names of the labelled file)
    val_set = trainer.val_loader.dataset
    assert [getattr(val_set, "base", val_set).image_ids[i] for i in range(len(val_set))] == trainer.val_ids
    # a pseudo item is a test image with its pseudo map (255 = ignored); with the image cache, uint8 as the
    # cached labelled items (normalised on the device)
    image, mask, meta = trainer.train_loader.dataset[(0, n_train)]
    labelled_image, labelled_mask, _ = trainer.train_loader.dataset[(0, 0)]
    assert image.dtype == labelled_image.dtype == (torch.uint8 if image_cache else torch.float32)
    assert mask.dtype == labelled_mask.dtype == (torch.uint8 if image_cache else torch.int64)
    assert meta["file_name"] == test.image(manifest["images"][0]["image_id"])["file_name"]
    assert (image.shape[:2] if image_cache else image.shape[-2:]) == (64, 64) and ((mask == 255) | (mask < 11)).all()
    assert trainer.checkpoint_state(0)["pseudo"] == {"dir": str(folder), "round": 1}
