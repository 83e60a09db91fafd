"""The portfolio of recipes a budgeted run may screen (``configs/recipes/portfolio.yaml``), and which
of them a run can use here: those whose weights resolve (or that train from scratch), on the device
tier they were chosen for."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.config import read_yaml_mapping
from pipeline.core.errors import ConfigError
from pipeline.models.backends.base import hf_cached
from pipeline.models.pretrained import (
    SCRATCH,
    WeightSource,
    hub_online,
    pretrained_folder,
    resolve_weights,
)

log = logging.getLogger(__name__)

PORTFOLIO = Path(__file__).resolve().parents[1] / "configs" / "recipes" / "portfolio.yaml"
TIERS = ("cpu", "gpu")
WEIGHTS = ("imagenet", "none")


@dataclass(frozen=True)
class PortfolioRecipe:
    name: str
    tier: str
    family: str  # what the ensemble combines: survivors of the screening are of different families
    model: str
    encoder: str | None = None
    weights: str = "none"  # imagenet | none (from scratch); a whole model: ``pretrained``
    pretrained: str | None = None  # hub id of a whole segmentation-pretrained model
    size: float = 1.0  # fraction of the images' most common size, in the portfolio plans
    sizes: tuple[float, ...] = ()  # the single-recipe plan's candidate sizes (default: size)
    batch: int = 8
    lr: float = 1e-3
    encoder_lr: float | None = None
    augment: str = "light"
    gmacs_per_mpx: float = 0.0  # forward multiply-adds per megapixel: a device profile's estimates
    params_m: float = 0.0  # millions of parameters: the checkpoint's size where nothing was measured
    # a whole model's architecture as a backbone preset of its family (the same network with random
    # weights, built without the hub: what the probe times, and the build test)
    architecture: str | None = None
    memory_gb: float = 0.0  # a training step's GPU memory at 512x512 with its batch (0: not stated)
    large: bool = False  # the large tier: screened when the budget affords its schedule, else left out

    @property
    def key(self) -> str:
        """``family:encoder`` as the auto-pilot's candidates are named (the hub id for whole models)."""
        return f"{self.model}:{self.encoder or self.pretrained}"

    @property
    def scratch(self) -> bool:
        return self.pretrained is None and self.weights == "none"

    def train_args(self) -> list[str]:
        """The recipe's own training settings as ``key=value`` items."""
        out = [f"model={self.model}", f"batch_size={self.batch}", f"lr={self.lr:g}", f"augment={self.augment}"]
        out.append(f"encoder_lr={'null' if self.encoder_lr is None else f'{self.encoder_lr:g}'}")
        if self.encoder:
            out.append(f"encoder={self.encoder}")
        if self.pretrained:
            out.append(f"pretrained={self.pretrained}")
        return out


@dataclass
class Portfolio:
    recipes: list[PortfolioRecipe] = field(default_factory=list)
    source: str = ""

    def tier(self, device_kind: str) -> list[PortfolioRecipe]:
        """The recipes for a device: on a CPU its own tier; on a GPU the GPU tier, then the CPU one
        (the fallback of a GPU that has only the small encoders' weights)."""
        order = ["gpu", "cpu"] if device_kind == "gpu" else ["cpu"]
        return [r for t in order for r in self.recipes if r.tier == t]


def parse_recipe(item: Any, where: str) -> PortfolioRecipe:
    """One recipe of a portfolio file (or of a plan), checked: unknown or missing keys name ``where``."""
    if not isinstance(item, dict) or "name" not in item:
        raise ConfigError(f"{where}: each recipe is a mapping with a name, got {item!r}")
    known = set(PortfolioRecipe.__dataclass_fields__)
    unknown = sorted(set(item) - known)
    if unknown:
        raise ConfigError(
            f"{where}: recipe {item['name']!r}: unknown keys {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    for key in ("tier", "family", "model"):
        if key not in item:
            raise ConfigError(f"{where}: recipe {item['name']!r} needs {key}")
    try:
        r = PortfolioRecipe(**{**item, "sizes": tuple(float(s) for s in item.get("sizes") or [item.get("size", 1.0)])})
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: recipe {item['name']!r}: {exc}") from exc
    if r.tier not in TIERS:
        raise ConfigError(f"{where}: recipe {r.name!r}: tier must be one of {', '.join(TIERS)}, got {r.tier!r}")
    if r.pretrained is None and r.weights not in WEIGHTS:
        raise ConfigError(f"{where}: recipe {r.name!r}: weights must be imagenet or none, got {r.weights!r}")
    if r.pretrained is None and not r.encoder:
        raise ConfigError(f"{where}: recipe {r.name!r} needs an encoder or a pretrained whole model")
    if any(not 0 < s <= 2 for s in (r.size, *r.sizes)) or r.batch < 1:
        raise ConfigError(f"{where}: recipe {r.name!r}: sizes must be fractions in (0, 2] and batch positive")
    return r


def read_portfolio(path: str | Path = PORTFOLIO) -> Portfolio:
    data = read_yaml_mapping(path)
    items = data.get("recipes")
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{path}: expected a non-empty list under 'recipes'")
    recipes = [parse_recipe(item, str(path)) for item in items]
    names = [r.name for r in recipes]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: recipe names must be unique, got {names}")
    return Portfolio(recipes, str(path))


def recipe_weights(
    recipe: PortfolioRecipe, weights_dir: str | Path | None, assume: bool = False, online: bool | None = None
) -> WeightSource | None:
    """The weights ``recipe`` starts from here, or None when they do not resolve (the recipe is not
    used).  ``assume``: a device profile's plan takes the weights as available (recorded so)."""
    if recipe.scratch:
        return SCRATCH
    if assume:
        return WeightSource("assumed", setting=recipe.pretrained or recipe.weights)
    if recipe.pretrained:
        local = pretrained_folder(weights_dir, recipe.pretrained)
        if local is not None:
            return WeightSource("pretrained", str(local), None, recipe.pretrained)
        if hf_cached(recipe.pretrained, ("config.json",)) is not None:  # looked up as huggingface_hub does
            return WeightSource("pretrained", recipe.pretrained, None, recipe.pretrained)
        if hub_online() if online is None else online:
            return WeightSource("pretrained", recipe.pretrained, None, recipe.pretrained)
        return None
    found = resolve_weights(recipe.model, recipe.encoder, "auto", weights_dir)
    return found if found.pretrained else None


def usable(
    recipes: list[PortfolioRecipe], weights_dir: str | Path | None, assume: bool = False
) -> list[tuple[PortfolioRecipe, WeightSource]]:
    """The recipes whose weights resolve, with the weights each starts from."""
    out = []
    for r in recipes:
        w = recipe_weights(r, weights_dir, assume)
        if w is not None:
            out.append((r, w))
    return out


def offers(
    portfolio: Portfolio,
    kind: str,
    weights_dir: str | Path | None,
    encoder_weights: str | None = "auto",
    assume: bool = False,
    names: list[str] | None = None,
    memory_gb: float = 0.0,
) -> list[tuple[PortfolioRecipe, WeightSource]]:
    """The recipes a budgeted run on a ``kind`` device can use, with the weights each starts from: the
    device's tier (``names``: only those), each pretrained one only where its weights resolve
    (``assume``: a plan for another machine takes them as there), the from-scratch ones always;
    ``encoder_weights=null``: the from-scratch ones alone.  On a GPU with two or more pretrained recipes,
    those from scratch are not worth a screening slot; on a CPU they are screened beside them.
    ``memory_gb``: the device's memory, which a recipe's step at 512x512 must fit in (0: not known)."""
    recipes = portfolio.tier(kind)
    if memory_gb:
        too_large = [r.name for r in recipes if r.memory_gb > memory_gb]
        if too_large:
            log.info("%s: left out, their training step needs more than %.0f GB", ", ".join(too_large), memory_gb)
        recipes = [r for r in recipes if r.memory_gb <= memory_gb]
    if names is not None:
        known = [r.name for r in recipes]
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ConfigError(
                f"{portfolio.source}: recipes {unknown} are not in the {kind} tier; known: {', '.join(known)}"
            )
        recipes = [r for r in recipes if r.name in names]
    if encoder_weights is None:
        found = [(r, SCRATCH) for r in recipes if r.scratch]
    else:
        found = usable(recipes, weights_dir, assume)
    if kind == "gpu" and sum(w.pretrained for _, w in found) >= 2:
        found = [(r, w) for r, w in found if w.pretrained]
    if not found:
        raise ConfigError(
            f"{portfolio.source}: no recipe of the {kind} tier can be used here (their weights do not resolve"
            + (", encoder_weights=null leaves only the recipes from scratch" if encoder_weights is None else "")
            + ")"
        )
    return found
