"""Reading images: RGB uint8 (greyscale replicated to three channels), size checks, folders of images."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from pipeline.core.errors import DataError

if TYPE_CHECKING:
    from pipeline.data.coco import CocoData

cv2.setNumThreads(0)


_IMREAD_RGB = getattr(cv2, "IMREAD_COLOR_RGB", None)  # OpenCV >= 4.11 decodes straight to RGB

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


def read_image(path: str | Path, expected_hw: tuple[int, int] | None = None) -> np.ndarray:
    """RGB uint8 HxWx3; greyscale files are replicated to three channels."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: image file not found")
    img = cv2.imread(str(path), cv2.IMREAD_COLOR if _IMREAD_RGB is None else _IMREAD_RGB)
    return _checked_rgb(img, path, expected_hw)


def decode_image(data: bytes, path: str | Path, expected_hw: tuple[int, int] | None = None) -> np.ndarray:
    """:func:`read_image` of a file's bytes already read (``path`` names it in errors)."""
    buf = np.frombuffer(data, dtype=np.uint8)
    img = cv2.imdecode(buf, cv2.IMREAD_COLOR if _IMREAD_RGB is None else _IMREAD_RGB) if buf.size else None
    return _checked_rgb(img, Path(path), expected_hw)


def _checked_rgb(img: np.ndarray | None, path: Path, expected_hw: tuple[int, int] | None) -> np.ndarray:
    if img is None:
        raise DataError(f"{path}: image file cannot be decoded")
    if expected_hw is not None and img.shape[:2] != tuple(expected_hw):
        raise DataError(
            f"{path}: real size {img.shape[1]}x{img.shape[0]} (WxH) differs from the annotation file's "
            f"{expected_hw[1]}x{expected_hw[0]}"
        )
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB) if _IMREAD_RGB is None else img


def verify_images(coco: CocoData, progress: bool = True) -> int:
    """Decode every image of ``coco`` and check its size; raises on the first bad file."""
    from tqdm import tqdm

    for im in tqdm(coco.images, desc="checking images", disable=not progress, leave=False):
        read_image(coco.data_dir / im["file_name"], (int(im["height"]), int(im["width"])))
    return len(coco.images)


def common_image_size(coco: CocoData) -> tuple[int, int]:
    """The most common (height, width) of the file's images."""
    (h, w), _ = Counter((int(im["height"]), int(im["width"])) for im in coco.images).most_common(1)[0]
    return h, w


def image_size_from_data(coco: CocoData, divisor: int = 32) -> tuple[int, int]:
    """The most common (height, width) of the file, rounded up to a multiple of ``divisor``."""
    h, w = common_image_size(coco)
    up = lambda v: int(-(-v // divisor) * divisor)  # noqa: E731
    return up(h), up(w)


def list_images(folder: str | Path, exclude: str | Path | None = None) -> list[Path]:
    """Image files (``IMAGE_SUFFIXES``, any case) in ``folder`` and its subfolders, sorted by their
    path relative to it; hidden files and folders (a leading dot) and anything under ``exclude``
    (for example the folder the predictions of these images go to) are left out."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: image folder not found")
    skip = Path(exclude).resolve() if exclude is not None else None
    found = []
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if skip is not None and path.resolve().is_relative_to(skip):
            continue
        if path.is_file():
            found.append(path)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())
