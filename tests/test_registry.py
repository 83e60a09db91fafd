"""One registry shape for everything made by name."""

from __future__ import annotations

import pytest

from pipeline.core.errors import UnknownNameError
from pipeline.core.registry import Registry
from pipeline.data import AUGMENTATIONS, MASK_RULES
from pipeline.engine.optim import OPTIMIZERS, SCHEDULERS
from pipeline.inference.ensemble import METHODS
from pipeline.inference.postprocess import POSTPROCESSORS, postprocess
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
    assert postprocess("none", labels) is labels
    with pytest.raises(UnknownNameError, match="post-processor"):
        postprocess("crf9", labels)
