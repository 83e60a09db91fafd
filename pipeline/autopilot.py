"""Budgeted auto-pilot stage: ``make all DATA_DIR=... BUDGET=20m NAME=x``.

From any contest-layout folder to a validated (and, when labels exist, scored) submission within a
wall-time budget.  Everything lives in one workspace ``work/<NAME>/``; each step runs as its own stage
process (the same commands as the Makefile's targets) and is skipped when a stamp of its inputs and
settings matches.

The plan comes from the one planner (:mod:`pipeline.planning.planner`), priced by the throughput probe
on this device, and is printed before any long work; a plan already in the workspace whose stamp
matches (``make plan`` with the same data, budget and device, or an earlier, killed run) is executed
as it stands, without probing again.  Then the folds (keyed by the annotation file's digest;
near-duplicate groups kept in one fold) and the one executor (:mod:`pipeline.planning.executor`) for
every level: training, TTA chosen on OOF, predictions, ensemble, pseudo-labels, analysis, the
validated submission (``format=auto``: the header of the data folder's ``sample_submission.csv``,
else rle), its score, and a summary table.  Killed and re-run, it continues with the budget that was
left."""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.config import ConfigError, stage_main
from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_write_text
from pipeline.data import load_coco
from pipeline.data.folds_config import FoldsConfig
from pipeline.planning.budget import BudgetClock, format_duration, parse_budget
from pipeline.planning.executor import ScheduleRun
from pipeline.planning.fingerprint import fingerprint_of
from pipeline.planning.processes import Job, Slots, WorkspaceLock, command, run_stage
from pipeline.planning.schedule import Schedule, StageKind
from pipeline.planning.settings import BudgetPlan, BudgetSettings, probe_costs
from pipeline.planning.stamps import Stamps, stamp_key
from pipeline.submission.formats import FORMATS, resolve_format

log = logging.getLogger(__name__)


@dataclass
class AutopilotConfig(BudgetSettings):
    name: str = "auto"  # workspace work/<name>/ and submissions/<name>.csv
    format: str = "auto"  # auto: the header of <data_dir>/sample_submission.csv, else rle; rle; dense
    gt: str | None = None  # test labels for the final score only; default <data_dir>/test_gt.json when present
    submissions_dir: str = "submissions"
    seed: int = 42
    progress: bool = True

    def validate(self) -> None:
        super().validate()
        if self.format not in ("auto", *FORMATS):
            raise ConfigError(f"format: unknown {self.format!r}; known: auto, {', '.join(FORMATS)}")


def workspace_of(cfg: AutopilotConfig) -> Path:
    """``work_dir/NAME``: everything one budgeted run writes but its submission."""
    return Path(cfg.work_dir) / cfg.name


class Autopilot:
    """One budgeted run: the workspace, the clock, the stamps and the stage runner."""

    def __init__(self, cfg: AutopilotConfig):
        self.cfg = cfg
        # before any work: a sample submission with an unknown header fails now, not after training
        self.format, self.format_reason = resolve_format(cfg.format, cfg.data_dir)
        self.recipe = cfg.training_recipe()
        self.recipe_files = cfg.recipe_files()  # every file of the recipe's base: chain
        self.budget_s = parse_budget(cfg.budget)
        self.ws = workspace_of(cfg)
        self.ws.mkdir(parents=True, exist_ok=True)
        self.clock = BudgetClock(self.ws / "state.json", self.budget_s)
        self.stamps = Stamps(self.ws / "stamps")
        self.coco = load_coco(cfg.data_dir, "train_all.json")
        self.test = load_coco(cfg.data_dir, "test.json", require_annotations=False)
        self.folds_file = self.ws / "folds" / self.coco.digest[:12] / "folds.csv"
        self.runs_dir = self.ws / "runs"
        self.slots, self.gpus = 1, []  # the plan's device slots (use_slots), the GPU of each
        self.job_settings: dict[str, Any] = {"threads": cfg.threads} if cfg.threads else {}
        self._jobs_lock = threading.Lock()

    def stage(
        self,
        name: str,
        args: list[str],
        settings: dict[str, Any],
        inputs: Sequence[Path],
        outputs: Sequence[Path],
        volatile: Sequence[str] = (),
        slot: int | None = None,
    ) -> bool:
        """Run ``python -m pipeline.<args> <volatile>`` unless its stamp matches; False when skipped.
        ``volatile`` arguments (the time left) are passed but not part of the stamp.  ``slot``: the device
        slot it runs on beside others (its own GPU, its output in ``logs/<name>.log``); None: the only
        one.  The clock counts its seconds under the stage's module (train, predict, ensemble, ...), and
        ``jobs.jsonl`` keeps when it started and ended, and where."""
        key = stamp_key({"args": args, **settings}, list(inputs))
        if self.stamps.done(name, key):
            log.info("%s: unchanged, skipped", name)
            return False
        cmd = [sys.executable, "-m", *args, *volatile]
        where = "" if slot is None else f" [slot {slot}, log {self.ws / 'logs' / name}.log]"
        log.info("%s%s: %s", name, where, " ".join(shlex.quote(a) for a in cmd[2:]))
        started, wall = time.monotonic(), time.time()
        if slot is None:
            returncode = run_stage(cmd)
        else:
            (self.ws / "logs").mkdir(exist_ok=True)
            with open(self.ws / "logs" / f"{name}.log", "a") as out:
                returncode = run_stage(cmd, self.slot_env(slot), out)
        seconds = time.monotonic() - started
        self.clock.add_stage(args[0].removeprefix("pipeline."), seconds)
        record = {"name": name, "slot": slot, "start": wall, "end": wall + seconds, "exit": returncode}
        with self._jobs_lock, open(self.ws / "jobs.jsonl", "a") as ledger:
            ledger.write(json.dumps(record) + "\n")
        if returncode != 0:
            raise PipelineError(f"{name} failed (exit {returncode}): {' '.join(cmd[2:])}")
        self.stamps.mark(name, key, list(outputs))
        return True

    def slot_env(self, slot: int) -> dict[str, str]:
        """The environment of a job on ``slot``: that one GPU visible (on a CPU, this one's)."""
        env = dict(os.environ)
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = self.gpus[slot % len(self.gpus)]
        return env

    def run(self, jobs: Sequence[Job]) -> None:
        """The independent jobs of one phase, side by side on the plan's slots."""

        def one(job: Job, slot: int | None, left: int) -> None:
            volatile = [f"time_budget={job.budget_s(left):.0f}"] if job.budget_s is not None else []
            self.stage(job.name, job.args, job.settings, job.inputs, job.outputs, volatile, slot)

        Slots(self.slots, one).run(jobs)

    def use_slots(self, slots: int, kind: str) -> None:
        """Run the plan's jobs on ``slots`` slots, GPUs (one visible to each job) or shares of this CPU,
        each job given its share of the host's cores (``job_settings``: loader workers on a GPU, torch
        threads on a CPU; with one slot, only the run's own ``threads``)."""
        self.slots = slots
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self.job_settings = {"threads": self.cfg.threads} if self.cfg.threads else {}
        if kind == "gpu" and slots > 1:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            ids = [v.strip() for v in visible.split(",") if v.strip()] if visible else []
            self.gpus = ids or [str(i) for i in range(slots)]
            self.job_settings["num_workers"] = max(1, min(8, (cpus - slots) // slots))
        elif slots > 1:
            self.job_settings.setdefault("threads", max(1, cpus // slots))

    def folds(self) -> None:
        settings = dict(data_dir=self.cfg.data_dir, out_dir=self.folds_file.parent, k=self.cfg.k, seed=self.cfg.seed)
        settings.update(cache_dir=self.ws / "cache", group_by="similar")  # near-duplicates stay in one fold
        self.run(
            [Job("folds", command("pipeline.folds", FoldsConfig, settings), {}, [self.coco.path], [self.folds_file])]
        )

    def planning(self) -> BudgetPlan:
        """The planning of this run on this device (its probe measures only when asked to price)."""
        recipe_cfg = self.cfg.recipe_config()
        fp = fingerprint_of(self.coco, self.test, self.coco.image_ids, recipe_cfg.rfs_threshold)
        costs = probe_costs(self.cfg, fp, recipe_cfg, self.budget_s)
        return BudgetPlan(self.cfg, fp, costs, recipe_cfg)

    def plan(self) -> tuple[Schedule, str, str]:
        """The plan this run executes, its stamp and its text: the one kept in ``plan.json`` while its
        stamp matches, else planned now for the budget that earlier, killed attempts left (and kept)."""
        planning = self.planning()
        schedule = planning.kept(self.ws)
        if schedule is None:
            schedule = planning.schedule(self.budget_s - self.clock.spent_before)
            self.clock.add_stage("probe", planning.costs.seconds)
            text = planning.write(self.ws, schedule, "make all")
        else:
            text = planning.text(schedule)
        self.use_slots(schedule.slots, planning.costs.kind)
        return schedule, planning.key, text


def check_disk(ws: Path, planned_mb: float, cache_mb: float = 0.0) -> bool:
    """Refuse before any long work when the workspace's disk cannot hold what the plan still has to
    write (its estimate less what the workspace already holds, so a re-run of a finished or
    half-finished run is not refused): a full disk would stop the run at its first checkpoint.
    Returns whether the image cache (``cache_mb`` of the estimate) fits too; without it the run goes on."""
    written_mb = sum(f.stat().st_size for f in ws.rglob("*") if f.is_file()) / 1e6
    needed_mb = planned_mb - written_mb
    free_mb = shutil.disk_usage(ws).free / 1e6
    if needed_mb - cache_mb > free_mb:
        raise PipelineError(
            f"{ws}: the plan writes about {needed_mb - cache_mb:.0f} MB more (checkpoints and probability maps), "
            f"but its disk has {free_mb:.0f} MB free; free some space or pass ARGS='work_dir=<a larger disk>'"
        )
    if needed_mb > free_mb:
        log.warning(
            "%s: %.0f MB free holds the plan's checkpoints and maps but not its %.0f MB image cache: "
            "the images are decoded every epoch instead",
            ws,
            free_mb,
            cache_mb,
        )
        return False
    return True


def run(cfg: AutopilotConfig) -> dict[str, Any]:
    """Run (or continue) the budgeted pipeline; returns the summary figures."""
    cfg.validate()
    workspace_of(cfg).mkdir(parents=True, exist_ok=True)
    with WorkspaceLock(workspace_of(cfg)):  # one run per NAME at a time
        return run_locked(cfg)


def run_locked(cfg: AutopilotConfig) -> dict[str, Any]:
    pilot = Autopilot(cfg)
    try:
        spent = format_duration(pilot.clock.spent_before)
        log.info("budget %s: %s already spent in %s", format_duration(pilot.budget_s), spent, pilot.ws)
        if cfg.format == "auto":
            log.info("format auto -> %s (%s)", pilot.format, pilot.format_reason)
        schedule, key, text = pilot.plan()
        log.info("plan:\n%s", text)
        setup = [s.disk_mb for s in schedule.stages if s.kind is StageKind.SETUP]
        if not check_disk(pilot.ws, schedule.disk_mb, sum(setup)):
            pilot.job_settings["image_cache"] = False
        pilot.folds()
        result = ScheduleRun(pilot, schedule, key).run()
        atomic_write_text(pilot.ws / "summary.txt", result["summary"] + "\n")
        log.info("summary:\n%s", result["summary"])
        return {**result, "plan": text, "spent_s": pilot.clock.spent()}
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
