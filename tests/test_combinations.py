"""Every architecture x modern-encoder row of the table in docs/training.md is built here at test scale."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.models import build_model, get_spec, input_divisor
from pipeline.models.combinations import COMBINATIONS, render_table
from pipeline.models.contract import has_own_loss, model_loss, model_probabilities
from pipeline.models.params import param_groups
from pipeline.models.registry import resolve_encoder

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning")
TABLE_DOC = Path(__file__).resolve().parents[1] / "docs" / "training.md"


@pytest.mark.parametrize("combo", COMBINATIONS, ids=lambda c: f"{c.model}-{c.encoder}")
def test_combination_builds_trains_and_decays_by_layer(combo):
    assert resolve_encoder(get_spec(combo.model), combo.encoder)  # the user's name exists in the installed library
    torch.manual_seed(0)
    model = build_model(combo.model, 5, encoder=combo.test_encoder, **combo.test_options).train()
    d = input_divisor(combo.model, combo.test_encoder)
    assert model.input_divisor == d
    h, w = d * max(2, -(-64 // d)), d * max(3, -(-96 // d))  # non-square, at least 64x96
    x = torch.randn(2, 3, h, w)
    masks = torch.randint(0, 5, (2, h, w))
    outputs = model(x)
    loss = model_loss(model, outputs, masks, None if has_own_loss(model) else nn.CrossEntropyLoss())
    loss.backward()
    assert torch.isfinite(loss)
    with torch.no_grad():
        probs = model_probabilities(model.eval(), model(x))
    assert probs.shape == (2, 5, h, w)
    groups = param_groups(model, encoder_lr=1e-4, decoder_lr=1e-3, layer_decay=0.8)
    encoder_lrs = sorted({g["lr"] for g in groups if g["name"].startswith("encoder")})
    assert len(encoder_lrs) >= 3 and encoder_lrs[-1] == pytest.approx(1e-4)  # stem << ... << deepest block


def test_docs_table_is_the_one_the_combinations_give():
    text = TABLE_DOC.read_text()
    block = re.search(r"<!-- combinations:start -->\n(.*?)\n<!-- combinations:end -->", text, re.S)
    assert block, "docs/training.md lacks the combinations block"
    assert block.group(1).strip() == render_table(), (
        "docs/training.md's table differs from pipeline.models.combinations: paste the output of "
        "`python -c 'from pipeline.models.combinations import render_table; print(render_table())'`"
    )


def test_patch14_vits_are_refused_by_dpt_with_advice():
    from pipeline.core.errors import PipelineError

    with pytest.raises(PipelineError, match="14-pixel patches.*hf_upernet encoder=dinov2-small"):
        build_model("dpt", 5, encoder="tu-vit_small_patch14_dinov2")
