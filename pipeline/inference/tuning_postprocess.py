"""Post-processing chosen on out-of-fold predictions.

``crf``: a dense CRF (:mod:`pipeline.inference.crf`) on the fused probabilities and the image,
its weights chosen among a few candidates on OOF mIoU at the OOF stores' resolution.

``min_area``: for each class, the smallest region size (as a fraction of the image's pixels, so
it carries from the OOF resolution to each test image's own size) below which regions are given
to their surroundings, chosen class by class on OOF mIoU from a short list of candidates; the
whole post-processor is then kept only under the selection rule (its paired bootstrap gain over
images must lie above zero).  The result is written beside the ensemble (``postprocess.yaml``)
and the submit stage applies it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_write_text
from pipeline.evaluation.metrics import confusion_matrix, mean_iou
from pipeline.evaluation.selection import select
from pipeline.inference.crf import WORK_SIDE, CRFParams, crf_labels
from pipeline.inference.postprocess import postprocess

log = logging.getLogger(__name__)

POSTPROCESS_FILE = "postprocess.yaml"
AREA_FRACTIONS = (0.0, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)  # candidate minimum areas, fractions of the image


def pixel_thresholds(fractions: dict[int, float], shape: tuple[int, int]) -> dict[int, int]:
    """Minimum areas in pixels of an image of ``shape`` from fractions of its area."""
    return {int(c): int(round(f * shape[0] * shape[1])) for c, f in fractions.items() if f > 0}


def _cms(maps: Sequence[tuple[np.ndarray, np.ndarray]], k: int, fractions: dict[int, float]) -> np.ndarray:
    out = np.zeros((len(maps), k, k), dtype=np.int64)
    for i, (labels, gt) in enumerate(maps):
        pred = (
            postprocess("min_area", labels, min_area=pixel_thresholds(fractions, labels.shape)) if fractions else labels
        )
        out[i] = confusion_matrix(pred, gt, k)
    return out


def tune_min_area(
    maps: Sequence[tuple[np.ndarray, np.ndarray]],
    num_classes: int,
    candidates: Iterable[float] = AREA_FRACTIONS,
    seed: int = 0,
) -> dict[str, Any]:
    """Per-class minimum areas chosen one class at a time on OOF mIoU, then the selection rule
    between no post-processing and the tuned one; returns the record for ``postprocess.yaml``."""
    if not maps:
        raise PipelineError("no out-of-fold maps to tune post-processing on")
    fractions: dict[int, float] = {}
    base = _cms(maps, num_classes, {})
    best = mean_iou(base.sum(0))
    predicted = set(np.unique(np.concatenate([np.unique(labels) for labels, _ in maps])).tolist())
    for c in sorted(predicted - {0}):  # a class never predicted has no component to remove
        for f in candidates:
            if f <= 0:
                continue
            trial = {**fractions, c: f}
            score = mean_iou(_cms(maps, num_classes, trial).sum(0))
            if score > best:
                best, fractions[c] = score, f
    tuned = _cms(maps, num_classes, fractions)
    choice = select([("none", base), ("min_area", tuned)], seed=seed)
    comparison = choice.comparisons[0]
    return {
        "name": choice.chosen,
        "params": {"min_area_fraction": {int(c): float(f) for c, f in fractions.items()}},
        "oof_miou_without": float(mean_iou(base.sum(0))),
        "oof_miou_with": float(mean_iou(tuned.sum(0))),
        "oof_gain": {"gain": comparison.gain, "low": comparison.low, "high": comparison.high},
        "accepted": comparison.accepted,
    }


CRF_CANDIDATES = (
    CRFParams(w_bilateral=3.0, sigma_rgb=10.0),
    CRFParams(w_bilateral=3.0, sigma_rgb=20.0),
    CRFParams(w_bilateral=5.0, sigma_rgb=20.0),
    CRFParams(w_bilateral=5.0, sigma_rgb=40.0),
    CRFParams(w_bilateral=10.0, sigma_rgb=20.0),
)


def tune_crf(
    samples: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
    num_classes: int,
    candidates: Sequence[CRFParams] = CRF_CANDIDATES,
    seed: int = 0,
) -> dict[str, Any]:
    """``samples``: (fused probabilities, image, ground truth) at the OOF size.  The candidate with the
    best OOF mIoU, kept only under the selection rule against no CRF."""
    if not samples:
        raise PipelineError("no out-of-fold maps to tune the CRF on")
    base = np.stack([confusion_matrix(p.argmax(0), gt, num_classes) for p, _, gt in samples])
    best, best_cms = None, None
    for params in candidates:
        cms = np.stack([confusion_matrix(crf_labels(p, img, params), gt, num_classes) for p, img, gt in samples])
        if best_cms is None or mean_iou(cms.sum(0)) > mean_iou(best_cms.sum(0)):
            best, best_cms = params, cms
    choice = select([("none", base), ("crf", best_cms)], seed=seed)
    c = choice.comparisons[0]
    return {
        "name": choice.chosen,
        "params": {"crf": best.as_dict(), "work_side": WORK_SIDE},
        "oof_miou_without": float(mean_iou(base.sum(0))),
        "oof_miou_with": float(mean_iou(best_cms.sum(0))),
        "oof_gain": {"gain": c.gain, "low": c.low, "high": c.high},
        "accepted": c.accepted,
    }


def write_postprocess(folder: Path, record: dict[str, Any]) -> Path:
    return atomic_write_text(folder / POSTPROCESS_FILE, yaml.safe_dump(record, sort_keys=False))


def read_postprocess(folder: Path) -> dict[str, Any] | None:
    path = folder / POSTPROCESS_FILE
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise PipelineError(f"{path}: invalid YAML ({exc})") from exc
    if not isinstance(data, dict) or "name" not in data:
        raise PipelineError(f"{path}: not a post-processing file (no name)")
    return data


def needs_probabilities(record: dict[str, Any] | None) -> bool:
    return bool(record) and record.get("name") == "crf"


def apply_postprocess(
    record: dict[str, Any] | None, labels: np.ndarray, probs: np.ndarray | None = None, image: np.ndarray | None = None
) -> np.ndarray:
    """The chosen post-processing of ``record`` (none when absent or refused) on one image's map
    (the CRF also needs its fused probabilities and the image)."""
    if not record or record.get("name", "none") == "none":
        return labels
    if record["name"] == "crf":
        if probs is None or image is None:
            raise PipelineError("the CRF post-processing needs the fused probabilities and the image")
        params = CRFParams(
            **{k: (int(v) if k in ("window", "iterations") else v) for k, v in record["params"]["crf"].items()}
        )
        return crf_labels(probs, image, params, int(record["params"].get("work_side", WORK_SIDE)))
    fractions = {int(c): float(f) for c, f in record["params"]["min_area_fraction"].items()}
    return postprocess("min_area", labels, min_area=pixel_thresholds(fractions, labels.shape))
