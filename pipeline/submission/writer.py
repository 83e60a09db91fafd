"""Writing submissions: label maps (fused by :mod:`pipeline.inference.fusion`) as CSV rows."""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.core.io import atomic_open
from pipeline.data import CocoData, resize_nearest

# test-time fusion lives in pipeline.inference.fusion; the stage modules submit.py and pseudo.py
# still import these names from here
from pipeline.inference.fusion import (  # noqa: F401
    MemberProbs,
    SubmitMember,
    fused_probabilities,
    predict_label_map,
    resolve_submission_members,
)
from pipeline.submission.formats import HEADERS
from pipeline.submission.rle import encode_label_map

log = logging.getLogger(__name__)


def rle_rows(file_name: str, labels: np.ndarray, coco: CocoData, order: str) -> list[list[str]]:
    """One row per category (file order): ``[file_name, COCO id, EncodedPixels]``."""
    index_to_cat = coco.index_to_cat
    indices = sorted(index_to_cat)
    encoded = encode_label_map(labels, indices, order=order)
    return [[file_name, str(index_to_cat[i]), encoded[i]] for i in indices]


def dense_row(file_name: str, labels: np.ndarray, size: Sequence[int]) -> list[str]:
    small = resize_nearest(labels, size)
    return [file_name, " ".join(map(str, small.reshape(-1).tolist()))]


def write_csv(path: Path, rows, fmt: str) -> int:
    """Write header + rows atomically; returns the number of data rows."""
    n = 0
    with atomic_open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(HEADERS[fmt])
        for batch in rows:
            writer.writerows(batch)
            n += len(batch)
    return n
