"""The PNG cache of ground-truth maps: ``MaskCache`` stores each image's map (by the mask rule of
:mod:`pipeline.data.masks`) in a folder keyed by the annotation file's content, the rule and the rule
version, so an epoch never rasterizes twice and an edited file or another rule never reuses stale masks.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from pipeline.core.errors import DataError
from pipeline.core.io import atomic_write_bytes
from pipeline.data import masks
from pipeline.data.coco import CocoData

log = logging.getLogger(__name__)


class MaskCache:
    """PNG cache of ground-truth maps of ``coco`` by ``coco.mask_rule``.

    The folder ``<root>/<file stem>-<rule>-<hash>`` is keyed by the annotation file's
    content hash, the rule's name and ``MASK_RULE_VERSION``: two rules, two file versions
    or two rasterizer versions never share a folder.
    """

    def __init__(self, coco: CocoData, root: str | Path = ".cache/masks"):
        self.coco = coco
        self.rule = masks.check_mask_rule(coco.mask_rule)
        key = hashlib.sha1(f"{coco.digest}:{self.rule}:{masks.MASK_RULE_VERSION}".encode()).hexdigest()[:16]
        self.dir = Path(root) / f"{coco.path.stem}-{self.rule}-{key}"

    def path(self, image_id: int) -> Path:
        return self.dir / f"{image_id}.png"

    def get(self, image_id: int) -> np.ndarray:
        p = self.path(image_id)
        if p.is_file():
            m = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
            if m is not None:
                return m
            log.warning("%s: unreadable cached mask, rebuilding", p)
        m = self.coco.mask(image_id)
        ok, buf = cv2.imencode(".png", m, masks.PNG_PARAMS)
        if not ok:  # pragma: no cover - cv2 always encodes uint8/uint16 PNG
            raise DataError(f"{p}: could not encode mask")
        atomic_write_bytes(p, buf.tobytes())
        return m

    def class_pixels(self, image_id: int) -> np.ndarray:
        """Pixels of each class (K int64 counts; ignored pixels not counted) in the image's map."""
        k = self.coco.num_classes
        return np.bincount(self.get(image_id).ravel(), minlength=k)[:k]

    def build(self, image_ids: Sequence[int] | None = None, progress: bool = True) -> Path:
        from tqdm import tqdm

        ids = list(image_ids) if image_ids is not None else self.coco.image_ids
        todo = [i for i in ids if not self.path(i).is_file()]
        for image_id in tqdm(todo, desc="mask cache", disable=not progress or not todo, leave=False):
            self.get(image_id)
        return self.dir
