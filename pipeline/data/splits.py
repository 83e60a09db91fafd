"""Fold splits: class-stratified (iterative stratification, Sechidis et al. 2011, with
groups as the assignment unit), reading a folds file, and a fold's train/val image ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.core.errors import ConfigError, DataError
from pipeline.data.coco import CocoData


def presence_matrix(coco: CocoData) -> tuple[np.ndarray, np.ndarray]:
    """(images x classes) presence (0/1) and instance counts, Background column included."""
    index = coco.cat_to_index
    pres = np.zeros((len(coco.images), coco.num_classes), dtype=np.int64)
    inst = np.zeros_like(pres)
    for row, image_id in enumerate(coco.image_ids):
        for ann in coco.annotations(image_id):
            inst[row, index[int(ann["category_id"])]] += 1
    pres[:] = inst > 0
    pres[:, 0] = 1
    return pres, inst


def iterative_stratification(
    labels: np.ndarray, k: int, seed: int = 0, groups: Sequence[Any] | None = None
) -> np.ndarray:
    """Fold index per sample; samples of one group share a fold.

    ``labels`` is (samples x labels) 0/1.  Groups are the assignment units: their label
    vector is the count of their samples having each label and their size is the number
    of samples.
    """
    n = labels.shape[0]
    groups = np.arange(n) if groups is None else np.asarray(groups)
    uniq, inverse = np.unique(groups, return_inverse=True)
    if len(uniq) < k:
        raise ConfigError(f"cannot make {k} folds from {len(uniq)} groups; lower k or change the grouping")
    unit_labels = np.zeros((len(uniq), labels.shape[1]), dtype=np.float64)
    np.add.at(unit_labels, inverse, labels)
    unit_size = np.bincount(inverse, minlength=len(uniq)).astype(np.float64)

    rng = np.random.default_rng(seed)
    want_labels = np.tile(unit_labels.sum(0) / k, (k, 1))
    want_size = np.full(k, unit_size.sum() / k)
    fold_of_unit = np.full(len(uniq), -1)
    remaining = np.ones(len(uniq), dtype=bool)

    def place(u: int, label: int | None) -> None:
        if label is None:
            score = np.stack([want_size, rng.random(k)], 1)
        else:
            score = np.stack([want_labels[:, label], want_size, rng.random(k)], 1)
        best = np.lexsort(score.T[::-1])[-1]
        fold_of_unit[u] = best
        want_labels[best] -= unit_labels[u]
        want_size[best] -= unit_size[u]
        remaining[u] = False

    while remaining.any():
        counts = unit_labels[remaining].sum(0)
        present = np.flatnonzero(counts > 0)
        if present.size == 0:
            for u in rng.permutation(np.flatnonzero(remaining)):
                place(int(u), None)
            break
        label = int(present[np.argmin(counts[present])])
        units = np.flatnonzero(remaining & (unit_labels[:, label] > 0))
        # larger units first (harder to place), random order among equals
        order = units[np.lexsort((rng.random(units.size), -unit_size[units]))]
        for u in order:
            place(int(u), label)
    return fold_of_unit[inverse]


def load_folds(path: str | Path, coco: CocoData | None = None) -> pd.DataFrame:
    """Read a folds file; with ``coco``, check it covers exactly that file's images."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: folds file not found (run `make folds` first)")
    try:
        table = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: unreadable folds CSV ({exc})") from exc
    if not {"image_id", "fold"} <= set(table.columns):
        raise DataError(f"{path}: folds CSV needs columns image_id and fold; has {list(table.columns)}")
    if coco is not None:
        ids = set(coco.image_ids)
        got = set(table["image_id"].astype(int))
        if got != ids:
            raise DataError(
                f"{path}: folds do not match {coco.path} ({len(got - ids)} unknown image ids, "
                f"{len(ids - got)} images without a fold); run `make folds` again"
            )
    return table


def split_ids(coco: CocoData, folds_file: str | Path, fold: int) -> tuple[list[int], list[int]]:
    """(train ids, val ids) of ``fold``: val = the fold's images; fold -1 trains on every image."""
    if fold < 0:
        return coco.image_ids, []
    folds = load_folds(folds_file, coco)
    known = sorted(int(f) for f in folds["fold"].unique())
    if fold not in known:
        raise ConfigError(f"fold {fold} is not in {folds_file} (folds: {known}; -1 trains on all images)")
    is_val = folds["fold"].astype(int) == fold
    val = set(folds.loc[is_val, "image_id"].astype(int))
    return [i for i in coco.image_ids if i not in val], [i for i in coco.image_ids if i in val]
