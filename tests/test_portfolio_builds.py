"""Every whole-model recipe of the portfolio's GPU tier maps onto a network the pipeline trains: its
architecture preset builds with random weights from code (no hub) and trains one step at 64x64 on a
CPU, with about the parameters the recipe states; and the large tier is planned where a day affords it."""

from __future__ import annotations

import gc

import pytest
import torch

from pipeline.models import build_model
from pipeline.models.contract import model_loss, model_probabilities
from pipeline.planning.portfolio import read_portfolio

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
WHOLE = [r for r in read_portfolio().tier("gpu") if r.pretrained]


def test_every_whole_model_recipe_names_its_architecture_and_the_large_tier_its_memory():
    assert WHOLE and all(r.architecture for r in WHOLE)
    large = [r for r in WHOLE if r.large]
    assert {r.family for r in large} >= {"upernet", "mask2former", "segformer"}
    assert all(r.memory_gb > 16 and r.gmacs_per_mpx > 0 and r.params_m > 80 for r in large)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", WHOLE, ids=[r.name for r in WHOLE])
def test_a_whole_model_recipe_builds_from_code_and_trains_a_step(recipe):
    torch.manual_seed(0)
    model = build_model(recipe.model, 4, encoder=recipe.architecture, encoder_weights=None).train()
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(params_m - recipe.params_m) <= 0.25 * recipe.params_m, (recipe.name, params_m)
    x, masks = torch.randn(2, 3, 64, 64), torch.randint(0, 4, (2, 64, 64))
    criterion = torch.nn.CrossEntropyLoss(ignore_index=255)
    loss = model_loss(model, model(x), masks, criterion)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    with torch.no_grad():
        probs = model_probabilities(model.eval(), model(x))
    assert probs.shape == (2, 4, 64, 64) and torch.allclose(probs.sum(1), torch.ones(()), atol=1e-4)
    del model, opt
    gc.collect()
