"""The probe of a run's candidate recipes on this device, shared by ``make all`` and ``make plan``:
each family:encoder from its smallest size up, stopping at the first size that cannot train
``SIZE_EPOCHS`` epochs in the time left, and measuring nothing more once the probe has taken its
share of the budget (one recipe is always measured)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from pipeline.planning.plan import SIZE_EPOCHS, epoch_seconds
from pipeline.planning.probe import Recipe, Throughput, probe

PROBE_SHARE = 0.08  # the probe stops measuring larger recipes after this share of the budget


def measure_candidates(
    recipes: Sequence[Recipe],
    num_classes: int,
    device: torch.device,
    budget_s: float,
    left_s: Callable[[], float],
    epoch_images: int,
    n_val: int,
    options: Callable[[str], dict[str, Any]] = lambda model: {},
    low_scale: float | None = None,
    progressive: float = 0.0,
    probe_share: float = PROBE_SHARE,
    measure: Callable[[Recipe], Throughput] | None = None,
) -> tuple[list[Throughput], float]:
    """The throughputs of ``recipes`` measured here, and the seconds the probe took.  ``left_s``: the
    budget's seconds left now; ``options``: the builder options of a model family; ``measure``: how one
    recipe is measured (default: the probe with those options)."""
    if measure is None:

        def measure(recipe: Recipe) -> Throughput:
            return probe(recipe, num_classes, device, options=options(recipe.model), low_scale=low_scale)

    started = time.monotonic()
    measured: list[Throughput] = []
    by_model: dict[tuple[str, str], list[Recipe]] = {}
    for recipe in recipes:
        by_model.setdefault((recipe.model, recipe.encoder), []).append(recipe)
    for group in by_model.values():  # each family:encoder from its smallest size up
        for recipe in sorted(group, key=lambda r: r.size[0] * r.size[1]):
            if time.monotonic() - started > probe_share * budget_s and measured:
                break  # the probe may not eat the budget
            t = measure(recipe)
            measured.append(t)
            if epoch_seconds(t, epoch_images, n_val, progressive) * SIZE_EPOCHS > left_s():
                break  # its larger sizes would train fewer epochs still
    return measured, time.monotonic() - started
