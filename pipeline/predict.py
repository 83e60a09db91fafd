"""Prediction stage: ``make predict RUN=runs/<exp>/fold0 TTA=d4 SPLIT=test``.

``run(cfg)`` loads a run's checkpoint, predicts at the training size with test-time
augmentation (:mod:`pipeline.tta`: the softmax probabilities of the views are averaged),
maps the probabilities back bilinearly and streams them into a probability store
(:mod:`pipeline.probs`):

* ``split=test``: the images of ``test_ann`` (``test.json``), each stored at its own size
  times ``store_scale``; default folder ``<run_dir>/test_<tta>``.
* ``split=val``: the run's own fold images from its folds file (out-of-fold predictions
  with TTA), stored at the size of the run's ``oof/`` maps so ensembling can use either;
  default folder ``<run_dir>/oof_<tta>``.  The mIoU of the written maps against the ground
  truth (at each image's size) is logged and recorded in the store's ``meta.json``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from pipeline.config import ConfigError, stage_main, to_dict
from pipeline.data import (
    CocoData,
    DataError,
    MaskCache,
    SegmentationDataset,
    TestDataset,
    build_transform,
    load_coco,
)
from pipeline.metrics import confusion_matrix_torch, iou_per_class, mean_iou
from pipeline.probs import DTYPES, ProbWriter, resize_probs
from pipeline.train import (
    AMP_MODES,
    TrainConfig,
    ValDataset,
    amp_dtype,
    collate,
    default_workers,
    load_checkpoint_model,
    resolve_device,
    split_ids,
)
from pipeline.tta import DEFAULT_SCALES, TTAModel, auto_max_batch, parse_tta
from pipeline.utils import PipelineError

log = logging.getLogger(__name__)

SPLITS = ("test", "val")


@dataclass
class PredictConfig:
    run_dir: str = ""  # runs/<experiment>/fold<k>
    data_dir: str = "data/demo"
    split: str = "test"  # test: images of test_ann; val: the run's own fold (out-of-fold)
    test_ann: str = "test.json"
    tta: str = "flip"  # none | hflip | flip | d4 | ms, combinable with + (e.g. ms+flip)
    scales: list[float] = field(default_factory=lambda: list(DEFAULT_SCALES))
    checkpoint: str = "best"  # best | last | a path to a checkpoint
    use_ema: bool = True
    batch_size: int = 8
    max_batch: int | None = None  # images per forward call across TTA views; None: auto (all views at once
    # on an accelerator, one view of the batch at a time on a CPU)
    num_workers: int | None = None  # None: pipeline.train.default_workers
    device: str = "auto"
    amp: str = "auto"
    dtype: str = "float16"  # float16 | uint8
    store_scale: float = 1.0  # split=test: maps stored at the image size x store_scale
    out_dir: str | None = None  # default <run_dir>/test_<tta> or <run_dir>/oof_<tta>
    progress: bool = True

    def validate(self) -> None:
        if not self.run_dir:
            raise ConfigError("run_dir is required (a training run folder such as runs/<experiment>/fold0)")
        if self.split not in SPLITS:
            raise ConfigError(f"split: unknown {self.split!r}; known: {', '.join(SPLITS)}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype: unknown {self.dtype!r}; known: {', '.join(DTYPES)}")
        if self.amp not in AMP_MODES:
            raise ConfigError(f"amp: unknown {self.amp!r}; known: {', '.join(AMP_MODES)}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.max_batch is not None and self.max_batch < 1:
            raise ConfigError(f"max_batch must be at least 1, got {self.max_batch}")
        if not 0 < self.store_scale <= 1:
            raise ConfigError(f"store_scale must be in (0, 1], got {self.store_scale}")
        parse_tta(self.tta, self.scales)

    def checkpoint_path(self) -> Path:
        if self.checkpoint in ("best", "last"):
            return Path(self.run_dir) / f"{self.checkpoint}.pt"
        return Path(self.checkpoint)

    def output_dir(self) -> Path:
        if self.out_dir:
            return Path(self.out_dir)
        prefix = "test" if self.split == "test" else "oof"
        return Path(self.run_dir) / f"{prefix}_{self.tta}"


def _collate_test(batch):
    return torch.stack([b[0] for b in batch]), None, [b[1] for b in batch]


def _check_files(coco: CocoData, ids: Sequence[int]) -> None:
    """Every image to predict exists (checked before anything is written)."""
    for image_id in ids:
        path = coco.image_path(image_id)
        if not path.is_file():
            raise DataError(f"{path}: image file not found (listed in {coco.path})")


def _check_classes(coco: CocoData, ckpt: dict[str, Any], ckpt_path: Path) -> None:
    if list(coco.class_names) != list(ckpt["class_names"]):
        raise PipelineError(
            f"{coco.path}: classes {coco.class_names} differ from those of the checkpoint {ckpt_path} "
            f"({ckpt['class_names']})"
        )


def _oof_meta(run_dir: Path) -> dict[str, Any]:
    """The run's ``oof/meta.json`` (empty when the run wrote none)."""
    meta = run_dir / "oof" / "meta.json"
    if not meta.is_file():
        return {}
    try:
        return json.loads(meta.read_text())
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{meta}: invalid JSON ({exc})") from exc


def _oof_size(oof_meta: dict[str, Any], tcfg: TrainConfig, train_size: tuple[int, int]) -> tuple[int, int]:
    """Stored size of the run's ``oof/`` maps (from its meta.json, else from ``oof_scale``)."""
    stored = oof_meta.get("stored_size")
    if stored:
        return int(stored[0]), int(stored[1])
    return max(1, round(train_size[0] * tcfg.oof_scale)), max(1, round(train_size[1] * tcfg.oof_scale))


def _as_stored(p: torch.Tensor, dtype: str) -> torch.Tensor:
    """``p`` as a reader of the store will see it (float16 or uint8 quantization)."""
    if dtype == "uint8":
        return torch.round(p.clamp(0, 1) * 255.0) / 255.0
    return p.half().float()


def run(cfg: PredictConfig) -> Path:
    """Predict ``cfg.split`` with TTA and write the probability store; returns its folder."""
    cfg.validate()
    run_dir = Path(cfg.run_dir)
    if not run_dir.is_dir():
        raise PipelineError(f"{run_dir}: run folder not found (train it first: make train)")
    ckpt_path = cfg.checkpoint_path()
    if not ckpt_path.is_file():
        raise PipelineError(f"{ckpt_path}: checkpoint not found (checkpoint={cfg.checkpoint})")
    device = resolve_device(cfg.device)
    model, tcfg, ckpt = load_checkpoint_model(ckpt_path, device, use_ema=cfg.use_ema)
    train_size = (int(ckpt["img_size"][0]), int(ckpt["img_size"][1]))
    dtype = amp_dtype(cfg.amp, device)
    max_batch = cfg.max_batch if cfg.max_batch is not None else auto_max_batch(device, cfg.batch_size)
    tta = TTAModel(model, cfg.tta, scales=cfg.scales, max_batch=max_batch, dtype=dtype).eval()
    workers = cfg.num_workers if cfg.num_workers is not None else default_workers(device)

    val = cfg.split == "val"
    if val:
        if tcfg.fold < 0:
            raise PipelineError(f"{ckpt_path}: the run was trained on every image (fold=-1); it has no out-of-fold images")
        coco = load_coco(cfg.data_dir, tcfg.ann_file, mask_rule=tcfg.mask_rule)
        _check_classes(coco, ckpt, ckpt_path)
        _, ids = split_ids(dataclasses.replace(tcfg, data_dir=cfg.data_dir), coco)
        if not ids:
            raise PipelineError(f"{tcfg.folds_file}: fold {tcfg.fold} has no images")
        oof_meta = _oof_meta(run_dir)
        stored_fixed: tuple[int, int] | None = _oof_size(oof_meta, tcfg, train_size)
        dataset = ValDataset(SegmentationDataset(coco, ids, None, MaskCache(coco, tcfg.cache_dir)), train_size)
        collate_fn = collate
    else:
        coco = load_coco(cfg.data_dir, cfg.test_ann, require_annotations=False)
        _check_classes(coco, ckpt, ckpt_path)
        ids = coco.image_ids
        if not ids:
            raise DataError(f"{coco.path}: no images to predict")
        stored_fixed = None
        dataset = TestDataset(coco, ids, build_transform("none", train_size))
        collate_fn = _collate_test
    _check_files(coco, ids)

    out = cfg.output_dir()
    info: dict[str, Any] = {
        "source": str(ckpt_path),
        "epoch": int(ckpt["epoch"]),
        "use_ema": bool(cfg.use_ema and ckpt.get("ema") is not None),
        "model": tcfg.model,
        "encoder": tcfg.encoder,
        "fold": tcfg.fold,
        "split": cfg.split,
        "ann_file": str(coco.path),
        "mask_rule": tcfg.mask_rule,
        "tta": cfg.tta,
        "tta_views": tta.view_names,
        "scales": sorted({float(v.scale) for v in tta.views}),
        "train_size": list(train_size),
        "predict_config": to_dict(cfg),
    }
    if val:
        info["stored_size"] = list(stored_fixed)  # type: ignore[arg-type]
        same_model = (
            cfg.use_ema
            and oof_meta.get("epoch") == ckpt["epoch"]
            and Path(str(oof_meta.get("source", ""))).name == ckpt_path.name
        )
        if same_model and "miou_full_resolution" in oof_meta:
            info["oof_miou_without_tta"] = oof_meta["miou_full_resolution"]
    else:
        info["store_scale"] = cfg.store_scale
    loader = DataLoader(dataset, batch_size=cfg.batch_size, num_workers=workers, collate_fn=collate_fn,
                        pin_memory=device.type == "cuda")
    k = coco.num_classes
    cm_written = torch.zeros(k, k, dtype=torch.int64, device=device)
    cm_full = torch.zeros(k, k, dtype=torch.int64, device=device)
    log.info("predicting %d %s images of %s with TTA %s (%d views) at %dx%d -> %s",
             len(ids), cfg.split, ckpt_path, cfg.tta, len(tta.views), train_size[0], train_size[1], out)

    from tqdm import tqdm

    with ProbWriter(out, coco.class_names, cfg.dtype, info) as writer, torch.inference_mode():
        for images, masks, metas in tqdm(loader, desc=f"predict {cfg.split} ({cfg.tta})", disable=not cfg.progress):
            probs = tta(images.to(device, non_blocking=True))
            for i, (p, meta) in enumerate(zip(probs, metas)):
                h, w = meta["height"], meta["width"]
                stored = stored_fixed or (max(1, round(h * cfg.store_scale)), max(1, round(w * cfg.store_scale)))
                small = resize_probs(p, stored)
                writer.write(meta["image_id"], meta["file_name"], h, w, small)
                if val:
                    gt = masks[i].to(device)
                    written = resize_probs(_as_stored(small, cfg.dtype), (h, w))
                    cm_written += confusion_matrix_torch(written.argmax(0), gt, k)
                    cm_full += confusion_matrix_torch(resize_probs(p, (h, w)).argmax(0), gt, k)
        if val:
            cm = cm_written.cpu().numpy()
            writer.info["miou"] = mean_iou(cm)
            writer.info["iou_per_class"] = {n: (None if np.isnan(v) else float(v)) for n, v in zip(coco.class_names, iou_per_class(cm))}
            writer.info["miou_full_resolution"] = mean_iou(cm_full.cpu().numpy())
    if val:
        base = writer.info.get("oof_miou_without_tta")
        log.info(
            "out-of-fold mIoU with TTA %s: %.4f from the written %dx%d maps, %.4f from the unstored maps (both "
            "resized to each image's own size and scored there)%s", cfg.tta, writer.info["miou"], stored_fixed[0], stored_fixed[1],  # type: ignore[index]
            writer.info["miou_full_resolution"],
            "" if base is None else f", without TTA {base:.4f} (gain {writer.info['miou_full_resolution'] - base:+.4f})",
        )
    log.info("wrote probabilities of %d images to %s", len(ids), out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main(PredictConfig, run, argv, "Predict a run's checkpoint with TTA (test images or out-of-fold)")


if __name__ == "__main__":
    raise SystemExit(main())
