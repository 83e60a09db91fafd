"""Writing pseudo-labels from an ensemble's (or runs') test probabilities."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml

from pipeline.core.io import atomic_write_bytes, atomic_write_text
from pipeline.core.labels import IGNORE_INDEX
from pipeline.data import CocoData, mask_dtype
from pipeline.data.pseudo_data import MANIFEST
from pipeline.inference.fusion import MemberProbs, SubmitMember, fused_probabilities

log = logging.getLogger(__name__)


def pseudo_map(probs: np.ndarray, threshold: float, class_thresholds: dict[int, float] | None = None) -> np.ndarray:
    """argmax where the winning probability reaches the threshold (its class's, when given), else 255."""
    labels = probs.argmax(0)
    conf = probs.max(0)
    limits = np.full(probs.shape[0], threshold, dtype=np.float32)
    for c, t in (class_thresholds or {}).items():
        limits[int(c)] = t
    out = labels.astype(mask_dtype(probs.shape[0]))
    out[conf < limits[labels]] = IGNORE_INDEX
    return out


def previous_round(members: list[SubmitMember]) -> int:
    """The highest pseudo-label round any member was trained with (0: none)."""
    found = 0
    for m in members:
        for r in m.readers:
            ckpt = Path(str(r.meta.get("source", "")))
            config = ckpt.parent / "config.yaml"
            if config.is_file():
                pseudo_dir = (yaml.safe_load(config.read_text()) or {}).get("pseudo_dir")
                manifest = Path(str(pseudo_dir)) / MANIFEST if pseudo_dir else None
                if manifest is not None and manifest.is_file():
                    found = max(found, int(json.loads(manifest.read_text()).get("round", 0)))
    return found


def write_pseudo_labels(
    coco: CocoData,
    members: list[SubmitMember],
    weights: list[float],
    out: Path,
    threshold: float,
    class_thresholds: dict[int, float],
    info: dict[str, Any],
    progress: bool = True,
) -> dict[str, Any]:
    """One PNG per test image + ``manifest.json`` (written last, atomically)."""
    from tqdm import tqdm

    probs = MemberProbs()
    entries, confident, counts = [], 0, np.zeros(coco.num_classes, dtype=np.int64)
    total = 0
    for im in tqdm(coco.images, desc="pseudo-labels", disable=not progress):
        size = (int(im["height"]), int(im["width"]))
        p = fused_probabilities(members, weights, int(im["id"]), size, probs)
        labels = pseudo_map(p, threshold, class_thresholds)
        ok, buf = cv2.imencode(".png", labels)
        if not ok:  # pragma: no cover - cv2 always encodes uint8/uint16 PNG
            raise RuntimeError("cannot encode a pseudo-label map")
        name = f"{int(im['id'])}.png"
        atomic_write_bytes(out / name, io.BytesIO(buf.tobytes()).getvalue())
        kept = labels != IGNORE_INDEX
        counts += np.bincount(labels[kept].ravel(), minlength=coco.num_classes)[: coco.num_classes]
        confident += int(kept.sum())
        total += labels.size
        entries.append(
            {
                "image_id": int(im["id"]),
                "file_name": im["file_name"],
                "file": name,
                "confident_share": float(kept.mean()),
            }
        )
    manifest = {
        **info,
        "class_names": coco.class_names,
        "threshold": threshold,
        "class_thresholds": {coco.class_names[c]: t for c, t in class_thresholds.items()},
        "confident_share": confident / max(1, total),
        "class_pixels": {n: int(v) for n, v in zip(coco.class_names, counts, strict=True)},
        "images": entries,
    }
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2))
    return manifest
