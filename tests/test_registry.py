"""One registry shape for everything made by name."""

from __future__ import annotations

import pytest

from pipeline.core.errors import UnknownNameError
from pipeline.core.records import PostprocessRecord
from pipeline.core.registry import Registry
from pipeline.data import AUGMENTATIONS, MASK_RULES
from pipeline.engine.optim import OPTIMIZERS, SCHEDULERS
from pipeline.inference.ensemble import METHODS
from pipeline.inference.postprocessing import POSTPROCESSORS, apply_postprocess
from pipeline.inference.postprocessing.min_area import remove_small_regions
from pipeline.inference.tta import TTA_SETS
from pipeline.models.losses import LOSSES
from pipeline.models.registry import model_registry

ALL = {
    "model": model_registry(),
    "loss": LOSSES,
    "TTA set": TTA_SETS,
    "augmentation": AUGMENTATIONS,
    "scheduler": SCHEDULERS,
    "optimizer": OPTIMIZERS,
    "ensemble method": METHODS,
    "mask rule": MASK_RULES,
    "post-processor": POSTPROCESSORS,
}


@pytest.mark.parametrize("kind", sorted(ALL))
def test_every_registry_has_the_one_shape(kind):
    reg = ALL[kind]
    assert isinstance(reg, Registry) and reg.kind == kind and len(reg) >= 1
    for name, description in reg.describe():
        assert callable(reg.get(name)) and description, name
        assert reg.key(name.upper()) == name  # case-insensitive
    first = reg.names()[0]
    with pytest.raises(UnknownNameError) as err:
        reg.get(first + "x")
    message = str(err.value)
    assert f"unknown {kind} '{first}x'" in message and f"did you mean {first}" in message
    assert "known: " + ", ".join(reg.names()) in message


def test_aliases_and_duplicates():
    reg = Registry("thing")
    reg.add("alpha", lambda: 1, "first", aliases=("a",))
    assert reg.get("A")() == 1 and "a" in reg and reg.key("a") == "alpha"
    with pytest.raises(ValueError, match="registered twice"):
        reg.add("ALPHA", lambda: 2)
    assert (
        model_registry().key("unet++") == "unetplusplus" and model_registry().key("fcn_resnet50") == "tv_fcn_resnet50"
    )


def test_identity_post_processor_and_unknown_name():
    import numpy as np

    labels = np.array([[0, 1], [2, 1]])
    assert apply_postprocess(PostprocessRecord("none"), labels) is labels and apply_postprocess(None, labels) is labels
    assert POSTPROCESSORS.get("none")({}, labels) is labels
    with pytest.raises(UnknownNameError, match="post-processor"):
        apply_postprocess(PostprocessRecord("crf9"), labels)


def test_min_area_gives_small_regions_to_the_surrounding_majority():
    import numpy as np

    labels = np.ones((12, 12), dtype=np.uint8)
    labels[:, 8:] = 3  # a big region of class 3 on the right
    labels[2:4, 2:4] = 2  # a 4-pixel island of class 2 inside class 1
    labels[6:9, 2:5] = 2  # a 9-pixel region of class 2, kept
    labels[10, 6] = 0  # a lone background pixel (background has no threshold)
    out = remove_small_regions(labels, {2: 5, 3: 5})
    expected = labels.copy()
    expected[2:4, 2:4] = 1
    np.testing.assert_array_equal(out, expected)
    # a threshold above every region of class 2 removes both; the neighbours decide each one
    out = remove_small_regions(labels, [0, 0, 100, 0])
    assert not (out == 2).any() and (out[6:9, 2:5] == 1).all()
    # an island on the border between two classes takes the majority of its border
    mixed = np.zeros((6, 6), dtype=np.uint8)
    mixed[:, 3:] = 4
    mixed[1:3, 2:4] = 5
    assert (remove_small_regions(mixed, {5: 10})[1:3, 2:4] != 5).all()


def test_layer_decay_gives_the_expected_lr_per_stage():
    import torch

    from pipeline.models import build_model, param_groups

    model = build_model("unet", 3, encoder="resnet18")
    groups = param_groups(model, 1e-3, 1e-2, 1e-4, layer_decay=0.5)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    named = dict(model.encoder.named_parameters())
    assert lr_of[id(named["conv1.weight"])] == pytest.approx(1e-3 * 0.5**4)  # stem: depth 0 of 4
    assert lr_of[id(named["layer1.0.conv1.weight"])] == pytest.approx(1e-3 * 0.5**3)
    assert lr_of[id(named["layer4.1.bn2.weight"])] == pytest.approx(1e-3)
    decoder = [p for n, p in model.named_parameters() if "decoder" in n]
    assert {lr_of[id(p)] for p in decoder} == {1e-2}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sorted(map(id, trainable)) == sorted(id(p) for g in groups for p in g["params"])  # each once
    assert all(g["weight_decay"] == 0.0 for g in groups if g["name"].endswith("no_decay"))
    vit = build_model("upernet", 3, encoder="tu-test_convnext")
    depths = {g["name"]: g["lr"] for g in param_groups(vit, 1.0, 1.0, 0.0, layer_decay=0.8)}
    assert max(depths.values()) == 1.0 and min(depths.values()) < 1.0
    del torch


def test_min_area_tuning_only_tries_classes_that_are_predicted(monkeypatch):
    import numpy as np

    import pipeline.inference.postprocessing.min_area as tp

    rng = np.random.default_rng(0)
    maps = []
    for _ in range(6):
        labels = rng.integers(0, 3, (12, 16))  # classes 0..2 predicted; 3 and 4 only in the ground truth
        gt = labels.copy()
        gt[rng.random((12, 16)) < 0.2] = rng.integers(0, 5)
        maps.append((labels, gt))
    calls = []
    real = tp._cms
    monkeypatch.setattr(tp, "_cms", lambda m, k, f: calls.append(dict(f)) or real(m, k, f))
    tuned = tp.tune_min_area(maps, 5, candidates=(0.01, 0.05))
    tried = {c for f in calls for c in f}
    assert tried <= {1, 2} and set(tuned.params["min_area_fraction"]) <= {1, 2}
    assert len(calls) == 1 + 2 * 2 + 1  # none, two candidates for classes 1 and 2, the tuned maps
