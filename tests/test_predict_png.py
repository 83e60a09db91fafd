"""Viewable masks of the prediction stage: png=true beside a store, images=<folder>, bad files."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import small_train_config
from PIL import Image

from pipeline import train as train_stage
from pipeline.core.config import build_config
from pipeline.core.errors import PipelineError
from pipeline.core.layout import is_store
from pipeline.data import Preprocessing, build_transform, normalize
from pipeline.data.resize import resize_probs
from pipeline.data.store import ProbReader
from pipeline.engine.checkpoint import load_checkpoint_model
from pipeline.evaluation.visual import class_palette, palette_png
from pipeline.inference.mask_png import png_names
from pipeline.predict import PredictConfig, main, run


@pytest.fixture(scope="module")
def trained(demo_data_square, folds_file, tmp_path_factory):
    """(data_dir, run_dir) of a one-epoch unet-resnet18 run on fold 0."""
    runs = tmp_path_factory.mktemp("png_run")
    result = train_stage.run(small_train_config(demo_data_square, folds_file, runs, epochs=1, plot=False))
    return demo_data_square, result.run_dir


def cfg_for(trained, **kw) -> PredictConfig:
    data, run_dir = trained
    base = dict(run_dir=str(run_dir), data_dir=str(data), num_workers=0, progress=False, batch_size=3, amp="off")
    base.update(kw)
    return build_config(PredictConfig, overrides=base)


def read_png(path: Path) -> tuple[Image.Image, np.ndarray]:
    with Image.open(path) as im:
        im.load()
    return im, np.array(im)


def read_png_bytes(data: bytes) -> tuple[Image.Image, np.ndarray]:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im, np.array(im)


def check_legend_and_palette(folder: Path, class_names: list[str]) -> np.ndarray:
    """The legend is a PNG; classes.csv lists every class with its palette colour; returns the palette."""
    with Image.open(folder / "legend.png") as legend:
        assert legend.format == "PNG" and min(legend.size) > 20
    classes = pd.read_csv(folder / "classes.csv")
    assert list(classes["class_name"]) == class_names and list(classes["class_index"]) == list(range(len(class_names)))
    palette = classes[["r", "g", "b"]].to_numpy().astype(np.uint8)
    assert np.array_equal(palette, class_palette(len(class_names)))
    assert (palette[0] == 0).all() and len({tuple(c) for c in palette}) == len(class_names)
    return palette


def test_png_names_are_flat_and_distinct():
    names = ["batch_01_vt/0001.jpg", "batch_02_vt/0001.jpg", "a.jpg", "a.png", "A.JPG", "b/c.jpg", "b__c.png"]
    out = png_names(names)
    assert out[:2] == ["batch_01_vt__0001", "batch_02_vt__0001"]
    assert out[2:4] == ["a_jpg", "a_png"]
    assert all("/" not in n for n in out)
    assert len({n.casefold() for n in out}) == len(out)  # distinct even on a case-insensitive disk
    assert png_names(["x/y.jpg", "z.bmp"]) == ["x__y", "z"]


def test_palette_png_holds_class_indices_for_many_classes():
    palette = class_palette(40)
    labels = (np.arange(7 * 9).reshape(7, 9) % 40).astype(np.uint8)
    im, values = read_png_bytes(palette_png(labels, palette))
    assert im.mode == "P" and im.size == (9, 7)
    assert np.array_equal(values, labels)
    assert np.array_equal(np.array(im.getpalette()[: 40 * 3]).reshape(40, 3), palette)
    assert np.array_equal(class_palette(40), palette)  # fixed: the same colours every time
    with pytest.raises(ValueError, match="at most 256"):
        palette_png(labels, class_palette(300))


def test_png_on_split_test_writes_the_stores_argmax_at_each_images_size(trained, demo_data, tmp_path):
    # the non-square demo data (64x96) with the run's checkpoint; maps stored at half size as uint8
    store = run(
        cfg_for(
            trained,
            data_dir=str(demo_data),
            tta="hflip",
            png=True,
            store_scale=0.5,
            dtype="uint8",
            out_dir=str(tmp_path / "test_hflip"),
        )
    )
    folder = tmp_path / "test_hflip_png"
    assert is_store(store) and folder.is_dir() and not is_store(folder)
    test = json.loads((demo_data / "test.json").read_text())
    reader = ProbReader(store)
    index = pd.read_csv(folder / "index.csv")
    assert sorted(index["file_name"]) == sorted(im["file_name"] for im in test["images"])
    palette = check_legend_and_palette(folder, reader.class_names)
    for im in test["images"]:
        h, w = im["height"], im["width"]
        assert (h, w) == (64, 96) and reader.stored_size(im["id"]) == (32, 48)
        name = im["file_name"][: -len(".jpg")].replace("/", "__")
        label, values = read_png(folder / "labels" / f"{name}.png")
        assert label.mode == "P" and label.size == (w, h)
        assert np.array_equal(values, reader.load(im["id"], (h, w)).argmax(0).numpy())
        assert np.array_equal(np.array(label.getpalette()[: 11 * 3]).reshape(11, 3), palette)
        with Image.open(folder / "overlays" / f"{name}.jpg") as over:
            assert over.size == (w, h) and over.mode == "RGB"
            tinted = np.asarray(over, np.float32)
        # background pixels keep the image, foreground ones move towards their class colour
        image = cv2.cvtColor(cv2.imread(str(demo_data / im["file_name"])), cv2.COLOR_BGR2RGB).astype(np.float32)
        back = values == 0
        if back.any():
            assert np.abs(tinted[back] - image[back]).mean() < 12
        fg = ~back
        if fg.sum() > 50:
            colour = palette[values[fg]].astype(np.float32)
            assert np.abs(tinted[fg] - colour).mean() < np.abs(image[fg] - colour).mean()
        row = index.loc[index.file_name == im["file_name"]].iloc[0]
        assert (row.height, row.width, row.label, row.overlay) == (h, w, f"labels/{name}.png", f"overlays/{name}.jpg")


def test_png_on_split_val_beside_the_default_store(trained, tmp_path):
    data, run_dir = trained
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    store = run(cfg_for(trained, run_dir=str(copy), split="val", tta="none", png=True))
    assert store == copy / "oof_none"
    folder = copy / "oof_none_png"
    reader = ProbReader(store)
    labels = sorted((folder / "labels").glob("*.png"))
    assert len(labels) == len(reader) > 0 and len(list((folder / "overlays").glob("*.jpg"))) == len(reader)
    for row in pd.read_csv(folder / "index.csv").itertuples():
        label, values = read_png(folder / row.label)
        assert label.mode == "P" and label.size == (64, 64)
        assert np.array_equal(values, reader.load(row.image_id, (64, 64)).argmax(0).numpy())
    # png=false (the default) writes no PNGs
    run(cfg_for(trained, run_dir=str(copy), split="val", tta="hflip"))
    assert (copy / "oof_hflip").is_dir() and not (copy / "oof_hflip_png").exists()


def expected_labels(run_dir: Path, rgb: np.ndarray) -> np.ndarray:
    """The checkpoint's own prediction (no TTA) of an RGB image, at the image's size."""
    model, _, ckpt = load_checkpoint_model(run_dir / "best.pt")
    size = (int(ckpt["img_size"][0]), int(ckpt["img_size"][1]))
    x = normalize(build_transform("none", size)(image=rgb)["image"], Preprocessing.from_dict(ckpt["preprocessing"]))
    with torch.inference_mode():
        probs = model(x[None]).softmax(1)[0]
    return resize_probs(probs, rgb.shape[:2]).argmax(0).numpy()


def test_images_folder_writes_only_pngs_for_grey_and_non_square_images(trained, tmp_path):
    data, run_dir = trained
    src = cv2.cvtColor(cv2.imread(str(data / "batch_01_vt" / "0001.jpg")), cv2.COLOR_BGR2RGB)
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    grey = cv2.cvtColor(src, cv2.COLOR_RGB2GRAY)
    cv2.imwrite(str(folder / "grey.png"), grey)  # one channel on disk
    wide = cv2.resize(src, (150, 70), interpolation=cv2.INTER_AREA)
    cv2.imwrite(str(folder / "sub" / "wide.bmp"), cv2.cvtColor(wide, cv2.COLOR_RGB2BGR))
    tall = cv2.resize(src, (45, 100), interpolation=cv2.INTER_AREA)
    cv2.imwrite(str(folder / "sub" / "tall.JPG"), cv2.cvtColor(tall, cv2.COLOR_RGB2BGR))
    (folder / "notes.txt").write_text("not an image, not listed")
    (folder / ".hidden.jpg").write_bytes(b"hidden files are left out")

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    # sliding=off: every image resized to the trained size, as the reference prediction below
    out = run(cfg_for(trained, run_dir=str(copy), images=str(folder), tta="none", sliding="off"))
    assert out == copy / "png_photos_none"
    assert not (out / "meta.json").exists() and not list(out.glob("*.npy")) and not (copy / "test_none").exists()
    categories = json.loads((data / "test.json").read_text())["categories"]
    check_legend_and_palette(out, ["Background", *(c["name"] for c in categories)])
    index = pd.read_csv(out / "index.csv")
    assert sorted(index["file_name"]) == ["grey.png", "sub/tall.JPG", "sub/wide.bmp"]
    grey_rgb = np.repeat(grey[:, :, None], 3, axis=2)
    cases = {"grey": grey_rgb, "sub__wide": wide, "sub__tall": tall}
    for name, rgb in cases.items():
        h, w = rgb.shape[:2]
        label, values = read_png(out / "labels" / f"{name}.png")
        assert label.mode == "P" and label.size == (w, h)
        agree = (values == expected_labels(copy, rgb)).mean()
        assert agree > 0.99, (name, agree)
        with Image.open(out / "overlays" / f"{name}.jpg") as over:
            assert over.size == (w, h) and over.mode == "RGB"

    # the command line: flip TTA into out_dir; sliding=auto predicts the two images with a side
    # >= 1.5 x the trained 64 at their own size, window by window
    target = tmp_path / "cli_pngs"
    args = [f"run_dir={copy}", f"data_dir={data}", f"images={folder}", "tta=flip", "num_workers=0", "progress=false"]
    assert main([*args, f"out_dir={target}"]) == 0
    assert sorted(p.name for p in (target / "labels").iterdir()) == ["grey.png", "sub__tall.png", "sub__wide.png"]
    for name, rgb in cases.items():
        label, values = read_png(target / "labels" / f"{name}.png")
        assert label.mode == "P" and label.size == (rgb.shape[1], rgb.shape[0]) and values.max() < 11


def test_a_corrupt_or_missing_image_folder_names_the_problem(trained, tmp_path):
    data, _ = trained
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(data / "batch_01_vt" / "0001.jpg", folder / "good.jpg")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but then nothing")
    out = tmp_path / "never"
    with pytest.raises(PipelineError, match=r"broken\.png: image file cannot be decoded"):
        run(cfg_for(trained, images=str(folder), out_dir=str(out)))
    assert not out.exists()  # checked before anything is written

    (folder / "broken.png").unlink()
    (folder / "empty.jpg").write_bytes(b"")
    with pytest.raises(PipelineError, match=r"empty\.jpg"):
        run(cfg_for(trained, images=str(folder), out_dir=str(out)))

    empty = tmp_path / "no_images"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(PipelineError, match="no image files"):
        run(cfg_for(trained, images=str(empty), out_dir=str(out)))
    with pytest.raises(PipelineError, match="image folder not found"):
        run(cfg_for(trained, images=str(tmp_path / "absent"), out_dir=str(out)))
