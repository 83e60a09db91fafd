"""The image cache: rows equal what the training transform makes of the files, edited files are decoded
again, a batch normalised on its device equals the CPU's normalisation, and a run with the cache trains
exactly as one without it."""

from __future__ import annotations

import os
import pickle

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import small_train_config
from torch.utils.data import DataLoader

from pipeline.core.errors import ConfigError, DataError
from pipeline.data import MaskCache, SegmentationDataset, build_transform, collate, load_coco, read_image
from pipeline.data.image_cache import (
    CachedTrainingImages,
    DeviceBatches,
    ImageCache,
    _normalize_arithmetic,
    cache_bytes,
    normalize_batch,
)
from pipeline.data.transforms import IMAGENET, Preprocessing, normalize
from pipeline.engine.sampling import EpochSeededDataset
from pipeline.engine.trainer import Trainer

SIZE = (32, 64)


@pytest.fixture()
def data(demo_data, tmp_path):
    """A writable copy of the demo data (its images get edited)."""
    import shutil

    return shutil.copytree(demo_data, tmp_path / "data")


def test_rows_are_the_resized_files_and_maps_and_an_edited_file_is_decoded_again(data, tmp_path):
    coco = load_coco(data, "train_all.json")
    masks = MaskCache(coco, tmp_path / "cache")
    cache = ImageCache(coco, SIZE, tmp_path / "cache" / "images", masks).build(progress=False)
    assert cache.nbytes == cache_bytes(len(coco.image_ids), SIZE, coco.num_classes) == len(coco.image_ids) * 32 * 64 * 4
    resize = build_transform("none", SIZE)
    for image_id in coco.image_ids[:5]:
        meta = coco.image(image_id)
        want = resize(image=read_image(data / meta["file_name"]), mask=masks.get(image_id))
        image, mask = cache.pair(image_id)
        assert np.array_equal(image, want["image"]) and np.array_equal(mask, want["mask"])

    first, second = coco.image_ids[:2]
    name = data / coco.image(first)["file_name"]
    other = cv2.imread(str(data / coco.image(second)["file_name"]))
    cv2.imwrite(str(name), other)  # same size, other pixels
    os.utime(data / coco.image(second)["file_name"], ns=(1, 1))  # touched only: same content
    fresh = ImageCache(coco, SIZE, tmp_path / "cache" / "images", masks)
    before = fresh.pair(second)[0]
    fresh.build(progress=False)
    assert np.array_equal(fresh.pair(first)[0], resize(image=read_image(name))["image"])
    assert np.array_equal(fresh.pair(second)[0], before)

    (data / coco.image(first)["file_name"]).write_bytes(b"not an image")
    with pytest.raises(DataError, match=str(coco.image(first)["file_name"])):
        ImageCache(coco, SIZE, tmp_path / "cache" / "images", masks).build(progress=False)


def test_an_unfinished_or_foreign_cache_is_built_again(demo_data, tmp_path):
    coco = load_coco(demo_data, "train_all.json")
    cache = ImageCache(coco, SIZE, tmp_path / "images")
    cache.dir.mkdir(parents=True)
    (cache.dir / "images.npy").write_bytes(b"half")  # stopped before its index was written
    cache.build(progress=False)
    assert cache.pair(coco.image_ids[0])[0].shape == (*SIZE, 3)
    cache.index_path.write_text('{"version": -1, "files": []}')
    ImageCache(coco, SIZE, tmp_path / "images").build(progress=False)
    assert '"version": 1' in cache.index_path.read_text()
    other = ImageCache(coco, (64, 64), tmp_path / "images")
    assert other.dir != cache.dir and not other.built()


def test_a_batch_normalised_on_its_device_equals_the_cpu_normalisation(demo_data, tmp_path):
    coco = load_coco(demo_data, "train_all.json")
    cache = ImageCache(coco, SIZE, tmp_path / "images").build(progress=False)
    images = torch.stack([torch.from_numpy(cache.pair(i)[0]) for i in coco.image_ids[:4]])
    for prep in (IMAGENET, Preprocessing((0.5, 0.4, 0.3), (0.2, 0.25, 0.3), (0.0, 255.0), "test")):
        want = torch.stack([normalize(im.numpy(), prep) for im in images])
        assert torch.equal(normalize_batch(images, prep), want)  # the CPU's table look-up
        arithmetic = _normalize_arithmetic(images, prep.mean, prep.std, float(prep.input_range[1]))
        assert torch.equal(arithmetic, want)  # what a GPU computes


def test_cached_batches_equal_decoded_ones_through_workers(demo_data, tmp_path):
    coco = load_coco(demo_data, "train_all.json")
    masks = MaskCache(coco, tmp_path / "masks")
    cache = ImageCache(coco, SIZE, tmp_path / "images", masks).build(progress=False)
    assert pickle.loads(pickle.dumps(cache))._images is None  # workers map the files themselves
    ids, transform = coco.image_ids[:8], build_transform("light", SIZE)
    keys = [(3, i) for i in range(len(ids))]

    def batches(dataset, workers):
        return DataLoader(
            EpochSeededDataset(dataset, 7), batch_size=4, sampler=keys, collate_fn=collate, num_workers=workers
        )

    decoded = list(batches(SegmentationDataset(coco, ids, transform, masks), 0))
    cached = list(DeviceBatches(batches(CachedTrainingImages(cache, ids, transform), 1), torch.device("cpu"), IMAGENET))
    assert len(decoded) == len(cached) == 2
    for (x, m, meta), (xc, mc, metac) in zip(decoded, cached, strict=True):
        assert torch.equal(x, xc) and torch.equal(m, mc) and mc.dtype == torch.int64 and meta == metac


def test_a_run_with_the_cache_trains_exactly_as_one_without(demo_data_square, folds_file, tmp_path):
    histories = {}
    for flag in (False, True):
        cfg = small_train_config(
            demo_data_square, folds_file, tmp_path / f"runs-{flag}", image_cache=flag, epochs=1, max_train_batches=2
        )
        Trainer(cfg).fit()
        histories[flag] = pd.read_csv(next((tmp_path / f"runs-{flag}").rglob("metrics.csv")))
    assert any((tmp_path / "runs-True" / "cache" / "images").iterdir())
    assert not (tmp_path / "runs-False" / "cache" / "images").exists()
    pd.testing.assert_frame_equal(histories[False], histories[True], check_exact=True)


def test_the_cache_refuses_copy_paste_by_hand():
    from pipeline.core.config import build_config
    from pipeline.engine.train_config import TrainConfig

    with pytest.raises(ConfigError, match="image_cache=true with copy_paste"):
        build_config(TrainConfig, overrides={"image_cache": True, "copy_paste": 0.5})
    assert build_config(TrainConfig, overrides={"copy_paste": 0.5}).image_cache is None
