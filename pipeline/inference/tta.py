"""Test-time augmentation: paired transforms and a model wrapper that stays a model.

A view is an ``augment(x) -> x'`` / ``deaugment(y, size) -> y`` pair: an optional
bilinear rescale followed by one element of the dihedral group D4 (flips, transposes,
90-degree rotations).  ``deaugment`` undoes the geometry and resizes the prediction back
to the input size ``(H, W)``, so ``view.deaugment(model(view.augment(x)), x.shape[-2:])``
is aligned with ``x``.

TTA sets by name (``list_tta()``):

=========  ==================================================================
none       the input as it is
hflip      identity, horizontal flip
flip       identity, horizontal flip, vertical flip
d4         the 8 dihedral views (rotations by 0/90/180/270, each also flipped)
ms         every scale of ``scales`` (default 0.75, 1.0, 1.25), each also h-flipped
=========  ==================================================================

Sets combine with ``+``: ``ms+flip`` is the product of the views of ``ms`` and ``flip``
with duplicates removed.  Scaled sizes are rounded to a multiple of the model's input
divisor.  :class:`TTAModel` averages the softmax probabilities of the views (never
logits or labels); it sends all views of one input size through the model in one call
unless ``max_batch`` caps the images per call (``auto_max_batch`` picks a cap per device).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.errors import PipelineError
from pipeline.core.registry import Registry
from pipeline.data.resize import DEFAULT_DIVISOR, scaled_size
from pipeline.models.contract import predict_probabilities

DEFAULT_SCALES: tuple[float, ...] = (0.75, 1.0, 1.25)

# D4 elements as (k, flip): x -> rot90(hflip^flip(x), k); rot90 is torch.rot90 over (H, W).
_D4_NAMES: dict[tuple[int, bool], str] = {
    (0, False): "identity",
    (0, True): "hflip",
    (2, True): "vflip",
    (2, False): "rot180",
    (1, False): "rot90",
    (3, False): "rot270",
    (1, True): "transpose",
    (3, True): "transverse",
}


def _canonical_d4() -> dict[tuple[int, bool], tuple[bool, tuple[int, ...]]]:
    """Each D4 element (k, flip) as (transpose, flip dims): x -> flip(transpose^t(x), dims).

    One (strided) transpose and at most one flip call: the fewest copies per view.
    """
    probe = torch.arange(6.0).reshape(2, 3)
    table = {}
    for k, f in _D4_NAMES:
        target = torch.rot90(probe.flip(-1) if f else probe, k, dims=(-2, -1))
        for t, dims in ((t, d) for t in (False, True) for d in ((), (-1,), (-2,), (-2, -1))):
            y = probe.t() if t else probe
            y = y.flip(dims) if dims else y
            if y.shape == target.shape and torch.equal(y, target):
                table[(k, f)] = (t, dims)
                break
    return table


_D4_CANONICAL = _canonical_d4()


def compose_d4(first: tuple[int, bool], then: tuple[int, bool]) -> tuple[int, bool]:
    """The D4 element ``then o first`` (``first`` applied first).

    With R = rot90 and H = hflip, H R = R^-1 H, so R^k2 H^f2 R^k1 H^f1 = R^(k2 +- k1) H^(f1 xor f2).
    """
    k1, f1 = first
    k2, f2 = then
    return ((k2 + (-k1 if f2 else k1)) % 4, f1 != f2)


@dataclass(frozen=True)
class View:
    """One TTA view: rescale by ``scale``, then hflip (``flip``), then ``k`` x rot90."""

    scale: float = 1.0
    k: int = 0
    flip: bool = False

    @property
    def key(self) -> tuple[float, int, bool]:
        return (round(self.scale, 6), self.k % 4, self.flip)

    @property
    def name(self) -> str:
        geo = _D4_NAMES[(self.k % 4, self.flip)]
        return geo if self.scale == 1.0 else f"scale{self.scale:g}/{geo}"

    @property
    def swaps(self) -> bool:
        """Whether the view exchanges height and width."""
        return self.k % 2 == 1

    def compose(self, then: View) -> View:
        k, flip = compose_d4((self.k, self.flip), (then.k, then.flip))
        return View(self.scale * then.scale, k, flip)

    def input_size(self, size: Sequence[int], divisor: int = DEFAULT_DIVISOR) -> tuple[int, int]:
        """Spatial size of ``augment(x)`` for an input of ``size``."""
        h, w = scaled_size(size, self.scale, divisor)
        return (w, h) if self.swaps else (h, w)

    @property
    def canonical(self) -> tuple[bool, tuple[int, ...]]:
        """(transpose, flip dims) of the D4 part: ``geometric(x) = flip(transpose^t(x), dims)``."""
        return _D4_CANONICAL[(self.k % 4, self.flip)]

    def geometric(self, x: torch.Tensor) -> torch.Tensor:
        """The D4 part of ``augment`` (no rescale)."""
        t, dims = self.canonical
        if t:
            x = x.transpose(-2, -1)
        return x.flip(dims) if dims else x

    def inverse_geometric(self, y: torch.Tensor) -> torch.Tensor:
        """Undo :meth:`geometric`: flip the same dims, then transpose back."""
        t, dims = self.canonical
        if dims:
            y = y.flip(dims)
        return y.transpose(-2, -1) if t else y

    def augment(self, x: torch.Tensor, divisor: int = DEFAULT_DIVISOR) -> torch.Tensor:
        """``N x C x H x W`` -> the view's input."""
        size = scaled_size(x.shape[-2:], self.scale, divisor)
        if size != tuple(x.shape[-2:]):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return self.geometric(x)

    def deaugment(self, y: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor:
        """``N x K x H' x W'`` prediction of the view -> aligned with the input of ``size``.

        ``size`` (the input's H, W) is needed only for scaled views; without it the
        geometry alone is undone.
        """
        y = self.inverse_geometric(y)
        if size is not None and tuple(y.shape[-2:]) != tuple(int(s) for s in size):
            y = F.interpolate(y, size=tuple(int(s) for s in size), mode="bilinear", align_corners=False)
        return y


def _d4_views() -> list[View]:
    return [View(1.0, k, f) for f in (False, True) for k in range(4)]


# name -> factory of the set's views from the multi-scale ``scales``
TTA_SETS: Registry = Registry("TTA set")
TTA_SETS.add("none", lambda scales: [View()], "the image as it is")
TTA_SETS.add("hflip", lambda scales: [View(), View(flip=True)], "identity and horizontal flip")
TTA_SETS.add(
    "flip", lambda scales: [View(), View(flip=True), View(k=2, flip=True)], "identity, horizontal and vertical flips"
)
TTA_SETS.add("d4", lambda scales: _d4_views(), "the 8 dihedral views (quarter turns x flip)")
TTA_SETS.add(
    "ms",
    lambda scales: [View(float(s), 0, f) for s in scales for f in (False, True)],
    "each of scales (default 0.75, 1, 1.25), with and without horizontal flip",
)


def list_tta() -> list[str]:
    """Names of the TTA sets (combinable with ``+``)."""
    return TTA_SETS.names()


def unique_views(views: Iterable[View]) -> list[View]:
    """``views`` without duplicates, first occurrence kept."""
    seen: set = set()
    out = []
    for v in views:
        if v.key not in seen:
            seen.add(v.key)
            out.append(v)
    return out


def parse_tta(name: str, scales: Sequence[float] | None = None) -> list[View]:
    """The views of a TTA set name such as ``flip``, ``d4`` or ``ms+flip``."""
    scales = list(DEFAULT_SCALES if scales is None else scales)
    if not scales or any(not (isinstance(s, (int, float)) and s > 0) for s in scales):
        raise PipelineError(f"TTA scales must be positive numbers, got {scales}")
    parts = [p.strip().lower() for p in str(name).split("+")]
    unknown = [p for p in parts if p not in TTA_SETS]
    if unknown or not parts:
        raise PipelineError(
            f"unknown TTA set {name!r} ({', '.join(repr(u) for u in unknown)}); known: {', '.join(TTA_SETS.names())} "
            f"(combine with +, e.g. ms+flip)"
        )
    views = [View()]
    for part in parts:
        views = unique_views(v.compose(w) for v in views for w in TTA_SETS.get(part)(scales))
    return views


def view_cost(name: str, scales: Sequence[float] | None = None) -> float:
    """What predicting with TTA set ``name`` costs in forward passes of the unscaled image: each view
    counted by its pixels (a view at scale s costs s^2), e.g. 1 for none, 8 for d4, 6.25 for ms."""
    return float(sum(v.scale**2 for v in parse_tta(name, scales)))


class TTAModel(nn.Module):
    """Wraps a model; ``forward(x)`` returns the mean class probabilities over the views (each
    view's probabilities by the model-family contract: softmax of logits, or the family's own).

    Output: ``N x K x H x W`` float32 probabilities at the input size.  All views that
    give inputs of the same size go through the model in one batch (``max_batch`` caps
    the images per forward call); ``dtype`` enables autocast (e.g. ``torch.float16``).
    """

    def __init__(
        self,
        model: nn.Module,
        tta: str | Sequence[View] = "flip",
        scales: Sequence[float] | None = None,
        divisor: int | None = None,
        max_batch: int | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.model = model
        self.views: list[View] = parse_tta(tta, scales) if isinstance(tta, str) else unique_views(tta)
        if not self.views:
            raise PipelineError("a TTA set needs at least one view")
        self.tta_name = tta if isinstance(tta, str) else "+".join(v.name for v in self.views)
        self.divisor = int(divisor if divisor is not None else getattr(model, "input_divisor", DEFAULT_DIVISOR))
        if max_batch is not None and max_batch < 1:
            raise PipelineError(f"max_batch must be at least 1, got {max_batch}")
        self.max_batch = max_batch
        self.dtype = dtype

    @property
    def view_names(self) -> list[str]:
        return [v.name for v in self.views]

    def extra_repr(self) -> str:
        return f"tta={self.tta_name!r}, views={len(self.views)}, divisor={self.divisor}, max_batch={self.max_batch}"

    def _probs(self, x: torch.Tensor) -> torch.Tensor:
        return predict_probabilities(self.model, x, self.dtype)

    @staticmethod
    def _view_input(v: View, xs: torch.Tensor, xt: torch.Tensor | None) -> torch.Tensor:
        """``v.geometric(xs)``, reading transposing views from ``xt`` (``xs`` transposed, contiguous)."""
        t, dims = v.canonical
        src = xt if t and xt is not None else (xs.transpose(-2, -1) if t else xs)
        return src.flip(dims) if dims else src

    def _view_probs(self, views: Sequence[View], xs: torch.Tensor, xt: torch.Tensor | None) -> torch.Tensor:
        """Probabilities of ``views`` of ``xs`` (view-major), in calls of at most ``max_batch`` images."""
        n = xs.shape[0]
        if self.max_batch is None or len(views) * n <= self.max_batch:
            inputs = [self._view_input(v, xs, xt) for v in views]
            return self._probs(torch.cat(inputs) if len(inputs) > 1 else inputs[0])
        if n <= self.max_batch:
            per_call = self.max_batch // n
            return torch.cat(
                [self._view_probs(views[i : i + per_call], xs, xt) for i in range(0, len(views), per_call)]
            )
        parts = xs.split(self.max_batch)
        parts_t = xt.split(self.max_batch) if xt is not None else [None] * len(parts)
        return torch.cat(
            [torch.cat([self._view_probs([v], a, b) for a, b in zip(parts, parts_t, strict=False)]) for v in views]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        size = tuple(int(s) for s in x.shape[-2:])
        # views grouped by the input shape they give: one forward call per shape (transposes swap H and W)
        by_shape: dict[tuple[int, int], list[View]] = defaultdict(list)
        for v in self.views:
            by_shape[v.input_size(size, self.divisor)].append(v)
        # probabilities are summed in the frame of each (scale, transpose), then resized and transposed once
        frames: dict[tuple[tuple[int, int], bool], torch.Tensor] = {}
        for views in by_shape.values():
            scaled = scaled_size(size, views[0].scale, self.divisor)
            xs = x if scaled == size else F.interpolate(x, size=scaled, mode="bilinear", align_corners=False)
            xt = xs.transpose(-2, -1).contiguous() if any(v.canonical[0] for v in views) else None
            probs = self._view_probs(views, xs, xt)
            for v, p in zip(views, probs.split(n), strict=False):
                t, dims = v.canonical
                q = p.flip(dims) if dims else p
                key = (scaled, t)
                if key in frames:
                    frames[key].add_(q)
                else:
                    frames[key] = q.clone() if (q is p and torch.is_grad_enabled()) else q
        total: torch.Tensor | None = None
        for (scaled, t), acc in frames.items():
            if t:
                acc = acc.transpose(-2, -1)
            if scaled != size:
                acc = F.interpolate(acc, size=size, mode="bilinear", align_corners=False)
            total = acc if total is None else total.add_(acc)
        if total is None:  # pragma: no cover - a TTAModel always has views
            raise RuntimeError("no TTA views")
        return total.div_(len(self.views)).contiguous()


def auto_max_batch(device: torch.device | str, batch_size: int) -> int | None:
    """Images per forward call that suit ``device``: no cap on an accelerator (all views of a
    size in one call); on a CPU one view of the batch at a time, since very large batches run
    slower per image there (activations no longer fit the caches)."""
    return batch_size if torch.device(device).type == "cpu" else None


def build_tta(
    model: nn.Module,
    name: str = "flip",
    scales: Sequence[float] | None = None,
    **kwargs,
) -> TTAModel:
    """``TTAModel`` by set name (``list_tta()``; combine with ``+``)."""
    return TTAModel(model, name, scales=scales, **kwargs)
