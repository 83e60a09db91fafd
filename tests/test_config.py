"""Layered config: defaults -> YAML -> key=value, type coercion, unknown keys, round trip."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from pipeline.core.config import ConfigError, build_config, parse_overrides, save_config


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
