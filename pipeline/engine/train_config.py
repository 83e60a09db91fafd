"""The training config: one flat dataclass shared by the train stage, the tuner and prediction
(checkpoints carry it)."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.config import Layer, config_from_dict, override_layer, to_dict, yaml_layers
from pipeline.core.errors import ConfigError
from pipeline.core.layout import RunFolder
from pipeline.core.torch_files import check_trust_list
from pipeline.data import AUGMENTATIONS, MASK_RULES
from pipeline.engine.optim import OPTIMIZERS, SCHEDULERS
from pipeline.engine.runtime import AMP_MODES
from pipeline.models.losses import CLASS_WEIGHT_MODES

# the experiment trackers a run may log to (pipeline/engine/trackers.py) and W&B's modes
TRACKER_NAMES = ("tensorboard", "wandb", "mlflow")
WANDB_MODES = ("offline", "online", "disabled")

# the package's config files: base.yaml and one overlay per model family
CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"
BASE_YAML = CONFIGS_DIR / "base.yaml"
# keys a run may change and still resume its last.pt: they steer how long and where it runs, not what
# it learns (weights_source and precision are recorded by the trainer, resume is the question itself)
RESUMABLE_KEYS = (
    "epochs",
    "stop_epoch",
    "time_budget",
    "val_every",
    "patience",
    "progress",
    "num_workers",
    "device",
    "threads",
    "weights_source",
    "precision",
    "resume",
    "trust_pickle",
    "tracker",
    "tracker_project",
    "wandb_mode",
    "mlflow_uri",
    "image_cache",
)


def check_trackers(names: list[str], wandb_mode: str | None) -> None:
    unknown = [n for n in names if n not in TRACKER_NAMES]
    if unknown:
        raise ConfigError(f"tracker: unknown {unknown[0]!r}; known: {', '.join(TRACKER_NAMES)}")
    if wandb_mode is not None and wandb_mode not in WANDB_MODES:
        raise ConfigError(f"wandb_mode: unknown {wandb_mode!r}; known: {', '.join(WANDB_MODES)} or null")


@dataclass
class TrainConfig:
    # data
    data_dir: str = "data/demo"
    ann_file: str = "train_all.json"
    folds_file: str = "folds/folds.csv"
    fold: int = 0  # -1: train on every labelled image, no validation
    cache_dir: str = ".cache/masks"  # ground-truth maps; decoded images at the training size under <cache_dir>/images
    # the decoded images of the training size, memory-mapped (pipeline.data.image_cache); None: where the disk
    # allows and the images' pixels reach the model as read (no copy-paste, a family that trains on class maps)
    image_cache: bool | None = None
    mask_rule: str = "area"  # ground-truth mask rule (pipeline.data.MASK_RULES): area | polygon_length
    # model
    model: str = "unet"
    encoder: str | None = None  # None: the family's default encoder
    encoder_weights: str | None = "auto"  # auto: folder > cache > package > download > scratch; imagenet
    weights_dir: str = "weights"  # <encoder>.safetensors / .pth (make weights), or <org>--<name>/ for pretrained=
    weights: str | None = None  # local encoder or whole-model checkpoint
    pretrained: str | None = None  # whole segmentation-pretrained model (hub id or local folder); wins over weights
    model_options: dict | None = None  # extra options of the family's builder (smp / torchvision / transformers config)
    weights_source: dict | None = None  # recorded by the trainer, not read: {source, path, sha256} it started from
    fine_tune_from: str | None = None  # start from another run's best.pt (a run folder or a checkpoint file)
    trust_pickle: list[str] = field(default_factory=list)  # files you trust to unpickle in full (it can run code)
    pseudo_dir: str | None = None  # pseudo-labelled test images (make pseudo) added to the training images
    # run folder
    runs_dir: str = "runs"
    experiment: str | None = None  # default: <model>-<encoder>
    resume: bool = True  # continue from last.pt when it exists
    # input
    img_size: list[int] | None = None  # [h, w] or [side]; None: most common size in the data
    crop_size: list[int] | None = None  # [h, w] or [side]: train on random windows of the img_size image
    progressive: float = 0.0  # share of the epochs trained at progressive_scale of the size (progressive resizing)
    progressive_scale: float = 0.5  # sides of those first epochs' inputs, as a share of the training size
    augment: str = "light"
    copy_paste: float = 0.0  # probability of pasting rare-class objects of other training images
    copy_paste_classes: list[str] | None = None  # class names; None: the copy_paste_rarest rarest
    copy_paste_rarest: int = 3
    copy_paste_max: int = 2  # objects pasted per image at most
    rfs_threshold: float | None = None  # repeat-factor sampling (LVIS): images of classes rarer than this repeat
    # optimisation
    epochs: int = 30
    batch_size: int = 8
    accum_steps: int = 1
    optimizer: str = "adamw"
    lr: float = 3e-4  # decoder / head learning rate
    encoder_lr: float | None = None  # None: same as lr
    weight_decay: float = 1e-4
    layer_decay: float | None = None  # e.g. 0.8: encoder lr x layer_decay ** (deepest stage - stage)
    momentum: float = 0.9
    scheduler: str = "cosine"
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01
    poly_power: float = 0.9
    grad_clip: float | None = 1.0
    loss: str = "ce"  # "model": the family's own loss (mask classification families require it)
    class_weights: list[float] | str | None = None  # one per class, or inverse_sqrt: from the training pixels
    label_smoothing: float = 0.0
    loss_options: dict | None = None  # to the loss terms that take them: {classes: present, gamma: 2, ...}
    # auto: on CUDA bf16 where the GPU computes it natively (capability 8.0+), else fp16 with the gradient scaler;
    # bf16 on a CPU with native bf16, else fp32; bf16, fp16, off force one
    amp: str = "auto"
    precision: str | None = None  # recorded by the trainer, not read: what amp resolved to on its device
    channels_last: bool = True  # NHWC memory on CUDA and CPU (faster convolutions); ignored elsewhere
    ema: bool = False
    ema_decay: float = 0.999
    # validation and outputs
    val_every: int = 1
    patience: int = 0  # epochs without improvement before stopping; 0: never
    keep_top_k: int = 0  # keep the weights of the k best epochs under top/ (make average)
    swa_epochs: int = 0  # average the weights of the last n epochs into swa.pt (BatchNorm recomputed)
    save_oof: bool = True
    oof_scale: float = 0.5  # out-of-fold maps are stored at this fraction of the training size
    oof_dtype: str = "float16"
    plot: bool = True
    # experiment trackers, any of tensorboard, wandb, mlflow (tracker=wandb,mlflow): pipeline/engine/trackers.py
    tracker: list[str] = field(default_factory=list)
    tracker_project: str = "segmentation-pipeline"  # W&B project, MLflow experiment (runs: <experiment>/fold<k>)
    wandb_mode: str | None = None  # offline | online | disabled; null: $WANDB_MODE, else offline
    mlflow_uri: str | None = None  # MLflow tracking URI; null: sqlite:///<runs_dir>/mlflow.db
    # runtime
    seed: int = 42
    device: str = "auto"
    num_workers: int | None = None  # None: pipeline.engine.runtime.default_workers (GPU: up to 8; CPU: cpus // 2 - 1)
    prefetch_factor: int = 2  # batches each loader worker prepares ahead (workers persist across epochs)
    threads: int | None = None  # torch CPU threads; None: torch's default
    cudnn_benchmark: bool = True  # CUDA: let cuDNN pick the fastest kernels (inputs have one size)
    tf32: bool = True  # CUDA: TF32 matrix products and convolutions on Ampere and newer
    compile: bool = False  # torch.compile the model (slower start, faster steps on a GPU)
    time_budget: float | None = None  # seconds of training + validation; the run shortens to fit (make all)
    # pause after this many epochs (successive-halving rungs): the schedule stays the one of ``epochs``,
    # and a re-run with a later stop_epoch (or none) continues it from last.pt; None: train to the end
    stop_epoch: int | None = None
    max_train_batches: int | None = None  # cap per epoch (smoke runs, tuning budgets)
    max_val_batches: int | None = None
    progress: bool = True

    def validate(self) -> None:
        for key, names in (
            ("augment", AUGMENTATIONS),
            ("scheduler", SCHEDULERS),
            ("optimizer", OPTIMIZERS),
            ("amp", AMP_MODES),
            ("mask_rule", MASK_RULES),
        ):
            if getattr(self, key) not in names:
                raise ConfigError(f"{key}: unknown {getattr(self, key)!r}; known: {', '.join(names)}")
        if not 0 <= self.copy_paste <= 1 or self.copy_paste_max < 1 or self.copy_paste_rarest < 1:
            raise ConfigError("copy_paste must be in [0, 1], copy_paste_max and copy_paste_rarest at least 1")
        if self.image_cache and self.copy_paste:
            raise ConfigError(
                "image_cache=true with copy_paste: objects are pasted at the images' own size, before the resize "
                "the cache has already made; set image_cache=null (automatic) or false"
            )
        if isinstance(self.class_weights, str) and self.class_weights not in CLASS_WEIGHT_MODES:
            raise ConfigError(
                f"class_weights: unknown {self.class_weights!r}; give one weight per class or one of "
                f"{', '.join(CLASS_WEIGHT_MODES)}"
            )
        if self.rfs_threshold is not None and not self.rfs_threshold > 0:
            raise ConfigError(f"rfs_threshold must be positive or null, got {self.rfs_threshold}")
        if self.keep_top_k < 0 or self.swa_epochs < 0:
            raise ConfigError(f"keep_top_k and swa_epochs must be >= 0, got {self.keep_top_k}, {self.swa_epochs}")
        for key in ("epochs", "batch_size", "accum_steps", "val_every", "prefetch_factor"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be at least 1, got {getattr(self, key)}")
        for key in ("img_size", "crop_size"):
            value = getattr(self, key)
            if value is not None and (len(value) not in (1, 2) or min(value) < 1):
                raise ConfigError(f"{key} must be [side] or [height, width] of positive pixels, got {value}")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ConfigError(f"layer_decay must be in (0, 1] or null, got {self.layer_decay}")
        if self.stop_epoch is not None and self.stop_epoch < 1:
            raise ConfigError(f"stop_epoch must be at least 1 or null, got {self.stop_epoch}")
        if self.stop_epoch is not None and self.time_budget is not None:
            raise ConfigError("stop_epoch pauses a fixed schedule and time_budget re-sizes it: give one of them")
        if self.time_budget is not None and not self.time_budget > 0:
            raise ConfigError(f"time_budget must be positive seconds or null, got {self.time_budget}")
        if not 0 <= self.progressive < 1 or not 0 < self.progressive_scale <= 1:
            raise ConfigError(
                f"progressive must be in [0, 1) and progressive_scale in (0, 1], got {self.progressive} and "
                f"{self.progressive_scale}"
            )
        if not 0 < self.oof_scale <= 1:
            raise ConfigError(f"oof_scale must be in (0, 1], got {self.oof_scale}")
        check_trust_list(self.trust_pickle)
        check_trackers(self.tracker, self.wandb_mode)

    @property
    def experiment_name(self) -> str:
        from pipeline.models import default_encoder

        return self.experiment or f"{self.model}-{self.encoder or default_encoder(self.model)}"

    def folder(self) -> RunFolder:
        return RunFolder.of(self.runs_dir, self.experiment_name, self.fold)

    def run_dir(self):
        return self.folder().path


def family_layers(model: str) -> list[Layer]:
    """``base.yaml`` and the overlay ``configs/<model>.yaml`` of ``model`` (only ``base.yaml`` when the
    family has none)."""
    overlay = CONFIGS_DIR / f"{model}.yaml"
    path = overlay if overlay.is_file() else BASE_YAML
    with contextlib.suppress(ValueError):  # named relative to the working folder when inside it
        path = path.relative_to(Path.cwd())
    return yaml_layers(path)


def train_layers(config_file: str | Path | None, overrides: Mapping[str, Any], model: str | None = None) -> list[Layer]:
    """The one composition of a training config (``python -m pipeline.train``, ``make train``,
    ``torchrun``, every tuning trial): defaults < ``base.yaml`` < the family overlay of the model
    trained < ``config_file`` (its ``base:`` chain) < ``overrides``; see :func:`train_layer_parts`."""
    family, user = train_layer_parts(config_file, overrides, model)
    return [*family, *user, *override_layer(dict(overrides))]


def train_layer_parts(
    config_file: str | Path | None, overrides: Mapping[str, Any], model: str | None = None
) -> tuple[list[Layer], list[Layer]]:
    """The family layers (``base.yaml`` and the model's overlay) and the layers of ``config_file``.

    The model is ``model`` when given (a trial's sampled one), else the last one the overrides or
    ``config_file`` name, else the default.  Files of ``config_file``'s chain that the family layers
    already hold are not layered twice.
    """
    user = yaml_layers(config_file)
    if model is None:
        named = [m["model"] for _, m in user if "model" in m]
        model = str(overrides.get("model") or (named[-1] if named else TrainConfig.model))
    family = family_layers(model)
    held = {Path(source).resolve() for source, _ in family}
    return family, [(source, mapping) for source, mapping in user if Path(source).resolve() not in held]


def stored_config(data: Mapping[str, Any], source: str) -> TrainConfig:
    """A run's stored config (a checkpoint's, config.yaml) as a TrainConfig, earlier keys translated:
    ``tensorboard: true`` is ``tracker: [tensorboard]``."""
    data = dict(data)
    if data.pop("tensorboard", False):
        data["tracker"] = [*data.get("tracker", []), "tensorboard"]
    return config_from_dict(TrainConfig, data, source)


def changed_keys(stored: Mapping[str, Any], cfg: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """Keys (outside :data:`RESUMABLE_KEYS`) whose value in a run's stored config differs from ``cfg``:
    ``{key: (stored, new)}``.  Keys an older config did not have are not compared."""
    new = to_dict(cfg)
    return {k: (stored[k], v) for k, v in new.items() if k not in RESUMABLE_KEYS and k in stored and stored[k] != v}
