"""The stages' command line: ARGS with spaces, --help with types, defaults and comments,
--print-config with the layer of each value, "did you mean" for a mistyped key, and the one
composition that training and every tuning trial share."""

from __future__ import annotations

import dataclasses
import logging

import optuna
import pytest
import yaml

from pipeline.core.config import ConfigError, build_config, field_comments, split_args
from pipeline.engine.train_config import BASE_YAML, CONFIGS_DIR, TrainConfig, train_layers
from pipeline.train import main as train_main
from pipeline.tuning.space import TRIAL_DEFAULTS, TUNER_KEYS, load_space
from pipeline.tuning.trials import TrialObjective, base_train_config
from pipeline.tuning.tune_config import TuneConfig


def test_args_with_spaces_stay_whole(caplog):
    assert split_args("loss_options={classes: present} lr=1e-4") == ["loss_options={classes: present}", "lr=1e-4"]
    assert split_args(
        "model_options={unet: {decoder_channels: [128, 64, 32, 16, 16]}} class_thresholds={Battery: 0.7}"
    ) == [
        "model_options={unet: {decoder_channels: [128, 64, 32, 16, 16]}}",
        "class_thresholds={Battery: 0.7}",
    ]
    # shell quoting still groups a value that holds key=value words (the tuner's train_args)
    assert split_args('train_args="epochs=3 lr=1e-3" trials=2') == ["train_args=epochs=3 lr=1e-3", "trials=2"]
    with caplog.at_level(logging.ERROR):
        assert train_main(["--print-config", "--args", "{classes: present}"]) == 2
    assert "'{classes: present}' is not of the form key=value" in caplog.text
    # the tuner's train_args (make tune TUNE_TRAIN_ARGS=...) are split the same way
    from pipeline.tuning.trials import split_train_args

    assert split_train_args(["epochs=3 loss_options={classes: present}", "augment=none"]) == [
        "epochs=3",
        "loss_options={classes: present}",
        "augment=none",
    ]
    with pytest.raises(ConfigError, match="No closing quotation"):
        split_args("name='open")


def test_print_config_shows_the_value_and_its_layer(capsys):
    assert train_main(["--print-config", "model=fpn", "--args", "loss_options={classes: present} lr=1e-4"]) == 0
    lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert lines["model"] == "fpn  # command line"
    assert lines["loss_options"] == "{classes: present}  # command line"
    assert lines["lr"] == "0.0001  # command line"
    assert lines["encoder"].startswith("resnext50_32x4d  # ") and lines["encoder"].endswith("configs/fpn.yaml")
    assert lines["augment"].startswith("strong  # ") and lines["augment"].endswith("configs/base.yaml")
    assert lines["data_dir"] == "data/demo  # defaults"
    # key=value items before and after the options alike
    assert train_main(["--args", "lr=1e-4", "data_dir=elsewhere", "--print-config", "epochs=2"]) == 0
    lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert (lines["data_dir"], lines["epochs"], lines["lr"]) == ("elsewhere  # command line",) * 1 + (
        "2  # command line",
        "0.0001  # command line",
    )


def test_help_lists_type_default_and_comment(capsys):
    with pytest.raises(SystemExit) as done:
        train_main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "  epochs (int, default " in text
    assert "  encoder_weights (str | None, default auto)" in text
    comment = field_comments(TrainConfig)["encoder_weights"]
    assert comment.startswith("auto:") and comment in text
    # a section heading above a field is not taken for its comment
    assert "model" not in field_comments(TrainConfig).get("mask_rule", "").split()[-1:]


def test_unknown_key_suggests_the_closest(caplog):
    with caplog.at_level(logging.ERROR):
        assert train_main(["epoch=3"]) == 2
    assert "epoch (did you mean epochs" in caplog.text
    with pytest.raises(ConfigError, match=r"lrr \(did you mean lr"):
        build_config(TrainConfig, overrides={"lrr": "1"})


def test_train_layers_base_then_family_then_file_then_command_line(tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text(f"base: {CONFIGS_DIR / 'unet.yaml'}\nbatch_size: 3\n")
    layers = train_layers(str(mine), {"lr": "0.01"})
    names = [source for source, _ in layers]
    # base.yaml and unet.yaml come once, from the family, then the file, then the command line
    assert [n.rsplit("/", 1)[-1] for n in names] == ["base.yaml", "unet.yaml", "mine.yaml", "command line"]
    cfg = build_config(TrainConfig, overrides={})
    from pipeline.core.config import layer

    cfg = layer(TrainConfig(), *layers)
    assert (cfg.model, cfg.encoder, cfg.batch_size, cfg.lr, cfg.augment) == (
        "unet",
        "efficientnet-b4",
        3,
        0.01,
        "strong",
    )
    # a model without an overlay gets base.yaml alone
    assert [s.rsplit("/", 1)[-1] for s, _ in train_layers(None, {"model": "nosuchfamily"})] == [
        "base.yaml",
        "command line",
    ]
    assert BASE_YAML.is_file()


def test_a_trial_has_the_config_print_config_shows_plus_its_sampled_values(tmp_path, capsys):
    """The demo profile's study (model sampled among unet and fpn): a trial that samples unet gets
    exactly what `python -m pipeline.train model=unet <train_args> --print-config` prints, plus its
    sampled values and the tuner's own keys."""
    train_args = ["encoder_weights=null num_workers=0 max_train_batches=8"]
    cfg = TuneConfig(study="cli", space=str(CONFIGS_DIR / "search_space_demo.yaml"), train_args=train_args)
    seen = {}

    def fake_train(train_cfg, callback):
        seen[train_cfg.experiment] = train_cfg
        raise optuna.TrialPruned("not trained in this test")

    space = load_space(cfg.space)
    objective = TrialObjective(cfg, space, base_train_config(cfg), train_fn=fake_train)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3), direction="maximize")
    study.optimize(objective, n_trials=12)
    trial = next(t for t in study.trials if t.params.get("model") == "unet")
    fpn_trial = next(t for t in study.trials if t.params.get("model") == "fpn")

    assert train_main(["model=unet", "--print-config", "--args", *train_args]) == 0
    printed = yaml.safe_load("\n".join(line.split("  # ")[0] for line in capsys.readouterr().out.splitlines()))
    got = dataclasses.asdict(seen[f"cli-t{trial.number}"])
    from pipeline.core.config import read_yaml_mapping

    fixed = {k: v for k, v in read_yaml_mapping(cfg.space).items() if not isinstance(v, (dict, list))}
    sampled = {**fixed, **{k: v for k, v in trial.params.items() if not k.startswith("loss")}}
    assert fixed == {"batch_size": 8, "epochs": 3}
    tuner_keys = set(TUNER_KEYS) | set(TRIAL_DEFAULTS) | {"loss"}
    for key, value in got.items():
        if key in sampled:
            assert value == getattr(build_config(TrainConfig, overrides={key: sampled[key]}), key), key
        elif key not in tuner_keys:
            assert yaml.safe_load(yaml.safe_dump(value)) == printed[key], key
    assert got["encoder_weights"] is None and got["max_train_batches"] == 8 and got["patience"] == printed["patience"]
    # the fpn trial is layered on fpn.yaml's keys, as `make train MODEL=fpn` would be
    fpn = dataclasses.asdict(seen[f"cli-t{fpn_trial.number}"])
    overlay = read_yaml_mapping(CONFIGS_DIR / "fpn.yaml")
    for key, value in overlay.items():
        if key != "base" and key not in fpn_trial.params and key not in fixed:
            assert fpn[key] == value, key
