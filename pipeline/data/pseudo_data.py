"""Pseudo-labels for training: label maps of unlabelled (test) images written by ``make pseudo``.

A pseudo-label folder holds ``manifest.json`` (source ensemble, thresholds, round, the test
annotation file and its digest, one entry per image) and one PNG label map per image where
unconfident pixels are 255 (ignored by every loss and metric).  :class:`PseudoDataset`
serves them like :class:`~pipeline.data.datasets.SegmentationDataset`; pseudo-labelled images
only ever join a run's training images, never its validation fold.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.core.errors import DataError
from pipeline.data.coco import CocoData, load_coco
from pipeline.data.datasets import image_meta
from pipeline.data.image_cache import map_tensor
from pipeline.data.images import read_image
from pipeline.data.transforms import IMAGENET, Preprocessing, normalize

MANIFEST = "manifest.json"


def read_manifest(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise DataError(f"{path}: pseudo-label manifest not found (write one with make pseudo)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON ({exc})") from exc
    for key in ("images", "class_names", "test_ann", "round"):
        if key not in data:
            raise DataError(f"{path}: not a pseudo-label manifest (no {key!r})")
    return data


class PseudoDataset(Dataset):
    """Pseudo-labelled images: ``(image float CxHxW, mask long HxW with 255 = ignore, meta)``; with
    ``preprocessing=None`` as the cached datasets give theirs (uint8 HxWx3, the map as
    :func:`~pipeline.data.image_cache.map_tensor`), normalised on the device."""

    def __init__(
        self,
        folder: str | Path,
        data_dir: str | Path,
        class_names: Sequence[str],
        transform: Callable[..., dict] | None = None,
        preprocessing: Preprocessing | None = IMAGENET,
    ):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        if list(self.manifest["class_names"]) != list(class_names):
            raise DataError(
                f"{self.folder / MANIFEST}: classes {self.manifest['class_names']} differ from the "
                f"training data's {list(class_names)}"
            )
        self.coco: CocoData = load_coco(data_dir, Path(self.manifest["test_ann"]).name, require_annotations=False)
        self.items = [(int(e["image_id"]), self.folder / e["file"]) for e in self.manifest["images"]]
        for image_id, path in self.items:
            if not path.is_file():
                raise DataError(f"{path}: pseudo-label map listed in the manifest is missing")
            self.coco.image(image_id)  # unknown ids fail here
        self.transform = transform
        self.preprocessing = preprocessing

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, idx: int):
        image_id, path = self.items[idx]
        meta = image_meta(self.coco, image_id)
        image = read_image(self.coco.data_dir / meta["file_name"], (meta["height"], meta["width"]))
        mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if mask is None or mask.shape != image.shape[:2]:
            raise DataError(f"{path}: unreadable pseudo-label map or not {image.shape[0]}x{image.shape[1]}")
        if self.transform is not None:
            out = self.transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        if self.preprocessing is None:
            return torch.from_numpy(np.ascontiguousarray(image)), map_tensor(np.ascontiguousarray(mask)), meta
        return normalize(image, self.preprocessing), torch.from_numpy(np.ascontiguousarray(mask).astype(np.int64)), meta


class JoinedDataset(Dataset):
    """Labelled then pseudo-labelled items; exposes the shared ``transform`` so per-sample
    augmentation seeding applies to both."""

    def __init__(self, first: Dataset, second: Dataset):
        self.parts = [first, second]
        self.transform = getattr(first, "transform", None)

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def __getitem__(self, idx: int):
        first = self.parts[0]
        return first[idx] if idx < len(first) else self.parts[1][idx - len(first)]
