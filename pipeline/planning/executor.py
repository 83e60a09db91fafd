"""The executor of a budget plan richer than one recipe (levels 2-4 of :mod:`pipeline.planning.schedule`):
screening by successive halving on fold 0, the survivors' further folds or the winner's refit, the TTA
set chosen on OOF, test predictions, the ensemble across folds and families, and the pseudo-label round.

Every step is a stage process run through the auto-pilot (:class:`Pilot`), stamped and skipped when
unchanged; the screen's rung scores are kept in ``screen.json`` as they are measured, so a run killed
at any point continues where it stopped with the budget that was left.

* Screening: every candidate trains fold 0 on its full schedule of ``epochs`` but pauses at each rung
  (``stop_epoch=``); the rung compares the candidates' OOF mIoU (with bootstrap intervals and each
  one's paired gap to the leader) and promotes the better ones, which continue from their last
  checkpoint on the same schedule, so the learning rate never steps back up.  The last promotion keeps
  the best of each family first (the ensemble combines families).  Losers' checkpoints are deleted.
* Folds: the survivors train folds 1..n-1 with the same recipe and epochs, each under a time budget
  that shortens it when the run falls behind.  Refit: the winner trains on every labelled image
  (``fold=-1``) for the same epochs; its test prediction replaces fold 0's, fold 0's OOF stands for it.
* The ensemble stage takes each survivor as one member whose OOF covers every fold it has, and
  chooses by the selection rule among the best member alone, the plain average, greedy selection and
  tuned weights.
* Pseudo-labels: for each fold k, the test images are labelled by the survivors' fold-k models only
  (none of them saw fold k's images), and the strongest survivor trains fold k again with them; the
  ensemble with that member replaces the first one only if its OOF gain's interval lies above zero.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_write_text
from pipeline.core.layout import ENSEMBLE_WEIGHTS, RunFolder
from pipeline.core.records import EnsembleRecord
from pipeline.data import common_image_size
from pipeline.engine.train_config import TrainConfig
from pipeline.evaluation.selection import bootstrap_miou, paired_gain, select
from pipeline.inference.ensemble import Fusion, Member
from pipeline.inference.ensemble_config import EnsembleConfig
from pipeline.inference.pseudo_config import PseudoConfig
from pipeline.planning.plan import val_every
from pipeline.planning.portfolio import PortfolioRecipe

log = logging.getLogger(__name__)

TIME_BUDGET_SLACK = 1.25  # a fold or refit run may take this much more than its share of the time left
MIN_RUN_S = 60.0  # the least time budget a fold or refit run is given


class Pilot(Protocol):
    """What the executor needs of the auto-pilot: its settings, workspace, clock and stage runner."""

    cfg: Any
    ws: Path
    clock: Any
    coco: Any
    test: Any
    folds_file: Path
    runs_dir: Path
    recipe: Path
    recipe_files: list[Path]

    def stage(
        self,
        name: str,
        args: list[str],
        settings: dict[str, Any],
        inputs: Sequence[Path],
        outputs: Sequence[Path],
        volatile: Sequence[str] = (),
    ) -> bool: ...

    def command_of(self, module: str, cls: type, settings: dict[str, Any], recipe: Path | None = None) -> list[str]: ...

    def predict(
        self, run_dir: Path, split: str, tta: str, scale: float | None = None, tagged: bool = False
    ) -> Path: ...

    def per_image(self, members: list[Member], fusions: list[Fusion]) -> list[np.ndarray]: ...

    def choose_tta(self, run_dirs: Sequence[Path], tagged: bool = False) -> tuple[str, Any]: ...


def store_scale(train_size: Sequence[int], test_size: Sequence[int], multi: bool = False) -> float:
    """The scale test maps are stored at: about the trained size (the model's own resolution), not each
    image's, so 4 to 5 times less is written when training ran at half size; the submission resizes them
    to the image bilinearly as it would have.  ``multi``: one of many test runs an ensemble averages,
    kept at the OOF maps' scale."""
    (th, tw), (h, w) = train_size, test_size
    return min(1.0, max(th / h, tw / w)) * (TrainConfig.oof_scale if multi else 1.0)


class ScheduleRun:
    """One plan of level 2-4 executed in ``pilot``'s workspace."""

    def __init__(self, pilot: Pilot, schedule: dict[str, Any], recipes: dict[str, PortfolioRecipe]):
        self.p, self.s = pilot, schedule
        self.epochs = int(schedule["epochs"])
        self.screened = schedule["screened"]
        missing = [c["name"] for c in self.screened if c["name"] not in recipes]
        if missing:
            raise PipelineError(f"plan.json: screened recipes {missing} are not in the portfolio; re-plan")
        self.recipes = recipes
        self.ledger_path = pilot.ws / "screen.json"
        self.ledger: dict[str, Any] = json.loads(self.ledger_path.read_text()) if self.ledger_path.is_file() else {}
        self.pseudo_dir = pilot.ws / "pseudo"

    # ------------------------------------------------------------------------- one run
    def candidate(self, name: str) -> dict[str, Any]:
        return next(c for c in self.screened if c["name"] == name)

    def folder(self, name: str, fold: int, experiment: str | None = None) -> RunFolder:
        return RunFolder.of(self.p.runs_dir, experiment or name, fold)

    def train_settings(self, name: str, fold: int) -> dict[str, Any]:
        r, c, cfg = self.recipes[name], self.candidate(name), self.p.cfg
        settings: dict[str, Any] = dict(
            data_dir=cfg.data_dir,
            folds_file=self.p.folds_file,
            fold=fold,
            model=r.model,
            encoder_weights=None if r.scratch else cfg.encoder_weights,
            weights_dir=cfg.weights_dir,
            img_size=list(c["size"]),
            batch_size=r.batch,
            epochs=self.epochs,
            val_every=val_every(self.epochs),
            lr=r.lr,
            encoder_lr=r.encoder_lr,
            augment=r.augment,
            runs_dir=self.p.runs_dir,
            experiment=name,
            cache_dir=self.p.ws / "cache",
            seed=cfg.seed,
            device=cfg.device,
            progress=cfg.progress,
        )
        if r.encoder:
            settings["encoder"] = r.encoder
        if r.pretrained:
            settings["pretrained"] = r.pretrained
        if cfg.model_options.get(r.model):
            settings["model_options"] = dict(cfg.model_options[r.model])
        if cfg.threads:
            settings["threads"] = cfg.threads
        return settings

    def train(
        self, name: str, fold: int, stop: int | None = None, seconds: float | None = None, **extra: Any
    ) -> RunFolder:
        """Train ``name`` on ``fold``: paused at ``stop`` (a rung), or under a time budget of ``seconds``."""
        settings = {**self.train_settings(name, fold), **extra}
        if stop is not None:
            settings["stop_epoch"] = stop
        folder = self.folder(name, fold, settings["experiment"])
        args = self.p.command_of("pipeline.train", TrainConfig, settings, self.p.recipe)
        outputs = [folder.best] + ([folder.oof / "meta.json"] if fold >= 0 else [])
        volatile = [f"time_budget={seconds:.0f}"] if seconds is not None else []
        tag = f"{settings['experiment']}-{folder.path.name}" + (f"-e{stop}" if stop is not None else "")
        inputs = [self.p.folds_file, self.p.coco.path, *self.p.recipe_files]
        self.p.stage(f"train-{tag}", args, {"plan": self.s["key"]}, inputs, outputs, volatile=volatile)
        return folder

    def predict(self, folder: RunFolder, split: str, tta: str, scale: float | None = None) -> Path:
        return self.p.predict(folder.path, split, tta, scale, tagged=True)

    # ------------------------------------------------------------------------- scores
    def rung_scores(self, names: list[str]) -> dict[str, np.ndarray]:
        members = [Member(n, str(self.folder(n, 0).path), None, [str(self.folder(n, 0).oof)], []) for n in names]
        cms = self.p.per_image(members, Fusion.singles(len(members)))
        return dict(zip(names, cms, strict=True))

    def save_ledger(self) -> None:
        atomic_write_text(self.ledger_path, json.dumps(self.ledger, indent=2))

    # ------------------------------------------------------------------------- steps
    def screen(self) -> list[str]:
        """Successive halving on fold 0; returns the survivors, strongest first."""
        names = [c["name"] for c in self.screened]
        rungs = effective_rungs(self.s["rungs"], self.epochs)
        key = self.s["key"]
        if self.ledger.get("key") != key:
            self.ledger = {"key": key, "rungs": []}
        alive = names
        for i, rung in enumerate(rungs):
            last = i == len(rungs) - 1
            done = self.ledger["rungs"][i] if i < len(self.ledger["rungs"]) else None
            if done is None:
                for j, name in enumerate(alive):
                    if last:  # the final rung runs to the end of its schedule, shortened if time runs out
                        self.train(name, 0, seconds=self.share(len(alive) - j, self.later_training_s()))
                    else:
                        self.train(name, 0, stop=rung["epoch"])
                done = self.score_rung(rung["epoch"], alive)
                keep = promote(done["entries"], rung["promoted"], final=i >= len(rungs) - 2)
                for entry in done["entries"]:
                    entry["promoted"] = entry["name"] in keep
                self.ledger["rungs"].append(done)
                self.save_ledger()
            alive = [e["name"] for e in done["entries"] if e["promoted"]]
        self.drop_losers(names, alive)
        return alive

    def score_rung(self, epoch: int, names: list[str]) -> dict[str, Any]:
        cms = self.rung_scores(names)
        cfg = self.p.cfg
        ivs = {n: bootstrap_miou(cm, seed=cfg.seed) for n, cm in cms.items()}
        leader = max(names, key=lambda n: ivs[n].point)
        entries = []
        for n in sorted(names, key=lambda n: -ivs[n].point):
            entry = {"name": n, "family": self.candidate(n)["family"], "miou": ivs[n].as_dict()}
            if n != leader:
                entry["gap_to_leader"] = paired_gain(cms[leader], cms[n], seed=cfg.seed).as_dict()
            entries.append(entry)
        log.info("screen at epoch %d: %s", epoch, ", ".join(f"{e['name']} {e['miou']['point']:.4f}" for e in entries))
        return {"epoch": epoch, "entries": entries}

    def drop_losers(self, names: list[str], alive: list[str]) -> None:
        """Screen losers' checkpoints go (their metrics, curves and OOF maps stay): disk for the folds."""
        for name in set(names) - set(alive):
            folder = self.folder(name, 0)
            for path in (folder.best, folder.last):
                path.unlink(missing_ok=True)

    def reserve_s(self) -> float:
        """The planned seconds of what follows training (predictions, ensemble, post-processing, submit)."""
        tail = ("predict", "ensemble", "post-processing", "submit")
        return sum(st["seconds"] for st in self.s["stages"] if st["name"].startswith(tail))

    def later_training_s(self, after: tuple[str, ...] = ("folds", "refit", "pseudo")) -> float:
        """The planned seconds of the training stages that follow (the survivors' folds, the refit, the
        pseudo-label round)."""
        return sum(st["seconds"] for st in self.s["stages"] if st["name"].startswith(after))

    def share(self, runs_left: int, later_s: float = 0.0) -> float:
        left = self.p.clock.remaining() - self.reserve_s() - later_s
        return max(MIN_RUN_S, TIME_BUDGET_SLACK * left / max(1, runs_left))

    def train_more(self, survivors: list[str]) -> dict[str, list[int]]:
        """The survivors' further folds (or the winner's refit): survivor -> its folds (-1: the refit)."""
        folds = int(self.s["folds"])
        pseudo_s = self.later_training_s(("pseudo",))
        jobs = [(n, f) for f in range(1, folds) for n in survivors]
        if self.s["refit"]:
            jobs.append((survivors[0], -1))
        for i, (name, fold) in enumerate(jobs):
            self.train(name, fold, seconds=self.share(len(jobs) - i, pseudo_s))
        out = {n: list(range(folds)) for n in survivors}
        if self.s["refit"]:
            out[survivors[0]].append(-1)
        return out

    def test_scale(self, name: str, multi: bool) -> float:
        return store_scale(self.candidate(name)["size"], common_image_size(self.p.test), multi)

    def member(self, name: str, folds: list[int], tta: str, experiment: str | None = None) -> Member:
        runs = [self.folder(name, f, experiment) for f in folds]
        oof = [str(r.store("val", tta)) for r in runs if f_of(r) >= 0]
        test = [str(r.store("test", tta)) for r in runs if r.store("test", tta).is_dir()]
        return Member(experiment or name, str(self.folder(name, 0, experiment).path.parent), tta, oof, test)

    def choose_tta(self, name: str, folds: list[int]) -> tuple[str, Any]:
        """The TTA set by the selection rule on the strongest survivor's OOF over its folds."""
        return self.p.choose_tta([self.folder(name, f).path for f in folds if f >= 0], tagged=True)

    def predict_all(self, trained: dict[str, list[int]], tta: str, experiment: str | None = None) -> None:
        """OOF with ``tta`` for every fold, test for every fold (the refit alone when there is one)."""
        for name, folds in trained.items():
            test_folds = [-1] if -1 in folds else folds
            for f in folds:
                folder = self.folder(name, f, experiment)
                if f >= 0:
                    self.predict(folder, "val", tta)
                if f in test_folds:
                    self.predict(folder, "test", tta, scale=self.test_scale(name, len(test_folds) > 1))

    def ensemble(self, runs: list[Path], tta: str, name: str) -> Path:
        cfg, ens_dir = self.p.cfg, self.p.ws / "ensembles"
        weights = ens_dir / name / ENSEMBLE_WEIGHTS
        settings = dict(runs=[str(r) for r in runs], tta=tta, data_dir=cfg.data_dir, name=name, out_dir=ens_dir)
        settings.update(postprocess=cfg.postprocess, progress=cfg.progress, seed=cfg.seed)
        stores = [p for r in runs for p in sorted(Path(r).glob(f"fold*/*_{tta}/index.csv"))]
        self.p.stage(
            f"ensemble-{name}", self.p.command_of("pipeline.ensemble", EnsembleConfig, settings), {}, stores, [weights]
        )
        return weights

    def ensemble_cms(self, weights: Path) -> np.ndarray:
        record = EnsembleRecord.read(weights)
        members = [Member(m.name, m.path, m.tta, m.oof_stores, m.test_stores) for m in record.members]
        return self.p.per_image(members, [Fusion.of(record)])[0]

    def pseudo_round(self, survivors: list[str], trained: dict[str, list[int]], tta: str) -> dict[str, list[int]]:
        """The strongest survivor retrained on every fold with the test images' pseudo-labels from the
        other survivors' models of that fold (leak-free); returns its folds under ``<name>-pseudo``."""
        cfg, strongest, k = self.p.cfg, survivors[0], int(self.s["k"])
        experiment = f"{strongest}-pseudo"
        for fold in range(k):
            name = f"{cfg.name}-fold{fold}"
            runs = [str(self.folder(n, fold).path) for n in survivors if fold in trained[n]]
            for n in survivors:
                if fold in trained[n]:
                    self.predict(self.folder(n, fold), "test", tta, scale=self.test_scale(n, True))
            out = self.pseudo_dir / name
            settings = dict(name=name, runs=runs, tta=tta, data_dir=cfg.data_dir, out_dir=self.pseudo_dir)
            settings["progress"] = cfg.progress
            stores = [Path(r) / f"test_{tta}" / "index.csv" for r in runs]
            self.p.stage(
                f"pseudo-{name}",
                self.p.command_of("pipeline.pseudo", PseudoConfig, settings),
                {},
                stores,
                [out / "manifest.json"],
            )
            self.train(strongest, fold, seconds=self.share(k - fold), experiment=experiment, pseudo_dir=str(out))
        done = {strongest: list(range(k))}
        self.predict_all(done, tta, experiment)
        return done

    # ------------------------------------------------------------------------- the whole plan
    def run(self) -> dict[str, Any]:
        survivors = self.screen()
        trained = self.train_more(survivors)
        tta, choice = self.choose_tta(survivors[0], trained[survivors[0]])
        self.predict_all(trained, tta)
        runs = [self.folder(n, 0).path.parent for n in survivors]
        weights = self.ensemble(runs, tta, self.p.cfg.name)
        out: dict[str, Any] = {"survivors": survivors, "trained": trained, "tta": tta, "tta_choice": choice}
        if self.s["pseudo"]:
            done = self.pseudo_round(survivors, trained, tta)
            experiment = f"{survivors[0]}-pseudo"
            with_pseudo = self.ensemble([*runs, self.p.runs_dir / experiment], tta, f"{self.p.cfg.name}-pseudo")
            decision = select(
                [("without pseudo-labels", self.ensemble_cms(weights)), ("with", self.ensemble_cms(with_pseudo))],
                seed=self.p.cfg.seed,
            )
            out["pseudo"] = {"trained": done, "decision": decision.as_dict(), "kept": decision.index == 1}
            if decision.index == 1:
                weights = with_pseudo
        out["weights"] = weights
        out["ladder"] = self.ledger.get("rungs", [])
        return out


def promote(entries: list[dict[str, Any]], n: int, final: bool) -> set[str]:
    """The ``n`` best of a rung's ``entries`` (best first) by OOF mIoU; the final promotion (the one
    before the last rung) takes the best of each family first: the ensemble combines families."""
    ranked = [e["name"] for e in entries]
    if not final:
        return set(ranked[:n])
    firsts: dict[str, str] = {}
    for e in entries:
        firsts.setdefault(e["family"], e["name"])
    order = list(firsts.values()) + [r for r in ranked if r not in firsts.values()]
    return set(order[:n])


def effective_rungs(rungs: list[dict[str, int]], epochs: int) -> list[dict[str, int]]:
    """The rungs that compare: a pause where every run is promoted is left out (it would only cost a
    process and an OOF prediction); the last rung, at the end of the schedule, always stays."""
    kept = [r for r in rungs[:-1] if r["promoted"] < r["runs"]]
    return [*kept, rungs[-1] if rungs else {"epoch": epochs, "runs": 1, "promoted": 1}]


def f_of(folder: RunFolder) -> int:
    """The fold of a run folder (``fold3`` -> 3, ``foldall`` -> -1)."""
    tail = folder.path.name[len("fold") :]
    return -1 if tail == "all" else int(tail)


def ladder_rows(ladder: list[dict[str, Any]]) -> list[list[str]]:
    """The screen as summary rows: each candidate's rung scores with intervals, promoted or not."""
    rows = []
    for rung in ladder:
        for e in rung["entries"]:
            iv = e["miou"]
            text = f"{iv['point']:.4f} [{iv['low']:.4f}, {iv['high']:.4f}]"
            if "gap_to_leader" in e:
                g = e["gap_to_leader"]
                text += f", vs leader {g['point']:+.4f} [{g['low']:+.4f}, {g['high']:+.4f}]"
            rows.append(
                [f"screen epoch {rung['epoch']}: {e['name']}", f"{text} {'promoted' if e['promoted'] else 'out'}"]
            )
    return rows


def describe_folds(trained: dict[str, list[int]]) -> list[list[str]]:
    rows = []
    for name, folds in trained.items():
        parts = [f"fold {f}" for f in folds if f >= 0] + (["refit on all labelled images"] if -1 in folds else [])
        rows.append([f"trained {name}", ", ".join(parts)])
    return rows
