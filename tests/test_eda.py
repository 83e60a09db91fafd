"""EDA stage: files written, numbers equal counts taken straight from the annotation file."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
from test_similarity import make_sequences

from pipeline import eda
from pipeline.data import CocoData, DataError, load_coco
from pipeline.evaluation import visual

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ALWAYS = [
    "annotations_per_image.png",
    "class_instances.png",
    "class_pixel_share.png",
    "object_area.png",
    "cooccurrence.png",
]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def assert_png(path: Path, min_side: int = 150) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert img is not None, path
    assert min(img.shape[:2]) >= min_side, (path, img.shape)
    assert img.std() > 5, f"{path} looks blank"


@pytest.fixture(scope="module")
def demo_eda(demo_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("eda")
    cfg = eda.EDAConfig(
        data_dir=str(demo_data), out_dir=str(out / "report"), cache_dir=str(out / "cache"), n_samples=6, seed=3
    )
    return cfg, eda.run(cfg)


def test_eda_writes_every_file(demo_eda):
    cfg, summary = demo_eda
    out = Path(cfg.out_dir)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        ["report.md", "classes.csv", "summary.csv", "samples.png", *ALWAYS]
    )  # one image size: no scatter
    for name in names:
        if name.endswith(".png"):
            assert_png(out / name)
    assert set(summary["files"]) == {
        "report",
        "classes_csv",
        "summary_csv",
        "annotations_per_image",
        "class_instances",
        "class_pixel_share",
        "object_area",
        "cooccurrence",
        "samples",
    }
    assert all(Path(p).is_file() and Path(p).parent == out for p in summary["files"].values())


def test_report_mentions_every_class_and_plot(demo_eda, demo_data):
    cfg, summary = demo_eda
    raw = json.loads((demo_data / "train_all.json").read_text())
    report = (Path(cfg.out_dir) / "report.md").read_text()
    for cat in raw["categories"]:
        assert f"| {cat['name']} |" in report
    assert "| Background |" in report
    for png in [*ALWAYS, "samples.png"]:
        assert f"]({png})" in report
    assert f"Images: {len(raw['images'])}" in report
    assert f"Annotations: {len(raw['annotations'])}" in report
    assert "| 64 | 96 | 24 |" in report  # the image-size table
    assert "32^2 = 1024" in report and "96^2 = 9216" in report and "not scaled" in report
    assert "## Near-duplicates and sequences" in report
    assert "Groups with more than one image: 0 (0 of 24 images)" in report  # demo images are all unrelated
    assert summary["similarity"]["multi_image_groups"] == 0 and summary["similar_largest_group"] == 1


def test_classes_csv_equals_counts_from_the_file(demo_eda, demo_data):
    cfg, summary = demo_eda
    raw = json.loads((demo_data / "train_all.json").read_text())
    rows = read_csv(Path(cfg.out_dir) / "classes.csv")
    assert [r["class_name"] for r in rows] == ["Background"] + [c["name"] for c in raw["categories"]]
    assert [r["category_id"] for r in rows] == [""] + [str(c["id"]) for c in raw["categories"]]

    instances = Counter(a["category_id"] for a in raw["annotations"])
    images = {
        c["id"]: len({a["image_id"] for a in raw["annotations"] if a["category_id"] == c["id"]})
        for c in raw["categories"]
    }
    bins = {c["id"]: [0, 0, 0] for c in raw["categories"]}
    for a in raw["annotations"]:
        bins[a["category_id"]][0 if a["area"] < 32**2 else 1 if a["area"] < 96**2 else 2] += 1
    for row, cat in zip(rows[1:], raw["categories"], strict=False):
        assert int(row["instances"]) == instances[cat["id"]] > 0
        assert int(row["images"]) == images[cat["id"]]
        assert [int(row["small"]), int(row["medium"]), int(row["large"])] == bins[cat["id"]]
    assert int(rows[0]["instances"]) == 0
    assert sum(int(r["instances"]) for r in rows) == len(raw["annotations"])

    shares = np.array([float(r["pixel_share"]) for r in rows])
    assert shares.sum() == pytest.approx(1.0, abs=1e-9)
    assert (shares >= 0).all() and shares[0] > 0.5

    # Pixels equal the rasterized ground truth, computed here without the cache.
    coco = load_coco(demo_data)
    direct = sum(np.bincount(coco.mask(i).ravel(), minlength=coco.num_classes) for i in coco.image_ids)
    assert [int(r["pixels"]) for r in rows] == direct.tolist()
    assert sum(int(r["pixels"]) for r in rows) == len(raw["images"]) * 64 * 96
    assert [c["instances"] for c in summary["classes"]] == [int(r["instances"]) for r in rows]
    assert [c["pixel_share"] for c in summary["classes"]] == [float(r["pixel_share"]) for r in rows]


def test_summary_csv_and_return_value(demo_eda, demo_data):
    cfg, summary = demo_eda
    raw = json.loads((demo_data / "train_all.json").read_text())
    kv = {r["key"]: r["value"] for r in read_csv(Path(cfg.out_dir) / "summary.csv")}
    assert int(kv["images"]) == summary["images"] == len(raw["images"])
    assert int(kv["annotations"]) == summary["annotations"] == len(raw["annotations"])
    assert int(kv["classes"]) == len(raw["categories"]) + 1
    assert int(kv["images_checked"]) == len(raw["images"])
    per_image = Counter(a["image_id"] for a in raw["annotations"])
    assert int(kv["annotations_per_image_max"]) == max(per_image.values())
    assert kv["most_common_size_hxw"] == "64x96"
    assert summary["class_names"] == ["Background"] + [c["name"] for c in raw["categories"]]
    assert len(summary["samples"]) == 6 == len(set(summary["samples"]))


def test_second_run_reads_the_mask_cache_and_gives_the_same_numbers(demo_eda, tmp_path, monkeypatch):
    cfg, _ = demo_eda

    def fail(self, image_id):
        raise AssertionError("rasterized again instead of reading the cache")

    monkeypatch.setattr(CocoData, "mask", fail)
    again = eda.EDAConfig(**{**cfg.__dict__, "out_dir": str(tmp_path / "again"), "check_images": False})
    eda.run(again)
    assert (tmp_path / "again" / "classes.csv").read_text() == (Path(cfg.out_dir) / "classes.csv").read_text()
    assert (tmp_path / "again" / "samples.png").read_bytes() == (Path(cfg.out_dir) / "samples.png").read_bytes()


def _hand_made(root: Path, with_images: bool = True) -> Path:
    """Two image sizes, categories with non-contiguous ids out of order, one polygon to repair."""
    images = [
        {"id": 1, "file_name": "a/1.png", "height": 40, "width": 60},
        {"id": 2, "file_name": "a/2.png", "height": 40, "width": 60},
        {"id": 3, "file_name": "b/3.png", "height": 50, "width": 30},
    ]
    cats = [{"id": 7, "name": "Seven | pipe"}, {"id": 3, "name": "Three"}]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 3, "segmentation": [[0, 0, 20, 0, 20, 10, 0, 10]], "area": 200},
        {"id": 2, "image_id": 1, "category_id": 7, "segmentation": [[5, 5, 10, 5, 10, 10, 5, 10]], "area": 25},
        {"id": 3, "image_id": 3, "category_id": 7, "segmentation": [[0, 0, 30, 0, 30, 50, 0, 50]]},
        {"id": 4, "image_id": 3, "category_id": 3, "segmentation": [[1, 1, 2, 2]], "area": 1},
    ]
    root.mkdir(parents=True)
    (root / "train_all.json").write_text(json.dumps({"images": images, "categories": cats, "annotations": anns}))
    if with_images:
        rng = np.random.default_rng(0)
        for im in images:
            (root / im["file_name"]).parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(
                str(root / im["file_name"]), rng.integers(0, 256, (im["height"], im["width"], 3), dtype=np.uint8)
            )
    return root


def test_hand_made_file_with_two_sizes_and_odd_categories(tmp_path):
    data = _hand_made(tmp_path / "data")
    out = tmp_path / "eda"
    summary = eda.run(eda.EDAConfig(data_dir=str(data), out_dir=str(out), cache_dir=str(tmp_path / "c"), n_samples=20))
    assert_png(out / "image_sizes.png")
    assert summary["files"]["image_sizes"] == str(out / "image_sizes.png")
    rows = read_csv(out / "classes.csv")
    assert [(r["class_name"], r["category_id"]) for r in rows] == [
        ("Background", ""),
        ("Seven | pipe", "7"),
        ("Three", "3"),
    ]
    assert [int(r["instances"]) for r in rows] == [0, 2, 1]  # the 2-point polygon was dropped
    assert [int(r["images"]) for r in rows] == [2, 2, 1]  # image 3 is covered by Seven
    # pixels: image 1 = 2400 px (Three 200 minus Seven's 25 on top), image 2 background, image 3 all Seven
    assert [int(r["pixels"]) for r in rows] == [2400 - 200 + 2400, 25 + 1500, 175]
    assert [int(r["large"]) + int(r["medium"]) for r in rows] == [0, 1, 0]  # 1500 px is medium
    assert summary["samples"][:2] in ([1, 3], [3, 1]) and sorted(summary["samples"]) == [1, 2, 3]
    report = (out / "report.md").read_text()
    assert "Seven \\| pipe" in report and "| Three |" in report
    assert "| 40 | 60 | 2 |" in report and "| 50 | 30 | 1 |" in report
    assert "](image_sizes.png)" in report
    assert "fewer than 3 points" in report
    kv = {r["key"]: r["value"] for r in read_csv(out / "summary.csv")}
    assert kv["images_without_annotations"] == "1"
    assert kv["repair: polygons with fewer than 3 points dropped"] == "1"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_without_image_check_and_samples_no_image_is_read(tmp_path):
    data = _hand_made(tmp_path / "data", with_images=False)
    out = tmp_path / "eda"
    cfg = eda.EDAConfig(
        data_dir=str(data), out_dir=str(out), cache_dir=str(tmp_path / "c"), n_samples=0, check_images=False
    )
    summary = eda.run(cfg)
    assert "samples" not in summary["files"] and not (out / "samples.png").exists()
    assert summary["images_checked"] == ""
    assert "skipped (check_images=false)" in (out / "report.md").read_text()
    assert "Skipped (similarity=false or check_images=false)" in (out / "report.md").read_text()
    assert summary["similarity"] is None and summary["similar_multi_image_groups"] == ""
    with pytest.raises(DataError, match=r"a/1\.png: image file not found"):
        eda.run(eda.EDAConfig(**{**cfg.__dict__, "check_images": True}))


def test_near_duplicate_sequences_are_listed_and_shown(tmp_path):
    root, truth = make_sequences(tmp_path / "data")
    out = tmp_path / "eda"
    summary = eda.run(eda.EDAConfig(data_dir=str(root), out_dir=str(out), cache_dir=str(tmp_path / "c"), n_samples=0))
    assert_png(out / "similar_groups.png", min_side=300)
    assert summary["files"]["similar_groups"] == str(out / "similar_groups.png")
    report = (out / "report.md").read_text()
    section = report.split("## Near-duplicates and sequences")[1]
    assert "Groups with more than one image: 8 (28 of 44 images)" in section
    assert "Largest group sizes: 4, 4, 4, 4, 3, 3, 3, 3" in section
    assert "](similar_groups.png)" in section and 'ARGS="group_by=similar"' in section
    first = next(g for g in truth if len(g) == 4)
    assert ", ".join(f"batch_01/{i:04d}.jpg" for i in first) in section  # the groups table names the files
    kv = {r["key"]: r["value"] for r in read_csv(out / "summary.csv")}
    assert (kv["similar_multi_image_groups"], kv["similar_images_grouped"], kv["similar_largest_group"]) == (
        "8",
        "28",
        "4",
    )
    assert summary["similarity"]["largest_sizes"] == [4, 4, 4, 4, 3, 3, 3, 3]
    eda.run(eda.EDAConfig(data_dir=str(root), out_dir=str(out), cache_dir=str(tmp_path / "c"), similarity=False))
    assert not (out / "similar_groups.png").exists()
    assert "Skipped (similarity=false" in (out / "report.md").read_text()


def test_main_parses_overrides_and_reports_errors(tmp_path, caplog):
    data = _hand_made(tmp_path / "data")
    out = tmp_path / "eda"
    assert eda.main([f"data_dir={data}", f"out_dir={out}", f"cache_dir={tmp_path / 'c'}", "n_samples=2"]) == 0
    assert (out / "report.md").is_file() and (out / "samples.png").is_file()
    assert eda.main([f"data_dir={tmp_path / 'missing'}", f"out_dir={out}"]) == 2
    assert any("data directory not found" in r.getMessage() for r in caplog.records)
    assert eda.main(["n_samples=-1"]) == 2
    assert eda.main(["no_such_key=1"]) == 2


def test_palette_and_overlay():
    pal = visual.class_palette(11)
    assert pal.shape == (11, 3) and pal.dtype == np.uint8
    assert (pal[0] == 0).all()
    assert len({tuple(c) for c in pal}) == 11
    np.testing.assert_array_equal(visual.class_palette(11), pal)
    np.testing.assert_array_equal(visual.class_palette(40)[:11], pal)
    assert len({tuple(c) for c in visual.class_palette(40)}) == 40

    image = np.full((6, 6, 3), 100, np.uint8)
    mask = np.zeros((6, 6), np.uint8)
    mask[1:5, 1:5] = 2
    out = visual.overlay(image, mask, pal, alpha=0.5)
    np.testing.assert_array_equal(out[0, 0], image[0, 0])  # background untouched
    np.testing.assert_array_equal(out[1, 1], pal[2])  # border pixel: full class colour
    expected = np.rint(0.5 * 100 + 0.5 * pal[2].astype(float)).astype(np.uint8)
    np.testing.assert_array_equal(out[2, 2], expected)  # interior: blended


@pytest.mark.parametrize("area,bin_", [(0, 0), (1023.9, 0), (1024, 1), (9215, 1), (9216, 2), (1e6, 2)])
def test_area_bins_use_absolute_coco_thresholds(area, bin_):
    assert visual.area_bin(area) == bin_
