"""What the reports draw with: figures saved as PNG, the class palette, mask overlays, palette
PNGs of label maps, a class legend and COCO object-size bins."""

from __future__ import annotations

import colorsys
import io
from pathlib import Path

import numpy as np

from pipeline.core.io import atomic_write_bytes

AREA_SMALL = 32**2
AREA_MEDIUM = 96**2
AREA_BINS = ("small", "medium", "large")


def area_bin(area: float) -> int:
    """0, 1 or 2 for a COCO small / medium / large object (absolute thresholds)."""
    if area < AREA_SMALL:
        return 0
    return 1 if area < AREA_MEDIUM else 2


def class_palette(num_classes: int) -> np.ndarray:
    """Fixed RGB colours (uint8, K x 3): black for Background, then tab20, then golden-ratio hues."""
    from matplotlib import colormaps

    tab = colormaps["tab20"].colors
    order = list(range(0, 20, 2)) + list(range(1, 20, 2))  # the ten strong shades first
    out = np.zeros((num_classes, 3), np.uint8)
    for k in range(1, num_classes):
        if k - 1 < len(order):
            rgb = tab[order[k - 1]]
        else:
            rgb = colorsys.hsv_to_rgb((k * 0.618033988749895) % 1.0, 0.75, 0.95)
        out[k] = np.round(np.asarray(rgb) * 255).astype(np.uint8)
    return out


def overlay(image: np.ndarray, mask: np.ndarray, palette: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """RGB uint8 image with non-Background pixels tinted in the palette colour and class borders drawn."""
    import cv2

    out = image.astype(np.float32)
    fg = mask > 0
    out[fg] = (1 - alpha) * out[fg] + alpha * palette[mask[fg]].astype(np.float32)
    m = mask.astype(np.int32)
    border = np.zeros_like(fg)
    border[:, 1:] |= m[:, 1:] != m[:, :-1]
    border[1:, :] |= m[1:, :] != m[:-1, :]
    border &= cv2.dilate(fg.astype(np.uint8), np.ones((2, 2), np.uint8)).astype(bool)
    out[border & fg] = palette[mask[border & fg]]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def palette_png(labels: np.ndarray, palette: np.ndarray) -> bytes:
    """A label map (H x W class indices) as a palette ("P" mode) PNG: pixel value = class index, shown
    in ``palette`` colours (K x 3 uint8, K <= 256)."""
    from PIL import Image

    if len(palette) > 256:
        raise ValueError(f"a palette PNG holds at most 256 colours, got {len(palette)}")
    if labels.size and int(labels.max()) >= len(palette):
        raise ValueError(f"label {int(labels.max())} has no colour in a palette of {len(palette)}")
    img = Image.fromarray(np.ascontiguousarray(labels, dtype=np.uint8))
    img.putpalette(np.asarray(palette, np.uint8).tobytes(), rawmode="RGB")  # an "L" image becomes "P"
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def legend_figure(class_names: list[str], palette: np.ndarray, rows_per_column: int = 25):
    """A small figure: one swatch per class with its index and name, in columns of ``rows_per_column``."""
    from matplotlib.patches import Rectangle

    k = len(class_names)
    cols = max(1, -(-k // rows_per_column))
    rows = min(k, rows_per_column)
    fig = figure(2.6 * cols, 0.26 * rows + 0.1)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, cols)
    ax.set_ylim(rows, 0)
    ax.axis("off")
    for i, name in enumerate(class_names):
        x, y = i // rows_per_column, i % rows_per_column
        colour = np.asarray(palette[i], np.float64) / 255.0
        ax.add_patch(Rectangle((x + 0.03, y + 0.15), 0.14, 0.7, facecolor=colour, edgecolor="0.4", linewidth=0.6))
        ax.text(x + 0.22, y + 0.5, f"{i}  {name}", va="center", ha="left", fontsize=9)
    return fig


def figure(width: float, height: float, layout: str | None = None):
    """A matplotlib figure (100 dpi) drawn without pyplot's global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, path: Path, tight: bool = True) -> Path:
    """``fig`` as a PNG written atomically (``tight``: cropped to what is drawn)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, **({"bbox_inches": "tight"} if tight else {}))
    return atomic_write_bytes(path, buf.getvalue())
