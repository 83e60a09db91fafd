"""The processes of a budgeted run: each stage's command checked before it starts, one run per workspace
at a time, and stage processes that end with the run that started them, however it ends (Ctrl-C,
``kill``, or a SIGKILL that no handler sees).

Without both, a run killed by SIGKILL left its training stage running, orphaned, and the re-run that
resumes the workspace trained a second model into the same run folder beside it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
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


def run_stage(command: Sequence[str]) -> int:
    """Run a stage's command to its end; its exit status.  The stage's process is ended with this
    one: ``subprocess.run`` kills it on any exception here (Ctrl-C, a SIGTERM turned into SystemExit),
    and on Linux the kernel sends it SIGTERM when this process dies without running any code."""
    return subprocess.run(list(command), check=False, preexec_fn=_end_with_parent()).returncode


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
