"""Layered config: defaults -> YAML (base: chains) -> key=value, type coercion, unknown keys, round trip,
and the family configs (base.yaml + overlays) resolving exactly as the old full copies did."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from pipeline.core.config import (
    ConfigError,
    build_config,
    layer,
    layered_mapping,
    parse_overrides,
    save_config,
    yaml_layers,
)
from pipeline.engine.train_config import TrainConfig

CONFIGS = Path(__file__).resolve().parents[1] / "pipeline" / "configs"


@dataclass
class Cfg:
    name: str = "a"
    epochs: int = 3
    lr: float = 1e-3
    flag: bool = False
    size: list[int] | None = None
    opt: str | None = None
    extra: dict = field(default_factory=dict)


def test_layers_and_types(tmp_path):
    (tmp_path / "c.yaml").write_text("epochs: 10\nlr: 0.01\nname: from_yaml\nsize: [256, 320]\n")
    cfg = build_config(Cfg, tmp_path / "c.yaml", ["lr=1e-4", "flag=true", "name=007", "opt=null", "extra={a: 1}"])
    assert cfg == Cfg(name="007", epochs=10, lr=1e-4, flag=True, size=[256, 320], opt=None, extra={"a": 1})
    assert build_config(Cfg, None, ["size=[64]"]).size == [64]
    assert build_config(Cfg, None, ["size=64,96"]).size == [64, 96]
    assert build_config(Cfg, None, ["epochs=4.0"]).epochs == 4


def test_round_trip_through_yaml(tmp_path):
    cfg = build_config(Cfg, None, ["size=[8,16]", "opt=x", "lr=0.5"])
    save_config(cfg, tmp_path / "out.yaml")
    assert build_config(Cfg, tmp_path / "out.yaml") == cfg


@pytest.mark.parametrize(
    "override, message",
    [
        ("epochs=two", "epochs: expected an integer"),
        ("lr=fast", "lr: expected a number"),
        ("flag=maybe", "flag: expected true/false"),
        ("epochs=1.5", "expected an integer"),
        ("nme=x", "unknown key(s) nme"),
        ("novalue", "not of the form key=value"),
    ],
)
def test_bad_overrides(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_config(Cfg, None, [override])


def test_unknown_key_lists_known_keys(tmp_path):
    (tmp_path / "c.yaml").write_text("epoch: 3\n")
    with pytest.raises(ConfigError) as err:
        build_config(Cfg, tmp_path / "c.yaml")
    assert "c.yaml" in str(err.value) and "known keys: epochs, extra, flag, lr, name, opt, size" in str(err.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml: config file not found"):
        build_config(Cfg, tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: invalid YAML"):
        build_config(Cfg, tmp_path / "bad.yaml")
    (tmp_path / "none.yaml").write_text("name: null\n")
    with pytest.raises(ConfigError, match="none.yaml: name: a value is required"):
        build_config(Cfg, tmp_path / "none.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="list.yaml: expected a mapping"):
        build_config(Cfg, tmp_path / "list.yaml")


def test_parse_overrides_keeps_raw_strings():
    assert parse_overrides(["a=1", "b=x=y", "c="]) == {"a": "1", "b": "x=y", "c": ""}


# ----------------------------------------------------------------------------- base: chains
def test_overlay_chain_resolution(tmp_path):
    """A parent is relative to the folder of the file naming it; the chain is layered root first."""
    (tmp_path / "shared").mkdir()
    (tmp_path / "runs").mkdir()
    (tmp_path / "shared" / "root.yaml").write_text("epochs: 10\nlr: 0.1\nname: root\n")
    (tmp_path / "mid.yaml").write_text("base: shared/root.yaml\nlr: 0.2\nsize: [32]\n")
    (tmp_path / "runs" / "leaf.yaml").write_text("base: ../mid.yaml\nname: leaf\n")
    leaf = tmp_path / "runs" / "leaf.yaml"
    assert [source for source, _ in yaml_layers(leaf)] == [
        str(tmp_path / "runs" / ".." / "shared/root.yaml"),
        str(tmp_path / "runs" / "../mid.yaml"),
        str(leaf),
    ]
    assert layered_mapping(leaf) == {"epochs": 10, "lr": 0.2, "name": "leaf", "size": [32]}
    assert build_config(Cfg, leaf) == Cfg(name="leaf", epochs=10, lr=0.2, size=[32])
    assert yaml_layers(None) == [] and layered_mapping("") == {}


def test_override_order_defaults_base_overlay_command_line(tmp_path):
    (tmp_path / "base.yaml").write_text("epochs: 10\nlr: 0.1\nname: base\nopt: from_base\n")
    (tmp_path / "overlay.yaml").write_text("base: base.yaml\nlr: 0.2\nname: overlay\n")
    cfg = build_config(Cfg, tmp_path / "overlay.yaml", ["name=cli"])
    # flag: default; epochs, opt: base; lr: overlay over base; name: command line over both
    assert cfg == Cfg(name="cli", epochs=10, lr=0.2, flag=False, opt="from_base")
    # layer() is the same step: later layers win, empty layers are skipped
    assert layer(Cfg(), *yaml_layers(tmp_path / "overlay.yaml"), ("cli", {"name": "cli"}), ("nothing", {})) == cfg


def test_errors_name_the_file_of_the_chain_that_holds_the_key(tmp_path):
    (tmp_path / "base.yaml").write_text("epoch: 3\n")
    (tmp_path / "overlay.yaml").write_text("base: base.yaml\nlr: 0.2\n")
    with pytest.raises(ConfigError, match=r"base\.yaml: unknown key\(s\) epoch"):
        build_config(Cfg, tmp_path / "overlay.yaml")
    (tmp_path / "base.yaml").write_text("lr: fast\n")
    with pytest.raises(ConfigError, match=r"base\.yaml: lr: expected a number"):
        build_config(Cfg, tmp_path / "overlay.yaml")


def test_cycle_is_an_error_naming_the_files(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\nlr: 0.1\n")
    (tmp_path / "b.yaml").write_text("base: c.yaml\n")
    (tmp_path / "c.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle") as err:
        build_config(Cfg, tmp_path / "a.yaml")
    message = str(err.value)
    assert message.endswith(" -> ".join(str(tmp_path / n) for n in ("a.yaml", "b.yaml", "c.yaml", "a.yaml"))), message
    (tmp_path / "self.yaml").write_text("base: self.yaml\n")
    with pytest.raises(ConfigError, match="cycle") as err:
        layered_mapping(tmp_path / "self.yaml")
    assert str(err.value).count("self.yaml") >= 2


def test_missing_or_bad_parent_is_an_error_naming_both_files(tmp_path):
    (tmp_path / "overlay.yaml").write_text("base: nowhere.yaml\nlr: 0.1\n")
    with pytest.raises(ConfigError) as err:
        build_config(Cfg, tmp_path / "overlay.yaml")
    message = str(err.value)
    assert (
        str(tmp_path / "overlay.yaml") in message
        and str(tmp_path / "nowhere.yaml") in message
        and "not found" in message
    )
    (tmp_path / "overlay.yaml").write_text("base: [a.yaml]\n")
    with pytest.raises(ConfigError, match="overlay.yaml: base: expected a YAML file name"):
        build_config(Cfg, tmp_path / "overlay.yaml")
    with pytest.raises(ConfigError, match="missing.yaml: config file not found"):
        layered_mapping(tmp_path / "missing.yaml")


# ----------------------------------------------------------------------------- family configs
# The family YAMLs as they were before base.yaml + overlays (git show 01f4ad9:pipeline/configs/<family>.yaml),
# as plain data: every family must still resolve to exactly these values over the TrainConfig defaults,
# but for one deliberate change since: encoder_weights imagenet -> auto (base.yaml; a local copy of the
# ImageNet weights first, a download when online, random weights with a notice offline).
OLD_FAMILY_CONFIGS: dict[str, dict] = {
    "deeplabv3": {
        "model": "deeplabv3",
        "encoder": "resnet101",
        "encoder_weights": "auto",
        "img_size": None,
        "augment": "strong",
        "epochs": 40,
        "batch_size": 6,
        "optimizer": "adamw",
        "lr": 0.0003,
        "encoder_lr": 0.0001,
        "weight_decay": 0.0001,
        "scheduler": "cosine",
        "warmup_epochs": 1,
        "loss": "ce",
        "amp": "auto",
        "patience": 10,
    },
    "deeplabv3plus": {
        "model": "deeplabv3plus",
        "encoder": "resnext50_32x4d",
        "encoder_weights": "auto",
        "img_size": None,
        "augment": "strong",
        "epochs": 40,
        "batch_size": 8,
        "optimizer": "adamw",
        "lr": 0.0003,
        "encoder_lr": 0.0001,
        "weight_decay": 0.0001,
        "scheduler": "cosine",
        "warmup_epochs": 1,
        "loss": "ce+dice",
        "amp": "auto",
        "patience": 10,
    },
    "dpt": {
        "model": "dpt",
        "encoder": "tu-vit_base_patch16_224.augreg_in21k",
        "encoder_weights": "auto",
        "img_size": None,
        "augment": "light",
        "epochs": 40,
        "batch_size": 4,
        "optimizer": "adamw",
        "lr": 0.0001,
        "encoder_lr": 2e-05,
        "weight_decay": 0.0001,
        "scheduler": "cosine",
        "warmup_epochs": 1,
        "loss": "ce+dice",
        "amp": "auto",
        "patience": 10,
        "accum_steps": 2,
    },
    "fpn": {
        "model": "fpn",
        "encoder": "resnext50_32x4d",
        "encoder_weights": "auto",
        "img_size": None,
        "augment": "strong",
        "epochs": 40,
        "batch_size": 8,
        "optimizer": "adamw",
        "lr": 0.0003,
        "encoder_lr": 0.0001,
        "weight_decay": 0.0001,
        "scheduler": "cosine",
        "warmup_epochs": 1,
        "loss": "ce+dice",
        "amp": "auto",
        "patience": 10,
    },
    "linknet": {
        "model": "linknet",
        "encoder": "resnet34",
        "encoder_weights": "auto",
        "img_size": None,
        "augment": "light",
        "epochs": 40,
        "batch_size": 12,
        "optimizer": "adamw",
        "lr": 0.0003,
        "encoder_lr": 0.0001,
        "weight_decay": 0.0001,
        "scheduler": "cosine",
        "warmup_epochs": 1,
        "loss": "ce+dice",
        "amp": "auto",
        "patience": 10,
    },
    "manet": {
        "model": "manet",
        "encoder": "resnet50",
        "encoder_weights": "auto",
        "img_size": None,
        "augment": "strong",
        "epochs": 40,
        "batch_size": 8,
        "optimizer": "adamw",
        "lr": 0.0003,
        "encoder_lr": 0.0001,
        "weight_decay": 0.0001,
        "scheduler": "cosine",
        "warmup_epochs": 1,
        "loss": "ce+dice",
        "amp": "auto",
        "patience": 10,
    },
    "pan": {
        "model": "pan",
        "encoder": "resnet50",
        "encoder_weights": "auto",
        "img_size": None,
        "augment": "strong",
        "epochs": 40,
        "batch_size": 8,
        "optimizer": "adamw",
        "lr": 0.0003,
        "encoder_lr": 0.0001,
        "weight_decay": 0.0001,
        "scheduler": "cosine",
        "warmup_epochs": 1,
        "loss": "ce+dice",
        "amp": "auto",
        "patience": 10,
    },
    "pspnet": {
        "model": "pspnet",
        "encoder": "resnet50",
        "encoder_weights": "auto",
        "img_size": None,
        "augment": "strong",
        "epochs": 40,
        "batch_size": 8,
        "optimizer": "adamw",
        "lr": 0.0003,
        "encoder_lr": 0.0001,
        "weight_decay": 0.0001,
        "scheduler": "cosine",
        "warmup_epochs": 1,
        "loss": "ce",
        "amp": "auto",
        "patience": 10,
    },
    "segformer": {
        "model": "segformer",
        "encoder": "mit_b2",
        "encoder_weights": "auto",
        "img_size": None,
        "augment": "strong",
        "epochs": 40,
        "batch_size": 8,
        "optimizer": "adamw",
        "lr": 0.0002,
        "encoder_lr": 6e-05,
        "weight_decay": 0.0001,
        "scheduler": "cosine",
        "warmup_epochs": 1,
        "loss": "ce+dice",
        "amp": "auto",
        "patience": 10,
        "ema": True,
    },
    "tv_deeplabv3_mobilenet_v3_large": {
        "model": "tv_deeplabv3_mobilenet_v3_large",
        "encoder": None,
        "encoder_weights": "auto",
        "img_size": None,
        "augment": "light",
        "epochs": 40,
        "batch_size": 16,
        "optimizer": "adamw",
        "lr": 0.0003,
        "weight_decay": 0.0001,
        "scheduler": "cosine",
        "warmup_epochs": 1,
        "loss": "ce",
        "amp": "auto",
        "patience": 10,
    },
    "tv_deeplabv3_resnet101": {
        "model": "tv_deeplabv3_resnet101",
        "encoder": None,
        "encoder_weights": "auto",
        "img_size": None,
        "augment": "light",
        "epochs": 40,
        "batch_size": 6,
        "optimizer": "adamw",
        "lr": 0.0001,
        "weight_decay": 0.0001,
        "scheduler": "cosine",
        "warmup_epochs": 1,
        "loss": "ce",
        "amp": "auto",
        "patience": 10,
    },
    "tv_deeplabv3_resnet50": {
        "model": "tv_deeplabv3_resnet50",
        "encoder": None,
        "encoder_weights": "auto",
        "img_size": None,
        "augment": "light",
        "epochs": 40,
        "batch_size": 8,
        "optimizer": "adamw",
        "lr": 0.0001,
        "weight_decay": 0.0001,
        "scheduler": "cosine",
        "warmup_epochs": 1,
        "loss": "ce",
        "amp": "auto",
        "patience": 10,
    },
    "tv_fcn_resnet101": {
        "model": "tv_fcn_resnet101",
        "encoder": None,
        "encoder_weights": "auto",
        "img_size": None,
        "augment": "light",
        "epochs": 40,
        "batch_size": 6,
        "optimizer": "adamw",
        "lr": 0.0001,
        "weight_decay": 0.0001,
        "scheduler": "cosine",
        "warmup_epochs": 1,
        "loss": "ce",
        "amp": "auto",
        "patience": 10,
    },
    "tv_fcn_resnet50": {
        "model": "tv_fcn_resnet50",
        "encoder": None,
        "encoder_weights": "auto",
        "img_size": None,
        "augment": "light",
        "epochs": 40,
        "batch_size": 8,
        "optimizer": "adamw",
        "lr": 0.0001,
        "weight_decay": 0.0001,
        "scheduler": "cosine",
        "warmup_epochs": 1,
        "loss": "ce",
        "amp": "auto",
        "patience": 10,
    },
    "tv_lraspp_mobilenet_v3_large": {
        "model": "tv_lraspp_mobilenet_v3_large",
        "encoder": None,
        "encoder_weights": "auto",
        "img_size": None,
        "augment": "light",
        "epochs": 40,
        "batch_size": 16,
        "optimizer": "adamw",
        "lr": 0.0003,
        "weight_decay": 0.0001,
        "scheduler": "cosine",
        "warmup_epochs": 1,
        "loss": "ce",
        "amp": "auto",
        "patience": 10,
    },
    "unet": {
        "model": "unet",
        "encoder": "efficientnet-b4",
        "encoder_weights": "auto",
        "img_size": None,
        "augment": "strong",
        "epochs": 40,
        "batch_size": 8,
        "optimizer": "adamw",
        "lr": 0.0003,
        "encoder_lr": 0.0001,
        "weight_decay": 0.0001,
        "scheduler": "cosine",
        "warmup_epochs": 1,
        "loss": "ce+dice",
        "amp": "auto",
        "patience": 10,
    },
    "unetplusplus": {
        "model": "unetplusplus",
        "encoder": "efficientnet-b4",
        "encoder_weights": "auto",
        "img_size": None,
        "augment": "strong",
        "epochs": 40,
        "batch_size": 6,
        "optimizer": "adamw",
        "lr": 0.0003,
        "encoder_lr": 0.0001,
        "weight_decay": 0.0001,
        "scheduler": "cosine",
        "warmup_epochs": 1,
        "loss": "ce+dice",
        "amp": "auto",
        "patience": 10,
    },
    "upernet": {
        "model": "upernet",
        "encoder": "tu-convnext_tiny",
        "encoder_weights": "auto",
        "img_size": None,
        "augment": "strong",
        "epochs": 40,
        "batch_size": 8,
        "optimizer": "adamw",
        "lr": 0.0002,
        "encoder_lr": 0.0001,
        "weight_decay": 0.0001,
        "scheduler": "cosine",
        "warmup_epochs": 1,
        "loss": "ce+dice",
        "amp": "auto",
        "patience": 10,
        "ema": True,
    },
}


FAMILIES = sorted(OLD_FAMILY_CONFIGS)
# families added after the redesign (transformers): their overlays start from whole pretrained models
NEW_FAMILIES = ["hf_segformer", "hf_upernet", "mask2former", "maskformer"]
# instance segmentation, trained on the annotation file's instances with its own loss
INSTANCE_FAMILIES = ["maskrcnn"]


def test_every_family_has_an_overlay_and_nothing_else_is_in_the_folder():
    names = {p.stem for p in CONFIGS.glob("*.yaml")}
    families = set(FAMILIES) | set(NEW_FAMILIES) | set(INSTANCE_FAMILIES)
    assert names == families | {"base", "search_space", "search_space_demo"}


@pytest.mark.parametrize("family", INSTANCE_FAMILIES)
def test_instance_family_overlay_trains_with_its_own_loss(family):
    cfg = build_config(TrainConfig, CONFIGS / f"{family}.yaml")
    assert (cfg.model, cfg.encoder, cfg.loss, cfg.encoder_weights) == (family, "resnet50", "model", "auto")


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_new_family_overlays_start_from_a_whole_pretrained_model(family):
    cfg = build_config(TrainConfig, CONFIGS / f"{family}.yaml")
    assert cfg.model == family and cfg.pretrained and cfg.encoder_weights is None
    assert cfg.loss == ("model" if family.startswith("mask") else "ce+dice")
    assert all(side % 32 == 0 for side in cfg.img_size)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_config_resolves_exactly_as_before(family):
    path = f"pipeline/configs/{family}.yaml"
    cfg = build_config(TrainConfig, CONFIGS / f"{family}.yaml")
    assert cfg == build_config(TrainConfig, overrides=OLD_FAMILY_CONFIGS[family]), path
    for key, value in OLD_FAMILY_CONFIGS[family].items():
        assert getattr(cfg, key) == value, (path, key)


@pytest.mark.parametrize("family", FAMILIES + NEW_FAMILIES + INSTANCE_FAMILIES)
def test_family_overlay_holds_only_what_differs_from_base(family):
    raw = yaml.safe_load((CONFIGS / f"{family}.yaml").read_text())
    assert raw.pop("base") == "base.yaml"
    assert raw["model"] == family
    shared = layered_mapping(CONFIGS / "base.yaml")
    resolved = build_config(TrainConfig, overrides=shared)
    redundant = [
        k
        for k, v in raw.items()
        if k in shared and getattr(build_config(TrainConfig, overrides={k: v}), k) == getattr(resolved, k)
    ]
    assert not redundant, f"{family}.yaml repeats base.yaml: {redundant}"


def test_stage_args_are_checked_against_the_stage_config_before_a_process_starts():
    from pipeline.core.config import format_value, stage_args
    from pipeline.engine.train_config import TrainConfig
    from pipeline.inference.ensemble_config import EnsembleConfig
    from pipeline.planning.processes import command

    args = stage_args(
        TrainConfig,
        {"img_size": [192, 128], "encoder_weights": None, "progress": False, "encoder_lr": 3e-4, "fold": 0},
    )
    assert args == ["img_size=[192,128]", "encoder_weights=null", "progress=false", "encoder_lr=0.0003", "fold=0"]
    assert format_value({"b": [1, 2], "a": 1}) == '{"a": 1, "b": [1, 2]}' and format_value(Path("x/y")) == "x/y"
    with pytest.raises(ConfigError, match=r"pipeline\.train: unknown key\(s\) epoch for TrainConfig"):
        command("pipeline.train", TrainConfig, {"epoch": 3})
    with pytest.raises(ConfigError, match=r"pipeline\.ensemble: postprocess: unknown 'nope'"):
        command("pipeline.ensemble", EnsembleConfig, {"runs": "runs/a", "postprocess": "nope"})
    recipe = Path(__file__).resolve().parents[1] / "pipeline" / "configs" / "recipes" / "budget.yaml"
    line = command("pipeline.train", TrainConfig, {"epochs": 4}, recipe)
    assert line == ["pipeline.train", "--only-config", "--config", str(recipe), "epochs=4"]
