"""Complete checkpoints, written atomically, and reading them back.

A checkpoint holds model, optimizer, scheduler, scaler, the hooks' states (EMA under
``ema``), epoch, best metric, history, RNG states, the resolved config, class names,
training size and preprocessing.  :class:`CheckpointSaver` serializes once per save and
writes the same bytes to ``best.pt`` (when the epoch improved) and then ``last.pt``, each
through a temporary file and a rename: a kill at any moment leaves the earlier files whole.
"""

from __future__ import annotations

import io
import json
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_write_bytes, atomic_write_text
from pipeline.core.layout import RunFolder


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def serialize(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
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

    def load_last(self) -> dict[str, Any] | None:
        return read_checkpoint(self.folder.last) if self.folder.last.exists() else None


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint file as a dict; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many types for a corrupt file
        raise PipelineError(f"{path}: unreadable checkpoint ({exc})") from exc
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise PipelineError(f"{path}: not a checkpoint of this pipeline (no model state or config)")
    return ckpt


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


def load_checkpoint_model(path: str | Path, device: torch.device | str = "cpu", use_ema: bool = True):
    """Model (in eval mode), its resolved training config and the checkpoint dict of a ``.pt`` file."""
    from pipeline.core.config import config_from_dict
    from pipeline.engine.runtime import channels_last_pays
    from pipeline.engine.train_config import TrainConfig
    from pipeline.models import build_model

    ckpt = read_checkpoint(path)
    cfg = config_from_dict(TrainConfig, ckpt["config"], str(path))
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
