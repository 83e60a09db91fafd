"""Loading weights into registry models: whole-model or encoder-only state dicts from a local
file (``.pt``/``.pth``/``.bin``/``.safetensors``, this pipeline's checkpoints included).

:func:`read_weights_file` is the one reader of weight files, and it reads them as data:
``.safetensors`` as such, the torch formats with ``weights_only=True`` (see
:mod:`pipeline.core.torch_files`); a file that needs full unpickling is refused unless the user
names it in ``trust_pickle=``."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.core.errors import PipelineError
from pipeline.core.torch_files import load_torch_file

log = logging.getLogger(__name__)


@dataclasses.dataclass
class LoadReport:
    """What ``load_weights`` did: ``kind`` is "whole model" or "encoder only"."""

    source: str
    kind: str
    loaded: int
    missing: list[str]
    unexpected: list[str]
    mismatched: list[str]


_STRIP_ALWAYS = ("module.", "_orig_mod.")
_SOURCE_PREFIXES = ("", "model.", "net.", "encoder.", "backbone.", "features.", "model.encoder.", "model.backbone.")


def read_weights_file(path: str | Path, trust_pickle: Iterable[str] = ()) -> Any:
    """The content of a weights file, loaded as data: ``.safetensors`` first; ``.pt``/``.pth``/``.bin``
    with ``weights_only=True`` (this pipeline's earlier checkpoints through the allowlist of the
    types they hold).  A file that needs full unpickling is refused, naming the file and the opt-in,
    unless ``trust_pickle`` names it."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (OSError, RuntimeError, ValueError) as exc:
            raise PipelineError(f"{path}: not a readable safetensors file: {exc}") from exc
    return load_torch_file(path, legacy=True, trust_pickle=trust_pickle)


def _tensors_of(obj: Any) -> dict[str, torch.Tensor] | None:
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, Mapping):
        tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    return None


def _extract_state_dict(obj: Any, source: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict", "model_state_dict", "net"):
            if key in obj:
                tensors = _tensors_of(obj[key])
                if tensors:
                    return tensors
    tensors = _tensors_of(obj)
    if tensors:
        return tensors
    raise PipelineError(
        f"{source}: holds no state dict (expected a mapping of parameter names to tensors, "
        f"or one under 'model' / 'state_dict')"
    )


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _STRIP_ALWAYS:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


def _short(keys: list[str], n: int = 8) -> str:
    head = ", ".join(keys[:n])
    return head + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def load_state_dict_into(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "state dict"
) -> LoadReport:
    """Load a whole-model or encoder-only state dict into a registry model.

    Keys may carry ``module.`` / ``_orig_mod.`` prefixes, come from the bare smp or
    torchvision network, from the encoder alone, or from a plain timm / torchvision
    classification backbone; the key mapping that matches most tensors wins.  Tensors
    whose shape differs (e.g. a head for another class count) are skipped with a warning.
    Raises ``PipelineError`` naming ``source`` when the file matches neither layout.
    """
    target = model.state_dict()
    enc_prefix = f"{model.encoder_path}."  # where its backend put the encoder
    target_prefixes = ("", "net.", enc_prefix, enc_prefix + "model.")
    cleaned = {_strip(k): v for k, v in state_dict.items()}
    best: tuple[int, dict[str, torch.Tensor], list[str]] | None = None
    for sp in _SOURCE_PREFIXES:
        kept = {k[len(sp) :]: v for k, v in cleaned.items() if k.startswith(sp)}
        dropped = [k for k in cleaned if not k.startswith(sp)]
        for tp in target_prefixes:
            mapped = {tp + k: v for k, v in kept.items()}
            score = sum(1 for k, v in mapped.items() if k in target and target[k].shape == v.shape)
            if best is None or score > best[0]:
                best = (score, mapped, dropped)
    assert best is not None
    score, mapped, dropped = best
    matched = {k: v for k, v in mapped.items() if k in target and target[k].shape == v.shape}
    mismatched = [
        f"{k} {tuple(v.shape)} (model {tuple(target[k].shape)})"
        for k, v in mapped.items()
        if k in target and target[k].shape != v.shape
    ]
    unexpected = dropped + [k for k in mapped if k not in target]
    enc_keys = [k for k in target if k.startswith(enc_prefix)]
    dec_keys = [k for k in target if not k.startswith(enc_prefix)]
    enc_cover = sum(k in matched for k in enc_keys) / max(len(enc_keys), 1)
    if not cleaned or score < 0.5 * len(cleaned) or enc_cover < 0.5:
        raise PipelineError(
            f"{source}: matches neither the whole model nor its encoder ({model.arch} / "
            f"{model.encoder_name}, {model.num_classes} classes): {score} of {len(cleaned)} tensors fit; "
            f"file keys: {_short(list(cleaned), 5)}; model keys: {_short(list(target), 5)}"
        )
    whole = sum(k in matched for k in dec_keys) / max(len(dec_keys), 1) > 0.5
    kind = "whole model" if whole else "encoder only"
    missing = [k for k in (target if whole else enc_keys) if k not in matched]
    merged = dict(target)
    merged.update(matched)
    model.load_state_dict(merged)
    log.info("%s: loaded %d of %d tensors (%s)", source, len(matched), len(target), kind)
    if missing:
        log.warning("%s: %d missing key(s) left at their initial values: %s", source, len(missing), _short(missing))
    if unexpected:  # an encoder-only file often carries its classification head: expected
        level = logging.INFO if kind == "encoder only" else logging.WARNING
        log.log(level, "%s: %d unexpected key(s) ignored: %s", source, len(unexpected), _short(unexpected))
    if mismatched:
        log.warning("%s: %d key(s) with another shape skipped: %s", source, len(mismatched), _short(mismatched))
    return LoadReport(str(source), kind, len(matched), missing, unexpected, mismatched)


def read_state_dict(path: str | Path, trust_pickle: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """The state dict of a local weights file (a bare one, or one under ``model`` / ``state_dict``),
    read by :func:`read_weights_file`."""
    path = Path(path)
    return _extract_state_dict(read_weights_file(path, trust_pickle), str(path))


def load_weights(model: nn.Module, path: str | Path, trust_pickle: Iterable[str] = ()) -> LoadReport:
    """Load a local weights file (``.pt``/``.pth``/``.ckpt`` or ``.safetensors``) into ``model``.

    Accepts a state dict, a pipeline checkpoint (``{'model': state_dict, ...}``) or
    ``{'state_dict': ...}``, for the whole model or for its encoder only.
    """
    return load_state_dict_into(model, read_state_dict(path, trust_pickle), str(path))
