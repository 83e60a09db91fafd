"""Error analysis: corrupted labels come out on top; the report's files are written."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

from pipeline.analyze import AnalyzeConfig
from pipeline.analyze import run as analyze
from pipeline.data import load_coco
from pipeline.data.resize import resize_nearest
from pipeline.data.store import ProbWriter


@pytest.fixture(scope="module")
def corrupted(demo_data_square, tmp_path_factory):
    """A copy of the data with 3 images relabelled, and OOF stores that predict the true labels."""
    root = tmp_path_factory.mktemp("analyze")
    data = root / "data"
    shutil.copytree(demo_data_square, data)
    coco = load_coco(demo_data_square)
    rng = np.random.default_rng(0)
    for fold in range(2):
        with ProbWriter(root / "runs" / "m" / f"fold{fold}" / "oof", coco.class_names) as w:
            for image_id in coco.image_ids[fold::2]:
                gt = resize_nearest(coco.mask(image_id), (32, 32))
                logits = rng.normal(size=(coco.num_classes, 32, 32)).astype(np.float32)
                logits += 6.0 * (np.arange(coco.num_classes)[:, None, None] == gt[None])
                p = np.exp(logits - logits.max(0, keepdims=True))
                w.write(image_id, coco.image(image_id)["file_name"], 64, 64, p / p.sum(0, keepdims=True))
    doc = json.loads((data / "train_all.json").read_text())
    k = len(doc["categories"])
    ids = [c["id"] for c in doc["categories"]]
    by_image: dict[int, int] = {}
    for a in doc["annotations"]:
        by_image[a["image_id"]] = by_image.get(a["image_id"], 0) + a["area"]
    victims = sorted(by_image, key=lambda i: -by_image[i])[:3]  # well-covered images: visible errors
    for a in doc["annotations"]:
        if a["image_id"] in victims:
            a["category_id"] = ids[(ids.index(a["category_id"]) + 1) % k]
    (data / "train_all.json").write_text(json.dumps(doc))
    return data, root / "runs" / "m", victims


def test_corrupted_labels_rank_first_and_the_report_is_written(corrupted, tmp_path):
    data, run_dir, victims = corrupted
    out = analyze(
        AnalyzeConfig(runs=[str(run_dir)], data_dir=str(data), out_dir=str(tmp_path), n_boot=200, progress=False)
    )
    folder = out["out"]
    for name in ("report.md", "confusion.png", "recall_by_size.png", "worst.png", "iou.csv", "recall_by_size.csv"):
        assert (folder / name).is_file(), name
    for png in ("confusion.png", "worst.png", "recall_by_size.png"):
        assert (folder / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(folder / "label_errors.csv") as fh:
        ranked = [int(r["image_id"]) for r in csv.DictReader(fh)]
    assert set(ranked[:3]) == set(victims)
    a = out["analysis"]
    norm = a.row_normalised()
    assert np.allclose(norm.sum(1)[a.confusion.sum(1) > 0], 1.0)
    iou = a.iou_intervals(200, 0)
    ok = ~np.isnan(iou[:, 0])
    assert (iou[ok, 1] <= iou[ok, 0] + 1e-9).all() and (iou[ok, 0] <= iou[ok, 2] + 1e-9).all()
    assert a.instances_by_size.sum() > 0 and np.nanmax(a.recall_by_size) <= 1
