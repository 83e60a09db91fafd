"""Reading torch files (``.pt`` / ``.pth`` / ``.bin``) as data: loading a file never runs code from it.

A torch file is a pickle, and unpickling may call any function the file names.  Every torch file
the pipeline reads goes through :func:`load_torch_file`, which unpickles with ``weights_only=True``:
tensors and plain Python values only.  Two ways past that, each narrow:

- ``legacy=True`` (checkpoints of this pipeline): the checkpoints of earlier versions held numpy's
  RNG state as an array and the learning-rate schedule's horizon as an object; they load through an
  allowlist of exactly those types (:func:`legacy_globals`), the horizon as a :class:`LegacyObject`
  (its attributes, no code of its own).
- ``trust_pickle``: the paths of files the user vouches for (the config key ``trust_pickle=``, one
  entry per file); only such a file is unpickled in full, with a warning.

Any other file that needs more is refused with :class:`UnsafeFileError`, which names the file, the
types it asks for and the opt-in.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pipeline.core.errors import ConfigError, PipelineError

log = logging.getLogger(__name__)

TRUST_KEY = "trust_pickle"
# the name of the one class of this package that earlier checkpoints pickled (the learning-rate
# schedule's horizon, total and warmup steps)
LEGACY_HORIZON = "pipeline.engine.optim.Horizon"
_WILDCARDS = ("*", "?", "[")
# where torch's weights-only unpickler says what it stumbled on, after a paragraph about weights_only
UNPICKLER_DETAIL = "WeightsUnpickler error:"


class UnsafeFileError(PipelineError):
    """A torch file that would need full unpickling (which can run code) and is not trusted."""


class LegacyObject:
    """Stands in for an object of an earlier checkpoint format: its attributes, nothing else."""

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def legacy_globals() -> list[Any]:
    """The allowlist of the types earlier checkpoints of this pipeline hold, and nothing more: numpy's
    reconstruction of a uint32 array (its RNG state) and a stand-in for the schedule's horizon."""
    import numpy as np

    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    return [
        (multiarray._reconstruct, "numpy._core.multiarray._reconstruct"),  # written by numpy 2
        (multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),  # written by numpy 1
        np.ndarray,
        np.dtype,
        type(np.dtype(np.uint32)),  # the RNG key array's dtype, rebuilt in place
        (LegacyObject, LEGACY_HORIZON),
    ]


def check_trust_list(paths: Iterable[str], key: str = TRUST_KEY) -> None:
    """``trust_pickle`` names files one by one: no empty entry, no wildcard, no folder."""
    for entry in paths:
        text = str(entry).strip()
        if not text:
            raise ConfigError(f"{key}: an empty entry; name each file you trust by its path")
        if any(c in text for c in _WILDCARDS):
            raise ConfigError(f"{key}: {text!r} has a wildcard; name each file you trust by its path")
        if Path(text).expanduser().is_dir():
            raise ConfigError(f"{key}: {text} is a folder; name each file you trust by its path")


def is_trusted(path: str | Path, trust_pickle: Iterable[str] = ()) -> bool:
    """Whether ``path`` is one of the files named in ``trust_pickle`` (compared as resolved paths)."""
    target = os.path.realpath(Path(path).expanduser())
    return any(os.path.realpath(Path(str(p)).expanduser()) == target for p in trust_pickle)


def unsafe_globals(path: str | Path) -> list[str]:
    """The functions and classes a torch file names outside torch's weights-only allowlist (read
    from the pickle's opcodes, nothing executed); empty when the file cannot be scanned."""
    import torch

    try:
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # an older or foreign format: the refusal then says less
        return []


def refusal(path: str | Path, names: list[str]) -> UnsafeFileError:
    """The error for a file that needs full unpickling: names the file, why, and the opt-in."""
    held = f" (it names {', '.join(names[:6])}{' ...' if len(names) > 6 else ''})" if names else ""
    return UnsafeFileError(
        f"{path}: refused: loading it needs full unpickling{held}, and unpickling can run code stored in "
        f"the file. Checkpoints and weights load as data only (tensors and plain values). If you trust this "
        f"file and where it came from, pass {TRUST_KEY}={path} to load this one file in full; or re-save its "
        f"tensors as .safetensors"
    )


def _names(allowlist: list[Any]) -> set[str]:
    return {g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}" for g in allowlist}


def _detail(exc: BaseException) -> str:
    """The line of a loading error that says what is wrong with the file."""
    text = str(exc)
    if UNPICKLER_DETAIL in text:
        text = text.split(UNPICKLER_DETAIL, 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:300]


def _load(path: Path, weights_only: bool) -> Any:
    import torch

    return torch.load(path, map_location="cpu", weights_only=weights_only)


def load_torch_file(
    path: str | Path, legacy: bool = False, trust_pickle: Iterable[str] = (), what: str = "torch file"
) -> Any:
    """The content of a torch file, loaded as data (see the module docstring); ``legacy``: also the
    types of this pipeline's earlier checkpoints.  Raises :class:`UnsafeFileError` for a file that
    needs more and is not in ``trust_pickle``, ``PipelineError`` for an unreadable one (``what`` it
    was meant to be)."""
    import torch

    path = Path(path)
    try:
        try:
            return _load(path, weights_only=True)
        except pickle.UnpicklingError as exc:
            names = unsafe_globals(path) or re.findall(r"GLOBAL ([\w.]+) was not an allowed global", str(exc))
            if not names:
                raise  # not a question of the types it names: the file is damaged or not a torch file
        if legacy and names and set(names) <= _names(legacy_globals()):
            with torch.serialization.safe_globals(legacy_globals()):
                return _load(path, weights_only=True)
        if not is_trusted(path, trust_pickle):
            raise refusal(path, names)
        log.warning("%s: unpickled in full (named in %s=): only files you trust", path, TRUST_KEY)
        return _load(path, weights_only=False)  # the opt-in: this file only, named by the user
    except PipelineError:
        raise
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, AttributeError, ImportError) as exc:
        raise PipelineError(f"{path}: unreadable {what} ({_detail(exc)})") from exc
