"""``crf``: a dense CRF (:mod:`pipeline.inference.crf`) on the fused probabilities and the image, its
weights chosen among a few candidates on OOF mIoU at the OOF stores' resolution."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.evaluation.metrics import confusion_matrix, mean_iou
from pipeline.inference.crf import WORK_SIDE, CRFParams, crf_labels
from pipeline.inference.postprocessing.base import POSTPROCESSORS, PostProcessor, Tuned

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
) -> Tuned:
    """``samples``: (fused probabilities, image, ground truth) at the OOF size; the candidate with the
    best OOF mIoU against the fused argmax."""
    if not samples:
        raise PipelineError("no out-of-fold maps to tune the CRF on")
    base = np.stack([confusion_matrix(p.argmax(0), gt, num_classes) for p, _, gt in samples])
    best, best_cms = None, None
    for params in candidates:
        cms = np.stack([confusion_matrix(crf_labels(p, img, params), gt, num_classes) for p, img, gt in samples])
        if best_cms is None or mean_iou(cms.sum(0)) > mean_iou(best_cms.sum(0)):
            best, best_cms = params, cms
    return Tuned({"crf": best.as_dict(), "work_side": WORK_SIDE}, base, best_cms)


def _apply(params: dict[str, Any], labels: np.ndarray, probs: np.ndarray | None, image: np.ndarray | None):
    crf = CRFParams(**{k: (int(v) if k in ("window", "iterations") else v) for k, v in params["crf"].items()})
    return crf_labels(probs, image, crf, int(params.get("work_side", WORK_SIDE)))


DESCRIPTION = "a dense CRF on the fused probabilities and the image (weights chosen on OOF)"
POSTPROCESSORS.add(
    "crf",
    PostProcessor("crf", DESCRIPTION, lambda oof, k, seed: tune_crf(oof.samples(), k), _apply, needs_image=True),
    DESCRIPTION,
)
