"""Parameter groups: encoder and decoder learning rates, no weight decay on biases and norms."""

from __future__ import annotations

import re
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


_STAGE = re.compile(r"(?:^|\.)(?:layer|layers|stages|stage|blocks|block|features)[._]?(\d+)(?=\.|$)")
_TOP = re.compile(r"^(?:model\.)?(?:norm|fc_norm|head_norm|final_norm)\b")


def encoder_depths(encoder: nn.Module) -> dict[int, int]:
    """Depth of each encoder parameter (by ``id``): 0 for the stem and embeddings, then the stage
    rank 1..n (ResNet ``layerN``, ConvNeXt ``stages.N``, Swin ``layers.N``, ViT/BEiT ``blocks.N``,
    MobileNet/EfficientNet ``features.N``/``blocks.N``); final norms get the deepest depth."""
    named = [(n, p) for n, p in encoder.named_parameters() if p.requires_grad]
    stage_of = {}
    for name, param in named:
        match = _STAGE.search(name)
        stage_of[id(param)] = int(match.group(1)) if match else None
    # stage numbers (ResNet's layer1..4 or ConvNeXt's stages.0..3 alike) ranked 1..n; the stem is 0
    rank = {s: i + 1 for i, s in enumerate(sorted({v for v in stage_of.values() if v is not None}))}
    deepest = len(rank)
    depths: dict[int, int] = {}
    for name, param in named:
        stage = stage_of[id(param)]
        depths[id(param)] = rank[stage] if stage is not None else (deepest if _TOP.search(name) else 0)
    return depths


def _encoder_groups(
    model: nn.Module, encoder_lr: float, weight_decay: float, layer_decay: float, no_decay: set[int]
) -> list[dict[str, Any]]:
    """Encoder groups with lr = encoder_lr * layer_decay ** (deepest - depth)."""
    depths = encoder_depths(_encoder_of(model))
    deepest = max(depths.values(), default=0)
    by_depth: dict[int, list[nn.Parameter]] = {}
    for p in encoder_parameters(model):
        by_depth.setdefault(depths.get(id(p), 0), []).append(p)
    groups = []
    for depth in sorted(by_depth):
        lr = float(encoder_lr) * float(layer_decay) ** (deepest - depth)
        for decay, chosen in _iter_split(by_depth[depth], no_decay):
            if chosen:
                groups.append(
                    {
                        "name": f"encoder_depth{depth}" + ("" if decay else "_no_decay"),
                        "params": chosen,
                        "lr": lr,
                        "weight_decay": float(weight_decay) if decay else 0.0,
                    }
                )
    return groups


def param_groups(
    model: nn.Module,
    encoder_lr: float,
    decoder_lr: float,
    weight_decay: float = 0.0,
    layer_decay: float | None = None,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups: encoder and decoder learning rates, no decay on biases and norms.

    Returns up to four groups named ``encoder``, ``encoder_no_decay``, ``decoder``,
    ``decoder_no_decay`` (empty ones left out); each trainable parameter is in exactly one.
    With ``layer_decay`` (e.g. 0.8) the encoder is split by depth (:func:`encoder_depths`) and
    a parameter at depth d gets ``encoder_lr * layer_decay ** (deepest - d)``.
    """
    no_decay = _no_decay_ids(_unwrap(model))
    groups: list[dict[str, Any]] = []
    parts = [("decoder", decoder_parameters(model), decoder_lr)]
    if layer_decay is None:
        parts.insert(0, ("encoder", encoder_parameters(model), encoder_lr))
    else:
        groups += _encoder_groups(model, encoder_lr, weight_decay, layer_decay, no_decay)
    for part, params, lr in parts:
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
