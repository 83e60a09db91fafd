"""Local scorer: ``make score SUB=submissions/<name>.csv GT=data/demo/test_gt.json``.

The submission is validated first (:mod:`pipeline.validate`), then streamed image by
image and scored with :mod:`pipeline.metrics`: one confusion matrix over all images,
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

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import cv2
import numpy as np

from pipeline.config import ConfigError, stage_main
from pipeline.data import DEFAULT_MASK_RULE, MASK_RULES, CocoData, load_coco
from pipeline.eda import format_table
from pipeline.metrics import IGNORE_INDEX, MeanIoU, confusion_matrix, iou_per_class, mean_iou
from pipeline.rle import decode_label_map
from pipeline.utils import PipelineError
from pipeline.validate import check_format_options, format_problems, iter_rows, read_format, resize_nearest, validate_submission

log = logging.getLogger(__name__)


@dataclass
class ScoreConfig:
    sub: str = ""
    gt: str = ""  # COCO file with annotations, or a folder of label-map PNGs
    data_dir: str = "data/demo"
    test_ann: str = "test.json"
    format: str = "auto"
    order: str = "F"
    dense_size: list[int] = field(default_factory=lambda: [256, 256])
    image_level: bool = False
    mask_rule: str | None = None  # rule of a COCO ground truth; None: the manifest's, else area

    def validate(self) -> None:
        if not self.sub:
            raise ConfigError("sub is required (a submission CSV such as submissions/<name>.csv)")
        if not self.gt:
            raise ConfigError("gt is required (a COCO file with annotations or a folder of label-map PNGs)")
        check_format_options(self.format, self.order, self.dense_size, allow_auto=True)
        if self.mask_rule is not None and self.mask_rule not in MASK_RULES:
            raise ConfigError(f"mask_rule: unknown {self.mask_rule!r}; known: {', '.join(MASK_RULES)}")


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
            raise PipelineError(f"{path}: ground truth not found (a COCO file with annotations or a folder of PNG label maps)")

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
            raise PipelineError(f"{where}: ground truth is {target.shape[0]}x{target.shape[1]} (HxW), "
                                f"the image is {h}x{w} in {self.coco.path}")
        bad = (target >= self.coco.num_classes) & (target != IGNORE_INDEX)
        if bad.any():
            raise PipelineError(f"{where}: label {int(target[bad][0])} is neither a class index "
                                f"(0..{self.coco.num_classes - 1}) nor {IGNORE_INDEX} (ignore)")
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


def iter_predictions(path: str | Path, coco: CocoData, fmt: str, order: str = "F",
                     dense_size: Sequence[int] = (256, 256)) -> Iterator[tuple[dict[str, Any], np.ndarray]]:
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
    for image, pred in iter_predictions(cfg.sub, coco, fmt, cfg.order, cfg.dense_size):
        target = gt.get(image)
        if fmt == "dense":
            target = resize_nearest(target, cfg.dense_size)
        cm = confusion_matrix(pred, target, k)
        meter.add_confusion(cm)
        if cfg.image_level:
            score = mean_iou(cm)
            if not np.isnan(score):
                per_image.append(score)
    dataset = meter.compute()
    image_level = float(np.mean(per_image)) if per_image else (float("nan") if cfg.image_level else None)
    ious = iou_per_class(meter.cm)
    scored_at = (f"{cfg.dense_size[0]}x{cfg.dense_size[1]} (ground truth resized with nearest neighbour)"
                 if fmt == "dense" else "each image's own size")
    rows = [[name, "-" if np.isnan(v) else f"{v:.4f}"] for name, v in zip(coco.class_names, ious)]
    table = format_table(["class", "IoU"], rows)
    mask_note = f", mask rule {rule!r} from {rule_source}" if rule is not None else ""
    log.info("mIoU (dataset level): %.4f\n%s (%s, %d images) scored at %s against %s%s:\n%s%s", dataset, cfg.sub,
             fmt, len(coco.images), scored_at, gt.path, mask_note, table,
             f"\nmIoU (image level, extra): {image_level:.4f}" if cfg.image_level else "")
    return {
        "miou": dataset,  # the headline is always the dataset-level mIoU
        "dataset_miou": dataset,
        "image_level_miou": image_level,
        "iou_per_class": {n: (None if np.isnan(v) else float(v)) for n, v in zip(coco.class_names, ious)},
        "format": fmt,
        "scored_at": scored_at,
        "n_images": len(coco.images),
        "mask_rule": rule,
        "mask_rule_source": rule_source,
        "confusion": meter.cm.tolist(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main(ScoreConfig, run, argv, "Score a submission against ground truth (mIoU)")


if __name__ == "__main__":
    raise SystemExit(main())
