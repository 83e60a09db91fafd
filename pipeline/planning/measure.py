"""What recipes cost on a device, as the planner asks for them (:class:`pipeline.planning.schedule.Costs`):
measured here by the throughput probe (:class:`ProbeCosts`), or read from a device profile
(:class:`ProfileCosts`).  Both keep what they were asked for, so the plan prices the probe that
``make all`` runs on that device (its set-up stage) whichever source priced it."""

from __future__ import annotations

import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import torch

from pipeline.engine.runtime import resolve_device
from pipeline.planning.costs import PROBE_BUDGET_FRACTION, Recipe, Throughput
from pipeline.planning.devices import DeviceProfile
from pipeline.planning.portfolio import PortfolioRecipe
from pipeline.planning.probe import probe

log = logging.getLogger(__name__)


class Costs:
    """Each recipe's cost at each size, asked for once: ``exact`` measures that size; otherwise the
    nearest measurement (in pixels) of the same recipe is scaled, and only a recipe not measured at
    all is measured."""

    kind = "cpu"  # which tier of the portfolio the device trains
    description = ""  # the device as the plan names it
    identity = ""  # the device as a plan's stamp names it: a plan made for another never runs here unnoticed
    devices = 1  # devices that can run jobs side by side (GPUs; a CPU is one)
    cpus = os.cpu_count() or 1  # the host's cores (the CPU work after training)
    memory_gb = 0.0  # each device's memory (0: not known; recipes are then not held to theirs)
    busy = 1  # devices busy at once while a recipe is priced (:meth:`use`): they share the host's CPUs

    def __init__(self) -> None:
        self.notes: list[str] = []  # what a plan priced with these costs should say about them
        self.measured: dict[tuple[str, tuple[int, int]], Throughput] = {}

    def price(self, recipe: PortfolioRecipe, size: tuple[int, int], exact: bool = True) -> Throughput | None:
        size = (int(size[0]), int(size[1]))
        key = (recipe.name, size)
        if key in self.measured:
            return self.measured[key]
        same = [t for (name, _), t in self.measured.items() if name == recipe.name]
        if not exact and same:
            nearest = min(same, key=lambda t: abs(math.log(_pixels(size) / _pixels(t.recipe.size))))
            return self.scale(recipe, nearest, size)
        t = self.measure(recipe, size)
        if t is not None:
            self.measured[key] = t
        return t

    def use(self, slots: int) -> None:
        """Price every recipe with ``slots`` devices busy at once (set before the first price)."""
        self.busy = max(1, int(slots))

    def probed(self) -> list[Throughput]:
        """What the probe measures (or would, on this device) for the prices asked so far."""
        return list(self.measured.values())

    def measure(self, recipe: PortfolioRecipe, size: tuple[int, int]) -> Throughput | None:
        raise NotImplementedError

    def scale(self, recipe: PortfolioRecipe, t: Throughput, size: tuple[int, int]) -> Throughput:
        return t.scaled(size, recipe.batch)


class ProfileCosts(Costs):
    """Costs from a device profile (its measurements scaled by pixels, else its estimates)."""

    def __init__(self, profile: DeviceProfile):
        super().__init__()
        self.profile = profile
        self.kind = profile.kind
        self.description = f"{profile.name} ({profile.description or profile.kind}; profile {profile.source})"
        self.identity = f"profile {profile.name}"
        self.devices, self.cpus, self.memory_gb = profile.gpus, profile.cpus or 1, profile.memory_gb
        if profile.estimated:
            self.notes.append("device figures: estimates (see the profile's header)")

    def measure(self, recipe: PortfolioRecipe, size: tuple[int, int]) -> Throughput:
        return self.profile.throughput(recipe, size, recipe.batch, self.busy)

    def scale(self, recipe: PortfolioRecipe, t: Throughput, size: tuple[int, int]) -> Throughput:
        return self.profile.throughput(recipe, size, recipe.batch, self.busy)  # the profile prices any size itself


class Here(NamedTuple):
    """The device a run trains on, its name in a plan's stamp, how many such devices can run jobs side by
    side (the visible GPUs; a CPU is one), and each one's memory (0: not known, a CPU)."""

    device: torch.device
    identity: str
    devices: int
    memory_gb: float


def this_device(setting: str, threads: int | None = None) -> Here:
    """This machine's device for ``setting`` (``auto``: the GPU when there is one)."""
    device = resolve_device(setting)
    if threads:
        torch.set_num_threads(threads)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        count = torch.cuda.device_count() if setting == "auto" else 1
        memory = torch.cuda.get_device_properties(index).total_memory / 2**30
        return Here(device, f"{torch.cuda.get_device_name(index)} x{count}", count, memory)
    return Here(device, f"cpu, {torch.get_num_threads()} torch threads", 1, 0.0)


class ProbeCosts(Costs):
    """Costs measured here by the throughput probe, with the builder options the run trains with
    (``model_options``; a whole model's ``pretrained=``), until the probe has used its share of the
    budget (one recipe is always measured)."""

    def __init__(
        self,
        setting: str,
        threads: int | None,
        num_classes: int,
        budget_s: float,
        model_options: dict[str, dict[str, Any]] | None = None,
        low_scale: float | None = None,
        share: float = PROBE_BUDGET_FRACTION,
    ):
        super().__init__()
        self.device, self.identity, self.devices, self.memory_gb = this_device(setting, threads)
        self.kind = "gpu" if self.device.type == "cuda" else "cpu"
        self.description = f"{self.identity} (measured here by the probe)"
        self.num_classes, self.budget_s, self.share = num_classes, budget_s, share
        self.options, self.low_scale = dict(model_options or {}), low_scale
        self.seconds = 0.0  # the time the probe has taken

    def measure(self, recipe: PortfolioRecipe, size: tuple[int, int]) -> Throughput | None:
        if self.measured and self.seconds > self.share * self.budget_s:
            log.info("probe: %s at %dx%d left out (the probe has used its share of the budget)", recipe.name, *size)
            return None
        r, options = probe_recipe(recipe, size, self.options)
        started = time.monotonic()
        devices = self.busy_devices()
        if len(devices) == 1:
            t = probe(r, self.num_classes, devices[0], options=options, low_scale=self.low_scale)
        else:  # every GPU busy at once, as the plan's jobs keep them: they share the host's CPUs and bus
            with ThreadPoolExecutor(len(devices)) as pool:
                runs = list(
                    pool.map(
                        lambda d: probe(r, self.num_classes, d, options=options, low_scale=self.low_scale), devices
                    )
                )
            t = max(runs, key=lambda x: x.step_s)
        self.seconds += time.monotonic() - started
        return t

    def busy_devices(self) -> list[torch.device]:
        """The devices the probe times at once: ``busy`` GPUs (from this one on), or this CPU."""
        if self.device.type != "cuda" or self.busy == 1:
            return [self.device]
        first = self.device.index or 0
        return [torch.device("cuda", (first + i) % torch.cuda.device_count()) for i in range(self.busy)]


def probe_recipe(
    recipe: PortfolioRecipe, size: tuple[int, int], model_options: dict[str, dict[str, Any]]
) -> tuple[Recipe, dict[str, Any]]:
    """What the probe builds for ``recipe``: its model on its encoder with the run's builder options; a
    whole model from its architecture preset (the same network, no hub), else from its hub id."""
    if recipe.pretrained and recipe.architecture:
        return Recipe(recipe.model, recipe.architecture, size, recipe.batch), {}
    if recipe.pretrained:
        return Recipe(recipe.model, str(recipe.pretrained), size, recipe.batch), {"pretrained": recipe.pretrained}
    return Recipe(recipe.model, str(recipe.encoder), size, recipe.batch), dict(model_options.get(recipe.model, {}))


def _pixels(size: tuple[int, int]) -> float:
    return float(size[0] * size[1])
