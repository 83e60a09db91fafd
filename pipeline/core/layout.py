"""Names of everything the stages hand over through files, defined once.

``runs/<experiment>/fold<k>/`` (a training run)::

    config.yaml   resolved training config
    metrics.csv   one row per epoch (reproducible: no wall times)
    timing.csv    wall times per epoch
    last.pt       complete checkpoint of the latest epoch
    best.pt       complete checkpoint of the best epoch by val mIoU
    curves.png    loss and IoU curves
    oof/          probability store of the best checkpoint on the fold's images
    oof_<tta>/    the same predicted with a TTA set (``make predict SPLIT=val``)
    test_<tta>/   probability store of the test images (``make predict``)
    <store>_png/  with ``png=true``: viewable masks of a store's images, beside it (``test_<tta>_png/``)
    png_<folder>_<tta>/  ``make predict IMAGES=<folder>``: viewable masks of a folder's images
    trackers.json with ``tracker=wandb`` / ``mlflow``: each tracker's run id (a resumed run continues it)
    tensorboard/  with ``tracker=tensorboard``: event files
    wandb/        with ``tracker=wandb``: W&B's run folders (offline ones: ``wandb sync`` uploads them)

``runs/mlflow.db`` and ``runs/mlflow-artifacts/``: ``tracker=mlflow``'s default store, beside the experiments.

A folder of viewable masks holds ``labels/<name>.png`` (palette PNGs, pixel = class index),
``overlays/<name>.jpg``, ``legend.png``, ``classes.csv`` and ``index.csv`` (``file_name`` -> files).

``ensembles/<name>/{weights.yaml, report.md}``; ``submissions/<name>.{csv,json}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CONFIG = "config.yaml"
METRICS = "metrics.csv"
TIMING = "timing.csv"
LAST = "last.pt"
BEST = "best.pt"
CURVES = "curves.png"
TRACKERS = "trackers.json"
TENSORBOARD = "tensorboard"
WANDB = "wandb"
MLFLOW_DB = "mlflow.db"  # in the runs folder
MLFLOW_ARTIFACTS = "mlflow-artifacts"  # in the runs folder
OOF = "oof"
TOP = "top"  # the best epochs' weights (keep_top_k=), with index.json
AVERAGED = "averaged.pt"  # make average: the top-k weights averaged, BatchNorm statistics recomputed
SWA = "swa.pt"  # swa_epochs=: weights averaged over the last epochs, BatchNorm statistics recomputed
CHECKPOINTS = ("best", "last", "averaged", "swa")
SPLIT_PREFIX = {"val": "oof", "test": "test"}

STORE_META = "meta.json"
STORE_INDEX = "index.csv"

PNG_SUFFIX = "_png"
PNG_LABELS = "labels"
PNG_OVERLAYS = "overlays"
PNG_LEGEND = "legend.png"
PNG_CLASSES = "classes.csv"
PNG_INDEX = "index.csv"

ENSEMBLE_WEIGHTS = "weights.yaml"
ENSEMBLE_REPORT = "report.md"


def is_store(folder: str | Path) -> bool:
    """A probability store (written completely: its index and meta exist)."""
    folder = Path(folder)
    return (folder / STORE_INDEX).is_file() and (folder / STORE_META).is_file()


def png_beside(store: str | Path) -> Path:
    """The folder of viewable masks written beside a probability store: ``<store>_png``."""
    store = Path(store)
    return store.parent / f"{store.name}{PNG_SUFFIX}"


def fold_name(fold: int) -> str:
    """``fold<k>``; ``foldall`` for a run on every labelled image (fold -1)."""
    return "foldall" if fold < 0 else f"fold{fold}"


@dataclass(frozen=True)
class RunFolder:
    """One training run's folder and the paths inside it."""

    path: Path

    @classmethod
    def of(cls, runs_dir: str | Path, experiment: str, fold: int) -> RunFolder:
        return cls(Path(runs_dir) / experiment / fold_name(fold))

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def timing(self) -> Path:
        return self.path / TIMING

    @property
    def last(self) -> Path:
        return self.path / LAST

    @property
    def best(self) -> Path:
        return self.path / BEST

    @property
    def curves(self) -> Path:
        return self.path / CURVES

    @property
    def oof(self) -> Path:
        return self.path / OOF

    @property
    def trackers(self) -> Path:
        return self.path / TRACKERS

    @property
    def tensorboard(self) -> Path:
        return self.path / TENSORBOARD

    @property
    def top(self) -> Path:
        return self.path / TOP

    def checkpoint(self, which: str) -> Path:
        """``best`` / ``last`` / ``averaged`` / ``swa`` name a checkpoint of this run; anything else is a path."""
        return self.path / f"{which}.pt" if which in CHECKPOINTS else Path(which)

    def store(self, split: str, tta: str) -> Path:
        """Probability store of ``split`` (``val``: out-of-fold, ``test``) predicted with ``tta``."""
        return self.path / f"{SPLIT_PREFIX[split]}_{tta}"

    def image_pngs(self, folder: str | Path, tta: str) -> Path:
        """Viewable masks of the images of ``folder`` (not a split) predicted with ``tta``."""
        return self.path / f"png_{Path(folder).resolve().name}_{tta}"

    def stores(self, split: str) -> dict[str, Path]:
        """TTA name -> complete store of every ``<prefix>_<tta>/`` of ``split`` in this run."""
        prefix = SPLIT_PREFIX[split] + "_"
        if not self.path.is_dir():
            return {}
        return {p.name[len(prefix) :]: p for p in sorted(self.path.glob(prefix + "*")) if p.is_dir() and is_store(p)}

    def is_run(self) -> bool:
        """A training run folder: it has a checkpoint, its config, or a probability store."""
        if not self.path.is_dir():
            return False
        return (
            self.best.is_file()
            or self.config.is_file()
            or is_store(self.oof)
            or any(self.stores(split) for split in SPLIT_PREFIX)
        )


def submission_paths(out_dir: str | Path, name: str) -> tuple[Path, Path]:
    """The CSV and its manifest."""
    return Path(out_dir) / f"{name}.csv", Path(out_dir) / f"{name}.json"
