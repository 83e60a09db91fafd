"""Parameter groups: encoder and decoder learning rates, no weight decay on biases and norms."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch import nn

from pipeline.core.errors import PipelineError


def _unwrap(model: nn.Module) -> nn.Module:
    while True:
        inner = getattr(model, "module", None)  # DataParallel, DDP, AveragedModel
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)  # torch.compile
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _encoder_of(model: nn.Module) -> nn.Module:
    model = _unwrap(model)
    for attr in ("encoder", "backbone"):
        enc = getattr(model, attr, None)
        if isinstance(enc, nn.Module):
            return enc
    net = getattr(model, "net", None)
    if isinstance(net, nn.Module) and net is not model:
        return _encoder_of(net)
    raise PipelineError(f"{type(model).__name__} has no encoder or backbone submodule; cannot split its parameters")


def encoder_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters of the encoder (smp ``encoder``, torchvision ``backbone``)."""
    return [p for p in _encoder_of(model).parameters() if p.requires_grad]


def decoder_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters outside the encoder (decoder and heads)."""
    enc_ids = {id(p) for p in _encoder_of(model).parameters()}
    return [p for p in _unwrap(model).parameters() if p.requires_grad and id(p) not in enc_ids]


_NORM_TYPES: tuple[type, ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def _no_decay_ids(model: nn.Module) -> set[int]:
    """Biases, norm-layer parameters, 1-d parameters and those a timm model lists as no-decay."""
    ids: set[int] = set()
    for module in model.modules():
        is_norm = isinstance(module, _NORM_TYPES) or type(module).__name__.lower().endswith("norm")
        for p in module.parameters(recurse=False):
            if is_norm or p.ndim <= 1:
                ids.add(id(p))
        no_wd = getattr(module, "no_weight_decay", None)
        if callable(no_wd):
            names = set(no_wd())
            for pname, p in module.named_parameters():
                if pname in names:
                    ids.add(id(p))
    return ids


def _iter_split(params: list[nn.Parameter], no_decay: set[int]) -> Iterator[tuple[bool, list[nn.Parameter]]]:
    yield True, [p for p in params if id(p) not in no_decay]
    yield False, [p for p in params if id(p) in no_decay]


def param_groups(
    model: nn.Module,
    encoder_lr: float,
    decoder_lr: float,
    weight_decay: float = 0.0,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups: encoder and decoder learning rates, no decay on biases and norms.

    Returns up to four groups named ``encoder``, ``encoder_no_decay``, ``decoder``,
    ``decoder_no_decay`` (empty ones left out); each trainable parameter is in exactly one.
    """
    no_decay = _no_decay_ids(_unwrap(model))
    groups: list[dict[str, Any]] = []
    for part, params, lr in (
        ("encoder", encoder_parameters(model), encoder_lr),
        ("decoder", decoder_parameters(model), decoder_lr),
    ):
        for decay, chosen in _iter_split(params, no_decay):
            if chosen:
                groups.append(
                    {
                        "name": part if decay else f"{part}_no_decay",
                        "params": chosen,
                        "lr": float(lr),
                        "weight_decay": float(weight_decay) if decay else 0.0,
                    }
                )
    return groups
