"""Submission stage: ``make submit NAME=x FORMAT=rle|dense``.

Streams over the images of ``test.json``: every member's test probabilities (the mean of
its folds' ``test_<tta>`` stores, resized bilinearly to the image's own height x width)
are combined with the ensemble's weights, bias and method (:class:`pipeline.ensemble.Fusion`),
then one argmax gives the class-index map, written as

* ``rle`` (default): ``image_id,class_id,EncodedPixels``, one row per image and category
  (Background excluded) in category file order; ``class_id`` is the COCO category id,
  ``EncodedPixels`` the runs at the image's own size (column-major by default);
* ``dense``: ``image_id,PredictionString``, the map resized to ``dense_size`` with nearest
  neighbour, flattened row-major.

``image_id`` is the image's ``file_name``.  The members come from ``ensemble`` (a
``weights.yaml``; default ``ensembles/<name>/weights.yaml``) or ``runs`` (plain average).
The CSV is written to a temporary file, validated (:mod:`pipeline.validate`) and only then
renamed over ``submissions/<name>.csv``, so an earlier file of that name stays intact when
anything fails.  A manifest ``submissions/<name>.json`` records how the file was made.
"""
from __future__ import annotations

import csv
import datetime as dt
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipeline.config import ConfigError, stage_main, to_dict
from pipeline.data import CocoData, load_coco
from pipeline.ensemble import WEIGHTS_FILE, Fusion, Workspace, load_ensemble, open_stores, resolve_members, split_paths
from pipeline.probs import ProbReader, stores_mask_rule
from pipeline.rle import encode_label_map
from pipeline.utils import PipelineError, atomic_open, atomic_write_text
from pipeline.validate import HEADERS, check_format_options, format_problems, resize_nearest, validate_submission

log = logging.getLogger(__name__)


@dataclass
class SubmitConfig:
    name: str = "submission"
    ensemble: str | None = None  # a weights.yaml; default <ensembles_dir>/<name>/weights.yaml when it exists
    runs: list[str] | None = None  # or: plain average of these members' test stores
    tta: str | None = None  # with runs: which test_<tta> stores (None: the only one present)
    ensembles_dir: str = "ensembles"
    data_dir: str = "data/demo"
    test_ann: str = "test.json"
    format: str = "rle"
    order: str = "F"  # F: column-major (the contest's), C: row-major
    dense_size: list[int] = field(default_factory=lambda: [256, 256])
    out_dir: str = "submissions"
    check: bool = True  # run the validator on the written file before it replaces the old one
    progress: bool = True

    def __post_init__(self) -> None:
        if self.runs is not None:
            self.runs = split_paths(self.runs)

    def validate(self) -> None:
        """Raise ConfigError on bad settings."""
        if not self.name.strip() or "/" in self.name:
            raise ConfigError(f"name must be a plain file name, got {self.name!r}")
        check_format_options(self.format, self.order, self.dense_size)
        if self.ensemble and self.runs:
            raise ConfigError("give either ensemble=<weights.yaml> or runs=..., not both")
        if self.runs is not None and not self.runs:
            raise ConfigError("runs is empty")


@dataclass
class SubmitMember:
    name: str
    weight: float
    tta: str | None
    readers: list[ProbReader]


def resolve_submission_members(cfg: SubmitConfig, coco: CocoData) -> tuple[list[SubmitMember], Fusion, dict[str, Any]]:
    """Members with their test stores, the fusion, and the ensemble's recorded facts."""
    source: dict[str, Any]
    if cfg.runs:
        members = resolve_members(cfg.runs, cfg.tta, need_oof=False)
        entries = [{"name": m.name, "weight": 1.0 / len(members), "tta": m.tta, "test_stores": m.test_stores} for m in members]
        method, bias = "mean", None
        source = {"runs": list(cfg.runs), "method": method}
    else:
        path = Path(cfg.ensemble) if cfg.ensemble else Path(cfg.ensembles_dir) / cfg.name / WEIGHTS_FILE
        if not cfg.ensemble and not path.is_file():
            raise PipelineError(
                f"{path}: no ensemble weights file; run make ensemble NAME={cfg.name}, "
                "or pass ensemble=<weights.yaml> or runs=<run folders>"
            )
        data = load_ensemble(path)
        entries, method, bias = data["members"], data.get("method", "mean"), data.get("bias")
        if data.get("class_names") and list(data["class_names"]) != coco.class_names:
            raise PipelineError(f"{path}: classes {data['class_names']} differ from {coco.path}'s {coco.class_names}")
        source = {"ensemble": str(path), "method": method, "oof": data.get("oof", {})}
    members = []
    for e in entries:
        if not e["test_stores"]:
            raise PipelineError(
                f"member {e['name']}: no test_{e.get('tta') or '<tta>'}/ stores; run make predict SPLIT=test on its folds"
            )
        members.append(SubmitMember(e["name"], float(e["weight"]), e.get("tta"), open_stores(e["test_stores"], coco.class_names)))
    fusion = Fusion([m.weight for m in members], bias, method)
    wanted = set(coco.image_ids)
    for m in members:
        for r in m.readers:
            missing = sorted(wanted - set(r.image_ids))
            if missing:
                raise PipelineError(f"{r.folder}: no probabilities for {len(missing)} test image(s) of {coco.path}, "
                                    f"e.g. ids {missing[:5]} (predict again with the same test.json)")
            renamed = [i for i in coco.image_ids if str(r.row(i).file_name) != str(coco.image(i)["file_name"])]
            if renamed:
                i = renamed[0]
                raise PipelineError(f"{r.folder}: image id {i} is {r.row(i).file_name!r} there but "
                                    f"{coco.image(i)['file_name']!r} in {coco.path} (predicted with another test.json?)")
    return members, fusion, source


class MemberProbs:
    """A member's test probabilities of one image: the mean over its fold stores at the image size.

    The result lives in a buffer reused by the next call (the fusion consumes one member at
    a time), so reading a test set does not churn the allocator.
    """

    def __init__(self) -> None:
        self.workspace = Workspace()

    def read(self, reader: ProbReader, image_id: int, size: tuple[int, int], out: np.ndarray) -> None:
        """Probabilities of ``image_id`` at ``size`` into ``out`` (stores at that size skip the resize)."""
        row = reader.row(image_id)
        if (int(row.stored_height), int(row.stored_width)) != tuple(size):
            out[...] = reader.load(image_id, size).numpy()
            return
        path = reader.folder / row.file
        try:
            raw = np.load(path)
        except (OSError, ValueError) as exc:
            raise PipelineError(f"{path}: unreadable probability map ({exc})") from exc
        if raw.shape != out.shape:
            raise PipelineError(f"{path}: probabilities of shape {raw.shape}, expected {out.shape}")
        if reader.dtype == "uint8":  # probs.py: stored as round(p * 255), read back as v / 255
            np.divide(raw, np.float32(255), out=out)
        else:
            out[...] = raw

    def __call__(self, member: SubmitMember, image_id: int, size: tuple[int, int]) -> np.ndarray:
        shape = (member.readers[0].num_classes, int(size[0]), int(size[1]))
        acc, tmp = self.workspace.arrays(shape, 2)
        for j, reader in enumerate(member.readers):
            self.read(reader, image_id, size, acc if j == 0 else tmp)
            if j:
                acc += tmp
        if len(member.readers) > 1:
            acc /= np.float32(len(member.readers))
        return acc


def predict_label_map(members: Sequence[SubmitMember], fusion: Fusion, image_id: int, size: tuple[int, int],
                      probs: MemberProbs | None = None) -> np.ndarray:
    """Class-index map of one test image at ``size`` (H, W)."""
    probs = probs or MemberProbs()
    active = fusion.active()
    return fusion((probs(members[i], image_id, size) for i in active), indices=active)


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


def run(cfg: SubmitConfig) -> dict[str, Any]:
    """Write ``<out_dir>/<name>.csv`` and its manifest; returns the manifest."""
    from tqdm import tqdm

    cfg.validate()
    started = time.perf_counter()
    coco = load_coco(cfg.data_dir, cfg.test_ann, require_annotations=False)
    if not coco.images:
        raise PipelineError(f"{coco.path}: no test images")
    members, fusion, source = resolve_submission_members(cfg, coco)
    out = Path(cfg.out_dir)
    csv_path = out / f"{cfg.name}.csv"
    log.info("submission %s: %d test images, %d member(s) (%s), format %s", csv_path, len(coco.images), len(members),
             ", ".join(f"{m.name} {m.weight:.3f}" for m in members), cfg.format)

    def batches():
        probs = MemberProbs()
        for im in tqdm(coco.images, desc=f"submission ({cfg.format})", disable=not cfg.progress):
            h, w = int(im["height"]), int(im["width"])
            labels = predict_label_map(members, fusion, int(im["id"]), (h, w), probs)
            if cfg.format == "rle":
                yield rle_rows(str(im["file_name"]), labels, coco, cfg.order)
            else:
                yield [dense_row(str(im["file_name"]), labels, cfg.dense_size)]

    staging = out / f".{cfg.name}.csv.staging" if cfg.check else csv_path
    try:
        n_rows = write_csv(staging, batches(), cfg.format)
        if cfg.check:
            problems = validate_submission(staging, coco, cfg.format, cfg.order, cfg.dense_size)
            if problems:
                raise PipelineError(format_problems(csv_path, problems))
            os.replace(staging, csv_path)
    finally:
        if staging != csv_path and staging.exists():
            staging.unlink()
    manifest = {
        "name": cfg.name,
        "csv": str(csv_path),
        "format": cfg.format,
        "order": cfg.order if cfg.format == "rle" else None,
        "dense_size": list(cfg.dense_size) if cfg.format == "dense" else None,
        "rows": n_rows,
        "images": len(coco.images),
        "test_ann": str(coco.path),
        "members": [{"name": m.name, "weight": m.weight, "tta": m.tta, "test_stores": [str(r.folder) for r in m.readers]}
                    for m in members],
        "mask_rule": stores_mask_rule([r.folder for m in members for r in m.readers]),
        "method": fusion.method,
        "bias": None if fusion.bias is None else [float(b) for b in fusion.bias],
        **{k: v for k, v in source.items() if k != "method"},
        "validated": cfg.check,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "config": to_dict(cfg),
    }
    manifest_path = atomic_write_text(out / f"{cfg.name}.json", json.dumps(manifest, indent=2))
    oof = source.get("oof", {}).get("ensemble_miou")
    log.info("wrote %s (%d rows%s) and %s in %.1f s%s", csv_path, n_rows, ", validated" if cfg.check else "",
             manifest_path, time.perf_counter() - started, f"; OOF mIoU of the ensemble {oof:.4f}" if oof is not None else "")
    return {**manifest, "manifest": str(manifest_path)}


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main(SubmitConfig, run, argv, "Write and validate a submission CSV from test probabilities")


if __name__ == "__main__":
    raise SystemExit(main())
