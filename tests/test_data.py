"""Data layer: COCO loading and validation, the mask rule, the mask cache, datasets."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from pipeline import data as data_mod
from pipeline.core.errors import PipelineError
from pipeline.data import (
    AUGMENTATIONS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    CocoData,
    DataError,
    MaskCache,
    SegmentationDataset,
    annotation_area,
    annotation_mask,
    build_transform,
    image_size_from_data,
    load_coco,
    verify_images,
)
from pipeline.data import masks as masks_mod

H, W = 10, 12
CATS = [{"id": 1, "name": "big"}, {"id": 2, "name": "small"}]


# ----------------------------------------------------------------------------- helpers
def box(x0: float, y0: float, x1: float, y1: float) -> list[float]:
    """Polygon of the axis-aligned box covering pixel columns x0..x1-1 and rows y0..y1-1."""
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def ann(aid: int, cat: int, seg: Any, image_id: int = 1, area: float | None = None) -> dict[str, Any]:
    out = {"id": aid, "image_id": image_id, "category_id": cat, "segmentation": seg, "iscrowd": 0}
    if area is not None:
        out["area"] = area
    return out


def poly(
    aid: int, cat: int, x0: int, y0: int, x1: int, y1: int, image_id: int = 1, area: bool = True
) -> dict[str, Any]:
    """A box annotation with its true area (or none)."""
    return ann(aid, cat, [box(x0, y0, x1, y1)], image_id, float((x1 - x0) * (y1 - y0)) if area else None)


def image_entry(image_id: int, h: int = H, w: int = W, name: str | None = None) -> dict[str, Any]:
    return {"id": image_id, "file_name": name or f"batch_01/{image_id:04d}.png", "height": h, "width": w}


def write_coco(
    root: Path,
    annotations: list[dict[str, Any]] | None,
    images: list[dict[str, Any]] | None = None,
    categories: list[dict[str, Any]] | None = None,
    name: str = "train_all.json",
    write_images: bool = True,
) -> Path:
    """Write a COCO file into ``root`` and, optionally, random RGB images of the declared sizes."""
    images = images if images is not None else [image_entry(1)]
    categories = categories if categories is not None else CATS
    doc: dict[str, Any] = {"images": images, "categories": categories}
    if annotations is not None:
        doc["annotations"] = annotations
    root.mkdir(parents=True, exist_ok=True)
    path = root / name
    path.write_text(json.dumps(doc))
    if write_images:
        rng = np.random.default_rng(0)
        for im in images:
            p = root / im["file_name"]
            p.parent.mkdir(parents=True, exist_ok=True)
            if not p.exists():
                cv2.imwrite(str(p), rng.integers(0, 256, (im["height"], im["width"], 3), dtype=np.uint8))
    return path


def expected_map(*boxes: tuple[int, int, int, int, int], h: int = H, w: int = W) -> np.ndarray:
    """Paint ``(value, x0, y0, x1, y1)`` boxes in the given order."""
    out = np.zeros((h, w), np.uint8)
    for value, x0, y0, x1, y1 in boxes:
        out[y0:y1, x0:x1] = value
    return out


def uncompressed_rle(m: np.ndarray) -> dict[str, Any]:
    """COCO uncompressed RLE (column-major run lengths starting with zeros)."""
    flat = m.reshape(-1, order="F").astype(np.uint8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0] + counts
    return {"size": [int(m.shape[0]), int(m.shape[1])], "counts": counts}


def compressed_rle(m: np.ndarray) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def repair_warnings(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("pipeline.data") and r.levelno == logging.WARNING]


# ----------------------------------------------------------------------------- mask rule
@pytest.mark.parametrize("small_first", [True, False])
def test_smaller_object_on_top_regardless_of_file_order(tmp_path, small_first):
    big = poly(1, 1, 0, 0, 8, 8)
    small = poly(2, 2, 2, 2, 5, 5)
    anns = [small, big] if small_first else [big, small]
    coco = load_coco(tmp_path, write_coco(tmp_path, anns).name)
    np.testing.assert_array_equal(coco.mask(1), expected_map((1, 0, 0, 8, 8), (2, 2, 2, 5, 5)))


def test_order_follows_the_area_field_of_the_file(tmp_path):
    # The rule sorts by the file's ``area``: a geometrically small object declared larger
    # is painted first and ends underneath.
    big_box_small_area = ann(1, 1, [box(0, 0, 8, 8)], area=1.0)
    small_box_big_area = ann(2, 2, [box(2, 2, 5, 5)], area=1000.0)
    coco = load_coco(tmp_path, write_coco(tmp_path, [big_box_small_area, small_box_big_area]).name)
    np.testing.assert_array_equal(coco.mask(1), expected_map((1, 0, 0, 8, 8)))


@pytest.mark.parametrize("order", [(1, 2), (2, 1)])
def test_ties_keep_file_order_later_on_top(tmp_path, order):
    a = poly(1, order[0], 0, 0, 6, 6)  # area 36
    b = poly(2, order[1], 3, 3, 9, 9)  # area 36, overlaps a on [3:6, 3:6]
    coco = load_coco(tmp_path, write_coco(tmp_path, [a, b]).name)
    expected = expected_map((order[0], 0, 0, 6, 6), (order[1], 3, 3, 9, 9))
    np.testing.assert_array_equal(coco.mask(1), expected)
    assert coco.mask(1)[4, 4] == order[1]


def test_three_levels_of_nesting_and_background(tmp_path):
    cats = [{"id": 5, "name": "a"}, {"id": 6, "name": "b"}, {"id": 7, "name": "c"}]
    anns = [poly(1, 7, 4, 4, 6, 6), poly(2, 5, 0, 0, 10, 10), poly(3, 6, 2, 2, 8, 8)]
    coco = load_coco(tmp_path, write_coco(tmp_path, anns, categories=cats).name)
    m = coco.mask(1)
    np.testing.assert_array_equal(m, expected_map((1, 0, 0, 10, 10), (2, 2, 2, 8, 8), (3, 4, 4, 6, 6)))
    assert (m[:, 10:] == 0).all()
    assert m.dtype == np.uint8


@pytest.mark.parametrize("encoding", ["compressed", "uncompressed"])
def test_rle_segmentation_rasterizes(tmp_path, encoding):
    target = np.zeros((H, W), np.uint8)
    target[1:7, 2:11] = 1
    target[3, 0] = 1  # an isolated pixel in another column
    rle = compressed_rle(target) if encoding == "compressed" else uncompressed_rle(target)
    coco = load_coco(tmp_path, write_coco(tmp_path, [ann(1, 2, rle, area=float(target.sum()))]).name)
    np.testing.assert_array_equal(coco.mask(1), target * 2)


@pytest.mark.parametrize("encoding", ["compressed", "uncompressed"])
def test_rle_donut_hole_shows_what_lies_below(tmp_path, encoding):
    donut = np.zeros((H, W), np.uint8)
    donut[1:9, 1:9] = 1
    donut[3:6, 3:6] = 0  # the hole
    rle = compressed_rle(donut) if encoding == "compressed" else uncompressed_rle(donut)
    under = poly(1, 1, 0, 0, W, H)  # the whole image, largest
    top = ann(2, 2, rle, area=float(donut.sum()))
    coco = load_coco(tmp_path, write_coco(tmp_path, [top, under]).name)
    m = coco.mask(1)
    expected = np.where(donut == 1, 2, 1).astype(np.uint8)
    np.testing.assert_array_equal(m, expected)
    assert (m[3:6, 3:6] == 1).all()


def test_missing_area_is_computed_from_the_segmentation(tmp_path):
    small = poly(1, 2, 2, 2, 5, 5, area=False)
    big = poly(2, 1, 0, 0, 8, 8, area=False)
    coco = load_coco(tmp_path, write_coco(tmp_path, [small, big]).name)
    assert "area" not in coco.annotations(1)[0]
    assert annotation_area(coco.annotations(1)[0], H, W) == 9.0
    assert annotation_area(coco.annotations(1)[1], H, W) == 64.0
    np.testing.assert_array_equal(coco.mask(1), expected_map((1, 0, 0, 8, 8), (2, 2, 2, 5, 5)))


def test_multi_polygon_annotation_is_the_union(tmp_path):
    two_parts = ann(1, 1, [box(0, 0, 3, 3), box(6, 5, 9, 8)], area=18.0)
    coco = load_coco(tmp_path, write_coco(tmp_path, [two_parts]).name)
    np.testing.assert_array_equal(coco.mask(1), expected_map((1, 0, 0, 3, 3), (1, 6, 5, 9, 8)))


def test_image_without_annotations_is_all_background(tmp_path):
    images = [image_entry(1), image_entry(2)]
    coco = load_coco(tmp_path, write_coco(tmp_path, [poly(1, 1, 0, 0, 3, 3)], images=images).name)
    assert coco.annotations(2) == []
    m = coco.mask(2)
    assert m.shape == (H, W) and not m.any()


# ----------------------------------------------------------------------------- mask rules
THREE_CATS = [{"id": 1, "name": "big"}, {"id": 2, "name": "small"}, {"id": 3, "name": "third"}]


def test_the_two_rules_paint_overlaps_differently(tmp_path):
    # a: 8x8 box described by 6 corners (12 coordinates), b: 3x3 box, 4 corners (8),
    # c: 5x5 box, 5 corners (10; the fifth lies on its left edge).
    a = ann(1, 1, [[0, 0, 4, 0, 8, 0, 8, 8, 0, 8, 0, 4]], area=64.0)
    b = ann(2, 2, [box(2, 2, 5, 5)], area=9.0)
    c = ann(3, 3, [[6, 1, 11, 1, 11, 6, 6, 6, 6, 3.5]], area=25.0)
    path = write_coco(tmp_path, [a, b, c], categories=THREE_CATS, write_images=False)
    by_area = load_coco(tmp_path, path.name)
    by_length = load_coco(tmp_path, path.name, mask_rule="polygon_length")
    assert (by_area.mask_rule, by_length.mask_rule) == ("area", "polygon_length")
    # area descending: a (64), c (25), b (9): the smallest ends on top
    np.testing.assert_array_equal(by_area.mask(1), expected_map((1, 0, 0, 8, 8), (3, 6, 1, 11, 6), (2, 2, 2, 5, 5)))
    # first-polygon length ascending: b (8), c (10), a (12): the longest ends on top and hides b
    np.testing.assert_array_equal(by_length.mask(1), expected_map((2, 2, 2, 5, 5), (3, 6, 1, 11, 6), (1, 0, 0, 8, 8)))
    assert not (by_length.mask(1) == 2).any()
    anns, cats = by_area.annotations(1), by_area.cat_to_index
    np.testing.assert_array_equal(data_mod.rasterize(anns, H, W, cats), by_area.mask(1))
    np.testing.assert_array_equal(data_mod.rasterize(anns, H, W, cats, rule="polygon_length"), by_length.mask(1))


@pytest.mark.parametrize("order", [(1, 2), (2, 1)])
def test_polygon_length_ties_keep_file_order_later_on_top(tmp_path, order):
    a = ann(1, order[0], [box(0, 0, 6, 6)], area=36.0)  # 8 coordinates each
    b = ann(2, order[1], [box(3, 3, 9, 9)], area=1.0)
    coco = load_coco(tmp_path, write_coco(tmp_path, [a, b], write_images=False).name, mask_rule="polygon_length")
    np.testing.assert_array_equal(coco.mask(1), expected_map((order[0], 0, 0, 6, 6), (order[1], 3, 3, 9, 9)))


def test_polygon_length_counts_the_first_polygon_only(tmp_path):
    # d: a short first polygon (8 coordinates) and a long second one (12); e: one polygon of 10.
    d = ann(1, 1, [box(0, 0, 4, 4), [4, 4, 7, 4, 10, 4, 10, 10, 7, 10, 4, 10]], area=52.0)
    e = ann(2, 2, [[2, 2, 8, 2, 8, 8, 2, 8, 2, 5]], area=36.0)
    coco = load_coco(tmp_path, write_coco(tmp_path, [e, d], write_images=False).name, mask_rule="polygon_length")
    np.testing.assert_array_equal(coco.mask(1), expected_map((1, 0, 0, 4, 4), (1, 4, 4, 10, 10), (2, 2, 2, 8, 8)))


def test_polygon_length_paints_rle_first_by_area(tmp_path):
    """RLE segmentations have no polygon: area rule among themselves, all under the polygons."""
    r_big, r_small = np.zeros((H, W), np.uint8), np.zeros((H, W), np.uint8)
    r_big[0:10, 7:12] = 1  # area 50
    r_small[1:3, 9:11] = 1  # area 4
    anns = [
        ann(1, 2, compressed_rle(r_small), area=4.0),
        ann(2, 3, [box(0, 0, 10, 8)], area=80.0),
        ann(3, 1, uncompressed_rle(r_big), area=50.0),
    ]
    path = write_coco(tmp_path, anns, categories=THREE_CATS, write_images=False)
    rle_big, rle_small, polygon = (1, 7, 0, 12, 10), (2, 9, 1, 11, 3), (3, 0, 0, 10, 8)
    by_length = load_coco(tmp_path, path.name, mask_rule="polygon_length").mask(1)
    np.testing.assert_array_equal(by_length, expected_map(rle_big, rle_small, polygon))
    assert by_length[1, 10] == 2 and by_length[1, 9] == 3  # the small RLE shows only beyond the polygon
    by_area = load_coco(tmp_path, path.name).mask(1)
    np.testing.assert_array_equal(by_area, expected_map(polygon, rle_big, rle_small))


def test_rle_only_image_under_polygon_length_equals_the_area_rule(tmp_path):
    m1, m2 = np.zeros((H, W), np.uint8), np.zeros((H, W), np.uint8)
    m1[2:6, 2:6] = 1
    m2[0:8, 0:8] = 1
    path = write_coco(
        tmp_path,
        [ann(1, 2, compressed_rle(m1), area=16.0), ann(2, 1, compressed_rle(m2), area=64.0)],
        write_images=False,
    )
    by_length = load_coco(tmp_path, path.name, mask_rule="polygon_length").mask(1)
    np.testing.assert_array_equal(by_length, load_coco(tmp_path, path.name).mask(1))
    np.testing.assert_array_equal(by_length, expected_map((1, 0, 0, 8, 8), (2, 2, 2, 6, 6)))


def test_mask_rules_get_separate_cache_folders(tmp_path, monkeypatch):
    a = ann(1, 1, [[0, 0, 4, 0, 8, 0, 8, 8, 0, 8, 0, 4]], area=64.0)
    b = ann(2, 2, [box(2, 2, 5, 5)], area=9.0)
    path = write_coco(tmp_path, [a, b], write_images=False)
    caches = {
        rule: MaskCache(load_coco(tmp_path, path.name, mask_rule=rule), tmp_path / "cache")
        for rule in data_mod.MASK_RULES
    }
    assert set(caches) == {"area", "polygon_length"}
    assert caches["area"].dir != caches["polygon_length"].dir
    for rule, cache in caches.items():
        assert cache.rule == rule and f"-{rule}-" in cache.dir.name
    np.testing.assert_array_equal(caches["area"].get(1), expected_map((1, 0, 0, 8, 8), (2, 2, 2, 5, 5)))
    np.testing.assert_array_equal(caches["polygon_length"].get(1), expected_map((1, 0, 0, 8, 8)))
    # read back from the PNGs: each folder keeps its own rule's map
    np.testing.assert_array_equal(cv2.imread(str(caches["area"].path(1)), cv2.IMREAD_UNCHANGED)[3, 3], 2)
    np.testing.assert_array_equal(cv2.imread(str(caches["polygon_length"].path(1)), cv2.IMREAD_UNCHANGED)[3, 3], 1)
    # a new rasterizer version never reuses an old folder
    before = caches["area"].dir
    monkeypatch.setattr(masks_mod, "MASK_RULE_VERSION", masks_mod.MASK_RULE_VERSION + "-next")
    assert MaskCache(load_coco(tmp_path, path.name), tmp_path / "cache").dir != before


def test_unknown_mask_rule_lists_the_known_ones(tmp_path):
    path = write_coco(tmp_path, [poly(1, 1, 0, 0, 4, 4)], write_images=False)
    for call in (
        lambda: load_coco(tmp_path, path.name, mask_rule="biggest"),
        lambda: data_mod.rasterize([], H, W, {1: 1}, rule="biggest"),
        lambda: data_mod.check_mask_rule("biggest"),
    ):
        with pytest.raises(PipelineError) as exc:
            call()
        assert "'biggest'" in str(exc.value) and "known: area, polygon_length" in str(exc.value)
    assert load_coco(tmp_path, path.name).mask_rule == "area"


def test_train_config_validates_the_mask_rule():
    from pipeline.core.config import ConfigError, build_config
    from pipeline.train import TrainConfig

    with pytest.raises(ConfigError, match="mask_rule: unknown 'biggest'; known: area, polygon_length"):
        build_config(TrainConfig, overrides=["mask_rule=biggest"])
    assert build_config(TrainConfig, overrides=["mask_rule=polygon_length"]).mask_rule == "polygon_length"
    assert TrainConfig().mask_rule == "area"


# ----------------------------------------------------------------------------- class mapping
def test_class_mapping_follows_file_order_of_non_contiguous_ids(tmp_path):
    cats = [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}, {"id": 12, "name": "twelve"}]
    anns = [poly(1, 3, 0, 0, 6, 6), poly(2, 12, 6, 0, 12, 4), poly(3, 7, 0, 6, 4, 10)]
    coco = load_coco(tmp_path, write_coco(tmp_path, anns, categories=cats).name)
    assert coco.class_names == ["Background", "seven", "three", "twelve"]
    assert coco.num_classes == 4
    assert coco.cat_to_index == {7: 1, 3: 2, 12: 3}
    assert coco.index_to_cat == {1: 7, 2: 3, 3: 12}
    np.testing.assert_array_equal(coco.mask(1), expected_map((2, 0, 0, 6, 6), (3, 6, 0, 12, 4), (1, 0, 6, 4, 10)))


# ----------------------------------------------------------------------------- mask cache
def test_mask_cache_reads_png_after_first_build(tmp_path, monkeypatch):
    coco = load_coco(tmp_path, write_coco(tmp_path, [poly(1, 1, 0, 0, 8, 8), poly(2, 2, 2, 2, 5, 5)]).name)
    cache = MaskCache(coco, tmp_path / "cache")
    first = cache.get(1)
    assert cache.path(1).is_file() and cache.path(1).parent == cache.dir
    assert cache.dir.parent == tmp_path / "cache"

    def fail(self, image_id):
        raise AssertionError("rasterized again instead of reading the cache")

    monkeypatch.setattr(CocoData, "mask", fail)
    second = MaskCache(coco, tmp_path / "cache").get(1)
    assert second.dtype == first.dtype == np.uint8
    np.testing.assert_array_equal(second, first)
    np.testing.assert_array_equal(second, expected_map((1, 0, 0, 8, 8), (2, 2, 2, 5, 5)))
    png = cv2.imread(str(cache.path(1)), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(png, first)


def test_mask_cache_build_writes_every_image(tmp_path):
    images = [image_entry(i) for i in (1, 2, 3)]
    anns = [poly(1, 1, 0, 0, 4, 4, image_id=1), poly(2, 2, 0, 0, 5, 5, image_id=3)]
    coco = load_coco(tmp_path, write_coco(tmp_path, anns, images=images).name)
    cache = MaskCache(coco, tmp_path / "cache")
    assert cache.build(progress=False) == cache.dir
    assert sorted(p.name for p in cache.dir.iterdir()) == ["1.png", "2.png", "3.png"]
    for i in (1, 2, 3):
        np.testing.assert_array_equal(cache.get(i), coco.mask(i))


def test_edited_annotation_file_gets_a_new_cache_folder(tmp_path):
    path = write_coco(tmp_path, [poly(1, 1, 0, 0, 8, 8)])
    coco_a = load_coco(tmp_path, path.name)
    cache_a = MaskCache(coco_a, tmp_path / "cache")
    np.testing.assert_array_equal(cache_a.get(1), expected_map((1, 0, 0, 8, 8)))

    write_coco(tmp_path, [poly(1, 2, 0, 0, 8, 8)])  # relabelled: same geometry, class 2
    coco_b = load_coco(tmp_path, path.name)
    cache_b = MaskCache(coco_b, tmp_path / "cache")
    assert coco_b.digest != coco_a.digest
    assert cache_b.dir != cache_a.dir
    assert not cache_b.path(1).exists()
    np.testing.assert_array_equal(cache_b.get(1), expected_map((2, 0, 0, 8, 8)))
    np.testing.assert_array_equal(cache_a.get(1), expected_map((1, 0, 0, 8, 8)))  # old folder untouched

    # The same content again maps back to the same folder.
    assert MaskCache(load_coco(tmp_path, path.name), tmp_path / "cache").dir == cache_b.dir


def test_unreadable_cached_mask_is_rebuilt(tmp_path, caplog):
    coco = load_coco(tmp_path, write_coco(tmp_path, [poly(1, 1, 0, 0, 8, 8)]).name)
    cache = MaskCache(coco, tmp_path / "cache")
    cache.get(1)
    cache.path(1).write_bytes(b"not a png")
    with caplog.at_level(logging.WARNING):
        m = cache.get(1)
    np.testing.assert_array_equal(m, expected_map((1, 0, 0, 8, 8)))
    assert any("unreadable cached mask" in r.getMessage() for r in repair_warnings(caplog))
    np.testing.assert_array_equal(cv2.imread(str(cache.path(1)), cv2.IMREAD_UNCHANGED), m)


# ----------------------------------------------------------------------------- bad input
def assert_data_error(exc: pytest.ExceptionInfo, path: Path, *words: str) -> None:
    msg = str(exc.value)
    assert isinstance(exc.value, PipelineError)
    assert str(path) in msg, msg
    for word in words:
        assert word in msg, msg


def test_missing_data_dir(tmp_path):
    missing = tmp_path / "no_such_dir"
    with pytest.raises(DataError) as exc:
        load_coco(missing)
    assert_data_error(exc, missing, "data directory not found")


def test_missing_annotation_file(tmp_path):
    with pytest.raises(DataError) as exc:
        load_coco(tmp_path, "train_all.json")
    assert_data_error(exc, tmp_path / "train_all.json", "annotation file not found")


def test_invalid_json(tmp_path):
    path = tmp_path / "train_all.json"
    path.write_text('{"images": [}\n')
    with pytest.raises(DataError) as exc:
        load_coco(tmp_path)
    assert_data_error(exc, path, "invalid JSON", "line 1")


def test_annotation_with_unknown_image(tmp_path):
    path = write_coco(tmp_path, [poly(1, 1, 0, 0, 4, 4), poly(2, 1, 0, 0, 4, 4, image_id=99)])
    with pytest.raises(DataError) as exc:
        load_coco(tmp_path)
    assert_data_error(exc, path, "annotation 2", "unknown image id 99")


def test_annotation_with_unknown_category(tmp_path):
    path = write_coco(tmp_path, [poly(5, 42, 0, 0, 4, 4)])
    with pytest.raises(DataError) as exc:
        load_coco(tmp_path)
    assert_data_error(exc, path, "annotation 5", "unknown category id 42")


def test_short_polygons_are_dropped_counted_and_warned_once(tmp_path, caplog):
    anns = [
        ann(1, 1, [[1, 1, 5, 5]], area=4.0),  # 2 points: the whole annotation goes
        ann(2, 1, [[1, 1]], area=1.0),  # 1 point
        ann(3, 2, [[0, 0, 9, 0], box(2, 2, 5, 5)], area=9.0),  # one bad part, one good one
        poly(4, 1, 6, 6, 10, 9),
    ]
    path = write_coco(tmp_path, anns)
    with caplog.at_level(logging.WARNING):
        coco = load_coco(tmp_path)
    assert coco.repairs == {
        "polygons with fewer than 3 points dropped": 3,
        "annotations without a valid polygon dropped": 2,
    }
    warnings = repair_warnings(caplog)
    assert len(warnings) == 1
    assert str(path) in warnings[0].getMessage() and "fewer than 3 points" in warnings[0].getMessage()
    assert [a["id"] for a in coco.annotations(1)] == [3, 4]
    assert coco.annotations(1)[0]["segmentation"] == [box(2, 2, 5, 5)]
    np.testing.assert_array_equal(coco.mask(1), expected_map((1, 6, 6, 10, 9), (2, 2, 2, 5, 5)))


def reference_coco(path: Path):
    """pycocotools' own ``COCO`` object of the file as written (the reference rasterizer)."""
    import contextlib
    import io

    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints progress lines
        return COCO(str(path))


def ann_to_mask(path: Path, aid: int) -> np.ndarray:
    """``COCO.annToMask`` (frPyObjects + merge + decode) of annotation ``aid`` as written in ``path``."""
    ref = reference_coco(path)
    return ref.annToMask(ref.anns[aid]).astype(bool)


def test_out_of_image_polygons_are_kept_counted_and_warned_once(tmp_path, caplog):
    raw = [[6, -3, 15.5, -3, 15.5, 5, 6, 5], [-4, 6, 3, 6, 3, 14, -4, 14]]
    anns = [
        ann(1, 1, [raw[0]], area=30.0),
        ann(2, 2, [raw[1]], area=12.0),
        poly(3, 1, 4, 4, 6, 6),  # inside: untouched
        ann(4, 2, [box(0, 0, W, H)], area=float(H * W)),  # corners on the border: not counted
    ]
    path = write_coco(tmp_path, anns)
    with caplog.at_level(logging.WARNING):
        coco = load_coco(tmp_path)
    assert coco.repairs == {data_mod.OFF_IMAGE_REPAIR: 2}
    assert data_mod.OFF_IMAGE_REPAIR == "polygons running off the image (cut at the border when rasterized)"
    warnings = repair_warnings(caplog)
    assert len(warnings) == 1 and str(path) in warnings[0].getMessage()
    assert "2 polygons running off the image" in warnings[0].getMessage()
    segs = [a["segmentation"] for a in coco.annotations(1)]
    assert segs == [[raw[0]], [raw[1]], [box(4, 4, 6, 6)], [box(0, 0, W, H)]]  # coordinates never moved
    for a in coco.annotations(1):
        np.testing.assert_array_equal(annotation_mask(a, H, W), ann_to_mask(path, a["id"]))
    np.testing.assert_array_equal(
        coco.mask(1), expected_map((2, 0, 0, W, H), (1, 6, 0, W, 5), (2, 0, 6, 3, H), (1, 4, 4, 6, 6))
    )


def test_polygon_off_the_image_is_cut_at_the_border_not_moved(tmp_path):
    """Moving (-10, 0) to (0, 0) would change the slope of the long edge: 100 px instead of 145."""
    raw = [-10, 0, 10, 0, 10, 20]
    path = write_coco(tmp_path, [ann(1, 1, [raw], area=200.0)], images=[image_entry(1, 20, 20)])
    coco = load_coco(tmp_path)
    reference = ann_to_mask(path, 1)
    assert int(reference.sum()) == 145
    m = coco.mask(1)
    assert int((m == 1).sum()) == 145
    np.testing.assert_array_equal(m == 1, reference)
    assert coco.annotations(1)[0]["segmentation"] == [raw]
    assert coco.repairs == {"polygons running off the image (cut at the border when rasterized)": 1}


def random_off_image_polygon(rng: np.random.Generator, h: int, w: int) -> list[float]:
    """3 to 12 corners inside the image, then one or more moved 3 to 37 px beyond a random border."""
    n = int(rng.integers(3, 13))
    xy = np.stack([rng.uniform(0, w, n), rng.uniform(0, h, n)], axis=1)
    if rng.random() < 0.7:  # mostly simple (star-shaped) polygons, some self-intersecting ones
        c = xy.mean(0)
        xy = xy[np.argsort(np.arctan2(xy[:, 1] - c[1], xy[:, 0] - c[0]))]
    for j in rng.choice(n, size=int(rng.integers(1, n + 1)), replace=False):
        out = rng.uniform(3, 37)
        side = int(rng.integers(4))
        if side == 0:
            xy[j, 0] = -out
        elif side == 1:
            xy[j, 0] = w + out
        elif side == 2:
            xy[j, 1] = -out
        else:
            xy[j, 1] = h + out
    if rng.random() < 0.3:
        xy = np.round(xy)  # integer coordinates too
    return [float(v) for v in xy.reshape(-1)]


@pytest.mark.parametrize("h,w", [(512, 512), (300, 451)])
def test_off_image_polygons_equal_pycocotools_on_the_raw_polygon(tmp_path, h, w):
    """75 random polygons per size (150 in all) running off the image: maps equal annToMask of the raw polygon."""
    rng = np.random.default_rng(h * 1000 + w)
    n = 75
    images = [image_entry(i, h, w) for i in range(1, n + 1)]
    raws = [random_off_image_polygon(rng, h, w) for _ in range(n)]
    anns = [ann(i, 1 + i % 2, [raws[i - 1]], image_id=i) for i in range(1, n + 1)]  # no area: computed
    path = write_coco(tmp_path, anns, images=images, write_images=False)
    coco = load_coco(tmp_path)
    ref = reference_coco(path)
    moved = 0
    for i in range(1, n + 1):
        reference = ref.annToMask(ref.anns[i]).astype(bool)  # pycocotools on the unmodified polygon
        expected = np.where(reference, 1 + i % 2, 0).astype(np.uint8)
        np.testing.assert_array_equal(coco.mask(i), expected, err_msg=f"polygon {i}: {raws[i - 1]}")
        clipped = np.clip(np.reshape(raws[i - 1], (-1, 2)), 0, [w, h]).reshape(-1).tolist()
        moved += not np.array_equal(annotation_mask({"segmentation": [clipped]}, h, w), reference)
    assert moved > n // 2  # moving corners onto the border would have changed most of these masks
    assert all(coco.annotations(i)[0]["segmentation"] == [raws[i - 1]] for i in range(1, n + 1))
    assert coco.repairs == {"polygons running off the image (cut at the border when rasterized)": n}


def test_no_warning_for_a_clean_file(tmp_path, caplog):
    write_coco(tmp_path, [poly(1, 1, 0, 0, W, H)])
    with caplog.at_level(logging.WARNING):
        coco = load_coco(tmp_path)
    assert coco.repairs == {}
    assert repair_warnings(caplog) == []


def test_image_file_missing(tmp_path):
    write_coco(tmp_path, [poly(1, 1, 0, 0, 4, 4)], write_images=False)
    coco = load_coco(tmp_path)
    missing = tmp_path / "batch_01" / "0001.png"
    with pytest.raises(DataError) as exc:
        verify_images(coco, progress=False)
    assert_data_error(exc, missing, "image file not found")
    with pytest.raises(DataError) as exc:
        SegmentationDataset(coco)[0]
    assert_data_error(exc, missing, "image file not found")


def test_image_not_decodable(tmp_path):
    images = [image_entry(1, name="batch_01/0001.jpg")]
    bad = tmp_path / "batch_01" / "0001.jpg"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg" * 4)
    write_coco(tmp_path, [poly(1, 1, 0, 0, 4, 4)], images=images)
    coco = load_coco(tmp_path)
    with pytest.raises(DataError) as exc:
        verify_images(coco, progress=False)
    assert_data_error(exc, bad, "cannot be decoded")


def test_image_size_differs_from_json(tmp_path):
    img = tmp_path / "batch_01" / "0001.png"
    img.parent.mkdir(parents=True)
    cv2.imwrite(str(img), np.zeros((H - 2, W, 3), np.uint8))
    write_coco(tmp_path, [poly(1, 1, 0, 0, 4, 4)])  # declares H x W, keeps the existing file
    coco = load_coco(tmp_path)
    with pytest.raises(DataError) as exc:
        verify_images(coco, progress=False)
    assert_data_error(exc, img, f"real size {W}x{H - 2}", f"{W}x{H}")


def test_empty_category_list(tmp_path):
    path = write_coco(tmp_path, [], categories=[])
    with pytest.raises(DataError) as exc:
        load_coco(tmp_path)
    assert_data_error(exc, path, "category list is empty")


def test_duplicate_image_ids(tmp_path):
    images = [image_entry(1), image_entry(2), image_entry(1, name="batch_01/other.png")]
    path = write_coco(tmp_path, [poly(1, 1, 0, 0, 4, 4)], images=images)
    with pytest.raises(DataError) as exc:
        load_coco(tmp_path)
    assert_data_error(exc, path, "duplicate image ids [1]")


def test_rle_of_the_wrong_size(tmp_path):
    rle = compressed_rle(np.ones((H + 1, W), np.uint8))
    path = write_coco(tmp_path, [ann(3, 1, rle, area=1.0)])
    with pytest.raises(DataError) as exc:
        load_coco(tmp_path)
    assert_data_error(exc, path, "annotation 3", f"image 1 is {H}x{W}")


def test_labelled_file_without_annotations(tmp_path):
    path = write_coco(tmp_path, None, name="test.json")
    with pytest.raises(DataError) as exc:
        load_coco(tmp_path, "test.json")
    assert_data_error(exc, path, "no annotations")
    coco = load_coco(tmp_path, "test.json", require_annotations=False)
    assert not coco.has_annotations and coco.image_ids == [1]


# ----------------------------------------------------------------------------- datasets
@pytest.fixture
def small_set(tmp_path) -> CocoData:
    """Two 40x60 images, two classes, one image without annotations."""
    h, w = 40, 60
    images = [image_entry(1, h, w), image_entry(2, h, w)]
    anns = [poly(1, 1, 0, 0, 40, 30), poly(2, 2, 10, 10, 25, 20), poly(3, 2, 30, 5, 50, 35, image_id=2)]
    write_coco(tmp_path, anns, images=images)
    return load_coco(tmp_path)


def denormalize(t: torch.Tensor) -> np.ndarray:
    mean = torch.tensor(IMAGENET_MEAN).view(-1, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(-1, 1, 1)
    return (t * std + mean).mul(255).permute(1, 2, 0).numpy()


def test_dataset_without_transform_returns_exact_image_and_mask(small_set, tmp_path):
    ds = SegmentationDataset(small_set, cache=MaskCache(small_set, tmp_path / "cache"))
    assert len(ds) == 2
    image, mask, meta = ds[0]
    assert image.dtype == torch.float32 and image.shape == (3, 40, 60)
    assert mask.dtype == torch.int64 and mask.shape == (40, 60)
    assert meta == {"image_id": 1, "file_name": "batch_01/0001.png", "height": 40, "width": 60}
    rgb = cv2.cvtColor(cv2.imread(str(tmp_path / "batch_01/0001.png")), cv2.COLOR_BGR2RGB)
    np.testing.assert_allclose(denormalize(image), rgb, atol=1e-3)
    expected = (rgb[0, 0] / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(image[:, 0, 0].numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(mask.numpy(), small_set.mask(1))
    # the same without a cache
    _, mask_nc, _ = SegmentationDataset(small_set)[0]
    np.testing.assert_array_equal(mask_nc.numpy(), mask.numpy())


@pytest.mark.parametrize("aug", AUGMENTATIONS)
def test_dataset_transforms_to_a_non_square_size(small_set, tmp_path, aug):
    size = (32, 48)
    ds = SegmentationDataset(
        small_set, [2, 1], transform=build_transform(aug, size), cache=MaskCache(small_set, tmp_path / "c")
    )
    for idx, image_id in enumerate([2, 1]):
        image, mask, meta = ds[idx]
        assert image.dtype == torch.float32 and image.shape == (3, *size)
        assert mask.dtype == torch.int64 and mask.shape == size
        assert meta["image_id"] == image_id and (meta["height"], meta["width"]) == (40, 60)
        assert torch.isfinite(image).all()
        assert set(mask.unique().tolist()) <= set(range(small_set.num_classes))
    if aug == "none":
        _, mask, _ = ds[1]
        resized = cv2.resize(small_set.mask(1), (size[1], size[0]), interpolation=cv2.INTER_NEAREST)
        np.testing.assert_array_equal(mask.numpy(), resized)


@pytest.mark.parametrize("mean,std", [(IMAGENET_MEAN, IMAGENET_STD), ((0.5, 0.25, 0.0), (0.5, 2.0, 1.0))])
def test_to_tensor_equals_the_normalization_formula(mean, std):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (17, 23, 3), dtype=np.uint8)
    image[0, :3] = [[0, 0, 0], [255, 255, 255], [1, 128, 254]]
    reference = (
        torch.from_numpy(image).permute(2, 0, 1).float() / 255.0 - torch.tensor(mean).view(3, 1, 1)
    ) / torch.tensor(std).view(3, 1, 1)
    cases = [(image, reference), (image[:, ::-1], reference.flip(-1)), (np.asfortranarray(image), reference)]
    for img, expected in cases:
        out = data_mod.to_tensor(img, mean, std)
        assert out.dtype == torch.float32 and out.shape == (3, 17, 23) and out.is_contiguous()
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    as_float = data_mod.to_tensor(image.astype(np.float32), mean, std)  # non-uint8 input takes the generic path
    torch.testing.assert_close(as_float, reference, rtol=0, atol=1e-6)


def test_unknown_augmentation_lists_the_valid_ones():
    with pytest.raises(PipelineError) as exc:
        build_transform("heavy", (32, 32))
    assert "'heavy'" in str(exc.value)
    for name in AUGMENTATIONS:
        assert name in str(exc.value)


def test_test_dataset_returns_image_and_meta(tmp_path):
    images = [image_entry(4, 24, 40, name="test/0004.png"), image_entry(9, 24, 40, name="test/0009.png")]
    write_coco(tmp_path, None, images=images, name="test.json")
    coco = load_coco(tmp_path, "test.json", require_annotations=False)
    ds = data_mod.TestDataset(coco, transform=build_transform("none", (32, 64)))
    assert len(ds) == 2
    image, meta = ds[1]
    assert image.dtype == torch.float32 and image.shape == (3, 32, 64)
    assert meta == {"image_id": 9, "file_name": "test/0009.png", "height": 24, "width": 40}
    raw, _ = data_mod.TestDataset(coco)[0]
    assert raw.shape == (3, 24, 40)


def test_greyscale_image_gives_three_equal_channels(tmp_path):
    img = tmp_path / "batch_01" / "0001.png"
    img.parent.mkdir(parents=True)
    grey = np.tile(np.arange(W, dtype=np.uint8) * 20, (H, 1))
    cv2.imwrite(str(img), grey)
    assert cv2.imread(str(img), cv2.IMREAD_UNCHANGED).ndim == 2
    write_coco(tmp_path, [poly(1, 1, 0, 0, 4, 4)])
    coco = load_coco(tmp_path)
    assert verify_images(coco, progress=False) == 1
    image, mask, _ = SegmentationDataset(coco)[0]
    assert image.shape == (3, H, W) and mask.shape == (H, W)
    rgb = denormalize(image)
    for c in range(3):
        np.testing.assert_allclose(rgb[..., c], grey, atol=1e-3)


def test_many_categories_use_uint16_masks(tmp_path):
    cats = [{"id": 1000 + i, "name": f"c{i}"} for i in range(300)]
    anns = [ann(1, 1000 + 279, [box(0, 0, 6, 6)], area=36.0), ann(2, 1000 + 299, [box(2, 2, 4, 4)], area=4.0)]
    write_coco(tmp_path, anns, categories=cats)
    coco = load_coco(tmp_path)
    assert coco.num_classes == 301
    m = coco.mask(1)
    assert m.dtype == np.uint16
    assert m[0, 0] == 280 and m[3, 3] == 300 and m[9, 11] == 0
    cache = MaskCache(coco, tmp_path / "cache")
    cache.get(1)
    cached = cv2.imread(str(cache.path(1)), cv2.IMREAD_UNCHANGED)
    assert cached.dtype == np.uint16
    np.testing.assert_array_equal(cached, m)
    _, mask, _ = SegmentationDataset(coco, transform=build_transform("none", (16, 24)), cache=cache)[0]
    assert mask.dtype == torch.int64 and set(mask.unique().tolist()) == {0, 280, 300}


def test_mask_dtype_keeps_class_indices_below_the_ignore_index():
    assert data_mod.mask_dtype(11) == np.uint8
    assert data_mod.mask_dtype(254) == np.uint8
    assert data_mod.mask_dtype(301) == np.uint16


# ----------------------------------------------------------------------------- image size
def test_image_size_from_data_rounds_up_to_the_divisor(tmp_path):
    images = [image_entry(1, 375, 500), image_entry(2, 375, 500), image_entry(3, 512, 512)]
    write_coco(tmp_path, [poly(1, 1, 0, 0, 4, 4)], images=images, write_images=False)
    coco = load_coco(tmp_path)
    assert image_size_from_data(coco) == (384, 512)
    assert image_size_from_data(coco, divisor=1) == (375, 500)
    assert image_size_from_data(coco, divisor=100) == (400, 500)

    write_coco(tmp_path, [poly(1, 1, 0, 0, 4, 4)], images=[image_entry(1, 64, 96)], write_images=False)
    assert image_size_from_data(load_coco(tmp_path), divisor=32) == (64, 96)


def test_strong_augmentation_keeps_a_non_square_size():
    """Quarter turns would swap height and width; the preset leaves them out for non-square sizes."""
    from pipeline.data import build_transform

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (40, 70, 3), dtype=np.uint8)
    mask = rng.integers(0, 5, (40, 70), dtype=np.uint8)
    t = build_transform("strong", (32, 48))
    for seed in range(60):
        t.set_random_seed(seed)
        out = t(image=image, mask=mask)
        assert out["image"].shape == (32, 48, 3) and out["mask"].shape == (32, 48)
    square = build_transform("strong", (48, 48))
    assert any(type(op).__name__ == "RandomRotate90" for op in square.transforms)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["images"][0].update(height="tall"), "height of image"),
        (lambda d: d["images"][0].update(id=None), "image id must be an integer"),
        (lambda d: d["categories"][0].update(id="one"), "category id"),
        (lambda d: d["annotations"][0].update(image_id=[1]), "image_id of annotation"),
    ],
)
def test_non_numeric_ids_and_sizes_are_data_errors(tmp_path, edit, message):
    import json as _json

    from pipeline.data import DataError, load_coco

    data = {
        "images": [{"id": 1, "file_name": "a.jpg", "height": 4, "width": 4}],
        "categories": [{"id": 1, "name": "x"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": [[0, 0, 3, 0, 3, 3]], "area": 4}],
    }
    edit(data)
    (tmp_path / "train_all.json").write_text(_json.dumps(data))
    with pytest.raises(DataError, match=message) as err:
        load_coco(tmp_path, "train_all.json")
    assert "train_all.json" in str(err.value)


def test_crop_cuts_an_aligned_window_of_the_resized_image():
    """``crop``: resize to the training size, then one random window shared by image and mask;
    quarter turns follow the window's shape, not the resized image's."""
    from pipeline.data import build_transform

    h, w = 40, 64
    mask = np.arange(h * w, dtype=np.int32).reshape(h, w)  # each pixel's own number
    image = np.stack(
        [np.arange(h * w).reshape(h, w) // w * 5, np.arange(h * w).reshape(h, w) % w * 3, np.zeros((h, w))], 2
    )
    image = image.astype(np.uint8)
    t = build_transform("none", (h, w), crop=(16, 32))
    seen = set()
    for seed in range(20):
        t.set_random_seed(seed)
        out = t(image=image, mask=mask)
        assert out["image"].shape == (16, 32, 3) and out["mask"].shape == (16, 32)
        row, col = divmod(int(out["mask"][0, 0]), w)  # where the window starts
        np.testing.assert_array_equal(out["mask"], mask[row : row + 16, col : col + 32])
        np.testing.assert_array_equal(out["image"], image[row : row + 16, col : col + 32])
        seen.add((row, col))
    assert len(seen) > 5
    assert not any(
        type(op).__name__ == "RandomRotate90" for op in build_transform("strong", (48, 48), (16, 32)).transforms
    )
    assert any(type(op).__name__ == "RandomRotate90" for op in build_transform("strong", (48, 64), (32, 32)).transforms)
