"""Loading a file never runs code from it: checkpoints and weights load as data.

A payload file (its unpickling would create a marker file) is given to every reader the pipeline
has: a run's ``best.pt`` to prediction, ``last.pt`` to a resume, ``fine_tune_from=``, checkpoint
averaging, the weights folder, ``weights=`` and a whole-model folder.  Each refuses it with an error
that names the file, says why and names the opt-in, and the marker never appears.  A checkpoint
written by an earlier version (``fixtures/legacy_checkpoint``) still loads and predicts its maps."""

from __future__ import annotations

import io
import json
import pathlib
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import small_train_config
from PIL import Image

from pipeline.average import AverageConfig
from pipeline.average import run as average
from pipeline.core.config import ConfigError, build_config, save_config, to_dict
from pipeline.core.errors import PipelineError
from pipeline.core.layout import RunFolder
from pipeline.core.torch_files import UnsafeFileError
from pipeline.engine.checkpoint import as_data, read_checkpoint, rng_state, serialize, set_rng_state
from pipeline.engine.optim import build_scheduler, load_scheduler_state, resize_schedule, scheduler_state
from pipeline.engine.train_config import TrainConfig, changed_keys
from pipeline.engine.trainer import Trainer
from pipeline.inference.predictor import PredictConfig, predict
from pipeline.models import build_model, get_spec
from pipeline.models import pretrained as pre
from pipeline.models.weights import read_state_dict

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "legacy_checkpoint"
REPO = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this creates ``marker``: what a crafted file could do with anything else."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (pathlib.Path(self.marker).touch, ())


def payload_file(path: Path, marker: Path, **content) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": Payload(marker), "config": {"model": "unet"}, **content}, path)
    return path


def assert_refused(excinfo, path: Path, marker: Path) -> None:
    message = str(excinfo.value)
    assert message.startswith(f"{path}: refused")
    assert "full unpickling" in message and "can run code" in message
    assert f"trust_pickle={path}" in message
    assert not marker.exists()


def test_the_payload_really_runs_code_when_fully_unpickled(tmp_path):
    marker = tmp_path / "marker"
    path = payload_file(tmp_path / "best.pt", marker)
    torch.load(path, map_location="cpu", weights_only=False)
    assert marker.exists()


# ----------------------------------------------------------------------------- every reader refuses it


def test_prediction_refuses_a_payload_best_pt(tmp_path):
    marker = tmp_path / "marker"
    run = tmp_path / "runs" / "x" / "fold0"
    path = payload_file(RunFolder(run).best, marker)
    with pytest.raises(UnsafeFileError) as excinfo:
        predict(PredictConfig(run_dir=str(run), data_dir=str(tmp_path), device="cpu", progress=False))
    assert_refused(excinfo, path, marker)


def test_resume_refuses_a_payload_last_pt(demo_data_square, folds_file, tmp_path):
    marker = tmp_path / "marker"
    cfg = small_train_config(demo_data_square, folds_file, tmp_path / "runs", epochs=1)
    folder = cfg.folder()
    path = payload_file(folder.last, marker)
    save_config(cfg, folder.config)  # the same config: the run is resumed from last.pt
    trainer = Trainer(cfg)
    with pytest.raises(UnsafeFileError) as excinfo:
        trainer.fit()
    assert_refused(excinfo, path, marker)
    folder.config.unlink()  # without config.yaml the config check reads last.pt itself
    with pytest.raises(UnsafeFileError) as excinfo:
        Trainer(cfg)
    assert_refused(excinfo, path, marker)


def test_fine_tune_from_refuses_a_payload(demo_data_square, folds_file, tmp_path):
    marker = tmp_path / "marker"
    path = payload_file(tmp_path / "teammate" / "best.pt", marker)
    cfg = small_train_config(demo_data_square, folds_file, tmp_path / "runs", fine_tune_from=str(path))
    with pytest.raises(UnsafeFileError) as excinfo:
        Trainer(cfg)
    assert_refused(excinfo, path, marker)


def test_averaging_refuses_a_payload_among_the_kept_epochs(tmp_path):
    marker = tmp_path / "marker"
    folder = RunFolder(tmp_path / "run")
    path = payload_file(folder.top / "epoch0001.pt", marker)
    (folder.top / "index.json").write_text(json.dumps([{"epoch": 1, "metric": 0.5, "file": "epoch0001.pt"}]))
    with pytest.raises(UnsafeFileError) as excinfo:
        average(AverageConfig(run_dir=str(folder.path), k=1, device="cpu"))
    assert_refused(excinfo, path, marker)


def test_the_weights_folder_refuses_a_payload(demo_data_square, folds_file, tmp_path):
    marker = tmp_path / "marker"
    path = payload_file(tmp_path / "weights" / "resnet18.pth", marker)
    source = pre.resolve_weights("unet", "resnet18", "auto", tmp_path / "weights")
    assert (source.source, source.path) == ("folder", str(path))
    cfg = small_train_config(
        demo_data_square, folds_file, tmp_path / "runs", encoder_weights="auto", weights_dir=str(tmp_path / "weights")
    )
    with pytest.raises(UnsafeFileError) as excinfo:
        Trainer(cfg)
    assert_refused(excinfo, path, marker)


def test_weights_refuses_a_payload(tmp_path):
    marker = tmp_path / "marker"
    path = payload_file(tmp_path / "teammate.pt", marker)
    with pytest.raises(UnsafeFileError) as excinfo:
        build_model("unet", 3, encoder="resnet18", weights=path)
    assert_refused(excinfo, path, marker)


def _pickled_whole_model(folder: Path, marker: Path) -> Path:
    """A whole-model folder whose weights are a pickled payload, no ``.safetensors``."""
    for file in folder.glob("*.safetensors"):
        file.unlink()
    return payload_file(folder / "pytorch_model.bin", marker)


def test_whole_model_folders_refuse_pickled_weights(tmp_path):
    import segmentation_models_pytorch as smp

    marker = tmp_path / "marker"
    smp.Segformer(encoder_name="mit_b0", encoder_weights=None, classes=3).save_pretrained(str(tmp_path / "segformer"))
    path = _pickled_whole_model(tmp_path / "segformer", marker)
    with pytest.raises(UnsafeFileError, match=re.escape(f"{path}: refused: pretrained=")) as excinfo:
        build_model("segformer", 6, pretrained=str(tmp_path / "segformer"))
    message = str(excinfo.value)
    assert ".safetensors only" in message and "can run code" in message
    assert f"make weights FROM={tmp_path / 'segformer'}" in message and not marker.exists()

    torch.manual_seed(0)
    build_model("hf_upernet", 3, encoder=get_spec("hf_upernet").test_encoder).hf.save_pretrained(tmp_path / "upernet")
    path = _pickled_whole_model(tmp_path / "upernet", marker)
    with pytest.raises(UnsafeFileError, match=re.escape(f"{path}: refused: pretrained=")):
        build_model("hf_upernet", 9, pretrained=str(tmp_path / "upernet"))
    assert not marker.exists()


def test_a_damaged_file_is_unreadable_and_an_old_format_payload_is_refused(tmp_path):
    damaged = tmp_path / "best.pt"
    damaged.write_bytes(b"not a checkpoint")
    with pytest.raises(PipelineError, match=re.escape(f"{damaged}: unreadable checkpoint (")) as excinfo:
        read_checkpoint(damaged)
    assert not isinstance(excinfo.value, UnsafeFileError)
    marker = tmp_path / "marker"
    old = tmp_path / "old.pt"  # torch's format before its zip files
    torch.save({"model": Payload(marker)}, old, _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeFileError) as excinfo:
        read_state_dict(old)
    assert_refused(excinfo, old, marker)


# ----------------------------------------------------------------------------- the opt-in, one file


def test_trust_pickle_loads_the_named_file_only(tmp_path):
    marker = tmp_path / "marker"
    state = build_model("unet", 3, encoder="resnet18").state_dict()
    trusted = tmp_path / "trusted.pt"
    torch.save({"state_dict": state, "extra": Payload(marker)}, trusted)
    other = payload_file(tmp_path / "other.pt", tmp_path / "other-marker")
    with pytest.raises(UnsafeFileError):
        read_state_dict(other, trust_pickle=[str(trusted)])
    assert not (tmp_path / "other-marker").exists()
    loaded = read_state_dict(trusted, trust_pickle=[str(tmp_path / "." / "trusted.pt")])
    assert marker.exists()  # it was unpickled in full, as asked
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], state[k]) for k in state)


@pytest.mark.parametrize(
    ("value", "message"),
    [("['']", "an empty entry"), ("runs/*.pt", "has a wildcard"), (".", "is a folder")],
)
def test_trust_pickle_names_files_one_by_one(value, message):
    with pytest.raises(ConfigError, match=f"trust_pickle: .*{message}"):
        build_config(TrainConfig, overrides={"trust_pickle": value})
    with pytest.raises(ConfigError, match=f"trust_pickle: .*{message}"):
        build_config(PredictConfig, overrides={"run_dir": "runs/x/fold0", "trust_pickle": value})


def test_trust_pickle_does_not_stop_a_resume():
    stored = to_dict(TrainConfig())
    assert changed_keys(stored, build_config(TrainConfig, overrides={"trust_pickle": "runs/x/fold0/last.pt"})) == {}


# ----------------------------------------------------------------------------- checkpoints are data


def test_every_checkpoint_a_run_writes_loads_as_plain_data(demo_data_square, folds_file, tmp_path):
    from pipeline.train import run

    cfg = small_train_config(
        demo_data_square, folds_file, tmp_path / "runs", epochs=2, ema=True, swa_epochs=1, keep_top_k=2
    )
    result = run(cfg)
    averaged = average(AverageConfig(run_dir=str(result.run_dir), k=2, device="cpu"))
    files = sorted(result.run_dir.rglob("*.pt"))
    names = {f.relative_to(result.run_dir).as_posix() for f in files}
    assert {"best.pt", "last.pt", "swa.pt", "averaged.pt", "top/epoch0000.pt", "top/epoch0001.pt"} <= names
    assert averaged in files
    for file in files:
        assert torch.serialization.get_unsafe_globals_in_checkpoint(str(file)) == []
        ckpt = torch.load(file, map_location="cpu", weights_only=True)
        assert isinstance(ckpt["model"], dict) and ckpt["config"]["model"] == "unet"
    last = torch.load(result.run_dir / "last.pt", map_location="cpu", weights_only=True)
    assert last["rng"]["numpy"]["kind"] == "MT19937" and last["rng"]["numpy"]["keys"].shape == (624,)
    horizon = last["scheduler"]["horizon"]  # epochs x steps per epoch, no warmup (small_train_config)
    assert set(horizon) == {"total", "warmup"} and horizon["warmup"] == 0 and horizon["total"] % 2 == 0


def test_what_a_checkpoint_holds_is_turned_into_plain_values():
    state = {"best": np.float64(0.25), "sizes": np.array([3, 4]), "dir": Path("runs/x"), "pair": (1, None)}
    plain = as_data(state)
    assert plain["best"] == 0.25 and type(plain["best"]) is float
    assert torch.equal(plain["sizes"], torch.tensor([3, 4])) and plain["dir"] == "runs/x"
    assert plain["pair"] == (1, None)
    with pytest.raises(TypeError, match=r"checkpoint\.hooks\[0\]: a Payload is not data"):
        as_data({"hooks": [Payload(Path("never"))]})


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    random.seed(3)
    np.random.seed(4)
    np.random.standard_normal()  # a cached Gaussian: the state's last two fields in use
    torch.manual_seed(5)
    path = tmp_path / "rng.pt"
    path.write_bytes(serialize({"rng": rng_state()}))
    expected = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    set_rng_state(torch.load(path, map_location="cpu", weights_only=True)["rng"])
    assert (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()) == expected


def test_a_resumed_schedule_follows_the_stored_horizon():
    cfg = TrainConfig(epochs=10, warmup_epochs=0.0, scheduler="cosine")
    params = [torch.nn.Parameter(torch.zeros(1))]

    def schedule():
        return build_scheduler(cfg, torch.optim.SGD(params, lr=1.0), steps_per_epoch=1)

    first = schedule()
    resize_schedule(first, 4)  # a time budget shortened the run to 4 steps
    for _ in range(2):
        first.optimizer.step(), first.step()
    state = torch.load(io.BytesIO(serialize(scheduler_state(first))), weights_only=True)
    assert state["horizon"] == {"total": 4, "warmup": 0}
    resumed = schedule()
    load_scheduler_state(resumed, state)
    for _ in range(2):
        first.optimizer.step(), first.step()
        resumed.optimizer.step(), resumed.step()
        assert resumed.get_last_lr() == first.get_last_lr()
    assert first.get_last_lr()[0] == pytest.approx(cfg.min_lr_ratio)  # the end of the 4-step decay


# ----------------------------------------------------------------------------- earlier checkpoints


def test_a_checkpoint_of_an_earlier_version_needs_its_allowlist():
    path = FIXTURE / "run" / "best.pt"
    assert path.stat().st_size <= 1_000_000
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(path, map_location="cpu", weights_only=True)
    ckpt = read_checkpoint(path)
    numpy_state = ckpt["rng"]["numpy"]
    assert numpy_state["kind"] == "MT19937" and numpy_state["keys"].dtype == torch.int64
    assert ckpt["scheduler"]["horizon"] == {"total": 240, "warmup": 0}
    set_rng_state(ckpt["rng"])  # restorable as read
    assert np.random.get_state()[1].tolist() == numpy_state["keys"].tolist()
    weights = read_state_dict(path)  # weights= and fine_tune_from= read it too
    assert set(weights) == set(ckpt["model"]) and all(torch.equal(weights[k], ckpt["model"][k]) for k in weights)


def test_a_checkpoint_of_an_earlier_version_predicts_the_same_maps(tmp_path):
    out = tmp_path / "maps"
    predict(
        PredictConfig(
            run_dir=str(FIXTURE / "run"),
            images=str(FIXTURE / "images"),
            out_dir=str(out),
            tta="none",
            device="cpu",
            amp="off",
            progress=False,
        )
    )
    expected = sorted((FIXTURE / "expected").glob("*.png"))
    assert [p.name for p in expected] == ["0.png", "1.png", "2.png"]
    for file in expected:
        want = np.array(Image.open(file))
        got = np.array(Image.open(out / "labels" / file.name))
        assert len(np.unique(want)) >= 3  # maps with several classes, not a blank
        assert np.array_equal(got, want), file.name


def test_make_weights_converts_a_pickled_whole_model_folder(tmp_path):
    import segmentation_models_pytorch as smp

    from pipeline.prepare_weights import WeightsConfig
    from pipeline.prepare_weights import run as prepare

    torch.manual_seed(0)
    net = smp.Segformer(encoder_name="mit_b0", encoder_weights=None, classes=3)
    folder = tmp_path / "org--segformer"
    net.save_pretrained(str(folder))
    (folder / "model.safetensors").unlink()
    torch.save(net.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(UnsafeFileError):
        build_model("segformer", 3, pretrained=str(folder))
    assert prepare(WeightsConfig(source=str(folder))) == [folder / "model.safetensors"]
    model = build_model("segformer", 3, pretrained=str(folder))
    x = torch.randn(1, 3, 64, 64)
    net.eval(), model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), net(x))


# ----------------------------------------------------------------------------- one reader


def test_no_second_torch_load_in_the_package_or_the_benchmarks():
    loads, full = [], []
    for folder in ("pipeline", "benchmarks"):
        for file in sorted((REPO / folder).rglob("*.py")):
            text, rel = file.read_text(), file.relative_to(REPO).as_posix()
            loads += [rel] * text.count("torch.load(")
            full += [rel] * text.count("weights_only=False")
    assert loads == ["pipeline/core/torch_files.py"]  # in its one loading function
    assert full == ["pipeline/core/torch_files.py"]  # the opt-in path
