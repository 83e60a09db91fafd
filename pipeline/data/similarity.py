"""Near-duplicate and same-sequence images found by image similarity, for leak-aware folds.

Every image gets three tiny descriptors from a reduced decode (``image_hashes``):

* a 64-bit perceptual hash (pHash: sign of the 8x8 lowest DCT coefficients of a 32x32
  greyscale thumbnail against their median),
* a 64-bit difference hash (dHash: horizontal gradients of a 9x8 greyscale thumbnail),
* a colour layout (4x4 RGB thumbnail divided by its mean, so a change of exposure or
  gain does not move it).

The distance of two images is the Hamming distance of pHash plus that of dHash (0..128 bits).
Two images are *linked* (``similarity_groups``) when

* ``distance <= strict``: a near-duplicate (same frame, re-encoded or slightly cropped);
* ``distance <= threshold`` and colour distance ``<= colour``: a similar view, e.g. the
  next frame of a sequence;
* ``distance <= threshold + sequence_slack`` and colour distance ``<= colour`` when the
  two file names are consecutive numbers (at most ``sequence_gap`` apart) in one folder.
  File-name order only loosens the bound for images that already look alike; it never
  links images alone (contest file names are sequential too).

Groups are the connected components of the links (union-find), merged strongest link
first.  A merge that would make a group larger than ``max_group`` images is refused
unless the link is a strict near-duplicate, so a chain of weak links cannot grow into a
giant group; refused merges are counted and reported.

The defaults come from measurements.  Clothing Co-Parsing (804 real street photos, 323k
pairs): unrelated pairs are never closer than 23, pairs with consecutive file numbers never
closer than 32, and its two real near-duplicate pairs sit at 8 and 11.  Synthetic sequences
(view moved by up to 2% of the width per frame, exposure +-10%, JPEG quality 60-90):
consecutive frames 0-21 apart, unrelated images 36 or more, groups recovered exactly for 8
of 8 seeds.  Looser bounds chain unrelated photos: without the colour check, a threshold of
28 makes a Co-Parsing group of 11 and 32 one of 155 (41, the cap, with ``max_group``); with
it, 32 makes one of 5.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from pipeline.core.errors import ConfigError, DataError
from pipeline.core.io import atomic_open

if TYPE_CHECKING:
    from pipeline.data.coco import CocoData

log = logging.getLogger(__name__)

HASH_VERSION = 1  # part of the cache key: bump when the descriptors change
HASH_BITS = 128  # pHash + dHash
DEFAULT_THRESHOLD = 20
METHOD = "phash+dhash"
_COLOUR_SIDE = 4
_MIN_DECODED_SIDE = 64  # reduced JPEG decoding never goes below this (thumbnails are 32x32)
_CHUNK_ENTRIES = 1 << 22  # pairs compared per numpy step


@dataclass(frozen=True)
class SimilarityParams:
    """How two images are linked and how large a group may grow (module docstring)."""

    threshold: int = DEFAULT_THRESHOLD  # max pHash + dHash Hamming distance (of 128 bits)
    strict: int = 8  # near-duplicates: linked whatever the colour and the group size
    colour: float = 0.10  # max mean |difference| of the gain-normalised 4x4 colour layouts
    sequence_slack: int = 8  # extra distance allowed between consecutive file numbers in one folder
    sequence_gap: int = 2  # file numbers at most this far apart count as consecutive
    max_group: int | None = None  # None: max(8, 5% of the images)

    def __post_init__(self) -> None:
        if not 0 <= self.strict <= self.threshold <= HASH_BITS:
            raise ConfigError(
                f"similarity: need 0 <= strict <= threshold <= {HASH_BITS}, got {self.strict}, {self.threshold}"
            )
        if self.sequence_slack < 0 or self.sequence_gap < 0 or self.colour < 0:
            raise ConfigError("similarity: sequence_slack, sequence_gap and colour must not be negative")
        if self.max_group is not None and self.max_group < 2:
            raise ConfigError(f"similarity: max_group must be at least 2, got {self.max_group}")

    def group_cap(self, n_images: int) -> int:
        return self.max_group if self.max_group is not None else max(8, math.ceil(0.05 * n_images))


@dataclass
class ImageHashes:
    """Descriptors of the images of one annotation file, in file order."""

    image_ids: np.ndarray  # (N,) int64
    phash: np.ndarray  # (N,) uint64
    dhash: np.ndarray  # (N,) uint64
    colour: np.ndarray  # (N, 48) float32, gain-normalised 4x4 RGB layout

    def __len__(self) -> int:
        return len(self.image_ids)


@dataclass
class SimilarityGroups:
    """Groups of look-alike images.

    ``group_of`` maps every image id to a group number; groups with more than one image
    come first (largest first) and are listed in ``groups`` (image ids in file order).
    """

    group_of: dict[int, int]
    groups: list[list[int]]
    params: dict[str, Any]
    links: int = 0  # links accepted (each merged two groups)
    refused: int = 0  # merges refused because the group would pass max_group
    kinds: dict[str, int] = field(default_factory=dict)  # accepted links by kind: strict / similar / sequence

    @property
    def largest(self) -> int:
        return len(self.groups[0]) if self.groups else 1

    @property
    def grouped_images(self) -> int:
        return sum(len(g) for g in self.groups)

    def labels(self, image_ids: list[int]) -> list[str]:
        """One group label per image id (``sim<k>``), for a fold split."""
        return [f"sim{self.group_of[int(i)]}" for i in image_ids]

    def summary(self) -> dict[str, Any]:
        return {
            "descriptor": METHOD,
            **self.params,
            "multi_image_groups": len(self.groups),
            "images_in_multi_image_groups": self.grouped_images,
            "largest_group": self.largest,
            "largest_sizes": [len(g) for g in self.groups[:10]],
            "links": self.links,
            "links_by_kind": dict(self.kinds),
            "refused_merges": self.refused,
        }


# ----------------------------------------------------------------------------- descriptors
def _read_small(path: Path, height: int, width: int) -> np.ndarray:
    """BGR uint8, decoded at 1/2, 1/4 or 1/8 while the short side stays >= 64 pixels."""
    if not path.is_file():
        raise DataError(f"{path}: image file not found")
    flag = cv2.IMREAD_COLOR
    for factor, reduced in (
        (8, cv2.IMREAD_REDUCED_COLOR_8),
        (4, cv2.IMREAD_REDUCED_COLOR_4),
        (2, cv2.IMREAD_REDUCED_COLOR_2),
    ):
        if min(height, width) // factor >= _MIN_DECODED_SIDE:
            flag = reduced
            break
    img = cv2.imread(str(path), flag)
    if img is None:
        raise DataError(f"{path}: image file cannot be decoded")
    return img


def _pack(bits: np.ndarray) -> np.uint64:
    return np.packbits(bits.astype(np.uint8)).view(">u8")[0].astype(np.uint64)


def describe(bgr: np.ndarray) -> tuple[np.uint64, np.uint64, np.ndarray]:
    """(pHash, dHash, colour layout) of one BGR uint8 image."""
    grey = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY).astype(np.float32)
    dct = cv2.dct(cv2.resize(grey, (32, 32), interpolation=cv2.INTER_AREA))[:8, :8].ravel()
    phash = _pack(dct > np.median(dct))
    small = cv2.resize(grey, (9, 8), interpolation=cv2.INTER_AREA)
    dhash = _pack(small[:, 1:] > small[:, :-1])
    rgb = cv2.resize(bgr[..., ::-1], (_COLOUR_SIDE, _COLOUR_SIDE), interpolation=cv2.INTER_AREA)
    colour = rgb.astype(np.float32).ravel()
    colour /= max(float(colour.mean()), 1.0)
    return phash, dhash, colour


def _cache_path(coco: CocoData, cache_dir: str | Path) -> Path:
    key = f"{coco.digest}:{Path(coco.data_dir).resolve()}:{HASH_VERSION}"
    return Path(cache_dir) / "similarity" / f"{coco.path.stem}-{hashlib.sha1(key.encode()).hexdigest()[:16]}.npz"


def _load_cached(path: Path, ids: np.ndarray) -> ImageHashes | None:
    try:
        with np.load(path) as z:
            hashes = ImageHashes(z["image_ids"], z["phash"], z["dhash"], z["colour"])
    except (OSError, KeyError, ValueError) as exc:
        log.warning("%s: unreadable similarity cache (%s), computing again", path, exc)
        return None
    return hashes if np.array_equal(hashes.image_ids, ids) else None


def image_hashes(coco: CocoData, cache_dir: str | Path | None = None, progress: bool = True) -> ImageHashes:
    """Descriptors of every image of ``coco`` (file order), cached under ``cache_dir`` when given.

    The cache file is keyed by the annotation file's digest, the data folder and
    ``HASH_VERSION``.
    """
    from tqdm import tqdm

    ids = np.asarray(coco.image_ids, dtype=np.int64)
    path = _cache_path(coco, cache_dir) if cache_dir is not None else None
    if path is not None and path.is_file():
        cached = _load_cached(path, ids)
        if cached is not None:
            return cached
    n = len(ids)
    phash = np.zeros(n, np.uint64)
    dhash = np.zeros(n, np.uint64)
    colour = np.zeros((n, 3 * _COLOUR_SIDE**2), np.float32)
    for row, im in enumerate(tqdm(coco.images, desc="image hashes", unit="img", disable=not progress, leave=False)):
        bgr = _read_small(coco.data_dir / im["file_name"], int(im["height"]), int(im["width"]))
        phash[row], dhash[row], colour[row] = describe(bgr)
    hashes = ImageHashes(ids, phash, dhash, colour)
    if path is not None:
        with atomic_open(path, "wb") as fh:
            np.savez(fh, image_ids=ids, phash=phash, dhash=dhash, colour=colour)
    return hashes


# ----------------------------------------------------------------------------- pairs
_POPCOUNT8 = np.array([bin(v).count("1") for v in range(256)], dtype=np.uint8)


def popcount(x: np.ndarray) -> np.ndarray:
    """Set bits of each uint64 (uint8 result)."""
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(x)
    return _POPCOUNT8[np.ascontiguousarray(x).view(np.uint8)].reshape(*x.shape, 8).sum(-1, dtype=np.uint8)


def close_pairs(hashes: ImageHashes, max_distance: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, distance) of every pair i < j (rows of ``hashes``) with pHash + dHash distance <= ``max_distance``.

    All n(n-1)/2 pairs are compared, a block of rows at a time.
    """
    n = len(hashes)
    step = max(1, _CHUNK_ENTRIES // max(n, 1))
    cols = np.arange(n)
    found_i, found_j, found_d = [], [], []
    for start in range(0, n, step):
        rows = np.arange(start, min(start + step, n))
        dist = popcount(hashes.phash[rows, None] ^ hashes.phash[None, :]).astype(np.int16)
        dist += popcount(hashes.dhash[rows, None] ^ hashes.dhash[None, :])
        hit = (dist <= max_distance) & (cols[None, :] > rows[:, None])
        r, c = np.nonzero(hit)
        found_i.append(rows[r])
        found_j.append(c)
        found_d.append(dist[r, c])
    if not found_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int16)
    return np.concatenate(found_i), np.concatenate(found_j), np.concatenate(found_d)


_NUMBERED = re.compile(r"^(.*?)(\d+)$")
KINDS = ("strict", "similar", "sequence")  # link kinds, strongest first


def sequence_keys(file_names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(series, number) per file name: the series numbers (folder, name prefix) pairs, -1 when
    the name (before its suffix) does not end in digits; number is those digits."""
    series = np.full(len(file_names), -1, np.int64)
    number = np.zeros(len(file_names), np.int64)
    seen: dict[tuple[str, str], int] = {}
    for row, name in enumerate(file_names):
        p = PurePosixPath(str(name).replace("\\", "/"))
        m = _NUMBERED.match(p.stem)
        if m:
            series[row] = seen.setdefault((str(p.parent), m.group(1)), len(seen))
            number[row] = int(m.group(2))
    return series, number


@dataclass
class Links:
    """Accepted links between rows ``i`` < ``j``, strongest first (strict, then by distance)."""

    i: np.ndarray
    j: np.ndarray
    distance: np.ndarray
    kind: np.ndarray  # index into KINDS

    def __len__(self) -> int:
        return len(self.i)


def links(hashes: ImageHashes, file_names: list[str], params: SimilarityParams) -> Links:
    """The pairs that count as look-alikes under ``params`` (module docstring)."""
    i, j, dist = close_pairs(hashes, params.threshold + params.sequence_slack)
    colour = np.abs(hashes.colour[i] - hashes.colour[j]).mean(1) if len(i) else np.zeros(0)
    series, number = sequence_keys(file_names)
    consecutive = (series[i] >= 0) & (series[i] == series[j]) & (np.abs(number[i] - number[j]) <= params.sequence_gap)
    kind = np.full(len(i), -1, np.int64)
    looks_alike = colour <= params.colour
    kind[looks_alike & consecutive] = 2
    kind[looks_alike & (dist <= params.threshold)] = 1
    kind[dist <= params.strict] = 0
    keep = kind >= 0
    i, j, dist, kind = i[keep], j[keep], dist[keep], kind[keep]
    order = np.lexsort((j, i, dist, kind != 0))
    return Links(i[order], j[order], dist[order], kind[order])


# ----------------------------------------------------------------------------- groups
def _union(found: Links, n: int, cap: int) -> tuple[np.ndarray, int, dict[str, int]]:
    """Root of each row after merging the links in order; merges past ``cap`` refused unless strict."""
    parent = np.arange(n)
    size = np.ones(n, np.int64)

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = int(parent[x])
        return x

    refused = 0
    kinds: dict[str, int] = {}
    for a, b, kind in zip(found.i.tolist(), found.j.tolist(), found.kind.tolist(), strict=True):
        ra, rb = find(a), find(b)
        if ra == rb:
            continue
        if size[ra] + size[rb] > cap and kind != 0:
            refused += 1
            continue
        if size[ra] < size[rb]:
            ra, rb = rb, ra
        parent[rb] = ra
        size[ra] += size[rb]
        kinds[KINDS[kind]] = kinds.get(KINDS[kind], 0) + 1
    return np.array([find(x) for x in range(n)], dtype=np.int64), refused, kinds


def group_hashes(
    hashes: ImageHashes, file_names: list[str], params: SimilarityParams | None = None
) -> SimilarityGroups:
    """Groups of look-alike rows of ``hashes`` (``file_names`` in the same order, for sequence numbers)."""
    params = params or SimilarityParams()
    ids = [int(i) for i in hashes.image_ids]
    cap = params.group_cap(len(ids))
    roots, refused, kinds = _union(links(hashes, file_names, params), len(ids), cap)
    members: dict[int, list[int]] = {}
    for row, root in enumerate(roots.tolist()):
        members.setdefault(root, []).append(row)
    ordered = sorted(members.values(), key=lambda rows: (-len(rows), rows[0]))
    if refused:
        log.warning(
            "similarity: %d merge(s) refused that would have made a group larger than %d images "
            "(max_group); the images stay in separate groups",
            refused,
            cap,
        )
    return SimilarityGroups(
        group_of={ids[row]: g for g, rows in enumerate(ordered) for row in rows},
        groups=[[ids[row] for row in rows] for rows in ordered if len(rows) > 1],
        params={**asdict(params), "max_group": cap},
        links=sum(kinds.values()),
        refused=refused,
        kinds=kinds,
    )


def similarity_groups(
    coco: CocoData,
    params: SimilarityParams | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> SimilarityGroups:
    """Group the images of ``coco`` that look alike (module docstring); every image gets a group.

    Hashes are read from / written to ``cache_dir`` when given (``image_hashes``).
    """
    hashes = image_hashes(coco, cache_dir, progress)
    return group_hashes(hashes, [str(im["file_name"]) for im in coco.images], params)
