"""Contest data layer: COCO annotation files, class list, ground-truth masks, datasets.

* ``load_coco`` reads and validates a COCO file of the contest layout (paths in
  ``file_name`` are relative to ``DATA_DIR``).  The class list is Background followed by
  the file's categories in file order; class index k >= 1 is the k-th category.
* ``rasterize`` builds a ground-truth map by a mask rule (``MASK_RULES``): annotations
  sorted by the rule's key are painted one after the other, so a later one lies on top.
  The default rule ``area`` is the contest rule (``area`` descending, ties keep file
  order: smaller objects on top); ``polygon_length`` is the 2021 cohort's baseline rule
  (see :func:`rasterize`).  Polygons and RLE segmentations (compressed or not) are
  supported and rasterized exactly as pycocotools' ``annToMask`` does: a polygon running
  off the image is cut at the border, its coordinates are never changed.
* ``MaskCache`` stores rasterized maps as PNG files in a folder keyed by a hash of the
  annotation file's content, the mask rule and ``MASK_RULE_VERSION``, so a training epoch
  never rasterizes twice and an edited annotation file (or another rule) never reuses
  stale masks.
* ``SegmentationDataset`` returns ``(image float CxHxW, mask long HxW, meta)``;
  ``TestDataset`` returns ``(image, meta)``.  Augmentations are chosen by name.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import cv2
import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset

from pipeline.metrics import IGNORE_INDEX
from pipeline.utils import PipelineError, atomic_write_bytes

log = logging.getLogger(__name__)

BACKGROUND = "Background"
# Part of the mask-cache key, with the rule's name: bump whenever rasterization changes.
# v2: polygons running off the image are no longer clipped (corners kept, as pycocotools).
MASK_RULE_VERSION = "v2"
DEFAULT_MASK_RULE = "area"
OFF_IMAGE_REPAIR = "polygons running off the image (cut at the border when rasterized)"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

cv2.setNumThreads(0)

# PNG settings of the mask cache: no row filter and a middle zlib level decode about 4x
# faster than OpenCV's default (Z_RLE) for label maps, at about the same file size.
PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 3, cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_NONE]
_IMREAD_RGB = getattr(cv2, "IMREAD_COLOR_RGB", None)  # OpenCV >= 4.11 decodes straight to RGB


class DataError(PipelineError):
    """Bad contest data: the message names the file and the problem."""


@dataclass
class CocoData:
    """A validated COCO annotation file of the contest layout."""

    path: Path
    data_dir: Path
    images: list[dict[str, Any]]
    categories: list[dict[str, Any]]
    anns_by_image: dict[int, list[dict[str, Any]]]
    digest: str
    has_annotations: bool
    repairs: dict[str, int] = field(default_factory=dict)
    mask_rule: str = DEFAULT_MASK_RULE  # the name of the rule ``mask`` paints by (``MASK_RULES``)

    @property
    def class_names(self) -> list[str]:
        return [BACKGROUND] + [str(c["name"]) for c in self.categories]

    @property
    def num_classes(self) -> int:
        return len(self.categories) + 1

    @property
    def cat_to_index(self) -> dict[int, int]:
        return {int(c["id"]): i + 1 for i, c in enumerate(self.categories)}

    @property
    def index_to_cat(self) -> dict[int, int]:
        return {i + 1: int(c["id"]) for i, c in enumerate(self.categories)}

    @property
    def image_ids(self) -> list[int]:
        return [int(im["id"]) for im in self.images]

    def image(self, image_id: int) -> dict[str, Any]:
        return self._by_id[image_id]

    def image_path(self, image_id: int) -> Path:
        return self.data_dir / self._by_id[image_id]["file_name"]

    def __post_init__(self) -> None:
        check_mask_rule(self.mask_rule)
        self._by_id = {int(im["id"]): im for im in self.images}

    def annotations(self, image_id: int) -> list[dict[str, Any]]:
        return self.anns_by_image.get(image_id, [])

    def mask(self, image_id: int) -> np.ndarray:
        """Ground-truth class map of ``image_id`` by ``self.mask_rule``."""
        im = self._by_id[image_id]
        return rasterize(self.annotations(image_id), int(im["height"]), int(im["width"]), self.cat_to_index,
                         rule=self.mask_rule)


def file_digest(path: str | Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve_annotation(data_dir: str | Path, ann_file: str | Path) -> Path:
    """``ann_file`` relative to ``data_dir`` unless absolute; errors name what is missing."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: data directory not found (set DATA_DIR or data_dir=...)")
    path = Path(ann_file)
    if not path.is_absolute():
        path = data_dir / path
    if not path.is_file():
        raise DataError(f"{path}: annotation file not found")
    return path


def _runs_off_image(poly: Sequence[float], h: int, w: int) -> bool:
    """Whether a corner lies outside ``[0, w] x [0, h]``; raises ``ValueError`` for non-numbers."""
    arr = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
    return bool((arr[:, 0] < 0).any() or (arr[:, 0] > w).any() or (arr[:, 1] < 0).any() or (arr[:, 1] > h).any())


def load_coco(
    data_dir: str | Path,
    ann_file: str | Path = "train_all.json",
    require_annotations: bool = True,
    mask_rule: str = DEFAULT_MASK_RULE,
) -> CocoData:
    """Read and validate a contest-layout COCO file; ``mask_rule`` names the rule of ``CocoData.mask``.

    Fatal problems raise :class:`DataError` naming the file.  Repairable ones (polygons
    with fewer than 3 points are dropped) are counted in ``CocoData.repairs`` and reported
    by one warning, which also counts polygons running off the image: those are kept
    unchanged (pycocotools cuts them at the border when rasterizing; moving their corners
    onto the border would change their edges' slopes).
    """
    check_mask_rule(mask_rule)
    path = resolve_annotation(data_dir, ann_file)
    try:
        raw = path.read_bytes()
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: invalid JSON (not UTF-8 text)") from exc
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a COCO object at the top level, got {type(data).__name__}")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{path}: missing or invalid '{key}' list")
    categories = data["categories"]
    if not categories:
        raise DataError(f"{path}: the category list is empty")
    cat_ids = []
    for c in categories:
        if not isinstance(c, dict) or "id" not in c or "name" not in c:
            raise DataError(f"{path}: category entry {c!r} lacks 'id' or 'name'")
        cat_ids.append(int(c["id"]))
    dup_cats = [k for k, n in Counter(cat_ids).items() if n > 1]
    if dup_cats:
        raise DataError(f"{path}: duplicate category ids {sorted(dup_cats)}")

    images = data["images"]
    for im in images:
        if not isinstance(im, dict) or not {"id", "file_name", "height", "width"} <= set(im):
            raise DataError(f"{path}: image entry {im!r} lacks one of id, file_name, height, width")
        if int(im["height"]) < 1 or int(im["width"]) < 1:
            raise DataError(f"{path}: image {im['id']} ({im['file_name']}) has a non-positive size")
    ids = [int(im["id"]) for im in images]
    dups = [k for k, n in Counter(ids).items() if n > 1]
    if dups:
        raise DataError(f"{path}: duplicate image ids {sorted(dups)[:10]}")
    by_id = {int(im["id"]): im for im in images}
    known_cats = set(cat_ids)

    annotations = data.get("annotations") or []
    if not isinstance(annotations, list):
        raise DataError(f"{path}: 'annotations' must be a list")
    if require_annotations and not annotations:
        raise DataError(f"{path}: no annotations (a labelled file is required here)")

    repairs = Counter()
    anns_by_image: dict[int, list[dict[str, Any]]] = {}
    for ann in annotations:
        if not isinstance(ann, dict) or not {"image_id", "category_id", "segmentation"} <= set(ann):
            raise DataError(f"{path}: annotation {ann.get('id') if isinstance(ann, dict) else ann!r} lacks image_id, category_id or segmentation")
        aid = ann.get("id")
        image_id = int(ann["image_id"])
        if image_id not in by_id:
            raise DataError(f"{path}: annotation {aid} points to unknown image id {image_id}")
        if int(ann["category_id"]) not in known_cats:
            raise DataError(f"{path}: annotation {aid} points to unknown category id {ann['category_id']}")
        im = by_id[image_id]
        h, w = int(im["height"]), int(im["width"])
        seg = ann["segmentation"]
        if isinstance(seg, list):
            polys = []
            for poly in seg:
                if not isinstance(poly, (list, tuple)) or len(poly) < 6 or len(poly) % 2:
                    repairs["polygons with fewer than 3 points dropped"] += 1
                    continue
                try:
                    off_image = _runs_off_image(poly, h, w)
                except (TypeError, ValueError) as exc:
                    raise DataError(f"{path}: annotation {aid} has a polygon with non-numeric coordinates") from exc
                if off_image:
                    repairs[OFF_IMAGE_REPAIR] += 1
                polys.append(poly)
            if not polys:
                repairs["annotations without a valid polygon dropped"] += 1
                continue
            ann = {**ann, "segmentation": polys}
        elif isinstance(seg, dict) and "counts" in seg and "size" in seg:
            if [int(v) for v in seg["size"]] != [h, w]:
                raise DataError(f"{path}: annotation {aid} has an RLE of size {seg['size']} but image {image_id} is {h}x{w}")
        else:
            raise DataError(f"{path}: annotation {aid} has an unsupported segmentation {str(seg)[:80]}")
        anns_by_image.setdefault(image_id, []).append(ann)

    if repairs:
        log.warning("%s: repaired or noted annotations: %s", path, ", ".join(f"{n} {k}" for k, n in repairs.items()))
    return CocoData(
        path=path,
        data_dir=Path(data_dir),
        images=images,
        categories=categories,
        anns_by_image=anns_by_image,
        digest=hashlib.sha1(raw).hexdigest(),
        has_annotations=bool(annotations),
        repairs=dict(repairs),
        mask_rule=mask_rule,
    )


def annotation_mask(ann: dict[str, Any], h: int, w: int) -> np.ndarray:
    """Binary HxW mask of one annotation (polygons or RLE, compressed or not)."""
    seg = ann["segmentation"]
    if isinstance(seg, list):
        rles = mask_utils.frPyObjects(seg, h, w)
        rle = mask_utils.merge(rles)
    elif isinstance(seg["counts"], list):
        rle = mask_utils.frPyObjects(seg, h, w)
    else:
        rle = seg if isinstance(seg["counts"], bytes) else {**seg, "counts": seg["counts"].encode()}
    return mask_utils.decode(rle).astype(bool)


def annotation_area(ann: dict[str, Any], h: int, w: int) -> float:
    if "area" in ann and ann["area"] is not None:
        return float(ann["area"])
    return float(annotation_mask(ann, h, w).sum())


def mask_dtype(num_classes: int) -> np.dtype:
    return np.dtype(np.uint8) if num_classes < IGNORE_INDEX else np.dtype(np.uint16)


def _area_key(ann: dict[str, Any], h: int, w: int) -> tuple:
    """``area`` descending (the file's ``area`` field, else the mask's pixel count)."""
    return (-annotation_area(ann, h, w),)


def _polygon_length_key(ann: dict[str, Any], h: int, w: int) -> tuple:
    """Polygons: the length of the first polygon, ascending, after every RLE annotation.

    RLE annotations have no polygon: they fall back to the area rule and come first
    (``(0, -area)`` sorts before every ``(1, length)``), so they lie under all polygons.
    """
    seg = ann["segmentation"]
    if isinstance(seg, list):
        return (1, len(seg[0]) if seg else 0)
    return (0, -annotation_area(ann, h, w))


# name -> sort key of one annotation (ann, h, w); rasterize paints in ascending key order.
MASK_RULES: dict[str, Callable[[dict[str, Any], int, int], tuple]] = {
    "area": _area_key,
    "polygon_length": _polygon_length_key,
}


def check_mask_rule(rule: str) -> str:
    """``rule`` if it names a mask rule, else a :class:`PipelineError` listing the known ones."""
    if rule not in MASK_RULES:
        raise PipelineError(f"unknown mask rule {rule!r}; known: {', '.join(MASK_RULES)}")
    return rule


def rasterize(anns: Sequence[dict[str, Any]], h: int, w: int, cat_to_index: dict[int, int],
              rule: str = DEFAULT_MASK_RULE) -> np.ndarray:
    """Ground-truth class map: start from Background (0), paint annotations in the rule's order.

    Annotations are sorted by the rule's key, ascending and stable (ties keep file order),
    and painted one after the other, so a later annotation lies on top of an earlier one:

    * ``area`` (default; the 2022 cohorts' baseline and the contest rule): ``area``
      descending, so the smallest object ends on top; among equal areas the later one
      in the file ends on top.
    * ``polygon_length`` (the 2021 cohort's baseline): the length (number of coordinates,
      i.e. twice the number of corners) of the segmentation's first polygon, ascending,
      so the annotation with the longest first polygon ends on top; among equal lengths
      the later one in the file ends on top.  RLE segmentations have no polygon and fall
      back to the area key: they are painted first (under every polygon annotation), by
      ``area`` descending among themselves.

    Each annotation's pixels are those of pycocotools' ``annToMask`` on the unmodified
    segmentation (a polygon running off the image is cut at the border).
    """
    key = MASK_RULES[check_mask_rule(rule)]
    out = np.zeros((h, w), dtype=mask_dtype(len(cat_to_index) + 1))
    keys = [key(a, h, w) for a in anns]
    for i in sorted(range(len(anns)), key=lambda i: keys[i]):  # sorted() is stable
        out[annotation_mask(anns[i], h, w)] = cat_to_index[int(anns[i]["category_id"])]
    return out


class MaskCache:
    """PNG cache of ground-truth maps of ``coco`` by ``coco.mask_rule``.

    The folder ``<root>/<file stem>-<rule>-<hash>`` is keyed by the annotation file's
    content hash, the rule's name and ``MASK_RULE_VERSION``: two rules, two file versions
    or two rasterizer versions never share a folder.
    """

    def __init__(self, coco: CocoData, root: str | Path = ".cache/masks"):
        self.coco = coco
        self.rule = check_mask_rule(coco.mask_rule)
        key = hashlib.sha1(f"{coco.digest}:{self.rule}:{MASK_RULE_VERSION}".encode()).hexdigest()[:16]
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
        ok, buf = cv2.imencode(".png", m, PNG_PARAMS)
        if not ok:  # pragma: no cover - cv2 always encodes uint8/uint16 PNG
            raise DataError(f"{p}: could not encode mask")
        atomic_write_bytes(p, buf.tobytes())
        return m

    def build(self, image_ids: Sequence[int] | None = None, progress: bool = True) -> Path:
        from tqdm import tqdm

        ids = list(image_ids) if image_ids is not None else self.coco.image_ids
        todo = [i for i in ids if not self.path(i).is_file()]
        for image_id in tqdm(todo, desc="mask cache", disable=not progress or not todo, leave=False):
            self.get(image_id)
        return self.dir


def read_image(path: str | Path, expected_hw: tuple[int, int] | None = None) -> np.ndarray:
    """RGB uint8 HxWx3; greyscale files are replicated to three channels."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: image file not found")
    img = cv2.imread(str(path), cv2.IMREAD_COLOR if _IMREAD_RGB is None else _IMREAD_RGB)
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


def image_size_from_data(coco: CocoData, divisor: int = 32) -> tuple[int, int]:
    """The most common (height, width) of the file, rounded up to a multiple of ``divisor``."""
    (h, w), _ = Counter((int(im["height"]), int(im["width"])) for im in coco.images).most_common(1)[0]
    up = lambda v: int(-(-v // divisor) * divisor)  # noqa: E731
    return up(h), up(w)


# ----------------------------------------------------------------------------- transforms
def _augmentations(name: str, square: bool) -> list:
    """Augmentations of a preset; quarter turns only when the output is square (they swap H and W)."""
    import albumentations as A

    if name == "none":
        return []
    if name == "light":
        return [
            A.HorizontalFlip(p=0.5),
            A.Affine(scale=(0.9, 1.1), translate_percent=(-0.05, 0.05), rotate=(-10, 10), p=0.5),
            A.RandomBrightnessContrast(0.15, 0.15, p=0.5),
        ]
    if name == "strong":
        return [
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.2),
            *([A.RandomRotate90(p=0.3)] if square else []),
            A.Affine(scale=(0.75, 1.25), translate_percent=(-0.1, 0.1), rotate=(-20, 20), p=0.7),
            A.ColorJitter(0.25, 0.25, 0.25, 0.05, p=0.6),
            A.OneOf([A.GaussianBlur(blur_limit=(3, 5)), A.MotionBlur(blur_limit=5), A.GaussNoise()], p=0.3),
            A.CoarseDropout(p=0.3),
        ]
    raise PipelineError(f"unknown augmentation {name!r}; known: {', '.join(AUGMENTATIONS)}")


AUGMENTATIONS = ("none", "light", "strong")


def build_transform(name: str, size: tuple[int, int] | None) -> Callable[..., dict]:
    """Albumentations pipeline by name; images are resized to ``size`` (H, W) when given."""
    import albumentations as A

    if name not in AUGMENTATIONS:
        raise PipelineError(f"unknown augmentation {name!r}; known: {', '.join(AUGMENTATIONS)}")
    ops = list(_augmentations(name, square=size is not None and int(size[0]) == int(size[1])))
    if size is not None:
        ops.insert(0, A.Resize(int(size[0]), int(size[1])))
    return A.Compose(ops)


@functools.lru_cache(maxsize=8)
def _normalize_luts(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[np.ndarray, ...]:
    """Per channel, the float32 value of each uint8 level: (v / 255 - mean) / std."""
    levels = np.arange(256, dtype=np.float32) / np.float32(255.0)
    return tuple((levels - np.float32(m)) / np.float32(s) for m, s in zip(mean, std))


def to_tensor(image: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """HxWx3 uint8 -> normalized float32 3xHxW."""
    if image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == len(mean) == len(std):
        # One table look-up per channel, written straight into the CxHxW result.
        luts = _normalize_luts(tuple(float(m) for m in mean), tuple(float(s) for s in std))
        out = np.empty((image.shape[2], image.shape[0], image.shape[1]), dtype=np.float32)
        for c, plane in enumerate(cv2.split(image)):
            cv2.LUT(plane, luts[c], dst=out[c])
        return torch.from_numpy(out)
    t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return t.sub_(m).div_(s)


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
    ):
        self.coco = coco
        self.image_ids = list(image_ids) if image_ids is not None else coco.image_ids
        self.transform = transform
        self.cache = cache

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
        if self.transform is not None:
            out = self.transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        return to_tensor(image), torch.from_numpy(np.ascontiguousarray(mask).astype(np.int64)), meta


class TestDataset(Dataset):
    """Unlabelled images (test.json): ``(image float CxHxW, meta)``."""

    def __init__(self, coco: CocoData, image_ids: Sequence[int] | None = None, transform: Callable[..., dict] | None = None):
        self.coco = coco
        self.image_ids = list(image_ids) if image_ids is not None else coco.image_ids
        self.transform = transform

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, idx: int):
        meta = image_meta(self.coco, self.image_ids[idx])
        image = read_image(self.coco.data_dir / meta["file_name"], (meta["height"], meta["width"]))
        if self.transform is not None:
            image = self.transform(image=image)["image"]
        return to_tensor(image), meta
