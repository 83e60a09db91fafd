"""The budget planner's inputs: the portfolio file, which recipes a run can use, the dataset fingerprint."""

from __future__ import annotations

import pytest

from pipeline.core.errors import ConfigError
from pipeline.planning.fingerprint import Fingerprint, fingerprint_of, read_fingerprint
from pipeline.planning.portfolio import read_portfolio, recipe_weights, usable


def test_the_shipped_portfolio_has_both_tiers_and_a_scratch_recipe():
    p = read_portfolio()
    cpu = p.tier("cpu")
    assert {r.tier for r in cpu} == {"cpu"} and any(r.scratch for r in cpu)
    gpu = p.tier("gpu")
    assert gpu[0].tier == "gpu" and gpu[-1].tier == "cpu"  # the GPU falls back on the small encoders
    assert len({r.family for r in gpu if r.tier == "gpu"}) >= 3
    assert all(r.gmacs_per_mpx > 0 and r.params_m > 0 for r in p.recipes)


def test_a_recipe_is_used_only_when_its_weights_resolve(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    p = read_portfolio()
    whole = next(r for r in p.recipes if r.pretrained)
    assert recipe_weights(whole, tmp_path, online=False) is None
    repo = tmp_path / "hf" / "hub" / f"models--{whole.pretrained.replace('/', '--')}"
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    cached = recipe_weights(whole, None, online=False)  # a cache as huggingface_hub lays it out
    assert cached is not None and cached.source == "pretrained" and cached.setting == whole.pretrained
    (repo / "snapshots" / "abc123" / "config.json").unlink()
    assert recipe_weights(whole, None, online=False) is None  # an empty snapshot holds no model
    (tmp_path / whole.pretrained.replace("/", "--")).mkdir()
    found = recipe_weights(whole, tmp_path, online=False)
    assert found is not None and found.path == str(tmp_path / whole.pretrained.replace("/", "--"))
    assert recipe_weights(whole, None, assume=True).source == "assumed"
    scratch = next(r for r in p.recipes if r.scratch)
    assert not recipe_weights(scratch, None).pretrained
    names = [r.name for r, _ in usable([whole, scratch], tmp_path)]
    assert names == [whole.name, scratch.name]


def test_a_bad_portfolio_names_the_file_and_the_recipe(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("recipes:\n  - {name: x, tier: tpu, family: unet, model: unet, encoder: resnet18}\n")
    with pytest.raises(ConfigError, match=r"p\.yaml.*'x'.*tier"):
        read_portfolio(bad)
    bad.write_text("recipes:\n  - {name: x, tier: cpu, family: unet, model: unet, encoder: resnet18, colour: 3}\n")
    with pytest.raises(ConfigError, match="unknown keys colour"):
        read_portfolio(bad)


def test_fingerprint_of_the_demo_data_and_from_a_file(demo_data, tmp_path):
    from pipeline.data import load_coco

    coco = load_coco(demo_data, "train_all.json")
    test = load_coco(demo_data, "test.json", require_annotations=False)
    fp = fingerprint_of(coco, test, coco.image_ids, rfs_threshold=0.5)
    assert fp.n_labelled == len(coco.images) and fp.n_test == len(test.images)
    assert fp.num_classes == coco.num_classes and fp.epoch_factor >= 1
    assert fp.n_val(5) + fp.n_train(5) == fp.n_labelled
    path = tmp_path / "fp.yaml"
    path.write_text("n_labelled: 3272\nn_test: 819\nsize: [512, 512]\nnum_classes: 11\n")
    assert read_fingerprint(path) == Fingerprint(3272, 819, (512, 512), 11, source=str(path))
    path.write_text("n_labelled: 3272\nsize: [512, 512]\nnum_classes: 11\n")
    with pytest.raises(ConfigError, match="missing: n_test"):
        read_fingerprint(path)
