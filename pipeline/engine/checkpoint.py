"""Complete checkpoints, written atomically, and reading them back.

A checkpoint holds model, optimizer, scheduler, scaler, the hooks' states (EMA under
``ema``), epoch, best metric, history, RNG states, the resolved config, class names,
training size and preprocessing.  :class:`CheckpointSaver` serializes once per save and
writes the same bytes to ``best.pt`` (when the epoch improved) and then ``last.pt``, each
through a temporary file and a rename: a kill at any moment leaves the earlier files whole.

A checkpoint holds tensors and plain Python values only (:func:`as_data`), so it loads with
``weights_only=True``: reading one never runs code from it.  :func:`read_checkpoint` is the one
reader; checkpoints of earlier versions (numpy's RNG state as an array, the schedule's horizon as an
object) load through the allowlist of exactly those types and come back in today's form.
"""

from __future__ import annotations

import io
import json
import math
import random
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_write_bytes, atomic_write_text
from pipeline.core.layout import RunFolder
from pipeline.core.torch_files import load_torch_file


def numpy_rng(state: Any) -> dict[str, Any]:
    """numpy's global RNG state as plain values: ``np.random.get_state()``'s tuple (its key array
    as an int64 tensor), or the dict this returns."""
    if isinstance(state, dict):
        return state
    kind, keys, pos, has_gauss, cached = state
    keys = torch.as_tensor(np.asarray(keys, dtype=np.int64))
    return {"kind": str(kind), "keys": keys, "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)}


def rng_state() -> dict[str, Any]:
    """The RNG states of Python, numpy, torch (and CUDA) as tensors and plain values."""
    state = {"python": random.getstate(), "numpy": numpy_rng(np.random.get_state()), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss))
    rng = numpy_rng(state["numpy"])
    keys = np.asarray(rng["keys"], dtype=np.int64).astype(np.uint32)
    np.random.set_state((rng["kind"], keys, rng["pos"], rng["has_gauss"], rng["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def as_data(obj: Any, where: str = "checkpoint") -> Any:
    """``obj`` as tensors and plain Python values, what loads with ``weights_only=True``: numpy
    numbers become Python numbers, numpy arrays tensors, paths strings; another object is an error
    naming where it sits (a checkpoint never holds one)."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if obj is None or type(obj) in (bool, int, float, str, bytes) or isinstance(obj, (torch.Tensor, torch.Size)):
        return obj
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, dict):
        items = ((k, as_data(v, f"{where}.{k}")) for k, v in obj.items())
        return OrderedDict(items) if isinstance(obj, OrderedDict) else dict(items)
    if isinstance(obj, (list, tuple)):
        items = [as_data(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    raise TypeError(f"{where}: a {type(obj).__qualname__} is not data (checkpoints hold tensors and plain values)")


def serialize(obj: Any) -> bytes:
    """The bytes of a checkpoint: ``obj`` through :func:`as_data`, saved by torch."""
    buf = io.BytesIO()
    torch.save(as_data(obj), buf)
    return buf.getvalue()


class CheckpointSaver:
    """Writes a run's ``best.pt`` / ``last.pt`` from one serialization per save."""

    def __init__(self, folder: RunFolder, keep_top_k: int = 0):
        self.folder = folder
        self.keep_top_k = keep_top_k

    def save(
        self,
        state: dict[str, Any],
        best: bool,
        metric: float | None = None,
        eval_weights: dict[str, torch.Tensor] | None = None,
    ) -> bytes:
        """``best.pt`` (when ``best``) and ``last.pt`` from one serialization; with ``keep_top_k``,
        the evaluation weights of the k best epochs by ``metric`` under ``top/``."""
        data = serialize(state)
        if best:
            atomic_write_bytes(self.folder.best, data)
        atomic_write_bytes(self.folder.last, data)
        if self.keep_top_k and metric is not None and math.isfinite(metric) and eval_weights is not None:
            self._keep_top(state, metric, eval_weights)
        return data

    def top_index(self) -> list[dict[str, Any]]:
        path = self.folder.top / "index.json"
        return json.loads(path.read_text()) if path.is_file() else []

    def _keep_top(self, state: dict[str, Any], metric: float, weights: dict[str, torch.Tensor]) -> None:
        epoch = int(state["epoch"])
        entries = [e for e in self.top_index() if e["epoch"] != epoch]  # a resumed epoch replaces itself
        entries.append({"epoch": epoch, "metric": float(metric), "file": f"epoch{epoch:04d}.pt"})
        entries.sort(key=lambda e: (-e["metric"], e["epoch"]))
        kept, dropped = entries[: self.keep_top_k], entries[self.keep_top_k :]
        if any(e["epoch"] == epoch for e in kept):
            meta = {
                k: state[k]
                for k in ("config", "class_names", "num_classes", "img_size", "preprocessing", "architecture")
                if k in state
            }
            atomic_write_bytes(
                self.folder.top / f"epoch{epoch:04d}.pt",
                serialize({"model": weights, "epoch": epoch, "metric": float(metric), **meta}),
            )
        atomic_write_text(self.folder.top / "index.json", json.dumps(kept, indent=2))
        for e in dropped:
            (self.folder.top / e["file"]).unlink(missing_ok=True)

    def load_last(self, trust_pickle: Iterable[str] = ()) -> dict[str, Any] | None:
        return read_checkpoint(self.folder.last, trust_pickle) if self.folder.last.exists() else None


def _upgrade(ckpt: dict[str, Any]) -> dict[str, Any]:
    """An earlier checkpoint in today's form: numpy's RNG state and the schedule's horizon as plain values."""
    rng = ckpt.get("rng")
    if isinstance(rng, dict) and "numpy" in rng:
        rng["numpy"] = numpy_rng(rng["numpy"])
    scheduler = ckpt.get("scheduler")
    horizon = scheduler.get("horizon") if isinstance(scheduler, dict) else None
    if horizon is not None and not isinstance(horizon, dict):
        scheduler["horizon"] = {"total": int(horizon.total), "warmup": int(horizon.warmup)}
    return ckpt


def read_checkpoint(path: str | Path, trust_pickle: Iterable[str] = ()) -> dict[str, Any]:
    """A checkpoint file as a dict, loaded as data (earlier versions' checkpoints through the allowlist
    of the types they hold); a file that needs full unpickling is refused unless ``trust_pickle``
    names it.  Errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: checkpoint not found")
    ckpt = load_torch_file(path, legacy=True, trust_pickle=trust_pickle, what="checkpoint")
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise PipelineError(f"{path}: not a checkpoint of this pipeline (no model state or config)")
    return _upgrade(ckpt)


def model_state(ckpt: dict[str, Any], use_ema: bool = True) -> dict[str, torch.Tensor]:
    """The weights to predict with: the EMA copy when the checkpoint has one and ``use_ema``."""
    if use_ema and ckpt.get("ema") is not None:
        return {k[len("module.") :]: v for k, v in ckpt["ema"].items() if k.startswith("module.")}
    return ckpt["model"]


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise PipelineError(f"{path}: its weights do not fit the model it describes ({str(exc)[:300]})") from exc


def load_checkpoint_model(
    path: str | Path, device: torch.device | str = "cpu", use_ema: bool = True, trust_pickle: Iterable[str] = ()
):
    """Model (in eval mode), its resolved training config and the checkpoint dict of a ``.pt`` file
    (read by :func:`read_checkpoint`)."""
    from pipeline.engine.runtime import channels_last_pays
    from pipeline.engine.train_config import stored_config
    from pipeline.models import build_model

    ckpt = read_checkpoint(path, trust_pickle)
    cfg = stored_config(ckpt["config"], str(path))
    model = build_model(
        cfg.model,
        num_classes=ckpt["num_classes"],
        encoder=cfg.encoder,
        encoder_weights=None,
        architecture=ckpt.get("architecture"),
        **(cfg.model_options or {}),
    )
    load_model_state(model, model_state(ckpt, use_ema), path)
    model = model.to(device).eval()
    if cfg.channels_last and channels_last_pays(torch.device(device)):
        model = model.to(memory_format=torch.channels_last)  # its convolutions' outputs follow
    return model, cfg, ckpt
