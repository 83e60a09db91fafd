"""A procedurally rendered demo dataset in the contest layout.

``run(DemoConfig(...))`` writes ``train_all.json``, ``train.json``, ``val.json``,
``test.json`` (no annotations), ``test_gt.json`` (the test images with annotations, for
local scoring) and the JPEGs under ``batch_01_vt/``, ``batch_02_vt/``, ``batch_03/`` ...
The output depends only on the config: the same seed gives byte-identical files.

Each image is a cluttered textured background with 1..``max_objects`` overlapping
objects.  Every class has its own shape, colour and texture statistics, with deliberate
overlaps between some classes (Paper / Paper pack, Plastic / Plastic bag, Metal / Glass).
Objects are painted largest first, the order in which the ground-truth rule of
README's Contracts paints annotations, so the pixels of a mask show the object it is labelled as.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pycocotools import mask as mask_utils
from tqdm import tqdm

from pipeline.core.config import ConfigError, stage_main
from pipeline.core.errors import PipelineError

log = logging.getLogger(__name__)

CATEGORIES: tuple[str, ...] = (
    "General trash",
    "Paper",
    "Paper pack",
    "Metal",
    "Glass",
    "Plastic",
    "Styrofoam",
    "Plastic bag",
    "Battery",
    "Clothing",
)
# Share of object instances per category (same order), shaped like the contest's counts
# but with the rare classes (Battery, Clothing) a few percent each.
CLASS_WEIGHTS: tuple[float, ...] = (0.15, 0.27, 0.06, 0.05, 0.05, 0.10, 0.07, 0.20, 0.02, 0.03)

MIN_OBJECT_PX = 4.0


@dataclass
class DemoConfig:
    """Settings of the demo dataset generator."""

    out_dir: str = "data/demo"
    n_train: int = 240  # labelled images (train + val)
    n_test: int = 60
    height: int = 256
    width: int = 256
    seed: int = 0
    val_fraction: float = 0.2
    n_batches: int = 3
    grey_fraction: float = 0.0
    jpeg_quality: int = 90
    overwrite: bool = False
    max_objects: int = 8

    def validate(self) -> None:
        """Raise ConfigError on settings that cannot make a dataset."""
        if not str(self.out_dir).strip():
            raise ConfigError("out_dir: must not be empty")
        for key in ("height", "width"):
            if getattr(self, key) < 32:
                raise ConfigError(f"{key}: must be at least 32 pixels, got {getattr(self, key)}")
        for key in ("n_train", "n_test", "n_batches", "max_objects"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be at least 1, got {getattr(self, key)}")
        for key in ("val_fraction", "grey_fraction"):
            value = getattr(self, key)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{key}: must lie in [0, 1], got {value}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError(f"jpeg_quality: must lie in [1, 100], got {self.jpeg_quality}")


# --------------------------------------------------------------------------- noise helpers


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: float) -> np.ndarray:
    """Low-frequency noise in about [-1, 1]: a coarse random grid upsampled bicubically."""
    gh = max(2, int(round(cells * h / max(h, w))) + 1)
    gw = max(2, int(round(cells * w / max(h, w))) + 1)
    grid = rng.uniform(-1.0, 1.0, (gh, gw)).astype(np.float32)
    return cv2.resize(grid, (max(w, 1), max(h, 1)), interpolation=cv2.INTER_CUBIC)


def _jitter(rng: np.random.Generator, colour: Sequence[float], amount: float) -> np.ndarray:
    return np.clip(np.asarray(colour, np.float32) + rng.uniform(-amount, amount, 3), 0, 255).astype(np.float32)


def _fill(shape: tuple[int, int], colour: np.ndarray) -> np.ndarray:
    return np.broadcast_to(colour.astype(np.float32), (*shape, 3)).copy()


def _grain(rng: np.random.Generator, shape: tuple[int, int], amount: float) -> np.ndarray:
    return rng.normal(0.0, amount, shape).astype(np.float32)[..., None]


def _cylinder(v: np.ndarray, half: float) -> np.ndarray:
    """Diffuse shading of a cylinder seen side-on, 1 on the axis and dimmer at the rims."""
    return np.sqrt(np.clip(1.0 - (v / max(half, 1e-6)) ** 2, 0.0, 1.0))


def _highlight(v: np.ndarray, centre: float, width: float) -> np.ndarray:
    return np.exp(-(((v - centre) / max(width, 1e-6)) ** 2))


PLASTIC_COLOURS = [
    (30, 90, 200),
    (200, 40, 40),
    (240, 200, 30),
    (40, 160, 70),
    (150, 200, 235),
    (245, 245, 245),
    (250, 120, 30),
]
BAG_COLOURS = [
    (235, 235, 235),
    (45, 45, 50),
    (40, 90, 190),
    (200, 50, 50),
    (235, 205, 50),
    (60, 160, 80),
    (225, 120, 170),
    (200, 212, 222),
]
METAL_COLOURS = [(175, 175, 180), (120, 120, 126), (195, 165, 95), (150, 150, 140)]
GLASS_COLOURS = [(50, 130, 70), (120, 66, 26), (175, 215, 205), (60, 110, 170)]


# --------------------------------------------------------------------------- shapes
# A shape is a polygon in object units: the long axis u spans about [-0.5, 0.5] and the
# short axis v about [-aspect/2, aspect/2].  It is scaled by the object size, rotated and
# moved into place later.


def _rect(rng: np.random.Generator, aspect: float, jitter: float, subdivide: int = 1) -> np.ndarray:
    corners = np.array([[-0.5, -aspect / 2], [0.5, -aspect / 2], [0.5, aspect / 2], [-0.5, aspect / 2]])
    pts = []
    for i in range(4):
        a, b = corners[i], corners[(i + 1) % 4]
        for k in range(subdivide):
            pts.append(a + (b - a) * k / subdivide)
    pts = np.asarray(pts)
    return pts + rng.normal(0.0, jitter, pts.shape)


def _blob(
    rng: np.random.Generator, n: int, aspect: float, amplitude: float, freqs: Sequence[int], jag: float
) -> np.ndarray:
    theta = np.linspace(0.0, 2 * np.pi, n, endpoint=False) + rng.uniform(0, 2 * np.pi)
    r = np.ones(n)
    for f in freqs:
        r += rng.uniform(0.3, 1.0) * amplitude * np.cos(f * theta + rng.uniform(0, 2 * np.pi))
    r *= 1.0 + rng.uniform(-jag, jag, n)
    r = 0.5 * np.clip(r, 0.2, None)
    return np.stack([r * np.cos(theta), aspect * r * np.sin(theta)], axis=1)


def _capsule(aspect: float, n_arc: int = 7) -> np.ndarray:
    half = aspect / 2
    core = max(0.5 - half, 0.0)
    angles = np.linspace(-np.pi / 2, np.pi / 2, n_arc)
    right = np.stack([core + half * np.cos(angles), half * np.sin(angles)], axis=1)
    left = np.stack([-core - half * np.cos(angles), -half * np.sin(angles)], axis=1)
    return np.concatenate([right, left])


def _bottle(rng: np.random.Generator, aspect: float) -> np.ndarray:
    b = aspect / 2
    nb = b * rng.uniform(0.28, 0.45)
    s0, s1 = rng.uniform(0.0, 0.15), rng.uniform(0.22, 0.32)
    half = [(-0.5, b * 0.85), (-0.47, b), (s0, b), (s1, nb), (0.5, nb)]
    upper = [(u, -v) for u, v in half]
    lower = [(u, v) for u, v in reversed(half)]
    return np.asarray(upper + lower)


def _convex(rng: np.random.Generator, n: int, aspect: float) -> np.ndarray:
    theta = np.sort(rng.uniform(0, 2 * np.pi, n))
    r = 0.5 * rng.uniform(0.8, 1.0, n)
    return np.stack([r * np.cos(theta), aspect * r * np.sin(theta)], axis=1)


def _box(rng: np.random.Generator, aspect: float) -> np.ndarray:
    front = _rect(rng, aspect, 0.01)
    direction = rng.uniform(0, 2 * np.pi)
    depth = rng.uniform(0.08, 0.22) * np.array([np.cos(direction), np.sin(direction)])
    pts = np.concatenate([front, front + depth]).astype(np.float32)
    hull = cv2.convexHull(pts).reshape(-1, 2)
    return hull.astype(np.float64) - depth / 2


def _shape_general(rng):
    aspect = rng.uniform(0.5, 1.0)
    return _blob(rng, int(rng.integers(9, 18)), aspect, 0.15, (2, 3), 0.35), aspect


def _shape_paper(rng):
    aspect = rng.uniform(0.5, 0.95)
    if rng.random() < 0.4:
        return _rect(rng, aspect, 0.03, subdivide=3), aspect
    return _rect(rng, aspect, 0.04), aspect


def _shape_pack(rng):
    aspect = rng.uniform(0.35, 0.75)
    if rng.random() < 0.5:
        return _box(rng, aspect), aspect
    return _rect(rng, aspect, 0.015), aspect


def _shape_metal(rng):
    p = rng.random()
    if p < 0.25:
        aspect = rng.uniform(0.8, 1.0)
        return _blob(rng, 20, aspect, 0.0, (), 0.0), aspect
    aspect = rng.uniform(0.45, 0.65)
    pts = _capsule(aspect, 5)
    if p > 0.8:
        pts = pts + rng.normal(0.0, 0.04, pts.shape)
    return pts, aspect


def _shape_glass(rng):
    if rng.random() < 0.7:
        aspect = rng.uniform(0.28, 0.4)
        return _bottle(rng, aspect), aspect
    aspect = rng.uniform(0.4, 0.8)
    return _convex(rng, int(rng.integers(3, 6)), aspect), aspect


def _shape_plastic(rng):
    p = rng.random()
    if p < 0.45:
        aspect = rng.uniform(0.3, 0.45)
        return _bottle(rng, aspect), aspect
    if p < 0.7:
        aspect = rng.uniform(0.6, 0.9)
        top, bottom = aspect / 2, aspect / 2 * rng.uniform(0.6, 0.8)
        return np.array([[-0.5, -bottom], [0.5, -top], [0.5, top], [-0.5, bottom]]), aspect
    aspect = rng.uniform(0.55, 0.9)
    return _rect(rng, aspect, 0.03, subdivide=2), aspect


def _shape_styrofoam(rng):
    aspect = rng.uniform(0.5, 1.0)
    if rng.random() < 0.5:
        return _convex(rng, int(rng.integers(5, 9)), aspect), aspect
    return _rect(rng, aspect, 0.01), aspect


def _shape_bag(rng):
    aspect = rng.uniform(0.6, 1.0)
    return _blob(rng, 36, aspect, 0.14, (2, 3, 5, 7), 0.04), aspect


def _shape_battery(rng):
    if rng.random() < 0.25:
        return _blob(rng, 14, 1.0, 0.0, (), 0.0), 1.0
    aspect = rng.uniform(0.28, 0.4)
    return _capsule(aspect, 3), aspect


def _shape_clothing(rng):
    aspect = rng.uniform(0.6, 1.0)
    return _blob(rng, 28, aspect, 0.16, (2, 3, 4), 0.06), aspect


# --------------------------------------------------------------------------- textures
# A texture gets the object-frame coordinates (u, v) of the pixels of the object's
# bounding box and returns RGB values (float, 0..255) and an opacity (scalar or per pixel).


def _tex_general(rng, u, v, aspect):
    k = int(rng.integers(3, 6))
    seeds = np.stack([rng.uniform(-0.5, 0.5, k), rng.uniform(-aspect / 2, aspect / 2, k)], axis=1)
    d = (u[..., None] - seeds[:, 0]) ** 2 + (v[..., None] - seeds[:, 1]) ** 2
    cell = np.argmin(d, axis=-1)
    palette = np.stack([_jitter(rng, rng.uniform(30, 200, 3), 0) for _ in range(k)])
    rgb = palette[cell]
    shade = 1.0 + 0.25 * _smooth_noise(rng, *u.shape, 4)
    return rgb * shade[..., None] + _grain(rng, u.shape, 12), 1.0


def _tex_paper(rng, u, v, aspect):
    base = _jitter(rng, (240, 238, 230), 14) if rng.random() < 0.7 else _jitter(rng, (178, 136, 92), 16)
    rgb = _fill(u.shape, base)
    if rng.random() < 0.5:
        freq = rng.uniform(10, 22)
        gaps = _smooth_noise(rng, *u.shape, 8) > -0.2
        text = ((v * freq) % 1.0 < 0.18) & (np.abs(u) < 0.38) & (np.abs(v) < aspect * 0.4) & gaps
        rgb[text] *= 0.45
    crumple = 1.0 + 0.12 * _smooth_noise(rng, *u.shape, rng.uniform(3, 7))
    return rgb * crumple[..., None] + _grain(rng, u.shape, 4), 1.0


def _tex_pack(rng, u, v, aspect):
    base = _jitter(rng, (238, 236, 228), 15)
    rgb = _fill(u.shape, base)
    n_bands = int(rng.integers(3, 6))
    band = np.clip(((u + 0.5) * n_bands).astype(int), 0, n_bands - 1)
    colours = [_jitter(rng, PLASTIC_COLOURS[int(rng.integers(len(PLASTIC_COLOURS)))], 30) for _ in range(n_bands)]
    printed = rng.random(n_bands) < 0.5
    printed[int(rng.integers(n_bands))] = True
    for i in range(n_bands):
        if printed[i]:
            rgb[band == i] = colours[i]
    if rng.random() < 0.6:
        period = rng.uniform(0.05, 0.12)
        stripes = np.sin(2 * np.pi * v / period) > 0.5
        rgb[stripes] = 0.55 * rgb[stripes] + 0.45 * colours[0]
    if rng.random() < 0.5:
        c = (rng.uniform(-0.3, 0.3), rng.uniform(-aspect / 4, aspect / 4))
        logo = (u - c[0]) ** 2 + (v - c[1]) ** 2 < (aspect * rng.uniform(0.12, 0.25)) ** 2
        rgb[logo] = colours[-1] * 0.8
    shade = 1.0 + 0.06 * _smooth_noise(rng, *u.shape, 3)
    return rgb * shade[..., None] + _grain(rng, u.shape, 3), 1.0


def _tex_metal(rng, u, v, aspect):
    base = _jitter(rng, METAL_COLOURS[int(rng.integers(len(METAL_COLOURS)))], 12)
    rgb = _fill(u.shape, base)
    if rng.random() < 0.4:
        label = np.abs(u) < rng.uniform(0.15, 0.3)
        rgb[label] = _jitter(rng, PLASTIC_COLOURS[int(rng.integers(len(PLASTIC_COLOURS)))], 40) * 0.8
    shade = 0.45 + 0.55 * _cylinder(v, aspect / 2)
    spec = _highlight(v, rng.uniform(-0.2, 0.2) * aspect, rng.uniform(0.04, 0.08) * aspect)
    spec2 = _highlight(v, rng.uniform(-0.35, 0.35) * aspect, 0.03 * aspect)
    brushed = 4.0 * np.sin(v * rng.uniform(60, 120) + rng.uniform(0, 2 * np.pi))
    out = rgb * shade[..., None] + (170 * spec + 80 * spec2 + brushed)[..., None]
    return out + _grain(rng, u.shape, 4), 1.0


def _tex_glass(rng, u, v, aspect):
    base = _jitter(rng, GLASS_COLOURS[int(rng.integers(len(GLASS_COLOURS)))], 15)
    rgb = _fill(u.shape, base)
    shade = 0.7 + 0.3 * _cylinder(v, aspect / 2)
    spec = _highlight(v, rng.uniform(-0.25, -0.05) * aspect, 0.035 * aspect)
    spec2 = _highlight(v, rng.uniform(0.1, 0.3) * aspect, 0.02 * aspect)
    out = rgb * shade[..., None] + (150 * spec + 90 * spec2)[..., None] + _grain(rng, u.shape, 3)
    a0 = rng.uniform(0.6, 0.85)
    rim = np.clip(np.abs(2 * v / max(aspect, 1e-6)), 0, 1) ** 4
    return out, a0 + (1 - a0) * rim


def _tex_plastic(rng, u, v, aspect):
    base = _jitter(rng, PLASTIC_COLOURS[int(rng.integers(len(PLASTIC_COLOURS)))], 25)
    rgb = _fill(u.shape, base)
    if rng.random() < 0.3:
        label = np.abs(u - rng.uniform(-0.2, 0.1)) < rng.uniform(0.08, 0.18)
        rgb[label] = _jitter(rng, PLASTIC_COLOURS[int(rng.integers(len(PLASTIC_COLOURS)))], 30)
    shade = 0.6 + 0.4 * _cylinder(v, aspect / 2)
    spec = _highlight(v, rng.uniform(-0.25, 0.25) * aspect, rng.uniform(0.08, 0.14) * aspect)
    out = rgb * shade[..., None] + (110 * spec)[..., None] + _grain(rng, u.shape, 4)
    return out, rng.uniform(0.85, 1.0)


def _tex_styrofoam(rng, u, v, aspect):
    base = _jitter(rng, (242, 242, 238), 10)
    h, w = u.shape
    beads = cv2.GaussianBlur(rng.normal(0.0, 1.0, (h, w)).astype(np.float32), (0, 0), 0.8)
    shade = 1.0 + 0.05 * _smooth_noise(rng, h, w, 3) + 0.06 * beads
    return _fill(u.shape, base) * shade[..., None] + _grain(rng, u.shape, 3), 1.0


def _tex_bag(rng, u, v, aspect):
    base = _jitter(rng, BAG_COLOURS[int(rng.integers(len(BAG_COLOURS)))], 20)
    h, w = u.shape
    creases = np.zeros((h, w), np.float32)
    for _ in range(3):
        creases = np.maximum(creases, np.exp(-((_smooth_noise(rng, h, w, rng.uniform(3, 7)) / 0.12) ** 2)))
    folds = 0.15 * _smooth_noise(rng, h, w, 5)
    out = _fill(u.shape, base) * (0.85 + folds + 0.25 * creases)[..., None] + _grain(rng, u.shape, 4)
    a0 = rng.uniform(0.5, 0.8)
    return out, np.clip(a0 + 0.2 * creases, 0.0, 1.0)


def _tex_battery(rng, u, v, aspect):
    body = _jitter(rng, [(30, 30, 32), (30, 50, 120), (170, 110, 50), (40, 120, 60)][int(rng.integers(4))], 12)
    rgb = _fill(u.shape, body)
    band = np.abs(u - rng.uniform(-0.2, 0.2)) < rng.uniform(0.06, 0.15)
    rgb[band] = _jitter(rng, [(230, 140, 30), (210, 180, 60), (200, 40, 40)][int(rng.integers(3))], 20)
    cap = u > 0.4 if aspect < 0.9 else (u**2 + v**2) < 0.15**2
    rgb[cap] = _jitter(rng, (190, 190, 195), 10)
    shade = 0.5 + 0.5 * _cylinder(v, aspect / 2)
    spec = _highlight(v, -0.2 * aspect, 0.06 * aspect)
    return rgb * shade[..., None] + (120 * spec)[..., None] + _grain(rng, u.shape, 3), 1.0


def _tex_clothing(rng, u, v, aspect):
    c1 = _jitter(rng, rng.uniform(30, 220, 3), 0)
    c2 = _jitter(rng, rng.uniform(30, 220, 3), 0)
    period = rng.uniform(0.05, 0.15)
    angle = rng.uniform(0, np.pi)
    s = u * np.cos(angle) + v * np.sin(angle)
    t = -u * np.sin(angle) + v * np.cos(angle)
    p = rng.random()
    if p < 0.4:
        pattern = np.zeros(u.shape, bool)
    elif p < 0.7:
        pattern = (s / period) % 1.0 < 0.5
    else:
        pattern = ((s / period) % 1.0 < 0.5) ^ ((t / period) % 1.0 < 0.5)
    rgb = np.where(pattern[..., None], c2, c1).astype(np.float32)
    weave = 0.06 * np.sin(2 * np.pi * s / (period / 6)) * np.sin(2 * np.pi * t / (period / 6))
    folds = 0.22 * _smooth_noise(rng, *u.shape, 6)
    return rgb * (1.0 + weave + folds)[..., None] + _grain(rng, u.shape, 8), 1.0


@dataclass(frozen=True)
class _Style:
    size: tuple[float, float]  # long side as a fraction of the shorter image side
    shape: Callable[[np.random.Generator], tuple[np.ndarray, float]]
    texture: Callable[..., tuple[np.ndarray, Any]]


STYLES: dict[str, _Style] = {
    "General trash": _Style((0.06, 0.40), _shape_general, _tex_general),
    "Paper": _Style((0.08, 0.50), _shape_paper, _tex_paper),
    "Paper pack": _Style((0.06, 0.35), _shape_pack, _tex_pack),
    "Metal": _Style((0.04, 0.25), _shape_metal, _tex_metal),
    "Glass": _Style((0.05, 0.30), _shape_glass, _tex_glass),
    "Plastic": _Style((0.04, 0.30), _shape_plastic, _tex_plastic),
    "Styrofoam": _Style((0.06, 0.40), _shape_styrofoam, _tex_styrofoam),
    "Plastic bag": _Style((0.15, 0.50), _shape_bag, _tex_bag),
    "Battery": _Style((0.02, 0.10), _shape_battery, _tex_battery),
    "Clothing": _Style((0.20, 0.50), _shape_clothing, _tex_clothing),
}


# --------------------------------------------------------------------------- geometry


def _clip_to_box(pts: np.ndarray, xmax: float, ymax: float) -> np.ndarray:
    """Sutherland-Hodgman clipping of a polygon to [0, xmax] x [0, ymax]."""
    poly = [tuple(p) for p in pts]
    edges = [(0, 0.0, 1), (0, xmax, -1), (1, 0.0, 1), (1, ymax, -1)]  # (axis, bound, keep sign)
    for axis, bound, sign in edges:
        if not poly:
            break
        out = []
        for i, cur in enumerate(poly):
            prev = poly[i - 1]
            cur_in = sign * (cur[axis] - bound) >= 0
            prev_in = sign * (prev[axis] - bound) >= 0
            if cur_in != prev_in:
                t = (bound - prev[axis]) / (cur[axis] - prev[axis])
                out.append((prev[0] + t * (cur[0] - prev[0]), prev[1] + t * (cur[1] - prev[1])))
            if cur_in:
                out.append(cur)
        poly = out
    return np.asarray(poly, dtype=np.float64).reshape(-1, 2)


def _to_coco_polygon(pts: np.ndarray, h: int, w: int) -> list[float] | None:
    """Clip to the image, round to 1 decimal, drop repeated points; None if degenerate."""
    pts = np.round(_clip_to_box(pts, w - 1.0, h - 1.0), 1)
    keep = [p for i, p in enumerate(pts) if i == 0 or not np.array_equal(p, pts[i - 1])]
    if len(keep) > 1 and np.array_equal(keep[0], keep[-1]):
        keep.pop()
    if len(keep) < 3:
        return None
    arr = np.asarray(keep)
    x, y = arr[:, 0], arr[:, 1]
    if abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))) < 1.0:
        return None
    return [round(float(c), 1) + 0.0 for c in arr.reshape(-1)]  # + 0.0 turns -0.0 into 0.0


def _polygon_rle(poly: list[float], h: int, w: int) -> dict:
    return mask_utils.merge(mask_utils.frPyObjects([poly], h, w))


def _bbox(poly: list[float]) -> list[float]:
    xs, ys = poly[0::2], poly[1::2]
    x0, y0 = min(xs), min(ys)
    return [round(x0, 1) + 0.0, round(y0, 1) + 0.0, round(max(xs) - x0, 1) + 0.0, round(max(ys) - y0, 1) + 0.0]


@dataclass
class _Object:
    category: int  # index into CATEGORIES
    poly: list[float]
    area: int
    rle: dict
    centre: tuple[float, float]
    size: float
    angle: float
    aspect: float


def _make_object(rng: np.random.Generator, category: int, placed: list[_Object], h: int, w: int) -> _Object:
    """Sample one object of ``category`` with a non-empty mask, often overlapping an earlier one."""
    style = STYLES[CATEGORIES[category]]
    side = float(min(h, w))
    lo, hi = style.size
    for attempt in range(12):
        size = max(MIN_OBJECT_PX * (1 + attempt / 3), side * math.exp(rng.uniform(math.log(lo), math.log(hi))))
        shape, aspect = style.shape(rng)
        if placed and rng.random() < 0.55:
            other = placed[int(rng.integers(len(placed)))]
            spread = 0.35 * max(size, other.size)
            cx = float(np.clip(other.centre[0] + rng.normal(0, spread), 0, w - 1))
            cy = float(np.clip(other.centre[1] + rng.normal(0, spread), 0, h - 1))
        else:
            cx, cy = rng.uniform(0.05, 0.95) * (w - 1), rng.uniform(0.05, 0.95) * (h - 1)
        angle = rng.uniform(0, 2 * np.pi)
        rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        pts = (shape * size) @ rot.T + np.array([cx, cy])
        poly = _to_coco_polygon(pts, h, w)
        if poly is None:
            continue
        rle = _polygon_rle(poly, h, w)
        area = int(mask_utils.area(rle))
        if area > 0:
            return _Object(category, poly, area, rle, (cx, cy), size, angle, aspect)
    # Fallback that always has pixels: a small axis-aligned box in the middle of the image.
    s = MIN_OBJECT_PX
    x0, y0 = (w - 1) / 2 - s, (h - 1) / 2 - s
    poly = [round(v, 1) for v in (x0, y0, x0 + 2 * s, y0, x0 + 2 * s, y0 + 2 * s, x0, y0 + 2 * s)]
    rle = _polygon_rle(poly, h, w)
    return _Object(category, poly, int(mask_utils.area(rle)), rle, ((w - 1) / 2, (h - 1) / 2), 2 * s, 0.0, 1.0)


# --------------------------------------------------------------------------- rendering


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A cluttered floor: gradient, low-frequency noise, patches and lines."""
    grey = rng.uniform(60, 190)
    c1 = 0.6 * grey + 0.4 * rng.uniform(30, 220, 3)
    c2 = 0.6 * rng.uniform(60, 190) + 0.4 * rng.uniform(30, 220, 3)
    angle = rng.uniform(0, 2 * np.pi)
    t = np.arange(w, dtype=np.float32)[None, :] * np.float32(np.cos(angle)) + np.arange(h, dtype=np.float32)[
        :, None
    ] * np.float32(np.sin(angle))
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    shared = 22 * _smooth_noise(rng, h, w, rng.uniform(3, 7)) + 8 * _smooth_noise(rng, h, w, max(h, w) / 6)
    planes = [
        np.float32(c1[k]) + np.float32(c2[k] - c1[k]) * t + shared + 10 * _smooth_noise(rng, h, w, 5) for k in range(3)
    ]
    img = cv2.merge(planes)
    side = min(h, w)
    for _ in range(int(rng.integers(3, 12))):
        colour = (0.5 * rng.uniform(30, 230, 3) + 0.5 * rng.uniform(40, 200)).astype(np.float32)
        cx, cy = int(rng.integers(0, w)), int(rng.integers(0, h))
        r = int(max(2, rng.uniform(0.03, 0.3) * side))
        x0, y0, x1, y1 = max(cx - r, 0), max(cy - r, 0), min(cx + r + 1, w), min(cy + r + 1, h)
        if x1 <= x0 or y1 <= y0:
            continue
        shape_mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
        kind = rng.random()
        if kind < 0.4:
            cv2.rectangle(shape_mask, (cx - r - x0, cy - r // 2 - y0), (cx + r - x0, cy + r // 2 - y0), 1, -1)
        elif kind < 0.7:
            cv2.circle(shape_mask, (cx - x0, cy - y0), r, 1, -1)
        else:
            pts = (rng.uniform(-r, r, (int(rng.integers(3, 7)), 2)) + [cx - x0, cy - y0]).astype(np.int32)
            cv2.fillPoly(shape_mask, [pts], 1)
        a = np.float32(rng.uniform(0.25, 0.8))
        m = shape_mask.astype(bool)
        region = img[y0:y1, x0:x1]
        region[m] = a * colour + (1 - a) * region[m]
    for _ in range(int(rng.integers(3, 15))):
        p1 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        p2 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        colour = tuple(float(c) for c in 0.6 * rng.uniform(20, 235, 3) + 0.4 * rng.uniform(60, 180))
        cv2.line(img, p1, p2, colour, int(rng.integers(1, 3)))
    return cv2.GaussianBlur(img, (0, 0), 0.7)


def _shift(mask: np.ndarray, dx: int, dy: int) -> np.ndarray:
    out = np.zeros_like(mask)
    h, w = mask.shape
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[yd, xd] = mask[ys, xs]
    return out


def _paint(rng: np.random.Generator, img: np.ndarray, obj: _Object) -> None:
    """Paint one object (its pycocotools mask exactly) onto ``img`` in place."""
    mask = mask_utils.decode(obj.rle).astype(bool)
    h, w = mask.shape
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    if rng.random() < 0.6:
        off = max(1, int(round(obj.size * rng.uniform(0.02, 0.06))))
        sigma = max(0.8, off / 1.5)
        pad = off + int(math.ceil(3 * sigma)) + 1
        sy0, sy1, sx0, sx1 = max(y0 - pad, 0), min(y1 + pad, h), max(x0 - pad, 0), min(x1 + pad, w)
        local = mask[sy0:sy1, sx0:sx1]
        shadow = cv2.GaussianBlur(_shift(local.astype(np.float32), off, off), (0, 0), sigma)
        factor = 1.0 - np.float32(rng.uniform(0.2, 0.45)) * shadow * ~local
        img[sy0:sy1, sx0:sx1] *= factor[..., None]
    m = mask[y0:y1, x0:x1]
    xx = np.arange(x0, x1, dtype=np.float32)[None, :] - np.float32(obj.centre[0])
    yy = np.arange(y0, y1, dtype=np.float32)[:, None] - np.float32(obj.centre[1])
    ca, sa = np.float32(math.cos(obj.angle) / obj.size), np.float32(math.sin(obj.angle) / obj.size)
    u = xx * ca + yy * sa
    v = yy * ca - xx * sa
    tex, alpha = STYLES[CATEGORIES[obj.category]].texture(rng, u, v, obj.aspect)
    region = img[y0:y1, x0:x1]
    a = np.asarray(alpha, np.float32)
    a = a[..., None] if a.ndim == 2 else a
    blended = a * tex + (1 - a) * region
    edge = m & ~cv2.erode(m.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    blended[edge] *= 1.0 - rng.uniform(0.0, 0.3)
    region[m] = blended[m]


def _render(
    rng: np.random.Generator, categories: Sequence[int], h: int, w: int, grey: bool
) -> tuple[np.ndarray, list[_Object]]:
    """One RGB uint8 image and its objects (in annotation order)."""
    img = _background(rng, h, w)
    objects: list[_Object] = []
    for c in categories:
        objects.append(_make_object(rng, int(c), objects, h, w))
    for i in sorted(range(len(objects)), key=lambda i: -objects[i].area):  # stable: ties keep file order
        _paint(rng, img, objects[i])
    gain = rng.uniform(0.75, 1.15) * rng.uniform(0.93, 1.07, 3)
    light = 1.0 + 0.12 * _smooth_noise(rng, h, w, rng.uniform(1.5, 3))
    img = img * cv2.merge([light * np.float32(g) for g in gain])
    noise = np.float32(rng.uniform(2, 6)) * rng.standard_normal((h, w), dtype=np.float32)
    img += cv2.merge([noise, noise, noise])
    if rng.random() < 0.3:
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.5, 1.0))
    out = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    if grey:
        g = cv2.cvtColor(out, cv2.COLOR_RGB2GRAY)
        out = np.repeat(g[..., None], 3, axis=2)
    return out, objects


# --------------------------------------------------------------------------- planning


def _plan_categories(rng: np.random.Generator, n_images: int, max_objects: int) -> list[list[int]]:
    """Category indices of each image's objects; every class at least once when room allows."""
    counts = rng.integers(1, max_objects + 1, size=n_images)
    weights = np.asarray(CLASS_WEIGHTS, dtype=np.float64)
    plan = [[int(c) for c in rng.choice(len(CATEGORIES), size=int(n), p=weights / weights.sum())] for n in counts]
    order = rng.permutation(n_images)
    for c in range(len(CATEGORIES)):
        total = Counter(x for cats in plan for x in cats)
        if total[c]:
            continue
        for i in order:
            slots = [k for k, x in enumerate(plan[i]) if total[x] > 1]
            if slots:
                plan[i][slots[int(rng.integers(len(slots)))]] = c
                break
    return plan


def batch_names(n_batches: int) -> list[str]:
    """Folder names in the contest style: batch_01_vt, ..., batch_<n> (the last without _vt)."""
    return [f"batch_{k:02d}_vt" for k in range(1, n_batches)] + [f"batch_{n_batches:02d}"]


def _file_names(n_train: int, n_test: int, n_batches: int) -> tuple[list[str], list[str]]:
    """Relative file names: labelled images spread over all batches, test images over the _vt ones."""
    names = batch_names(n_batches)
    test_folders = names[:-1] or names
    folders = [names[i * n_batches // n_train] for i in range(n_train)]
    folders += [test_folders[i * len(test_folders) // n_test] for i in range(n_test)]
    per_folder = Counter(folders)
    digits = max(4, len(str(max(per_folder.values()))))
    seen: Counter = Counter()
    files = []
    for folder in folders:
        seen[folder] += 1
        files.append(f"{folder}/{seen[folder]:0{digits}d}.jpg")
    return files[:n_train], files[n_train:]


def _split(rng: np.random.Generator, plan: list[list[int]], val_fraction: float) -> list[int]:
    """Indices of validation images; the first image of every class stays in train."""
    n = len(plan)
    anchors = set()
    for c in range(len(CATEGORIES)):
        first = next((i for i, cats in enumerate(plan) if c in cats), None)
        if first is not None:
            anchors.add(first)
    candidates = [i for i in range(n) if i not in anchors]
    n_val = min(int(math.floor(val_fraction * n + 0.5)), len(candidates))
    return sorted(int(i) for i in rng.choice(candidates, size=n_val, replace=False)) if n_val else []


# --------------------------------------------------------------------------- output


def categories_json() -> list[dict[str, Any]]:
    return [{"id": i + 1, "name": name, "supercategory": name} for i, name in enumerate(CATEGORIES)]


def _coco(cfg: DemoConfig, images: list[dict], annotations: list[dict]) -> dict[str, Any]:
    return {
        "info": {
            "description": f"Recycle Trash demo dataset (procedurally rendered, seed {cfg.seed})",
            "version": "1.0",
            "year": 2021,
            "contributor": "pipeline.demo",
            "url": "",
            "date_created": "",
        },
        "licenses": [{"id": 0, "name": "CC BY 4.0", "url": "https://creativecommons.org/licenses/by/4.0/"}],
        "images": images,
        "categories": categories_json(),
        "annotations": annotations,
    }


def _dump(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=None, separators=(",", ":")), encoding="utf-8")


def _render_split(
    cfg: DemoConfig,
    root: Path,
    files: list[str],
    plan: list[list[int]],
    seeds: np.ndarray,
    bar: tqdm,
) -> tuple[list[dict], list[dict]]:
    images, annotations = [], []
    encode = [int(cv2.IMWRITE_JPEG_QUALITY), int(cfg.jpeg_quality)]
    for image_id, (file_name, cats, seed) in enumerate(zip(files, plan, seeds, strict=False)):
        rng = np.random.default_rng(int(seed))
        grey = bool(rng.random() < cfg.grey_fraction)
        img, objects = _render(rng, cats, cfg.height, cfg.width, grey)
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), encode)
        if not ok:
            raise PipelineError(f"{root / file_name}: JPEG encoding failed")
        (root / file_name).parent.mkdir(parents=True, exist_ok=True)
        (root / file_name).write_bytes(buf.tobytes())
        images.append({"id": image_id, "file_name": file_name, "height": cfg.height, "width": cfg.width})
        for obj in objects:
            annotations.append(
                {
                    "id": len(annotations),
                    "image_id": image_id,
                    "category_id": obj.category + 1,
                    "segmentation": [obj.poly],
                    "area": obj.area,
                    "bbox": _bbox(obj.poly),
                    "iscrowd": 0,
                }
            )
        bar.update(1)
    return images, annotations


def _subset(cfg: DemoConfig, images: list[dict], annotations: list[dict], ids: set[int]) -> dict[str, Any]:
    return _coco(cfg, [im for im in images if im["id"] in ids], [a for a in annotations if a["image_id"] in ids])


def run(cfg: DemoConfig) -> Path:
    """Render the demo dataset into ``cfg.out_dir`` (complete or not at all) and return its path."""
    cfg.validate()
    out = Path(cfg.out_dir)
    if out.exists() and not out.is_dir():
        raise PipelineError(f"{out}: exists and is not a folder")
    if out.exists() and not cfg.overwrite:
        raise PipelineError(f"{out}: already exists (set overwrite=true to replace it)")

    root_rng = np.random.default_rng(cfg.seed)
    train_plan = _plan_categories(root_rng, cfg.n_train, cfg.max_objects)
    test_plan = _plan_categories(root_rng, cfg.n_test, cfg.max_objects)
    val_idx = set(_split(root_rng, train_plan, cfg.val_fraction))
    seeds = root_rng.integers(0, 2**63 - 1, size=cfg.n_train + cfg.n_test, dtype=np.int64)
    train_files, test_files = _file_names(cfg.n_train, cfg.n_test, cfg.n_batches)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        with tqdm(total=cfg.n_train + cfg.n_test, desc="demo images", unit="img") as bar:
            images, anns = _render_split(cfg, tmp, train_files, train_plan, seeds[: cfg.n_train], bar)
            test_images, test_anns = _render_split(cfg, tmp, test_files, test_plan, seeds[cfg.n_train :], bar)
        all_ids = {im["id"] for im in images}
        _dump(tmp / "train_all.json", _coco(cfg, images, anns))
        _dump(tmp / "train.json", _subset(cfg, images, anns, all_ids - val_idx))
        _dump(tmp / "val.json", _subset(cfg, images, anns, val_idx))
        _dump(tmp / "test.json", _coco(cfg, test_images, []))
        _dump(tmp / "test_gt.json", _coco(cfg, test_images, test_anns))
        _install(tmp, out, cfg.overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    per_class = Counter(a["category_id"] for a in anns)
    log.info(
        "demo dataset %s: %d labelled images (%d train, %d val), %d test images, %d annotations (%d test); "
        "instances: %s",
        out,
        len(images),
        len(images) - len(val_idx),
        len(val_idx),
        len(test_images),
        len(anns),
        len(test_anns),
        ", ".join(f"{name}={per_class[i + 1]}" for i, name in enumerate(CATEGORIES)),
    )
    return out


def _install(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished folder into place, replacing an old one only when allowed."""
    if not out.exists():
        os.replace(tmp, out)
        return
    if not overwrite:
        raise PipelineError(f"{out}: already exists (set overwrite=true to replace it)")
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    os.replace(out, old / out.name)
    try:
        os.replace(tmp, out)
    except OSError:
        os.replace(old / out.name, out)
        raise
    finally:
        if out.exists():
            shutil.rmtree(old, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main(DemoConfig, run, argv, "Render a procedural demo dataset in the contest layout.")


if __name__ == "__main__":
    raise SystemExit(main())
