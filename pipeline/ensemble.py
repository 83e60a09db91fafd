"""Ensembling stage: ``make ensemble RUNS="runs/unet-demo runs/fpn-demo" NAME=x``.

Members are experiment folders ``runs/<exp>`` (or single fold folders ``runs/<exp>/fold<k>``).
A member's out-of-fold (OOF) prediction is the union of its folds' ``oof_<tta>`` stores
(``oof`` where a fold has no TTA store); its test prediction, used by the submit stage, is
the mean of its folds' ``test_<tta>`` stores.  ``tta=auto`` picks the only TTA present
(``tta=none`` is the store of predictions without TTA).

Combination methods (:data:`METHODS`):

* ``mean``: argmax of the weighted mean of the members' probabilities;
* ``vote``: weighted hard vote of the members' argmax maps, ties broken by the weighted
  mean probability.

With a bias ``b`` (one value per class) the decision uses log-probabilities:
``argmax(log(sum_m w_m p_m) + b)`` for ``mean``, and each member votes for
``argmax(log p_m + b)`` for ``vote``.

Weights (on the simplex) are tuned with a seeded Optuna TPE sampler, and optionally the bias by
coordinate ascent (:mod:`pipeline.inference.bias`, its gain cross-fitted over two halves of the
images), to maximise the dataset-level OOF mIoU (:mod:`pipeline.evaluation.metrics`) over the images every
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

Honest selection (:mod:`pipeline.evaluation.selection`): the candidates, simplest first, are the
best single member, the plain average, the tuned weights and then the chosen one plus a tuned
bias; a more complex candidate replaces the current choice only if the paired bootstrap
interval (over OOF images, ``level``, ``n_boot`` replicates, seeded by ``seed``) of its OOF
mIoU gain lies above zero.  Every OOF mIoU is reported with its interval, and the report
estimates the public/private leaderboard shake-up for the test set's size (the number of
images in ``test_ann`` when present, else ``test_images``) with a public share of
``public_share``.  Only the test set's image count is read; test labels are never used.

Outputs in ``<out_dir>/<name>/``: ``weights.yaml`` (members with their store folders,
weights, bias, method, OOF scores with intervals, the selection table and the shake-up; read
by the submit stage) and ``report.md``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.config import stage_main, to_dict
from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_write_text
from pipeline.core.layout import ENSEMBLE_REPORT
from pipeline.core.records import EnsembleRecord, PostprocessRecord
from pipeline.core.tables import format_table, markdown_table
from pipeline.data import load_coco
from pipeline.evaluation.metrics import iou_per_class, mean_iou
from pipeline.evaluation.selection import (
    RULE,
    bootstrap_miou,
    format_interval,
    format_shakeup,
    select,
    shakeup,
)
from pipeline.inference.bias import bias_grid, collect_samples, halves, tune_class_bias
from pipeline.inference.ensemble import (
    METHODS,
    WEIGHTS_FILE,
    FusedOof,
    Fusion,
    OofCache,
    greedy_weights,
    resolve_members,
    tune_weights,
)
from pipeline.inference.ensemble_config import EnsembleConfig
from pipeline.inference.postprocessing import candidates, choose, write_postprocess
from pipeline.inference.store import stores_mask_rule

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- members


# ----------------------------------------------------------------------------- combination


# ----------------------------------------------------------------------------- OOF cache


# ----------------------------------------------------------------------------- tuning


# ----------------------------------------------------------------------------- report
def _fmt(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def _ious(cm: np.ndarray, class_names: Sequence[str]) -> dict[str, float | None]:
    return {n: (None if np.isnan(v) else float(v)) for n, v in zip(class_names, iou_per_class(cm), strict=False)}


def _score_rows(cfg: EnsembleConfig, result: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    oof = result["oof"]
    head = ["member", "weight", "tta", "folds", "OOF mIoU", f"{round(100 * cfg.level)}% interval"]
    rows = [
        [m["name"], f"{m['weight']:.4f}", m["tta"] or "-", len(m["oof_stores"]), *_iv_cells(m["oof_miou_interval"])]
        for m in result["members"]
    ]
    rows.append(["plain average", "-", "-", "-", *_iv_cells(oof["plain_average_interval"])])
    rows.append([f"ensemble ({cfg.method})", "-", "-", "-", *_iv_cells(oof["ensemble_interval"])])
    return head, rows


def _iv_cells(iv: dict[str, float]) -> list[str]:
    return [_fmt(iv["point"]), format_interval(iv).split(" ", 1)[1]]


def _selection_rows(cfg: EnsembleConfig, selection: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    head = ["current choice", "candidate", "OOF gain", f"{round(100 * cfg.level)}% interval", "accepted"]
    rows = [
        [c["current"], c["candidate"], f"{c['gain']:+.4f}", f"[{c['low']:+.4f}, {c['high']:+.4f}]"]
        + ["yes" if c["accepted"] else "no"]
        for c in selection["comparisons"]
    ]
    return head, rows


def _selection_md(cfg: EnsembleConfig, result: dict[str, Any]) -> list[str]:
    selection, shake = result["selection"], result["shakeup"]
    head, rows = _selection_rows(cfg, selection)
    md = [
        "## Selection",
        "",
        f"Rule: {RULE} ({round(100 * cfg.level)}% percentile interval, {cfg.n_boot} replicates, seed {cfg.seed}). "
        f"Candidates, simplest first: {', '.join(selection['candidates'])}.",
        "",
        markdown_table(head, rows) if rows else "Only one candidate: nothing to compare.",
        "",
        "## Leaderboard shake-up (estimate)",
        "",
    ]
    if shake is None:
        md.append("Not estimated: fewer than 2 test images.")
    else:
        md.append(f"Chosen ensemble, test-set size from {shake['test_images_from']}: {format_shakeup(shake)}.")
    return md + [""]


def render_report(cfg: EnsembleConfig, result: dict[str, Any], class_names: Sequence[str]) -> tuple[str, str]:
    """(text table for the log, report.md)."""
    members = result["members"]
    head, rows = _score_rows(cfg, result)
    cls_head = ["class"] + [m["name"] for m in members] + ["plain average", "ensemble"]
    cls_rows = [
        [c]
        + [_fmt(m["oof_iou_per_class"][c]) for m in members]
        + [_fmt(result["oof"]["plain_average_iou_per_class"][c]), _fmt(result["oof"]["iou_per_class"][c])]
        for c in class_names
    ]
    sel_head, sel_rows = _selection_rows(cfg, result["selection"])
    text = format_table(head, rows) + "\n\n" + format_table(cls_head, cls_rows)
    if sel_rows:
        text += "\n\nselection (simplest first):\n" + format_table(sel_head, sel_rows)
    if result["shakeup"] is not None:
        text += "\n\nshake-up: " + format_shakeup(result["shakeup"])
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
        f"probabilities quantised to 1/255; intervals: {round(100 * cfg.level)}% paired bootstrap over images "
        f"({cfg.n_boot} replicates, seed {cfg.seed}, the same resamples for every row).",
        "",
        markdown_table(head, rows),
        "",
        f"Chosen on OOF: {result['oof']['chosen']}.",
        "",
        *_selection_md(cfg, result),
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
@dataclass
class Choice:
    """What :func:`_choose` picked, with the per-image confusion matrices the report needs."""

    label: str  # the chosen weights: a member alone, the plain average or the tuned weights
    weights: np.ndarray
    bias: np.ndarray | None
    chosen: np.ndarray  # per-image matrices of the chosen fusion (with its bias)
    plain: np.ndarray
    members: list[np.ndarray]
    candidates: list[str]
    comparisons: list[dict[str, Any]]
    trials: int


def _choose(cfg: EnsembleConfig, members: list, cache: OofCache) -> Choice:
    """Honest selection among, simplest first, the best single member, the plain average, greedy
    ensemble selection and the tuned weights; then the chosen weights + a tuned bias.  A more complex
    candidate replaces the current choice only if its paired bootstrap gain interval lies above zero."""
    m = len(members)
    plain = Fusion(np.ones(m), None, cfg.method)
    singles = Fusion.singles(m, cfg.method)
    per_image = cache.per_image_confusions([plain, *singles])
    plain_pi, member_pi = per_image[0], per_image[1:]
    best = max(range(m), key=lambda i: mean_iou(member_pi[i].sum(axis=0)))  # first of equals wins
    candidates: list[tuple[str, np.ndarray, np.ndarray]] = [
        (f"member {members[best].name} alone", singles[best].weights, member_pi[best])
    ]
    if m > 1:
        candidates.append(("plain average", plain.weights, plain_pi))
    trials = 0
    if cfg.tune and m > 1 and cfg.greedy_rounds > 0:
        greedy, scored = greedy_weights(cache, cfg.method, cfg.greedy_rounds)
        log.info("greedy ensemble selection: %s after %d fusions scored", np.round(greedy, 3).tolist(), scored)
        if np.count_nonzero(greedy) > 1 and not np.allclose(greedy, plain.weights):  # else already a candidate
            candidates.append(
                ("greedy selection", greedy, cache.per_image_confusions([Fusion(greedy, None, cfg.method)])[0])
            )
    if cfg.tune and m > 1 and cfg.n_trials > 0:
        weights, _ = tune_weights(cache, cfg.method, cfg.n_trials, cfg.seed)
        trials += cfg.n_trials
        tuned = cache.per_image_confusions([Fusion(weights, None, cfg.method)])[0]
        candidates.append(("tuned weights", weights, tuned))
    rule = dict(n_boot=cfg.n_boot, seed=cfg.seed, level=cfg.level)
    selection = select([(name, pi) for name, _, pi in candidates], **rule)
    label, weights, chosen = candidates[selection.index]
    names, comparisons = [c[0] for c in candidates], [c.as_dict() for c in selection.comparisons]
    bias = None
    if cfg.tune and cfg.tune_bias and cfg.method != "mean":
        log.warning("tune_bias: the per-class bias is tuned for method=mean only; no bias is used with %s", cfg.method)
    elif cfg.tune and cfg.tune_bias:
        bias, chosen, step = _tune_bias(cfg, cache, weights, label, chosen)
        names.append(f"{label} + bias")
        crossed = "cross-fitted (two halves of the images)"
        comparisons += [{**c.as_dict(), "estimate": crossed} for c in step.comparisons]
        if bias is None:
            log.info("the tuned bias does not raise the cross-fitted OOF mIoU beyond its interval; no bias is used")
    log.info("chosen on OOF: %s%s", label, "" if bias is None else " + bias")
    return Choice(label, weights, bias, chosen, plain_pi, member_pi, names, comparisons, trials)


def _tune_bias(cfg: EnsembleConfig, cache: OofCache, weights: np.ndarray, label: str, chosen: np.ndarray):
    """A per-class bias by coordinate ascent (:mod:`pipeline.inference.bias`) on the chosen
    weights' fused OOF probabilities.  Its gain is judged cross-fitted: the bias tuned on one half
    of the images scores the other half.  Returns (the bias tuned on all images, or None when
    refused; the chosen per-image matrices; the selection step against no bias)."""
    started = time.perf_counter()
    index = {image_id: j for j, image_id in enumerate(cache.image_ids)}
    fused = ((index[i], p, gt) for i, p, gt in cache.fused_probabilities(Fusion(weights, None, "mean")))
    samples = collect_samples(fused, cache.num_classes, cache.n_pixels, seed=cfg.seed)
    grid = bias_grid(cfg.bias_range, cfg.bias_step)
    first, second = halves(len(cache.image_ids), cfg.seed)
    bias_1 = tune_class_bias(samples.subset(first), grid, cfg.bias_sweeps)[0]
    bias_2 = tune_class_bias(samples.subset(second), grid, cfg.bias_sweeps)[0]
    with_1, with_2 = cache.per_image_confusions([Fusion(weights, bias_1, "mean"), Fusion(weights, bias_2, "mean")])
    crossed = with_1.copy()
    crossed[first] = with_2[first]  # each half scored with the bias tuned on the other
    rule = dict(n_boot=cfg.n_boot, seed=cfg.seed, level=cfg.level)
    step = select([(label, chosen), (f"{label} + bias", crossed)], **rule)
    c = step.comparisons[0]
    log.info(
        "per-class bias: cross-fitted OOF gain %+.4f [%+.4f, %+.4f]: %s (%.1f s)",
        c.gain,
        c.low,
        c.high,
        "kept" if c.accepted else "refused",
        time.perf_counter() - started,
    )
    if step.index == 0:  # refused: no need to tune it on all the images
        return None, chosen, step
    bias, own, tuned = tune_class_bias(samples, grid, cfg.bias_sweeps)
    log.info(
        "per-class bias tuned on all images for the test: sampled OOF mIoU %.4f -> %.4f (%d of %d classes moved)",
        own,
        tuned,
        int(np.count_nonzero(bias)),
        cache.num_classes,
    )
    return bias, cache.per_image_confusions([Fusion(weights, bias, "mean")])[0], step


def _test_size(cfg: EnsembleConfig) -> tuple[int | None, str]:
    """(number of test images, where it comes from): ``test_ann``'s images (never its labels), else the config."""
    path = Path(cfg.data_dir) / cfg.test_ann
    if path.is_file():
        try:
            images = json.loads(path.read_text()).get("images")
        except (OSError, ValueError, AttributeError) as exc:
            raise PipelineError(f"{path}: cannot read the test images ({exc})") from exc
        if isinstance(images, list):
            return len(images), f"{path} ({len(images)} images)"
    if cfg.test_images is not None:
        return cfg.test_images, f"config test_images={cfg.test_images}"
    return None, "the number of OOF images (no test file, test_images unset)"


def _honesty(cfg: EnsembleConfig, choice: Choice) -> dict[str, Any]:
    """Intervals of every member, the plain average and the ensemble; the selection; the shake-up."""
    rule = dict(n_boot=cfg.n_boot, seed=cfg.seed, level=cfg.level)
    size, source = _test_size(cfg)
    shake = None
    if (size if size is not None else len(choice.chosen)) >= 2:
        shake = shakeup(choice.chosen, cfg.public_share, cfg.shakeup_splits, cfg.seed, size, cfg.level).as_dict()
        shake["public_share"] = cfg.public_share
        shake["test_images_from"] = source
    return {
        "members": [bootstrap_miou(c, **rule).as_dict() for c in choice.members],
        "plain": bootstrap_miou(choice.plain, **rule).as_dict(),
        "ensemble": bootstrap_miou(choice.chosen, **rule).as_dict(),
        "selection": {
            "chosen": choice.label if choice.bias is None else f"{choice.label} + bias",
            "rule": RULE,
            **rule,
            "candidates": choice.candidates,
            "comparisons": choice.comparisons,
        },
        "shakeup": shake,
    }


def _tune_postprocess(cfg: EnsembleConfig, choice: Choice, cache: OofCache, coco) -> PostprocessRecord:
    """The post-processing of ``cfg.postprocess`` tuned on the chosen fusion's OOF maps."""
    if not candidates(cfg.postprocess):
        return PostprocessRecord("none")
    fusion = Fusion(choice.weights, choice.bias, cfg.method)
    post = choose(cfg.postprocess, FusedOof(cache, fusion, coco), coco.num_classes, seed=cfg.seed)
    gain = post.oof_gain
    log.info(
        "post-processing %s on OOF: %.4f -> %.4f, gain %+.4f [%+.4f, %+.4f]: %s",
        cfg.postprocess,
        post.oof_miou_without,
        post.oof_miou_with,
        gain["gain"],
        gain["low"],
        gain["high"],
        "kept" if post.accepted else "refused",
    )
    return post


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
        n_images = len(cache.image_ids)
        post = _tune_postprocess(cfg, choice, cache, coco)
    write_postprocess(out, post)
    honest = _honesty(cfg, choice)
    best_cm, plain_cm = choice.chosen.sum(axis=0), choice.plain.sum(axis=0)

    member_rows = []
    for x, w, c, iv in zip(members, choice.weights, choice.members, honest["members"], strict=True):
        member_rows.append(
            {
                **x.as_dict(),
                "weight": float(w),
                "oof_miou": mean_iou(c.sum(axis=0)),
                "oof_miou_interval": iv,
                "oof_iou_per_class": _ious(c.sum(axis=0), coco.class_names),
            }
        )
    result: dict[str, Any] = {
        "name": cfg.name,
        "method": cfg.method,
        "tta": cfg.tta,
        "class_names": coco.class_names,
        "mask_rule": mask_rule,
        "members": member_rows,
        "weights": [float(w) for w in choice.weights],
        "bias": None if choice.bias is None else [float(b) for b in choice.bias],
        "bias_on": "log-probabilities",
        "oof": {
            "ann_file": str(coco.path),
            "n_images": n_images,
            "scored_at": "stored OOF resolution, ground truth resized with nearest neighbour",
            "ensemble_miou": mean_iou(best_cm),
            "ensemble_interval": honest["ensemble"],
            "iou_per_class": _ious(best_cm, coco.class_names),
            "plain_average_miou": mean_iou(plain_cm),
            "plain_average_interval": honest["plain"],
            "plain_average_iou_per_class": _ious(plain_cm, coco.class_names),
            "interval": f"{round(100 * cfg.level)}% paired bootstrap over images, {cfg.n_boot} replicates",
            "chosen": honest["selection"]["chosen"],
        },
        "selection": honest["selection"],
        "postprocess": post.to_dict(),
        "shakeup": honest["shakeup"],
        "tuning": {
            "tune": cfg.tune,
            "tune_bias": cfg.tune_bias,
            "trials": choice.trials,
            "greedy_rounds": cfg.greedy_rounds,
            "sampler": "TPE (weights); coordinate ascent, cross-fitted (bias)",
            "seed": cfg.seed,
            "max_images": cfg.max_images,
        },
        "config": to_dict(cfg),
    }
    text, md = render_report(cfg, result, coco.class_names)
    weights_path = EnsembleRecord.from_dict(result, str(out / WEIGHTS_FILE)).write(out / WEIGHTS_FILE)
    report_path = atomic_write_text(out / ENSEMBLE_REPORT, md)
    log.info("ensemble %s on %d OOF images (%.1f s):\n%s", cfg.name, n_images, time.perf_counter() - started, text)
    log.info("wrote %s and %s", weights_path, report_path)
    return {**result, "weights_file": str(weights_path), "report": str(report_path)}


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main(EnsembleConfig, run, argv, "Tune ensemble weights on out-of-fold probabilities")


if __name__ == "__main__":
    raise SystemExit(main())
