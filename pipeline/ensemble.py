"""Ensembling stage: ``make ensemble RUNS="runs/unet-demo runs/fpn-demo" NAME=x``.

Members are experiment folders ``runs/<exp>`` (or single fold folders ``runs/<exp>/fold<k>``).
A member's out-of-fold (OOF) prediction is the union of its folds' ``oof_<tta>`` stores
(``oof`` where a fold has no TTA store); its test prediction, used by the submit stage, is
the mean of its folds' ``test_<tta>`` stores.  ``tta=None`` picks the only TTA present.

Combination methods (:data:`METHODS`):

* ``mean``: argmax of the weighted mean of the members' probabilities;
* ``vote``: weighted hard vote of the members' argmax maps, ties broken by the weighted
  mean probability.

With a bias ``b`` (one value per class) the decision uses log-probabilities:
``argmax(log(sum_m w_m p_m) + b)`` for ``mean``, and each member votes for
``argmax(log p_m + b)`` for ``vote``.

Weights (on the simplex) and optionally the bias are tuned with a seeded Optuna TPE sampler
to maximise the dataset-level OOF mIoU (:mod:`pipeline.evaluation.metrics`) over the images every
member has OOF probabilities for.  Scoring is done at the stored OOF resolution (for each
image the largest stored size among the members; other members are resized bilinearly),
against the ground-truth map resized with nearest neighbour.  Test images are never used.

Memory: the OOF probabilities of all members are quantised to uint8 and written once to a
single cache file beside the report; every trial streams over it in chunks of about
:data:`CHUNK_PIXELS` pixels with explicit reads into one reusable buffer, so the peak
memory is a few images' worth of probabilities times the number of members, whatever the
number of images.  (Explicit reads rather than ``np.memmap``: pages of a mapping count in
the process's resident set until the kernel drops them.)  Member, plain-average and
ensemble scores are all computed from the same cache.

Outputs in ``<out_dir>/<name>/``: ``weights.yaml`` (members with their store folders,
weights, bias, method, OOF scores; read by the submit stage) and ``report.md``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from pipeline.core.config import ConfigError, stage_main, to_dict
from pipeline.core.io import atomic_write_text
from pipeline.core.layout import ENSEMBLE_REPORT
from pipeline.core.tables import format_table, markdown_table
from pipeline.data import load_coco
from pipeline.evaluation.metrics import iou_per_class, mean_iou
from pipeline.inference.ensemble import (
    METHODS,
    WEIGHTS_FILE,
    Fusion,
    OofCache,
    resolve_members,
    split_paths,
    tune_bias,
    tune_weights,
)
from pipeline.inference.store import stores_mask_rule

log = logging.getLogger(__name__)


@dataclass
class EnsembleConfig:
    runs: list[str] = field(default_factory=list)  # runs/<exp> or runs/<exp>/fold<k>; spaces or commas
    tta: str | None = None  # None: the only TTA present in each member
    data_dir: str = "data/demo"
    ann_file: str = "train_all.json"
    method: str = "mean"
    tune: bool = True
    tune_bias: bool = False
    bias_range: float = 1.0  # bias values are sampled in [-bias_range, bias_range]
    n_trials: int = 100  # weight trials; the bias gets as many more when tune_bias
    seed: int = 0
    out_dir: str = "ensembles"
    name: str = "ensemble"
    max_images: int | None = None  # subsample the OOF images (seeded) for speed
    progress: bool = True

    def validate(self) -> None:
        self.runs = split_paths(self.runs)
        if not self.runs:
            raise ConfigError('runs is required: experiment folders such as runs="runs/unet-demo runs/fpn-demo"')
        if self.method not in METHODS:
            raise ConfigError(f"method: unknown {self.method!r}; known: {', '.join(METHODS)}")
        if self.n_trials < 0:
            raise ConfigError(f"n_trials must be >= 0, got {self.n_trials}")
        if self.bias_range <= 0:
            raise ConfigError(f"bias_range must be positive, got {self.bias_range}")
        if self.max_images is not None and self.max_images < 1:
            raise ConfigError(f"max_images must be at least 1, got {self.max_images}")
        if not self.name.strip():
            raise ConfigError("name must not be empty")


# ----------------------------------------------------------------------------- members


# ----------------------------------------------------------------------------- combination


# ----------------------------------------------------------------------------- OOF cache


# ----------------------------------------------------------------------------- tuning


# ----------------------------------------------------------------------------- report
def _fmt(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def _ious(cm: np.ndarray, class_names: Sequence[str]) -> dict[str, float | None]:
    return {n: (None if np.isnan(v) else float(v)) for n, v in zip(class_names, iou_per_class(cm), strict=False)}


def render_report(cfg: EnsembleConfig, result: dict[str, Any], class_names: Sequence[str]) -> tuple[str, str]:
    """(text table for the log, report.md)."""
    members = result["members"]
    head = ["member", "weight", "tta", "folds", "OOF mIoU"]
    rows = [
        [m["name"], f"{m['weight']:.4f}", m["tta"] or "-", len(m["oof_stores"]), _fmt(m["oof_miou"])] for m in members
    ]
    rows.append(["plain average", "-", "-", "-", _fmt(result["oof"]["plain_average_miou"])])
    rows.append([f"ensemble ({cfg.method})", "-", "-", "-", _fmt(result["oof"]["ensemble_miou"])])
    cls_head = ["class"] + [m["name"] for m in members] + ["plain average", "ensemble"]
    cls_rows = [
        [c]
        + [_fmt(m["oof_iou_per_class"][c]) for m in members]
        + [_fmt(result["oof"]["plain_average_iou_per_class"][c]), _fmt(result["oof"]["iou_per_class"][c])]
        for c in class_names
    ]
    text = format_table(head, rows) + "\n\n" + format_table(cls_head, cls_rows)
    bias = result["bias"]
    md = [
        f"# Ensemble `{cfg.name}`",
        "",
        f"Method: `{cfg.method}` ({METHODS.entry(cfg.method).description}). Tuned: "
        f"{'weights' if cfg.tune else 'nothing (plain average)'}"
        + (" and per-class bias on log-probabilities" if cfg.tune and cfg.tune_bias else "")
        + f", {result['tuning']['trials']} trials, TPE seed {cfg.seed}.",
        "",
        f"Out-of-fold scores: dataset-level mIoU over {result['oof']['n_images']} images that every member has "
        "OOF probabilities for, at the stored OOF resolution (ground truth resized with nearest neighbour), "
        "probabilities quantised to 1/255.",
        "",
        markdown_table(head, rows),
        "",
        f"Chosen on OOF: {result['oof']['chosen']}.",
        "",
        "## Per-class IoU (OOF)",
        "",
        markdown_table(cls_head, cls_rows),
        "",
    ]
    if bias is not None:
        md += [
            "## Bias (added to log-probabilities)",
            "",
            markdown_table(["class", "bias"], [[c, f"{b:+.4f}"] for c, b in zip(class_names, bias, strict=False)]),
            "",
        ]
    md += ["## Members", ""]
    for m in members:
        md.append(
            f"- `{m['name']}` ({m['path']}): OOF {', '.join(m['oof_stores'])}; test "
            f"{', '.join(m['test_stores']) or 'none'}"
        )
    return text, "\n".join(md) + "\n"


# ----------------------------------------------------------------------------- stage
def _choose(cfg: EnsembleConfig, members: list, cache: OofCache) -> tuple:
    """The best OOF combination among tuned weights, the plain average and each member alone,
    then a tuned bias if it helps; with the confusion matrices the report needs."""
    m = len(members)
    plain = Fusion(np.ones(m), None, cfg.method)
    singles = [Fusion(np.eye(m)[i], None, cfg.method) for i in range(m)]
    cms = cache.confusions([plain, *singles])
    plain_cm, member_cms = cms[0], cms[1:]
    candidates: list[tuple[str, np.ndarray, np.ndarray | None, np.ndarray]] = []
    trials = 0
    if cfg.tune and m > 1 and cfg.n_trials > 0:
        weights, _ = tune_weights(cache, cfg.method, cfg.n_trials, cfg.seed)
        trials += cfg.n_trials
        candidates.append(("tuned weights", weights, None, cache.confusion(Fusion(weights, None, cfg.method))))
    candidates.append(("plain average", plain.weights, None, plain_cm))
    candidates += [
        (f"member {x.name} alone", s.weights, None, c) for x, s, c in zip(members, singles, member_cms, strict=False)
    ]
    label, weights, bias, best_cm = max(candidates, key=lambda c: mean_iou(c[3]))  # first of equals wins
    if label != "tuned weights":
        log.info("best OOF combination: %s", label)
    if cfg.tune and cfg.tune_bias and cfg.n_trials > 0:
        tuned_bias, _ = tune_bias(cache, weights, cfg.method, cfg.n_trials, cfg.seed, cfg.bias_range)
        trials += cfg.n_trials
        bias_cm = cache.confusion(Fusion(weights, tuned_bias, cfg.method))
        if mean_iou(bias_cm) > mean_iou(best_cm):
            bias, best_cm = tuned_bias, bias_cm
        else:
            log.info("the tuned bias does not improve the OOF mIoU; no bias is used")
    n_images = len(cache.image_ids)
    return label, weights, bias, best_cm, plain_cm, member_cms, trials, n_images


def run(cfg: EnsembleConfig) -> dict[str, Any]:
    """Tune the ensemble on OOF probabilities; write ``weights.yaml`` and ``report.md``."""
    cfg.validate()
    started = time.perf_counter()
    members = resolve_members(cfg.runs, cfg.tta)
    mask_rule = stores_mask_rule([f for x in members for f in x.oof_stores])
    coco = load_coco(cfg.data_dir, cfg.ann_file, mask_rule=mask_rule)
    out = Path(cfg.out_dir) / cfg.name
    m = len(members)
    log.info("ensemble %s: %d members (%s), method %s", cfg.name, m, ", ".join(x.name for x in members), cfg.method)
    with OofCache(members, coco, folder=out, max_images=cfg.max_images, seed=cfg.seed, progress=cfg.progress) as cache:
        choice = _choose(cfg, members, cache)
    label, weights, bias, best_cm, plain_cm, member_cms, trials, n_images = choice

    member_rows = []
    for x, w, c in zip(members, weights, member_cms, strict=False):
        member_rows.append(
            {
                **x.as_dict(),
                "weight": float(w),
                "oof_miou": mean_iou(c),
                "oof_iou_per_class": _ious(c, coco.class_names),
            }
        )
    result: dict[str, Any] = {
        "name": cfg.name,
        "method": cfg.method,
        "tta": cfg.tta,
        "class_names": coco.class_names,
        "mask_rule": mask_rule,
        "members": member_rows,
        "weights": [float(w) for w in weights],
        "bias": None if bias is None else [float(b) for b in bias],
        "bias_on": "log-probabilities",
        "oof": {
            "ann_file": str(coco.path),
            "n_images": n_images,
            "scored_at": "stored OOF resolution, ground truth resized with nearest neighbour",
            "ensemble_miou": mean_iou(best_cm),
            "iou_per_class": _ious(best_cm, coco.class_names),
            "plain_average_miou": mean_iou(plain_cm),
            "plain_average_iou_per_class": _ious(plain_cm, coco.class_names),
            "chosen": label if bias is None else f"{label} + bias",
        },
        "tuning": {
            "tune": cfg.tune,
            "tune_bias": cfg.tune_bias,
            "trials": trials,
            "sampler": "TPE",
            "seed": cfg.seed,
            "max_images": cfg.max_images,
        },
        "config": to_dict(cfg),
    }
    text, md = render_report(cfg, result, coco.class_names)
    weights_path = atomic_write_text(out / WEIGHTS_FILE, yaml.safe_dump(result, sort_keys=False, allow_unicode=True))
    report_path = atomic_write_text(out / ENSEMBLE_REPORT, md)
    log.info("ensemble %s on %d OOF images (%.1f s):\n%s", cfg.name, n_images, time.perf_counter() - started, text)
    log.info("wrote %s and %s", weights_path, report_path)
    return {**result, "weights_file": str(weights_path), "report": str(report_path)}


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main(EnsembleConfig, run, argv, "Tune ensemble weights on out-of-fold probabilities")


if __name__ == "__main__":
    raise SystemExit(main())
