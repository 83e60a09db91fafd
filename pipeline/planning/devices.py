"""Device profiles (``configs/devices/<name>.yaml``): what one training step and one predicted image
cost on a device, so that ``make plan`` can plan for a machine it is not running on.  A profile holds
measured entries (one per portfolio recipe, at the size and batch they were measured at, as the probe or
``make gpu-check`` measure them) and, for recipes without one, an estimate: the recipe's FLOPs at a
stated share of the device's peak, capped by what its data loader can feed.  Figures are scaled to
another size and batch in proportion to the pixels a step goes through."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.config import named_file, read_yaml_mapping
from pipeline.core.errors import ConfigError
from pipeline.core.io import atomic_write_text
from pipeline.planning.costs import Recipe, Throughput
from pipeline.planning.portfolio import PortfolioRecipe

DEVICES = Path(__file__).resolve().parents[1] / "configs" / "devices"
KINDS = ("cpu", "gpu")
ADAMW_BYTES_PER_PARAM = 12  # float32 weights and AdamW's two float32 moments: one checkpoint


@dataclass(frozen=True)
class Measured:
    """One recipe measured on the device: seconds of a step of ``batch`` images of ``size`` (the
    training loop's overhead included) and of one predicted image (one view)."""

    size: tuple[int, int]
    batch: int
    step_s: float
    image_s: float
    checkpoint_mb: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "size": list(self.size),
            "batch": self.batch,
            "step_s": round(self.step_s, 5),
            "image_s": round(self.image_s, 6),
            "checkpoint_mb": round(self.checkpoint_mb, 1),
        }


@dataclass(frozen=True)
class Estimate:
    """FLOPs at a stated utilisation: a training step is ``3 x 2 x MACs`` (forward, and backward at
    twice the forward) of its images at ``train_utilisation`` of ``peak_tflops``; prediction is the
    forward alone at ``predict_utilisation``; no step is faster than the loader delivers its images."""

    peak_tflops: float
    train_utilisation: float
    predict_utilisation: float
    loader_images_per_s: float = 0.0  # 0: no loader cap
    step_overhead_s: float = 0.0  # per step: the optimizer, the loop, launching kernels
    derivation: str = ""

    def step_s(self, recipe: PortfolioRecipe, size: tuple[int, int], batch: int, sharing: int = 1) -> float:
        """Seconds of a training step; ``sharing``: jobs whose loaders share the host's CPUs at once."""
        flops = batch * _mpx(size) * recipe.gmacs_per_mpx * 1e9 * 2 * 3
        compute = flops / (self.peak_tflops * 1e12 * self.train_utilisation) + self.step_overhead_s
        loader = self.loader_images_per_s / max(1, sharing)
        return max(compute, batch / loader if loader else 0.0)

    def image_s(self, recipe: PortfolioRecipe, size: tuple[int, int]) -> float:
        return _mpx(size) * recipe.gmacs_per_mpx * 1e9 * 2 / (self.peak_tflops * 1e12 * self.predict_utilisation)


@dataclass
class DeviceProfile:
    name: str
    kind: str  # cpu | gpu: which tier of the portfolio it trains
    description: str = ""
    gpus: int = 1  # devices that run jobs side by side (a CPU is one)
    cpus: int = 0  # the host's CPU cores, which feed every device's loader (0: not stated)
    precision: str = ""  # what amp=auto trains in there: bf16, fp16 (with the gradient scaler) or fp32
    memory_gb: float = 0.0  # each GPU's memory, which a recipe's training step must fit in (0: not stated)
    # portfolio recipe name -> its measurements (one per size measured)
    measured: dict[str, list[Measured]] = field(default_factory=dict)
    estimate: Estimate | None = None
    source: str = ""

    @property
    def estimated(self) -> bool:
        """Whether any figure of the plan may come from the estimate rather than a measurement."""
        return self.estimate is not None

    def throughput(self, recipe: PortfolioRecipe, size: tuple[int, int], batch: int, sharing: int = 1) -> Throughput:
        """``recipe`` at ``size`` and ``batch`` on this device: its measurement scaled by pixels, else the
        estimate (its loader shared by ``sharing`` jobs at once); an error names the profile and the
        recipe when it has neither."""
        r = Recipe(recipe.model, recipe.encoder or str(recipe.pretrained), tuple(size), batch)
        if self.measured.get(recipe.name):  # the measurement nearest in pixels
            m = min(self.measured[recipe.name], key=lambda x: abs(math.log(_mpx(size) / _mpx(x.size))))
            pixels = _mpx(size) / _mpx(m.size)
            return Throughput(r, m.step_s * pixels * batch / m.batch, m.image_s * pixels, m.checkpoint_mb)
        if self.estimate is None or not recipe.gmacs_per_mpx:
            raise ConfigError(
                f"{self.source or self.name}: no measurement of recipe {recipe.name!r} and no estimate for it "
                "(an estimate: block and the recipe's gmacs_per_mpx); measure it with make plan save_profile=..."
            )
        return Throughput(
            r,
            self.estimate.step_s(recipe, size, batch, sharing),
            self.estimate.image_s(recipe, size),
            recipe.params_m * ADAMW_BYTES_PER_PARAM,
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "kind": self.kind, "description": self.description}
        out.update(gpus=self.gpus, cpus=self.cpus, precision=self.precision, memory_gb=self.memory_gb)
        out["measured"] = {k: [m.to_dict() for m in v] for k, v in self.measured.items()}
        if self.estimate is not None:
            out["estimate"] = {k: v for k, v in vars(self.estimate).items()}
        return out


def _mpx(size: tuple[int, int] | list[int]) -> float:
    return size[0] * size[1] / 1e6


def _measured(entry: Any, where: str) -> Measured:
    try:
        m = Measured(
            tuple(int(v) for v in entry["size"]),
            int(entry["batch"]),
            float(entry["step_s"]),
            float(entry["image_s"]),
            float(entry.get("checkpoint_mb", 0.0)),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ConfigError(f"{where}: needs size [H, W], batch, step_s, image_s ({exc})") from exc
    if len(m.size) != 2 or min(m.size) < 1 or m.batch < 1 or not (m.step_s > 0 and m.image_s > 0):
        raise ConfigError(f"{where}: implausible figures {entry}")
    return m


def read_device_profile(name_or_path: str | Path) -> DeviceProfile:
    path = named_file(name_or_path, DEVICES, "device profile")
    data = read_yaml_mapping(path)
    where = str(path)
    known = {"name", "kind", "description", "gpus", "cpus", "precision", "memory_gb", "measured", "estimate"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {', '.join(unknown)}")
    kind = data.get("kind")
    if kind not in KINDS:
        raise ConfigError(f"{where}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    measured: dict[str, list[Measured]] = {}
    for recipe, entries in (data.get("measured") or {}).items():
        for entry in entries if isinstance(entries, list) else [entries]:
            measured.setdefault(str(recipe), []).append(_measured(entry, f"{where}: measured.{recipe}"))
    estimate = None
    if data.get("estimate") is not None:
        e = data["estimate"]
        try:
            estimate = Estimate(**e)
        except TypeError as exc:
            known = ", ".join(Estimate.__dataclass_fields__)
            raise ConfigError(f"{where}: estimate: {exc}; known keys: {known}") from exc
        if not (
            estimate.peak_tflops > 0 and 0 < estimate.train_utilisation <= 1 and 0 < estimate.predict_utilisation <= 1
        ):
            raise ConfigError(f"{where}: estimate: peak_tflops > 0 and utilisations in (0, 1] needed, got {e}")
    if not measured and estimate is None:
        raise ConfigError(f"{where}: a profile needs measured entries or an estimate")
    try:
        gpus, cpus, memory = int(data.get("gpus", 1)), int(data.get("cpus", 0)), float(data.get("memory_gb", 0))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: gpus and cpus must be whole numbers, memory_gb a number ({exc})") from exc
    if gpus < 1 or cpus < 0 or (kind == "cpu" and gpus != 1):
        raise ConfigError(f"{where}: gpus must be at least 1 (1 on a CPU) and cpus not negative, got {gpus}, {cpus}")
    precision = str(data.get("precision") or "")
    if precision not in ("", "bf16", "fp16", "fp32"):
        raise ConfigError(f"{where}: precision must be bf16, fp16 or fp32, got {precision!r}")
    return DeviceProfile(
        str(data.get("name") or path.stem),
        kind,
        str(data.get("description") or ""),
        gpus,
        cpus,
        precision,
        memory,
        measured,
        estimate,
        where,
    )


def save_device_profile(profile: DeviceProfile, path: str | Path, header: str | None = None) -> Path:
    """Write ``profile`` as YAML (atomically: an older profile is never left half-written), after
    ``header`` (comment lines saying what measured it, when and with which command)."""
    import yaml

    path = Path(path)
    header = header or f"# Device profile {profile.name}: measured by `make plan save_profile=...` (the probe).\n"
    header += (
        "# measured: per portfolio recipe, seconds of one training step of `batch` images of `size` (loop\n"
        "# overhead included) and of one predicted image; scaled by pixels to other sizes and batches.\n"
    )
    atomic_write_text(path, header + yaml.safe_dump(profile.to_dict(), sort_keys=False))
    return path
