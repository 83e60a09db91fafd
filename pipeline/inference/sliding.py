"""Sliding-window inference: images much larger than the training size, predicted window by window.

:func:`sliding_window` tiles ``N x C x H x W`` images with windows of the training size
(``window``), sends the windows through a probability predictor in batches of at most
``max_batch`` and blends the overlapping window predictions back into ``N x K x H x W``
probabilities at the images' own size:

* windows start every ``stride`` pixels (``overlap`` of the window when no stride is given),
  spread evenly so the first lies flush with the top/left edge and the last with the
  bottom/right edge; every pixel is covered;
* each window's probabilities are weighted by a blend map (``BLENDS``: ``gaussian`` or
  ``uniform``), weights and weighted probabilities are summed per pixel, and the sum is
  divided by the weights, so the result still sums to 1 over the classes;
* an image smaller than the window (on either side) is padded to it with ``pad_value``
  (0: the mean colour, for normalized input) and the result is cropped back.

The predictor is any callable from ``n x C x h x w`` float images to ``n x K x h x w``
probabilities: a :class:`~pipeline.inference.tta.TTAModel`, or
``lambda x: predict_probabilities(model, x, dtype)``.  The window must be a multiple of its
input divisor (``predictor.divisor`` of a TTA wrapper, ``predictor.input_divisor`` of a
model, or ``divisor=``).  :class:`SlidingWindow` wraps a predictor and stays a model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.errors import ConfigError, PipelineError
from pipeline.core.registry import Registry

DEFAULT_OVERLAP = 0.5
DEFAULT_SIGMA_SCALE = 0.125  # Gaussian sigma as a fraction of the window side (nnU-Net's 1/8)

Predictor = Callable[[torch.Tensor], torch.Tensor]

MIN_WEIGHT = 1e-12  # floor of a blend map: a pixel that only window borders cover still gets its weight

# name -> factory of a window's h x w weight map (CPU, maximum 1) from (size, sigma_scale)
BLENDS: Registry = Registry("blend mode")


@BLENDS.register("gaussian", "weights fall off from each window's centre (sigma = sigma_scale x the side)")
def _gaussian(size: tuple[int, int], sigma_scale: float) -> torch.Tensor:
    axes = []
    for n in size:
        pos = torch.arange(n, dtype=torch.float64)
        axes.append(torch.exp(-0.5 * ((pos - (n - 1) / 2.0) / (sigma_scale * n)) ** 2))
    w = torch.outer(axes[0], axes[1])
    return w / w.max()


@BLENDS.register("uniform", "every pixel of every window counts the same (the plain mean of overlapping windows)")
def _uniform(size: tuple[int, int], sigma_scale: float) -> torch.Tensor:
    return torch.ones(size, dtype=torch.float64)


def list_blends() -> list[str]:
    return BLENDS.names()


def blend_weights(
    blend: str,
    size: Sequence[int],
    sigma_scale: float = DEFAULT_SIGMA_SCALE,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The ``h x w`` weight map of one window (float32, maximum 1, every value > 0)."""
    if not sigma_scale > 0:
        raise ConfigError(f"sigma_scale must be positive, got {sigma_scale}")
    weights = BLENDS.get(blend)(as_pair(size, "window"), float(sigma_scale)).clamp_min(MIN_WEIGHT).float()
    return weights if device is None else weights.to(device)


def as_pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    """``value`` (a side, ``[side]`` or ``[h, w]``) as a pair of positive ints; ConfigError naming ``name`` else."""
    items = [value] if isinstance(value, (int, float)) else list(value)
    if len(items) == 1:
        items = items * 2
    if len(items) != 2 or any(not (isinstance(v, (int, float)) and float(v).is_integer() and v >= 1) for v in items):
        raise ConfigError(f"{name} must be a positive side or [height, width] of positive integers, got {value}")
    return int(items[0]), int(items[1])


def resolve_stride(
    window: Sequence[int], stride: int | Sequence[int] | None = None, overlap: float = DEFAULT_OVERLAP
) -> tuple[int, int]:
    """The step between windows: ``stride`` when given (at most the window), else ``window x (1 - overlap)``."""
    if stride is not None:
        step = as_pair(stride, "stride")
        if step[0] > window[0] or step[1] > window[1]:
            raise ConfigError(
                f"stride {step[0]}x{step[1]} is larger than the window {window[0]}x{window[1]}: pixels would be missed"
            )
        return step
    if not 0 <= overlap < 1:
        raise ConfigError(f"overlap must be in [0, 1) (the fraction of a window its neighbour shares), got {overlap}")
    return tuple(max(1, int(math.floor(side * (1.0 - overlap) + 0.5))) for side in window)  # type: ignore[return-value]


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Start offsets of the windows along one axis of ``length`` pixels.

    The first window starts at 0, the last ends at ``length``; in between they are spread
    evenly with steps of at most ``stride``.  A ``length`` up to the window gives one window.
    """
    if length <= window:
        return [0]
    n = math.ceil((length - window) / stride) + 1
    return [int(math.floor(i * (length - window) / (n - 1) + 0.5)) for i in range(n)]


def predictor_divisor(predictor: Predictor) -> int:
    """The input divisor a predictor announces (TTA wrapper's ``divisor``, model's ``input_divisor``), else 1."""
    for attr in ("divisor", "input_divisor"):
        value = getattr(predictor, attr, None)
        if isinstance(value, int) and value >= 1:
            return value
    return 1


def check_window(window: Sequence[int], divisor: int) -> None:
    if window[0] % divisor or window[1] % divisor:
        raise ConfigError(
            f"window {window[0]}x{window[1]} must be a multiple of the model's input divisor {divisor} "
            f"(e.g. {max(divisor, window[0] // divisor * divisor)}x{max(divisor, window[1] // divisor * divisor)})"
        )


def count_windows(size: Sequence[int], window: Sequence[int], stride: Sequence[int]) -> int:
    """Windows per image of ``size`` (H, W)."""
    return len(window_starts(int(size[0]), window[0], stride[0])) * len(
        window_starts(int(size[1]), window[1], stride[1])
    )


def sliding_window(
    predictor: Predictor,
    images: torch.Tensor,
    window: int | Sequence[int],
    *,
    stride: int | Sequence[int] | None = None,
    overlap: float = DEFAULT_OVERLAP,
    blend: str = "gaussian",
    max_batch: int | None = None,
    divisor: int | None = None,
    sigma_scale: float = DEFAULT_SIGMA_SCALE,
    pad_value: float = 0.0,
    progress: bool = False,
) -> torch.Tensor:
    """``N x K x H x W`` float32 probabilities of ``images`` (``N x C x H x W``), window by window.

    ``window``: (h, w) or a side; ``stride`` (default: from ``overlap``); ``blend``: a name of
    ``BLENDS``; ``max_batch``: windows per predictor call (None: all at once); ``divisor``:
    the window must be a multiple of it (default: what the predictor announces);
    ``progress``: a bar over the predictor calls.
    """
    if images.dim() != 4:
        raise ValueError(f"expected N x C x H x W images, got shape {tuple(images.shape)}")
    if max_batch is not None and max_batch < 1:
        raise ConfigError(f"max_batch must be at least 1, got {max_batch}")
    win = as_pair(window, "window")
    check_window(win, divisor if divisor is not None else predictor_divisor(predictor))
    step = resolve_stride(win, stride, overlap)
    weights = blend_weights(blend, win, sigma_scale, images.device)

    n, _, height, width = images.shape
    pad_h, pad_w = max(0, win[0] - height), max(0, win[1] - width)
    top, left = pad_h // 2, pad_w // 2
    x = images
    if pad_h or pad_w:
        x = F.pad(images, (left, pad_w - left, top, pad_h - top), value=pad_value)
    full_h, full_w = x.shape[-2:]
    tiles = [(y, x0) for y in window_starts(full_h, win[0], step[0]) for x0 in window_starts(full_w, win[1], step[1])]
    crops = [(i, y, x0) for i in range(n) for y, x0 in tiles]
    per_call = max_batch or len(crops)

    from tqdm import tqdm

    acc: torch.Tensor | None = None
    starts = range(0, len(crops), per_call)
    for s in tqdm(starts, desc="windows", leave=False, disable=not progress or len(starts) < 2):
        chunk = crops[s : s + per_call]
        probs = predictor(torch.stack([x[i, :, y : y + win[0], x0 : x0 + win[1]] for i, y, x0 in chunk]))
        if probs.dim() != 4 or probs.shape[0] != len(chunk) or tuple(probs.shape[-2:]) != win:
            raise PipelineError(
                f"the predictor returned shape {tuple(probs.shape)} for {len(chunk)} windows of "
                f"{win[0]}x{win[1]}; expected {len(chunk)} x K x {win[0]} x {win[1]} probabilities"
            )
        if acc is None:
            acc = torch.zeros((n, probs.shape[1], full_h, full_w), dtype=torch.float32, device=images.device)
        weighted = probs.to(device=images.device, dtype=torch.float32) * weights
        for p, (i, y, x0) in zip(weighted, chunk, strict=True):
            acc[i, :, y : y + win[0], x0 : x0 + win[1]] += p
    if acc is None:  # pragma: no cover - there is always at least one window
        raise RuntimeError("no windows")
    total = torch.zeros((full_h, full_w), dtype=torch.float32, device=images.device)
    for y, x0 in tiles:
        total[y : y + win[0], x0 : x0 + win[1]] += weights
    out = acc.div_(total)
    if pad_h or pad_w:
        out = out[..., top : top + height, left : left + width]
    return out.contiguous()


class SlidingWindow(nn.Module):
    """Wraps a probability predictor; ``forward(x)`` is :func:`sliding_window` of ``x``.

    Settings are checked when the wrapper is built, so a bad window, stride, overlap or
    blend fails before any image is read.
    """

    def __init__(
        self,
        predictor: Predictor,
        window: int | Sequence[int],
        *,
        stride: int | Sequence[int] | None = None,
        overlap: float = DEFAULT_OVERLAP,
        blend: str = "gaussian",
        max_batch: int | None = None,
        divisor: int | None = None,
        sigma_scale: float = DEFAULT_SIGMA_SCALE,
        pad_value: float = 0.0,
        progress: bool = False,
    ):
        super().__init__()
        self.predictor = predictor  # registered as a submodule when it is one
        self.window = as_pair(window, "window")
        self.divisor = int(divisor if divisor is not None else predictor_divisor(predictor))
        check_window(self.window, self.divisor)
        self.stride = resolve_stride(self.window, stride, overlap)
        self.blend = BLENDS.key(blend)
        blend_weights(self.blend, self.window, sigma_scale)
        if max_batch is not None and max_batch < 1:
            raise ConfigError(f"max_batch must be at least 1, got {max_batch}")
        self.max_batch = max_batch
        self.sigma_scale = float(sigma_scale)
        self.pad_value = float(pad_value)
        self.progress = progress

    def extra_repr(self) -> str:
        return (
            f"window={self.window}, stride={self.stride}, blend={self.blend!r}, max_batch={self.max_batch}, "
            f"divisor={self.divisor}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sliding_window(
            self.predictor,
            x,
            self.window,
            stride=self.stride,
            blend=self.blend,
            max_batch=self.max_batch,
            divisor=self.divisor,
            sigma_scale=self.sigma_scale,
            pad_value=self.pad_value,
            progress=self.progress,
        )
