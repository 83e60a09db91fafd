"""Ground truth a submission is scored against, and the label maps a submission file holds."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.core.labels import IGNORE_INDEX
from pipeline.data import DEFAULT_MASK_RULE, MASK_RULES, CocoData, load_coco
from pipeline.submission.formats import (
    iter_rows,
)
from pipeline.submission.rle import decode_label_map

log = logging.getLogger(__name__)


def resolve_mask_rule(sub: str | Path, mask_rule: str | None = None) -> tuple[str, str]:
    """``(rule, where it came from)``: ``mask_rule`` when given, else the ``mask_rule`` key of
    the submission's manifest (``<sub without suffix>.json``) when present, else ``area``."""
    if mask_rule is not None:
        return mask_rule, "mask_rule="
    manifest = Path(sub).with_suffix(".json")
    if not manifest.is_file():
        return DEFAULT_MASK_RULE, f"default (no manifest {manifest})"
    try:
        doc = json.loads(manifest.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{manifest}: invalid manifest JSON ({exc}); fix it or pass mask_rule=") from exc
    if not isinstance(doc, dict) or "mask_rule" not in doc:
        return DEFAULT_MASK_RULE, f"default (no mask_rule in {manifest})"
    rule = doc["mask_rule"]
    if rule not in MASK_RULES:
        raise PipelineError(f"{manifest}: unknown mask_rule {rule!r}; known: {', '.join(MASK_RULES)}")
    return rule, f"manifest {manifest}"


class GroundTruth:
    """Ground-truth class-index maps of the test images, by ``file_name``."""

    def __init__(self, gt: str | Path, coco: CocoData, data_dir: str | Path, mask_rule: str = DEFAULT_MASK_RULE):
        self.coco = coco
        self.path = path = self.locate(gt, data_dir)
        self.gt_coco: CocoData | None = None
        if path.is_dir():
            self.kind = "png"
        elif path.is_file():
            self.kind = "coco"
            self.gt_coco = load_coco(data_dir, path.resolve(), require_annotations=True, mask_rule=mask_rule)
            want = [(int(c["id"]), str(c["name"])) for c in coco.categories]
            have = [(int(c["id"]), str(c["name"])) for c in self.gt_coco.categories]
            if want != have:
                raise PipelineError(f"{path}: categories {have} differ from {coco.path}'s {want}")
            self.by_name = {str(im["file_name"]): int(im["id"]) for im in self.gt_coco.images}
        else:
            raise PipelineError(
                f"{path}: ground truth not found (a COCO file with annotations or a folder of PNG label maps)"
            )

    @staticmethod
    def locate(gt: str | Path, data_dir: str | Path) -> Path:
        """``gt`` as given, or relative to ``data_dir`` when only found there."""
        path = Path(gt)
        if not path.exists() and not path.is_absolute() and (Path(data_dir) / path).exists():
            path = Path(data_dir) / path
        return path

    def get(self, image: dict[str, Any]) -> np.ndarray:
        file_name, h, w = str(image["file_name"]), int(image["height"]), int(image["width"])
        if self.kind == "coco":
            assert self.gt_coco is not None
            if file_name not in self.by_name:
                raise PipelineError(f"{self.path}: no image {file_name!r} (listed in {self.coco.path})")
            target = self.gt_coco.mask(self.by_name[file_name])
            where = f"{self.path} ({file_name})"
        else:
            target, where = self._png(file_name)
        if target.shape != (h, w):
            raise PipelineError(
                f"{where}: ground truth is {target.shape[0]}x{target.shape[1]} (HxW), "
                f"the image is {h}x{w} in {self.coco.path}"
            )
        bad = (target >= self.coco.num_classes) & (target != IGNORE_INDEX)
        if bad.any():
            raise PipelineError(
                f"{where}: label {int(target[bad][0])} is neither a class index "
                f"(0..{self.coco.num_classes - 1}) nor {IGNORE_INDEX} (ignore)"
            )
        return target

    def _png(self, file_name: str) -> tuple[np.ndarray, str]:
        candidates = [self.path / Path(file_name).with_suffix(".png"), self.path / f"{file_name}.png"]
        for p in candidates:
            if p.is_file():
                m = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
                if m is None or m.ndim != 2:
                    raise PipelineError(f"{p}: not a single-channel label-map PNG")
                return m, str(p)
        raise PipelineError(f"{candidates[0]}: ground-truth label map not found")


def iter_predictions(
    path: str | Path, coco: CocoData, fmt: str, order: str = "F", dense_size: Sequence[int] = (256, 256)
) -> Iterator[tuple[dict[str, Any], np.ndarray]]:
    """``(image, predicted map)`` of a valid submission, streamed (rle maps at the image size)."""
    images = {str(im["file_name"]): im for im in coco.images}
    if fmt == "dense":
        for _, (file_name, text) in iter_rows(path):
            values = np.array(text.split(), dtype=np.int64)
            yield images[file_name], values.reshape(int(dense_size[0]), int(dense_size[1]))
        return
    cat_to_index = coco.cat_to_index
    pending: dict[str, dict[int, str]] = {}
    for _, (file_name, class_id, rle) in iter_rows(path):
        rows = pending.setdefault(file_name, {})
        rows[cat_to_index[int(class_id)]] = rle
        if len(rows) == len(cat_to_index):
            im = images[file_name]
            del pending[file_name]
            yield im, decode_label_map(rows, (int(im["height"]), int(im["width"])), order=order)
