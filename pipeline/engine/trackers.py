"""Experiment trackers: ``tracker=tensorboard``, ``tracker=wandb``, ``tracker=mlflow``, or several
(``tracker=wandb,mlflow``).

Each is a :class:`~pipeline.engine.hooks.Hook` of the training run's main process: when training starts
it logs the resolved config, after every epoch the epoch's metrics row (the row of ``metrics.csv``,
finite values only, at step = epoch), and when the run ends the curves (``curves.png``) and the run's
scores (``oof_miou``, ``best_val_miou``, ``best_epoch``).  A library is imported only when its tracker
is chosen; each comes with an extra (``pip install 'segmentation-contest-pipeline[wandb]'``,
``[mlflow]``, ``[tensorboard]``; the development extra holds all three).

- ``tensorboard``: event files under ``<run>/tensorboard`` (``tensorboard --logdir runs``).
- ``wandb``: Weights & Biases, offline unless ``wandb_mode`` (or ``$WANDB_MODE``) says otherwise; its
  files under ``<run>/wandb/`` (``wandb sync <run>/wandb/offline-run-*`` uploads them).  The W&B run id
  is kept in ``<run>/trackers.json``, so a resumed run continues the same W&B run.
- ``mlflow``: the tracking URI ``mlflow_uri``, by default a SQLite file beside the experiments,
  ``<runs_dir>/mlflow.db``, with artifacts in ``<runs_dir>/mlflow-artifacts/``
  (``mlflow ui --backend-store-uri sqlite:///runs/mlflow.db``); the MLflow run id is kept likewise.

Runs are named ``<experiment>/fold<k>`` in the project ``tracker_project`` (W&B project, MLflow
experiment), grouped by experiment.  Metric names: ``iou_<class>`` is logged as ``iou/<class>``; MLflow
takes letters, digits and ``_-. /:``, other characters become ``_``.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core.config import to_dict
from pipeline.core.errors import ConfigError
from pipeline.core.io import atomic_write_text
from pipeline.core.layout import MLFLOW_ARTIFACTS, MLFLOW_DB, RunFolder, fold_name
from pipeline.engine.hooks import Hook
from pipeline.engine.train_config import check_trackers

if TYPE_CHECKING:
    from pipeline.engine.train_config import TrainConfig
    from pipeline.engine.view import HookView

MLFLOW_PARAM_CHARS = 500  # a parameter's value is cut to this length (MLflow's limit was 500 before 2.x)
MLFLOW_BATCH_PARAMS = 100  # MLflow takes at most this many parameters in one call


def tracked_name(key: str) -> str:
    """The name a metrics row's key is logged under: ``iou_<class>`` as ``iou/<class>``."""
    return "iou/" + key[len("iou_") :] if key.startswith("iou_") else key


def mlflow_name(name: str) -> str:
    """A metric name as MLflow accepts it (letters, digits, ``_-. /:``)."""
    return re.sub(r"[^\w\-. /:]", "_", name)


def row_metrics(row: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics row but the epoch (the step), under their tracked names."""
    return {
        tracked_name(k): float(v)
        for k, v in row.items()
        if k != "epoch" and isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }


def read_ids(folder: RunFolder) -> dict[str, Any]:
    return json.loads(folder.trackers.read_text()) if folder.trackers.is_file() else {}


def save_id(folder: RunFolder, tracker: str, value: Any) -> None:
    """Keep ``tracker``'s run id in the run folder (``trackers.json``)."""
    ids = read_ids(folder)
    ids[tracker] = value
    folder.path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder.trackers, json.dumps(ids, indent=1) + "\n")


def _needs(module: str, tracker: str, extra: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(
            f"tracker={tracker} needs the {extra} package: pip install 'segmentation-contest-pipeline[{extra}]'"
        ) from exc


class Tracker(Hook):
    """What every tracker logs, and when: :meth:`start` (the config), :meth:`log` (an epoch's metrics),
    :meth:`finish` (curves, scores, the run's end)."""

    def __init__(self, cfg: TrainConfig, folder: RunFolder):
        self.cfg, self.folder = cfg, folder
        self.run_name = f"{cfg.experiment_name}/{fold_name(cfg.fold)}"
        self.last_epoch = 0

    def on_train_start(self, trainer: HookView) -> None:
        self.last_epoch = trainer.history[-1]["epoch"] if trainer.history else 0
        self.start(to_dict(trainer.cfg))

    def on_epoch_end(self, trainer: HookView, row: dict[str, Any]) -> None:
        self.last_epoch = int(row["epoch"])
        self.log(self.last_epoch, row_metrics(row))

    def on_run_end(self, trainer: HookView, scores: dict[str, float] | None) -> None:
        if scores is None:
            self.finish(None, None)
            return
        curves = self.folder.curves if self.folder.curves.is_file() else None
        self.finish(curves, {k: float(v) for k, v in scores.items() if math.isfinite(v)})

    def start(self, config: dict[str, Any]) -> None:
        raise NotImplementedError

    def log(self, epoch: int, metrics: dict[str, float]) -> None:
        raise NotImplementedError

    def finish(self, curves: Path | None, scores: dict[str, float] | None) -> None:
        """``scores`` None: the run failed."""
        raise NotImplementedError


class TensorBoardTracker(Tracker):
    def __init__(self, cfg: TrainConfig, folder: RunFolder):
        super().__init__(cfg, folder)
        self.writer_class = _needs("torch.utils.tensorboard", "tensorboard", "tensorboard").SummaryWriter

    def start(self, config: dict[str, Any]) -> None:
        import yaml

        self.writer = self.writer_class(str(self.folder.tensorboard))
        self.writer.add_text("config", "```yaml\n" + yaml.safe_dump(config, sort_keys=False) + "```", self.last_epoch)

    def log(self, epoch: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, epoch)
        self.writer.flush()

    def finish(self, curves: Path | None, scores: dict[str, float] | None) -> None:
        if curves is not None:
            import numpy as np
            from PIL import Image

            self.writer.add_image(
                "curves", np.asarray(Image.open(curves).convert("RGB")), self.last_epoch, dataformats="HWC"
            )
        for name, value in (scores or {}).items():
            self.writer.add_scalar(name, value, self.last_epoch)
        self.writer.close()


class WandbTracker(Tracker):
    def __init__(self, cfg: TrainConfig, folder: RunFolder):
        super().__init__(cfg, folder)
        self.wandb = _needs("wandb", "wandb", "wandb")
        self.mode = cfg.wandb_mode or os.environ.get("WANDB_MODE") or "offline"

    def start(self, config: dict[str, Any]) -> None:
        run_id = read_ids(self.folder).get("wandb") or uuid.uuid4().hex[:12]
        save_id(self.folder, "wandb", run_id)
        self.run = self.wandb.init(
            project=self.cfg.tracker_project,
            group=self.cfg.experiment_name,
            name=self.run_name,
            id=run_id,
            resume="allow",
            dir=str(self.folder.path),
            mode=self.mode,
            config=config,
            save_code=False,
            settings=self.wandb.Settings(console="off", silent=True),
        )
        self.run.config.update(config, allow_val_change=True)  # a resumed run: the keys that may change

    def log(self, epoch: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=epoch)

    def finish(self, curves: Path | None, scores: dict[str, float] | None) -> None:
        if curves is not None:
            self.run.log({"curves": self.wandb.Image(str(curves))}, step=self.last_epoch)
        if scores is not None:
            self.run.summary.update(scores)
        self.run.finish(exit_code=0 if scores is not None else 1)


class MLflowTracker(Tracker):
    def __init__(self, cfg: TrainConfig, folder: RunFolder):
        super().__init__(cfg, folder)
        tracking = _needs("mlflow.tracking", "mlflow", "mlflow")
        self.entities = _needs("mlflow.entities", "mlflow", "mlflow")
        runs = Path(cfg.runs_dir).resolve()
        self.uri = cfg.mlflow_uri or f"sqlite:///{runs / MLFLOW_DB}"
        # artifacts beside the default database; a tracking server given by URI keeps its own
        self.artifacts = None if cfg.mlflow_uri else (runs / MLFLOW_ARTIFACTS).as_uri()
        self.client_class = tracking.MlflowClient

    def _experiment(self) -> str:
        found = self.client.get_experiment_by_name(self.cfg.tracker_project)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(self.cfg.tracker_project, artifact_location=self.artifacts)
        except Exception:  # another process created it first (parallel jobs of one budgeted run)
            found = self.client.get_experiment_by_name(self.cfg.tracker_project)
            if found is None:
                raise
            return found.experiment_id

    def start(self, config: dict[str, Any]) -> None:
        Path(self.cfg.runs_dir).mkdir(parents=True, exist_ok=True)
        self.client = self.client_class(tracking_uri=self.uri)
        stored = read_ids(self.folder).get("mlflow") or {}
        if stored.get("uri") == self.uri:
            self.run_id = stored["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            tags = {"experiment": self.cfg.experiment_name, "fold": str(self.cfg.fold)}
            self.run_id = self.client.create_run(self._experiment(), run_name=self.run_name, tags=tags).info.run_id
            save_id(self.folder, "mlflow", {"uri": self.uri, "run_id": self.run_id})
        # parameters are written once: a resumed run keeps the first values (its config.yaml has the rest)
        logged = self.client.get_run(self.run_id).data.params
        Param = self.entities.Param
        params = [Param(k, self._value(v)) for k, v in config.items() if k not in logged]
        for i in range(0, len(params), MLFLOW_BATCH_PARAMS):
            self.client.log_batch(self.run_id, params=params[i : i + MLFLOW_BATCH_PARAMS])
        if self.folder.config.is_file():
            self.client.log_artifact(self.run_id, str(self.folder.config))

    @staticmethod
    def _value(value: Any) -> str:
        text = "null" if value is None else str(value)
        return text[:MLFLOW_PARAM_CHARS]

    def log(self, epoch: int, metrics: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        Metric = self.entities.Metric
        batch = [Metric(mlflow_name(k), v, now, epoch) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def finish(self, curves: Path | None, scores: dict[str, float] | None) -> None:
        if curves is not None:
            self.client.log_artifact(self.run_id, str(curves))
        if self.folder.metrics.is_file():
            self.client.log_artifact(self.run_id, str(self.folder.metrics))
        if scores:
            self.log(self.last_epoch, scores)
        self.client.set_terminated(self.run_id, status="FINISHED" if scores is not None else "FAILED")


TRACKERS: dict[str, Callable[[TrainConfig, RunFolder], Tracker]] = {
    "tensorboard": TensorBoardTracker,
    "wandb": WandbTracker,
    "mlflow": MLflowTracker,
}


def build_trackers(cfg: TrainConfig, folder: RunFolder) -> list[Tracker]:
    """The hooks of ``cfg.tracker`` (each library imported here, a missing one named with its extra)."""
    check_trackers(cfg.tracker, cfg.wandb_mode)
    return [TRACKERS[name](cfg, folder) for name in dict.fromkeys(cfg.tracker)]
