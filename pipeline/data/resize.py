"""Array resizing and size rounding shared by training, inference and the submission writer."""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_DIVISOR = 32


def scaled_size(size: Sequence[int], scale: float, divisor: int = DEFAULT_DIVISOR) -> tuple[int, int]:
    """``size * scale`` rounded to the nearest multiple of ``divisor`` (at least one divisor).

    A scale of 1 keeps the size as it is.
    """
    h, w = int(size[0]), int(size[1])
    if scale == 1.0:
        return h, w
    d = max(1, int(divisor))
    return tuple(max(d, int(math.floor(v * scale / d + 0.5)) * d) for v in (h, w))  # type: ignore[return-value]


def resize_nearest(label_map: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour resize of a class-index map to ``size`` (H, W), as OpenCV's INTER_NEAREST."""
    h, w = int(size[0]), int(size[1])
    if label_map.shape[:2] == (h, w):
        return label_map
    if label_map.dtype in (np.uint8, np.uint16):
        return cv2.resize(label_map, (w, h), interpolation=cv2.INTER_NEAREST)
    if label_map.min() >= 0 and label_map.max() < 2**16:
        small = cv2.resize(label_map.astype(np.uint16), (w, h), interpolation=cv2.INTER_NEAREST)
        return small.astype(label_map.dtype)
    raise ValueError(f"cannot resize a label map of dtype {label_map.dtype} with values outside 0..65535")


def resize_probs(probs: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of N x K x h x w (or K x h x w) probabilities; never nearest."""
    squeeze = probs.dim() == 3
    x = probs.unsqueeze(0) if squeeze else probs
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x.float(), size=tuple(int(s) for s in size), mode="bilinear", align_corners=False)
    return x.squeeze(0) if squeeze else x
