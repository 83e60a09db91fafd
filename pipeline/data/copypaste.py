"""Online class-targeted copy-paste and repeat-factor sampling for rare classes.

* :class:`ObjectBank` holds the objects of chosen classes from a run's *training* images only:
  an object is the pixels of one annotation that are visible in the ground-truth map after
  the mask rule (so a pasted object looks exactly as it was labelled), cropped to its box.
* :class:`CopyPaste` pastes ``1..max_objects`` of them into an image with probability ``p``,
  each with scale and horizontal-flip jitter at a random position, and paints the mask with
  the object's class on top.  It draws from numpy's global generator, which the training
  loop seeds per (seed, epoch, sample), so every draw of an image gets new objects and a
  resumed run repeats them exactly.
* :func:`repeat_factors`: the LVIS rule, r(image) = max over its classes of
  max(1, sqrt(t / f(class))) with f the share of training images containing the class.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from pipeline.core.errors import ConfigError
from pipeline.data.coco import CocoData
from pipeline.data.images import read_image
from pipeline.data.mask_cache import MaskCache
from pipeline.data.masks import annotation_mask

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PastedObject:
    image: np.ndarray  # h x w x 3 uint8 crop
    mask: np.ndarray  # h x w bool: the visible pixels
    label: int  # class index
    source: int  # image id it comes from


def class_image_counts(coco: CocoData, image_ids: Sequence[int]) -> np.ndarray:
    """Images containing each class (index 0 Background counts every image)."""
    counts = np.zeros(coco.num_classes, dtype=np.int64)
    index = coco.cat_to_index
    for i in image_ids:
        counts[sorted({index[int(a["category_id"])] for a in coco.annotations(i)})] += 1
    counts[0] = len(image_ids)
    return counts


def resolve_classes(coco: CocoData, image_ids: Sequence[int], names: Sequence[str] | None, rarest: int) -> list[int]:
    """Class indices by name, or the ``rarest`` present classes by training-image count."""
    if names:
        unknown = [n for n in names if n not in coco.class_names[1:]]
        if unknown:
            raise ConfigError(f"copy_paste_classes: unknown {unknown}; known: {', '.join(coco.class_names[1:])}")
        return [coco.class_names.index(n) for n in names]
    counts = class_image_counts(coco, image_ids)
    present = [c for c in range(1, coco.num_classes) if counts[c] > 0]
    return sorted(present, key=lambda c: (counts[c], c))[:rarest]


class ObjectBank:
    """Visible objects of ``classes`` in ``image_ids`` (the training split only)."""

    def __init__(
        self, coco: CocoData, image_ids: Sequence[int], classes: Sequence[int], cache: MaskCache | None = None
    ):
        self.classes = list(classes)
        self.objects: list[PastedObject] = []
        index = coco.cat_to_index
        for image_id in image_ids:
            anns = [a for a in coco.annotations(image_id) if index[int(a["category_id"])] in self.classes]
            if not anns:
                continue
            im = coco.image(image_id)
            h, w = int(im["height"]), int(im["width"])
            gt = cache.get(image_id) if cache is not None else coco.mask(image_id)
            image = read_image(coco.image_path(image_id), (h, w))
            for ann in anns:
                label = index[int(ann["category_id"])]
                visible = annotation_mask(ann, h, w) & (gt == label)
                ys, xs = np.nonzero(visible)
                if ys.size < 4:
                    continue
                y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
                self.objects.append(
                    PastedObject(image[y0:y1, x0:x1].copy(), visible[y0:y1, x0:x1].copy(), label, int(image_id))
                )
        log.info(
            "copy-paste: %d objects of classes %s from %d training images",
            len(self.objects),
            self.classes,
            len(image_ids),
        )

    def __len__(self) -> int:
        return len(self.objects)


class CopyPaste:
    """Pastes bank objects into (image, mask) pairs; see the module docstring."""

    def __init__(self, bank: ObjectBank, p: float = 0.5, max_objects: int = 2, scale: tuple[float, float] = (0.7, 1.3)):
        self.bank, self.p, self.max_objects, self.scale = bank, p, max_objects, scale

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not len(self.bank) or np.random.random() >= self.p:
            return image, mask
        image, mask = image.copy(), mask.copy()
        for _ in range(np.random.randint(1, self.max_objects + 1)):
            obj = self.bank.objects[np.random.randint(len(self.bank))]
            self.paste(image, mask, obj)
        return image, mask

    def place(self, h: int, w: int, obj: PastedObject) -> tuple[np.ndarray, np.ndarray, int, int]:
        """Draws where and how ``obj`` lands in an ``h x w`` image: its crop and visible pixels, scaled
        and maybe flipped, and the top-left corner ``(y, x)``."""
        s = np.random.uniform(*self.scale)
        oh = max(1, min(h, round(obj.mask.shape[0] * s)))
        ow = max(1, min(w, round(obj.mask.shape[1] * s)))
        crop = cv2.resize(obj.image, (ow, oh), interpolation=cv2.INTER_LINEAR)
        sel = cv2.resize(obj.mask.astype(np.uint8), (ow, oh), interpolation=cv2.INTER_NEAREST).astype(bool)
        if np.random.random() < 0.5:
            crop, sel = crop[:, ::-1], sel[:, ::-1]
        y, x = np.random.randint(0, h - oh + 1), np.random.randint(0, w - ow + 1)
        return crop, sel, y, x

    def paste(self, image: np.ndarray, mask: np.ndarray, obj: PastedObject) -> None:
        crop, sel, y, x = self.place(*mask.shape, obj)
        image[y : y + sel.shape[0], x : x + sel.shape[1]][sel] = crop[sel]
        mask[y : y + sel.shape[0], x : x + sel.shape[1]][sel] = obj.label

    def paste_instances(
        self, image: np.ndarray, masks: np.ndarray, labels: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The instance form of ``__call__`` (the same draws): ``n x H x W`` instance masks and their
        labels instead of a class map; a pasted object hides the pixels it covers from the instances
        under it and is one more instance."""
        if not len(self.bank) or np.random.random() >= self.p:
            return image, masks, labels
        image, masks, labels = image.copy(), [m.copy() for m in masks], list(labels)
        h, w = image.shape[:2]
        for _ in range(np.random.randint(1, self.max_objects + 1)):
            obj = self.bank.objects[np.random.randint(len(self.bank))]
            crop, sel, y, x = self.place(h, w, obj)
            placed = np.zeros((h, w), dtype=bool)
            placed[y : y + sel.shape[0], x : x + sel.shape[1]] = sel
            image[placed] = crop[sel]
            for m in masks:
                m[placed] = 0
            masks.append(placed.astype(np.uint8))
            labels.append(obj.label)
        return image, np.stack(masks), np.asarray(labels, dtype=np.int64)


def repeat_factors(coco: CocoData, image_ids: Sequence[int], threshold: float) -> np.ndarray:
    """LVIS repeat factor per image of ``image_ids`` (>= 1)."""
    freq = class_image_counts(coco, image_ids) / max(1, len(image_ids))
    index = coco.cat_to_index
    out = np.ones(len(image_ids))
    for row, image_id in enumerate(image_ids):
        classes = {index[int(a["category_id"])] for a in coco.annotations(image_id)}
        if classes:
            out[row] = max(max(1.0, float(np.sqrt(threshold / freq[c]))) for c in classes)
    return out
