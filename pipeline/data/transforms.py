"""Augmentations by name and the conversion of images to normalized tensors."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch

from pipeline.core.registry import Registry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


AUGMENTATIONS: Registry = Registry("augmentation")
# Each factory takes ``square`` (the output is square) and returns albumentations transforms;
# quarter turns only for square outputs (they swap H and W).


@AUGMENTATIONS.register("none", "resize only")
def _none(square: bool) -> list:
    return []


@AUGMENTATIONS.register("hflip", "horizontal flip only")
def _hflip(square: bool) -> list:
    import albumentations as A

    return [A.HorizontalFlip(p=0.5)]


@AUGMENTATIONS.register("light", "horizontal flip, small affine, brightness/contrast")
def _light(square: bool) -> list:
    import albumentations as A

    return [
        A.HorizontalFlip(p=0.5),
        A.Affine(scale=(0.9, 1.1), translate_percent=(-0.05, 0.05), rotate=(-10, 10), p=0.5),
        A.RandomBrightnessContrast(0.15, 0.15, p=0.5),
    ]


@AUGMENTATIONS.register("strong", "flips, quarter turns (square sizes), affine, colour, blur/noise, dropout")
def _strong(square: bool) -> list:
    import albumentations as A

    return [
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.2),
        *([A.RandomRotate90(p=0.3)] if square else []),
        A.Affine(scale=(0.75, 1.25), translate_percent=(-0.1, 0.1), rotate=(-20, 20), p=0.7),
        A.ColorJitter(0.25, 0.25, 0.25, 0.05, p=0.6),
        A.OneOf([A.GaussianBlur(blur_limit=(3, 5)), A.MotionBlur(blur_limit=5), A.GaussNoise()], p=0.3),
        A.CoarseDropout(p=0.3),
    ]


def build_transform(
    name: str, size: tuple[int, int] | None, crop: tuple[int, int] | None = None
) -> Callable[..., dict]:
    """Albumentations pipeline by name; images are resized to ``size`` (H, W) when given, then
    cut to a random ``crop`` (H, W) window when given, before the named augmentations."""
    import albumentations as A

    out = crop if crop is not None else size
    ops = list(AUGMENTATIONS.get(name)(square=out is not None and int(out[0]) == int(out[1])))
    head = []
    if size is not None:
        head.append(A.Resize(int(size[0]), int(size[1])))
    if crop is not None:
        head.append(A.RandomCrop(int(crop[0]), int(crop[1])))
    return A.Compose(head + ops)


@dataclass(frozen=True)
class Preprocessing:
    """How an encoder expects its input: ``(v / 255 * input_range[1] - mean) / std`` per channel
    (RGB), for uint8 values ``v``.  Chosen per encoder (:mod:`pipeline.models.preprocessing`) and
    stored in every checkpoint."""

    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    input_range: tuple[float, float] = (0.0, 1.0)
    source: str = "imagenet"

    def as_dict(self) -> dict[str, Any]:
        return {
            "mean": list(self.mean),
            "std": list(self.std),
            "input_range": list(self.input_range),
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Preprocessing:
        """From a checkpoint's record; a checkpoint without one (written before it existed) is ImageNet's."""
        if not data:
            return IMAGENET
        return cls(
            tuple(float(v) for v in data["mean"]),
            tuple(float(v) for v in data["std"]),
            tuple(float(v) for v in data.get("input_range", (0.0, 1.0))),
            str(data.get("source", "checkpoint")),
        )


IMAGENET = Preprocessing()


@functools.lru_cache(maxsize=8)
def _normalize_luts(mean: tuple[float, ...], std: tuple[float, ...], top: float = 1.0) -> tuple[np.ndarray, ...]:
    """Per channel, the float32 value of each uint8 level: (v / 255 * top - mean) / std."""
    levels = np.arange(256, dtype=np.float32) / np.float32(255.0)
    if top != 1.0:
        levels = levels * np.float32(top)
    return tuple((levels - np.float32(m)) / np.float32(s) for m, s in zip(mean, std, strict=False))


def normalize_into(
    image: np.ndarray, mean: Sequence[float], std: Sequence[float], top: float = 1.0, out: np.ndarray | None = None
) -> np.ndarray:
    """HxWxC uint8 -> float32 CxHxW ``(v / 255 * top - mean) / std``: one table look-up per channel, written
    straight into ``out`` (a new array when None)."""
    luts = _normalize_luts(tuple(float(m) for m in mean), tuple(float(s) for s in std), float(top))
    if out is None:
        out = np.empty((image.shape[2], image.shape[0], image.shape[1]), dtype=np.float32)
    for c, plane in enumerate(cv2.split(image)):
        cv2.LUT(plane, luts[c], dst=out[c])
    return out


def to_tensor(image: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD, top: float = 1.0) -> torch.Tensor:
    """HxWx3 uint8 -> normalized float32 3xHxW: (v / 255 * top - mean) / std."""
    if image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == len(mean) == len(std):
        return torch.from_numpy(normalize_into(image, mean, std, top))
    t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
    if top != 1.0:
        t.mul_(float(top))
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return t.sub_(m).div_(s)


def normalize(image: np.ndarray, prep: Preprocessing = IMAGENET) -> torch.Tensor:
    """``to_tensor`` with an encoder's preprocessing."""
    return to_tensor(image, prep.mean, prep.std, prep.input_range[1])
