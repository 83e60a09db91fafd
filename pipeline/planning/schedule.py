"""A budgeted run's plan as data: its level and shape, the candidates with their costs and weights, and
its stages (each of a :class:`StageKind`) with minutes and disk.  It round-trips through ``plan.json``
(:meth:`Schedule.to_dict` / :meth:`Schedule.from_dict`, with a format version), is made by the one
planner (:mod:`pipeline.planning.planner`) and run exactly by the one executor
(:mod:`pipeline.planning.executor`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from typing import Any

from pipeline.core.errors import ConfigError, PipelineError
from pipeline.core.tables import readable_lines, readable_table
from pipeline.models.pretrained import WeightSource
from pipeline.planning.budget import format_duration
from pipeline.planning.costs import Throughput, epoch_seconds
from pipeline.planning.fingerprint import Fingerprint
from pipeline.planning.portfolio import PortfolioRecipe, parse_recipe

FORMAT_VERSION = 4  # plan.json's layout; a file of another version is planned again, never misread


class StageKind(StrEnum):
    """What a stage of a plan does; the executor finds its stages by kind."""

    SETUP = "setup"  # the folds and the probe
    SCREEN = "screen"  # fold 0 of every candidate (successive halving when there are several)
    FOLDS = "folds"  # the survivors' further folds
    REFIT = "refit"  # the winner on every labelled image
    PSEUDO = "pseudo"  # the pseudo-label round
    PREDICT = "predict"  # OOF with each TTA set, test
    ENSEMBLE = "ensemble"
    POSTPROCESS = "postprocess"
    SUBMIT = "submit"  # submission, validation, score


LATER_TRAINING = (StageKind.FOLDS, StageKind.REFIT, StageKind.PSEUDO)  # training after the screen
RESERVE = (StageKind.PREDICT, StageKind.ENSEMBLE, StageKind.POSTPROCESS, StageKind.SUBMIT)  # after training


@dataclass
class Stage:
    kind: StageKind
    name: str
    seconds: float
    disk_mb: float = 0.0
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind.value, **{k: v for k, v in asdict(self).items() if k != "kind"}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Stage:
        return cls(StageKind(d["kind"]), str(d["name"]), float(d["seconds"]), float(d["disk_mb"]), str(d["detail"]))


@dataclass
class Candidate:
    """One recipe at one size as the planner sees it and the executor trains it: the experiment's
    name, the portfolio recipe (its training settings), its cost on the device, the weights it starts
    from and its family builder's options."""

    name: str
    recipe: PortfolioRecipe
    throughput: Throughput
    weights: dict[str, Any] = field(default_factory=dict)  # a WeightSource record; empty: from scratch
    model_options: dict[str, Any] = field(default_factory=dict)

    @property
    def family(self) -> str:
        return self.recipe.family

    @property
    def size(self) -> tuple[int, int]:
        return self.throughput.recipe.size

    @property
    def pretrained(self) -> bool:
        return bool(self.weights) and WeightSource.from_dict(self.weights).pretrained

    def describe_weights(self) -> str:
        return WeightSource.from_dict(self.weights).describe() if self.weights else "none (random init)"

    def to_dict(self) -> dict[str, Any]:
        recipe = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self.recipe).items()}
        return {
            "name": self.name,
            "recipe": recipe,
            "throughput": self.throughput.to_dict(),
            "weights": dict(self.weights),
            "model_options": dict(self.model_options),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Candidate:
        recipe = parse_recipe(d["recipe"], "plan.json")
        throughput = Throughput.from_dict(d["throughput"])
        return cls(str(d["name"]), recipe, throughput, dict(d["weights"]), dict(d["model_options"]))


@dataclass
class Schedule:
    level: int
    description: str
    budget_s: float
    fingerprint: Fingerprint
    k: int
    tta: list[str]
    epochs: int
    screened: list[Candidate]
    rungs: list[dict[str, int]]  # epoch of each comparison, runs compared, promoted
    families: int  # families of survivors in the ensemble
    folds: int  # folds each survivor trains (fold 0 included)
    refit: bool
    pseudo: bool
    stages: list[Stage]
    # a time-budgeted run may train up to this many times ``epochs`` when it runs faster than priced
    stretch: int = 1
    slots: int = 1  # devices that run the plan's independent jobs side by side
    device: str = ""
    notes: list[str] = field(default_factory=list)
    postprocess: list[str] = field(default_factory=lambda: ["min_area"])  # tuned on OOF, one kept by the rule

    @property
    def planned_s(self) -> float:
        return sum(s.seconds for s in self.stages)

    @property
    def disk_mb(self) -> float:
        return sum(s.disk_mb for s in self.stages)

    def seconds(self, kinds: Sequence[StageKind]) -> float:
        """The planned seconds of the stages of these kinds."""
        return sum(s.seconds for s in self.stages if s.kind in kinds)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "level": self.level,
            "description": self.description,
            "budget_s": self.budget_s,
            "planned_s": self.planned_s,
            "disk_mb": self.disk_mb,
            "device": self.device,
            "fingerprint": self.fingerprint.to_dict(),
            "k": self.k,
            "tta": list(self.tta),
            "postprocess": list(self.postprocess),
            "epochs": self.epochs,
            "stretch": self.stretch,
            "slots": self.slots,
            "screened": [c.to_dict() for c in self.screened],
            "rungs": [dict(r) for r in self.rungs],
            "families": self.families,
            "folds": self.folds,
            "refit": self.refit,
            "pseudo": self.pseudo,
            "stages": [s.to_dict() for s in self.stages],
            "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "plan.json") -> Schedule:
        """The schedule a ``to_dict`` wrote; a mapping of another format version is refused with a
        :class:`PlanFormatError` (the caller plans again), a malformed one with a :class:`ConfigError`."""
        if not isinstance(d, dict) or d.get("format") != FORMAT_VERSION:
            found = d.get("format") if isinstance(d, dict) else None
            raise PlanFormatError(f"{source}: a plan of format {found!r}, this version reads format {FORMAT_VERSION}")
        try:
            return cls(
                int(d["level"]),
                str(d["description"]),
                float(d["budget_s"]),
                replace(Fingerprint.from_dict(d["fingerprint"], source), source=str(d["fingerprint"]["source"])),
                int(d["k"]),
                [str(t) for t in d["tta"]],
                int(d["epochs"]),
                [Candidate.from_dict(c) for c in d["screened"]],
                [{k: int(v) for k, v in r.items()} for r in d["rungs"]],
                int(d["families"]),
                int(d["folds"]),
                bool(d["refit"]),
                bool(d["pseudo"]),
                [Stage.from_dict(s) for s in d["stages"]],
                int(d["stretch"]),
                int(d["slots"]),
                str(d["device"]),
                [str(n) for n in d["notes"]],
                [str(n) for n in d["postprocess"]],
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(
                f"{source}: a malformed plan ({type(exc).__name__}: {exc}); move it away to plan again"
            ) from exc

    def table(self) -> str:
        """The plan as a person reads it: the data, device and shape, the candidates with their costs and
        weights, then the stages with minutes and disk; ``TEXT_WIDTH`` columns wide, paths shortened
        (``plan.json`` keeps them whole)."""
        head = [
            ["data", self.fingerprint.describe()],
            ["device", self.device],
            ["plan", f"level {self.level}: {self.description}, {self.epochs} epochs a run"],
            *([["devices", f"{self.slots} side by side, one job each"]] if self.slots > 1 else []),
            ["TTA tried on OOF", ", ".join(self.tta)],
            ["post-processing tried on OOF", ", ".join(self.postprocess) or "none"],
        ]
        n_val = self.fingerprint.n_val(self.k)
        images = self.fingerprint.n_train(self.k) * self.fingerprint.epoch_factor
        rows = [
            [
                c.name,
                c.family,
                f"{c.size[0]}x{c.size[1]}",
                c.throughput.recipe.batch,
                f"{c.throughput.step_s:.3f}",
                f"{c.throughput.image_s * 1000:.1f}",
                format_duration(epoch_seconds(c.throughput, int(round(images)), n_val)),
            ]
            for c in self.screened
        ]
        title = "screened" if len(self.screened) > 1 else "candidate"
        columns = [title, "family", "size", "batch", "s/step", "ms/image", "epoch"]
        candidates = readable_table(columns, rows, "llrrrrr")
        weights = [[f"weights of {c.name}", c.describe_weights()] for c in self.screened]
        weights += [[f"options of {c.name}", str(c.model_options)] for c in self.screened if c.model_options]
        stage_rows = [[s.name, format_duration(s.seconds), f"{s.disk_mb:,.0f}", s.detail] for s in self.stages]
        share = f"{self.planned_s / max(self.budget_s, 1e-9):.0%} of {format_duration(self.budget_s)}"
        stage_rows.append(["total", format_duration(self.planned_s), f"{self.disk_mb:,.0f}", share])
        parts = [
            readable_table(["plan", ""], head, "ll"),
            candidates,
            readable_table(["candidate", ""], weights, "ll"),
            readable_table(["stage", "time", "disk MB", ""], stage_rows, "lrrl"),
        ]
        if self.notes:
            parts.append(readable_lines(self.notes, "- ", "  "))
        return "\n\n".join(parts)


class PlanFormatError(PipelineError):
    """plan.json was written in another format version: the caller plans again."""
