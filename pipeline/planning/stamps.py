"""Stamps: a stage is skipped when a hash of its inputs and settings matches the one recorded
when it last finished (content hashes, never file times) and its outputs still exist."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pipeline.core.io import atomic_write_text
from pipeline.data.coco import file_digest


def stamp_key(settings: dict[str, Any], inputs: list[str | Path] = ()) -> str:
    """Hash of the settings (JSON, sorted keys) and of the inputs' contents."""
    h = hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode())
    for path in inputs:
        h.update(str(path).encode())
        h.update(file_digest(path).encode() if Path(path).is_file() else b"missing")
    return h.hexdigest()


class Stamps:
    """``<folder>/<stage>.json`` with the key and outputs of each finished stage."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def done(self, stage: str, key: str) -> bool:
        path = self.folder / f"{stage}.json"
        if not path.is_file():
            return False
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError:
            return False
        return data.get("key") == key and all(Path(p).exists() for p in data.get("outputs", []))

    def mark(self, stage: str, key: str, outputs: list[str | Path]) -> None:
        atomic_write_text(self.folder / f"{stage}.json", json.dumps({"key": key, "outputs": [str(p) for p in outputs]}))
