"""The demo dataset generator: determinism, contest layout, COCO contents, safety."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from pipeline import demo
from pipeline.core.config import ConfigError, build_config
from pipeline.core.errors import PipelineError
from pipeline.demo import CATEGORIES, DemoConfig, run

JSON_FILES = ("train_all.json", "train.json", "val.json", "test.json", "test_gt.json")
SMALL = dict(n_train=24, n_test=6, height=64, width=96, seed=0)


def make(out_dir: Path, **kwargs) -> Path:
    return run(DemoConfig(out_dir=str(out_dir), **{**SMALL, **kwargs}))


def load(root: Path, name: str) -> dict:
    return json.loads((root / name).read_text())


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return make(tmp_path_factory.mktemp("demo") / "data")


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path, small):
    again = all_files(make(tmp_path / "again"))
    first = all_files(small)
    assert sorted(first) == sorted(again)
    assert len([f for f in first if f.endswith(".jpg")]) == SMALL["n_train"] + SMALL["n_test"]
    for name, data in first.items():
        assert again[name] == data, name

    other = all_files(make(tmp_path / "other", seed=1))
    assert other["train_all.json"] != first["train_all.json"]
    jpgs = [f for f in first if f.endswith(".jpg") and f in other]
    assert sum(other[f] != first[f] for f in jpgs) == len(jpgs)


def test_layout_files_exist_decode_and_match_sizes(small):
    pattern = re.compile(r"^batch_\d{2}(_vt)?/\d{4}\.jpg$")
    for name in JSON_FILES:
        data = load(small, name)
        assert set(data) >= {"info", "licenses", "images", "categories", "annotations"}
        for im in data["images"]:
            assert set(im) == {"id", "file_name", "height", "width"}
            assert pattern.match(im["file_name"]), im["file_name"]
            assert (im["height"], im["width"]) == (64, 96)
            img = cv2.imread(str(small / im["file_name"]), cv2.IMREAD_COLOR)
            assert img is not None and img.shape == (64, 96, 3)
    train_all, test = load(small, "train_all.json"), load(small, "test.json")
    assert [im["id"] for im in train_all["images"]] == list(range(24))
    assert [im["id"] for im in test["images"]] == list(range(6))
    folders = {im["file_name"].split("/")[0] for im in train_all["images"]}
    assert folders == {"batch_01_vt", "batch_02_vt", "batch_03"}
    test_folders = {im["file_name"].split("/")[0] for im in test["images"]}
    assert test_folders <= {"batch_01_vt", "batch_02_vt"}
    names = [im["file_name"] for im in train_all["images"] + test["images"]]
    assert len(set(names)) == len(names)


def test_train_and_val_partition_train_all(small):
    train_all, train, val = (load(small, n) for n in ("train_all.json", "train.json", "val.json"))
    ids_train = {im["id"] for im in train["images"]}
    ids_val = {im["id"] for im in val["images"]}
    assert ids_train.isdisjoint(ids_val)
    assert ids_train | ids_val == {im["id"] for im in train_all["images"]}
    assert len(ids_val) == round(0.2 * 24)
    by_id = {im["id"]: im for im in train_all["images"]}
    for part, ids in ((train, ids_train), (val, ids_val)):
        assert all(im == by_id[im["id"]] for im in part["images"])
        assert part["annotations"] == [a for a in train_all["annotations"] if a["image_id"] in ids]
    assert {a["category_id"] for a in train["annotations"]} == set(range(1, 11))


def test_test_json_has_no_annotations_and_test_gt_does(small):
    test, gt = load(small, "test.json"), load(small, "test_gt.json")
    assert test["annotations"] == []
    assert gt["images"] == test["images"]
    test_ids = {im["id"] for im in test["images"]}
    assert gt["annotations"]
    assert {a["image_id"] for a in gt["annotations"]} <= test_ids
    assert [a["id"] for a in gt["annotations"]] == list(range(len(gt["annotations"])))


def test_categories_are_the_ten_contest_classes(small):
    expected = [
        "General trash",
        "Paper",
        "Paper pack",
        "Metal",
        "Glass",
        "Plastic",
        "Styrofoam",
        "Plastic bag",
        "Battery",
        "Clothing",
    ]
    for name in JSON_FILES:
        cats = load(small, name)["categories"]
        assert [c["name"] for c in cats] == expected
        assert [c["id"] for c in cats] == list(range(1, 11))
        assert all(c["supercategory"] == c["name"] for c in cats)


def test_polygons_inside_with_pycocotools_area_and_consistent_bbox(small):
    for name in ("train_all.json", "test_gt.json"):
        data = load(small, name)
        assert [a["id"] for a in data["annotations"]] == list(range(len(data["annotations"])))
        for a in data["annotations"]:
            assert a["iscrowd"] == 0 and 1 <= a["category_id"] <= 10
            (poly,) = a["segmentation"]
            assert len(poly) >= 6 and len(poly) % 2 == 0
            assert all(round(c, 1) == c for c in poly)
            xs, ys = np.asarray(poly[0::2]), np.asarray(poly[1::2])
            assert xs.min() >= 0 and xs.max() <= 96 - 1
            assert ys.min() >= 0 and ys.max() <= 64 - 1
            rle = mask_utils.merge(mask_utils.frPyObjects([poly], 64, 96))
            assert a["area"] > 0 and a["area"] == int(mask_utils.area(rle))
            x, y, w, h = a["bbox"]
            assert x == pytest.approx(xs.min(), abs=1e-6) and y == pytest.approx(ys.min(), abs=1e-6)
            assert w == pytest.approx(xs.max() - xs.min(), abs=0.051)
            assert h == pytest.approx(ys.max() - ys.min(), abs=0.051)
            assert w > 0 and h > 0


def test_render_order_follows_the_mask_rule(monkeypatch):
    """Objects are painted largest area first (ties in annotation order), as ground truth is built."""
    painted = []
    real_paint = demo._paint

    def record(rng, img, obj):
        painted.append(obj)
        real_paint(rng, img, obj)

    monkeypatch.setattr(demo, "_paint", record)
    h, w = 80, 120
    for seed in range(5):
        painted.clear()
        rng = np.random.default_rng(seed)
        img, objects = demo._render(rng, [7, 9, 1, 0, 8, 3, 5, 2], h, w, grey=False)
        assert img.shape == (h, w, 3) and img.dtype == np.uint8
        assert [o.category for o in objects] == [7, 9, 1, 0, 8, 3, 5, 2]
        assert [id(o) for o in painted] == [id(o) for o in sorted(objects, key=lambda o: -o.area)]
        canvas = np.zeros((h, w), np.int64)
        for o in painted:
            canvas[mask_utils.decode(o.rle).astype(bool)] = o.category + 1
        rule = np.zeros((h, w), np.int64)
        order = sorted(range(len(objects)), key=lambda i: -objects[i].area)
        for i in order:
            rule[mask_utils.decode(objects[i].rle).astype(bool)] = objects[i].category + 1
        assert np.array_equal(canvas, rule)


def test_rare_classes_are_rarer_and_every_class_present(tmp_path):
    root = make(tmp_path / "big", n_train=120, n_test=4, height=64, width=64, seed=3)
    counts = Counter(a["category_id"] for a in load(root, "train_all.json")["annotations"])
    ids = {name: i + 1 for i, name in enumerate(CATEGORIES)}
    assert set(counts) == set(range(1, 11))
    for rare in ("Battery", "Clothing"):
        for common in ("Paper", "Plastic bag", "General trash"):
            assert counts[ids[rare]] < counts[ids[common]], (rare, common, counts)
    assert counts[ids["Paper"]] == max(counts.values())


def test_existing_out_dir_is_kept_without_overwrite_and_replaced_with_it(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(PipelineError, match=re.escape(str(out))):
        make(out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["data"]

    make(out, overwrite=True)
    assert not (out / "keep.txt").exists()
    assert all((out / name).is_file() for name in JSON_FILES)
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


def test_failure_midway_leaves_nothing_behind(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("render failed")

    monkeypatch.setattr(demo, "_render", boom)
    with pytest.raises(RuntimeError):
        make(tmp_path / "data")
    assert list(tmp_path.iterdir()) == []


def test_grey_fraction_one_gives_equal_channels(tmp_path, small):
    root = make(tmp_path / "grey", n_train=6, n_test=2, grey_fraction=1.0)
    for im in load(root, "train_all.json")["images"] + load(root, "test.json")["images"]:
        img = cv2.imread(str(root / im["file_name"]), cv2.IMREAD_COLOR).astype(int)
        assert np.abs(img[..., 0] - img[..., 1]).max() <= 3
        assert np.abs(img[..., 1] - img[..., 2]).max() <= 3
    colour = cv2.imread(str(small / load(small, "train_all.json")["images"][0]["file_name"])).astype(int)
    assert np.abs(colour[..., 0] - colour[..., 2]).max() > 20


def test_validate_rejects_nonsense():
    for bad in (
        {"height": 16},
        {"width": 31},
        {"n_train": 0},
        {"n_test": 0},
        {"n_batches": 0},
        {"max_objects": 0},
        {"val_fraction": 1.5},
        {"grey_fraction": -0.1},
        {"jpeg_quality": 0},
    ):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            build_config(DemoConfig, overrides={k: v for k, v in bad.items()})
    DemoConfig().validate()


def test_main_writes_dataset_and_reports_errors(tmp_path):
    out = tmp_path / "cli"
    argv = [f"out_dir={out}", "n_train=4", "n_test=2", "height=48", "width=40", "n_batches=1", "max_objects=2"]
    assert demo.main(argv) == 0
    data = load(out, "train_all.json")
    assert {im["file_name"].split("/")[0] for im in data["images"]} == {"batch_01"}
    assert all((im["height"], im["width"]) == (48, 40) for im in data["images"])
    assert demo.main(argv) == 2  # exists, no overwrite
    assert demo.main([f"out_dir={tmp_path / 'x'}", "height=8"]) == 2
    assert not (tmp_path / "x").exists()
