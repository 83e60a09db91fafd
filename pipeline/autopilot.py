"""Budgeted auto-pilot stage: ``make all DATA_DIR=... BUDGET=20m NAME=x``.

From any contest-layout folder to a validated (and, when labels exist, scored) submission
within a wall-time budget.  Everything lives in one workspace ``work/<NAME>/``; each step runs
as its own stage process (the same commands as the Makefile's targets) and is skipped when a
stamp of its inputs and settings matches:

folds (keyed by the annotation file's digest; near-duplicate groups kept in one fold when found)
-> a probe of candidate recipes on this device -> the plan, printed before any long work
-> training of fold 0 with its schedule sized to the time it has (a run that falls behind
   shortens, never overruns) -> out-of-fold prediction with each candidate TTA set -> the TTA
set chosen on OOF by the selection rule -> test prediction -> ensemble (OOF-tuned, with
intervals and the shake-up estimate) -> submission (validated; format=auto: the header of the data
folder's sample_submission.csv, else rle) -> score when labels exist ->
a summary table.  Killed and re-run, it continues with the budget that was left.
"""

from __future__ import annotations

import json
import logging
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.config import ConfigError, build_config, stage_args, stage_main, yaml_layers
from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_write_text
from pipeline.core.layout import ENSEMBLE_WEIGHTS, RunFolder, submission_paths
from pipeline.core.records import EnsembleRecord
from pipeline.core.tables import format_table
from pipeline.data import common_image_size, load_coco, split_ids
from pipeline.data.folds_config import FoldsConfig
from pipeline.engine.runtime import resolve_device
from pipeline.engine.train_config import TrainConfig
from pipeline.evaluation.analysis_config import AnalyzeConfig
from pipeline.evaluation.selection import format_interval, select
from pipeline.inference.ensemble import Fusion, Member, OofCache, find_member
from pipeline.inference.ensemble_config import EnsembleConfig
from pipeline.inference.postprocessing import POSTPROCESSORS
from pipeline.inference.predictor import PredictConfig
from pipeline.models.pretrained import SCRATCH, WeightSource, resolve_weights
from pipeline.planning.budget import BudgetClock, format_duration, parse_budget
from pipeline.planning.devices import DeviceProfile, Measured
from pipeline.planning.executor import ScheduleRun, describe_folds, ladder_rows, store_scale
from pipeline.planning.fingerprint import fingerprint_of
from pipeline.planning.measure import PROBE_SHARE, measure_candidates
from pipeline.planning.plan import (
    Plan,
    candidate_size,
    describe_weights,
    make_plan,
    plan_from_dict,
    plan_to_dict,
    val_every,
)
from pipeline.planning.portfolio import PORTFOLIO, PortfolioRecipe, read_portfolio, usable
from pipeline.planning.probe import Recipe
from pipeline.planning.processes import WorkspaceLock, run_stage
from pipeline.planning.schedule import Candidate, Schedule, plan_schedule
from pipeline.planning.stamps import Stamps, stamp_key
from pipeline.submission.formats import FORMATS, resolve_format
from pipeline.submission.score_config import ScoreConfig
from pipeline.submission.submit_config import SubmitConfig

log = logging.getLogger(__name__)

BUDGET_RECIPE = Path(__file__).resolve().parent / "configs" / "recipes" / "budget.yaml"
EPOCHS_CAP = 3  # training may run up to this many times the planned epochs when it is faster than measured


@dataclass
class AutopilotConfig:
    data_dir: str = "data/demo"
    budget: str = "20m"  # wall time for everything after set-up: 20m, 2h, 1h30m, 90s
    name: str = "auto"  # workspace work/<name>/ and submissions/<name>.csv
    format: str = "auto"  # auto: the header of <data_dir>/sample_submission.csv, else rle; rle; dense
    gt: str | None = None  # test labels for the final score only; default <data_dir>/test_gt.json when present
    work_dir: str = "work"
    submissions_dir: str = "submissions"
    k: int = 5
    seed: int = 42
    tta: list[str] = field(default_factory=lambda: ["none", "hflip"])  # tried on OOF, simplest first
    # candidate family:encoder pairs, used when their pretrained weights resolve (encoder_weights)
    models: list[str] = field(
        default_factory=lambda: ["unet:tu-tf_efficientnet_lite0", "unet:tu-tf_efficientnet_lite2"]
    )
    # the candidates when none of ``models`` has pretrained weights (or encoder_weights=null): from scratch
    scratch_models: list[str] = field(default_factory=lambda: ["unet:resnet18"])
    sizes: list[float] = field(default_factory=lambda: [0.5, 0.75, 1.0])  # candidate fractions of the image size
    # each family's builder options in budgeted runs (probe and training alike), e.g.
    # {unet: {decoder_channels: [128, 64, 32, 16, 16]}}; families not named are built as their
    # library builds them.  That lighter U-Net decoder trains 1.2x the images per second on a CPU
    # but lost at 20 minutes on ccp (OOF -0.0103 [-0.0145, -0.0071]), so none is set by default.
    model_options: dict[str, dict] = field(default_factory=dict)
    batch_size: int = 8
    # the training recipe (its base: chain first); default pipeline/configs/recipes/budget.yaml
    recipe: str | None = None
    # the encoder's lr when it starts from pretrained weights (the decoder keeps the recipe's lr): on ccp
    # (Lite0, 10 equal epochs) 3e-4 gained +0.0068 [+0.0037, +0.0101] OOF mIoU over 1e-4
    pretrained_encoder_lr: float = 3e-4
    encoder_weights: str | None = "auto"  # auto: folder > cache > package > download, else from scratch; null
    weights_dir: str = "weights"  # the weights folder (make weights) looked at first
    device: str = "auto"
    threads: int | None = None
    postprocess: str = (
        "min_area"  # a post-processor (none, min_area, crf, ...): tuned on OOF, kept by the selection rule
    )
    progress: bool = True
    # the plan's level (pipeline.planning.schedule): null, the richest that fits the budget; 1 the single
    # recipe; 2 screening and the winner on more folds or a refit; 3 two or three families on all folds;
    # 4 and a pseudo-label round.  A level given here may train as few as 4 epochs a run (a measurement)
    level: int | None = None
    partial: str = "refit"  # when the winner cannot train every fold: refit on all labelled images, or folds
    max_screen: int | None = None  # screen at most this many portfolio recipes (1: the first, no screen)
    portfolio: str | None = None  # the recipes a plan of level 2+ screens (default configs/recipes/portfolio.yaml)
    max_epochs: int = 60  # a plan of level 2+ gives every run at most this many epochs

    def validate(self) -> None:
        parse_budget(self.budget)
        if self.level is not None and self.level not in (1, 2, 3, 4):
            raise ConfigError(f"level must be 1, 2, 3, 4 or null, got {self.level!r}")
        if self.partial not in ("refit", "folds"):
            raise ConfigError(f"partial: expected refit or folds, got {self.partial!r}")
        if self.max_epochs < 1:
            raise ConfigError(f"max_epochs must be at least 1, got {self.max_epochs}")
        if self.max_screen is not None and self.max_screen < 1:
            raise ConfigError(f"max_screen must be at least 1 or null, got {self.max_screen}")
        if not self.name.strip() or "/" in self.name:
            raise ConfigError(f"name must be a plain folder name, got {self.name!r}")
        if self.postprocess not in POSTPROCESSORS:
            raise ConfigError(f"postprocess: unknown {self.postprocess!r}; known: {', '.join(POSTPROCESSORS.names())}")
        if self.format not in ("auto", *FORMATS):
            raise ConfigError(f"format: unknown {self.format!r}; known: auto, {', '.join(FORMATS)}")
        if not self.pretrained_encoder_lr > 0:
            raise ConfigError(f"pretrained_encoder_lr must be a positive rate, got {self.pretrained_encoder_lr}")
        if self.k < 2:
            raise ConfigError(f"k must be at least 2, got {self.k}")
        if not self.tta or not self.models or not self.scratch_models or not self.sizes:
            raise ConfigError("tta, models, scratch_models and sizes need at least one candidate each")
        for m in [*self.models, *self.scratch_models]:
            if m.count(":") != 1:
                raise ConfigError(f"models: {m!r} must be family:encoder, e.g. unet:resnet18")
        if any(not 0 < s <= 2 for s in self.sizes):
            raise ConfigError(f"sizes must be fractions of the image size in (0, 2], got {self.sizes}")
        if not isinstance(self.model_options, dict) or any(
            not isinstance(v, dict) for v in self.model_options.values()
        ):
            raise ConfigError(f"model_options must map a family to its options, got {self.model_options!r}")


def command(module: str, cls: type, settings: dict[str, Any], recipe: Path | None = None) -> list[str]:
    """A stage's command (module, ``key=value`` items), its keys and values checked against the stage's
    config class before any process starts; with ``recipe``, the stage reads that file alone under the
    items (``--only-config --config FILE``), and the check layers it the same way."""
    flags = ["--only-config", "--config", str(recipe)] if recipe is not None else []
    return [module, *flags, *stage_args(cls, settings, recipe, where=module)]


def workspace_of(cfg: AutopilotConfig) -> Path:
    """``work_dir/NAME``: everything one budgeted run writes but its submission."""
    return Path(cfg.work_dir) / cfg.name


class Autopilot:
    """One budgeted run: the workspace, the clock, the stamps, and the steps in order."""

    command_of = staticmethod(command)  # the executor of richer plans builds its commands here

    def __init__(self, cfg: AutopilotConfig):
        self.cfg = cfg
        # before any work: a sample submission with an unknown header fails now, not after training
        self.format, self.format_reason = resolve_format(cfg.format, cfg.data_dir)
        self.recipe = Path(cfg.recipe) if cfg.recipe else BUDGET_RECIPE
        # every file of the recipe's base: chain: a changed one re-plans and retrains
        self.recipe_files = [Path(source) for source, _ in yaml_layers(self.recipe)]
        self.budget_s = parse_budget(cfg.budget)
        self.ws = workspace_of(cfg)
        self.ws.mkdir(parents=True, exist_ok=True)
        self.clock = BudgetClock(self.ws / "state.json", self.budget_s)
        self.stamps = Stamps(self.ws / "stamps")
        self.coco = load_coco(cfg.data_dir, "train_all.json")
        self.test = load_coco(cfg.data_dir, "test.json", require_annotations=False)
        self.folds_file = self.ws / "folds" / self.coco.digest[:12] / "folds.csv"
        self.runs_dir = self.ws / "runs"
        self._weights: dict[str, WeightSource] | None = None
        self.portfolio = read_portfolio(cfg.portfolio or PORTFOLIO)

    @property
    def weights(self) -> dict[str, WeightSource]:
        """``family:encoder`` -> the weights it starts from: the ``models`` whose pretrained weights
        resolve (folder, cache, package or download), or, when none does, ``scratch_models`` from scratch."""
        if self._weights is None:
            found = {
                m: resolve_weights(*m.split(":"), self.cfg.encoder_weights, self.cfg.weights_dir)
                for m in self.cfg.models
            }
            pretrained = {m: w for m, w in found.items() if w.pretrained}
            self._weights = pretrained or {m: SCRATCH for m in self.cfg.scratch_models}
        return self._weights

    # ------------------------------------------------------------------------- stage processes
    def stage(
        self,
        name: str,
        args: list[str],
        settings: dict[str, Any],
        inputs: Sequence[Path],
        outputs: Sequence[Path],
        volatile: Sequence[str] = (),
    ) -> bool:
        """Run ``python -m pipeline.<args> <volatile>`` unless its stamp matches; False when skipped.
        ``volatile`` arguments (the time left) are passed but not part of the stamp."""
        key = stamp_key({"args": args, **settings}, list(inputs))
        if self.stamps.done(name, key):
            log.info("%s: unchanged, skipped", name)
            return False
        command = [sys.executable, "-m", *args, *volatile]
        log.info("%s: %s", name, " ".join(shlex.quote(a) for a in command[2:]))
        started = time.monotonic()
        returncode = run_stage(command)
        self.clock.add_stage(name, time.monotonic() - started)
        if returncode != 0:
            raise PipelineError(f"{name} failed (exit {returncode}): {' '.join(command[2:])}")
        self.stamps.mark(name, key, list(outputs))
        return True

    def folds(self) -> None:
        settings = dict(data_dir=self.cfg.data_dir, out_dir=self.folds_file.parent, k=self.cfg.k, seed=self.cfg.seed)
        settings.update(cache_dir=self.ws / "cache", group_by="similar")  # near-duplicates stay in one fold
        args = command("pipeline.folds", FoldsConfig, settings)
        self.stage("folds", args, {}, [self.coco.path], [self.folds_file])

    # ------------------------------------------------------------------------- plan
    def candidates(self) -> list[Recipe]:
        from pipeline.models import input_divisor

        h, w = common_image_size(self.coco)
        out = []
        for spec in self.weights:
            model, encoder = spec.split(":")
            d = input_divisor(model, encoder, **self.options(model))
            for frac in sorted(set(self.cfg.sizes)):
                out.append(Recipe(model, encoder, candidate_size((h, w), frac, d), self.cfg.batch_size))
        return list(dict.fromkeys(out))

    def options(self, model: str) -> dict[str, Any]:
        """The builder options a budgeted run gives ``model`` (``model_options``)."""
        return dict(self.cfg.model_options.get(model, {}))

    def plan(self) -> tuple[Plan | None, dict[str, Any]]:
        """The plan of this budget on this device, measured once and kept in ``plan.json``: the
        single-recipe plan (level 1, with ``None`` for the schedule's executor), or a schedule of
        level 2-4 (``None`` for the single plan) that :class:`ScheduleRun` executes."""
        settings = {
            "budget": self.cfg.budget,
            "models": {m: w.to_dict() for m, w in self.weights.items()},
            "model_options": self.cfg.model_options,
            "sizes": self.cfg.sizes,
            "tta": self.cfg.tta,
            "batch": self.cfg.batch_size,
            "device": self.cfg.device,
            "threads": self.cfg.threads,
        }
        # the plan's shape settings count only when given (a workspace of the single-recipe plan keeps its key)
        shape = {k: getattr(self.cfg, k) for k in ("level", "partial", "max_screen", "max_epochs")}
        settings.update({k: v for k, v in shape.items() if v != getattr(AutopilotConfig, k)})
        extra = [Path(self.cfg.portfolio)] if self.cfg.portfolio else []
        inputs = [self.coco.path, self.test.path, self.folds_file, *self.recipe_files, *extra]
        key = stamp_key(settings, inputs)
        path = self.ws / "plan.json"
        saved: dict[str, Any] = {}
        if path.is_file():
            saved = json.loads(path.read_text())
            if not isinstance(saved, dict):
                raise PipelineError(f"{path}: expected a JSON object; move it away to plan again")
            if saved.get("key") == key and "plan" in saved:
                executes = saved.get("executes") or {"level": 1}
                return (plan_from_dict(saved["plan"]) if saved["plan"] else None), executes
        plan, schedule = self._measure_and_plan()
        executes = {**schedule.to_dict(), "key": key, "text": schedule.table()} if schedule else {"level": 1}
        record = {**saved, "key": key, "plan": plan_to_dict(plan) if plan else None, "executes": executes}
        # what make plan keeps there (its schedule) stays
        atomic_write_text(path, json.dumps(record, indent=2))
        return plan, executes

    def epoch_images(self, train_ids: list[int], threshold: float | None) -> int:
        """Images one training epoch goes through: the recipe's repeat-factor sampling (``threshold``)
        repeats the images of rare classes (about 1.5 times the 642 training images of ccp at t=0.1)."""
        from pipeline.data.copypaste import repeat_factors

        if not threshold:
            return len(train_ids)
        return int(round(float(repeat_factors(self.coco, train_ids, threshold).sum())))

    def _measure_and_plan(self) -> tuple[Plan | None, Schedule | None]:
        train_ids, val_ids = split_ids(self.coco, self.folds_file, 0)  # the trainer's own split
        n_val = len(val_ids)
        recipe_cfg = build_config(TrainConfig, self.recipe)  # what the training stage will read
        per_epoch = self.epoch_images(train_ids, recipe_cfg.rfs_threshold)
        device = resolve_device(self.cfg.device)
        if self.cfg.threads:
            import torch

            torch.set_num_threads(self.cfg.threads)
        low = recipe_cfg.progressive_scale if recipe_cfg.progressive else None
        measured, seconds = measure_candidates(
            self.candidates(),
            self.coco.num_classes,
            device,
            self.budget_s,
            lambda: self.budget_s - self.clock.spent(),
            per_epoch,
            n_val,
            self.options,
            low,
            recipe_cfg.progressive,
        )
        self.clock.add_stage("probe", seconds)
        schedule = self.schedule(measured, recipe_cfg, device, train_ids, seconds)
        if schedule is not None and schedule.level > 1:
            return None, schedule
        plan = make_plan(
            measured,
            self.clock.remaining(),
            len(train_ids),
            n_val,
            len(self.test.images),
            list(self.cfg.tta),
            self.coco.num_classes,
            per_epoch,
            oof_scale=recipe_cfg.oof_scale,
            progressive=recipe_cfg.progressive,
        )
        plan.model_options = self.options(plan.recipe.model)
        plan.candidates = {m: w.to_dict() for m, w in self.weights.items()}
        return plan, None

    def portfolio_recipes(self, kind: str) -> list[tuple[PortfolioRecipe, WeightSource]]:
        """The portfolio's recipes for this device whose weights resolve here (``encoder_weights=null``:
        those from scratch); beside two pretrained ones a from-scratch recipe is not worth a slot."""
        recipes = self.portfolio.tier(kind)
        if self.cfg.encoder_weights is None:
            return [(r, SCRATCH) for r in recipes if r.scratch]
        found = usable(recipes, self.cfg.weights_dir)
        if sum(w.pretrained for _, w in found) >= 2:
            found = [(r, w) for r, w in found if not r.scratch]
        return found

    def schedule(
        self, measured: list, recipe_cfg: TrainConfig, device, train_ids: list[int], probe_s: float
    ) -> Schedule | None:
        """The richest plan of :func:`plan_schedule` for the time left: the portfolio's recipes priced from
        the probe's measurements (scaled by pixels), those not measured probed while the probe has its
        share of the budget; None when only the single-recipe plan is possible."""
        from pipeline.models import input_divisor
        from pipeline.planning.probe import probe

        kind = "gpu" if device.type == "cuda" else "cpu"
        found = self.portfolio_recipes(kind)
        here = DeviceProfile("this device", kind)
        for r, _ in found:
            same = [t for t in measured if (t.recipe.model, t.recipe.encoder) == (r.model, r.encoder)]
            here.measured[r.name] = [
                Measured(t.recipe.size, t.recipe.batch, t.step_s, t.image_s, t.checkpoint_mb) for t in same
            ]
        fp = fingerprint_of(self.coco, self.test, train_ids, recipe_cfg.rfs_threshold)
        candidates = []
        for r, w in found:
            size = candidate_size(fp.size, r.size, input_divisor(r.model, None if r.pretrained else r.encoder))
            if not here.measured[r.name]:
                if probe_s > PROBE_SHARE * self.budget_s:
                    log.info("plan: %s left out of the screen (the probe has used its share of the budget)", r.name)
                    continue
                started = time.monotonic()
                options = {"pretrained": r.pretrained} if r.pretrained else self.options(r.model)
                recipe = Recipe(r.model, r.encoder or str(r.pretrained), size, r.batch)
                t = probe(recipe, fp.num_classes, device, options=options)
                probe_s += time.monotonic() - started
                self.clock.add_stage("probe", time.monotonic() - started)
                here.measured[r.name] = [Measured(size, r.batch, t.step_s, t.image_s, t.checkpoint_mb)]
            candidates.append(Candidate(r.name, r.family, here.throughput(r, size, r.batch), w.describe()))
        if not candidates:
            return None
        try:
            return plan_schedule(
                fp,
                candidates,
                measured,
                self.clock.remaining(),
                k=self.cfg.k,
                tta=list(self.cfg.tta),
                oof_scale=recipe_cfg.oof_scale,
                progressive=recipe_cfg.progressive,
                partial=self.cfg.partial,
                device=str(device),
                level=self.cfg.level,
                max_screen=self.cfg.max_screen,
                max_epochs=self.cfg.max_epochs,
            )
        except PipelineError:
            if self.cfg.level not in (None, 1):
                raise
            return None  # the single-recipe plan refuses with its own message

    # ------------------------------------------------------------------------- steps
    def train(self, plan: Plan) -> Path:
        r = plan.recipe
        weights = WeightSource.from_dict(plan.weights) if plan.weights else SCRATCH
        reserve = plan.planned_s - plan.train_s
        budget = max(30.0, min(plan.train_s, self.clock.remaining() - reserve))
        settings: dict[str, Any] = dict(
            data_dir=self.cfg.data_dir,
            folds_file=self.folds_file,
            fold=0,
            model=r.model,
            encoder=r.encoder,
            encoder_weights=self.cfg.encoder_weights if weights.pretrained else None,
            weights_dir=self.cfg.weights_dir,
            img_size=list(r.size),
            batch_size=r.batch,
            epochs=plan.epochs * EPOCHS_CAP,  # the time budget sizes the run after its second epoch
            val_every=val_every(plan.epochs),
            runs_dir=self.runs_dir,
            experiment=plan.recipe.name,
            cache_dir=self.ws / "cache",
            seed=self.cfg.seed,
            device=self.cfg.device,
            progress=self.cfg.progress,
        )
        if plan.model_options:
            settings["model_options"] = plan.model_options
        if weights.pretrained:
            settings["encoder_lr"] = float(self.cfg.pretrained_encoder_lr)
        if self.cfg.threads:
            settings["threads"] = self.cfg.threads
        # the recipe file alone under the command line (--only-config), checked as the stage will read it
        args = command("pipeline.train", TrainConfig, settings, self.recipe)
        folder = RunFolder.of(self.runs_dir, plan.recipe.name, 0)
        # the budget itself is not part of the stamp: a re-run after a kill continues the same run
        self.stage(
            "train",
            args,
            {"budget": self.cfg.budget, "weights": weights.to_dict()},
            # the recipe files' contents too: a changed recipe (an upgrade) retrains
            [self.folds_file, self.coco.path, *self.recipe_files],
            [folder.best, folder.oof / "meta.json"],
            volatile=[f"time_budget={budget:.0f}"],
        )
        return folder.path

    def predict(self, run_dir: Path, split: str, tta: str, scale: float | None = None, tagged: bool = False) -> Path:
        """``run_dir``'s ``split`` predicted with ``tta``; test maps at ``scale`` (default: the trained size's,
        :meth:`test_store_scale`).  ``tagged``: the stage is named after the experiment and fold (a plan of
        many runs), not only after the split."""
        folder = RunFolder(run_dir)
        settings: dict[str, Any] = dict(run_dir=run_dir, data_dir=self.cfg.data_dir, split=split, tta=tta)
        settings.update(device=self.cfg.device, progress=self.cfg.progress)
        if split == "test":
            settings["store_scale"] = f"{self.test_store_scale(folder) if scale is None else scale:.4g}"
        args = command("pipeline.predict", PredictConfig, settings)
        name = f"predict-{run_dir.parent.name}-{run_dir.name}-{split}-{tta}" if tagged else f"predict-{split}-{tta}"
        self.stage(name, args, {}, [folder.best], [folder.store(split, tta) / "meta.json"])
        return folder.store(split, tta)

    def test_store_scale(self, folder: RunFolder) -> float:
        """The scale of test maps for the size ``folder`` was trained at (:func:`store_scale`)."""
        train_size = json.loads((folder.path / "oof" / "meta.json").read_text())["train_size"]
        return store_scale(train_size, common_image_size(self.test))

    def per_image(self, members: list[Member], fusions: list[Fusion]) -> list[np.ndarray]:
        """Per-image OOF confusion matrices of each fusion of ``members`` (cached in the workspace)."""
        with OofCache(members, self.coco, folder=self.ws, seed=self.cfg.seed, progress=False) as cache:
            return cache.per_image_confusions(fusions)

    def choose_tta(self, run_dirs: Sequence[Path], tagged: bool = False) -> tuple[str, Any]:
        """The TTA set by the selection rule (simplest first) on the OOF of ``run_dirs``, folds of one
        experiment taken as one member; test labels are never used."""
        for tta in self.cfg.tta:
            for run_dir in run_dirs:
                self.predict(run_dir, "val", tta, tagged=tagged)
        members = [find_member(str(run_dirs[0].parent), tta=t, name=t, folds=run_dirs) for t in self.cfg.tta]
        cms = self.per_image(members, Fusion.singles(len(members)))
        choice = select(list(zip(self.cfg.tta, cms, strict=True)), seed=self.cfg.seed)
        return choice.chosen, choice

    def finish(self, run_dir: Path, tta: str) -> dict[str, Any]:
        """Test prediction, ensemble, then :meth:`report`."""
        self.predict(run_dir, "test", tta)
        ens_dir = self.ws / "ensembles"
        weights = ens_dir / self.cfg.name / ENSEMBLE_WEIGHTS
        self.stage(
            "ensemble",
            command(
                "pipeline.ensemble",
                EnsembleConfig,
                dict(runs=run_dir.parent, tta=tta, data_dir=self.cfg.data_dir, name=self.cfg.name, out_dir=ens_dir)
                | dict(postprocess=self.cfg.postprocess, progress=self.cfg.progress),
            ),
            {},
            [RunFolder(run_dir).store("val", tta) / "index.csv"],
            [weights],
        )
        return self.report(weights)

    def report(self, weights: Path) -> dict[str, Any]:
        """The ensemble's analysis, the submission and (labels permitting) its score."""
        name, ens_dir = weights.parent.name, weights.parent.parent
        self.stage(
            "analyze",
            command(
                "pipeline.analyze",
                AnalyzeConfig,
                dict(name=name, ensembles_dir=ens_dir, data_dir=self.cfg.data_dir)
                | dict(out_dir=self.ws / "analysis", progress=self.cfg.progress),
            ),
            {},
            [weights],
            [self.ws / "analysis" / name / "report.md"],
        )
        csv_path = self.submit(weights)
        result: dict[str, Any] = {"submission": str(csv_path), "ensemble": str(weights)}
        gt = Path(self.cfg.gt) if self.cfg.gt else Path(self.cfg.data_dir) / "test_gt.json"
        if gt.exists():
            score = self.ws / "score.json"
            self.stage(
                "score",
                command(
                    "pipeline.score",
                    ScoreConfig,
                    dict(sub=csv_path, gt=gt, data_dir=self.cfg.data_dir, out_json=score),
                ),
                {},
                [csv_path, gt],
                [score],
            )
            result["score"] = json.loads(score.read_text())
        return result

    def submit(self, weights: Path) -> Path:
        """The submission step; ``format`` is passed on as given (the stage resolves ``auto`` the same
        way and records why in its manifest), and the stamp holds the resolved format: a sample
        submission whose header now says another format writes the file again, an unchanged one not."""
        csv_path, manifest = submission_paths(self.cfg.submissions_dir, self.cfg.name)
        self.stage(
            "submit",
            command(
                "pipeline.submit",
                SubmitConfig,
                dict(name=self.cfg.name, format=self.cfg.format, ensemble=weights, data_dir=self.cfg.data_dir)
                | dict(out_dir=self.cfg.submissions_dir, progress=self.cfg.progress),
            ),
            {"format": self.format} if self.cfg.format == "auto" else {},  # explicit formats: stamps as before
            [weights],
            [csv_path, manifest],
        )
        return csv_path


def summary(pilot: Autopilot, plan: Plan, tta: str, choice, result: dict[str, Any]) -> str:
    ens = EnsembleRecord.read(result["ensemble"])
    rows = [["weights", describe_weights(plan.weights)]]
    rows += [[f"member {m.name}", format_interval(m.scores["oof_miou_interval"])] for m in ens.members]
    rows.append(["ensemble (OOF)", format_interval(ens.oof["ensemble_interval"])])
    rows += tta_rows(choice)
    return format_table(["summary", ""], rows + tail_rows(pilot, ens, tta, result))


def schedule_summary(pilot: Autopilot, schedule: dict[str, Any], out: dict[str, Any], result: dict[str, Any]) -> str:
    """The summary of a plan of level 2-4: the screen's ladder, the folds or refit, the ensemble's
    members and weights, the TTA and pseudo-label decisions, then what every run reports."""
    ens = EnsembleRecord.read(result["ensemble"])
    rows = [["plan", f"level {schedule['level']}: {schedule['kind']}, {schedule['epochs']} epochs a run"]]
    rows += ladder_rows(out["ladder"])
    rows += describe_folds(out["trained"])
    rows += [
        [f"member {m.name} (weight {m.weight:.3f})", format_interval(m.scores["oof_miou_interval"])]
        for m in ens.members
    ]
    rows.append([f"ensemble (OOF): {ens.oof.get('chosen', '')}", format_interval(ens.oof["ensemble_interval"])])
    rows += tta_rows(out["tta_choice"])
    if "pseudo" in out:
        for c in out["pseudo"]["decision"]["comparisons"]:
            verdict = "kept" if c["accepted"] else "refused"
            rows.append(
                ["pseudo-label round (OOF gain)", f"{c['gain']:+.4f} [{c['low']:+.4f}, {c['high']:+.4f}] {verdict}"]
            )
    return format_table(["summary", ""], rows + tail_rows(pilot, ens, out["tta"], result))


def tta_rows(choice) -> list[list[str]]:
    return [
        [
            f"TTA {c.candidate} vs {c.current} (OOF gain)",
            f"{c.gain:+.4f} [{c.low:+.4f}, {c.high:+.4f}] {'accepted' if c.accepted else 'refused'}",
        ]
        for c in choice.comparisons
    ]


def tail_rows(pilot: Autopilot, ens: EnsembleRecord, tta: str, result: dict[str, Any]) -> list[list[str]]:
    """Post-processing, the TTA chosen, the shake-up estimate, the score, the minutes, the files."""
    rows = []
    post = ens.report.get("postprocess") or {}
    if post.get("oof_gain"):
        g = post["oof_gain"]
        rows.append(
            [
                f"post-processing {pilot.cfg.postprocess} (OOF gain)",
                f"{g['gain']:+.4f} [{g['low']:+.4f}, {g['high']:+.4f}] {'kept' if post['accepted'] else 'refused'}",
            ]
        )
    rows.append(["TTA chosen", tta])
    if "shakeup" in ens.report:
        shake = ens.report["shakeup"]
        gap = shake["abs_gap"]
        rows.append(
            [
                f"public/private gap ({shake['test_images']} test images)",
                f"median {gap['point']:.4f}, 90% range [{gap['low']:.4f}, {gap['high']:.4f}]",
            ]
        )
    if "score" in result:
        rows.append(["test mIoU (labels)", f"{result['score']['miou']:.4f}"])
    rows += [[f"minutes: {k}", f"{v / 60:.1f}"] for k, v in pilot.clock.stages.items()]
    rows.append(["minutes: total", f"{pilot.clock.spent() / 60:.1f} of {pilot.budget_s / 60:.1f}"])
    rows.append(["submission", f"{result['submission']} ({pilot.format}: {pilot.format_reason})"])
    rows.append(["workspace", str(pilot.ws)])
    return rows


def check_disk(ws: Path, planned_mb: float) -> None:
    """Refuse before any long work when the workspace's disk cannot hold what the plan still has to
    write (its estimate less what the workspace already holds, so a re-run of a finished or
    half-finished run is not refused): a full disk would stop the run at its first checkpoint."""
    written_mb = sum(f.stat().st_size for f in ws.rglob("*") if f.is_file()) / 1e6
    needed_mb = planned_mb - written_mb
    free_mb = shutil.disk_usage(ws).free / 1e6
    if needed_mb > free_mb:
        raise PipelineError(
            f"{ws}: the plan writes about {needed_mb:.0f} MB more (checkpoints and probability maps), "
            f"but its disk has {free_mb:.0f} MB free; free some space or pass ARGS='work_dir=<a larger disk>'"
        )


def run(cfg: AutopilotConfig) -> dict[str, Any]:
    """Run (or continue) the budgeted pipeline; returns the summary figures."""
    cfg.validate()
    workspace_of(cfg).mkdir(parents=True, exist_ok=True)
    with WorkspaceLock(workspace_of(cfg)):  # one run per NAME at a time
        return run_locked(cfg)


def run_locked(cfg: AutopilotConfig) -> dict[str, Any]:
    pilot = Autopilot(cfg)
    try:
        log.info(
            "budget %s: %s already spent in %s",
            format_duration(pilot.budget_s),
            format_duration(pilot.clock.spent_before),
            pilot.ws,
        )
        if cfg.format == "auto":
            log.info("format auto -> %s (%s)", pilot.format, pilot.format_reason)
        pilot.folds()
        plan, schedule = pilot.plan()
        text = plan.table() if plan is not None else schedule["text"]
        atomic_write_text(pilot.ws / "plan.txt", text + "\n")
        log.info("plan:\n%s", text)
        if plan is None:
            check_disk(pilot.ws, schedule["disk_mb"])
            out = ScheduleRun(pilot, schedule, {r.name: r for r in pilot.portfolio.recipes}).run()
            result = pilot.report(out["weights"])
            tta, table = out["tta"], schedule_summary(pilot, schedule, out, result)
            result["ladder"], result["trained"] = out["ladder"], out["trained"]
        else:
            check_disk(pilot.ws, plan.disk_mb)
            run_dir = pilot.train(plan)
            tta, choice = pilot.choose_tta([run_dir])
            result = pilot.finish(run_dir, tta)
            table = summary(pilot, plan, tta, choice, result)
        atomic_write_text(pilot.ws / "summary.txt", table + "\n")
        log.info("summary:\n%s", table)
        return {**result, "tta": tta, "plan": text, "summary": table, "spent_s": pilot.clock.spent()}
    finally:
        pilot.clock.close()


def stop_on_sigterm() -> None:
    """A SIGTERM (``kill``, a job scheduler's stop) ends the run as Ctrl-C does: the running stage's
    process is killed with it (:func:`run_stage` kills its child on any exception) rather than left
    training on, orphaned, in the workspace that a re-run resumes."""

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def main(argv: Sequence[str] | None = None) -> int:
    stop_on_sigterm()
    return stage_main(AutopilotConfig, run, argv, "Budgeted run: data folder -> validated submission (make all)")


if __name__ == "__main__":
    raise SystemExit(main())
