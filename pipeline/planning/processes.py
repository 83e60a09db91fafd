"""The processes of a budgeted run: each stage's command checked before it starts, one run per workspace
at a time, the independent jobs of a plan's phase on several device slots at once (one process each),
and stage processes that end with the run that started them, however it ends (Ctrl-C, ``kill``, or a
SIGKILL that no handler sees).

Without the last two, a run killed by SIGKILL left its training stage running, orphaned, and the re-run
that resumes the workspace trained a second model into the same run folder beside it."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pipeline.core.config import stage_args
from pipeline.core.errors import PipelineError

try:
    import fcntl
except ImportError:  # not on Windows: the workspace is then not locked
    fcntl = None  # type: ignore[assignment]

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _end_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has Linux send the new process SIGTERM when this one dies (by any
    signal), or None where that is not available.  The C function is looked up here, in the parent,
    so that the forked child only calls it."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def arm() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the run died before the signal was armed
            os._exit(128 + signal.SIGTERM)

    return arm


def command(module: str, cls: type, settings: dict[str, Any], recipe: Path | None = None) -> list[str]:
    """A stage's command (module, ``key=value`` items), its keys and values checked against the stage's
    config class before any process starts; with ``recipe``, the stage reads that file alone under the
    items (``--only-config --config FILE``), and the check layers it the same way."""
    flags = ["--only-config", "--config", str(recipe)] if recipe is not None else []
    return [module, *flags, *stage_args(cls, settings, recipe, where=module)]


_RUNNING: set[subprocess.Popen] = set()  # the stage processes running now, whichever thread started them
_RUNNING_LOCK = threading.Lock()


def run_stage(command: Sequence[str], env: Mapping[str, str] | None = None, log: IO[str] | None = None) -> int:
    """Run a stage's command to its end; its exit status.  ``env``: its environment (default this
    one's); ``log``: where its output goes (default this process's).  The stage's process is ended with
    this one: it is killed on any exception here (Ctrl-C, a SIGTERM turned into SystemExit), by
    :func:`stop_stages` from another thread, and on Linux the kernel sends it SIGTERM when the thread
    that started it dies without running any code."""
    out = log if log is not None else None
    proc = subprocess.Popen(
        list(command),
        preexec_fn=_end_with_parent(),
        env=None if env is None else dict(env),
        stdout=out,
        stderr=subprocess.STDOUT if out is not None else None,
    )
    with _RUNNING_LOCK:
        _RUNNING.add(proc)
    try:
        return proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        with _RUNNING_LOCK:
            _RUNNING.discard(proc)


def stop_stages() -> None:
    """Kill every stage process this run has running (the other slots' jobs when one thread stops)."""
    with _RUNNING_LOCK:
        running = list(_RUNNING)
    for proc in running:
        proc.kill()


@dataclass
class Job:
    """One stage process of a plan: ``python -m <args>``, skipped while its stamp (of ``args``,
    ``settings`` and the ``inputs``' contents) matches and its ``outputs`` exist.  ``budget_s``: its time
    budget, given how many jobs of its phase have not started yet (itself included)."""

    name: str
    args: list[str]
    settings: dict[str, Any] = field(default_factory=dict)
    inputs: list[Path] = field(default_factory=list)
    outputs: list[Path] = field(default_factory=list)
    budget_s: Callable[[int], float] | None = None


class Slots:
    """Runs the independent jobs of one phase on ``n`` slots (devices), one process each, and returns
    when all have ended: ``run_one(job, slot, left)`` runs a job on a slot (None: the only one, in this
    thread) with ``left`` jobs of the phase not yet started.  The first failure stops new starts and is
    raised once the running jobs have ended; an interruption (Ctrl-C, SIGTERM) kills them all."""

    def __init__(self, n: int, run_one: Callable[[Job, int | None, int], Any]):
        self.n, self.run_one = max(1, int(n)), run_one

    def run(self, jobs: Sequence[Job]) -> None:
        if self.n == 1 or len(jobs) <= 1:
            for i, job in enumerate(jobs):
                self.run_one(job, None if self.n == 1 else 0, len(jobs) - i)
            return
        free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for slot in range(self.n):
            free.put(slot)
        lock, left, failed = threading.Lock(), [len(jobs)], []

        def one(job: Job) -> None:
            slot = free.get()
            try:
                with lock:
                    if failed:
                        return
                    n_left, left[0] = left[0], left[0] - 1
                self.run_one(job, slot, n_left)
            except BaseException as exc:  # the first failure is raised after the others end
                with lock:
                    failed.append(exc)
            finally:
                free.put(slot)

        pool = ThreadPoolExecutor(self.n, thread_name_prefix="slot")
        try:
            wait([pool.submit(one, job) for job in jobs])
        except BaseException:
            stop_stages()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        if failed:
            raise failed[0]


class WorkspaceLock:
    """An exclusive lock on ``workspace/.lock``, held while a run uses the workspace: a second run of
    the same NAME fails at once, naming the process that holds it.  The kernel releases the lock
    when its holder ends, however it ends, so a killed run never leaves a stale lock behind."""

    def __init__(self, workspace: str | Path):
        self.path = Path(workspace) / ".lock"
        self._file: IO[str] | None = None

    def acquire(self) -> WorkspaceLock:
        if fcntl is None:
            return self
        handle = open(self.path, "a+")  # noqa: SIM115 (held open for the run)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise PipelineError(
                f"{self.path.parent}: another run is using this workspace (pid {holder}); "
                "wait for it to end, stop it, or pass another NAME="
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._file = handle
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the file releases the lock
            self._file = None

    def __enter__(self) -> WorkspaceLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
