"""Test-time fusion: the members of a submission (an ensemble's weights file or a plain mean of
runs) with their test stores, and their probabilities fused into one map per test image."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.data import CocoData, ProbReader
from pipeline.inference.ensemble import (
    WEIGHTS_FILE,
    Fusion,
    Workspace,
    biased_probabilities,
    load_ensemble,
    open_stores,
    resolve_members,
)


@dataclass
class SubmitMember:
    name: str
    weight: float
    tta: str | None
    readers: list[ProbReader]


def resolve_submission_members(
    coco: CocoData,
    *,
    name: str,
    ensemble: str | None = None,
    runs: Sequence[str] | None = None,
    tta: str | None = None,
    ensembles_dir: str = "ensembles",
) -> tuple[list[SubmitMember], Fusion, dict[str, Any]]:
    """Members with their test stores, the fusion, and the ensemble's recorded facts: the plain
    mean of ``runs``, or the ensemble file ``ensemble`` (default ``<ensembles_dir>/<name>/weights.yaml``)."""
    source: dict[str, Any]
    if runs:
        members = resolve_members(runs, tta, need_oof=False)
        entries = [(m.name, 1.0 / len(members), m.tta, m.test_stores) for m in members]
        fusion = Fusion([w for _, w, _, _ in entries])
        source = {"runs": list(runs), "method": fusion.method}
    else:
        path = Path(ensemble) if ensemble else Path(ensembles_dir) / name / WEIGHTS_FILE
        if not ensemble and not path.is_file():
            raise PipelineError(
                f"{path}: no ensemble weights file; run make ensemble NAME={name}, "
                "or pass ensemble=<weights.yaml> or runs=<run folders>"
            )
        record = load_ensemble(path)
        entries = [(m.name, m.weight, m.tta, m.test_stores) for m in record.members]
        if record.class_names and record.class_names != coco.class_names:
            raise PipelineError(f"{path}: classes {record.class_names} differ from {coco.path}'s {coco.class_names}")
        fusion = Fusion.of(record)
        source = {"ensemble": str(path), "method": record.method, "oof": record.report.get("oof", {})}
    members = []
    for name, weight, tta, test_stores in entries:
        if not test_stores:
            raise PipelineError(
                f"member {name}: no test_{tta or '<tta>'}/ stores; run make predict SPLIT=test on its folds"
            )
        members.append(SubmitMember(name, float(weight), tta, open_stores(test_stores, coco.class_names)))
    wanted = set(coco.image_ids)
    for m in members:
        for r in m.readers:
            missing = sorted(wanted - set(r.image_ids))
            if missing:
                raise PipelineError(
                    f"{r.folder}: no probabilities for {len(missing)} test image(s) of {coco.path}, "
                    f"e.g. ids {missing[:5]} (predict again with the same test.json)"
                )
            renamed = [i for i in coco.image_ids if str(r.row(i).file_name) != str(coco.image(i)["file_name"])]
            if renamed:
                i = renamed[0]
                raise PipelineError(
                    f"{r.folder}: image id {i} is {r.row(i).file_name!r} there but "
                    f"{coco.image(i)['file_name']!r} in {coco.path} (predicted with another test.json?)"
                )
    return members, fusion, source


class MemberProbs:
    """A member's test probabilities of one image: the mean over its fold stores at the image size.

    The result lives in a buffer reused by the next call (the fusion consumes one member at
    a time), so reading a test set does not churn the allocator.
    """

    def __init__(self) -> None:
        self.workspace = Workspace()

    def __call__(self, member: SubmitMember, image_id: int, size: tuple[int, int]) -> np.ndarray:
        shape = (member.readers[0].num_classes, int(size[0]), int(size[1]))
        acc, tmp = self.workspace.arrays(shape, 2)
        for j, reader in enumerate(member.readers):
            reader.load_into(image_id, size, acc if j == 0 else tmp)
            if j:
                acc += tmp
        if len(member.readers) > 1:
            acc /= np.float32(len(member.readers))
        return acc


def fused_probabilities(
    members: list[SubmitMember],
    weights: list[float],
    image_id: int,
    size: tuple[int, int],
    probs: MemberProbs,
    bias: np.ndarray | None = None,
) -> np.ndarray:
    """The weighted mean of the members' probabilities (K x H x W) of one image; a bias (per class)
    is applied to the log-probabilities, as the fusion applies it."""
    total = None
    for member, w in zip(members, weights, strict=True):
        if w <= 0:
            continue
        p = probs(member, image_id, size) * np.float32(w)
        total = p if total is None else total + p
    return biased_probabilities(total / np.float32(sum(w for w in weights if w > 0)), bias)


def predict_label_map(
    members: Sequence[SubmitMember],
    fusion: Fusion,
    image_id: int,
    size: tuple[int, int],
    probs: MemberProbs | None = None,
) -> np.ndarray:
    """Class-index map of one test image at ``size`` (H, W)."""
    probs = probs or MemberProbs()
    active = fusion.active()
    return fusion((probs(members[i], image_id, size) for i in active), indices=active)
