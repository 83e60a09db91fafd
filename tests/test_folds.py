"""k-fold stage: coverage, grouping, rare-class spread, balance table, determinism, errors."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest
from test_similarity import make_sequences

from pipeline.core.config import ConfigError
from pipeline.data import DataError, iterative_stratification, load_coco, load_folds
from pipeline.folds import FoldsConfig, main, run


def test_every_image_exactly_once_and_balance_files(demo_data, tmp_path):
    table = run(FoldsConfig(data_dir=str(demo_data), out_dir=str(tmp_path), k=4, seed=3, cache_dir=str(tmp_path / "c")))
    coco = load_coco(demo_data)
    saved = pd.read_csv(tmp_path / "folds.csv")
    assert sorted(saved["image_id"]) == sorted(coco.image_ids)
    assert saved["image_id"].is_unique
    assert set(saved["fold"]) == {0, 1, 2, 3}
    assert {"image_id", "file_name", "group", "fold"} <= set(saved.columns)
    assert [c for c in saved.columns if c.startswith("has_")] == [f"has_{n}" for n in coco.class_names[1:]]
    # presence columns agree with the annotations
    for _, row in saved.iterrows():
        cats = {a["category_id"] for a in coco.annotations(int(row.image_id))}
        names = {c["name"] for c in coco.categories if c["id"] in cats}
        assert {n for n in coco.class_names[1:] if row[f"has_{n}"]} == names
    assert len(table) == len(coco.images)

    balance = pd.read_csv(tmp_path / "folds_balance.csv")
    assert len(balance) == 4 * (coco.num_classes - 1)
    # pixel shares of one fold sum to at most 1 (Background is the rest)
    for _, g in balance.groupby("fold"):
        assert 0 < g["pixel_share"].sum() <= 1.0
    inst = balance.groupby("class")["instances"].sum()
    for c in coco.categories:
        n = sum(1 for anns in coco.anns_by_image.values() for a in anns if a["category_id"] == c["id"])
        assert inst[c["name"]] == n
    meta = json.loads((tmp_path / "folds_meta.json").read_text())
    assert meta["k"] == 4 and meta["ann_digest"] == coco.digest
    assert 0 <= meta["max_image_share_deviation"] < 0.5


def test_same_seed_same_folds_other_seed_differs(demo_data, tmp_path):
    a = run(FoldsConfig(data_dir=str(demo_data), out_dir=str(tmp_path / "a"), k=3, seed=1, pixel_stats=False))
    b = run(FoldsConfig(data_dir=str(demo_data), out_dir=str(tmp_path / "b"), k=3, seed=1, pixel_stats=False))
    c = run(FoldsConfig(data_dir=str(demo_data), out_dir=str(tmp_path / "c"), k=3, seed=2, pixel_stats=False))
    assert (a["fold"] == b["fold"]).all()
    assert not (a["fold"] == c["fold"]).all()


def test_groups_never_split(demo_data, tmp_path):
    groups = pd.DataFrame({"file_name": [im["file_name"] for im in load_coco(demo_data).images]})
    groups["group"] = [f"g{i // 3}" for i in range(len(groups))]  # 8 groups of 3 images
    groups.to_csv(tmp_path / "groups.csv", index=False)
    table = run(
        FoldsConfig(
            data_dir=str(demo_data),
            out_dir=str(tmp_path),
            k=4,
            groups_csv=str(tmp_path / "groups.csv"),
            pixel_stats=False,
        )
    )
    assert (table.groupby("group")["fold"].nunique() == 1).all()
    assert table["fold"].nunique() == 4

    by_folder = run(
        FoldsConfig(data_dir=str(demo_data), out_dir=str(tmp_path / "f"), k=2, group_by="folder", pixel_stats=False)
    )
    assert (by_folder.groupby("group")["fold"].nunique() == 1).all()
    with pytest.raises(ConfigError, match="groups"):
        run(
            FoldsConfig(data_dir=str(demo_data), out_dir=str(tmp_path / "g"), k=5, group_by="folder", pixel_stats=False)
        )


@pytest.fixture(scope="module")
def sequences(tmp_path_factory):
    return make_sequences(tmp_path_factory.mktemp("sequences") / "data")


def test_group_by_similar_keeps_look_alike_images_in_one_fold(sequences, tmp_path, caplog):
    root, truth = sequences
    caplog.set_level(logging.INFO, logger="pipeline.folds")
    common = dict(data_dir=str(root), k=4, seed=0, cache_dir=str(tmp_path / "c"), pixel_stats=False)
    table = run(FoldsConfig(out_dir=str(tmp_path / "similar"), group_by="similar", **common))
    fold_of = dict(zip(table["image_id"], table["fold"], strict=True))
    assert all(len({fold_of[i] for i in group}) == 1 for group in truth)
    assert table["fold"].nunique() == 4
    assert table["group"].nunique() == len(truth) == 8 + 16
    grouping = json.loads((tmp_path / "similar" / "folds_meta.json").read_text())["grouping"]
    assert grouping["method"] == "similar" and grouping["threshold"] == 20 and grouping["descriptor"] == "phash+dhash"
    assert grouping["multi_image_groups"] == 8 and grouping["largest_group"] == 4 and grouping["refused_merges"] == 0
    assert "grouping similar: 24 groups for 44 images, 8 with more than one image, the largest 4 images" in caplog.text
    # without the grouping some sequence is split across folds: the leak this prevents
    plain = run(FoldsConfig(out_dir=str(tmp_path / "plain"), **common))
    fold_of = dict(zip(plain["image_id"], plain["fold"], strict=True))
    assert any(len({fold_of[i] for i in group}) > 1 for group in truth)
    assert json.loads((tmp_path / "plain" / "folds_meta.json").read_text())["grouping"]["method"] is None
    # a stricter threshold is recorded (the strict near-duplicate bound follows it down)
    run(FoldsConfig(out_dir=str(tmp_path / "t"), group_by="similar", similarity_threshold=6, **common))
    grouping = json.loads((tmp_path / "t" / "folds_meta.json").read_text())["grouping"]
    assert grouping["threshold"] == 6 == grouping["strict"] and grouping["multi_image_groups"] <= 8


def test_rare_classes_reach_every_fold_when_possible():
    rng = np.random.default_rng(0)
    n, k = 200, 5
    labels = (rng.random((n, 6)) < [0.6, 0.5, 0.3, 0.2, 0.03, 0.025]).astype(int)
    labels[rng.choice(n, 5, replace=False), 5] = 1  # at least 5 images with the rarest class
    folds = iterative_stratification(labels, k, seed=0)
    assert np.bincount(folds, minlength=k).min() >= n // k - 3
    for c in range(labels.shape[1]):
        assert len(set(folds[labels[:, c] == 1])) == k, f"class {c} missing from a fold"
        # and no fold holds much more than its share
        counts = np.bincount(folds[labels[:, c] == 1], minlength=k)
        assert counts.max() - counts.min() <= 2


def test_load_folds_checks_the_annotation_file(demo_data, tmp_path):
    run(FoldsConfig(data_dir=str(demo_data), out_dir=str(tmp_path), k=3, pixel_stats=False))
    coco = load_coco(demo_data)
    assert len(load_folds(tmp_path / "folds.csv", coco)) == len(coco.images)
    table = pd.read_csv(tmp_path / "folds.csv")
    table.iloc[1:].to_csv(tmp_path / "short.csv", index=False)
    with pytest.raises(DataError, match="short.csv.*without a fold"):
        load_folds(tmp_path / "short.csv", coco)
    with pytest.raises(DataError, match="missing.csv: folds file not found"):
        load_folds(tmp_path / "missing.csv", coco)
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="bad.csv: folds CSV needs columns"):
        load_folds(tmp_path / "bad.csv", coco)


def test_cli_rejects_bad_settings(demo_data, tmp_path, caplog):
    assert main([f"data_dir={demo_data}", f"out_dir={tmp_path}", "k=1"]) == 2
    assert "k must be at least 2" in caplog.text
    assert main([f"data_dir={demo_data}", f"out_dir={tmp_path}", "kk=3"]) == 2
    assert "unknown key(s) kk" in caplog.text and "known keys" in caplog.text
    assert main([f"data_dir={demo_data}", f"out_dir={tmp_path}", "group_by=similars"]) == 2
    assert "group_by must be null, 'folder' or 'similar'" in caplog.text
    assert main([f"data_dir={demo_data}", f"out_dir={tmp_path}", "group_by=similar", "similarity_max_group=1"]) == 2
    assert "max_group must be at least 2" in caplog.text
    assert not (tmp_path / "folds.csv").exists()
