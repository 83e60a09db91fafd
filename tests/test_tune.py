"""Tuning stage: a real tiny study and its report, pruning with global steps, parallel workers,
a worker killed mid-trial, a PostgreSQL-backed study and strict search-space checks."""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml

from pipeline.core.config import ConfigError, build_config
from pipeline.core.errors import PipelineError
from pipeline.train import TrainConfig, TrainResult
from pipeline.train import run as train_run
from pipeline.tune import TuneConfig, main, run
from pipeline.tune_report import TuneReportConfig
from pipeline.tune_report import run as report_run
from pipeline.tuning.space import TRIAL_DEFAULTS, compose_loss, load_space
from pipeline.tuning.study import open_storage
from pipeline.tuning.trials import base_train_config, global_step, trial_train_config

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
FAKE_SPACE = "lr: {type: float, low: 1.0e-4, high: 1.0e-1, log: true}\n"
COMPLETE, PRUNED, FAIL, RUNNING = (optuna.trial.TrialState[s] for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING"))


# ----------------------------------------------------------------------------- fake training
def fake_curve(cfg: TrainConfig) -> list[float]:
    """A deterministic validation curve: rises with epochs, best near lr=1e-2, flat and low for lr >= 0.05."""
    if cfg.lr >= 0.05:
        return [0.1] * cfg.epochs
    quality = 1.0 - abs(math.log10(cfg.lr) + 2.0) / 4.0
    return [quality * (0.5 + 0.5 * (e + 1) / cfg.epochs) + 0.01 * cfg.fold for e in range(cfg.epochs)]


def fake_train(cfg: TrainConfig, epoch_callback) -> TrainResult:
    """Stands in for pipeline.train.run: calls the callback once per epoch like it does."""
    curve = fake_curve(cfg)
    for epoch, value in enumerate(curve):
        epoch_callback(epoch, {"epoch": epoch, "val_miou": value})
    time.sleep(0.05)
    best = max(range(len(curve)), key=curve.__getitem__)
    return TrainResult(cfg.run_dir(), curve[best], best, len(curve), [])


def blocking_train(cfg: TrainConfig, epoch_callback) -> TrainResult:
    """Signals that a trial is running (file named by $TUNE_READY), then blocks until killed."""
    Path(os.environ["TUNE_READY"]).write_text(cfg.experiment)
    time.sleep(300)
    raise AssertionError("not killed")


def worker_cmd(**kw) -> list[str]:
    """A worker process running run(TuneConfig(**kw)) with a training function of this module."""
    train_fn = kw.pop("train_fn", "fake_train")
    code = (
        f"import sys, logging; sys.path.insert(0, {str(TESTS)!r}); logging.basicConfig(level='INFO')\n"
        f"import test_tune\nfrom pipeline.tune import TuneConfig, run\n"
        f"run(TuneConfig(**{kw!r}), train_fn=test_tune.{train_fn})\n"
    )
    return [sys.executable, "-c", code]


@pytest.fixture
def fake_space(tmp_path) -> str:
    path = tmp_path / "space.yaml"
    path.write_text(FAKE_SPACE)
    return str(path)


def fake_cfg(tmp_path: Path, space: str, **kw) -> TuneConfig:
    base = dict(
        study="s",
        trials=2,
        space=space,
        storage=f"sqlite:///{tmp_path / 's.db'}",
        runs_dir=str(tmp_path / "runs"),
        train_args=["epochs=3"],
        heartbeat_interval=1,
        grace_period=2,
    )
    base.update(kw)
    return TuneConfig(**base)


def load(cfg: TuneConfig) -> optuna.Study:
    return optuna.load_study(study_name=cfg.study, storage=open_storage(cfg.storage))


# ----------------------------------------------------------------------------- 1. real study + report
def test_real_study_report_and_best_yaml_reproduce_the_best_trial(demo_data_square, folds_file, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(
        "lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}\n"
        "loss: {type: categorical, choices: [ce, ce+dice]}\n"
        "loss_dice_weight: {type: float, low: 0.2, high: 1.0, when: {loss: ce+dice}}\n"
        "epochs: 1\n"
    )
    cfg = TuneConfig(
        study="real",
        trials=3,
        space=str(space),
        storage=f"sqlite:///{tmp_path / 'real.db'}",
        runs_dir=str(tmp_path / "runs"),
        data_dir=str(demo_data_square),
        folds_file=str(folds_file),
        fold=1,
        sampler="random",
        train_args=[
            "model=unet encoder=tu-mobilenetv3_small_050 encoder_weights=null img_size=32 batch_size=8 "
            "num_workers=0 threads=1",
            f"progress=false warmup_epochs=0 max_train_batches=1 max_val_batches=1 cache_dir={tmp_path / 'cache'}",
        ],
    )
    optuna.create_study(study_name="real", storage=open_storage(cfg.storage), direction="maximize").enqueue_trial(
        {"loss": "ce+dice", "loss_dice_weight": 0.5}
    )
    study = run(cfg)
    trials = study.get_trials()
    assert [t.number for t in trials] == [0, 1, 2]
    assert all(t.state == COMPLETE for t in trials)
    assert trials[0].user_attrs["config"]["loss"] == "1*ce+0.5*dice"
    for t in trials:
        stored = t.user_attrs["config"]
        assert stored["experiment"] == f"real-t{t.number}" and stored["fold"] == 1 and stored["epochs"] == 1
        assert (
            stored["save_oof"] is False and stored["img_size"] == [32] and stored["lr"] == pytest.approx(t.params["lr"])
        )
        assert Path(t.user_attrs["run_dirs"][0]) == Path(cfg.runs_dir) / f"real-t{t.number}" / "fold1"
        assert (Path(t.user_attrs["run_dirs"][0]) / "best.pt").is_file()
        assert list(t.intermediate_values) == [0] and t.value == pytest.approx(t.intermediate_values[0])

    out = report_run(TuneReportConfig(study="real", storage=cfg.storage, out_dir=str(tmp_path / "reports")))
    assert out == tmp_path / "reports" / "real"
    table = pd.read_csv(out / "trials.csv")
    assert list(table.columns[:6]) == ["number", "state", "value", "params", "duration", "run_dir"]
    assert list(table["number"]) == [0, 1, 2] and set(table["state"]) == {"COMPLETE"}
    assert json.loads(table.loc[0, "params"]) == trials[0].params
    assert (table["duration"] > 0).all()
    for name in (
        "optimization_history.png",
        "param_importances.png",
        "parallel_coordinate.png",
        "intermediate_values.png",
    ):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name

    best = study.best_trial
    assert set(yaml.safe_load((out / "best.yaml").read_text())) == {f.name for f in dataclasses.fields(TrainConfig)}
    best_cfg = build_config(TrainConfig, out / "best.yaml")
    assert best_cfg.runs_dir == "runs" and best_cfg.save_oof and best_cfg.plot
    assert best_cfg.experiment == f"{study.study_name}-best"  # named after its study, not runs/best/
    assert best_cfg.lr == pytest.approx(best.params["lr"]) and best_cfg.fold == 1
    again = train_run(
        build_config(TrainConfig, out / "best.yaml", {"runs_dir": str(tmp_path / "again"), "save_oof": False})
    )
    assert again.best_miou == pytest.approx(best.value, abs=1e-6)


# ----------------------------------------------------------------------------- 2. pruning
def test_median_pruner_prunes_bad_curve_and_global_steps_never_repeat(tmp_path, fake_space):
    assert [global_step(f, e, 3) for f in range(2) for e in range(3)] == [0, 1, 2, 3, 4, 5]
    cfg = fake_cfg(tmp_path, fake_space, trials=4, folds=[0, 1], sampler="random")
    seeded = optuna.create_study(study_name="s", storage=open_storage(cfg.storage), direction="maximize")
    for lr in (0.01, 0.003, 0.02, 0.09):  # three good curves, then a clearly worse one
        seeded.enqueue_trial({"lr": lr})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(cfg, train_fn=fake_train)
    assert not [w for w in caught if "already reported" in str(w.message)]
    trials = load(cfg).get_trials()
    assert [t.state for t in trials] == [COMPLETE, COMPLETE, COMPLETE, PRUNED]
    for t in trials[:3]:
        assert sorted(t.intermediate_values) == list(range(6))  # 2 folds x 3 epochs, no step twice
        assert t.intermediate_values[4] == pytest.approx(
            fake_curve(TrainConfig(lr=t.params["lr"], epochs=3, fold=1))[1]
        )
        assert t.value == pytest.approx(sum(t.user_attrs["fold_values"]) / 2)
    assert sorted(trials[3].intermediate_values) == [0, 1]  # warm-up step 0, pruned at step 1

    # first fold only, with a hyperband pruner on a journal file
    first_only = fake_cfg(
        tmp_path,
        fake_space,
        study="first",
        trials=2,
        folds=[0, 1],
        prune_first_fold_only=True,
        pruner="hyperband",
        storage=f"journal:{tmp_path / 'journal.log'}",
    )
    study = run(first_only, train_fn=fake_train)
    assert isinstance(study.pruner, optuna.pruners.HyperbandPruner)
    assert all(sorted(t.intermediate_values) == [0, 1, 2] for t in load(first_only).get_trials())

    with pytest.raises(PipelineError, match="study 'nope' not found .* studies there: s"):
        report_run(TuneReportConfig(study="nope", storage=cfg.storage, out_dir=str(tmp_path / "reports")))
    with pytest.raises(PipelineError, match="not found"):
        report_run(
            TuneReportConfig(
                study="s", storage=f"sqlite:///{tmp_path / 'missing.db'}", out_dir=str(tmp_path / "reports")
            )
        )
    assert not (tmp_path / "missing.db").exists()


# ----------------------------------------------------------------------------- 3. parallel workers
@pytest.mark.slow
def test_two_workers_share_one_study(tmp_path, fake_space):
    common = dict(
        study="par",
        trials=3,
        space=fake_space,
        storage=f"sqlite:///{tmp_path / 'par.db'}",
        runs_dir=str(tmp_path / "runs"),
        train_args=["epochs=2"],
        heartbeat_interval=1,
        grace_period=3,
        pruner="none",
    )
    procs = [
        subprocess.Popen(worker_cmd(worker_id=w, **common), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for w in (0, 1)
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()[-2000:]
    trials = load(TuneConfig(**common)).get_trials()
    assert sorted(t.number for t in trials) == list(range(6))
    assert [t.state for t in trials].count(COMPLETE) == 6
    assert len({t.params["lr"] for t in trials}) == 6  # distinct sampler seeds per worker
    assert len({t.user_attrs["run_dir"] for t in trials}) == 6


# ----------------------------------------------------------------------------- 4. killed worker
@pytest.mark.slow
def test_killed_worker_trial_is_failed_and_retried(tmp_path, fake_space):
    cfg = fake_cfg(tmp_path, fake_space, study="kill", trials=1, pruner="none")
    ready = tmp_path / "ready"
    kw = {
        k: getattr(cfg, k)
        for k in (
            "study",
            "trials",
            "space",
            "storage",
            "runs_dir",
            "train_args",
            "heartbeat_interval",
            "grace_period",
            "pruner",
        )
    }
    proc = subprocess.Popen(
        worker_cmd(train_fn="blocking_train", **kw),
        cwd=ROOT,
        env={**os.environ, "TUNE_READY": str(ready)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 90
    while not ready.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert ready.exists(), (
        proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "worker never started a trial"
    )
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert [t.state for t in load(cfg).get_trials()] == [RUNNING]
    time.sleep(cfg.grace_period + 1.0)  # the dead trial's last heartbeat is now older than the grace period

    run(dataclasses.replace(cfg, trials=2), train_fn=fake_train)
    trials = load(cfg).get_trials()
    assert [t.state for t in trials] == [FAIL, COMPLETE, COMPLETE]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retried = [optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(t) for t in trials]
    assert retried == [None, 0, None]
    assert trials[1].params == trials[0].params
    assert trials[1].user_attrs["run_dir"] == str(Path(cfg.runs_dir) / "kill-t0")  # continues the killed run's folder
    assert trials[2].user_attrs["run_dir"] == str(Path(cfg.runs_dir) / "kill-t2")
    assert not any(t.state == RUNNING for t in trials)


# ----------------------------------------------------------------------------- 5. PostgreSQL
@pytest.fixture
def postgres_url(tmp_path, request) -> str:
    """A throw-away PostgreSQL server on a unix socket only, started from the Debian package binaries."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    if not found:
        pytest.skip("PostgreSQL server binaries not installed (no /usr/lib/postgresql/*/bin/pg_ctl)")
    pytest.importorskip("psycopg2", reason="psycopg2 is not installed")
    bindir = Path(found[-1]).parent
    root = os.geteuid() == 0
    if root:
        import pwd

        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
        # the pytest tmp_path tree is private to root; the server user needs a folder it can reach
        base = Path(tempfile.mkdtemp(prefix="pgt", dir="/tmp"))
        os.chown(base, user.pw_uid, user.pw_gid)
        request.addfinalizer(lambda: shutil.rmtree(base, ignore_errors=True))
    else:
        base = tmp_path / "pg"
        base.mkdir()

    def cmd(*args) -> list[str]:
        return (["runuser", "-u", "postgres", "--"] if root else []) + [str(a) for a in args]

    def check(*args) -> None:
        done = subprocess.run(cmd(*args), capture_output=True, text=True)
        log = (base / "server.log").read_text() if (base / "server.log").exists() else ""
        assert done.returncode == 0, f"{Path(str(args[0])).name} failed:\n{done.stdout}{done.stderr}{log[-2000:]}"

    data = base / "data"
    check(bindir / "initdb", "-D", data, "-A", "trust", "-U", "optuna", "--no-sync", "-E", "UTF8")
    check(
        bindir / "pg_ctl",
        "-D",
        data,
        "-l",
        base / "server.log",
        "-w",
        "-t",
        "60",
        "-o",
        f"-c listen_addresses='' -k {base} -c fsync=off",
        "start",
    )
    request.addfinalizer(
        lambda: subprocess.run(cmd(bindir / "pg_ctl", "-D", data, "-m", "immediate", "-w", "stop"), capture_output=True)
    )
    check(bindir / "createdb", "-h", base, "-U", "optuna", "tune_test")
    return f"postgresql+psycopg2://optuna@/tune_test?host={base}"


@pytest.mark.slow
@pytest.mark.postgres
def test_postgres_backed_study(tmp_path, fake_space, postgres_url):
    cfg = fake_cfg(tmp_path, fake_space, study="pg", trials=2, storage=postgres_url, pruner="none")
    run(cfg, train_fn=fake_train)
    run(cfg, train_fn=fake_train)  # a second run continues the same study
    trials = optuna.load_study(study_name="pg", storage=postgres_url).get_trials()
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert all(t.state == COMPLETE and t.value > 0 for t in trials)
    assert trials[3].user_attrs["config"]["experiment"] == "pg-t3"

    import psycopg2

    conn = psycopg2.connect(dbname="tune_test", user="optuna", host=postgres_url.split("host=")[1])
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT count(*) FROM trials t JOIN studies s ON s.study_id = t.study_id WHERE s.study_name = "
                "'pg' AND t.state = 'COMPLETE'"
            )
            assert cur.fetchone()[0] == 4
    finally:
        conn.close()


# ----------------------------------------------------------------------------- 6. invalid spaces
BAD_SPACES = {
    "unknown key": ("learning_rate: {type: float, low: 0.1, high: 0.2}\n", "unknown key 'learning_rate'"),
    "unknown type": ("lr: {type: uniform, low: 0.1, high: 0.2}\n", "lr: unknown type 'uniform'"),
    "low >= high": ("lr: {type: float, low: 0.2, high: 0.1}\n", "lr: low (0.2) must be below high (0.1)"),
    "bad yaml": ("lr: {type: float, low: 0.1\n", "invalid YAML"),
    "empty choices": ("augment: {type: categorical, choices: []}\n", "augment: categorical needs a non-empty list"),
    "unknown field": ("lr: {type: float, low: 0.1, high: 0.2, lgo: true}\n", "lr: unknown field(s) lgo"),
    "value TrainConfig rejects": ("augment: {type: categorical, choices: [light, heavy]}\n", "augment='heavy'"),
    "wrong value type": ("epochs: {type: categorical, choices: [2, many]}\n", "epochs: expected an integer"),
    "when undefined": ("lr: {type: float, low: 0.1, high: 0.2, when: {model: unet}}\n", "when refers to 'model'"),
    "when never holds": (
        "model: {type: categorical, choices: [unet, fpn]}\n"
        "lr: {type: float, low: 0.1, high: 0.2, when: {model: pspnet}}\n",
        "when model='pspnet' can never hold",
    ),
    "overlapping variants": (
        "model: {type: categorical, choices: [unet, fpn]}\nencoder:\n"
        "  - {when: {model: unet}, type: categorical, choices: [resnet18]}\n"
        "  - {when: {model: [unet, fpn]}, type: categorical, choices: [resnet34]}\n",
        "encoder: more than one variant",
    ),
    "unknown encoder": (
        "model: fpn\nencoder: {type: categorical, choices: [resnet18, resnet_nope]}\n",
        "encoder=resnet_nope",
    ),
    "size not divisible": (
        "model: fpn\nencoder: resnet18\nimg_size: {type: categorical, choices: [[64, 64], [48, 48]]}\n",
        "img_size [48, 48] is not a multiple of 32",
    ),
    "weight without term": (
        "loss: {type: categorical, choices: [ce, ce+dice]}\nloss_dice_weight: {type: float, low: 0.1, high: 1.0}\n",
        "loss 'ce' has no dice term",
    ),
    "unknown loss term": ("loss_tversky_weight: 0.5\n", "unknown loss term 'tversky'"),
    "tuner key": ("runs_dir: elsewhere\n", "runs_dir: set by the tuner"),
}


@pytest.mark.parametrize("case", list(BAD_SPACES))
def test_invalid_search_space_is_a_clear_config_error(tmp_path, case):
    text, message = BAD_SPACES[case]
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_space(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_default_space_loads_and_bad_space_stops_the_cli(tmp_path):
    space = load_space(ROOT / "pipeline/configs/search_space.yaml")
    assert {
        "model",
        "encoder",
        "lr",
        "encoder_lr",
        "weight_decay",
        "loss",
        "augment",
        "img_size",
        "batch_size",
        "epochs",
    } <= set(space.keys)
    names = [p.name for p in space.params if p.key == "encoder"]
    assert names == ["encoder[model=unet]", "encoder[model=fpn|deeplabv3plus]"]
    assert compose_loss("ce+dice", {"dice": 0.4}, "x") == "1*ce+0.4*dice"
    assert compose_loss("0.7*ce+0.3*lovasz", {"ce": 2.5e-5}, "x") == "2.5e-05*ce+0.3*lovasz"
    with pytest.raises(ConfigError, match="has no focal term"):
        compose_loss("ce", {"focal": 1.0}, "x")
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: {type: float, low: 1, high: 1}\n")
    assert main([f"space={bad}", f"storage=sqlite:///{tmp_path / 'x.db'}"]) == 2
    assert not (tmp_path / "x.db").exists()
    assert TuneConfig(fold=2).fold_list() == [2] and TuneConfig(fold=2, folds=[0, 1]).fold_list() == [0, 1]


# ----------------------------------------------------------------------------- 7. trial configs
def test_trial_config_is_build_config_of_the_same_layers(tmp_path):
    """Tuner defaults < base_config (an overlay of an overlay of base.yaml) < data paths < train_args < sampled
    values < tuner keys: the same result as build_config of those layers, so the two cannot drift apart."""
    overlay = tmp_path / "my_fpn.yaml"
    overlay.write_text(f"base: {ROOT / 'pipeline/configs/fpn.yaml'}\nbatch_size: 4\nepochs: 12\naugment: light\n")
    cfg = TuneConfig(
        base_config=str(overlay),
        data_dir="data/x",
        folds_file="folds/x.csv",
        runs_dir="runs/t",
        train_args=["epochs=3 lr=1e-3", "augment=none"],
    )
    defaults = build_config(TrainConfig, overrides=TRIAL_DEFAULTS)
    fixed = {"data_dir": "data/x", "folds_file": "folds/x.csv", "epochs": "3", "lr": "1e-3", "augment": "none"}
    base = base_train_config(cfg)
    assert base == build_config(TrainConfig, overlay, fixed, base=defaults)
    assert (base.model, base.encoder, base.batch_size, base.epochs, base.patience) == (
        "fpn",
        "resnext50_32x4d",
        4,
        3,
        10,
    )
    assert base.save_oof is False and base.plot is False

    sampled = {"lr": 0.02, "batch_size": 2, "loss_dice_weight": 0.4}
    trial = trial_train_config(base, sampled, "s-t7", "runs/t", 1, "space.yaml (trial 7)")
    tuner = {"experiment": "s-t7", "runs_dir": "runs/t", "fold": 1, "resume": True}
    expected = build_config(
        TrainConfig, overlay, {**fixed, "lr": 0.02, "batch_size": 2, "loss": "1*ce+0.4*dice", **tuner}, base=defaults
    )
    assert trial == expected


def test_trial_config_errors_are_unchanged(tmp_path):
    with pytest.raises(ConfigError, match="runs_dir are set by the tuner"):
        base_train_config(TuneConfig(train_args=["runs_dir=x"]))
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        base_train_config(TuneConfig(base_config=str(tmp_path / "nope.yaml")))
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="loop.yaml: base: loop.yaml makes a cycle"):
        base_train_config(TuneConfig(base_config=str(tmp_path / "loop.yaml")))
    with pytest.raises(ConfigError, match=r"space.yaml \(trial 3\): lr: expected a number"):
        trial_train_config(base_train_config(TuneConfig()), {"lr": "fast"}, "s-t3", "runs/t", 0, "space.yaml (trial 3)")
