"""Pseudo-label stage: ``make pseudo ENSEMBLE=<name> THRESHOLD=0.9``.

From an ensemble's test probabilities (``ensembles/<name>/weights.yaml``; or ``runs=`` for the
plain mean of runs' test stores) write ``pseudo/<name>/``: one label map per test image where
pixels below the threshold (per class with ``class_thresholds``) are 255, and a manifest
(source, thresholds, the round: one more than the round the members were trained with).
Train with ``pseudo_dir=pseudo/<name>`` to add them to every fold's training images (never to
validation); ``fine_tune_from=`` then continues from that run on labelled data only.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.core.config import ConfigError, stage_main
from pipeline.core.errors import PipelineError
from pipeline.data import load_coco
from pipeline.inference.pseudo_config import PseudoConfig
from pipeline.inference.pseudo_labels import previous_round, write_pseudo_labels
from pipeline.submission.writer import resolve_submission_members

log = logging.getLogger(__name__)


def run(cfg: PseudoConfig) -> dict[str, Any]:
    """Write ``<out_dir>/<name>/``; returns the manifest."""
    cfg.validate()
    coco = load_coco(cfg.data_dir, cfg.test_ann, require_annotations=False)
    unknown = sorted(set(cfg.class_thresholds) - set(coco.class_names))
    if unknown:
        raise ConfigError(f"class_thresholds: unknown classes {unknown}; known: {', '.join(coco.class_names)}")
    members, fusion, source = resolve_submission_members(
        coco, name=cfg.name, ensemble=cfg.ensemble, runs=cfg.runs, tta=cfg.tta, ensembles_dir=cfg.ensembles_dir
    )
    if not coco.images:
        raise PipelineError(f"{coco.path}: no test images to pseudo-label")
    out = Path(cfg.out_dir) / cfg.name
    round_ = previous_round(members) + 1
    info = {"source": source, "test_ann": str(coco.path), "ann_digest": coco.digest, "round": round_}
    thresholds = {coco.class_names.index(n): float(t) for n, t in cfg.class_thresholds.items()}
    manifest = write_pseudo_labels(
        coco, members, [float(w) for w in fusion.weights], out, cfg.threshold, thresholds, info, cfg.progress
    )
    log.info(
        "pseudo-labels of %d test images (round %d, threshold %.2f): %.1f%% of pixels confident -> %s",
        len(coco.images),
        round_,
        cfg.threshold,
        100 * manifest["confident_share"],
        out,
    )
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main(PseudoConfig, run, argv, "Write pseudo-labels of the test images from an ensemble")


if __name__ == "__main__":
    raise SystemExit(main())
