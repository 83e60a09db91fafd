"""Layered, type-checked configuration.

Every stage describes its settings as a flat dataclass.  A resolved config is built in
three layers: the dataclass defaults, then an optional YAML file, then ``key=value``
overrides from the command line.  Values are coerced to the declared field types and
unknown keys are rejected with the list of known ones.

A YAML file may name a parent with a top-level ``base: <file>`` (relative to its own
folder); the parent is layered first, so the YAML layer is the chain root -> ... -> file.
:func:`layer` applies named mappings in order and is what :func:`build_config` and the
tuner both use.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import io
import logging
import re
import shlex
import sys
import tokenize
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar, Union

import yaml

from pipeline import __version__
from pipeline.core.errors import ConfigError, PipelineError
from pipeline.core.io import atomic_write_text, read_yaml, setup_logging

log = logging.getLogger(__name__)

T = TypeVar("T")

# one layer of a config: (source named in errors, mapping of key: value)
Layer = tuple[str, Mapping[str, Any]]

# top-level YAML key naming the parent file of an overlay (not a config key)
BASE_KEY = "base"


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _to_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, str)) and str(value).strip().lower() in _TRUE | _FALSE:
        return str(value).strip().lower() in _TRUE
    raise ConfigError(f"{key}: expected true/false, got {value!r}")


def _to_int(value: Any, key: str) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            try:
                as_float = float(value)
            except ValueError:
                as_float = float("nan")
            if as_float.is_integer():
                return int(as_float)
    raise ConfigError(f"{key}: expected an integer, got {value!r}")


def _to_float(value: Any, key: str) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise ConfigError(f"{key}: expected a number, got {value!r}")


def _to_str(value: Any, key: str) -> str:
    if value is None:
        raise ConfigError(f"{key}: a value is required (null is not allowed)")
    if isinstance(value, (dict, list)):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return str(value)


_SCALARS: dict[Any, Callable[[Any, str], Any]] = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` to the annotated type ``tp`` or raise ConfigError."""
    if tp is Any:
        if isinstance(value, str):
            try:
                return yaml.safe_load(value)
            except yaml.YAMLError:
                return value
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            if type(None) in args:
                return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} does not fit {tp}")
    if origin in (list, tuple, Sequence):
        if isinstance(value, str):
            parsed = (
                yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v != ""]
            )
            value = parsed
        if not isinstance(value, (list, tuple)):
            value = [value]
        inner = args[0] if args else Any
        items = [_coerce(v, inner, key) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp in _SCALARS:
        return _SCALARS[tp](value, key)
    return value


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def known_keys(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def suggestions(key: str, known: Sequence[str]) -> list[str]:
    """The known names closest to a mistyped ``key`` (best first; none when nothing is close)."""
    return difflib.get_close_matches(key, list(known), n=3, cutoff=0.6)


def unknown_keys_message(unknown: Sequence[str], known: Sequence[str], owner: str) -> str:
    """``epoch (did you mean epochs?)`` for each unknown key, then the known keys."""
    parts = []
    for key in unknown:
        close = suggestions(key, known)
        parts.append(f"{key} (did you mean {' or '.join(close)}?)" if close else key)
    return f"unknown key(s) {', '.join(parts)} for {owner}; known keys: {', '.join(sorted(known))}"


def apply_mapping(cfg: T, mapping: dict[str, Any], source: str) -> T:
    """Return a copy of ``cfg`` with the keys of ``mapping`` set (type-checked)."""
    types_ = _field_types(type(cfg))
    unknown = sorted(set(mapping) - set(types_))
    if unknown:
        raise ConfigError(f"{source}: {unknown_keys_message(unknown, list(types_), type(cfg).__name__)}")
    values = {k: _coerce(v, types_[k], f"{source}: {k}") for k, v in mapping.items()}
    return dataclasses.replace(cfg, **values)


def named_file(name_or_path: str | Path, folder: Path, what: str) -> Path:
    """A YAML file given by its path, or by its name as ``<folder>/<name>.yaml``; the ConfigError of a
    missing one lists the names ``folder`` knows."""
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") or path.is_file()):
        path = folder / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in folder.glob("*.yaml")))
        raise ConfigError(f"{what} {str(name_or_path)!r}: no file {path}; known: {known}")
    return path


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML file that must hold a mapping; errors name the file."""
    data = read_yaml(path, "config file not found", ConfigError)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of key: value at the top level, got {type(data).__name__}")
    return data


def parse_overrides(items: Sequence[str]) -> dict[str, str]:
    """Turn ``["lr=1e-3", "epochs=2"]`` into a mapping of raw strings.

    The strings are converted to each field's declared type later (``_coerce``), so a
    file name such as ``007.json`` stays a string while ``epochs=2`` becomes an int.
    """
    out: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        out[key] = raw
    return out


_KEY_START = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")


def split_args(text: str) -> list[str]:
    """One ``ARGS`` string -> ``key=value`` items.

    Split shell-style (quotes keep spaces), then every word that does not start a new ``key=``
    is joined back onto the item before it with a space, so YAML values with spaces survive:
    ``loss_options={classes: present} lr=1e-4`` gives two items.
    """
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise ConfigError(f"ARGS {text!r}: {exc}") from exc
    items: list[str] = []
    for word in words:
        if items and not _KEY_START.match(word):
            items[-1] = f"{items[-1]} {word}"
        else:
            items.append(word)
    return items


def yaml_layers(config_file: str | Path | None) -> list[Layer]:
    """The YAML layers of ``config_file``: its ``base:`` chain, root first, the file itself last.

    Each layer is ``(file name, mapping without the base key)``; a parent's path is relative to
    the folder of the file naming it.  A missing parent names both files, a cycle names every file
    in it.  ``None`` or ``""`` gives no layers.
    """
    if not config_file:
        return []
    layers: list[Layer] = []
    seen: list[tuple[Path, str]] = []  # (resolved path, name) of the files read, child first
    path, name = Path(config_file), str(config_file)
    while True:
        seen.append((path.resolve(), name))
        data = read_yaml_mapping(path)
        parent = data.pop(BASE_KEY, None)
        layers.append((name, data))
        if parent is None:
            return layers[::-1]
        if not isinstance(parent, str) or not parent.strip():
            raise ConfigError(
                f"{name}: {BASE_KEY}: expected a YAML file name relative to {path.parent}, got {parent!r}"
            )
        parent_path = path.parent / parent
        parent_name = str(parent_path)
        if parent_path.resolve() in [p for p, _ in seen]:
            chain = " -> ".join([n for _, n in seen] + [parent_name])
            raise ConfigError(f"{name}: {BASE_KEY}: {parent} makes a cycle of config files: {chain}")
        if not parent_path.is_file():
            raise ConfigError(f"{name}: {BASE_KEY}: parent config file {parent_name} not found")
        path, name = parent_path, parent_name


def layered_mapping(config_file: str | Path | None) -> dict[str, Any]:
    """The keys of ``config_file`` with its ``base:`` chain resolved (later files override earlier)."""
    merged: dict[str, Any] = {}
    for _, mapping in yaml_layers(config_file):
        merged.update(mapping)
    return merged


def override_layer(overrides: Sequence[str] | Mapping[str, Any], source: str = "command line") -> list[Layer]:
    """``key=value`` strings (or a mapping) as a layer named ``source``; no layer when empty."""
    if not overrides:
        return []
    mapping = dict(overrides) if isinstance(overrides, Mapping) else parse_overrides(overrides)
    return [(source, mapping)]


def layer_origins(cls: type, layers: Sequence[Layer]) -> dict[str, str]:
    """For each key, the source of the last layer that sets it (``defaults`` when none does)."""
    origins = dict.fromkeys(known_keys(cls), "defaults")
    for source, mapping in layers:
        for key in mapping or {}:
            if key in origins:
                origins[key] = source
    return origins


def layer(cfg: T, *layers: Layer) -> T:
    """Apply ``(source, mapping)`` layers in order (a later layer wins); errors name the layer's source.

    The one layering step of every stage (:func:`build_config`) and of the tuner's trial configs.
    Empty layers are skipped; nothing is validated here.
    """
    for source, mapping in layers:
        if mapping:
            cfg = apply_mapping(cfg, dict(mapping), source)
    return cfg


def build_config(
    cls: type[T],
    config_file: str | Path | None = None,
    overrides: Sequence[str] | dict[str, Any] = (),
    base: T | None = None,
) -> T:
    """Defaults (or ``base``) -> YAML file (its ``base:`` chain first) -> overrides, then ``validate()``."""
    cfg = layer(base if base is not None else cls(), *yaml_layers(config_file), *override_layer(overrides))
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        validate()
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return {k: plain(v) for k, v in dataclasses.asdict(cfg).items()}


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML (atomically)."""
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    return atomic_write_text(path, text)


def config_from_dict(cls: type[T], data: dict[str, Any], source: str = "mapping") -> T:
    return apply_mapping(cls(), data, source)


# ----------------------------------------------------------------------------- the command line
def field_comments(cls: type) -> dict[str, str]:
    """Each field's trailing comment in the dataclass source (``name: type = default  # comment``),
    read with :mod:`tokenize`; fields without one are left out (comment-only lines head sections)."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass)
            tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
        except (OSError, TypeError, tokenize.TokenError, IndentationError, SyntaxError):
            continue
        names = {f.name for f in dataclasses.fields(klass)}
        lines = source.splitlines()
        for tok in tokens:
            if tok.type != tokenize.COMMENT:
                continue
            m = re.match(r"\s+([A-Za-z_]\w*)\s*:", lines[tok.start[0] - 1])
            if m and m.group(1) in names:
                out[m.group(1)] = tok.string.lstrip("#").strip()
    return out


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) if isinstance(tp, type) else str(tp).replace("typing.", "")


def describe_keys(cls: type) -> str:
    """Every key of ``cls`` with its type, default and the comment from code (``--help``)."""
    types_ = _field_types(cls)
    comments = field_comments(cls)
    defaults = to_dict(cls())
    lines = []
    for name, tp in types_.items():
        default = yaml.safe_dump(defaults[name], default_flow_style=True, width=10_000).strip()
        default = default.removesuffix("\n...").removesuffix("...").strip()
        lines.append(f"  {name} ({_type_name(tp)}, default {default})")
        if name in comments:
            lines.append(f"      {comments[name]}")
    return "\n".join(lines)


def format_resolved(cfg: Any, origins: Mapping[str, str]) -> str:
    """The resolved config as YAML, each key followed by the layer its value came from."""
    lines = []
    for key, value in to_dict(cfg).items():
        text = yaml.safe_dump({key: value}, default_flow_style=True, width=10_000, sort_keys=False).strip()
        text = text.removeprefix("{").removesuffix("}")
        lines.append(f"{text}  # {origins.get(key, 'defaults')}")
    return "\n".join(lines)


# compose(config_file, overrides) -> the layers of a stage's config, defaults excluded
Compose = Callable[[str | None, dict[str, str]], list[Layer]]


def default_compose(config_file: str | None, overrides: dict[str, str]) -> list[Layer]:
    """Defaults < the YAML file (its ``base:`` chain first) < ``key=value``."""
    return [*yaml_layers(config_file), *override_layer(overrides)]


def stage_main(
    cls: type[T],
    run: Callable[[T], Any],
    argv: Sequence[str] | None,
    description: str,
    default_config: str | Path | None = None,
    compose: Compose | None = None,
) -> int:
    """The thin ``main()`` shared by all stages: parse, build config, call ``run``.

    ``argv`` holds ``key=value`` overrides, ``--args "k=v k2=v2"`` (one string, split by
    :func:`split_args`; what ``make ... ARGS=`` passes), optionally ``--config FILE``, and
    ``--print-config`` (print the resolved config with the layer of each value, then exit).
    ``compose`` gives the layers (default :func:`default_compose`; ``--only-config`` falls back to
    it).  ``--help`` lists every key with its type, default and comment.  User-facing errors (bad
    input, bad config) are printed as one line and give exit code 2.
    """
    parser = argparse.ArgumentParser(
        description=description,
        epilog="keys (key=value):\n" + describe_keys(cls),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", default=None, help="YAML file layered over the defaults")
    parser.add_argument("--args", action="append", default=[], help="one string of key=value items (make's ARGS)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and its layers, exit")
    if compose is not None:
        parser.add_argument(
            "--only-config",
            action="store_true",
            help="layer only the defaults, --config and key=value (not the stage's own layers)",
        )
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--version", action="version", version=f"%(prog)s (pipeline {__version__})")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args = parser.parse_intermixed_args(list(sys.argv[1:] if argv is None else argv))
    setup_logging(args.log_level)
    try:
        items = [*args.overrides, *(item for text in args.args for item in split_args(text))]
        chosen = default_compose if compose is None or args.only_config else compose
        layers = chosen(args.config or default_config, parse_overrides(items))
        cfg = layer(cls(), *layers)
        if args.print_config:
            print(format_resolved(cfg, layer_origins(cls, layers)))
            return 0
        validate = getattr(cfg, "validate", None)
        if callable(validate):
            validate()
        run(cfg)
    except PipelineError as exc:
        log.error("%s", exc)
        return 2
    return 0


def format_value(value: Any) -> str:
    """One value as a ``key=value`` item writes it (what :func:`override_layer` reads back):
    booleans and null in YAML's words, lists as ``[a,b]``, mappings as JSON, numbers as ``:g``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        import json

        return json.dumps(value, sort_keys=True)
    return str(value)


def stage_args(
    cls: type, settings: Mapping[str, Any], config_file: str | Path | None = None, where: str = ""
) -> list[str]:
    """``key=value`` items of ``settings`` for a stage whose config is ``cls``, checked before any
    process starts: an unknown key, or a value the stage would refuse (its ``validate()``, over
    ``config_file`` when the stage layers one), raises ConfigError naming the stage and the key."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(settings) - known)
    stage = where or cls.__name__
    if unknown:
        raise ConfigError(
            f"{stage}: unknown key(s) {', '.join(unknown)} for {cls.__name__}; known: {', '.join(sorted(known))}"
        )
    args = [f"{k}={format_value(v)}" for k, v in settings.items()]
    try:
        build_config(cls, config_file, overrides=args)
    except ConfigError as exc:
        raise ConfigError(f"{stage}: {exc}") from exc
    return args
