"""The training engine: build a run, resume it, fit it epoch by epoch, write its files.

:func:`train` is what the train stage and the tuner call.  A :class:`Trainer` is built in
named steps (data, model, optimisation), resumes from ``last.pt`` when it exists, and
runs :func:`~pipeline.engine.loop.train_one_epoch` / :func:`~pipeline.engine.loop.evaluate`
per epoch; everything else (EMA, early stopping, the tuner's pruning report) is a
:class:`~pipeline.engine.hooks.Hook`.  Files of the run folder (:mod:`pipeline.core.layout`):
``config.yaml``, ``metrics.csv``, ``timing.csv``, ``last.pt``/``best.pt`` (through
:class:`~pipeline.engine.checkpoint.CheckpointSaver`), ``curves.png`` and ``oof/``.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline import models as model_registry
from pipeline.core.config import read_yaml_mapping, save_config, to_dict
from pipeline.core.errors import ConfigError, PipelineError
from pipeline.core.labels import IGNORE_INDEX
from pipeline.core.layout import RunFolder
from pipeline.data import (
    CocoData,
    MaskCache,
    SegmentationDataset,
    ValDataset,
    build_transform,
    collate,
    image_size_from_data,
    load_coco,
    split_ids,
)
from pipeline.data.copypaste import CopyPaste, ObjectBank, repeat_factors, resolve_classes
from pipeline.data.image_cache import (
    CachedTrainingImages,
    CachedValidationImages,
    DeviceBatches,
    ImageCache,
    disk_allows,
)
from pipeline.data.instances import ComponentTargets, InstanceDataset, collate_instances
from pipeline.data.pseudo_data import JoinedDataset, PseudoDataset
from pipeline.data.resize import scaled_size
from pipeline.engine.checkpoint import (
    CheckpointSaver,
    load_model_state,
    model_state,
    read_checkpoint,
    rng_state,
    set_rng_state,
)
from pipeline.engine.hooks import EarlyStopping, EMAHook, Hook, TimeBudget
from pipeline.engine.loop import evaluate, train_one_epoch
from pipeline.engine.oof import write_oof
from pipeline.engine.optim import (
    build_optimizer,
    build_scheduler,
    load_scheduler_state,
    resize_schedule,
    scheduler_state,
)
from pipeline.engine.records import append_timing, plot_curves, write_metrics
from pipeline.engine.runtime import (
    Dist,
    amp_dtype,
    channels_last_pays,
    configure_runtime,
    default_workers,
    loader_options,
    maybe_compile,
    precision_name,
    resolve_device,
    wants_grad_scaler,
)
from pipeline.engine.sampling import EpochSeededDataset, EpochShuffleSampler
from pipeline.engine.sizes import SizeSchedule
from pipeline.engine.trackers import build_trackers
from pipeline.engine.train_config import TrainConfig, changed_keys
from pipeline.evaluation.metrics import iou_per_class, mean_iou
from pipeline.models.contract import has_own_loss, own_loss_description, wants_instances
from pipeline.models.losses import build_loss, frequency_class_weights
from pipeline.models.preprocessing import encoder_preprocessing
from pipeline.models.pretrained import apply_weights, resolve_build

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    best_miou: float
    best_epoch: int
    epochs_done: int
    history: list[dict[str, Any]]


def _sides(cfg: TrainConfig, key: str, divisor: int) -> tuple[int, int]:
    """``cfg.<key>`` ([side] or [h, w]) as (H, W), checked against the model's input divisor."""
    value = getattr(cfg, key)
    h, w = (value[0], value[0]) if len(value) == 1 else value
    if h % divisor or w % divisor:
        raise ConfigError(f"{key} {h}x{w} must be a multiple of {divisor} for {cfg.model}")
    return int(h), int(w)


def resolve_size(cfg: TrainConfig, coco: CocoData, divisor: int) -> tuple[int, int]:
    """Training size (H, W): ``img_size`` checked against the model's input divisor, or the
    data's most common size rounded up to it."""
    if cfg.img_size is None:
        return image_size_from_data(coco, divisor)
    return _sides(cfg, "img_size", divisor)


def resolve_crop(cfg: TrainConfig, size: tuple[int, int], divisor: int) -> tuple[int, int] | None:
    """Training window (H, W) cut from the ``size`` image, or None to train on the whole image."""
    if cfg.crop_size is None:
        return None
    h, w = _sides(cfg, "crop_size", divisor)
    if h > size[0] or w > size[1]:
        raise ConfigError(f"crop_size {h}x{w} is larger than the training size {size[0]}x{size[1]}")
    return None if (h, w) == tuple(size) else (h, w)


class Trainer:
    """One fold's training run."""

    def __init__(self, cfg: TrainConfig, hooks: Sequence[Hook] = ()):
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        configure_runtime(self.device, cudnn_benchmark=cfg.cudnn_benchmark, tf32=cfg.tf32, threads=cfg.threads)
        self.dist = Dist(self.device)
        self.folder = cfg.folder()
        if self.folder.last.exists():
            self._check_resumable()
        self.saver = CheckpointSaver(self.folder, cfg.keep_top_k)
        self.show_progress = cfg.progress and self.dist.main
        self.history: list[dict[str, Any]] = []
        self.start_epoch, self.best, self.best_epoch, self.stop = 0, -1.0, -1, False
        self.end_epoch = cfg.epochs  # a time budget may bring it forward
        self._build_data()
        self._build_model()
        self.hooks: list[Hook] = [*self._default_hooks(), *hooks]
        self._build_loaders()
        self._build_optimization()

    def _check_resumable(self) -> None:
        """A run folder with ``last.pt``: resume it only with the same config (but for
        :data:`RESUMABLE_KEYS`); ``resume=false`` moves it aside (never deletes it) to start afresh."""
        folder = self.folder
        if not self.cfg.resume:
            aside = folder.path.with_name(f"old-{folder.path.name}-{time.strftime('%Y%m%d-%H%M%S')}")
            if self.dist.main:
                folder.path.rename(aside)
                log.warning("resume=false: moved the earlier run %s aside to %s; starting afresh", folder.path, aside)
            self.dist.barrier()
            return
        if folder.config.is_file():
            stored, source = read_yaml_mapping(folder.config), folder.config
        else:
            stored, source = read_checkpoint(folder.last, self.cfg.trust_pickle).get("config", {}), folder.last
        changed = changed_keys(stored, self.cfg)
        if changed:
            listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in sorted(changed.items()))
            raise PipelineError(
                f"{folder.last} was trained with another config ({source}): {listed}. Its checkpoint would not "
                f"match, so it is not resumed. Either name a new experiment (make EXP=<new name>, experiment=), "
                f"or start over with RESUME=0 (resume=false), which moves {folder.path} aside, never deleting it"
            )

    # ------------------------------------------------------------------------- building
    def _build_data(self) -> None:
        cfg = self.cfg
        self.coco = load_coco(cfg.data_dir, cfg.ann_file, mask_rule=cfg.mask_rule)
        self.preprocessing = encoder_preprocessing(cfg.model, cfg.encoder)
        self.train_ids, self.val_ids = split_ids(self.coco, cfg.folds_file, cfg.fold)
        self.cache = MaskCache(self.coco, cfg.cache_dir)
        if self.dist.main:
            self.cache.build(self.train_ids + self.val_ids, progress=cfg.progress)
        self.dist.barrier()

    def _build_model(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        source, weight_args = resolve_build(
            cfg.model, cfg.encoder, cfg.encoder_weights, cfg.weights, cfg.pretrained, cfg.weights_dir
        )
        self.model = model_registry.build_model(
            cfg.model,
            num_classes=self.coco.num_classes,
            encoder=cfg.encoder,
            trust_pickle=cfg.trust_pickle,
            **weight_args,
            **(cfg.model_options or {}),
        )
        cfg.weights_source = apply_weights(self.model, source, cfg.model, cfg.trust_pickle).to_dict()
        self.model = self.model.to(self.device)
        divisor = int(getattr(self.model, "input_divisor", 1))
        self.size = resolve_size(cfg, self.coco, divisor)
        self.crop = resolve_crop(cfg, self.size, divisor)
        low = scaled_size(self.train_size, cfg.progressive_scale, divisor)
        self.sizes = SizeSchedule(self.train_size, low, cfg.progressive)
        if cfg.fine_tune_from:
            self._load_fine_tune(cfg.fine_tune_from)
        self.channels_last = cfg.channels_last and channels_last_pays(self.device)
        self.micro_batch: int | None = None  # images per forward pass; halved on an out-of-memory error
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.dtype = amp_dtype(cfg.amp, self.device)
        cfg.precision = precision_name(self.dtype)
        self.scaler = torch.amp.GradScaler("cuda", enabled=wants_grad_scaler(self.dtype))

    def _load_fine_tune(self, source: str) -> None:
        """Start from another run's weights (its best.pt, EMA weights when it has them)."""
        path = Path(source)
        path = RunFolder(path).best if path.is_dir() else path
        ckpt = read_checkpoint(path, self.cfg.trust_pickle)
        if list(ckpt.get("class_names", [])) != self.coco.class_names:
            raise PipelineError(f"{path}: classes {ckpt.get('class_names')} differ from {self.coco.path}'s")
        load_model_state(self.model, model_state(ckpt), path)
        log.info(
            "fine-tuning from %s (epoch %s, val mIoU %.4f)",
            path,
            ckpt.get("epoch"),
            ckpt.get("best_metric", float("nan")),
        )

    def _default_hooks(self) -> list[Hook]:
        hooks: list[Hook] = []
        if self.cfg.ema:
            hooks.append(EMAHook(self.model, self.cfg.ema_decay))
        hooks.append(EarlyStopping(self.cfg.patience, self.cfg.val_every))
        if self.cfg.time_budget is not None:
            hooks.append(TimeBudget(self.cfg.time_budget))
        if self.cfg.swa_epochs:
            from pipeline.engine.averaging import SWAHook

            hooks.append(SWAHook(self.model, self.cfg.swa_epochs))
        if self.dist.main:
            hooks += build_trackers(self.cfg, self.folder)
        return hooks

    def _build_loaders(self) -> None:
        cfg = self.cfg
        self.criterion = self._criterion()
        self.workers = cfg.num_workers if cfg.num_workers is not None else default_workers(self.device)
        opts = loader_options(self.device, self.workers, cfg.prefetch_factor)
        transform = build_transform(cfg.augment, self.size, self.crop)
        self.images = self._image_cache()
        train_set = EpochSeededDataset(self._training_images(transform), cfg.seed)
        repeats = repeat_factors(self.coco, self.train_ids, cfg.rfs_threshold) if cfg.rfs_threshold else None
        if repeats is not None and self.pseudo is not None:
            repeats = np.concatenate([repeats, np.ones(len(self.pseudo))])
        self.sampler = EpochShuffleSampler(
            len(train_set), cfg.seed, self.dist.rank, self.dist.world, shuffle=True, drop_last=True, repeats=repeats
        )
        if len(self.sampler) < cfg.batch_size:
            raise ConfigError(
                f"batch_size {cfg.batch_size} is larger than the {len(self.sampler)} training images per process"
            )
        per_epoch = len(self.sampler) // cfg.batch_size
        self.batches = min(per_epoch, cfg.max_train_batches) if cfg.max_train_batches else per_epoch
        self.steps_per_epoch = math.ceil(self.batches / cfg.accum_steps)
        self.train_loader = DataLoader(
            train_set,
            batch_size=cfg.batch_size,
            sampler=self.sampler,
            drop_last=True,
            collate_fn=collate_instances if wants_instances(self.model) else collate,
            **opts,
        )
        if self.images is not None:
            self.train_loader = self._on_device(self.train_loader)
        self.val_loader = None
        if self.val_ids:
            val_set: Dataset = (
                CachedValidationImages(self.images, self.cache, self.val_ids)
                if self.images is not None
                else ValDataset(
                    SegmentationDataset(self.coco, self.val_ids, None, self.cache, self.preprocessing), self.size
                )
            )
            # shard without padding so the all-reduced confusion matrix counts each image once
            val_sampler = list(range(len(val_set)))[self.dist.rank :: self.dist.world] if self.dist.enabled else None
            self.val_loader = DataLoader(
                val_set, batch_size=cfg.batch_size, sampler=val_sampler, collate_fn=collate, **opts
            )
            if self.images is not None:
                self.val_loader = self._on_device(self.val_loader)

    def _on_device(self, loader: DataLoader) -> DeviceBatches:
        return DeviceBatches(loader, self.device, self.preprocessing, self.channels_last)

    def _image_cache(self) -> ImageCache | None:
        """The decoded images at the training size (built here when missing), or None where the pixels are
        not the cache's to give: copy-paste pastes before the resize, an instance family reads its objects
        at the image's own size; automatic (``image_cache=null``) also where the disk lacks the room."""
        cfg = self.cfg
        why_not = (
            "copy_paste pastes objects before the resize"
            if cfg.copy_paste
            else "the family trains on instances"
            if wants_instances(self.model)
            else None
        )
        if cfg.image_cache is False or (cfg.image_cache is None and why_not):
            return None
        if why_not:
            raise ConfigError(f"image_cache=true: {why_not}; set image_cache=null (automatic) or false")
        cache = ImageCache(self.coco, self.size, Path(cfg.cache_dir) / "images", self.cache)
        if cfg.image_cache is None and not disk_allows(cache):
            log.info("image cache off: its %.0f MB do not fit the free disk under %s", cache.nbytes / 1e6, cache.dir)
            return None
        if self.dist.main:
            cache.build(progress=cfg.progress)
        self.dist.barrier()
        return cache

    def _training_images(self, transform) -> Dataset:
        """The fold's training images with their targets (class maps, or the annotation file's instances for
        a family that trains on instances), then the pseudo-labelled images when ``pseudo_dir`` is set (their
        maps' connected components as instances)."""
        cfg = self.cfg
        instances = wants_instances(self.model)
        if instances:
            base: Dataset = InstanceDataset(
                self.coco, self.train_ids, transform, self.preprocessing, copy_paste=self._copy_paste()
            )
        elif self.images is not None:
            base = CachedTrainingImages(self.images, self.train_ids, transform)
        else:
            base = SegmentationDataset(
                self.coco, self.train_ids, transform, self.cache, self.preprocessing, pairs=self._copy_paste()
            )
        self.pseudo = None
        if cfg.pseudo_dir:
            prep = None if self.images is not None else self.preprocessing  # normalised on the device
            self.pseudo = PseudoDataset(cfg.pseudo_dir, cfg.data_dir, self.coco.class_names, transform, prep)
            log.info(
                "adding %d pseudo-labelled images (round %d) from %s to the training images",
                len(self.pseudo),
                self.pseudo.manifest["round"],
                cfg.pseudo_dir,
            )
            base = JoinedDataset(base, ComponentTargets(self.pseudo) if instances else self.pseudo)
        return base

    def _criterion(self) -> torch.nn.Module | None:
        """The configured loss; None for a family that trains with its own (``loss=model``)."""
        cfg = self.cfg
        own = has_own_loss(self.model)
        if own and cfg.loss != "model":
            raise ConfigError(
                f"model {cfg.model!r} trains with its own loss ({own_loss_description(self.model)}); "
                f"loss={cfg.loss!r} cannot replace it: set loss=model"
            )
        if cfg.loss == "model":
            if not own:
                raise ConfigError(f"loss=model: model {cfg.model!r} has no loss of its own; pick one of the losses")
            return None
        return build_loss(
            cfg.loss,
            self.coco.num_classes,
            ignore_index=IGNORE_INDEX,
            class_weights=self._class_weights(),
            label_smoothing=cfg.label_smoothing,
            **(cfg.loss_options or {}),
        ).to(self.device)

    def _class_weights(self) -> list[float] | None:
        """The configured weights, or for a mode (``inverse_sqrt``) weights from the pixel counts of
        the training images (this fold's, from the mask cache)."""
        mode = self.cfg.class_weights
        if not isinstance(mode, str):
            return mode
        counts = sum(self.cache.class_pixels(image_id) for image_id in self.train_ids)
        weights = frequency_class_weights(counts, mode)
        named = sorted(zip(weights, self.coco.class_names, strict=True))
        log.info(
            "class weights (%s, from %d training images): %s ... %s",
            mode,
            len(self.train_ids),
            ", ".join(f"{n} {w:.2f}" for w, n in named[:3]),
            ", ".join(f"{n} {w:.2f}" for w, n in named[-3:]),
        )
        return weights

    def _copy_paste(self) -> CopyPaste | None:
        cfg = self.cfg
        if not cfg.copy_paste:
            return None
        classes = resolve_classes(self.coco, self.train_ids, cfg.copy_paste_classes, cfg.copy_paste_rarest)
        return CopyPaste(ObjectBank(self.coco, self.train_ids, classes, self.cache), cfg.copy_paste, cfg.copy_paste_max)

    def _build_optimization(self) -> None:
        self.net = maybe_compile(self.dist.wrap(self.model, self.device), self.cfg.compile)
        self.optimizer = build_optimizer(self.cfg, self.model)
        self.scheduler = build_scheduler(self.cfg, self.optimizer, self.steps_per_epoch)

    # ------------------------------------------------------------------------- resuming
    def resume(self) -> bool:
        """Continue from ``last.pt`` when it exists: every state, the history and RNG states."""
        ckpt = self.saver.load_last(self.cfg.trust_pickle)
        if ckpt is None:
            return False
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        load_scheduler_state(self.scheduler, ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        for hook in self.hooks:
            if hook.state_key is not None:
                hook.load_state_dict(ckpt.get(hook.state_key))
        self.start_epoch, self.best, self.best_epoch = ckpt["epoch"] + 1, ckpt["best_metric"], ckpt["best_epoch"]
        self.sizes.low_until = ckpt.get("low_until")
        self.cfg.weights_source = ckpt.get("config", {}).get("weights_source", self.cfg.weights_source)
        self.history = ckpt["history"]
        set_rng_state(ckpt["rng"])
        log.info(
            "resumed %s at epoch %d (best mIoU %.4f at epoch %d)",
            self.folder.last,
            self.start_epoch,
            self.best,
            self.best_epoch,
        )
        return True

    def checkpoint_state(self, epoch: int) -> dict[str, Any]:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": scheduler_state(self.scheduler),
            "scaler": self.scaler.state_dict(),
            "ema": None,
            "epoch": epoch,
            "best_metric": self.best,
            "best_epoch": self.best_epoch,
            "low_until": self.sizes.low_until,
            "history": self.history,
            "rng": rng_state(),
            "config": to_dict(self.cfg),
            "class_names": self.coco.class_names,
            "num_classes": self.coco.num_classes,
            "img_size": list(self.size),
            "preprocessing": self.preprocessing.as_dict(),
            "architecture": getattr(self.model, "architecture", None),
            "ann_digest": self.coco.digest,
            "pseudo": None
            if self.pseudo is None
            else {"dir": self.cfg.pseudo_dir, "round": self.pseudo.manifest["round"]},
        }
        for hook in self.hooks:
            if hook.state_key is not None:
                state[hook.state_key] = hook.state_dict()
        return state

    @property
    def pause_epoch(self) -> int:
        """The epoch this process stops before (``stop_epoch``; the schedule still ends at ``end_epoch``)."""
        return self.cfg.stop_epoch if self.cfg.stop_epoch is not None else self.cfg.epochs

    def resize(self, end_epoch: int) -> None:
        """End training after epoch ``end_epoch - 1`` (at most the configured epochs) and make the
        schedule decay by then."""
        self.end_epoch = min(self.cfg.epochs, max(0, int(end_epoch)))
        if not resize_schedule(self.scheduler, self.end_epoch * self.steps_per_epoch):
            log.info("scheduler %s cannot be resized: training stops at epoch %d", self.cfg.scheduler, self.end_epoch)

    @property
    def train_size(self) -> tuple[int, int]:
        """Size of the full-size training inputs: the crop when training on windows, else the image size."""
        return self.crop or self.size

    def input_size(self, epoch: int) -> tuple[int, int]:
        """Size of the training inputs of ``epoch``: the low size in the progressive phase."""
        return self.sizes.size(epoch, self.end_epoch)

    # ------------------------------------------------------------------------- epochs
    def evaluation_model(self) -> torch.nn.Module:
        for hook in self.hooks:
            model = hook.evaluation_model()
            if model is not None:
                return model
        return self.model

    def validate(self, epoch: int) -> dict[str, float]:
        """val mIoU and per-class IoU of the evaluation model (NaN when this epoch is not validated)."""
        due = (epoch + 1) % self.cfg.val_every == 0 or epoch + 1 >= min(self.end_epoch, self.pause_epoch)
        if self.val_loader is None or not due:
            return {"val_miou": float("nan")}
        return self.evaluate_model(self.evaluation_model())

    def evaluate_model(self, model: torch.nn.Module) -> dict[str, float]:
        """val mIoU and per-class IoU of ``model`` on the fold's images (NaN without them)."""
        if self.val_loader is None:
            return {"val_miou": float("nan")}
        self.dist.sync_buffers(model)
        cm = evaluate(
            model,
            self.val_loader,
            self.coco.num_classes,
            self.device,
            self.dtype,
            self.channels_last,
            self.cfg.max_val_batches,
        )
        cm = self.dist.all_sum(torch.from_numpy(cm).to(self.device)).cpu().numpy()
        return {
            "val_miou": mean_iou(cm),
            **{f"iou_{n}": float(v) for n, v in zip(self.coco.class_names, iou_per_class(cm), strict=False)},
        }

    def _record(self, epoch: int, row: dict[str, Any], timing: dict[str, Any], improved: bool) -> None:
        """Checkpoint and files of an epoch (rank 0)."""
        if not self.dist.main:
            return
        weights = self.evaluation_model().state_dict() if self.cfg.keep_top_k else None
        self.saver.save(self.checkpoint_state(epoch), best=improved, metric=row["val_miou"], eval_weights=weights)
        write_metrics(self.history, self.folder.metrics)
        append_timing(timing, self.folder.timing)
        if self.cfg.plot:
            plot_curves(self.history, self.coco.class_names, self.folder.curves)
        val = "not validated" if math.isnan(row["val_miou"]) else f"val mIoU {row['val_miou']:.4f}"
        best = "none yet" if self.best_epoch < 0 else f"{self.best:.4f} @ {self.best_epoch}"
        log.info(
            "epoch %d: loss %.4f, %s (best %s), %.1f img/s",
            epoch,
            row["train_loss"],
            val,
            best,
            timing["train_images_per_s"],
        )

    def run_epoch(self, epoch: int) -> dict[str, Any]:
        self.sizes.start_epoch(epoch, self.end_epoch)  # once at full size, a lengthened run stays there
        train_loss, seconds = train_one_epoch(self, epoch)
        row: dict[str, Any] = {"epoch": epoch, "train_loss": train_loss, "lr": self.optimizer.param_groups[-1]["lr"]}
        started = time.perf_counter()
        row.update(self.validate(epoch))
        images = self.batches * self.cfg.batch_size * self.dist.world
        timing = {
            "epoch": epoch,
            "train_s": round(seconds, 4),
            "train_images_per_s": round(images / seconds, 3),
            "val_s": round(time.perf_counter() - started, 4),
        }
        improved = not math.isnan(row["val_miou"]) and row["val_miou"] > self.best
        if improved:
            self.best, self.best_epoch = row["val_miou"], epoch
        if self.val_loader is None:
            self.best, self.best_epoch, improved = float("nan"), epoch, True
        self.history.append(row)
        self._record(epoch, row, timing, improved)
        self.dist.barrier()
        return row

    def fit(self) -> TrainResult:
        """Resume if possible, train the remaining epochs, write the out-of-fold store; the hooks' run
        ends with its scores, or with None when training raised."""
        try:
            result, oof = self._fit()
        except BaseException:
            for hook in self.hooks:
                try:
                    hook.on_run_end(self, None)
                except Exception:  # the error that ended training is the one to report
                    log.warning("%s could not close its run", type(hook).__name__, exc_info=True)
            raise
        for hook in self.hooks:
            hook.on_run_end(self, self.scores(oof))
        return result

    def scores(self, oof: Path | None) -> dict[str, float]:
        """What the run ends with: its best val mIoU and epoch, the epochs trained, and the out-of-fold
        mIoU of ``oof`` (the best checkpoint on the fold's images, at full resolution; NaN without)."""
        from pipeline.data.store import ProbReader

        return {
            "best_val_miou": float(self.best),
            "best_epoch": float(self.best_epoch),
            "epochs": float(len(self.history)),
            "oof_miou": float(ProbReader(oof).meta.get("miou_full_resolution", math.nan)) if oof else math.nan,
        }

    def _fit(self) -> tuple[TrainResult, Path | None]:
        from tqdm import tqdm

        resumed = self.resume()
        if self.dist.main:
            if not resumed:
                self.folder.path.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.folder.config)
        for hook in self.hooks:
            hook.on_train_start(self)
        epochs = range(self.start_epoch, self.cfg.epochs)
        for epoch in tqdm(
            epochs,
            desc=f"{self.cfg.experiment_name} fold{self.cfg.fold}",
            disable=not self.show_progress,
            initial=self.start_epoch,
            total=self.cfg.epochs,
        ):
            if self.stop or epoch >= min(self.end_epoch, self.pause_epoch):
                break
            row = self.run_epoch(epoch)
            for hook in self.hooks:
                hook.on_epoch_end(self, row)
        for hook in self.hooks:
            hook.on_train_end(self)
        oof = None
        if self.dist.main and self.cfg.save_oof and self.val_ids and self.folder.best.exists():
            oof = write_oof(
                self.cfg,
                self.coco,
                self.val_ids,
                self.size,
                self.folder.best,
                self.device,
                self.dtype,
                self.folder.oof,
                self.workers,
            )
        self.dist.barrier()
        self.dist.close()
        return TrainResult(self.folder.path, self.best, self.best_epoch, len(self.history), self.history), oof


def train(cfg: TrainConfig, hooks: Sequence[Hook] = ()) -> TrainResult:
    """Train one fold of ``cfg`` (resuming its run folder when it has ``last.pt``)."""
    return Trainer(cfg, hooks).fit()
