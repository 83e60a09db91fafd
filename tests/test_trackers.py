"""Experiment trackers: a run paused and resumed with W&B (offline), MLflow (a local SQLite store) and
TensorBoard at once; what each logged, read back from its own files, agrees with metrics.csv,
config.yaml, curves.png and the out-of-fold store."""

from __future__ import annotations

import hashlib
import json
import math
import struct
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml
from conftest import small_train_config

from pipeline.core.errors import ConfigError
from pipeline.core.layout import MLFLOW_DB, WANDB, RunFolder
from pipeline.engine.trackers import MLflowTracker, build_trackers, mlflow_name, tracked_name
from pipeline.engine.train_config import TrainConfig, stored_config
from pipeline.train import run

TRACKERS = ["tensorboard", "wandb", "mlflow"]


def tiny(data: Path, folds: Path, runs: Path, **kw) -> TrainConfig:
    base = dict(encoder="tu-mobilenetv3_small_050", epochs=3, augment="light", tracker=TRACKERS, threads=1)
    return small_train_config(data, folds, runs, **{**base, **kw})


def expected(metrics: pd.DataFrame) -> dict[str, dict[int, float]]:
    """metrics.csv as each tracker should hold it: tracked name -> {epoch: value}, finite values only."""
    out: dict[str, dict[int, float]] = {}
    for row in metrics.to_dict("records"):
        for key, value in row.items():
            if key != "epoch" and math.isfinite(value):
                out.setdefault(tracked_name(key), {})[int(row["epoch"])] = value
    return out


def flat(logged: dict[str, dict[int, float]]) -> dict[tuple[str, int], float]:
    return {(name, step): value for name, values in logged.items() for step, value in values.items()}


def wandb_records(path: Path) -> list:
    """The records of a W&B run file (``run-<id>.wandb``: a 7-byte header, then LevelDB's log format:
    32 KiB blocks of chunks, each with a crc32, a length and a type (full, first, middle, last))."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, chunks, pending = 7, 32768, [], b""
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:  # a block's tail too short for a chunk header is padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 2):
            pending = chunk
        else:
            pending += chunk
        if kind in (1, 4):
            chunks.append(pending)
    return [wandb_internal_pb2.Record.FromString(c) for c in chunks]


def wandb_logged(folder: RunFolder) -> tuple[set[str], dict, dict, dict]:
    """Every W&B run folder of a run: their run ids, the history by name and step, the last summary and
    the config."""
    ids, history, summary, config = set(), {}, {}, {}
    for path in sorted((folder.path / WANDB).glob("offline-run-*/run-*.wandb")):
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.add(record.run.run_id)
                config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
            elif kind == "config":
                config.update({i.key: json.loads(i.value_json) for i in record.config.update})
            elif kind == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                step = int(items.pop("_step"))
                for key, value in items.items():
                    if key.startswith("curves/"):  # an image: its fields
                        history.setdefault("curves", {}).setdefault(step, {})[key.split("/", 1)[1]] = value
                    elif not key.startswith("_"):
                        history.setdefault(key, {})[step] = value
            elif kind == "summary":
                summary.update(
                    {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.summary.update}
                )
    config.pop("_wandb", None)
    return ids, history, summary, {k: v.get("value", v) if isinstance(v, dict) else v for k, v in config.items()}


def test_three_trackers_log_a_resumed_run_as_one_run_each(demo_data_square, folds_file, tmp_path):
    # paused after two epochs, then continued to the third (the same run folder, its last.pt)
    first = run(tiny(demo_data_square, folds_file, tmp_path, stop_epoch=2))
    assert first.epochs_done == 2
    folder = RunFolder(first.run_dir)
    ids = json.loads(folder.trackers.read_text())
    done = run(tiny(demo_data_square, folds_file, tmp_path))
    assert done.epochs_done == 3 and json.loads(folder.trackers.read_text()) == ids
    metrics = pd.read_csv(folder.metrics)
    want = expected(metrics)
    assert len(metrics) == 3 and "iou/Background" in want and "train_loss" in want
    config = yaml.safe_load(folder.config.read_text())
    oof = json.loads((folder.oof / "meta.json").read_text())["miou_full_resolution"]
    curves = folder.curves.read_bytes()

    # W&B: offline, two run folders (one per process) of one run id, its history the metrics row by row
    run_ids, history, summary, logged_config = wandb_logged(folder)
    assert run_ids == {ids["wandb"]} and len(list((folder.path / WANDB).glob("offline-run-*"))) == 2
    curves_logged = history.pop("curves")
    assert flat(history) == pytest.approx(flat(want))
    assert summary["oof_miou"] == pytest.approx(oof) and summary["best_epoch"] == done.best_epoch
    assert logged_config["model"] == "unet" and logged_config["tracker"] == TRACKERS
    assert {k: logged_config[k] for k in config} == config
    assert sorted(curves_logged) == [1, 2]  # each process's last epoch
    image = curves_logged[2]
    assert image["sha256"] == hashlib.sha256(curves).hexdigest()
    assert list((folder.path / WANDB).glob(f"offline-run-*/files/{image['path']}"))

    # MLflow: one run in the SQLite store beside the experiments, finished
    from mlflow.tracking import MlflowClient

    assert ids["mlflow"]["uri"] == f"sqlite:///{(tmp_path / MLFLOW_DB).resolve()}"
    client = MlflowClient(tracking_uri=ids["mlflow"]["uri"])
    mlrun = client.get_run(ids["mlflow"]["run_id"])
    assert mlrun.info.status == "FINISHED" and mlrun.info.run_name == "t/fold0"
    assert len(client.search_runs([mlrun.info.experiment_id])) == 1
    for name, values in want.items():
        logged = {m.step: m.value for m in client.get_metric_history(mlrun.info.run_id, mlflow_name(name))}
        assert logged == pytest.approx(values), name
    assert mlrun.data.metrics["oof_miou"] == pytest.approx(oof)
    assert mlrun.data.params["model"] == "unet" and mlrun.data.params["lr"] == str(config["lr"])
    assert mlrun.data.params["stop_epoch"] == "2"  # parameters keep the first process's values
    artifacts = {a.path for a in client.list_artifacts(mlrun.info.run_id)}
    assert {"config.yaml", "metrics.csv", "curves.png"} <= artifacts
    fetched = client.download_artifacts(mlrun.info.run_id, "curves.png", str(tmp_path / "fetched"))
    assert Path(fetched).read_bytes() == curves

    # TensorBoard: event files of both processes, the same scalars
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder.tensorboard), size_guidance={"scalars": 0, "images": 0}).Reload()
    scalars = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    assert scalars.pop("oof_miou")[2] == pytest.approx(oof)  # also at 1: the paused process's scores
    for name in ("best_val_miou", "best_epoch", "epochs"):
        scalars.pop(name)
    assert flat(scalars) == pytest.approx(flat(want), rel=1e-6, abs=1e-9)  # TensorBoard keeps float32
    assert events.Tags()["images"] == ["curves"]


def test_a_failed_run_is_marked_failed(tmp_path):
    cfg = TrainConfig(runs_dir=str(tmp_path), experiment="x", tracker=["mlflow"])
    folder = cfg.folder()
    tracker = MLflowTracker(cfg, folder)
    tracker.on_train_start(SimpleNamespace(cfg=cfg, history=[]))
    tracker.on_epoch_end(None, {"epoch": 0, "train_loss": 1.5, "val_miou": float("nan")})
    tracker.on_run_end(None, None)
    from mlflow.tracking import MlflowClient

    ids = json.loads(folder.trackers.read_text())["mlflow"]
    mlrun = MlflowClient(tracking_uri=ids["uri"]).get_run(ids["run_id"])
    assert mlrun.info.status == "FAILED" and mlrun.data.metrics == {"train_loss": 1.5}


def test_a_run_that_raises_ends_its_hooks_runs_and_reports_its_own_error(demo_data_square, folds_file, tmp_path):
    from pipeline.engine.hooks import Hook
    from pipeline.engine.trainer import train

    ended = []

    class Boom(Hook):
        def on_epoch_end(self, trainer, row):
            raise RuntimeError("boom")

    class Closes(Hook):
        def __init__(self, fails: bool):
            self.fails = fails

        def on_run_end(self, trainer, scores):
            ended.append(scores)
            if self.fails:
                raise ValueError("cannot close")

    cfg = tiny(demo_data_square, folds_file, tmp_path, tracker=[], epochs=1, save_oof=False, plot=False)
    with pytest.raises(RuntimeError, match="boom"):
        train(cfg, [Boom(), Closes(fails=True), Closes(fails=False)])
    assert ended == [None, None]


@pytest.mark.parametrize(
    "tracker, module, extra",
    [
        ("tensorboard", "torch.utils.tensorboard", "tensorboard"),
        ("wandb", "wandb", "wandb"),
        ("mlflow", "mlflow", "mlflow"),
    ],
)
def test_a_tracker_without_its_package_names_its_extra(tracker, module, extra, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # as if the package were missing
    if module == "mlflow":
        monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    cfg = TrainConfig(runs_dir=str(tmp_path), experiment="x", tracker=[tracker])
    with pytest.raises(ConfigError, match=rf"tracker={tracker} needs .*segmentation-contest-pipeline\[{extra}\]"):
        build_trackers(cfg, cfg.folder())


def test_tracker_names_are_checked_and_the_earlier_tensorboard_flag_still_loads():
    with pytest.raises(ConfigError, match="tracker: unknown 'neptune'; known: tensorboard, wandb, mlflow"):
        TrainConfig(tracker=["neptune"]).validate()
    with pytest.raises(ConfigError, match="wandb_mode"):
        TrainConfig(tracker=["wandb"], wandb_mode="cloud").validate()
    assert stored_config({"tensorboard": True}, "old checkpoint").tracker == ["tensorboard"]
    assert stored_config({"tensorboard": False, "tracker": ["wandb"]}, "x").tracker == ["wandb"]
    assert (
        tracked_name("iou_Paper pack") == "iou/Paper pack" and mlflow_name("iou/T-shirt (long)") == "iou/T-shirt _long_"
    )


def test_every_tracker_name_the_config_accepts_has_its_hook():
    from pipeline.engine.trackers import TRACKERS
    from pipeline.engine.train_config import TRACKER_NAMES

    assert tuple(TRACKERS) == TRACKER_NAMES
