"""Submission writer, validator and scorer: formats, atomic writes, every validator defect, exact scores."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline import submit as submit_module
from pipeline.core.errors import PipelineError
from pipeline.data import load_coco
from pipeline.data.resize import resize_nearest
from pipeline.data.store import ProbReader, ProbWriter
from pipeline.score import ScoreConfig
from pipeline.score import run as score
from pipeline.submission import writer as submit_stage
from pipeline.submission.formats import validate_submission
from pipeline.submission.rle import decode_label_map, encode_mask
from pipeline.submission.writer import dense_row, rle_rows
from pipeline.submit import SubmitConfig
from pipeline.submit import run as submit
from pipeline.validate import ValidateConfig
from pipeline.validate import run as validate

RLE_HEADER = "image_id,class_id,EncodedPixels"
DENSE_HEADER = "image_id,PredictionString"


# ----------------------------------------------------------------------------- helpers
def write_rows(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    return path


def read_rows(path: Path) -> list[list[str]]:
    csv.field_size_limit(2**31 - 1)
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh))


@pytest.fixture(scope="module")
def setup(demo_data, tmp_path_factory):
    """(data_dir, test coco, run folder with two folds of random test probabilities at half size)."""
    root = tmp_path_factory.mktemp("submit_run") / "exp"
    test = load_coco(demo_data, "test.json", require_annotations=False)
    rng = np.random.default_rng(0)
    for f in range(2):
        with ProbWriter(root / f"fold{f}" / "test_flip", test.class_names) as w:
            for im in test.images:
                h, wd = int(im["height"]), int(im["width"])
                p = rng.random((test.num_classes, h // 2, wd // 2)).astype(np.float32) ** 4
                w.write(int(im["id"]), im["file_name"], h, wd, p / p.sum(0, keepdims=True))
    return demo_data, test, root


def expected_maps(setup) -> dict[str, np.ndarray]:
    """argmax of the mean of the two folds' probabilities at each image's own size."""
    _, test, root = setup
    readers = [ProbReader(root / f"fold{f}" / "test_flip") for f in range(2)]
    out = {}
    for im in test.images:
        size = (int(im["height"]), int(im["width"]))
        out[im["file_name"]] = np.mean([r.load(im["id"], size).numpy() for r in readers], axis=0).argmax(0)
    return out


def submit_cfg(setup, tmp_path: Path, **kw) -> SubmitConfig:
    data, _, root = setup
    base = dict(name="sub", runs=[str(root)], data_dir=str(data), out_dir=str(tmp_path), progress=False)
    base.update(kw)
    return SubmitConfig(**base)


# ----------------------------------------------------------------------------- writer
@pytest.mark.parametrize("order", ["F", "C"])
def test_rle_rows_decode_to_the_argmax_maps(setup, tmp_path, order):
    data, test, _ = setup
    out = submit(submit_cfg(setup, tmp_path, order=order))
    rows = read_rows(tmp_path / "sub.csv")
    assert rows[0] == RLE_HEADER.split(",")
    rows = rows[1:]
    cat_ids = [int(c["id"]) for c in test.categories]
    assert len(rows) == len(test.images) * len(cat_ids) == out["rows"]
    assert [r[0] for r in rows] == [im["file_name"] for im in test.images for _ in cat_ids]  # test.json order
    assert [int(r[1]) for r in rows] == cat_ids * len(test.images)  # category file order, COCO ids
    expected = expected_maps(setup)
    assert {int(im["height"]) != int(im["width"]) for im in test.images} == {True}  # non-square images
    for i, im in enumerate(test.images):
        block = rows[i * len(cat_ids) : (i + 1) * len(cat_ids)]
        rles = {test.cat_to_index[int(r[1])]: r[2] for r in block}
        decoded = decode_label_map(rles, (int(im["height"]), int(im["width"])), order=order)
        np.testing.assert_array_equal(decoded, expected[im["file_name"]])
    manifest = json.loads((tmp_path / "sub.json").read_text())
    assert manifest["format"] == "rle" and manifest["order"] == order and manifest["rows"] == len(rows)
    assert manifest["members"][0]["weight"] == 1.0 and manifest["members"][0]["tta"] == "flip"
    assert manifest["runs"] == [str(setup[2])] and manifest["validated"] is True and manifest["created"]
    assert manifest["mask_rule"] == "area"  # the rule of the runs behind the stores (score reads it)
    assert manifest["postprocess"] == {"name": "none"}


def test_dense_rows_hold_65536_class_indices(setup, tmp_path):
    data, test, _ = setup
    submit(submit_cfg(setup, tmp_path, format="dense"))
    rows = read_rows(tmp_path / "sub.csv")
    assert rows[0] == DENSE_HEADER.split(",")
    assert [r[0] for r in rows[1:]] == [im["file_name"] for im in test.images]
    expected = expected_maps(setup)
    for name, text in rows[1:]:
        values = np.array(text.split(), dtype=np.int64)
        assert values.size == 65536
        np.testing.assert_array_equal(
            values.reshape(256, 256), resize_nearest(expected[name].astype(np.uint8), (256, 256))
        )


def test_previous_csv_stays_intact_when_writing_fails(setup, tmp_path, monkeypatch):
    submit(submit_cfg(setup, tmp_path))
    before = (tmp_path / "sub.csv").read_bytes()
    manifest = (tmp_path / "sub.json").read_bytes()
    calls = {"n": 0}
    real = submit_stage.encode_label_map

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("disk on fire")
        return real(*args, **kwargs)

    monkeypatch.setattr(submit_stage, "encode_label_map", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        submit(submit_cfg(setup, tmp_path, order="C"))
    assert calls["n"] == 4
    assert (tmp_path / "sub.csv").read_bytes() == before
    assert (tmp_path / "sub.json").read_bytes() == manifest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub.csv", "sub.json"]  # no temporary files left


def test_an_invalid_submission_never_replaces_the_previous_file(setup, tmp_path, monkeypatch):
    submit(submit_cfg(setup, tmp_path))
    before = (tmp_path / "sub.csv").read_bytes()
    monkeypatch.setattr(submit_module, "rle_rows", lambda name, labels, coco, order: [[name, "999", ""]])
    with pytest.raises(PipelineError, match="unknown class id"):
        submit(submit_cfg(setup, tmp_path))
    assert (tmp_path / "sub.csv").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub.csv", "sub.json"]


def test_submit_errors(setup, tmp_path):
    data, _, root = setup
    with pytest.raises(PipelineError, match="no ensemble weights file"):
        submit(SubmitConfig(name="none", ensembles_dir=str(tmp_path), data_dir=str(data), out_dir=str(tmp_path)))
    with pytest.raises(PipelineError, match="format: unknown 'png'"):
        submit(submit_cfg(setup, tmp_path, format="png"))
    with pytest.raises(PipelineError, match="no test_d4/ stores"):
        submit(submit_cfg(setup, tmp_path, tta="d4"))


# ----------------------------------------------------------------------------- validator
@pytest.fixture(scope="module")
def valid(demo_data, tmp_path_factory):
    """(test coco, rle rows, dense rows) of a valid submission built from the test ground truth."""
    gt = load_coco(demo_data, "test_gt.json")
    test = load_coco(demo_data, "test.json", require_annotations=False)
    by_name = {im["file_name"]: int(im["id"]) for im in gt.images}
    rle, dense = [], []
    for im in test.images:
        labels = gt.mask(by_name[im["file_name"]])
        rle += rle_rows(im["file_name"], labels, test, "F")
        dense.append(dense_row(im["file_name"], labels, (256, 256)))
    return test, rle, dense


def check(tmp_path: Path, coco, header: list[str], rows: list[list[str]], **kw) -> list[str]:
    return validate_submission(write_rows(tmp_path / "s.csv", header, rows), coco, **kw)


def test_valid_submissions_have_no_problems(valid, demo_data, tmp_path):
    test, rle, dense = valid
    assert any(r[2] for r in rle)  # real runs, not only empty rows
    assert check(tmp_path, test, RLE_HEADER.split(","), rle) == []
    assert check(tmp_path, test, RLE_HEADER.split(","), rle, format="rle") == []
    assert check(tmp_path, test, DENSE_HEADER.split(","), dense) == []
    assert validate(ValidateConfig(sub=str(tmp_path / "s.csv"), data_dir=str(demo_data))) == []


def _rle_case(test, rows: list[list[str]], defect: str):
    """Apply one defect; return (rows, header, expected message, image, line)."""
    rows = [list(r) for r in rows]
    k = len(test.categories)
    header = RLE_HEADER.split(",")
    img = test.images[2]
    first = 2 * k  # index of the first row of image 2
    line = first + 2  # its CSV line (the header is line 1)
    name, h, w = img["file_name"], int(img["height"]), int(img["width"])
    if defect == "wrong header":
        return rows, ["image_id", "class", "EncodedPixels"], "header", None, 1
    if defect == "missing image":
        return rows[:first] + rows[first + k :], header, "missing image", name, None
    if defect == "extra image":
        extra = [["batch_09/extra.jpg", r[1], ""] for r in rows[:k]]
        return rows + extra, header, "extra image", "batch_09/extra.jpg", len(rows) + 2
    if defect == "duplicate row":
        rows.insert(first + 3, list(rows[first]))
        return rows, header, f"duplicate row (first at line {line})", name, line + 3
    if defect == "unknown class id":
        rows.insert(first + 1, [name, "99", ""])
        return rows, header, "unknown class id", name, line + 1
    if defect == "odd number of values":
        rows[first][2] = "1 3 5"
        return rows, header, "odd number of values", name, line
    if defect == "unsorted runs":
        rows[first][2] = "10 2 1 3"
        return rows, header, "not sorted", name, line
    if defect == "overlapping runs":
        rows[first][2] = "1 5 3 2"
        return rows, header, "overlaps", name, line
    if defect == "run past the image end":
        rows[first][2] = f"{h * w - 2} 5"
        return rows, header, "past the end of the image", name, line
    if defect == "pixel claimed by two classes":
        for r in rows[first : first + k]:
            r[2] = ""
        rows[first + 1][2] = "1 10"
        rows[first + 4][2] = "5 3 20 3"
        return (
            rows,
            header,
            f"pixel 5 is claimed by class ids {rows[first + 1][1]} (line {line + 1}) and {rows[first + 4][1]}",
            name,
            line + 4,
        )
    raise AssertionError(defect)


RLE_DEFECTS = [
    "wrong header",
    "missing image",
    "extra image",
    "duplicate row",
    "unknown class id",
    "odd number of values",
    "unsorted runs",
    "overlapping runs",
    "run past the image end",
    "pixel claimed by two classes",
]


@pytest.mark.parametrize("defect", RLE_DEFECTS)
def test_validator_catches_rle_defect(valid, demo_data, tmp_path, defect):
    test, rle, _ = valid
    rows, header, message, image, line = _rle_case(test, rle, defect)
    problems = check(tmp_path, test, header, rows)
    assert len(problems) == 1, problems
    assert message in problems[0]
    if image is not None:
        assert f"image {image!r}" in problems[0]
    if line is not None:
        assert f"line {line}" in problems[0]
    with pytest.raises(PipelineError, match="1 problem"):
        validate(ValidateConfig(sub=str(tmp_path / "s.csv"), data_dir=str(demo_data)))


@pytest.mark.parametrize("defect", ["dense wrong count", "dense value out of range"])
def test_validator_catches_dense_defect(valid, tmp_path, defect):
    test, _, dense = valid
    rows = [list(r) for r in dense]
    values = rows[3][1].split()
    if defect == "dense wrong count":
        rows[3][1] = " ".join(values[:-1])
        message = "has 65535 values, expected 65536"
    else:
        values[256 * 5 + 7] = str(test.num_classes)
        rows[3][1] = " ".join(values)
        message = (
            f"value {256 * 5 + 8} (row 5, column 7) is {test.num_classes}, "
            f"outside the class indices [0, {test.num_classes})"
        )
    problems = check(tmp_path, test, DENSE_HEADER.split(","), rows)
    assert len(problems) == 1, problems
    assert message in problems[0]
    assert f"line 5, image {rows[3][0]!r}" in problems[0]


def test_validator_reports_a_missing_file_and_a_format_mismatch(valid, tmp_path):
    test, rle, _ = valid
    assert "file not found" in validate_submission(tmp_path / "nope.csv", test)[0]
    problems = check(tmp_path, test, RLE_HEADER.split(","), rle, format="dense")
    assert problems == [f"line 1: header {RLE_HEADER!r} must be exactly {DENSE_HEADER!r}"]


# ----------------------------------------------------------------------------- scorer
@pytest.fixture()
def tiny(tmp_path):
    """Two 2x3 images, categories 5 and 7 (class indices 1, 2), PNG ground truth with one ignored pixel."""
    data = tmp_path / "data"
    (data / "gt" / "imgs").mkdir(parents=True)
    images = [
        {"id": 1, "file_name": "imgs/a.jpg", "height": 2, "width": 3},
        {"id": 2, "file_name": "imgs/b.jpg", "height": 2, "width": 3},
    ]
    cats = [{"id": 5, "name": "A"}, {"id": 7, "name": "B"}]
    (data / "test.json").write_text(json.dumps({"images": images, "categories": cats}))
    gt = {
        "imgs/a.jpg": np.array([[0, 1, 1], [2, 2, 0]], np.uint8),
        "imgs/b.jpg": np.array([[1, 1, 255], [0, 0, 2]], np.uint8),
    }
    pred = {
        "imgs/a.jpg": np.array([[0, 1, 0], [2, 1, 0]], np.uint8),
        "imgs/b.jpg": np.array([[1, 2, 2], [0, 0, 2]], np.uint8),
    }
    for name, m in gt.items():
        cv2.imwrite(str(data / "gt" / Path(name).with_suffix(".png")), m)
    return data, gt, pred


# confusion (rows ground truth, columns prediction) = [[4,0,0],[1,2,1],[0,1,2]]:
# IoU = 4/5, 2/5, 2/4; per image: a (2/3, 1/3, 1/2), b (1, 1/2, 1/2)
TINY_MIOU = (4 / 5 + 2 / 5 + 2 / 4) / 3
TINY_IMAGE_MIOU = ((2 / 3 + 1 / 3 + 1 / 2) / 3 + (1 + 1 / 2 + 1 / 2) / 3) / 2


def test_score_rle_equals_hand_computed_miou(tiny):
    data, _, pred = tiny
    rows = [[name, str(cid), encode_mask(m == idx)] for name, m in pred.items() for idx, cid in ((1, 5), (2, 7))]
    sub = write_rows(data / "sub.csv", RLE_HEADER.split(","), rows)
    result = score(ScoreConfig(sub=str(sub), gt=str(data / "gt"), data_dir=str(data)))
    assert result["miou"] == pytest.approx(TINY_MIOU)
    assert result["iou_per_class"] == pytest.approx({"Background": 0.8, "A": 0.4, "B": 0.5})
    assert result["confusion"] == [[4, 0, 0], [1, 2, 1], [0, 1, 2]]
    assert result["image_level_miou"] is None


def test_image_level_adds_a_figure_and_keeps_the_dataset_headline(tiny, caplog):
    data, _, pred = tiny
    rows = [[name, str(cid), encode_mask(m == idx)] for name, m in pred.items() for idx, cid in ((1, 5), (2, 7))]
    sub = write_rows(data / "sub.csv", RLE_HEADER.split(","), rows)
    with caplog.at_level("INFO", logger="pipeline.score"):
        result = score(ScoreConfig(sub=str(sub), gt=str(data / "gt"), data_dir=str(data), image_level=True))
    assert result["miou"] == pytest.approx(TINY_MIOU) and result["dataset_miou"] == pytest.approx(TINY_MIOU)
    assert result["image_level_miou"] == pytest.approx(TINY_IMAGE_MIOU)
    assert TINY_IMAGE_MIOU != pytest.approx(TINY_MIOU)
    summary = [r.getMessage() for r in caplog.records if r.name == "pipeline.score" and "mIoU" in r.getMessage()]
    assert len(summary) == 1
    lines = summary[0].splitlines()
    assert lines[0] == f"mIoU (dataset level): {TINY_MIOU:.4f}"
    assert lines[-1] == f"mIoU (image level, extra): {TINY_IMAGE_MIOU:.4f}"


@pytest.mark.parametrize("factor", [1, 2])
def test_score_dense_equals_hand_computed_miou(tiny, factor):
    """At the image size, and at twice it (nearest upsampling of both maps scales every count by 4)."""
    data, _, pred = tiny
    size = [2 * factor, 3 * factor]
    rows = [
        [name, " ".join(map(str, np.kron(m, np.ones((factor, factor), np.uint8)).reshape(-1)))]
        for name, m in pred.items()
    ]
    sub = write_rows(data / "sub.csv", DENSE_HEADER.split(","), rows)
    result = score(ScoreConfig(sub=str(sub), gt=str(data / "gt"), data_dir=str(data), dense_size=size))
    assert result["miou"] == pytest.approx(TINY_MIOU)
    assert np.array(result["confusion"]).sum() == 11 * factor**2
    assert result["format"] == "dense" and "nearest" in result["scored_at"]


def test_score_refuses_an_invalid_submission(tiny):
    data, _, pred = tiny
    sub = write_rows(data / "sub.csv", RLE_HEADER.split(","), [["imgs/a.jpg", "5", "1 2"]])
    with pytest.raises(PipelineError, match="missing"):
        score(ScoreConfig(sub=str(sub), gt=str(data / "gt"), data_dir=str(data)))


@pytest.fixture()
def rule_gt(tmp_path):
    """One 10x12 image whose COCO ground truth differs by mask rule, and a submission equal to
    the ``polygon_length`` map: (data dir, gt file, submission, {rule: map})."""
    data = tmp_path / "data"
    data.mkdir()
    images = [{"id": 1, "file_name": "imgs/a.jpg", "height": 10, "width": 12}]
    cats = [{"id": 5, "name": "A"}, {"id": 7, "name": "B"}]
    (data / "test.json").write_text(json.dumps({"images": images, "categories": cats}))
    anns = [  # big box of 6 corners (12 coordinates, area 64), small box of 4 (8, area 9) inside it
        {
            "id": 1,
            "image_id": 1,
            "category_id": 5,
            "segmentation": [[0, 0, 4, 0, 8, 0, 8, 8, 0, 8, 0, 4]],
            "area": 64.0,
        },
        {"id": 2, "image_id": 1, "category_id": 7, "segmentation": [[2, 2, 5, 2, 5, 5, 2, 5]], "area": 9.0},
    ]
    gt = data / "gt.json"
    gt.write_text(json.dumps({"images": images, "categories": cats, "annotations": anns}))
    maps = {"area": np.zeros((10, 12), np.uint8)}
    maps["area"][0:8, 0:8] = 1
    maps["polygon_length"] = maps["area"].copy()
    maps["area"][2:5, 2:5] = 2  # area: the small box on top; polygon_length: the longer polygon on top
    rows = [["imgs/a.jpg", str(cid), encode_mask(maps["polygon_length"] == idx)] for idx, cid in ((1, 5), (2, 7))]
    sub = write_rows(data / "sub.csv", RLE_HEADER.split(","), rows)
    return data, gt, sub, maps


# the polygon_length map scored against the area map: Background 56/56, A 55/64, B 0/9
MISMATCH_MIOU = (1.0 + 55 / 64 + 0.0) / 3


@pytest.mark.parametrize("manifest", [None, {}, {"mask_rule": "area"}, {"mask_rule": "polygon_length"}])
def test_score_rasterizes_coco_ground_truth_with_the_manifest_rule(rule_gt, caplog, manifest):
    data, gt, sub, _ = rule_gt
    if manifest is not None:
        sub.with_suffix(".json").write_text(json.dumps({"format": "rle", **manifest}))
    rule = (manifest or {}).get("mask_rule", "area")
    with caplog.at_level("INFO", logger="pipeline.score"):
        result = score(ScoreConfig(sub=str(sub), gt=str(gt), data_dir=str(data)))
    assert result["mask_rule"] == rule
    assert result["miou"] == pytest.approx(1.0 if rule == "polygon_length" else MISMATCH_MIOU)
    source = result["mask_rule_source"]
    assert (
        ("manifest" in source and str(sub.with_suffix(".json")) in source)
        if "mask_rule" in (manifest or {})
        else source.startswith("default")
    )
    logged = [r.getMessage() for r in caplog.records if r.name == "pipeline.score" and "mask rule" in r.getMessage()]
    assert logged and f"mask rule {rule!r}" in logged[0] and source in logged[0]


def test_score_mask_rule_option_overrides_the_manifest(rule_gt):
    data, gt, sub, _ = rule_gt
    sub.with_suffix(".json").write_text(json.dumps({"mask_rule": "polygon_length"}))
    result = score(ScoreConfig(sub=str(sub), gt=str(gt), data_dir=str(data), mask_rule="area"))
    assert result["mask_rule"] == "area" and result["mask_rule_source"] == "mask_rule="
    assert result["miou"] == pytest.approx(MISMATCH_MIOU)
    sub.with_suffix(".json").unlink()
    result = score(ScoreConfig(sub=str(sub), gt=str(gt), data_dir=str(data), mask_rule="polygon_length"))
    assert result["miou"] == pytest.approx(1.0) and result["mask_rule"] == "polygon_length"


def test_score_refuses_an_unknown_mask_rule(rule_gt):
    from pipeline.core.config import ConfigError

    data, gt, sub, _ = rule_gt
    sub.with_suffix(".json").write_text(json.dumps({"mask_rule": "biggest"}))
    with pytest.raises(PipelineError, match="unknown mask_rule 'biggest'.*area, polygon_length"):
        score(ScoreConfig(sub=str(sub), gt=str(gt), data_dir=str(data)))
    with pytest.raises(ConfigError, match="mask_rule: unknown 'biggest'"):
        score(ScoreConfig(sub=str(sub), gt=str(gt), data_dir=str(data), mask_rule="biggest"))


def test_png_ground_truth_ignores_the_manifest_rule(tiny):
    data, _, pred = tiny
    rows = [[name, str(cid), encode_mask(m == idx)] for name, m in pred.items() for idx, cid in ((1, 5), (2, 7))]
    sub = write_rows(data / "sub.csv", RLE_HEADER.split(","), rows)
    sub.with_suffix(".json").write_text("{not json")  # never read: PNG maps need no rule
    result = score(ScoreConfig(sub=str(sub), gt=str(data / "gt"), data_dir=str(data)))
    assert result["miou"] == pytest.approx(TINY_MIOU) and result["mask_rule"] is None


@pytest.mark.parametrize("fmt", ["rle", "dense"])
def test_perfect_submission_scores_one(valid, demo_data, tmp_path, fmt):
    test, rle, dense = valid
    header, rows = (RLE_HEADER, rle) if fmt == "rle" else (DENSE_HEADER, dense)
    sub = write_rows(tmp_path / "perfect.csv", header.split(","), rows)
    result = score(ScoreConfig(sub=str(sub), gt=str(demo_data / "test_gt.json"), data_dir=str(demo_data)))
    assert result["miou"] == pytest.approx(1.0)
    assert result["format"] == fmt
    assert all(v is None or v == pytest.approx(1.0) for v in result["iou_per_class"].values())


def test_stores_at_the_image_size_are_read_without_resizing(setup, tmp_path):
    """uint8 stores at each image's own size (the fast path) give the same maps as ProbReader.load."""
    data, test, _ = setup
    rng = np.random.default_rng(3)
    run_dir = tmp_path / "full"
    for f in range(2):
        with ProbWriter(run_dir / f"fold{f}" / "test_none", test.class_names, dtype="uint8") as w:
            for im in test.images:
                p = rng.random((test.num_classes, int(im["height"]), int(im["width"])), dtype=np.float32)
                w.write(
                    int(im["id"]), im["file_name"], int(im["height"]), int(im["width"]), p / p.sum(0, keepdims=True)
                )
    submit(submit_cfg(setup, tmp_path, runs=[str(run_dir)], format="dense", dense_size=[64, 96]))
    readers = [ProbReader(run_dir / f"fold{f}" / "test_none") for f in range(2)]
    rows = read_rows(tmp_path / "sub.csv")[1:]
    for im, (_name, text) in zip(test.images, rows, strict=False):
        expected = np.mean([r.load(im["id"]).numpy() for r in readers], axis=0).argmax(0)
        np.testing.assert_array_equal(np.array(text.split(), dtype=np.int64).reshape(64, 96), expected)


def test_submit_config_is_checked_by_the_generic_hook():
    """The layering function calls ``validate()`` on every config, submit's included."""
    from pipeline.core.config import ConfigError, build_config

    with pytest.raises(ConfigError, match="plain file name"):
        build_config(SubmitConfig, overrides=["name=a/b"])
    with pytest.raises(ConfigError, match="either ensemble"):
        build_config(SubmitConfig, overrides=["ensemble=e.yaml", "runs=runs/x"])
    assert build_config(SubmitConfig, overrides=["check=false"]).check is False
    with pytest.raises(PipelineError, match="postprocess: unknown 'crf9'"):
        build_config(SubmitConfig, overrides=["postprocess=crf9"])


def test_stores_mask_rule_reads_the_runs_rule_and_refuses_a_mix(tmp_path):
    from pipeline.data.store import stores_mask_rule

    names = ["Background", "a"]
    for folder, rule in (("old", None), ("p1", "polygon_length"), ("p2", "polygon_length"), ("a", "area")):
        info = {} if rule is None else {"mask_rule": rule}
        with ProbWriter(tmp_path / folder, names, "float16", info) as w:
            w.write(1, "x.jpg", 2, 2, np.full((2, 2, 2), 0.5, np.float32))
    assert stores_mask_rule([tmp_path / "old"]) == "area"  # written before the option existed
    assert stores_mask_rule([tmp_path / "p1", tmp_path / "p2"]) == "polygon_length"
    with pytest.raises(PipelineError, match="different mask rules"):
        stores_mask_rule([tmp_path / "p1", tmp_path / "a"])
