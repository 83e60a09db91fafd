"""Copy-paste of rare-class objects and repeat-factor sampling."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.data import MaskCache, load_coco
from pipeline.data.copypaste import CopyPaste, ObjectBank, class_image_counts, repeat_factors, resolve_classes
from pipeline.engine.sampling import EpochShuffleSampler


@pytest.fixture(scope="module")
def split(demo_data_square, folds_file, tmp_path_factory):
    coco = load_coco(demo_data_square)
    folds = pd.read_csv(folds_file)
    val = set(folds.loc[folds.fold == 0, "image_id"].astype(int))
    train = [i for i in coco.image_ids if i not in val]
    return coco, train, sorted(val), MaskCache(coco, tmp_path_factory.mktemp("cache"))


def test_the_bank_takes_visible_pixels_of_training_images_only(split):
    coco, train, val, cache = split
    classes = resolve_classes(coco, train, None, rarest=3)
    counts = class_image_counts(coco, train)
    assert len(classes) == 3 and all(counts[c] > 0 for c in classes)
    assert max(counts[c] for c in classes) <= min(
        counts[c] for c in range(1, coco.num_classes) if c not in classes and counts[c]
    )
    bank = ObjectBank(coco, train, classes, cache)
    assert len(bank) > 0 and {o.source for o in bank.objects} <= set(train)
    for obj in bank.objects:
        gt = cache.get(obj.source)
        assert obj.label in classes and obj.mask.any()
        assert (gt == obj.label).sum() >= obj.mask.sum()  # only pixels the mask rule left visible


def test_pasted_objects_are_on_top_and_aligned(split):
    coco, train, _, cache = split
    bank = ObjectBank(coco, train, resolve_classes(coco, train, None, 3), cache)
    cp = CopyPaste(bank, p=1.0, max_objects=1, scale=(1.0, 1.0))
    image = np.zeros((64, 64, 3), np.uint8)
    mask = np.full((64, 64), 7, np.uint8)  # everything is another class: pasted pixels must win
    np.random.seed(3)
    out_img, out_mask = cp(image, mask)
    assert mask.min() == 7 and image.max() == 0  # inputs untouched
    pasted = out_mask != 7
    assert pasted.any() and len(np.unique(out_mask[pasted])) == 1
    label = int(np.unique(out_mask[pasted])[0])
    assert label in bank.classes
    # the image changed exactly where the mask did (objects are never pure black in the demo data)
    changed = out_img.any(axis=2)
    assert (changed <= pasted).all() and changed.sum() >= 0.9 * pasted.sum()
    np.random.seed(3)
    again = cp(image, mask)
    assert np.array_equal(again[0], out_img) and np.array_equal(again[1], out_mask)  # seeded per sample


def test_no_paste_when_p_is_zero_and_unknown_class_names(split):
    coco, train, _, cache = split
    cp = CopyPaste(ObjectBank(coco, train, [1], cache), p=0.0)
    image, mask = np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8)
    assert cp(image, mask)[0] is image
    with pytest.raises(Exception, match="unknown"):
        resolve_classes(coco, train, ["Unobtainium"], 3)


def test_repeat_factor_sampling(split):
    coco, train, _, _ = split
    r = repeat_factors(coco, train, threshold=0.3)
    assert (r >= 1).all() and r.max() > 1
    sampler = EpochShuffleSampler(len(train), seed=0, repeats=r)
    counts = np.zeros(len(train))
    for epoch in range(200):
        sampler.set_epoch(epoch)
        drawn = [i for _, i in sampler]
        assert len(drawn) == len(sampler) == round(r.sum())
        np.add.at(counts, drawn, 1)
    np.testing.assert_allclose(counts / 200, r, atol=0.15)  # each image r times per epoch on average
