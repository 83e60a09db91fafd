"""Decoded training images, cached once per dataset and training size, and the batches' trip to the device.

``ImageCache`` holds every labelled image of an annotation file resized to one training size, as one
memory-mapped uint8 array (``images.npy``, N x H x W x 3) beside the ground-truth maps resized the same
way (``masks.npy``), as nnU-Net keeps its preprocessed arrays.  Its folder is keyed by the annotation
file's digest, the mask rule, the size and the cache version; each row records its image file's sha1,
re-checked when the file's size or modification time changes, so an edited image is decoded again and
never read stale.  A row is exactly what the training transform's first step (``Resize`` to the
training size) makes of the decoded file, so a run reads the same pixels with or without the cache.

The cached datasets return uint8 images (H x W x 3, as stored) and uint8 / int32 maps: a batch crosses
to the device at a quarter of float32's bytes, and :class:`DeviceBatches` converts it there to the
encoder's normalised float input, with the same arithmetic as :func:`pipeline.data.transforms.normalize`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.core.errors import DataError
from pipeline.core.io import atomic_write_text, exclusive_lock
from pipeline.data.coco import CocoData
from pipeline.data.datasets import image_meta
from pipeline.data.images import decode_image
from pipeline.data.mask_cache import MaskCache
from pipeline.data.masks import MASK_RULE_VERSION, check_mask_rule, mask_dtype
from pipeline.data.transforms import IMAGENET, Preprocessing, normalize_into

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when what a row holds changes
SPARE_DISK_BYTES = 512 * 2**20  # free space an automatic cache leaves on its disk


def cache_bytes(num_images: int, size: Sequence[int], num_classes: int) -> int:
    """Bytes of a cache of ``num_images`` images at ``size`` (H, W): the images and their maps."""
    pixels = int(num_images) * int(size[0]) * int(size[1])
    return pixels * (3 + mask_dtype(num_classes).itemsize)


def _resize_step(size: tuple[int, int]) -> Callable[..., dict]:
    import albumentations as A

    return A.Resize(size[0], size[1])


class ImageCache:
    """Every image of ``coco`` and its ground-truth map at ``size`` (H, W), memory-mapped uint8.

    The folder ``<root>/<file stem>-<H>x<W>-<hash>`` is keyed by the annotation file's content, the
    mask rule and :data:`CACHE_VERSION`.  :meth:`build` fills it (or refreshes the rows of images whose
    files changed); the arrays open read-only on first use in each process, loader workers included.
    """

    def __init__(self, coco: CocoData, size: Sequence[int], root: str | Path, masks: MaskCache | None = None):
        self.coco = coco
        self.masks = masks  # where the maps come from when rows are written (else rasterized afresh)
        self.size = (int(size[0]), int(size[1]))
        rule = check_mask_rule(coco.mask_rule)
        key = f"{coco.digest}:{rule}:{MASK_RULE_VERSION}:{self.size}:{CACHE_VERSION}"
        digest = hashlib.sha1(key.encode()).hexdigest()[:16]
        self.dir = Path(root) / f"{coco.path.stem}-{self.size[0]}x{self.size[1]}-{digest}"
        self.rows = {image_id: i for i, image_id in enumerate(coco.image_ids)}
        self._images: np.ndarray | None = None
        self._masks: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        return cache_bytes(len(self.rows), self.size, self.coco.num_classes)

    @property
    def index_path(self) -> Path:
        return self.dir / "index.json"

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_images": None, "_masks": None}  # each process maps the files itself

    # ------------------------------------------------------------------------- building
    def built(self) -> bool:
        return self.index_path.is_file()

    def build(self, progress: bool = True) -> ImageCache:
        """Decode and resize every image not cached yet, or whose file changed since; returns self."""
        with exclusive_lock(self.dir.with_name(self.dir.name + ".lock")):
            index = self._read_index()
            if index is None:
                self._create(progress)
                return self
            stale = self._stale(index)
            if stale:
                log.info("%s: %d image files changed since they were cached; decoding them again", self.dir, len(stale))
                self._write_rows(stale, index, progress)
        return self

    def _read_index(self) -> dict[str, Any] | None:
        if not self.index_path.is_file():
            return None
        try:
            index = json.loads(self.index_path.read_text(encoding="utf-8"))
            ok = index.get("version") == CACHE_VERSION and len(index.get("files", [])) == len(self.rows)
        except (OSError, ValueError) as exc:
            log.warning("%s: unreadable (%s); building the image cache again", self.index_path, exc)
            return None
        if not ok:
            log.warning("%s: written by another version; building the image cache again", self.index_path)
            return None
        return index

    def _create(self, progress: bool) -> None:
        """A new folder: arrays written in a temporary folder, renamed into place when complete."""
        tmp = self.dir.with_name(f".{self.dir.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        if self.dir.exists():
            shutil.rmtree(self.dir)  # an earlier build that stopped before its index was written
        tmp.mkdir(parents=True)
        n, (h, w) = len(self.rows), self.size
        dtype = mask_dtype(self.coco.num_classes)
        np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8, shape=(n, h, w, 3)).flush()
        np.lib.format.open_memmap(tmp / "masks.npy", mode="w+", dtype=dtype, shape=(n, h, w)).flush()
        index = {"version": CACHE_VERSION, "size": [h, w], "files": [None] * n}
        try:
            self._write_rows(list(self.rows), index, progress, folder=tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        os.replace(tmp, self.dir)

    def _stale(self, index: dict[str, Any]) -> list[int]:
        """Image ids whose file's size or modification time changed and whose content did too."""
        stale = []
        for image_id, row in self.rows.items():
            path = self.coco.data_dir / self.coco.image(image_id)["file_name"]
            rec = index["files"][row]
            try:
                st = path.stat()
            except OSError as exc:
                raise DataError(f"{path}: image file not found ({exc.strerror})") from exc
            if rec is None or (st.st_size, st.st_mtime_ns) != (rec["bytes"], rec["mtime_ns"]):
                if rec is None or hashlib.sha1(path.read_bytes()).hexdigest() != rec["sha1"]:
                    stale.append(image_id)
                else:  # touched, same content: remember the new stamp
                    rec.update(bytes=st.st_size, mtime_ns=st.st_mtime_ns)
        return stale

    def _write_rows(self, ids: list[int], index: dict[str, Any], progress: bool, folder: Path | None = None) -> None:
        from tqdm import tqdm

        folder = folder or self.dir
        images = np.load(folder / "images.npy", mmap_mode="r+")
        masks = np.load(folder / "masks.npy", mmap_mode="r+")
        resize = _resize_step(self.size)
        ground_truth = self.masks.get if self.masks is not None else self.coco.mask
        for image_id in tqdm(ids, desc="image cache", disable=not progress or len(ids) < 2, leave=False):
            meta = self.coco.image(image_id)
            path = self.coco.data_dir / meta["file_name"]
            data = path.read_bytes()
            st = path.stat()
            image = decode_image(data, path, (int(meta["height"]), int(meta["width"])))
            out = resize(image=image, mask=ground_truth(image_id))
            row = self.rows[image_id]
            images[row] = out["image"]
            masks[row] = out["mask"]
            index["files"][row] = {
                "file": meta["file_name"],
                "bytes": st.st_size,
                "mtime_ns": st.st_mtime_ns,
                "sha1": hashlib.sha1(data).hexdigest(),
            }
        images.flush()
        masks.flush()
        del images, masks
        atomic_write_text(folder / "index.json", json.dumps(index))
        self._images = self._masks = None

    # ------------------------------------------------------------------------- reading
    def _open(self) -> None:
        if not self.built():
            raise DataError(f"{self.dir}: the image cache is not built (ImageCache.build)")
        self._images = np.load(self.dir / "images.npy", mmap_mode="r", allow_pickle=False)
        self._masks = np.load(self.dir / "masks.npy", mmap_mode="r", allow_pickle=False)

    def pair(self, image_id: int) -> tuple[np.ndarray, np.ndarray]:
        """The image (H x W x 3 uint8) and its ground-truth map at the cache's size, as copies."""
        if self._images is None:
            self._open()
        row = self.rows[image_id]
        return np.array(self._images[row]), np.array(self._masks[row])  # type: ignore[index]


def disk_allows(cache: ImageCache) -> bool:
    """Whether an automatic cache fits: built already, or its size leaves :data:`SPARE_DISK_BYTES` free."""
    if cache.built():
        return True
    probe = cache.dir
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free >= cache.nbytes + SPARE_DISK_BYTES


def map_tensor(mask: np.ndarray) -> torch.Tensor:
    """uint8 maps as they are; wider maps as int32 (torch reads no uint16 on every device)."""
    return torch.from_numpy(mask if mask.dtype == np.uint8 else mask.astype(np.int32))


class CachedTrainingImages(Dataset):
    """Labelled images from an :class:`ImageCache`: ``(image uint8 HxWx3, map, meta)`` after ``transform``
    (whose ``Resize`` to the cache's size leaves the rows as they are)."""

    def __init__(self, cache: ImageCache, image_ids: Sequence[int], transform: Callable[..., dict] | None = None):
        self.cache = cache
        self.image_ids = list(image_ids)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, idx: int):
        image_id = self.image_ids[idx]
        image, mask = self.cache.pair(image_id)
        if self.transform is not None:
            out = self.transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        image_t = torch.from_numpy(np.ascontiguousarray(image))
        return image_t, map_tensor(np.ascontiguousarray(mask)), image_meta(self.cache.coco, image_id)


class CachedValidationImages(Dataset):
    """Validation images from an :class:`ImageCache` (uint8, the training size) with their maps at the
    image's own size, as :class:`~pipeline.data.datasets.ValDataset` gives them."""

    def __init__(self, cache: ImageCache, masks: MaskCache, image_ids: Sequence[int]):
        self.cache = cache
        self.masks = masks
        self.image_ids = list(image_ids)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, idx: int):
        image_id = self.image_ids[idx]
        image, _ = self.cache.pair(image_id)
        mask = torch.from_numpy(self.masks.get(image_id).astype(np.int64))
        return torch.from_numpy(image), mask, image_meta(self.cache.coco, image_id)


def normalize_batch(images: torch.Tensor, prep: Preprocessing = IMAGENET) -> torch.Tensor:
    """N x H x W x 3 uint8 -> N x 3 x H x W float32, ``(v / 255 * top - mean) / std`` per channel, computed
    where ``images`` are: on a CPU by :func:`~pipeline.data.transforms.normalize`'s table look-up (its
    fastest path there), elsewhere with the same arithmetic in the same order (equal results)."""
    mean, std, top = tuple(map(float, prep.mean)), tuple(map(float, prep.std)), float(prep.input_range[1])
    if images.device.type == "cpu":
        n, h, w, c = images.shape
        out = torch.empty((n, c, h, w), dtype=torch.float32)
        for i, image in enumerate(images.numpy()):
            normalize_into(image, mean, std, top, out[i].numpy())
        return out
    return _normalize_arithmetic(images, mean, std, top)


def _normalize_arithmetic(images: torch.Tensor, mean: tuple, std: tuple, top: float) -> torch.Tensor:
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    if top != 1.0:
        x.mul_(top)
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)


class DeviceBatches:
    """A loader of cached batches as the training loop takes them: each batch moved to ``device`` as uint8,
    normalised there with ``prep`` (channels-last or contiguous memory), its maps as int64."""

    def __init__(self, loader, device: torch.device, prep: Preprocessing, channels_last: bool = False):
        self.loader = loader
        self.device = device
        self.prep = prep
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def dataset(self) -> Dataset:
        return self.loader.dataset

    def __iter__(self) -> Iterator[tuple[torch.Tensor, Any, list]]:
        for batch in self.loader:
            yield self.to_device(batch)

    def to_device(self, batch: tuple[torch.Tensor, Any, list]) -> tuple[torch.Tensor, Any, list]:
        """One collated batch as the loop takes it."""
        images, masks, metas = batch
        x = normalize_batch(images.to(self.device, non_blocking=True), self.prep)
        if isinstance(masks, torch.Tensor):
            masks = masks.to(self.device, non_blocking=True).long()
        return x.contiguous(memory_format=self.memory_format), masks, metas
