"""Instance targets: the objects of an image as masks, boxes and labels, what the instance families
(Mask R-CNN) train on instead of a class map (:mod:`pipeline.models.contract`).

Where they come from:

* **the annotation file's own instances** (:func:`annotation_instances`), for labelled images: one
  binary mask per annotation, rasterized as pycocotools' ``annToMask`` does (polygons or RLE,
  compressed or not; :func:`~pipeline.data.masks.annotation_mask`), labelled with its class index.
  Two objects of one class that touch stay two objects, and an object partly hidden under a
  smaller one keeps its whole mask, as the annotators drew it;
* **connected components per class of a class map** (:func:`component_instances`), where only class
  maps exist: the pseudo-labels of test images (:class:`ComponentTargets`), or class maps handed to
  a family's loss directly.  Ignore pixels (255) belong to no object.

Masks travel through the augmentation with their image in one albumentations call (its ``masks``
target: the same flips, affine and crop, nearest-neighbour); each box is then the tight box of its
augmented mask (:func:`boxes_of`), so a rotated or cropped object keeps a box that fits it, and an
object the augmentation moved out of the image is dropped.  Boxes are ``x0, y0, x1, y1`` on pixel
edges (a one-pixel object at column 3 spans 3..4), as COCO's ``bbox`` and torchvision's detection
models read them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.core.labels import IGNORE_INDEX
from pipeline.data.coco import CocoData
from pipeline.data.datasets import SegmentationDataset
from pipeline.data.images import read_image
from pipeline.data.masks import annotation_mask
from pipeline.data.transforms import IMAGENET, Preprocessing, normalize

Target = dict[
    str, torch.Tensor
]  # one image's objects: masks (n x H x W uint8), boxes (n x 4 float32), labels (n int64)


def annotation_instances(coco: CocoData, image_id: int) -> tuple[np.ndarray, np.ndarray]:
    """``(masks n x H x W uint8, labels n int64)`` of the image's annotations in file order; an
    annotation without a pixel on the image is left out."""
    im = coco.image(image_id)
    h, w = int(im["height"]), int(im["width"])
    index = coco.cat_to_index
    masks, labels = [], []
    for ann in coco.annotations(image_id):
        mask = annotation_mask(ann, h, w)
        if mask.any():
            masks.append(mask.astype(np.uint8))
            labels.append(index[int(ann["category_id"])])
    return _stacked(masks, (h, w)), np.asarray(labels, dtype=np.int64)


def component_instances(class_map: np.ndarray, ignore_index: int = IGNORE_INDEX) -> tuple[np.ndarray, np.ndarray]:
    """``(masks n x H x W uint8, labels n int64)``: the 8-connected components of each class of
    ``class_map`` but Background (0) and ``ignore_index``, classes in ascending order."""
    class_map = np.asarray(class_map)
    masks, labels = [], []
    for label in np.unique(class_map):
        if label == 0 or label == ignore_index:
            continue
        count, components = cv2.connectedComponents((class_map == label).astype(np.uint8), connectivity=8)
        for k in range(1, count):
            masks.append((components == k).astype(np.uint8))
            labels.append(int(label))
    return _stacked(masks, class_map.shape[:2]), np.asarray(labels, dtype=np.int64)


def _stacked(masks: Sequence[np.ndarray], size: tuple[int, int]) -> np.ndarray:
    return np.stack(masks) if len(masks) else np.zeros((0, *size), dtype=np.uint8)


def boxes_of(masks: torch.Tensor) -> torch.Tensor:
    """Tight boxes ``n x 4`` (x0, y0, x1, y1 on pixel edges, float32) of non-empty ``n x H x W`` masks."""
    if masks.shape[0] == 0:
        return torch.zeros((0, 4), dtype=torch.float32, device=masks.device)
    rows, cols = masks.any(2), masks.any(1)  # n x H, n x W
    h, w = rows.shape[1], cols.shape[1]
    y0 = rows.int().argmax(1)
    y1 = h - rows.flip(1).int().argmax(1)
    x0 = cols.int().argmax(1)
    x1 = w - cols.flip(1).int().argmax(1)
    return torch.stack([x0, y0, x1, y1], 1).float()


def make_target(masks: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> Target:
    """One image's target from ``n x H x W`` masks and their labels: empty masks dropped, boxes added."""
    masks = torch.as_tensor(np.ascontiguousarray(masks) if isinstance(masks, np.ndarray) else masks)
    labels = torch.as_tensor(labels, dtype=torch.int64)
    if masks.shape[0] != labels.shape[0]:
        raise ValueError(f"{masks.shape[0]} masks but {labels.shape[0]} labels")
    masks = masks.to(torch.uint8)
    keep = (masks.flatten(1) != 0).any(1)
    masks, labels = masks[keep], labels[keep]
    return {"masks": masks, "boxes": boxes_of(masks.bool()), "labels": labels}


class InstanceTargets:
    """The instance targets of a batch: one :data:`Target` per image.  It moves, slices and resizes
    as the training loop does with a batch of class maps (``to``, ``[start:stop]``, ``resized``)."""

    def __init__(self, items: Sequence[Target]):
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: slice) -> InstanceTargets:
        if not isinstance(index, slice):
            raise TypeError(f"instance targets are sliced by image ranges, got {index!r}")
        return InstanceTargets(self.items[index])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> InstanceTargets:
        return InstanceTargets(
            [{k: v.to(device, non_blocking=non_blocking) for k, v in item.items()} for item in self.items]
        )

    def resized(self, size: tuple[int, int]) -> InstanceTargets:
        """The targets at ``size`` (H, W): masks by nearest neighbour, boxes recomputed, vanished objects dropped."""
        out = []
        for item in self.items:
            masks = item["masks"]
            if masks.shape[0]:
                masks = torch.nn.functional.interpolate(masks[None].float(), size=tuple(size), mode="nearest")[0]
            else:
                masks = masks.new_zeros((0, *size))
            out.append(make_target(masks, item["labels"]))
        return InstanceTargets(out)


def component_targets(class_maps: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> InstanceTargets:
    """Instance targets of a batch of ``N x H x W`` class maps (connected components per class), on
    the maps' device."""
    items = []
    for class_map in class_maps.cpu().numpy():
        items.append(make_target(*component_instances(class_map, ignore_index)))
    return InstanceTargets(items).to(class_maps.device)


def augmented(
    transform: Callable[..., dict] | None, image: np.ndarray, masks: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``image`` and its ``n x H x W`` instance masks through one call of ``transform`` (same geometry)."""
    if transform is None:
        return image, masks
    if masks.shape[0] == 0:
        image = transform(image=image)["image"]
        return image, np.zeros((0, *image.shape[:2]), dtype=np.uint8)
    out = transform(image=image, masks=masks)
    return out["image"], np.asarray(out["masks"], dtype=np.uint8).reshape(-1, *out["image"].shape[:2])


class InstanceDataset(SegmentationDataset):
    """Labelled images with the annotation file's instances: ``(image float CxHxW, Target, meta)``.

    ``copy_paste`` (a :class:`~pipeline.data.copypaste.CopyPaste`) pastes objects before the
    augmentation; each pasted object hides what it covers and is one more instance.
    """

    def __init__(
        self,
        coco: CocoData,
        image_ids: Sequence[int] | None = None,
        transform: Callable[..., dict] | None = None,
        preprocessing: Preprocessing = IMAGENET,
        copy_paste: Any = None,
    ):
        super().__init__(coco, image_ids, transform, None, preprocessing)
        self.copy_paste = copy_paste

    def __getitem__(self, idx: int):
        image_id = self.image_ids[idx]
        meta = self.meta(image_id)
        image = read_image(self.coco.data_dir / meta["file_name"], (meta["height"], meta["width"]))
        masks, labels = annotation_instances(self.coco, image_id)
        if self.copy_paste is not None:
            image, masks, labels = self.copy_paste.paste_instances(image, masks, labels)
        image, masks = augmented(self.transform, image, masks)
        return normalize(image, self.preprocessing), make_target(masks, labels), meta


class ComponentTargets(Dataset):
    """Items ``(image, class map, meta)`` of ``base`` as ``(image, Target, meta)``: the connected
    components of each class (for pseudo-labels, which hold class maps only).  ``transform`` is the
    base's, so per-sample augmentation seeding reaches it."""

    def __init__(self, base: Dataset):
        self.base = base

    @property
    def transform(self) -> Any:
        return getattr(self.base, "transform", None)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, idx: int):
        image, class_map, meta = self.base[idx]
        return image, make_target(*component_instances(class_map.numpy())), meta


def collate_instances(batch):
    """Stacks images; the targets become one :class:`InstanceTargets`."""
    return torch.stack([b[0] for b in batch]), InstanceTargets([b[1] for b in batch]), [b[2] for b in batch]
