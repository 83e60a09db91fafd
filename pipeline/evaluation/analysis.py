"""Error analysis of out-of-fold predictions: where the model is wrong and which labels look wrong.

From the fused OOF probabilities and the ground truth of every OOF image (at the stored OOF
resolution) it computes a row-normalised confusion matrix, per-class IoU with bootstrap
intervals over images, recall per ground-truth instance by object size (COCO bins, areas scaled
back to the image's own size), the worst images by per-image mIoU, and a ranking of likely label
errors: images whose labels the predictions contradict with high confidence over large areas.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from pipeline.core.labels import IGNORE_INDEX
from pipeline.data import CocoData, annotation_mask, resize_nearest
from pipeline.evaluation.metrics import confusion_matrix, iou_per_class
from pipeline.evaluation.visual import AREA_BINS, area_bin


@dataclass
class ImageResult:
    image_id: int
    labels: np.ndarray  # predicted class map at the OOF size
    gt: np.ndarray
    confident_wrong: float  # share of pixels predicted with p >= threshold and differing from the labels
    miou: float


@dataclass
class Analysis:
    class_names: list[str]
    confusion: np.ndarray  # K x K, rows = ground truth
    per_image: np.ndarray  # n x K x K
    images: list[ImageResult] = field(default_factory=list)
    recall_by_size: np.ndarray | None = None  # K x 3: mean instance recall per class and size bin
    instances_by_size: np.ndarray | None = None  # K x 3 counts

    def row_normalised(self) -> np.ndarray:
        rows = self.confusion.sum(1, keepdims=True)
        return np.divide(self.confusion, rows, out=np.zeros(self.confusion.shape), where=rows > 0)

    def iou_intervals(self, n_boot: int = 1000, seed: int = 0, level: float = 0.9) -> np.ndarray:
        """K x 3 (point, low, high) of each class's IoU; NaN where the class never occurs."""
        rng = np.random.default_rng(seed)
        n = len(self.per_image)
        point = iou_per_class(self.confusion)
        reps = np.empty((n_boot, len(point)))
        for b in range(n_boot):
            counts = np.bincount(rng.integers(0, n, n), minlength=n)
            reps[b] = iou_per_class(np.tensordot(counts, self.per_image, axes=1))
        alpha = (1 - level) / 2
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)  # classes absent from every replicate: NaN
            low, high = np.nanquantile(reps, alpha, axis=0), np.nanquantile(reps, 1 - alpha, axis=0)
        return np.stack([point, low, high], 1)

    def worst(self, n: int) -> list[ImageResult]:
        return sorted(self.images, key=lambda r: (r.miou, r.image_id))[:n]

    def label_error_ranking(self) -> list[ImageResult]:
        return sorted(self.images, key=lambda r: (-r.confident_wrong, r.image_id))


def instance_recall(
    coco: CocoData, image_id: int, labels: np.ndarray, gt_full: np.ndarray, sums: np.ndarray, counts: np.ndarray
) -> None:
    """Adds each visible ground-truth instance's recall (share of its pixels predicted as its
    class) to ``sums``/``counts`` (K x 3) by its size bin at the image's own size."""
    im = coco.image(image_id)
    h, w = int(im["height"]), int(im["width"])
    full = resize_nearest(labels, (h, w))
    index = coco.cat_to_index
    for ann in coco.annotations(image_id):
        c = index[int(ann["category_id"])]
        visible = annotation_mask(ann, h, w) & (gt_full == c)
        area = int(visible.sum())
        if area == 0:
            continue
        b = area_bin(area)
        sums[c, b] += float((full[visible] == c).mean())
        counts[c, b] += 1


def analyse(coco: CocoData, samples: Iterable[tuple[int, np.ndarray, np.ndarray]], threshold: float = 0.9) -> Analysis:
    """``samples``: (image id, fused probabilities K x h x w, ground truth h x w) of OOF images."""
    k = coco.num_classes
    images, per_image = [], []
    sums, counts = np.zeros((k, len(AREA_BINS))), np.zeros((k, len(AREA_BINS)), dtype=np.int64)
    for image_id, probs, gt in samples:
        labels = probs.argmax(0)
        cm = confusion_matrix(labels, gt, k)
        per_image.append(cm)
        valid = gt != IGNORE_INDEX
        wrong = (labels != gt) & (probs.max(0) >= threshold) & valid
        with np.errstate(all="ignore"):
            miou = float(np.nanmean(iou_per_class(cm)))
        images.append(ImageResult(int(image_id), labels, gt, float(wrong.sum() / max(1, valid.sum())), miou))
        instance_recall(coco, int(image_id), labels, coco.mask(int(image_id)), sums, counts)
    stack = np.stack(per_image) if per_image else np.zeros((0, k, k), dtype=np.int64)
    with np.errstate(all="ignore"):
        recall = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return Analysis(coco.class_names, stack.sum(0), stack, images, recall, counts)
