"""Submission stage: ``make submit NAME=x FORMAT=auto|rle|dense``.

Streams over the images of ``test.json``: every member's test probabilities (the mean of
its folds' ``test_<tta>`` stores, resized bilinearly to the image's own height x width)
are combined with the ensemble's weights, bias and method (:class:`pipeline.ensemble.Fusion`),
then one argmax gives the class-index map, written as

* ``rle``: ``image_id,class_id,EncodedPixels``, one row per image and category
  (Background excluded) in category file order; ``class_id`` is the COCO category id,
  ``EncodedPixels`` the runs at the image's own size (column-major by default);
* ``dense``: ``image_id,PredictionString``, the map resized to ``dense_size`` with nearest
  neighbour, flattened row-major.

``auto`` (the default) is the format of ``<data_dir>/sample_submission.csv``'s header, else
``rle`` (:func:`pipeline.submission.formats.resolve_format`); the manifest records the format
written and why.

``image_id`` is the image's ``file_name``.  The members come from ``ensemble`` (a
``weights.yaml``; default ``ensembles/<name>/weights.yaml``) or ``runs`` (plain average).
The CSV is written to a temporary file, validated (:mod:`pipeline.validate`) and only then
renamed over ``submissions/<name>.csv``, so an earlier file of that name stays intact when
anything fails.  A manifest ``submissions/<name>.json`` records how the file was made.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.core.config import stage_main, to_dict
from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_write_text, fault_point
from pipeline.data import load_coco, read_image
from pipeline.inference.postprocessing import apply_postprocess, needs_image, read_postprocess
from pipeline.inference.store import stores_mask_rule
from pipeline.submission.formats import format_problems, resolve_format, validate_submission
from pipeline.submission.submit_config import SubmitConfig
from pipeline.submission.writer import (
    MemberProbs,
    dense_row,
    fused_probabilities,
    predict_label_map,
    resolve_submission_members,
    rle_rows,
    write_csv,
)

log = logging.getLogger(__name__)


def _write_validated(cfg: SubmitConfig, fmt: str, coco, rows, csv_path: Path) -> int:
    """Write the rows (format ``fmt``) beside ``csv_path``, validate them, then replace ``csv_path`` in one rename."""
    staging = csv_path.parent / f".{cfg.name}.csv.staging" if cfg.check else csv_path
    try:
        n_rows = write_csv(staging, rows, fmt)
        if cfg.check:
            problems = validate_submission(staging, coco, fmt, cfg.order, cfg.dense_size)
            if problems:
                raise PipelineError(format_problems(csv_path, problems))
            fault_point(f"before-rename:{csv_path.name}")
            os.replace(staging, csv_path)
    finally:
        if staging != csv_path and staging.exists():
            staging.unlink()
    return n_rows


def run(cfg: SubmitConfig) -> dict[str, Any]:
    """Write ``<out_dir>/<name>.csv`` and its manifest; returns the manifest."""
    from tqdm import tqdm

    cfg.validate()
    started = time.perf_counter()
    fmt, fmt_reason = resolve_format(cfg.format, cfg.data_dir)
    if cfg.format == "auto":
        log.info("format auto -> %s (%s)", fmt, fmt_reason)
    coco = load_coco(cfg.data_dir, cfg.test_ann, require_annotations=False)
    if not coco.images:
        raise PipelineError(f"{coco.path}: no test images")
    members, fusion, source = resolve_submission_members(
        coco, name=cfg.name, ensemble=cfg.ensemble, runs=cfg.runs, tta=cfg.tta, ensembles_dir=cfg.ensembles_dir
    )
    post = None
    if cfg.postprocess == "auto" and source.get("ensemble"):
        post = read_postprocess(Path(source["ensemble"]).parent)
    out = Path(cfg.out_dir)
    csv_path = out / f"{cfg.name}.csv"
    log.info(
        "submission %s: %d test images, %d member(s) (%s), format %s",
        csv_path,
        len(coco.images),
        len(members),
        ", ".join(f"{m.name} {m.weight:.3f}" for m in members),
        fmt,
    )

    def batches():
        probs = MemberProbs()
        for im in tqdm(coco.images, desc=f"submission ({fmt})", disable=not cfg.progress):
            h, w, image_id = int(im["height"]), int(im["width"]), int(im["id"])
            if needs_image(post):  # e.g. the CRF decides from the fused probabilities and the image
                fused = fused_probabilities(members, list(fusion.weights), image_id, (h, w), probs, fusion.bias)
                labels = apply_postprocess(post, fused.argmax(0), fused, read_image(coco.image_path(image_id), (h, w)))
            else:
                labels = apply_postprocess(post, predict_label_map(members, fusion, image_id, (h, w), probs))
            if fmt == "rle":
                yield rle_rows(str(im["file_name"]), labels, coco, cfg.order)
            else:
                yield [dense_row(str(im["file_name"]), labels, cfg.dense_size)]

    n_rows = _write_validated(cfg, fmt, coco, batches(), csv_path)
    manifest = {
        "name": cfg.name,
        "csv": str(csv_path),
        "format": fmt,
        "format_reason": fmt_reason,  # given, or what format=auto read (config.format stays as given)
        "order": cfg.order if fmt == "rle" else None,
        "dense_size": list(cfg.dense_size) if fmt == "dense" else None,
        "rows": n_rows,
        "images": len(coco.images),
        "test_ann": str(coco.path),
        "members": [
            {"name": m.name, "weight": m.weight, "tta": m.tta, "test_stores": [str(r.folder) for r in m.readers]}
            for m in members
        ],
        "mask_rule": stores_mask_rule([r.folder for m in members for r in m.readers]),
        "method": fusion.method,
        "postprocess": post.to_dict() if post else {"name": "none"},
        "bias": None if fusion.bias is None else [float(b) for b in fusion.bias],
        **{k: v for k, v in source.items() if k != "method"},
        "validated": cfg.check,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "config": to_dict(cfg),
    }
    manifest_path = atomic_write_text(out / f"{cfg.name}.json", json.dumps(manifest, indent=2))
    oof = source.get("oof", {}).get("ensemble_miou")
    log.info(
        "wrote %s (%d rows%s) and %s in %.1f s%s",
        csv_path,
        n_rows,
        ", validated" if cfg.check else "",
        manifest_path,
        time.perf_counter() - started,
        f"; OOF mIoU of the ensemble {oof:.4f}" if oof is not None else "",
    )
    return {**manifest, "manifest": str(manifest_path)}


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main(SubmitConfig, run, argv, "Write and validate a submission CSV from test probabilities")


if __name__ == "__main__":
    raise SystemExit(main())
