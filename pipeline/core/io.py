"""Atomic file writes: a file is replaced whole or not at all, and logging set-up."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from pipeline.core.errors import PipelineError

_UMASK = os.umask(0)
os.umask(_UMASK)


FAULT_ENV = "PIPELINE_FAULT"


def fault_point(name: str) -> None:
    """Reliability tests: the process kills itself (SIGKILL) here when ``$PIPELINE_FAULT`` names
    this point, e.g. ``before-rename:last.pt`` (a temporary file is written, not yet renamed)."""
    if os.environ.get(FAULT_ENV) == name:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs) -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success it replaces ``path`` in one rename.

    If the block raises, the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise PipelineError(f"{path}: cannot write here ({exc.strerror or exc})") from exc
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual permissions
    try:
        with os.fdopen(fd, mode, **kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        fault_point(f"before-rename:{path.name}")
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise PipelineError(
            f"{path}: cannot write ({exc.strerror or exc}); the earlier file, if any, is unchanged"
        ) from exc
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def exclusive_lock(path: str | Path) -> Iterator[None]:
    """An exclusive ``flock`` on the file ``path`` (created, with its folder, when missing) for the block:
    processes doing the same work take turns.  A no-op where ``fcntl`` does not exist (not POSIX)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on POSIX
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_open(path, "w", encoding="utf-8", newline="") as fh:
        fh.write(text)
    return Path(path)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_open(path, "wb") as fh:
        fh.write(data)
    return Path(path)


def atomic_torch_save(obj, path: str | Path) -> Path:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())


def read_yaml(path: str | Path, missing: str, error: type[PipelineError] = PipelineError) -> Any:
    """The YAML document of ``path``; ``error`` names the file when it is missing (``missing`` says what
    to do) or not YAML."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {missing}")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise error(f"{path}: invalid YAML ({exc})") from exc


def setup_logging(level: str | int = "INFO") -> None:
    logging.basicConfig(
        level=level if isinstance(level, int) else getattr(logging, str(level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
