"""Prediction of a run's checkpoint with test-time augmentation into a probability store.

The checkpoint's model predicts at the training size through :class:`TTAModel` (the
softmax probabilities of the views are averaged); probabilities are mapped back bilinearly
and streamed into a store (:mod:`pipeline.inference.store`).  Images much larger than the
training size (``sliding=auto``: a side at least ``sliding_factor`` times the trained one;
``sliding=on``: every image) are instead predicted at their own size, window by window
(:mod:`pipeline.inference.sliding`, TTA applied per window), and then stored the same way:

* ``split=test``: the images of ``test_ann`` (``test.json``), each stored at its own size
  times ``store_scale``; default folder ``<run>/test_<tta>``.
* ``split=val``: the run's own fold images from its folds file (out-of-fold predictions
  with TTA), stored at the size of the run's ``oof/`` maps so ensembling can use either;
  default folder ``<run>/oof_<tta>``.  The mIoU of the written maps against the ground
  truth (at each image's own size) is recorded in the store's ``meta.json``.

``png=true`` also writes viewable masks beside the store, ``<store>_png/``
(:mod:`pipeline.inference.mask_png`): per image a palette PNG whose pixels are the argmax of the
stored probabilities at the image's own size (what a reader of the store gets), a colour overlay,
and a legend.  ``images=<folder>`` predicts the image files of a folder instead of a split (no
annotation file, no store) and writes only those PNGs, from the unstored probabilities, into
``out_dir`` or ``<run>/png_<folder name>_<tta>/``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from pipeline.core.config import to_dict
from pipeline.core.errors import ConfigError, DataError, PipelineError
from pipeline.core.layout import PNG_LABELS, PNG_LEGEND, PNG_OVERLAYS, STORE_META, RunFolder, png_beside
from pipeline.core.torch_files import check_trust_list
from pipeline.data import (
    IMAGE_SUFFIXES,
    CocoData,
    FolderDataset,
    MaskCache,
    Preprocessing,
    SegmentationDataset,
    TestDataset,
    ValDataset,
    build_transform,
    collate,
    collate_test,
    list_images,
    load_coco,
    read_image,
    split_ids,
)
from pipeline.data.resize import resize_probs
from pipeline.data.store import DTYPES, ProbWriter
from pipeline.engine.checkpoint import load_checkpoint_model
from pipeline.engine.oof import stored_size
from pipeline.engine.runtime import AMP_MODES, amp_dtype, default_workers, loader_options, resolve_device
from pipeline.engine.train_config import TrainConfig
from pipeline.evaluation.metrics import confusion_matrix_torch, iou_per_class, mean_iou
from pipeline.inference.mask_png import PngWriter
from pipeline.inference.sliding import DEFAULT_OVERLAP, SlidingWindow, as_pair, list_blends
from pipeline.inference.tta import DEFAULT_SCALES, TTAModel, auto_max_batch, parse_tta

log = logging.getLogger(__name__)

SPLITS = ("test", "val")
SLIDING_MODES = ("auto", "on", "off")


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
    num_workers: int | None = None  # None: pipeline.engine.runtime.default_workers
    device: str = "auto"
    amp: str = "auto"
    dtype: str = "float16"  # float16 | uint8
    store_scale: float = 1.0  # split=test: maps stored at the image size x store_scale
    out_dir: str | None = None  # default <run_dir>/test_<tta> or <run_dir>/oof_<tta>
    progress: bool = True
    sliding: str = "auto"  # auto | on | off: predict large images at their own size, window by window
    sliding_factor: float = 1.5  # auto: slide when an image side is at least this x the trained side
    window: list[int] | None = None  # [side] or [height, width]; None: the trained size
    overlap: float = DEFAULT_OVERLAP  # fraction of a window that its neighbour shares
    blend: str = "gaussian"  # gaussian | uniform: how overlapping windows are weighted
    png: bool = False  # also write viewable masks (label PNGs, overlays, legend) beside the store: <store>_png/
    images: str | None = None  # a folder of image files to predict instead of split: writes only the PNGs, into
    # out_dir or <run_dir>/png_<folder name>_<tta>/ (no annotation file, no store)
    trust_pickle: list[str] = field(default_factory=list)  # files you trust to unpickle in full (it can run code)

    def validate(self) -> None:
        if not self.run_dir:
            raise ConfigError("run_dir is required (a training run folder such as runs/<experiment>/fold0)")
        checks = (
            ("split", SPLITS),
            ("dtype", DTYPES),
            ("amp", AMP_MODES),
            ("sliding", SLIDING_MODES),
            ("blend", tuple(list_blends())),
        )
        for key, names in checks:
            if getattr(self, key) not in names:
                raise ConfigError(f"{key}: unknown {getattr(self, key)!r}; known: {', '.join(names)}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.max_batch is not None and self.max_batch < 1:
            raise ConfigError(f"max_batch must be at least 1, got {self.max_batch}")
        if not 0 < self.store_scale <= 1:
            raise ConfigError(f"store_scale must be in (0, 1], got {self.store_scale}")
        if not self.sliding_factor >= 1:
            raise ConfigError(
                f"sliding_factor must be at least 1 (an image side this many times the trained side is "
                f"predicted with sliding windows), got {self.sliding_factor}"
            )
        if not 0 <= self.overlap < 1:
            raise ConfigError(
                f"overlap must be in [0, 1) (the fraction of a window its neighbour shares), got {self.overlap}"
            )
        if self.window is not None:
            as_pair(self.window, "window")
        parse_tta(self.tta, self.scales)
        check_trust_list(self.trust_pickle)

    def folder(self) -> RunFolder:
        return RunFolder(Path(self.run_dir))

    def checkpoint_path(self) -> Path:
        return self.folder().checkpoint(self.checkpoint)

    def output_dir(self) -> Path:
        """The probability store; with ``images``, the folder of PNGs."""
        if self.images:
            return Path(self.out_dir) if self.out_dir else self.folder().image_pngs(self.images, self.tta)
        return Path(self.out_dir) if self.out_dir else self.folder().store(self.split, self.tta)

    def png_dir(self) -> Path | None:
        """Where the viewable masks go: beside the store (``png``), the output folder (``images``), or nowhere."""
        if self.images:
            return self.output_dir()
        return png_beside(self.output_dir()) if self.png else None


@dataclass
class Job:
    """What one prediction reads and where each map goes."""

    name: str  # what is predicted: test, val or the image folder's name
    class_names: list[str]
    root: Path  # the items' file names are relative to it
    ids: list[int]
    file_names: list[str]
    sizes: list[tuple[int, int]]  # each image's own (height, width)
    dataset: Dataset  # images resized to the training size
    native: Dataset  # the same items with images at their own size (sliding windows)
    collate_fn: Callable
    stored_fixed: tuple[int, int] | None  # val: every map at this size; test: None (image size x store_scale)
    info: dict[str, Any]
    coco: CocoData | None = None  # None: a folder of images without an annotation file


def coco_job(
    name: str,
    coco: CocoData,
    ids: list[int],
    datasets: tuple[Dataset, Dataset],
    collate_fn: Callable,
    stored_fixed: tuple[int, int] | None,
    info: dict[str, Any],
) -> Job:
    images = [coco.image(i) for i in ids]
    return Job(
        name,
        list(coco.class_names),
        coco.data_dir,
        list(ids),
        [im["file_name"] for im in images],
        [(int(im["height"]), int(im["width"])) for im in images],
        *datasets,
        collate_fn,
        stored_fixed,
        info,
        coco,
    )


def check_files(coco: CocoData, ids: Sequence[int]) -> None:
    """Every image to predict exists (checked before anything is written)."""
    for image_id in ids:
        path = coco.image_path(image_id)
        if not path.is_file():
            raise DataError(f"{path}: image file not found (listed in {coco.path})")


def check_classes(coco: CocoData, ckpt: dict[str, Any], ckpt_path: Path) -> None:
    if list(coco.class_names) != list(ckpt["class_names"]):
        raise PipelineError(
            f"{coco.path}: classes {coco.class_names} differ from those of the checkpoint {ckpt_path} "
            f"({ckpt['class_names']})"
        )


def read_oof_meta(folder: RunFolder) -> dict[str, Any]:
    """The run's ``oof/meta.json`` (empty when the run wrote none)."""
    meta = folder.oof / STORE_META
    if not meta.is_file():
        return {}
    try:
        return json.loads(meta.read_text())
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{meta}: invalid JSON ({exc})") from exc


def as_stored(p: torch.Tensor, dtype: str) -> torch.Tensor:
    """``p`` as a reader of the store will see it (float16 or uint8 quantization)."""
    if dtype == "uint8":
        return torch.round(p.clamp(0, 1) * 255.0) / 255.0
    return p.half().float()


def val_job(cfg: PredictConfig, tcfg: TrainConfig, ckpt: dict[str, Any], ckpt_path: Path) -> Job:
    """Out-of-fold images of the run, at the size of its ``oof/`` maps."""
    if tcfg.fold < 0:
        raise PipelineError(f"{ckpt_path}: the run was trained on every image (fold=-1); it has no out-of-fold images")
    coco = load_coco(cfg.data_dir, tcfg.ann_file, mask_rule=tcfg.mask_rule)
    check_classes(coco, ckpt, ckpt_path)
    _, ids = split_ids(coco, tcfg.folds_file, tcfg.fold)
    if not ids:
        raise PipelineError(f"{tcfg.folds_file}: fold {tcfg.fold} has no images")
    train_size = (int(ckpt["img_size"][0]), int(ckpt["img_size"][1]))
    oof_meta = read_oof_meta(cfg.folder())
    stored = oof_meta.get("stored_size")
    fixed = (int(stored[0]), int(stored[1])) if stored else stored_size(train_size, tcfg.oof_scale)
    info: dict[str, Any] = {"stored_size": list(fixed)}
    same_model = (
        cfg.use_ema
        and oof_meta.get("epoch") == ckpt["epoch"]
        and Path(str(oof_meta.get("source", ""))).name == ckpt_path.name
    )
    if same_model and "miou_full_resolution" in oof_meta:
        info["oof_miou_without_tta"] = oof_meta["miou_full_resolution"]
    prep = Preprocessing.from_dict(ckpt.get("preprocessing"))
    native = SegmentationDataset(coco, ids, None, MaskCache(coco, tcfg.cache_dir), prep)
    return coco_job("val", coco, ids, (ValDataset(native, train_size), native), collate, fixed, info)


def test_job(cfg: PredictConfig, ckpt: dict[str, Any], ckpt_path: Path) -> Job:
    """Every image of ``test_ann``, each stored at its own size x ``store_scale``."""
    coco = load_coco(cfg.data_dir, cfg.test_ann, require_annotations=False)
    check_classes(coco, ckpt, ckpt_path)
    if not coco.image_ids:
        raise DataError(f"{coco.path}: no images to predict")
    train_size = (int(ckpt["img_size"][0]), int(ckpt["img_size"][1]))
    prep = Preprocessing.from_dict(ckpt.get("preprocessing"))
    dataset = TestDataset(coco, coco.image_ids, build_transform("none", train_size), prep)
    native = TestDataset(coco, coco.image_ids, None, prep)
    return coco_job(
        "test", coco, coco.image_ids, (dataset, native), collate_test, None, {"store_scale": cfg.store_scale}
    )


def folder_job(cfg: PredictConfig, ckpt: dict[str, Any]) -> Job:
    """Every image file of the folder ``cfg.images``, each decoded once here (its size, and a clear
    error naming a corrupt file before anything is written)."""
    from tqdm import tqdm

    root = Path(str(cfg.images))
    files = list_images(root, exclude=cfg.png_dir())
    if not files:
        raise DataError(f"{root}: no image files ({', '.join(IMAGE_SUFFIXES)}) to predict")
    names = [f.relative_to(root).as_posix() for f in files]
    sizes = [
        read_image(f).shape[:2] for f in tqdm(files, desc="checking images", disable=not cfg.progress, leave=False)
    ]
    train_size = (int(ckpt["img_size"][0]), int(ckpt["img_size"][1]))
    prep = Preprocessing.from_dict(ckpt.get("preprocessing"))
    resized = FolderDataset(root, names, sizes, build_transform("none", train_size), prep)
    native = FolderDataset(root, names, sizes, None, prep)
    ids = list(range(len(names)))
    return Job(
        root.resolve().name, list(ckpt["class_names"]), root, ids, names, sizes, resized, native, collate_test, None, {}
    )


def trained_downscaled(cfg: PredictConfig, sizes: Sequence[tuple[int, int]], train_size: tuple[int, int]) -> bool:
    """Whether the run was trained on images shrunk well below these images' typical size (the
    median side is at least ``sliding_factor`` times the trained side): windows at the images' own
    size would then show objects larger than the model saw in training."""
    if not sizes:
        return False
    typical = [float(np.median([size[axis] for size in sizes])) for axis in (0, 1)]
    return any(side >= cfg.sliding_factor * trained for side, trained in zip(typical, train_size, strict=True))


def sliding_indices(cfg: PredictConfig, sizes: Sequence[tuple[int, int]], train_size: tuple[int, int]) -> list[int]:
    """Positions in ``sizes`` (each image's height, width) of the images to predict with sliding
    windows: all (``sliding=on``), none (``off``), or (``auto``) those with a side at least
    ``sliding_factor`` times the trained side, when the run was trained at about these images'
    scale (not :func:`trained_downscaled`): the images much larger than the typical one."""
    if cfg.sliding == "off" or (cfg.sliding == "auto" and trained_downscaled(cfg, sizes, train_size)):
        return []
    return [
        i
        for i, size in enumerate(sizes)
        if cfg.sliding == "on"
        or any(side >= cfg.sliding_factor * trained for side, trained in zip(size, train_size, strict=True))
    ]


def resolve_window(cfg: PredictConfig, train_size: tuple[int, int]) -> tuple[int, int]:
    """``cfg.window`` as (h, w), or the trained size."""
    return as_pair(cfg.window, "window") if cfg.window is not None else train_size


def log_sliding_mode(
    cfg: PredictConfig,
    slide: SlidingWindow,
    n_sliding: int,
    n_images: int,
    train_size: tuple[int, int],
    downscaled: bool = False,
) -> None:
    """One line: which images are predicted with sliding windows, and why."""
    trained = f"{train_size[0]}x{train_size[1]}"
    how = (
        f"predicted at their own size in {slide.window[0]}x{slide.window[1]} windows (stride "
        f"{slide.stride[0]}x{slide.stride[1]}, overlap {cfg.overlap:g}, {slide.blend} blend)"
    )
    if cfg.sliding == "off":
        log.info("sliding=off: every image is resized to the trained size %s", trained)
    elif cfg.sliding == "on":
        log.info("sliding=on: every image (%d) is %s", n_images, how)
    elif n_sliding:
        log.info(
            "sliding=auto: %d of %d images have a side at least %g x the trained size %s: they are %s; "
            "the other %d are resized to %s",
            n_sliding,
            n_images,
            cfg.sliding_factor,
            trained,
            how,
            n_images - n_sliding,
            trained,
        )
    elif downscaled:
        log.info(
            "sliding=auto: the run was trained at %s, well below these images' typical size (the model learned "
            "objects at that scale): every image is resized to it (sliding=on forces windows at the images' size)",
            trained,
        )
    else:
        log.info(
            "sliding=auto: no image has a side at least %g x the trained size %s: every image is resized to it",
            cfg.sliding_factor,
            trained,
        )


Part = tuple[DataLoader, Callable[[torch.Tensor], torch.Tensor]]


def stream_predictions(
    cfg: PredictConfig,
    parts: Sequence[Part],
    job: Job,
    writer: ProbWriter | None,
    device: torch.device,
    pngs: PngWriter | None = None,
) -> None:
    """Predict every batch of each (loader, predictor) part, write each image's map (to the store
    ``writer`` and/or as PNGs), and (val) score the written and unstored maps.  The PNGs show the
    argmax of the stored maps at the image's size, or (no store) of the unstored ones."""
    from tqdm import tqdm

    k, val = len(job.class_names), job.stored_fixed is not None
    cm_written = torch.zeros(k, k, dtype=torch.int64, device=device)
    cm_full = torch.zeros_like(cm_written)
    bar = tqdm(total=len(job.ids), unit="img", desc=f"predict {job.name} ({cfg.tta})", disable=not cfg.progress)
    for loader, predictor in parts:
        for images, masks, metas in loader:
            probs = predictor(images.to(device, non_blocking=True))
            for i, (p, meta) in enumerate(zip(probs, metas, strict=False)):
                h, w = meta["height"], meta["width"]
                labels = None
                if writer is not None:
                    small = resize_probs(p, job.stored_fixed or stored_size((h, w), cfg.store_scale))
                    writer.write(meta["image_id"], meta["file_name"], h, w, small)
                    if val or pngs is not None:
                        labels = resize_probs(as_stored(small, cfg.dtype), (h, w)).argmax(0)
                else:
                    labels = resize_probs(p, (h, w)).argmax(0)
                if val:
                    gt = masks[i].to(device)
                    cm_written += confusion_matrix_torch(labels, gt, k)
                    cm_full += confusion_matrix_torch(resize_probs(p, (h, w)).argmax(0), gt, k)
                if pngs is not None:
                    pngs.write(meta["image_id"], labels.cpu().numpy())
            bar.update(len(metas))
    bar.close()
    if val:
        cm = cm_written.cpu().numpy()
        writer.info["miou"] = mean_iou(cm)
        writer.info["iou_per_class"] = {
            n: (None if np.isnan(v) else float(v)) for n, v in zip(job.class_names, iou_per_class(cm), strict=False)
        }
        writer.info["miou_full_resolution"] = mean_iou(cm_full.cpu().numpy())


def log_oof_scores(cfg: PredictConfig, info: dict[str, Any], stored: tuple[int, int]) -> None:
    base = info.get("oof_miou_without_tta")
    log.info(
        "out-of-fold mIoU with TTA %s: %.4f from the written %dx%d maps, %.4f from the unstored maps (both "
        "resized to each image's own size and scored there)%s",
        cfg.tta,
        info["miou"],
        stored[0],
        stored[1],
        info["miou_full_resolution"],
        "" if base is None else f", without TTA {base:.4f} (gain {info['miou_full_resolution'] - base:+.4f})",
    )


def store_info(
    cfg: PredictConfig,
    ckpt_path: Path,
    ckpt: dict[str, Any],
    tcfg: TrainConfig,
    job: Job,
    tta: TTAModel,
    slide: SlidingWindow,
    n_sliding: int,
) -> dict[str, Any]:
    """What the store's ``meta.json`` records of this prediction."""
    train_size = (int(ckpt["img_size"][0]), int(ckpt["img_size"][1]))
    return {
        "source": str(ckpt_path),
        "epoch": int(ckpt["epoch"]),
        "use_ema": bool(cfg.use_ema and ckpt.get("ema") is not None),
        "model": tcfg.model,
        "encoder": tcfg.encoder,
        "fold": tcfg.fold,
        "split": cfg.split,
        "ann_file": str(job.coco.path) if job.coco is not None else None,
        "mask_rule": tcfg.mask_rule,
        "tta": cfg.tta,
        "tta_views": tta.view_names,
        "scales": sorted({float(v.scale) for v in tta.views}),
        "train_size": list(train_size),
        "sliding": {
            "mode": cfg.sliding,
            "images": n_sliding,
            "window": list(slide.window),
            "stride": list(slide.stride),
            "blend": slide.blend,
        },
        "preprocessing": Preprocessing.from_dict(ckpt.get("preprocessing")).as_dict(),
        "predict_config": to_dict(cfg),
        **job.info,
    }


def prediction_parts(
    cfg: PredictConfig, job: Job, sliding: Sequence[int], tta: TTAModel, slide: SlidingWindow, device: torch.device
) -> list[Part]:
    """(loader, predictor) of the images resized to the training size (batched) and of those
    predicted window by window at their own size (one image per batch, its windows batched)."""
    workers = cfg.num_workers if cfg.num_workers is not None else default_workers(device)
    opts = {**loader_options(device, workers), "persistent_workers": False}
    chosen = set(sliding)
    resized = [i for i in range(len(job.ids)) if i not in chosen]
    return [
        (DataLoader(Subset(dataset, idx), batch_size=bs, collate_fn=job.collate_fn, **opts), predictor)
        for dataset, idx, bs, predictor in (
            (job.dataset, resized, cfg.batch_size, tta),
            (job.native, list(sliding), 1, slide),
        )
        if idx
    ]


def write_outputs(
    cfg: PredictConfig, parts: Sequence[Part], job: Job, device: torch.device, info: dict[str, Any] | None
) -> None:
    """Stream the predictions into the store (with its ``info``; none with ``images``) and/or the PNGs,
    then log where they went."""
    out, png_dir = cfg.output_dir(), cfg.png_dir()
    pngs = None
    if png_dir is not None:
        pngs = PngWriter(png_dir, job.root, job.class_names, list(zip(job.ids, job.file_names, strict=True)))
    if cfg.images:
        with torch.inference_mode():
            stream_predictions(cfg, parts, job, None, device, pngs)
    else:
        with ProbWriter(out, job.class_names, cfg.dtype, info) as writer, torch.inference_mode():
            stream_predictions(cfg, parts, job, writer, device, pngs)
        if job.stored_fixed is not None:
            log_oof_scores(cfg, writer.info, job.stored_fixed)
        log.info("wrote probabilities of %d images to %s", len(job.ids), out)
    if pngs is not None:
        pngs.close()
        log.info(
            "wrote label PNGs (pixel = class index) and overlays of %d images to %s (%s/, %s/; colours in %s)",
            len(job.ids),
            png_dir,
            PNG_LABELS,
            PNG_OVERLAYS,
            png_dir / PNG_LEGEND,
        )


def predict(cfg: PredictConfig) -> Path:
    """Predict ``cfg.split`` with TTA and write the probability store (and with ``png``, the PNGs
    beside it); returns the store's folder.  With ``images``: predict that folder's image files, write
    only the PNGs and return their folder."""
    cfg.validate()
    if not Path(cfg.run_dir).is_dir():
        raise PipelineError(f"{cfg.run_dir}: run folder not found (train it first: make train)")
    ckpt_path = cfg.checkpoint_path()
    if not ckpt_path.is_file():
        raise PipelineError(f"{ckpt_path}: checkpoint not found (checkpoint={cfg.checkpoint})")
    device = resolve_device(cfg.device)
    model, tcfg, ckpt = load_checkpoint_model(ckpt_path, device, use_ema=cfg.use_ema, trust_pickle=cfg.trust_pickle)
    dtype = amp_dtype(cfg.amp, device)
    max_batch = cfg.max_batch if cfg.max_batch is not None else auto_max_batch(device, cfg.batch_size)
    tta = TTAModel(model, cfg.tta, scales=cfg.scales, max_batch=max_batch, dtype=dtype).eval()
    train_size = (int(ckpt["img_size"][0]), int(ckpt["img_size"][1]))
    # a window is the size of a training image, so a call sends as many windows as a batch has images
    slide = SlidingWindow(
        tta,
        resolve_window(cfg, train_size),
        overlap=cfg.overlap,
        blend=cfg.blend,
        max_batch=cfg.batch_size,
        progress=cfg.progress,
    ).eval()
    if cfg.images:
        job = folder_job(cfg, ckpt)
    else:
        job = val_job(cfg, tcfg, ckpt, ckpt_path) if cfg.split == "val" else test_job(cfg, ckpt, ckpt_path)
        check_files(job.coco, job.ids)
    sizes = job.sizes
    sliding = sliding_indices(cfg, sizes, train_size)
    parts = prediction_parts(cfg, job, sliding, tta, slide, device)
    out = cfg.output_dir()
    log_sliding_mode(cfg, slide, len(sliding), len(job.ids), train_size, trained_downscaled(cfg, sizes, train_size))
    log.info(
        "predicting %d %s images with %s, TTA %s (%d views) at %dx%d -> %s",
        len(job.ids),
        job.name,
        ckpt_path,
        cfg.tta,
        len(tta.views),
        train_size[0],
        train_size[1],
        out,
    )
    info = None if cfg.images else store_info(cfg, ckpt_path, ckpt, tcfg, job, tta, slide, len(sliding))
    write_outputs(cfg, parts, job, device, info)
    return out
