"""Local scorer: ``make score SUB=submissions/<name>.csv GT=data/demo/test_gt.json``.

The submission is validated first (:mod:`pipeline.validate`), then streamed image by
image and scored with :mod:`pipeline.evaluation.metrics`: one confusion matrix over all images,
dataset-level mIoU (README, Contracts), always the headline (``miou`` of the result and
the first line logged); ``image_level=true`` adds the mean of per-image mIoU as an extra
figure (``image_level_miou``), never in place of it.

Ground truth ``gt`` is either a COCO file with annotations (same categories as
``test.json``) or a folder of label-map PNGs named like each image's ``file_name`` with a
``.png`` suffix (relative paths kept; 255 = ignore).  A COCO file is rasterized with the
mask rule ``mask_rule`` (:data:`pipeline.data.MASK_RULES`); when it is unset, the rule
recorded under ``mask_rule`` in the submission's manifest (the submission's path with the
suffix ``.json``), else ``area``, the contest rule.

* rle submissions are scored at each image's own size;
* dense submissions are scored at ``dense_size`` (256x256) against the ground truth resized
  with nearest neighbour.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.config import stage_main
from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_write_bytes, atomic_write_text
from pipeline.core.tables import format_table
from pipeline.data import DEFAULT_MASK_RULE, load_coco
from pipeline.evaluation.metrics import MeanIoU, confusion_matrix, iou_per_class, mean_iou
from pipeline.submission.formats import (
    format_problems,
    read_format,
    resize_nearest,
    validate_submission,
)
from pipeline.submission.score_config import ScoreConfig
from pipeline.submission.scoring import GroundTruth, iter_predictions, resolve_mask_rule

log = logging.getLogger(__name__)


def run(cfg: ScoreConfig) -> dict[str, Any]:
    """Score ``cfg.sub`` against ``cfg.gt``; returns mIoU and per-class IoU."""
    cfg.validate()
    coco = load_coco(cfg.data_dir, cfg.test_ann, require_annotations=False)
    problems = validate_submission(cfg.sub, coco, cfg.format, cfg.order, cfg.dense_size)
    if problems:
        raise PipelineError(format_problems(cfg.sub, problems))
    fmt = read_format(cfg.sub, cfg.format)
    rule: str | None = None
    rule_source = "not used (label-map PNGs)"
    if GroundTruth.locate(cfg.gt, cfg.data_dir).is_file():  # a COCO file: its maps depend on the rule
        rule, rule_source = resolve_mask_rule(cfg.sub, cfg.mask_rule)
    gt = GroundTruth(cfg.gt, coco, cfg.data_dir, mask_rule=rule or DEFAULT_MASK_RULE)
    if rule is not None:
        log.info("ground truth %s rasterized with mask rule %r (from %s)", gt.path, rule, rule_source)
    k = coco.num_classes
    meter = MeanIoU(k)
    per_image: list[float] = []
    matrices: list[np.ndarray] = []
    for image, pred in iter_predictions(cfg.sub, coco, fmt, cfg.order, cfg.dense_size):
        target = gt.get(image)
        if fmt == "dense":
            target = resize_nearest(target, cfg.dense_size)
        cm = confusion_matrix(pred, target, k)
        meter.add_confusion(cm)
        if cfg.out_json:
            matrices.append(cm)
        if cfg.image_level:
            score = mean_iou(cm)
            if not np.isnan(score):
                per_image.append(score)
    dataset = meter.compute()
    image_level = float(np.mean(per_image)) if per_image else (float("nan") if cfg.image_level else None)
    ious = iou_per_class(meter.cm)
    scored_at = (
        f"{cfg.dense_size[0]}x{cfg.dense_size[1]} (ground truth resized with nearest neighbour)"
        if fmt == "dense"
        else "each image's own size"
    )
    rows = [[name, "-" if np.isnan(v) else f"{v:.4f}"] for name, v in zip(coco.class_names, ious, strict=False)]
    table = format_table(["class", "IoU"], rows)
    mask_note = f", mask rule {rule!r} from {rule_source}" if rule is not None else ""
    log.info(
        "mIoU (dataset level): %.4f\n%s (%s, %d images) scored at %s against %s%s:\n%s%s",
        dataset,
        cfg.sub,
        fmt,
        len(coco.images),
        scored_at,
        gt.path,
        mask_note,
        table,
        f"\nmIoU (image level, extra): {image_level:.4f}" if cfg.image_level else "",
    )
    result = {
        "miou": dataset,  # the headline is always the dataset-level mIoU
        "dataset_miou": dataset,
        "image_level_miou": image_level,
        "iou_per_class": {n: (None if np.isnan(v) else float(v)) for n, v in zip(coco.class_names, ious, strict=False)},
        "format": fmt,
        "scored_at": scored_at,
        "n_images": len(coco.images),
        "mask_rule": rule,
        "mask_rule_source": rule_source,
        "confusion": meter.cm.tolist(),
    }
    if cfg.out_json:
        write_score(result, np.stack(matrices), Path(cfg.out_json))
    return result


def write_score(result: dict[str, Any], per_image: np.ndarray, path: Path) -> None:
    """``result`` as JSON and the per-image confusion matrices as ``<path>.npz`` (for intervals)."""
    import io
    import json

    buf = io.BytesIO()
    np.savez_compressed(buf, per_image=per_image)
    atomic_write_bytes(path.with_suffix(".npz"), buf.getvalue())
    atomic_write_text(path, json.dumps({k: v for k, v in result.items() if k != "confusion"}, indent=2))


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main(ScoreConfig, run, argv, "Score a submission against ground truth (mIoU)")


if __name__ == "__main__":
    raise SystemExit(main())
