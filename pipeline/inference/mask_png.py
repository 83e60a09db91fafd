"""Viewable predictions: per image a palette PNG of class indices and a colour overlay, and a legend.

Layout of a folder of viewable masks (names from :mod:`pipeline.core.layout`)::

    labels/<name>.png    "P" mode PNG at the image's own height x width: pixel value = class index
                         (Background 0), shown in the class palette
    overlays/<name>.jpg  the image blended with the coloured mask (alpha ``OVERLAY_ALPHA``)
    legend.png           class index and name -> colour
    classes.csv          class_index, class_name, r, g, b (the palette)
    index.csv            image_id, file_name, height, width, label, overlay (paths relative to the folder)

``<name>`` is the image's ``file_name`` without its extension, subfolders joined with ``__``
(``batch_01_vt/0001.jpg`` -> ``batch_01_vt__0001``); names that would still clash (``a.jpg`` and
``a.png``, or clash once case is ignored) keep their extension (``a_jpg``, ``a_png``), then a number.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import cv2
import numpy as np
import pandas as pd

from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_open, atomic_write_bytes
from pipeline.core.layout import PNG_CLASSES, PNG_INDEX, PNG_LABELS, PNG_LEGEND, PNG_OVERLAYS
from pipeline.data.images import read_image
from pipeline.evaluation.visual import class_palette, legend_figure, overlay, palette_png, save_png

log = logging.getLogger(__name__)

OVERLAY_ALPHA = 0.5
JPEG_QUALITY = 90
MAX_CLASSES = 256  # a palette PNG has at most 256 colours
NAME_SEP = "__"


def flat_stem(file_name: str) -> str:
    """``file_name`` without its extension, its folders joined with ``__`` (no path separator left)."""
    path = PurePosixPath(str(file_name).replace("\\", "/"))
    parts = [p for p in path.parent.parts if p not in ("/", ".", "")]
    return NAME_SEP.join([*parts, path.stem or path.name])


def png_names(file_names: Sequence[str]) -> list[str]:
    """One distinct output name per file name (in order; unique even where case is ignored)."""
    stems = [flat_stem(f) for f in file_names]
    clashes = Counter(s.casefold() for s in stems)
    taken: set[str] = set()
    out = []
    for file_name, stem in zip(file_names, stems, strict=True):
        name = stem
        if clashes[stem.casefold()] > 1:
            suffix = PurePosixPath(str(file_name)).suffix.lstrip(".")
            name = f"{stem}_{suffix}" if suffix else stem
        base, n = name, 2
        while name.casefold() in taken:
            name, n = f"{base}_{n}", n + 1
        taken.add(name.casefold())
        out.append(name)
    return out


class PngWriter:
    """Writes the viewable masks of the images ``items`` ((image_id, file_name) pairs, ``file_name``
    relative to ``root``); ``close()`` writes the legend, the palette and the index."""

    def __init__(self, folder: str | Path, root: str | Path, class_names: Sequence[str], items: Sequence[tuple]):
        self.class_names = list(class_names)
        if len(self.class_names) > MAX_CLASSES:
            raise PipelineError(
                f"png=true: a palette PNG holds at most {MAX_CLASSES} classes; the checkpoint has "
                f"{len(self.class_names)}"
            )
        self.folder = Path(folder)
        self.root = Path(root)
        self.palette = class_palette(len(self.class_names))
        ids = [int(image_id) for image_id, _ in items]
        files = [str(file_name) for _, file_name in items]
        self.files = dict(zip(ids, files, strict=True))
        self.names = dict(zip(ids, png_names(files), strict=True))
        for sub in (PNG_LABELS, PNG_OVERLAYS):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = []

    def write(self, image_id: int, labels: np.ndarray) -> None:
        """``labels``: the H x W class-index map of image ``image_id`` at its own size."""
        file_name, name = self.files[int(image_id)], self.names[int(image_id)]
        image = read_image(self.root / file_name)
        if image.shape[:2] != labels.shape:
            raise PipelineError(
                f"{self.root / file_name}: image of {image.shape[1]}x{image.shape[0]} (WxH), but its predicted map is "
                f"{labels.shape[1]}x{labels.shape[0]}"
            )
        labels = labels.astype(np.uint8)
        label_file = f"{PNG_LABELS}/{name}.png"
        overlay_file = f"{PNG_OVERLAYS}/{name}.jpg"
        atomic_write_bytes(self.folder / label_file, palette_png(labels, self.palette))
        tinted = cv2.cvtColor(overlay(image, labels, self.palette, OVERLAY_ALPHA), cv2.COLOR_RGB2BGR)
        ok, jpeg = cv2.imencode(".jpg", tinted, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        if not ok:
            raise PipelineError(f"{self.folder / overlay_file}: the overlay cannot be encoded as JPEG")
        atomic_write_bytes(self.folder / overlay_file, jpeg.tobytes())
        self.rows.append(
            {
                "image_id": int(image_id),
                "file_name": file_name,
                "height": int(labels.shape[0]),
                "width": int(labels.shape[1]),
                "label": label_file,
                "overlay": overlay_file,
            }
        )

    def close(self) -> Path:
        save_png(legend_figure(self.class_names, self.palette), self.folder / PNG_LEGEND)
        classes = pd.DataFrame(
            {
                "class_index": range(len(self.class_names)),
                "class_name": self.class_names,
                "r": self.palette[:, 0],
                "g": self.palette[:, 1],
                "b": self.palette[:, 2],
            }
        )
        index = pd.DataFrame(self.rows, columns=["image_id", "file_name", "height", "width", "label", "overlay"])
        for table, name in ((classes, PNG_CLASSES), (index.sort_values("image_id"), PNG_INDEX)):
            with atomic_open(self.folder / name, "w", newline="") as fh:
                table.to_csv(fh, index=False)
        return self.folder

    def __enter__(self) -> PngWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
