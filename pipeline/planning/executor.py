"""The one executor of a budget plan (:class:`pipeline.planning.schedule.Schedule`), whatever its level:
training on fold 0 (one candidate straight through, or several screened by successive halving), the
survivors' further folds or the winner's refit, the TTA set chosen on OOF, test predictions, the
ensemble across folds and families, the pseudo-label round, then the analysis, the validated
submission, its score and the summary.

Every step is a stage process run through the auto-pilot's stage runner (:class:`Pilot`), stamped and
skipped when unchanged; the screen's rung scores are kept in ``screen.json`` as they are measured, so
a run killed at any point continues where it stopped with the budget that was left.

* Training on fold 0: one candidate trains straight through under a time budget (the plan's
  ``stretch`` lets a run faster than priced train more epochs).  Several are screened: every
  candidate trains fold 0 on its full schedule but pauses at each rung (``stop_epoch=``); the rung
  compares their OOF mIoU (with bootstrap intervals and each one's paired gap to the leader) and
  promotes the better ones, which continue from their last checkpoint on the same schedule, so the
  learning rate never steps back up.  The last promotion keeps the best of each family first (the
  ensemble combines families).  Losers' checkpoints are deleted.
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
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pipeline.core.io import atomic_write_text
from pipeline.core.layout import ENSEMBLE_WEIGHTS, RunFolder, submission_paths
from pipeline.core.records import EnsembleRecord
from pipeline.core.tables import readable_table
from pipeline.data import common_image_size
from pipeline.engine.train_config import TrainConfig
from pipeline.evaluation.analysis_config import AnalyzeConfig
from pipeline.evaluation.selection import bootstrap_miou, format_interval, paired_gain, select
from pipeline.inference.ensemble import Fusion, Member, OofCache, find_member
from pipeline.inference.ensemble_config import EnsembleConfig
from pipeline.inference.predictor import PredictConfig
from pipeline.inference.pseudo_config import PseudoConfig
from pipeline.planning.costs import MIN_RUN_S, PLANNED_BUDGET_FRACTION, RUN_SLACK_FACTOR, store_scale, val_every
from pipeline.planning.processes import Job, command
from pipeline.planning.schedule import LATER_TRAINING, RESERVE, Candidate, Schedule, StageKind
from pipeline.submission.score_config import ScoreConfig
from pipeline.submission.submit_config import SubmitConfig

log = logging.getLogger(__name__)


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
    format: str
    format_reason: str
    job_settings: dict[str, Any]  # what every training and prediction job is given (its share of the host)

    def run(self, jobs: Sequence[Job]) -> None: ...


class ScheduleRun:
    """One plan executed in ``pilot``'s workspace; ``key``: the plan's stamp (its runs' stamps hold it)."""

    def __init__(self, pilot: Pilot, schedule: Schedule, key: str):
        self.p, self.s, self.key = pilot, schedule, key
        self.candidates = {c.name: c for c in schedule.screened}
        self.ledger_path = pilot.ws / "screen.json"
        self.ledger: dict[str, Any] = json.loads(self.ledger_path.read_text()) if self.ledger_path.is_file() else {}
        self.pseudo_dir = pilot.ws / "pseudo"

    # ------------------------------------------------------------------------- one run
    def folder(self, name: str, fold: int, experiment: str | None = None) -> RunFolder:
        return RunFolder.of(self.p.runs_dir, experiment or name, fold)

    def train_settings(self, c: Candidate, fold: int) -> dict[str, Any]:
        r, cfg = c.recipe, self.p.cfg
        settings: dict[str, Any] = dict(
            data_dir=cfg.data_dir,
            folds_file=self.p.folds_file,
            fold=fold,
            model=r.model,
            encoder_weights=cfg.encoder_weights if c.pretrained else None,
            weights_dir=cfg.weights_dir,
            img_size=list(c.size),
            batch_size=r.batch,
            epochs=self.s.epochs * self.s.stretch,  # a time budget sizes a stretched run after its second epoch
            val_every=val_every(self.s.epochs),
            lr=r.lr,
            encoder_lr=r.encoder_lr,
            augment=r.augment,
            runs_dir=self.p.runs_dir,
            experiment=c.name,
            cache_dir=self.p.ws / "cache",
            seed=cfg.seed,
            device=cfg.device,
            progress=cfg.progress,
        )
        if r.encoder:
            settings["encoder"] = r.encoder
        if r.pretrained:
            settings["pretrained"] = r.pretrained
        if c.model_options:
            settings["model_options"] = dict(c.model_options)
        return {**settings, **self.p.job_settings}

    def train(self, name: str, fold: int, stop: int | None = None, later_s: float | None = None, **extra: Any) -> Job:
        """The job that trains ``name`` on ``fold``: paused at ``stop`` (a rung), or under a time budget,
        its share of what is left beside the planned ``later_s`` of training (:meth:`share`)."""
        settings = {**self.train_settings(self.candidates[name], fold), **extra}
        if stop is not None:
            settings["stop_epoch"] = stop
        folder = self.folder(name, fold, settings["experiment"])
        args = command("pipeline.train", TrainConfig, settings, self.p.recipe)
        outputs = [folder.best] + ([folder.oof / "meta.json"] if fold >= 0 else [])
        tag = f"{settings['experiment']}-{folder.path.name}" + (f"-e{stop}" if stop is not None else "")
        inputs = [self.p.folds_file, self.p.coco.path, *self.p.recipe_files]
        budget = None if later_s is None else (lambda left: self.share(left, later_s))
        return Job(f"train-{tag}", args, {"plan": self.key}, inputs, outputs, budget)

    def predict(self, folder: RunFolder, split: str, tta: str, scale: float | None = None) -> Job:
        """The job that predicts ``folder``'s ``split`` with ``tta``; test maps at ``scale`` of the images' size."""
        cfg = self.p.cfg
        settings: dict[str, Any] = dict(run_dir=folder.path, data_dir=cfg.data_dir, split=split, tta=tta)
        settings.update(device=cfg.device, progress=cfg.progress)
        if split == "test":
            settings["store_scale"] = f"{scale:.4g}"
        settings.update({k: v for k, v in self.p.job_settings.items() if k == "num_workers"})
        name = f"predict-{folder.path.parent.name}-{folder.path.name}-{split}-{tta}"
        args = command("pipeline.predict", PredictConfig, settings)
        return Job(name, args, {}, [folder.best], [folder.store(split, tta) / "meta.json"])

    def per_image(self, members: list[Member], fusions: list[Fusion]) -> list[np.ndarray]:
        """Per-image OOF confusion matrices of each fusion of ``members`` (cached in the workspace)."""
        with OofCache(members, self.p.coco, folder=self.p.ws, seed=self.p.cfg.seed, progress=False) as cache:
            return cache.per_image_confusions(fusions)

    # ------------------------------------------------------------------------- time
    def share(self, runs_left: int, later_s: float = 0.0) -> float:
        """The time budget of the next of ``runs_left`` runs: its share of what is left after the planned
        later training (``later_s``), the reserve and the plan's margin, the runs side by side on the
        plan's slots; never more than is left."""
        margin = (1 - PLANNED_BUDGET_FRACTION) * self.p.clock.total
        left = self.p.clock.remaining() - margin - self.s.seconds(RESERVE) - later_s
        rounds = math.ceil(max(1, runs_left) / self.s.slots)
        return max(MIN_RUN_S, min(left, RUN_SLACK_FACTOR * left / rounds))

    # ------------------------------------------------------------------------- fold 0
    def screen(self) -> list[str]:
        """Fold 0 of every candidate; returns the survivors, strongest first.  One candidate trains
        straight through; several are screened by successive halving."""
        names = [c.name for c in self.s.screened]
        later = self.s.seconds(LATER_TRAINING)
        if len(names) == 1:
            self.p.run([self.train(names[0], 0, later_s=later)])
            return names
        rungs = effective_rungs(self.s.rungs, self.s.epochs)
        if self.ledger.get("key") != self.key:
            self.ledger = {"key": self.key, "rungs": []}
        alive = names
        for i, rung in enumerate(rungs):
            last = i == len(rungs) - 1
            done = self.ledger["rungs"][i] if i < len(self.ledger["rungs"]) else None
            if done is None:  # the final rung runs to the end of its schedule, shortened if time runs out
                jobs = [
                    self.train(n, 0, later_s=later) if last else self.train(n, 0, stop=rung["epoch"]) for n in alive
                ]
                self.p.run(jobs)
                done = self.score_rung(rung["epoch"], alive)
                keep = promote(done["entries"], rung["promoted"], final=i >= len(rungs) - 2)
                for entry in done["entries"]:
                    entry["promoted"] = entry["name"] in keep
                self.ledger["rungs"].append(done)
                atomic_write_text(self.ledger_path, json.dumps(self.ledger, indent=2))
            alive = [e["name"] for e in done["entries"] if e["promoted"]]
        self.drop_losers(names, alive)
        return alive

    def score_rung(self, epoch: int, names: list[str]) -> dict[str, Any]:
        members = [Member(n, str(self.folder(n, 0).path), None, [str(self.folder(n, 0).oof)], []) for n in names]
        cms = dict(zip(names, self.per_image(members, Fusion.singles(len(members))), strict=True))
        seed = self.p.cfg.seed
        ivs = {n: bootstrap_miou(cm, seed=seed) for n, cm in cms.items()}
        leader = max(names, key=lambda n: ivs[n].point)
        entries = []
        for n in sorted(names, key=lambda n: -ivs[n].point):
            entry = {"name": n, "family": self.candidates[n].family, "miou": ivs[n].as_dict()}
            if n != leader:
                entry["gap_to_leader"] = paired_gain(cms[leader], cms[n], seed=seed).as_dict()
            entries.append(entry)
        log.info("screen at epoch %d: %s", epoch, ", ".join(f"{e['name']} {e['miou']['point']:.4f}" for e in entries))
        return {"epoch": epoch, "entries": entries}

    def drop_losers(self, names: list[str], alive: list[str]) -> None:
        """Screen losers' checkpoints go (their metrics, curves and OOF maps stay): disk for the folds."""
        for name in set(names) - set(alive):
            folder = self.folder(name, 0)
            for path in (folder.best, folder.last):
                path.unlink(missing_ok=True)

    # ------------------------------------------------------------------------- more folds, predictions
    def train_more(self, survivors: list[str]) -> dict[str, list[int]]:
        """The survivors' further folds (or the winner's refit): survivor -> its folds (-1: the refit)."""
        pseudo_s = self.s.seconds([StageKind.PSEUDO])
        jobs = [(n, f) for f in range(1, self.s.folds) for n in survivors]
        if self.s.refit:
            jobs.append((survivors[0], -1))
        self.p.run([self.train(name, fold, later_s=pseudo_s) for name, fold in jobs])
        out = {n: list(range(self.s.folds)) for n in survivors}
        if self.s.refit:
            out[survivors[0]].append(-1)
        return out

    def test_scale(self, name: str, multi: bool) -> float:
        return store_scale(self.candidates[name].size, common_image_size(self.p.test), multi)

    def choose_tta(self, name: str, folds: list[int]) -> tuple[str, Any]:
        """The TTA set by the selection rule (simplest first) on the strongest survivor's OOF over its
        folds taken as one member; test labels are never used."""
        runs = [self.folder(name, f) for f in folds if f >= 0]
        self.p.run([self.predict(folder, "val", tta) for tta in self.s.tta for folder in runs])
        paths = [r.path for r in runs]
        members = [find_member(str(paths[0].parent), tta=t, name=t, folds=paths) for t in self.s.tta]
        cms = self.per_image(members, Fusion.singles(len(members)))
        choice = select(list(zip(self.s.tta, cms, strict=True)), seed=self.p.cfg.seed)
        return choice.chosen, choice

    def predict_all(self, trained: dict[str, list[int]], tta: str, experiment: str | None = None) -> None:
        """OOF with ``tta`` for every fold, test for every fold (the refit alone when there is one)."""
        jobs = []
        for name, folds in trained.items():
            test_folds = [-1] if -1 in folds else folds
            for f in folds:
                folder = self.folder(name, f, experiment)
                if f >= 0:
                    jobs.append(self.predict(folder, "val", tta))
                if f in test_folds:
                    jobs.append(self.predict(folder, "test", tta, scale=self.test_scale(name, len(test_folds) > 1)))
        self.p.run(jobs)

    # ------------------------------------------------------------------------- ensembles, pseudo-labels
    def ensemble(self, runs: list[Path], tta: str, name: str) -> Path:
        cfg, ens_dir = self.p.cfg, self.p.ws / "ensembles"
        weights = ens_dir / name / ENSEMBLE_WEIGHTS
        settings = dict(runs=[str(r) for r in runs], tta=tta, data_dir=cfg.data_dir, name=name, out_dir=ens_dir)
        settings.update(postprocess=",".join(self.s.postprocess) or "none", progress=cfg.progress, seed=cfg.seed)
        stores = [p for r in runs for p in sorted(Path(r).glob(f"fold*/*_{tta}/index.csv"))]
        args = command("pipeline.ensemble", EnsembleConfig, settings)
        self.p.run([Job(f"ensemble-{name}", args, {}, stores, [weights])])
        return weights

    def ensemble_cms(self, weights: Path) -> np.ndarray:
        record = EnsembleRecord.read(weights)
        members = [Member(m.name, m.path, m.tta, m.oof_stores, m.test_stores) for m in record.members]
        return self.per_image(members, [Fusion.of(record)])[0]

    def pseudo_round(self, survivors: list[str], trained: dict[str, list[int]], tta: str) -> dict[str, list[int]]:
        """The strongest survivor retrained on every fold with the test images' pseudo-labels from the
        other survivors' models of that fold (leak-free); returns its folds under ``<name>-pseudo``."""
        cfg, strongest, k = self.p.cfg, survivors[0], self.s.k
        experiment = f"{strongest}-pseudo"
        predictions, labels, training = [], [], []
        for fold in range(k):
            name = f"{cfg.name}-fold{fold}"
            runs = [str(self.folder(n, fold).path) for n in survivors if fold in trained[n]]
            predictions += [
                self.predict(self.folder(n, fold), "test", tta, scale=self.test_scale(n, True))
                for n in survivors
                if fold in trained[n]
            ]
            out = self.pseudo_dir / name
            settings = dict(name=name, runs=runs, tta=tta, data_dir=cfg.data_dir, out_dir=self.pseudo_dir)
            settings["progress"] = cfg.progress
            stores = [Path(r) / f"test_{tta}" / "index.csv" for r in runs]
            args = command("pipeline.pseudo", PseudoConfig, settings)
            labels.append(Job(f"pseudo-{name}", args, {}, stores, [out / "manifest.json"]))
            training.append(self.train(strongest, fold, later_s=0.0, experiment=experiment, pseudo_dir=str(out)))
        for phase in (predictions, labels, training):  # each needs the one before
            self.p.run(phase)
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
        if self.s.pseudo:
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
        out["ladder"] = self.ledger.get("rungs", [])
        result = report(self.p, weights)
        table = summary(self.p, self.s, out, result)
        return {**result, "tta": tta, "ladder": out["ladder"], "trained": trained, "summary": table}


# ----------------------------------------------------------------------------- after the ensemble
def report(pilot: Pilot, weights: Path) -> dict[str, Any]:
    """The ensemble's analysis, the submission and (labels permitting) its score."""
    cfg, name, ens_dir = pilot.cfg, weights.parent.name, weights.parent.parent
    settings = dict(name=name, ensembles_dir=ens_dir, data_dir=cfg.data_dir)
    settings.update(out_dir=pilot.ws / "analysis", progress=cfg.progress)
    out = [pilot.ws / "analysis" / name / "report.md"]
    pilot.run([Job("analyze", command("pipeline.analyze", AnalyzeConfig, settings), {}, [weights], out)])
    csv_path = submit(pilot, weights)
    result: dict[str, Any] = {"submission": str(csv_path), "ensemble": str(weights)}
    gt = Path(cfg.gt) if cfg.gt else Path(cfg.data_dir) / "test_gt.json"
    if gt.exists():
        score = pilot.ws / "score.json"
        args = command("pipeline.score", ScoreConfig, dict(sub=csv_path, gt=gt, data_dir=cfg.data_dir, out_json=score))
        pilot.run([Job("score", args, {}, [csv_path, gt], [score])])
        result["score"] = json.loads(score.read_text())
    return result


def submit(pilot: Pilot, weights: Path) -> Path:
    """The submission step; ``format`` is passed on as given (the stage resolves ``auto`` the same way
    and records why in its manifest), and the stamp holds the resolved format: a sample submission
    whose header now says another format writes the file again, an unchanged one not."""
    cfg = pilot.cfg
    csv_path, manifest = submission_paths(cfg.submissions_dir, cfg.name)
    settings = dict(name=cfg.name, format=cfg.format, ensemble=weights, data_dir=cfg.data_dir)
    settings.update(out_dir=cfg.submissions_dir, progress=cfg.progress)
    stamp = {"format": pilot.format} if cfg.format == "auto" else {}  # explicit formats: stamps as before
    args = command("pipeline.submit", SubmitConfig, settings)
    pilot.run([Job("submit", args, stamp, [weights], [csv_path, manifest])])
    return csv_path


# ----------------------------------------------------------------------------- the summary
def summary(pilot: Pilot, schedule: Schedule, out: dict[str, Any], result: dict[str, Any]) -> str:
    """The summary of any plan: its shape, the weights its runs started from, the screen's ladder, the
    folds or refit, the ensemble's members and weights, the TTA, pseudo-label and post-processing
    decisions, the shake-up estimate, the score, the minutes and the files."""
    ens = EnsembleRecord.read(result["ensemble"])
    rows = [["plan", f"level {schedule.level}: {schedule.description}, {schedule.epochs} epochs a run"]]
    if schedule.slots > 1:
        rows.append(
            ["devices", f"{schedule.slots} side by side (the minutes of jobs below are each job's own, summed)"]
        )
    rows += [[f"weights of {c.name}", c.describe_weights()] for c in schedule.screened if c.name in out["survivors"]]
    rows += ladder_rows(out["ladder"])
    rows += describe_folds(out["trained"])
    rows += [
        [f"member {m.name}", f"OOF {format_interval(m.scores['oof_miou_interval'])}, weight {m.weight:.3f}"]
        for m in ens.members
    ]
    chosen = f": {ens.oof['chosen']}" if ens.oof.get("chosen") else ""
    rows.append(["ensemble", f"OOF {format_interval(ens.oof['ensemble_interval'])}{chosen}"])
    rows += [
        [f"TTA {c.candidate} vs {c.current}", f"OOF gain {c.gain:+.4f} [{c.low:+.4f}, {c.high:+.4f}] {verdict(c)}"]
        for c in out["tta_choice"].comparisons
    ]
    if "pseudo" in out:
        for c in out["pseudo"]["decision"]["comparisons"]:
            gain = f"{c['gain']:+.4f} [{c['low']:+.4f}, {c['high']:+.4f}]"
            rows.append(["pseudo-label round", f"OOF gain {gain} {'kept' if c['accepted'] else 'refused'}"])
    post = ens.report.get("postprocess") or {}
    tried = post.get("tried") or (
        [{"candidate": schedule.postprocess[0], "current": "none", **post["oof_gain"], "accepted": post["accepted"]}]
        if post.get("oof_gain") and schedule.postprocess
        else []
    )
    for c in tried:
        gain = f"{c['gain']:+.4f} [{c['low']:+.4f}, {c['high']:+.4f}]"
        rows.append([f"post-processing {c['candidate']} vs {c['current']}", f"OOF gain {gain} {verdict_of(c)}"])
    rows.append(["TTA chosen", out["tta"]])
    if "shakeup" in ens.report:
        shake = ens.report["shakeup"]
        gap = shake["abs_gap"]
        rows.append(
            [
                "public/private gap",
                f"median {gap['point']:.4f}, 90% range [{gap['low']:.4f}, {gap['high']:.4f}] "
                f"({shake['test_images']} test images)",
            ]
        )
    if "score" in result:
        rows.append(["test mIoU (labels)", f"{result['score']['miou']:.4f}"])
    rows += [[f"minutes: {k}", f"{v / 60:.1f}"] for k, v in pilot.clock.stages.items()]
    rows.append(["minutes: total (wall clock)", f"{pilot.clock.spent() / 60:.1f} of {pilot.clock.total / 60:.1f}"])
    rows.append(["submission", f"{result['submission']} ({pilot.format}: {pilot.format_reason})"])
    rows.append(["workspace", str(pilot.ws)])
    return readable_table(["summary", ""], rows, "ll")


def verdict(comparison: Any) -> str:
    return "accepted" if comparison.accepted else "refused"


def verdict_of(comparison: dict[str, Any]) -> str:
    return "kept" if comparison["accepted"] else "refused"


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
