"""Search spaces: a YAML file of training keys and how to sample each (categorical, float, int,
fixed, with conditions), checked against the training config before any trial runs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from pipeline.core.config import ConfigError, apply_mapping, read_yaml_mapping
from pipeline.core.errors import PipelineError

log = logging.getLogger(__name__)

# training settings every trial starts from (before base_config): per-trial OOF maps and plots are not needed
TRIAL_DEFAULTS: dict[str, Any] = {"save_oof": False, "plot": False}
# keys the tuner sets for each trial; a search space may not sample them
TUNER_KEYS = ("experiment", "runs_dir", "fold", "resume")


SPEC_TYPES = ("categorical", "float", "int", "fixed")


LOSS_WEIGHT = re.compile(r"loss_(?P<term>[a-z_]+?)_weight")


_MAX_COMBINATIONS = 50_000


class _Any:
    """Placeholder for the value of a float/int parameter while walking the space."""

    def __repr__(self) -> str:
        return "<sampled>"


_ANY = _Any()


def _encode(value: Any) -> Any:
    """Optuna categorical choices must be scalars: lists and mappings travel as JSON text."""
    return json.dumps(value) if isinstance(value, (list, tuple, dict)) else value


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of the search space (a TrainConfig key or a loss weight)."""

    key: str
    name: str  # Optuna parameter name (``key`` or ``key[cond]`` for a conditional variant)
    kind: str  # categorical | float | int | fixed
    choices: tuple[Any, ...] = ()
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    value: Any = None
    when: tuple[tuple[str, tuple[Any, ...]], ...] = ()

    def applies(self, values: Mapping[str, Any]) -> bool:
        return all(k in values and values[k] in allowed for k, allowed in self.when)

    def finite_values(self) -> list[Any]:
        """Every value this parameter can take, or ``[_ANY]`` for a float/int range."""
        if self.kind == "categorical":
            return list(self.choices)
        if self.kind == "fixed":
            return [self.value]
        return [_ANY]

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.kind == "categorical":
            encoded = [_encode(c) for c in self.choices]
            picked = trial.suggest_categorical(self.name, encoded)
            return self.choices[encoded.index(picked)]
        if self.kind == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return self.value


@dataclass
class SearchSpace:
    path: str
    params: list[ParamSpec]

    @property
    def keys(self) -> list[str]:
        return list(dict.fromkeys(p.key for p in self.params))

    @property
    def has_categorical(self) -> bool:
        return any(p.kind == "categorical" or p.when for p in self.params)

    def sample(self, trial: optuna.Trial) -> dict[str, Any]:
        """Sampled and fixed values of the parameters that apply to this trial, in file order."""
        values: dict[str, Any] = {}
        for p in self.params:
            if p.applies(values):
                if p.key in values:
                    raise ConfigError(f"{self.path}: {p.key}: two variants apply to the same trial")
                values[p.key] = p.suggest(trial)
        return values


def _train_config_cls():
    from pipeline.engine.train_config import TrainConfig

    return TrainConfig


def _check_value(path: str, key: str, value: Any) -> Any:
    """Coerce ``value`` as TrainConfig would and validate it; errors name the file and key."""
    m = LOSS_WEIGHT.fullmatch(key)
    if m:
        if not _is_number(value) or value < 0 or not math.isfinite(value):
            raise ConfigError(f"{path}: {key}: a loss weight must be a number >= 0, got {value!r}")
        return float(value)
    cls = _train_config_cls()
    cfg = apply_mapping(cls(), {key: value}, path)
    try:
        cfg.validate()
    except PipelineError as exc:
        raise ConfigError(f"{path}: {key}={value!r}: {exc}") from exc
    return getattr(cfg, key)


def _parse_when(
    path: str, key: str, raw: Any, defined: Mapping[str, list[ParamSpec]]
) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{path}: {key}: when must be a mapping such as {{model: unet}}, got {raw!r}")
    out = []
    for ref, allowed in raw.items():
        ref = str(ref)
        if ref not in defined:
            above = ", ".join(defined) or "none"
            raise ConfigError(
                f"{path}: {key}: when refers to {ref!r}, which is not a parameter defined above it (defined: {above})"
            )
        variants = defined[ref]
        if any(v.kind not in ("categorical", "fixed") for v in variants):
            raise ConfigError(
                f"{path}: {key}: when may only refer to categorical or fixed parameters; {ref!r} is {variants[0].kind}"
            )
        allowed_t = tuple(allowed) if isinstance(allowed, list) else (allowed,)
        if not allowed_t:
            raise ConfigError(f"{path}: {key}: when {ref}: an empty list of values")
        possible = [c for v in variants for c in v.finite_values()]
        for a in allowed_t:
            if a not in possible:
                raise ConfigError(f"{path}: {key}: when {ref}={a!r} can never hold; {ref} takes one of {possible}")
        out.append((ref, allowed_t))
    return tuple(out)


def _parse_spec(path: str, key: str, raw: Any, defined: Mapping[str, list[ParamSpec]]) -> ParamSpec:
    if not isinstance(raw, dict):
        return ParamSpec(key, key, "fixed", value=_check_value(path, key, raw))
    if "type" not in raw:
        raise ConfigError(
            f"{path}: {key}: a mapping needs type: one of {', '.join(SPEC_TYPES)} (for a fixed value write "
            "the value itself)"
        )
    kind = raw["type"]
    if kind not in SPEC_TYPES:
        raise ConfigError(f"{path}: {key}: unknown type {kind!r}; known: {', '.join(SPEC_TYPES)}")
    allowed_fields = {
        "categorical": {"choices"},
        "float": {"low", "high", "log", "step"},
        "int": {"low", "high", "log", "step"},
        "fixed": {"value"},
    }[kind] | {"type", "when"}
    unknown = sorted(set(raw) - allowed_fields)
    if unknown:
        raise ConfigError(
            f"{path}: {key}: unknown field(s) {', '.join(unknown)} for type {kind}; allowed: "
            f"{', '.join(sorted(allowed_fields))}"
        )
    when = _parse_when(path, key, raw["when"], defined) if "when" in raw else ()
    if kind == "fixed":
        if "value" not in raw:
            raise ConfigError(f"{path}: {key}: type fixed needs value:")
        return ParamSpec(key, key, kind, value=_check_value(path, key, raw["value"]), when=when)
    if kind == "categorical":
        choices = raw.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{path}: {key}: categorical needs a non-empty list of choices, got {choices!r}")
        checked = [_check_value(path, key, c) for c in choices]
        encoded = [json.dumps(_encode(c), sort_keys=True) for c in checked]
        if len(set(encoded)) != len(encoded):
            raise ConfigError(f"{path}: {key}: repeated choices in {choices}")
        return ParamSpec(key, key, kind, choices=tuple(checked), when=when)
    for bound in ("low", "high"):
        if bound not in raw:
            raise ConfigError(f"{path}: {key}: type {kind} needs low: and high:")
        if not _is_number(raw[bound]) or (kind == "int" and not float(raw[bound]).is_integer()):
            raise ConfigError(
                f"{path}: {key}: {bound} must be {'an integer' if kind == 'int' else 'a number'}, got {raw[bound]!r}"
            )
    low, high = raw["low"], raw["high"]
    log_scale = raw.get("log", False)
    if not isinstance(log_scale, bool):
        raise ConfigError(f"{path}: {key}: log must be true or false, got {log_scale!r}")
    if low >= high:
        raise ConfigError(f"{path}: {key}: low ({low}) must be below high ({high})")
    if log_scale and low <= 0:
        raise ConfigError(f"{path}: {key}: log: true needs low > 0, got {low}")
    step = raw.get("step")
    if step is not None:
        if not _is_number(step) or step <= 0 or (kind == "int" and not float(step).is_integer()):
            raise ConfigError(
                f"{path}: {key}: step must be a positive {'integer' if kind == 'int' else 'number'}, got {step!r}"
            )
        if step > high - low:
            raise ConfigError(f"{path}: {key}: step {step} is larger than high - low ({high - low})")
        if log_scale and (kind == "float" or step != 1):
            raise ConfigError(
                f"{path}: {key}: log: true cannot be combined with "
                f"{'step' if kind == 'float' else 'a step other than 1'}"
            )
    for bound in (low, high):
        _check_value(path, key, int(bound) if kind == "int" else float(bound))
    return ParamSpec(key, key, kind, low=low, high=high, step=step, log=log_scale, when=when)


def _condition_label(when: tuple[tuple[str, tuple[Any, ...]], ...]) -> str:
    return ",".join(f"{k}={'|'.join(str(v) for v in vals)}" for k, vals in when)


def _check_combination(path: str, values: Mapping[str, Any], seen: set) -> None:
    """Model/encoder names, image sizes and loss weights of one assignment of the finite parameters."""
    model = values.get("model")
    encoder = values.get("encoder")
    img_size = values.get("img_size")
    if model is not None and model is not _ANY and encoder is not _ANY:
        key = ("model", model, encoder, json.dumps(img_size) if img_size is not _ANY else "any")
        if key not in seen:
            seen.add(key)
            from pipeline import models as model_registry

            try:
                divisor = model_registry.input_divisor(model, encoder)
            except PipelineError as exc:
                raise ConfigError(f"{path}: model={model} encoder={encoder}: {exc}") from exc
            if isinstance(img_size, list):
                sides = img_size if len(img_size) == 2 else img_size * 2
                if any(int(s) % divisor for s in sides):
                    raise ConfigError(
                        f"{path}: img_size {img_size} is not a multiple of {divisor}, which model={model} "
                        f"encoder={encoder} needs"
                    )
    weights = sorted(k for k in values if LOSS_WEIGHT.fullmatch(k))
    loss = values.get("loss")
    if weights and isinstance(loss, str):
        key = ("loss", loss, tuple(weights))
        if key not in seen:
            seen.add(key)
            compose_loss(loss, {LOSS_WEIGHT.fullmatch(k).group("term"): 1.0 for k in weights}, path)


def _walk(space: SearchSpace) -> None:
    """Visit every assignment of the categorical/fixed parameters in file order: variants of one
    key must never apply together, every parameter must apply somewhere, and each assignment's
    model, encoder, image size and loss weights must fit together."""
    params = space.params
    active = [False] * len(params)
    seen: set = set()
    count = 0

    def visit(i: int, values: dict[str, Any]) -> None:
        nonlocal count
        if count > _MAX_COMBINATIONS:
            return
        if i == len(params):
            count += 1
            _check_combination(space.path, values, seen)
            return
        p = params[i]
        if not p.applies(values):
            visit(i + 1, values)
            return
        if p.key in values:
            shown = ", ".join(f"{k}={v!r}" for k, v in values.items() if v is not _ANY)
            raise ConfigError(
                f"{space.path}: {p.key}: more than one variant applies when {shown}; make their `when` "
                "conditions exclusive"
            )
        active[i] = True
        for v in p.finite_values():
            values[p.key] = v
            visit(i + 1, values)
        del values[p.key]

    visit(0, {})
    if count > _MAX_COMBINATIONS:
        log.info(
            "%s: more than %d combinations of categorical values; checked the first ones only",
            space.path,
            _MAX_COMBINATIONS,
        )
        return
    for p, was_active in zip(params, active, strict=False):
        if not was_active:
            raise ConfigError(f"{space.path}: {p.key}: its condition when {_condition_label(p.when)} never holds")


def load_space(path: str | Path) -> SearchSpace:
    """Read and strictly check a search-space YAML (format: the header of the default file)."""
    path_s = str(path)
    data = read_yaml_mapping(path)
    if not data:
        raise ConfigError(f"{path_s}: the search space defines no parameters")
    known = {f.name for f in dataclasses.fields(_train_config_cls())}
    from pipeline.models.losses import list_losses

    terms = list_losses()
    defined: dict[str, list[ParamSpec]] = {}
    params: list[ParamSpec] = []
    for raw_key, raw in data.items():
        key = str(raw_key)
        m = LOSS_WEIGHT.fullmatch(key)
        if key in TUNER_KEYS:
            raise ConfigError(f"{path_s}: {key}: set by the tuner for each trial; it cannot be searched")
        if m and m.group("term") not in terms:
            raise ConfigError(
                f"{path_s}: {key}: unknown loss term {m.group('term')!r}; loss weights are loss_<term>_weight "
                f"with term one of {', '.join(terms)}"
            )
        if key not in known and not m:
            raise ConfigError(
                f"{path_s}: unknown key {key!r}; keys are TrainConfig keys "
                f"({', '.join(sorted(known - set(TUNER_KEYS)))}) "
                f"or loss_<term>_weight"
            )
        is_variants = isinstance(raw, list) and raw and all(isinstance(r, dict) and "when" in r for r in raw)
        if isinstance(raw, list) and raw and any(isinstance(r, dict) and "when" in r for r in raw) and not is_variants:
            raise ConfigError(f"{path_s}: {key}: a list of variants needs `when` in every item")
        specs = [_parse_spec(path_s, key, r, defined) for r in (raw if is_variants else [raw])]
        if len(specs) > 1:
            specs = [dataclasses.replace(s, name=f"{key}[{_condition_label(s.when)}]") for s in specs]
        defined[key] = specs
        params.extend(specs)
    space = SearchSpace(path_s, params)
    _walk(space)
    return space


def compose_loss(loss: str, weights: Mapping[str, float], source: str) -> str:
    """``compose_loss("ce+dice", {"dice": 0.4})`` -> ``"1*ce+0.4*dice"``; other terms keep their weights."""
    from pipeline.models.losses import parse_loss_spec

    terms = parse_loss_spec(loss)
    names = [n for _, n in terms]
    for term in weights:
        if term not in names:
            raise ConfigError(
                f"{source}: loss_{term}_weight is set but loss {loss!r} has no {term} term (guard it with "
                f"when: {{loss: [...]}})"
            )
    return "+".join(f"{float(weights.get(n, c)):.6g}*{n}" for c, n in terms)
