"""Shared fixtures: small datasets in the contest layout, made by the project's own generator."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")
# tests never reach a model hub: whole-model weights are tested from local save_pretrained folders
os.environ["HF_HUB_OFFLINE"] = "1"


def make_demo(out_dir: Path, **kwargs) -> Path:
    from pipeline.demo import DemoConfig, run

    params = dict(out_dir=str(out_dir), n_train=24, n_test=6, height=64, width=96, seed=0)
    params.update(kwargs)
    return run(DemoConfig(**params))


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """A tiny non-square demo dataset (24 labelled + 6 test images, 64x96), read-only by convention."""
    return make_demo(tmp_path_factory.mktemp("demo") / "data")


@pytest.fixture(scope="session")
def demo_data_square(tmp_path_factory) -> Path:
    """A slightly larger square demo dataset (48 labelled + 8 test images, 64x64) for training tests."""
    return make_demo(tmp_path_factory.mktemp("demo_sq") / "data", n_train=48, n_test=8, height=64, width=64, seed=1)


@pytest.fixture(scope="module")
def folds_file(demo_data_square, tmp_path_factory) -> Path:
    """3-fold split of ``demo_data_square`` (folds.csv path), made by the folds stage."""
    from pipeline import folds as folds_stage

    out = tmp_path_factory.mktemp("folds")
    folds_stage.run(
        folds_stage.FoldsConfig(data_dir=str(demo_data_square), out_dir=str(out), k=3, seed=0, pixel_stats=False)
    )
    return out / "folds.csv"


def small_train_config(data: Path, folds: Path, runs: Path, **kw):
    """A TrainConfig for tests: the demo data, a small encoder without pretrained weights, CPU, full
    precision (bf16 autocast is native on some CPUs and not others: thresholds hold on both)."""
    from pipeline.core.config import build_config
    from pipeline.engine.train_config import TrainConfig

    base = dict(
        data_dir=str(data),
        folds_file=str(folds),
        runs_dir=str(runs),
        cache_dir=str(runs / "cache"),
        model="unet",
        encoder="resnet18",
        encoder_weights=None,
        experiment="t",
        epochs=2,
        batch_size=8,
        lr=3e-3,
        warmup_epochs=0.0,
        augment="light",
        num_workers=0,
        threads=2,
        progress=False,
        plot=True,
        amp="off",
    )
    base.update(kw)
    return build_config(TrainConfig, overrides=base)


def fixed_costs(figures, kind: str = "cpu"):
    """A planner's cost source from fixed figures: ``figures(recipe, size)`` gives (seconds per step,
    seconds per predicted image, checkpoint MB[, seconds per step at the progressive-resizing size]) of
    a portfolio recipe at (H, W) with its batch, or None where nothing is measured.  Every price asked
    for is kept, as the probe's are."""
    from pipeline.planning.costs import Recipe, Throughput
    from pipeline.planning.measure import Costs

    class FixedCosts(Costs):
        def measure(self, recipe, size):
            found = figures(recipe, size)
            if found is None:
                return None
            return Throughput(Recipe(recipe.model, recipe.encoder or "", size, recipe.batch), *found)

    costs = FixedCosts()
    costs.kind, costs.description, costs.identity = kind, f"fixed figures ({kind})", f"fixed-{kind}"
    return costs
