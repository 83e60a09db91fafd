"""Out-of-fold probabilities of a run's best checkpoint (the store ``oof/`` of its run folder)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from pipeline.data import CocoData, MaskCache, Preprocessing, SegmentationDataset, ValDataset, collate
from pipeline.data.resize import resize_probs
from pipeline.data.store import ProbWriter
from pipeline.engine.checkpoint import load_checkpoint_model
from pipeline.engine.loop import evaluate
from pipeline.evaluation.metrics import mean_iou

log = logging.getLogger(__name__)


def stored_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def write_oof(
    cfg,
    coco: CocoData,
    val_ids: Sequence[int],
    size: tuple[int, int],
    best_path: Path,
    device: torch.device,
    dtype: torch.dtype | None,
    out: Path,
    workers: int,
) -> Path:
    """Class probabilities of ``val_ids`` at ``oof_scale`` x the training size, with the mIoU
    of the checkpoint at full resolution in the store's meta."""
    model, _, ckpt = load_checkpoint_model(best_path, device, trust_pickle=cfg.trust_pickle)
    stored = stored_size(size, cfg.oof_scale)
    cache = MaskCache(coco, cfg.cache_dir)
    prep = Preprocessing.from_dict(ckpt.get("preprocessing"))
    loader = DataLoader(
        ValDataset(SegmentationDataset(coco, list(val_ids), None, cache, prep), size),
        batch_size=cfg.batch_size,
        num_workers=workers,
        collate_fn=collate,
    )
    info = {
        "source": str(best_path),
        "epoch": ckpt["epoch"],
        "mask_rule": cfg.mask_rule,
        "train_size": list(size),
        "stored_size": list(stored),
        "fold": cfg.fold,
    }
    writer = ProbWriter(out, coco.class_names, cfg.oof_dtype, info)

    def save(p: torch.Tensor, meta: dict) -> None:
        writer.write(meta["image_id"], meta["file_name"], meta["height"], meta["width"], resize_probs(p, stored))

    cm = evaluate(model, loader, coco.num_classes, device, dtype, False, None, cfg.progress, on_probs=save)
    writer.info["miou_full_resolution"] = mean_iou(cm)
    writer.close()
    log.info("wrote out-of-fold probabilities of %d images to %s (mIoU %.4f)", len(val_ids), out, mean_iou(cm))
    return out
