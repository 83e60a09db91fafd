"""Error-analysis stage: ``make analyze RUNS="runs/a runs/b"`` or ``make analyze NAME=<ensemble>``.

Writes ``reports/analyze/<name>/``: ``report.md``; ``confusion.png`` (row-normalised: where each
class's pixels go); ``iou.csv`` (per-class IoU with 90% bootstrap intervals over images);
``recall_by_size.csv`` and ``recall_by_size.png`` (recall per ground-truth instance by COCO size
bin); ``worst.png`` (the worst OOF images: image | ground truth | prediction | errors); and
``label_errors.csv`` (images ranked by the share of pixels the predictions contradict with high
confidence: where a few dozen wrong labels are most likely to be).
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pipeline.core.config import stage_main
from pipeline.core.io import atomic_open, atomic_write_text
from pipeline.core.layout import ENSEMBLE_WEIGHTS
from pipeline.data import load_coco, read_image
from pipeline.evaluation.analysis import Analysis, analyse
from pipeline.evaluation.analysis_config import AnalyzeConfig
from pipeline.evaluation.metrics import mean_iou
from pipeline.evaluation.visual import AREA_BINS, class_palette, figure, overlay, save_png
from pipeline.inference.ensemble import Fusion, OofCache, find_member, load_ensemble, resolve_members
from pipeline.inference.store import stores_mask_rule

log = logging.getLogger(__name__)


def _members(cfg: AnalyzeConfig) -> tuple[list, Fusion, str]:
    if cfg.name and not cfg.runs:
        data = load_ensemble(Path(cfg.ensembles_dir) / cfg.name / ENSEMBLE_WEIGHTS)
        members = [find_member(m.path, m.tta, name=m.name) for m in data.members]
        return (
            members,
            Fusion.of(data),
            cfg.name,
        )
    members = resolve_members(cfg.runs, cfg.tta)
    label = cfg.name or "+".join(m.name.replace("/", "-") for m in members)
    return members, Fusion(np.ones(len(members)), None, "mean"), label


def plot_confusion(a: Analysis, path: Path) -> Path:
    k = len(a.class_names)
    fig = figure(max(6, 0.35 * k + 2), max(5, 0.35 * k + 1.5), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(a.row_normalised(), vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(k), a.class_names, rotation=90, fontsize=7)
    ax.set_yticks(range(k), a.class_names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth (each row sums to 1)")
    fig.colorbar(im, ax=ax, shrink=0.8)
    return save_png(fig, path, tight=False)


def plot_recall(a: Analysis, path: Path) -> Path:
    k = len(a.class_names)
    fig = figure(max(6, 0.3 * k + 2), 4, layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(1, k)
    for b, name in enumerate(AREA_BINS):
        ax.bar(x + (b - 1) * 0.27, np.nan_to_num(a.recall_by_size[1:, b]), width=0.27, label=name)
    ax.set_xticks(x, a.class_names[1:], rotation=90, fontsize=7)
    ax.set_ylabel("mean recall per instance")
    ax.set_ylim(0, 1)
    ax.legend()
    return save_png(fig, path, tight=False)


def plot_worst(a: Analysis, coco, n: int, path: Path) -> Path:
    """Rows of image | ground truth | prediction | errors (red: wrong, grey: ignored)."""
    rows = a.worst(n)
    palette = class_palette(len(a.class_names))
    fig = figure(12, 3 * max(1, len(rows)), layout="constrained")
    for r, res in enumerate(rows):
        h, w = res.gt.shape
        image = cv2.resize(read_image(coco.image_path(res.image_id)), (w, h), interpolation=cv2.INTER_AREA)
        gt = np.where(res.gt == 255, 0, res.gt)
        errors = np.zeros((h, w, 3), np.uint8)
        errors[(res.labels != res.gt) & (res.gt != 255)] = (220, 30, 30)
        errors[res.gt == 255] = (128, 128, 128)
        panels = [image, overlay(image, gt, palette), overlay(image, res.labels, palette), errors]
        titles = [coco.image(res.image_id)["file_name"], "ground truth", f"prediction (mIoU {res.miou:.3f})", "errors"]
        for c, (panel, title) in enumerate(zip(panels, titles, strict=True)):
            ax = fig.add_subplot(len(rows), 4, r * 4 + c + 1)
            ax.imshow(panel)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    return save_png(fig, path, tight=False)


def write_tables(a: Analysis, coco, out: Path, n_boot: int, seed: int) -> dict[str, Path]:
    iou = a.iou_intervals(n_boot, seed)
    with atomic_open(out / "iou.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["class", "iou", "low", "high", "gt_pixels"])
        for name, (p, lo, hi), n in zip(a.class_names, iou, a.confusion.sum(1), strict=True):
            w.writerow([name, *(("" if np.isnan(v) else f"{v:.4f}") for v in (p, lo, hi)), int(n)])
    with atomic_open(out / "recall_by_size.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["class", *[f"recall_{b}" for b in AREA_BINS], *[f"instances_{b}" for b in AREA_BINS]])
        for c, name in enumerate(a.class_names[1:], 1):
            rec = ["" if np.isnan(v) else f"{v:.4f}" for v in a.recall_by_size[c]]
            w.writerow([name, *rec, *map(int, a.instances_by_size[c])])
    with atomic_open(out / "label_errors.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["rank", "image_id", "file_name", "confident_disagreement", "image_miou"])
        for rank, r in enumerate(a.label_error_ranking(), 1):
            w.writerow(
                [rank, r.image_id, coco.image(r.image_id)["file_name"], f"{r.confident_wrong:.4f}", f"{r.miou:.4f}"]
            )
    return {"iou": out / "iou.csv", "recall": out / "recall_by_size.csv", "label_errors": out / "label_errors.csv"}


def run(cfg: AnalyzeConfig) -> dict[str, Any]:
    cfg.validate()
    members, fusion, label = _members(cfg)
    coco = load_coco(cfg.data_dir, cfg.ann_file, mask_rule=stores_mask_rule([f for m in members for f in m.oof_stores]))
    out = Path(cfg.out_dir) / label
    with OofCache(members, coco, folder=out, seed=cfg.seed, progress=cfg.progress) as cache:
        a = analyse(coco, cache.fused_probabilities(fusion), cfg.threshold)
    files = write_tables(a, coco, out, cfg.n_boot, cfg.seed)
    files["confusion"] = plot_confusion(a, out / "confusion.png")
    files["recall_plot"] = plot_recall(a, out / "recall_by_size.png")
    files["worst"] = plot_worst(a, coco, cfg.worst, out / "worst.png")
    top = a.label_error_ranking()[:10]
    md = [
        f"# Error analysis: {label}",
        "",
        f"OOF images: {len(a.images)}, mIoU {mean_iou(a.confusion):.4f}",
        "",
        "![confusion](confusion.png)",
        "",
        "Per-class IoU with 90% intervals: `iou.csv`.",
        "",
        "![recall by size](recall_by_size.png)",
        "",
        "![worst images](worst.png)",
        "",
        f"Likely label errors (share of pixels predicted otherwise with p >= {cfg.threshold}):",
        "",
    ]
    md += [f"- {coco.image(r.image_id)['file_name']}: {r.confident_wrong:.1%}" for r in top]
    files["report"] = atomic_write_text(out / "report.md", "\n".join(md) + "\n")
    log.info("error analysis of %d OOF images (mIoU %.4f) -> %s", len(a.images), mean_iou(a.confusion), out)
    return {"out": out, "files": {k: str(v) for k, v in files.items()}, "analysis": a}


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main(AnalyzeConfig, run, argv, "Error analysis of out-of-fold predictions")


if __name__ == "__main__":
    raise SystemExit(main())
