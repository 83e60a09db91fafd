"""Submission writer, validator and scorer: formats, atomic writes, every validator defect, exact scores."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline import submit as submit_stage
from pipeline.data import load_coco
from pipeline.probs import ProbReader, ProbWriter
from pipeline.rle import decode_label_map, encode_mask
from pipeline.score import ScoreConfig
from pipeline.score import run as score
from pipeline.submit import SubmitConfig, dense_row, rle_rows
from pipeline.submit import run as submit
from pipeline.utils import PipelineError
from pipeline.validate import ValidateConfig, resize_nearest, validate_submission
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
        np.testing.assert_array_equal(values.reshape(256, 256), resize_nearest(expected[name].astype(np.uint8), (256, 256)))


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
    monkeypatch.setattr(submit_stage, "rle_rows", lambda name, labels, coco, order: [[name, "999", ""]])
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
        return rows, header, f"pixel 5 is claimed by class ids {rows[first + 1][1]} (line {line + 1}) and {rows[first + 4][1]}", name, line + 4
    raise AssertionError(defect)


RLE_DEFECTS = ["wrong header", "missing image", "extra image", "duplicate row", "unknown class id", "odd number of values",
               "unsorted runs", "overlapping runs", "run past the image end", "pixel claimed by two classes"]


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
        message = f"value {256 * 5 + 8} (row 5, column 7) is {test.num_classes}, outside the class indices [0, {test.num_classes})"
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
    images = [{"id": 1, "file_name": "imgs/a.jpg", "height": 2, "width": 3},
              {"id": 2, "file_name": "imgs/b.jpg", "height": 2, "width": 3}]
    cats = [{"id": 5, "name": "A"}, {"id": 7, "name": "B"}]
    (data / "test.json").write_text(json.dumps({"images": images, "categories": cats}))
    gt = {"imgs/a.jpg": np.array([[0, 1, 1], [2, 2, 0]], np.uint8), "imgs/b.jpg": np.array([[1, 1, 255], [0, 0, 2]], np.uint8)}
    pred = {"imgs/a.jpg": np.array([[0, 1, 0], [2, 1, 0]], np.uint8), "imgs/b.jpg": np.array([[1, 2, 2], [0, 0, 2]], np.uint8)}
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
    image_level = score(ScoreConfig(sub=str(sub), gt=str(data / "gt"), data_dir=str(data), image_level=True))
    assert image_level["miou"] == pytest.approx(TINY_IMAGE_MIOU) and image_level["dataset_miou"] == pytest.approx(TINY_MIOU)


@pytest.mark.parametrize("factor", [1, 2])
def test_score_dense_equals_hand_computed_miou(tiny, factor):
    """At the image size, and at twice it (nearest upsampling of both maps scales every count by 4)."""
    data, _, pred = tiny
    size = [2 * factor, 3 * factor]
    rows = [[name, " ".join(map(str, np.kron(m, np.ones((factor, factor), np.uint8)).reshape(-1)))] for name, m in pred.items()]
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
                w.write(int(im["id"]), im["file_name"], int(im["height"]), int(im["width"]), p / p.sum(0, keepdims=True))
    submit(submit_cfg(setup, tmp_path, runs=[str(run_dir)], format="dense", dense_size=[64, 96]))
    readers = [ProbReader(run_dir / f"fold{f}" / "test_none") for f in range(2)]
    rows = read_rows(tmp_path / "sub.csv")[1:]
    for im, (name, text) in zip(test.images, rows):
        expected = np.mean([r.load(im["id"]).numpy() for r in readers], axis=0).argmax(0)
        np.testing.assert_array_equal(np.array(text.split(), dtype=np.int64).reshape(64, 96), expected)
