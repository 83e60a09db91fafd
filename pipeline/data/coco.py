"""COCO annotation files of the contest layout: reading, validation, the class list.

``load_coco`` reads and validates a file (``file_name`` paths are relative to ``DATA_DIR``);
fatal problems raise :class:`DataError` naming the file.  The class list is Background
followed by the file's categories in file order; class index k >= 1 is the k-th category.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import DataError
from pipeline.data.masks import DEFAULT_MASK_RULE, check_mask_rule, rasterize

log = logging.getLogger(__name__)


BACKGROUND = "Background"


OFF_IMAGE_REPAIR = "polygons running off the image (cut at the border when rasterized)"


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
        return rasterize(
            self.annotations(image_id), int(im["height"]), int(im["width"]), self.cat_to_index, rule=self.mask_rule
        )


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


def _int(path: Path, value: Any, what: str) -> int:
    """``int(value)`` or a DataError naming the file and the field."""
    try:
        if isinstance(value, bool):
            raise TypeError
        return int(value)
    except (TypeError, ValueError):
        raise DataError(f"{path}: {what} must be an integer, got {value!r}") from None


def _read_json(path: Path) -> tuple[bytes, dict[str, Any]]:
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
    return raw, data


def _check_categories(path: Path, categories: list[Any]) -> set[int]:
    if not categories:
        raise DataError(f"{path}: the category list is empty")
    cat_ids = []
    for c in categories:
        if not isinstance(c, dict) or "id" not in c or "name" not in c:
            raise DataError(f"{path}: category entry {c!r} lacks 'id' or 'name'")
        cat_ids.append(_int(path, c["id"], f"category id of {c.get('name')!r}"))
    dup_cats = [k for k, n in Counter(cat_ids).items() if n > 1]
    if dup_cats:
        raise DataError(f"{path}: duplicate category ids {sorted(dup_cats)}")
    return set(cat_ids)


def _check_images(path: Path, images: list[Any]) -> dict[int, dict[str, Any]]:
    for im in images:
        if not isinstance(im, dict) or not {"id", "file_name", "height", "width"} <= set(im):
            raise DataError(f"{path}: image entry {im!r} lacks one of id, file_name, height, width")
        _int(path, im["id"], "image id")
        h = _int(path, im["height"], f"height of image {im['id']}")
        w = _int(path, im["width"], f"width of image {im['id']}")
        if h < 1 or w < 1:
            raise DataError(f"{path}: image {im['id']} ({im['file_name']}) has a non-positive size")
    ids = [int(im["id"]) for im in images]
    dups = [k for k, n in Counter(ids).items() if n > 1]
    if dups:
        raise DataError(f"{path}: duplicate image ids {sorted(dups)[:10]}")
    return {int(im["id"]): im for im in images}


def _checked_polygons(path: Path, aid: Any, seg: list[Any], h: int, w: int, repairs: Counter) -> list[Any]:
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
    return polys


def _checked_annotation(
    path: Path, ann: Any, by_id: dict[int, dict[str, Any]], known_cats: set[int], repairs: Counter
) -> dict[str, Any] | None:
    """The annotation as the pipeline keeps it, None when nothing of it is usable."""
    if not isinstance(ann, dict) or not {"image_id", "category_id", "segmentation"} <= set(ann):
        what = ann.get("id") if isinstance(ann, dict) else ann
        raise DataError(f"{path}: annotation {what!r} lacks image_id, category_id or segmentation")
    aid = ann.get("id")
    image_id = _int(path, ann["image_id"], f"image_id of annotation {aid}")
    if image_id not in by_id:
        raise DataError(f"{path}: annotation {aid} points to unknown image id {image_id}")
    if _int(path, ann["category_id"], f"category_id of annotation {aid}") not in known_cats:
        raise DataError(f"{path}: annotation {aid} points to unknown category id {ann['category_id']}")
    h, w = int(by_id[image_id]["height"]), int(by_id[image_id]["width"])
    seg = ann["segmentation"]
    if isinstance(seg, list):
        polys = _checked_polygons(path, aid, seg, h, w, repairs)
        if not polys:
            repairs["annotations without a valid polygon dropped"] += 1
            return None
        return {**ann, "segmentation": polys}
    if isinstance(seg, dict) and "counts" in seg and "size" in seg:
        if [_int(path, v, f"RLE size of annotation {aid}") for v in seg["size"]] != [h, w]:
            raise DataError(
                f"{path}: annotation {aid} has an RLE of size {seg['size']} but image {image_id} is {h}x{w}"
            )
        return ann
    raise DataError(f"{path}: annotation {aid} has an unsupported segmentation {str(seg)[:80]}")


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
    raw, data = _read_json(path)
    known_cats = _check_categories(path, data["categories"])
    by_id = _check_images(path, data["images"])
    annotations = data.get("annotations") or []
    if not isinstance(annotations, list):
        raise DataError(f"{path}: 'annotations' must be a list")
    if require_annotations and not annotations:
        raise DataError(f"{path}: no annotations (a labelled file is required here)")
    repairs: Counter = Counter()
    anns_by_image: dict[int, list[dict[str, Any]]] = {}
    for ann in annotations:
        kept = _checked_annotation(path, ann, by_id, known_cats, repairs)
        if kept is not None:
            anns_by_image.setdefault(int(kept["image_id"]), []).append(kept)
    if repairs:
        log.warning("%s: repaired or noted annotations: %s", path, ", ".join(f"{n} {k}" for k, n in repairs.items()))
    return CocoData(
        path=path,
        data_dir=Path(data_dir),
        images=data["images"],
        categories=data["categories"],
        anns_by_image=anns_by_image,
        digest=hashlib.sha1(raw).hexdigest(),
        has_annotations=bool(annotations),
        repairs=dict(repairs),
        mask_rule=mask_rule,
    )
