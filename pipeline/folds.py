"""k-fold stage: class-stratified, optionally grouped folds written to ``folds/folds.csv``.

Stratification is iterative (Sechidis et al., 2011) on per-image class presence
(Background left out, every image has it).  The unit that is assigned to a fold is a
group: with ``group_by=folder`` all images of one batch folder, with ``group_by=similar`` all
images that look alike (near-duplicates and frames of one sequence, found by
``pipeline.data.similarity_groups``), or with ``groups_csv`` any user-given group go to the
same fold; without grouping each image is its own group.  Similar images split across
folds leak: out-of-fold scores then flatter the model and every choice tuned on them.
Rarest classes are placed first, each unit into the fold that still lacks most of that
class, so rare classes reach every fold whenever there are enough of them.

Outputs: ``folds.csv`` (image_id, file_name, group, fold, one ``has_<class>`` column per
class), ``folds_balance.csv`` (images, instances and pixel share per class per fold) and
``folds_meta.json`` (annotation file, its content hash, k, seed, and under ``grouping`` the
method, its parameters, the number of multi-image groups and the largest group).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core.config import stage_main
from pipeline.core.io import atomic_open, atomic_write_text
from pipeline.data import (
    CocoData,
    DataError,
    MaskCache,
    iterative_stratification,
    load_coco,
    presence_matrix,
    similarity_groups,
)
from pipeline.data.folds_config import FoldsConfig

log = logging.getLogger(__name__)


def _group_stats(groups: list[str] | None, n_images: int) -> dict[str, int]:
    sizes = Counter(groups).values() if groups is not None else [1] * n_images
    return {
        "groups": len(sizes),
        "multi_image_groups": sum(1 for v in sizes if v > 1),
        "largest_group": max(sizes, default=0),
    }


def _groups(coco: CocoData, cfg: FoldsConfig) -> tuple[list[str] | None, dict]:
    """Group label per image (None: every image alone) and what ``folds_meta.json`` records of the grouping."""
    if cfg.groups_csv:
        labels = _csv_groups(coco, cfg.groups_csv)
        return labels, {"method": "groups_csv", **_group_stats(labels, len(coco.images))}
    if cfg.group_by == "folder":
        labels = [str(Path(im["file_name"]).parent) for im in coco.images]
        return labels, {"method": "folder", **_group_stats(labels, len(coco.images))}
    if cfg.group_by == "similar":
        found = similarity_groups(coco, cfg.similarity_params(), cache_dir=cfg.cache_dir)
        labels = found.labels(coco.image_ids)
        return labels, {"method": "similar", **found.summary(), **_group_stats(labels, len(coco.images))}
    return None, {"method": None, **_group_stats(None, len(coco.images))}


def _csv_groups(coco: CocoData, groups_csv: str) -> list[str]:
    files = [im["file_name"] for im in coco.images]
    path = Path(groups_csv)
    if not path.is_file():
        raise DataError(f"{path}: groups CSV not found")
    table = pd.read_csv(path)
    if not {"file_name", "group"} <= set(table.columns):
        raise DataError(f"{path}: groups CSV needs columns file_name,group; has {list(table.columns)}")
    mapping = dict(zip(table["file_name"].astype(str), table["group"].astype(str), strict=False))
    missing = [f for f in files if f not in mapping]
    if missing:
        raise DataError(f"{path}: no group for {len(missing)} image(s), e.g. {missing[:3]}")
    return [mapping[f] for f in files]


def balance_table(
    folds: pd.DataFrame, coco: CocoData, inst: np.ndarray, pixels: np.ndarray | None
) -> tuple[pd.DataFrame, float]:
    """Per fold and class: images with the class, its image share, instances and pixel share.

    Returns the table and the largest |fold image share - overall image share| over all
    classes and folds (Background excluded).
    """
    names = coco.class_names
    pres = inst > 0
    rows = []
    overall_share = pres.mean(0)
    worst = 0.0
    for fold in sorted(folds["fold"].unique()):
        sel = (folds["fold"] == fold).to_numpy()
        share = pres[sel].mean(0)
        pix = pixels[sel].sum(0) / max(pixels[sel].sum(), 1) if pixels is not None else None
        for c in range(1, len(names)):
            worst = max(worst, abs(share[c] - overall_share[c]))
            rows.append(
                {
                    "fold": int(fold),
                    "class": names[c],
                    "fold_images": int(sel.sum()),
                    "images": int(pres[sel, c].sum()),
                    "image_share": round(float(share[c]), 4),
                    "overall_image_share": round(float(overall_share[c]), 4),
                    "instances": int(inst[sel, c].sum()),
                    "pixel_share": round(float(pix[c]), 4) if pix is not None else float("nan"),
                }
            )
    return pd.DataFrame(rows), float(worst)


def pixel_counts(coco: CocoData, cache_dir: str | Path) -> np.ndarray:
    from tqdm import tqdm

    cache = MaskCache(coco, cache_dir)
    out = np.zeros((len(coco.images), coco.num_classes), dtype=np.int64)
    for row, image_id in enumerate(tqdm(coco.image_ids, desc="pixel counts", leave=False)):
        out[row] = cache.class_pixels(image_id)
    return out


def run(cfg: FoldsConfig) -> pd.DataFrame:
    coco = load_coco(cfg.data_dir, cfg.ann_file, mask_rule=cfg.mask_rule)
    pres, inst = presence_matrix(coco)
    groups, grouping = _groups(coco, cfg)
    fold = iterative_stratification(pres[:, 1:], cfg.k, cfg.seed, groups)
    names = coco.class_names
    table = pd.DataFrame(
        {
            "image_id": coco.image_ids,
            "file_name": [im["file_name"] for im in coco.images],
            "group": groups if groups is not None else [str(i) for i in coco.image_ids],
            "fold": fold,
        }
    )
    for c in range(1, len(names)):
        table[f"has_{names[c]}"] = pres[:, c]

    pixels = pixel_counts(coco, cfg.cache_dir) if cfg.pixel_stats else None
    balance, worst = balance_table(table, coco, inst, pixels)

    out = Path(cfg.out_dir)
    with atomic_open(out / "folds.csv", "w", newline="") as fh:
        table.to_csv(fh, index=False)
    with atomic_open(out / "folds_balance.csv", "w", newline="") as fh:
        balance.to_csv(fh, index=False)
    meta = {
        "ann_file": str(coco.path),
        "ann_digest": coco.digest,
        "k": cfg.k,
        "seed": cfg.seed,
        "group_by": cfg.group_by,
        "groups_csv": cfg.groups_csv,
        "grouping": grouping,
        "max_image_share_deviation": worst,
    }
    atomic_write_text(out / "folds_meta.json", json.dumps(meta, indent=2))

    pivot = balance.pivot(index="class", columns="fold", values="images").reindex(names[1:])
    pivot.columns = [f"fold{c}" for c in pivot.columns]
    sizes = table.groupby("fold").size()
    _log_grouping(grouping, len(table))
    log.info("images per fold: %s", ", ".join(f"fold{f}={n}" for f, n in sizes.items()))
    log.info("images containing each class, per fold:\n%s", pivot.to_string())
    log.info("largest deviation of a class's image share from its overall share: %.4f", worst)
    log.info("wrote %s", out / "folds.csv")
    return table


def _log_grouping(grouping: dict, n_images: int) -> None:
    if grouping["method"] is None:
        return
    log.info(
        "grouping %s: %d groups for %d images, %d with more than one image, the largest %d images",
        grouping["method"],
        grouping["groups"],
        n_images,
        grouping["multi_image_groups"],
        grouping["largest_group"],
    )
    if grouping["method"] == "similar":
        log.info(
            "similar images (pHash+dHash distance <= %d of 128 bits, %d in sequences; links %s): "
            "%d images in %d multi-image groups, sizes %s; %d merge(s) refused above max_group=%d",
            grouping["threshold"],
            grouping["threshold"] + grouping["sequence_slack"],
            grouping["links_by_kind"] or "none",
            grouping["images_in_multi_image_groups"],
            grouping["multi_image_groups"],
            grouping["largest_sizes"] or "-",
            grouping["refused_merges"],
            grouping["max_group"],
        )


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main(FoldsConfig, run, argv, "Write class-stratified k-fold splits to folds/folds.csv")


if __name__ == "__main__":
    raise SystemExit(main())
