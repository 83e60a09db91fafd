"""Bad input, table-driven: every case is a clear error naming the file or value, and what was
written before stays byte-identical."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.core.config import build_config
from pipeline.core.errors import PipelineError
from pipeline.data import load_coco, load_folds, read_image
from pipeline.data.store import ProbReader, ProbWriter
from pipeline.engine.train_config import TrainConfig
from pipeline.inference.predictor import PredictConfig, predict
from pipeline.models import build_model
from pipeline.planning.budget import parse_budget
from pipeline.score import ScoreConfig
from pipeline.score import run as score
from pipeline.tuning.space import load_space


def coco_doc(**edit) -> dict:
    doc = {
        "images": [{"id": 1, "file_name": "a.jpg", "height": 4, "width": 4}],
        "categories": [{"id": 1, "name": "x"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": [[0, 0, 3, 0, 3, 3]], "area": 4}],
    }
    doc.update(edit)
    return doc


def write_json(tmp: Path, doc, name="train_all.json") -> Path:
    (tmp / name).write_text(json.dumps(doc) if not isinstance(doc, str) else doc)
    return tmp


def ann_case(doc) -> Callable[[Path, Path], None]:
    return lambda tmp, demo: load_coco(write_json(tmp, doc), "train_all.json")


def image_case(content: bytes | None, shape=(4, 4)) -> Callable[[Path, Path], None]:
    def act(tmp: Path, demo: Path) -> None:
        if content is not None:
            (tmp / "img.jpg").write_bytes(content)
        read_image(tmp / "img.jpg", shape)

    return act


def real_jpeg(h: int, w: int) -> bytes:
    import cv2

    return cv2.imencode(".jpg", np.zeros((h, w, 3), np.uint8))[1].tobytes()


def folds_case(text: str | None) -> Callable[[Path, Path], None]:
    def act(tmp: Path, demo: Path) -> None:
        if text is not None:
            (tmp / "folds.csv").write_text(text)
        load_folds(tmp / "folds.csv", load_coco(demo))

    return act


def config_case(overrides=None, text: str | None = None) -> Callable[[Path, Path], None]:
    def act(tmp: Path, demo: Path) -> None:
        if text is not None:
            (tmp / "c.yaml").write_text(text)
        build_config(TrainConfig, tmp / "c.yaml" if text is not None else None, overrides or {})

    return act


def space_case(text: str) -> Callable[[Path, Path], None]:
    def act(tmp: Path, demo: Path) -> None:
        (tmp / "space.yaml").write_text(text)
        load_space(tmp / "space.yaml")

    return act


def fake_run(tmp: Path, demo: Path, classes: list[str] | None = None, corrupt: bool = False) -> Path:
    from pipeline.core.config import to_dict
    from pipeline.models import build_model

    run_dir = tmp / "runs" / "x" / "fold0"
    run_dir.mkdir(parents=True)
    coco = load_coco(demo)
    names = classes or coco.class_names
    if corrupt:
        (run_dir / "best.pt").write_bytes(b"not a checkpoint")
        return run_dir
    model = build_model("unet", len(names), encoder="resnet18")
    cfg = TrainConfig(data_dir=str(demo), model="unet", encoder="resnet18")
    torch.save(
        {
            "model": model.state_dict(),
            "config": to_dict(cfg),
            "num_classes": len(names),
            "class_names": names,
            "img_size": [64, 64],
            "epoch": 0,
        },
        run_dir / "best.pt",
    )
    return run_dir


def checkpoint_case(**kw) -> Callable[[Path, Path], None]:
    def act(tmp: Path, demo: Path) -> None:
        run_dir = fake_run(tmp, demo, **kw)
        predict(PredictConfig(run_dir=str(run_dir), data_dir=str(demo), tta="none", progress=False, num_workers=0))

    return act


def store_case(drop_index: bool = False, bad_shape: bool = False) -> Callable[[Path, Path], None]:
    def act(tmp: Path, demo: Path) -> None:
        with ProbWriter(tmp / "store", ["Background", "x"]) as w:
            w.write(1, "a.jpg", 4, 4, np.full((2, 4, 4), 0.5, np.float32))
        if drop_index:
            (tmp / "store" / "index.csv").unlink()
        if bad_shape:
            np.save(tmp / "store" / "1.npy", np.zeros((3, 4, 4), np.float16))
        ProbReader(tmp / "store").load(1)

    return act


def submission_case(edit: Callable[[list[str]], list[str]]) -> Callable[[Path, Path], None]:
    def act(tmp: Path, demo: Path) -> None:
        test = load_coco(demo, "test.json", require_annotations=False)
        rows = ["image_id,class_id,EncodedPixels"]
        rows += [f"{im['file_name']},{c['id']}," for im in test.images for c in test.categories]
        (tmp / "sub.csv").write_text("\n".join(edit(rows)) + "\n")
        score(ScoreConfig(sub=str(tmp / "sub.csv"), gt=str(demo / "test_gt.json"), data_dir=str(demo)))

    return act


CASES: dict[str, tuple[Callable[[Path, Path], None], str]] = {
    # images
    "image: undecodable": (image_case(b"not a jpeg"), r"img\.jpg: image file cannot be decoded"),
    "image: missing": (image_case(None), r"img\.jpg: image file not found"),
    "image: size differs from the JSON": (image_case(real_jpeg(5, 4)), r"img\.jpg: real size 4x5"),
    # annotation files
    "annotations: invalid JSON": (ann_case('{"images": ['), r"train_all\.json: invalid JSON"),
    "annotations: no categories": (
        ann_case(coco_doc(categories=None)),
        r"train_all\.json: missing or invalid 'categories'",
    ),
    "annotations: empty categories": (
        ann_case(coco_doc(categories=[])),
        r"train_all\.json: the category list is empty",
    ),
    "annotations: unknown image id": (
        ann_case(
            coco_doc(annotations=[{"id": 9, "image_id": 7, "category_id": 1, "segmentation": [[0, 0, 1, 0, 1, 1]]}])
        ),
        r"train_all\.json: annotation 9 points to unknown image id 7",
    ),
    "annotations: RLE of another size": (
        ann_case(
            coco_doc(
                annotations=[
                    {"id": 2, "image_id": 1, "category_id": 1, "segmentation": {"size": [5, 5], "counts": [25]}}
                ]
            )
        ),
        r"train_all\.json: annotation 2 has an RLE of size",
    ),
    "annotations: non-numeric height": (
        ann_case(coco_doc(images=[{"id": 1, "file_name": "a.jpg", "height": "tall", "width": 4}])),
        r"train_all\.json: height of image 1 must be an integer",
    ),
    "annotations: duplicate image ids": (
        ann_case(coco_doc(images=[{"id": 1, "file_name": "a.jpg", "height": 4, "width": 4}] * 2)),
        r"train_all\.json: duplicate image ids",
    ),
    # fold files
    "folds: missing": (folds_case(None), r"folds\.csv: folds file not found"),
    "folds: no fold column": (
        folds_case("image_id,x\n1,2\n"),
        r"folds\.csv: folds CSV needs columns image_id and fold",
    ),
    "folds: another annotation file": (folds_case("image_id,fold\n999999,0\n"), r"folds\.csv: folds do not match"),
    # configs
    "config: unknown key": (config_case({"learning_rate": 1}), r"unknown key\(s\) learning_rate"),
    "config: wrong type": (config_case({"epochs": "many"}), r"epochs: expected an integer, got 'many'"),
    "config: invalid YAML": (config_case(text="lr: [1, 2\n"), r"c\.yaml: invalid YAML"),
    "config: base cycle": (config_case(text="base: c.yaml\n"), r"cycle"),
    "config: unknown model": (lambda tmp, demo: build_model("unett", 3), None),
    # search spaces
    "space: unknown key": (
        space_case("learning_rate: {type: float, low: 0.1, high: 0.2}\n"),
        r"space\.yaml: unknown key",
    ),
    "space: bad range": (space_case("lr: {type: float, low: 0.2, high: 0.1}\n"), r"space\.yaml: lr"),
    # checkpoints
    "checkpoint: corrupt": (checkpoint_case(corrupt=True), r"best\.pt: unreadable checkpoint"),
    "checkpoint: other classes": (
        checkpoint_case(classes=["Background", "a", "b"]),
        r"differ from those of the checkpoint",
    ),
    # probability stores
    "store: no index": (store_case(drop_index=True), r"index\.csv: probability store file not found"),
    "store: array of another shape": (store_case(bad_shape=True), r"1\.npy: probabilities of shape \(3, 4, 4\)"),
    # submissions
    "submission: wrong header": (submission_case(lambda r: ["id,class,pixels", *r[1:]]), r"sub\.csv"),
    "submission: an image missing": (submission_case(lambda r: r[:-10]), r"sub\.csv"),
    "submission: runs out of the image": (submission_case(lambda r: [r[0], r[1] + "1 99999999", *r[2:]]), r"sub\.csv"),
    # budgets
    "budget: words": (lambda tmp, demo: parse_budget("soon"), r"BUDGET='soon'"),
    "budget: negative": (lambda tmp, demo: parse_budget("-5m"), r"BUDGET='-5m'"),
}


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_a_clear_error_and_leaves_earlier_outputs_alone(case, demo_data, tmp_path):
    act, message = CASES[case]
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    work = tmp_path / "work"
    work.mkdir()
    (work / "earlier.csv").write_text("an earlier output\n")
    before = snapshot(data)
    with pytest.raises(PipelineError) as err:
        act(work, data)
    text = str(err.value)
    if message is not None:
        assert __import__("re").search(message, text), text
    else:
        assert "unett" in text and "unet" in text.split("unett", 1)[1]  # names the value and the valid names
    assert (work / "earlier.csv").read_text() == "an earlier output\n"
    assert snapshot(data) == before and not list(tmp_path.rglob(".*.tmp"))


def test_the_table_covers_enough_cases_and_kinds():
    kinds = {name.split(":")[0] for name in CASES}
    assert len(CASES) >= 25 and len(kinds) >= 8
