"""Training stage: ``make train FOLD=k MODEL=<family>``.

``run(cfg)`` trains one model on the images outside fold ``k`` of ``folds.csv`` and
validates on fold ``k`` every ``val_every`` epochs with the one metric module.  The run
folder ``runs/<experiment>/fold<k>/`` receives ``config.yaml``, ``metrics.csv`` (one row
per epoch), ``last.pt`` and ``best.pt`` (complete checkpoints, written atomically),
``curves.png`` and ``oof/`` (the best checkpoint's class probabilities for the fold's
images, see :mod:`pipeline.probs`).

A run whose ``last.pt`` exists continues from it (model, optimizer, scheduler, scaler,
EMA, epoch, best metric, history, RNG states): shuffling and augmentation depend only
on (seed, epoch, sample), so a resumed run reproduces an uninterrupted one.  Under
``torchrun`` the same entry point trains with DistributedDataParallel.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline import models as model_registry
from pipeline.config import ConfigError, config_from_dict, save_config, stage_main, to_dict
from pipeline.data import (
    AUGMENTATIONS,
    MASK_RULES,
    CocoData,
    MaskCache,
    SegmentationDataset,
    build_transform,
    image_size_from_data,
    load_coco,
    to_tensor,
)
from pipeline.folds import load_folds
from pipeline.models.losses import build_loss
from pipeline.metrics import IGNORE_INDEX, confusion_matrix_torch, iou_per_class, mean_iou
from pipeline.probs import ProbWriter
from pipeline.utils import PipelineError, atomic_open, atomic_torch_save

log = logging.getLogger(__name__)

SCHEDULERS = ("cosine", "poly", "onecycle", "constant")
OPTIMIZERS = ("adamw", "sgd")
AMP_MODES = ("auto", "bf16", "fp16", "off")


@dataclass
class TrainConfig:
    # data
    data_dir: str = "data/demo"
    ann_file: str = "train_all.json"
    folds_file: str = "folds/folds.csv"
    fold: int = 0  # -1: train on every labelled image, no validation
    cache_dir: str = ".cache/masks"
    mask_rule: str = "area"  # ground-truth mask rule (pipeline.data.MASK_RULES): area | polygon_length
    # model
    model: str = "unet"
    encoder: str | None = None  # None: the family's default encoder
    encoder_weights: str | None = None  # e.g. imagenet (the family configs set it)
    weights: str | None = None  # local encoder or whole-model checkpoint
    # run folder
    runs_dir: str = "runs"
    experiment: str | None = None  # default: <model>-<encoder>
    resume: bool = True  # continue from last.pt when it exists
    # input
    img_size: list[int] | None = None  # [h, w] or [side]; None: most common size in the data
    augment: str = "light"
    # optimisation
    epochs: int = 30
    batch_size: int = 8
    accum_steps: int = 1
    optimizer: str = "adamw"
    lr: float = 3e-4  # decoder / head learning rate
    encoder_lr: float | None = None  # None: same as lr
    weight_decay: float = 1e-4
    momentum: float = 0.9
    scheduler: str = "cosine"
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01
    poly_power: float = 0.9
    grad_clip: float | None = 1.0
    loss: str = "ce"
    class_weights: list[float] | None = None
    label_smoothing: float = 0.0
    amp: str = "auto"  # auto: bf16 where supported, else fp16; always off on CPU
    channels_last: bool = True  # CUDA only
    ema: bool = False
    ema_decay: float = 0.999
    # validation and outputs
    val_every: int = 1
    patience: int = 0  # epochs without improvement before stopping; 0: never
    save_oof: bool = True
    oof_scale: float = 0.5  # out-of-fold maps are stored at this fraction of the training size
    oof_dtype: str = "float16"
    plot: bool = True
    # runtime
    seed: int = 42
    device: str = "auto"
    num_workers: int | None = None  # None: default_workers() (GPU: up to 8; CPU: cpus // 2 - 1)
    threads: int | None = None  # torch CPU threads; None: torch's default
    max_train_batches: int | None = None  # cap per epoch (smoke runs, tuning budgets)
    max_val_batches: int | None = None
    progress: bool = True

    def validate(self) -> None:
        if self.augment not in AUGMENTATIONS:
            raise ConfigError(f"augment: unknown {self.augment!r}; known: {', '.join(AUGMENTATIONS)}")
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"scheduler: unknown {self.scheduler!r}; known: {', '.join(SCHEDULERS)}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer: unknown {self.optimizer!r}; known: {', '.join(OPTIMIZERS)}")
        if self.mask_rule not in MASK_RULES:
            raise ConfigError(f"mask_rule: unknown {self.mask_rule!r}; known: {', '.join(MASK_RULES)}")
        if self.amp not in AMP_MODES:
            raise ConfigError(f"amp: unknown {self.amp!r}; known: {', '.join(AMP_MODES)}")
        for key in ("epochs", "batch_size", "accum_steps", "val_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be at least 1, got {getattr(self, key)}")
        if self.img_size is not None and len(self.img_size) not in (1, 2):
            raise ConfigError(f"img_size must be [side] or [height, width], got {self.img_size}")
        if not 0 < self.oof_scale <= 1:
            raise ConfigError(f"oof_scale must be in (0, 1], got {self.oof_scale}")

    @property
    def experiment_name(self) -> str:
        return self.experiment or f"{self.model}-{self.encoder or model_registry.default_encoder(self.model)}"

    def run_dir(self) -> Path:
        fold = "all" if self.fold < 0 else str(self.fold)
        return Path(self.runs_dir) / self.experiment_name / f"fold{fold}"


# ----------------------------------------------------------------------------- helpers
class Dist:
    """Process-group facts; a single process when not launched by torchrun."""

    def __init__(self, device: torch.device):
        self.enabled = int(os.environ.get("WORLD_SIZE", "1")) > 1
        if self.enabled and not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend=backend)
        self.rank = dist.get_rank() if self.enabled else 0
        self.world = dist.get_world_size() if self.enabled else 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def sync_buffers(self, module: nn.Module) -> None:
        """Give every rank rank 0's buffers (BatchNorm running statistics) before evaluation."""
        if self.enabled:
            for buf in module.buffers():
                dist.broadcast(buf.data, 0)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast_flag(self, value: bool, device: torch.device) -> bool:
        if not self.enabled:
            return value
        t = torch.tensor([1 if value else 0], device=device)
        dist.broadcast(t, 0)
        return bool(t.item())


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PipelineError(f"device={name} requested but CUDA is not available")
    return dev


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda" or mode == "off":
        return None
    if mode == "bf16" or (mode == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def default_workers(device: torch.device) -> int:
    """Loader processes when ``num_workers`` is unset: on a GPU the CPU only feeds it; on a CPU
    the workers compete with the model's own threads (on 2 cores, 0 workers measured fastest:
    benchmarks/bench_train.py)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device.type == "cuda":
        return max(0, min(8, cpus - 1))
    return max(0, min(4, cpus // 2 - 1))


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + index) % (2**31 - 1)


class EpochSeededDataset(Dataset):
    """Wraps a dataset so each sample's augmentation is seeded by (seed, epoch, index)."""

    def __init__(self, base: SegmentationDataset, seed: int):
        self.base = base
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, idx: int):
        s = sample_seed(self.seed, self.epoch, idx)
        if self.base.transform is not None and hasattr(self.base.transform, "set_random_seed"):
            self.base.transform.set_random_seed(s)
        random.seed(s)
        np.random.seed(s)
        return self.base[idx]


class EpochShuffleSampler(Sampler[int]):
    """Shuffles by (seed, epoch) and shards by rank: the order never depends on history."""

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1, shuffle: bool = True, drop_last: bool = False):
        self.n, self.seed, self.rank, self.world, self.shuffle = n, seed, rank, world, shuffle
        self.epoch = 0
        self.per_rank = n // world if drop_last else math.ceil(n / world)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 10_007 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        total = self.per_rank * self.world
        order = (order + order[: max(0, total - len(order))])[:total]
        return iter(order[self.rank : total : self.world])

    def __len__(self) -> int:
        return self.per_rank


def collate(batch):
    """Stacks images; masks are stacked when they share a size, else kept as a list."""
    images = torch.stack([b[0] for b in batch])
    masks = [b[1] for b in batch]
    same = all(m.shape == masks[0].shape for m in masks)
    metas = [b[2] for b in batch]
    return images, (torch.stack(masks) if same else masks), metas


class ValDataset(Dataset):
    """Validation images resized to the training size, masks kept at the image's own size."""

    def __init__(self, base: SegmentationDataset, size: tuple[int, int]):
        self.base = base
        self.resize = build_transform("none", size)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, idx: int):
        image, mask, meta = self.base.load(idx)
        image = self.resize(image=image)["image"]
        return to_tensor(image), torch.from_numpy(mask.astype(np.int64)), meta


def lr_lambda(cfg: TrainConfig, total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if cfg.scheduler == "cosine":
            return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
        if cfg.scheduler == "poly":
            return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * (1 - t) ** cfg.poly_power
        return 1.0

    return f


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    groups = model_registry.param_groups(model, cfg.encoder_lr if cfg.encoder_lr is not None else cfg.lr, cfg.lr, cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    if cfg.scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=[g["lr"] for g in optimizer.param_groups],
            total_steps=total,
            pct_start=min(0.5, max(warmup / total, 0.01)),
            final_div_factor=1.0 / max(cfg.min_lr_ratio, 1e-6) / 25.0,
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total, warmup))


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resolve_size(cfg: TrainConfig, coco: CocoData) -> tuple[int, int]:
    divisor = model_registry.input_divisor(cfg.model, cfg.encoder)
    if cfg.img_size is None:
        return image_size_from_data(coco, divisor)
    h, w = (cfg.img_size[0], cfg.img_size[0]) if len(cfg.img_size) == 1 else cfg.img_size
    if h % divisor or w % divisor:
        raise ConfigError(f"img_size {h}x{w} must be a multiple of {divisor} for {cfg.model}")
    return int(h), int(w)


def split_ids(cfg: TrainConfig, coco: CocoData) -> tuple[list[int], list[int]]:
    if cfg.fold < 0:
        return coco.image_ids, []
    folds = load_folds(cfg.folds_file, coco)
    known = sorted(int(f) for f in folds["fold"].unique())
    if cfg.fold not in known:
        raise ConfigError(f"fold {cfg.fold} is not in {cfg.folds_file} (folds: {known}; -1 trains on all images)")
    is_val = folds["fold"].astype(int) == cfg.fold
    val = set(folds.loc[is_val, "image_id"].astype(int))
    return [i for i in coco.image_ids if i not in val], [i for i in coco.image_ids if i in val]


def forward_probs(model: nn.Module, images: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    with torch.autocast(images.device.type, dtype=dtype, enabled=dtype is not None):
        return model(images).float().softmax(1)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    num_classes: int,
    device: torch.device,
    dtype: torch.dtype | None,
    channels_last: bool = False,
    max_batches: int | None = None,
    progress: bool = False,
    on_probs: Callable[[torch.Tensor, dict], None] | None = None,
) -> np.ndarray:
    """Confusion matrix of ``model`` on ``loader``; predictions scored at each image's own size."""
    from tqdm import tqdm

    model.eval()
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    for i, (images, masks, metas) in enumerate(tqdm(loader, desc="val", leave=False, disable=not progress)):
        if max_batches is not None and i >= max_batches:
            break
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        probs = forward_probs(model, images, dtype)
        if isinstance(masks, torch.Tensor) and masks.shape[-2:] == probs.shape[-2:]:
            cm += confusion_matrix_torch(probs.argmax(1), masks.to(device), num_classes)
            if on_probs is not None:
                for p, meta in zip(probs, metas):
                    on_probs(p, meta)
            continue
        for p, m, meta in zip(probs, masks, metas):
            if on_probs is not None:
                on_probs(p, meta)
            full = torch.nn.functional.interpolate(p[None], size=tuple(m.shape), mode="bilinear", align_corners=False)[0]
            cm += confusion_matrix_torch(full.argmax(0), m.to(device), num_classes)
    return cm.cpu().numpy()


def plot_curves(history: list[dict[str, Any]], class_names: Sequence[str], path: Path) -> None:
    import io as _io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.utils import atomic_write_bytes

    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].plot(epochs, [h["train_loss"] for h in history], marker="o", label="train loss")
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("loss")
    axes[0].legend()
    axes[0].grid(alpha=0.3)
    val = [h for h in history if not math.isnan(h.get("val_miou", float("nan")))]
    if val:
        axes[1].plot([h["epoch"] for h in val], [h["val_miou"] for h in val], marker="o", color="C1", label="val mIoU")
        for c in class_names[1:]:
            key = f"iou_{c}"
            axes[1].plot([h["epoch"] for h in val], [h.get(key, float("nan")) for h in val], alpha=0.35, lw=1, label=c)
        axes[1].legend(fontsize=6, ncol=2)
    axes[1].set_xlabel("epoch")
    axes[1].set_ylabel("IoU")
    axes[1].set_ylim(0, 1)
    axes[1].grid(alpha=0.3)
    fig.suptitle(str(path.parent))
    fig.tight_layout()
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def append_timing(row: dict[str, Any], path: Path) -> None:
    """Wall-clock times per epoch; kept apart from metrics.csv, which must not depend on speed."""
    import pandas as pd

    rows = pd.read_csv(path) if path.is_file() else pd.DataFrame()
    if len(rows):
        rows = rows[rows["epoch"] < row["epoch"]]
    with atomic_open(path, "w", newline="") as fh:
        pd.concat([rows, pd.DataFrame([row])], ignore_index=True).to_csv(fh, index=False)


def write_metrics(history: list[dict[str, Any]], path: Path) -> None:
    import pandas as pd

    with atomic_open(path, "w", newline="") as fh:
        pd.DataFrame(history).to_csv(fh, index=False, float_format="%.10g")


# ----------------------------------------------------------------------------- run
@dataclass
class TrainResult:
    run_dir: Path
    best_miou: float
    best_epoch: int
    epochs_done: int
    history: list[dict[str, Any]]


def run(cfg: TrainConfig, epoch_callback: Callable[[int, dict[str, Any]], None] | None = None) -> TrainResult:
    """Train one fold; ``epoch_callback(epoch, row)`` is called after every validated epoch
    (the tuner reports to Optuna and may raise to prune)."""
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dd = Dist(device)
    run_dir = cfg.run_dir()
    last_path, best_path = run_dir / "last.pt", run_dir / "best.pt"
    if last_path.exists() and not cfg.resume:
        raise PipelineError(f"{last_path} exists; pass resume=true to continue it or choose another experiment=")

    coco = load_coco(cfg.data_dir, cfg.ann_file, mask_rule=cfg.mask_rule)
    num_classes = coco.num_classes
    size = resolve_size(cfg, coco)
    train_ids, val_ids = split_ids(cfg, coco)
    cache = MaskCache(coco, cfg.cache_dir)
    if dd.main:
        cache.build(train_ids + val_ids, progress=cfg.progress)
    dd.barrier()

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    model = model_registry.build_model(
        cfg.model, num_classes=num_classes, encoder=cfg.encoder, encoder_weights=cfg.encoder_weights, weights=cfg.weights
    ).to(device)
    channels_last = cfg.channels_last and device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    dtype = amp_dtype(cfg.amp, device)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    ema = None
    if cfg.ema:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
    criterion = build_loss(
        cfg.loss, num_classes, ignore_index=IGNORE_INDEX, class_weights=cfg.class_weights, label_smoothing=cfg.label_smoothing
    ).to(device)

    workers = cfg.num_workers if cfg.num_workers is not None else default_workers(device)
    train_set = EpochSeededDataset(SegmentationDataset(coco, train_ids, build_transform(cfg.augment, size), cache), cfg.seed)
    sampler = EpochShuffleSampler(len(train_set), cfg.seed, dd.rank, dd.world, shuffle=True, drop_last=True)
    if len(sampler) < cfg.batch_size:
        raise ConfigError(f"batch_size {cfg.batch_size} is larger than the {len(sampler)} training images per process")
    per_batch = len(sampler) // cfg.batch_size
    batches = min(per_batch, cfg.max_train_batches) if cfg.max_train_batches else per_batch
    steps_per_epoch = math.ceil(batches / cfg.accum_steps)

    val_loader = None
    if val_ids:
        val_set = ValDataset(SegmentationDataset(coco, val_ids, None, cache), size)
        # shard without padding so the all-reduced confusion matrix counts each image once
        val_sampler = list(range(len(val_set)))[dd.rank :: dd.world] if dd.enabled else None
        val_loader = DataLoader(val_set, batch_size=cfg.batch_size, sampler=val_sampler, num_workers=workers, collate_fn=collate)

    net: nn.Module = model
    if dd.enabled:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch)

    history: list[dict[str, Any]] = []
    start_epoch, best, best_epoch = 0, -1.0, -1
    if last_path.exists():
        ckpt = torch.load(last_path, map_location="cpu", weights_only=False)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        if ema is not None and ckpt.get("ema") is not None:
            ema.load_state_dict(ckpt["ema"])
        start_epoch, best, best_epoch = ckpt["epoch"] + 1, ckpt["best_metric"], ckpt["best_epoch"]
        history = ckpt["history"]
        set_rng_state(ckpt["rng"])
        log.info("resumed %s at epoch %d (best mIoU %.4f at epoch %d)", last_path, start_epoch, best, best_epoch)
    elif dd.main:
        run_dir.mkdir(parents=True, exist_ok=True)
    if dd.main:
        save_config(cfg, run_dir / "config.yaml")
    meta = {"class_names": coco.class_names, "num_classes": num_classes, "img_size": list(size), "ann_digest": coco.digest}

    def checkpoint(epoch: int) -> dict[str, Any]:
        return {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            "epoch": epoch,
            "best_metric": best,
            "best_epoch": best_epoch,
            "history": history,
            "rng": rng_state(),
            "config": to_dict(cfg),
            **meta,
        }

    from tqdm import tqdm

    stale = history[-1]["epoch"] - best_epoch if history and best_epoch >= 0 else 0
    epoch = start_epoch - 1
    stopped_early = False
    for epoch in tqdm(range(start_epoch, cfg.epochs), desc=f"{cfg.experiment_name} fold{cfg.fold}", disable=not (cfg.progress and dd.main), initial=start_epoch, total=cfg.epochs):
        if cfg.patience and stale >= cfg.patience:
            stopped_early = True
            break
        train_set.epoch = epoch
        sampler.set_epoch(epoch)
        loader = DataLoader(
            train_set,
            batch_size=cfg.batch_size,
            sampler=sampler,
            num_workers=workers,
            drop_last=True,
            collate_fn=collate,
            pin_memory=device.type == "cuda",
            persistent_workers=False,
        )
        net.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        seen = 0
        optimizer.zero_grad(set_to_none=True)
        bar = tqdm(loader, total=batches, desc=f"epoch {epoch}", leave=False, disable=not (cfg.progress and dd.main))
        for i, (images, masks, _) in enumerate(bar):
            if i >= batches:
                break
            images = images.to(device, non_blocking=True)
            masks = masks.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            last_micro = (i + 1) % cfg.accum_steps == 0 or i + 1 == batches
            sync = (not dd.enabled) or last_micro
            ctx = net.no_sync() if (dd.enabled and not sync) else contextlib.nullcontext()
            with ctx:
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    loss = criterion(net(images), masks)
                scaler.scale(loss / cfg.accum_steps).backward()
            loss_sum += loss.detach().double()
            seen += 1
            if last_micro:
                if cfg.grad_clip:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                if ema is not None:
                    ema.update_parameters(model)
            if i % 20 == 0 or i + 1 == batches:
                value = loss_sum.item() / seen
                if not math.isfinite(value):
                    raise PipelineError(
                        f"non-finite loss ({value}) at epoch {epoch}, batch {i}: training stopped; "
                        f"the last good checkpoint is {last_path if last_path.exists() else 'not written yet'} "
                        f"(lower lr=, set grad_clip=, or amp=off)"
                    )
                bar.set_postfix(loss=f"{value:.4f}")
        stats = dd.all_sum(torch.stack([loss_sum, torch.tensor(float(seen), device=device, dtype=torch.float64)]))
        train_loss = float(stats[0] / stats[1])
        if not math.isfinite(train_loss):
            raise PipelineError(f"non-finite loss at epoch {epoch}: training stopped; last good checkpoint {last_path}")
        elapsed = time.perf_counter() - t0
        row: dict[str, Any] = {"epoch": epoch, "train_loss": train_loss, "lr": optimizer.param_groups[-1]["lr"]}

        validated = val_loader is not None and ((epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs)
        t_val = time.perf_counter()
        if validated:
            eval_model = ema.module if ema is not None else model
            dd.sync_buffers(eval_model)
            cm = torch.from_numpy(evaluate(eval_model, val_loader, num_classes, device, dtype, channels_last, cfg.max_val_batches)).to(device)
            cm = dd.all_sum(cm).cpu().numpy()
            ious = iou_per_class(cm)
            miou = mean_iou(cm)
            row["val_miou"] = miou
            row.update({f"iou_{n}": float(v) for n, v in zip(coco.class_names, ious)})
        else:
            row["val_miou"] = float("nan")
        timing = {
            "epoch": epoch,
            "train_s": round(elapsed, 4),
            "train_images_per_s": round(batches * cfg.batch_size * dd.world / elapsed, 3),
            "val_s": round(time.perf_counter() - t_val, 4),
        }
        improved = False
        if validated and row["val_miou"] > best:
            best, best_epoch, improved, stale = row["val_miou"], epoch, True, 0
        elif validated:
            stale += cfg.val_every
        if val_loader is None:
            best, best_epoch, improved = float("nan"), epoch, True
        history.append(row)
        if dd.main:
            ckpt = checkpoint(epoch)
            if improved:
                atomic_torch_save(ckpt, best_path)
            atomic_torch_save(ckpt, last_path)
            write_metrics(history, run_dir / "metrics.csv")
            append_timing(timing, run_dir / "timing.csv")
            if cfg.plot:
                plot_curves(history, coco.class_names, run_dir / "curves.png")
            log.info(
                "epoch %d: loss %.4f, val mIoU %.4f (best %.4f @ %d), %.1f img/s",
                epoch, train_loss, row["val_miou"], best, best_epoch, batches * cfg.batch_size * dd.world / elapsed,
            )
        dd.barrier()
        if epoch_callback is not None and validated:
            epoch_callback(epoch, row)
    if stopped_early:
        log.info("early stop: no improvement for %d epochs", cfg.patience)

    if dd.main and cfg.save_oof and val_ids and best_path.exists():
        write_oof(cfg, coco, val_ids, size, best_path, device, dtype, run_dir / "oof", workers)
    dd.barrier()
    if dd.enabled:
        dist.destroy_process_group()
    return TrainResult(run_dir, best, best_epoch, len(history), history)


def load_checkpoint_model(path: str | Path, device: torch.device | str = "cpu", use_ema: bool = True):
    """Model (in eval mode), resolved config and checkpoint metadata from a ``.pt`` file."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many types for a corrupt file
        raise PipelineError(f"{path}: unreadable checkpoint ({exc})") from exc
    cfg = config_from_dict(TrainConfig, ckpt["config"], str(path))
    model = model_registry.build_model(cfg.model, num_classes=ckpt["num_classes"], encoder=cfg.encoder, encoder_weights=None)
    state = ckpt["model"]
    if use_ema and ckpt.get("ema") is not None:
        state = {k[len("module."):]: v for k, v in ckpt["ema"].items() if k.startswith("module.")}
    model.load_state_dict(state)
    return model.to(device).eval(), cfg, ckpt


def write_oof(
    cfg: TrainConfig,
    coco: CocoData,
    val_ids: Sequence[int],
    size: tuple[int, int],
    best_path: Path,
    device: torch.device,
    dtype: torch.dtype | None,
    out: Path,
    workers: int,
) -> Path:
    """Out-of-fold class probabilities of the best checkpoint at ``oof_scale`` x the training size."""
    model, _, ckpt = load_checkpoint_model(best_path, device)
    stored = (max(1, round(size[0] * cfg.oof_scale)), max(1, round(size[1] * cfg.oof_scale)))
    cache = MaskCache(coco, cfg.cache_dir)
    loader = DataLoader(ValDataset(SegmentationDataset(coco, list(val_ids), None, cache), size), batch_size=cfg.batch_size, num_workers=workers, collate_fn=collate)
    info = {"source": str(best_path), "epoch": ckpt["epoch"], "mask_rule": cfg.mask_rule, "train_size": list(size), "stored_size": list(stored), "fold": cfg.fold}
    writer = ProbWriter(out, coco.class_names, cfg.oof_dtype, info)

    def save(p: torch.Tensor, meta: dict) -> None:
        small = torch.nn.functional.interpolate(p[None], size=stored, mode="bilinear", align_corners=False)[0]
        writer.write(meta["image_id"], meta["file_name"], meta["height"], meta["width"], small)

    cm = evaluate(model, loader, coco.num_classes, device, dtype, False, None, cfg.progress, on_probs=save)
    writer.info["miou_full_resolution"] = mean_iou(cm)
    writer.close()
    log.info("wrote out-of-fold probabilities of %d images to %s (mIoU %.4f)", len(val_ids), out, mean_iou(cm))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main(TrainConfig, run, argv, "Train one model on one fold (runs/<experiment>/fold<k>/)")


if __name__ == "__main__":
    raise SystemExit(main())
