"""On-disk store of per-image class probabilities (out-of-fold and test predictions).

Layout of a store folder::

    meta.json      class names, dtype, how the maps were made
    index.csv      image_id, file_name, height, width (the image's own size), stored_height,
                   stored_width, file
    <image_id>.npy one array of shape K x stored_height x stored_width

``dtype`` is ``float16`` (probabilities as they are) or ``uint8`` (probabilities
quantized as round(p * 255); read back as p = v / 255).  One file per image keeps
writing and reading streamed: memory never grows with the number of images.  Maps may
be stored at a lower resolution than the image (for example out-of-fold maps at half the
training size); ``ProbReader.load(image_id, size)`` resizes them bilinearly.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_open, atomic_write_bytes, atomic_write_text
from pipeline.core.layout import STORE_INDEX, STORE_META
from pipeline.data.resize import resize_probs

DTYPES = ("float16", "uint8")
INDEX_COLUMNS = ["image_id", "file_name", "height", "width", "stored_height", "stored_width", "file"]


class ProbWriter:
    """Writes one probability map per image; ``close()`` writes the index (atomically)."""

    def __init__(
        self, folder: str | Path, class_names: Sequence[str], dtype: str = "float16", info: dict | None = None
    ):
        if dtype not in DTYPES:
            raise PipelineError(f"unknown probability dtype {dtype!r}; known: {', '.join(DTYPES)}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.class_names = list(class_names)
        self.dtype = dtype
        self.info = dict(info or {})
        self.rows: list[dict[str, Any]] = []

    def write(self, image_id: int, file_name: str, height: int, width: int, probs) -> None:
        """``probs``: K x h x w probabilities (numpy or torch, any float dtype)."""
        arr = probs.detach().float().cpu().numpy() if isinstance(probs, torch.Tensor) else np.asarray(probs, np.float32)
        if arr.ndim != 3 or arr.shape[0] != len(self.class_names):
            raise ValueError(f"expected {len(self.class_names)} x h x w probabilities, got {arr.shape}")
        if self.dtype == "uint8":
            arr = np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)
        else:
            arr = arr.astype(np.float16)
        name = f"{image_id}.npy"
        buf = io.BytesIO()
        np.save(buf, arr)
        atomic_write_bytes(self.folder / name, buf.getvalue())
        self.rows.append(
            {
                "image_id": int(image_id),
                "file_name": file_name,
                "height": int(height),
                "width": int(width),
                "stored_height": int(arr.shape[1]),
                "stored_width": int(arr.shape[2]),
                "file": name,
            }
        )

    def close(self) -> Path:
        meta = {"class_names": self.class_names, "num_classes": len(self.class_names), "dtype": self.dtype, **self.info}
        atomic_write_text(self.folder / STORE_META, json.dumps(meta, indent=2))
        table = pd.DataFrame(self.rows, columns=INDEX_COLUMNS).sort_values("image_id")
        with atomic_open(self.folder / STORE_INDEX, "w", newline="") as fh:
            table.to_csv(fh, index=False)
        return self.folder

    def __enter__(self) -> ProbWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()


def stores_mask_rule(folders: Sequence[str | Path]) -> str:
    """The mask rule of the training runs behind probability stores (``mask_rule`` of their
    ``meta.json``; stores written before the option existed used ``area``).  Stores made with
    different rules cannot be scored against one ground truth: that is an error."""
    rules: dict[str, str] = {}
    for folder in folders:
        meta = Path(folder) / STORE_META
        try:
            rules[str(folder)] = str(json.loads(meta.read_text()).get("mask_rule", "area"))
        except (OSError, json.JSONDecodeError) as exc:
            raise PipelineError(f"{meta}: unreadable probability store meta ({exc})") from exc
    if len(set(rules.values())) > 1:
        raise PipelineError(
            "the members were trained with different mask rules: " + ", ".join(f"{f}: {r}" for f, r in rules.items())
        )
    return next(iter(rules.values()), "area")


class ProbReader:
    """Random access to a probability store written by :class:`ProbWriter`."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index, meta = self.folder / STORE_INDEX, self.folder / STORE_META
        for p in (index, meta):
            if not p.is_file():
                raise PipelineError(f"{p}: probability store file not found (was the stage that writes it finished?)")
        try:
            self.meta = json.loads(meta.read_text())
            self.index = pd.read_csv(index)
        except (json.JSONDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
            raise PipelineError(f"{self.folder}: unreadable probability store ({exc})") from exc
        missing = set(INDEX_COLUMNS) - set(self.index.columns)
        if missing:
            raise PipelineError(f"{index}: missing columns {sorted(missing)}")
        self.class_names: list[str] = list(self.meta["class_names"])
        self.dtype: str = self.meta["dtype"]
        self._rows = {int(r.image_id): r for r in self.index.itertuples(index=False)}

    @property
    def image_ids(self) -> list[int]:
        return [int(i) for i in self.index["image_id"]]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, image_id: int) -> bool:
        return int(image_id) in self._rows

    def row(self, image_id: int):
        try:
            return self._rows[int(image_id)]
        except KeyError:
            raise PipelineError(f"{self.folder}: no probabilities for image id {image_id}") from None

    def stored_size(self, image_id: int) -> tuple[int, int]:
        row = self.row(image_id)
        return int(row.stored_height), int(row.stored_width)

    def raw(self, image_id: int) -> np.ndarray:
        """The stored array as it is on disk (float16, or uint8 = round(255 p))."""
        path = self.folder / self.row(image_id).file
        try:
            arr = np.load(path)
        except (OSError, ValueError) as exc:
            raise PipelineError(f"{path}: unreadable probability map ({exc})") from exc
        expected = (self.num_classes, *self.stored_size(image_id))
        if arr.shape != expected:
            raise PipelineError(f"{path}: probabilities of shape {arr.shape}, expected {expected} (index.csv)")
        return arr

    def load(self, image_id: int, size: tuple[int, int] | None = None) -> torch.Tensor:
        """float32 K x h x w probabilities; resized bilinearly to ``size`` (H, W) when given."""
        t = torch.from_numpy(self.raw(image_id).astype(np.float32))
        if self.dtype == "uint8":
            t = t / 255.0
        return resize_probs(t, size) if size is not None else t

    def load_into(self, image_id: int, size: tuple[int, int], out: np.ndarray) -> np.ndarray:
        """float32 probabilities at ``size`` written into ``out`` (no resize when stored at that size)."""
        if self.stored_size(image_id) != tuple(size):
            out[...] = self.load(image_id, size).numpy()
        elif self.dtype == "uint8":
            np.divide(self.raw(image_id), np.float32(255), out=out)
        else:
            out[...] = self.raw(image_id)
        return out

    def load_uint8(self, image_id: int, size: tuple[int, int]) -> np.ndarray:
        """uint8 probabilities round(255 p) at ``size``; a uint8 store at that size is read as it is."""
        if self.dtype == "uint8" and self.stored_size(image_id) == tuple(size):
            return self.raw(image_id)
        p = self.load(image_id, size).numpy()
        np.multiply(p, 255.0, out=p)
        np.rint(p, out=p)
        np.clip(p, 0, 255, out=p)
        return p.astype(np.uint8)

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor]]:
        for image_id in self.image_ids:
            yield image_id, self.load(image_id)
