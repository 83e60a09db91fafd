"""Datasets of labelled and test images.

``SegmentationDataset`` returns ``(image float CxHxW, mask long HxW, meta)``; ``ValDataset``
the same with the image resized to the training size and the mask at the image's own
size; ``TestDataset`` returns ``(image, meta)``, as does ``FolderDataset`` for image files
without an annotation file.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.data.coco import CocoData
from pipeline.data.images import read_image
from pipeline.data.mask_cache import MaskCache
from pipeline.data.transforms import IMAGENET, Preprocessing, build_transform, normalize


def image_meta(coco: CocoData, image_id: int) -> dict[str, Any]:
    """The per-item record the datasets return: id, file name and the image's own size."""
    im = coco.image(image_id)
    return {"image_id": image_id, "file_name": im["file_name"], "height": int(im["height"]), "width": int(im["width"])}


class SegmentationDataset(Dataset):
    """Labelled images: ``(image float CxHxW, mask long HxW, meta)``."""

    def __init__(
        self,
        coco: CocoData,
        image_ids: Sequence[int] | None = None,
        transform: Callable[..., dict] | None = None,
        cache: MaskCache | None = None,
        preprocessing: Preprocessing = IMAGENET,
        pairs: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None,
    ):
        self.coco = coco
        self.image_ids = list(image_ids) if image_ids is not None else coco.image_ids
        self.transform = transform
        self.cache = cache
        self.preprocessing = preprocessing
        self.pairs = pairs  # an (image, mask) -> (image, mask) step before the transform (copy-paste)

    def __len__(self) -> int:
        return len(self.image_ids)

    def meta(self, image_id: int) -> dict[str, Any]:
        return image_meta(self.coco, image_id)

    def load(self, idx: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """Untransformed RGB image, ground-truth map (cached when a cache is set) and meta of item ``idx``."""
        image_id = self.image_ids[idx]
        meta = self.meta(image_id)
        image = read_image(self.coco.data_dir / meta["file_name"], (meta["height"], meta["width"]))
        mask = self.cache.get(image_id) if self.cache is not None else self.coco.mask(image_id)
        return image, mask, meta

    def __getitem__(self, idx: int):
        image, mask, meta = self.load(idx)
        if self.pairs is not None:
            image, mask = self.pairs(image, mask)
        if self.transform is not None:
            out = self.transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        return normalize(image, self.preprocessing), torch.from_numpy(np.ascontiguousarray(mask).astype(np.int64)), meta


class TestDataset(Dataset):
    """Unlabelled images (test.json): ``(image float CxHxW, meta)``."""

    def __init__(
        self,
        coco: CocoData,
        image_ids: Sequence[int] | None = None,
        transform: Callable[..., dict] | None = None,
        preprocessing: Preprocessing = IMAGENET,
    ):
        self.coco = coco
        self.image_ids = list(image_ids) if image_ids is not None else coco.image_ids
        self.transform = transform
        self.preprocessing = preprocessing

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, idx: int):
        meta = image_meta(self.coco, self.image_ids[idx])
        image = read_image(self.coco.data_dir / meta["file_name"], (meta["height"], meta["width"]))
        if self.transform is not None:
            image = self.transform(image=image)["image"]
        return normalize(image, self.preprocessing), meta


class FolderDataset(Dataset):
    """Image files without an annotation file: ``(image float CxHxW, meta)``, ``meta`` as the other
    datasets' with ``image_id`` the position in ``file_names`` (paths relative to ``root``)."""

    def __init__(
        self,
        root: str | Path,
        file_names: Sequence[str],
        sizes: Sequence[tuple[int, int]],
        transform: Callable[..., dict] | None = None,
        preprocessing: Preprocessing = IMAGENET,
    ):
        if len(file_names) != len(sizes):
            raise ValueError(f"{len(file_names)} files but {len(sizes)} sizes")
        self.root = Path(root)
        self.file_names = list(file_names)
        self.sizes = [(int(h), int(w)) for h, w in sizes]
        self.transform = transform
        self.preprocessing = preprocessing

    def __len__(self) -> int:
        return len(self.file_names)

    def __getitem__(self, idx: int):
        (h, w), name = self.sizes[idx], self.file_names[idx]
        meta = {"image_id": idx, "file_name": name, "height": h, "width": w}
        image = read_image(self.root / name, (h, w))
        if self.transform is not None:
            image = self.transform(image=image)["image"]
        return normalize(image, self.preprocessing), meta


class ValDataset(Dataset):
    """Validation images resized to the training size, masks kept at the image's own size."""

    def __init__(self, base: SegmentationDataset, size: tuple[int, int]):
        self.base = base
        self.resize = build_transform("none", size)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, idx: int):
        image, mask, meta = self.base.load(idx)
        image = self.resize(image=image)["image"]
        return normalize(image, self.base.preprocessing), torch.from_numpy(mask.astype(np.int64)), meta


def collate(batch):
    """Stacks images; masks are stacked when they share a size, else kept as a list."""
    images = torch.stack([b[0] for b in batch])
    masks = [b[1] for b in batch]
    same = all(m.shape == masks[0].shape for m in masks)
    metas = [b[2] for b in batch]
    return images, (torch.stack(masks) if same else masks), metas


def collate_test(batch):
    """Test batches as (images, None, metas), the shape of labelled batches."""
    return torch.stack([b[0] for b in batch]), None, [b[1] for b in batch]
