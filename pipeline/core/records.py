"""Typed records of what stages hand over through files (beside :mod:`pipeline.core.layout`, which
names the files): the ensemble's ``weights.yaml`` (:class:`EnsembleRecord`, its members
:class:`MemberRecord`).  A record reads its file with errors that name it and writes the YAML the
ensemble stage always wrote (``to_dict`` keeps the keys in their order)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_write_text, read_yaml

MEMBER_KEYS = ("name", "path", "tta", "oof_stores", "test_stores")


@dataclass
class MemberRecord:
    """One ensemble member: its run folder, TTA set, stores and weight; ``scores`` holds what the
    ensemble stage measured of it (OOF mIoU, its interval, per-class IoU)."""

    name: str
    path: str
    tta: str | None
    oof_stores: list[str]
    test_stores: list[str]
    weight: float
    scores: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in MEMBER_KEYS}
        return {**out, "weight": self.weight, **self.scores}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> MemberRecord:
        if not isinstance(data, dict) or not {"name", "weight", "test_stores"} <= set(data):
            raise PipelineError(f"{where} lacks name, weight or test_stores")
        scores = {k: v for k, v in data.items() if k not in (*MEMBER_KEYS, "weight")}
        return cls(
            str(data["name"]),
            str(data.get("path") or ""),
            data.get("tta"),
            list(data.get("oof_stores") or []),
            list(data["test_stores"] or []),
            float(data["weight"]),
            scores,
        )


@dataclass
class EnsembleRecord:
    """``ensembles/<name>/weights.yaml``: the members and how they are fused (method, bias on
    log-probabilities), the classes, and the ensemble stage's report (``report``: OOF scores with
    intervals, the selection, post-processing, shake-up, tuning and config), in the file's order."""

    name: str
    method: str
    members: list[MemberRecord]
    tta: str | None = None
    class_names: list[str] | None = None
    mask_rule: str | None = None
    bias: list[float] | None = None
    report: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    HEAD = ("name", "method", "tta", "class_names", "mask_rule", "members", "weights", "bias")

    @property
    def weights(self) -> list[float]:
        return [m.weight for m in self.members]

    @property
    def oof(self) -> dict[str, Any]:
        return dict(self.report.get("oof") or {})

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "method": self.method, "tta": self.tta}
        out.update(class_names=self.class_names, mask_rule=self.mask_rule)
        out.update(members=[m.to_dict() for m in self.members], weights=self.weights, bias=self.bias)
        return {**out, **self.report}

    def write(self, path: str | Path) -> Path:
        return atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True))

    @classmethod
    def from_dict(cls, data: Any, source: str = "weights.yaml") -> EnsembleRecord:
        if not isinstance(data, dict) or not isinstance(data.get("members"), list) or not data["members"]:
            raise PipelineError(f"{source}: not an ensemble weights file (no members list)")
        members = [MemberRecord.from_dict(m, f"{source}: member {i + 1}") for i, m in enumerate(data["members"])]
        bias = data.get("bias")
        names = data.get("class_names")
        if bias is not None and names is not None and len(bias) != len(names):
            raise PipelineError(f"{source}: bias has {len(bias)} values for {len(names)} classes")
        return cls(
            str(data.get("name") or ""),
            str(data.get("method", "mean")),
            members,
            data.get("tta"),
            None if names is None else list(names),
            data.get("mask_rule"),
            None if bias is None else [float(b) for b in bias],
            {k: v for k, v in data.items() if k not in cls.HEAD},
            source,
        )

    @classmethod
    def read(cls, path: str | Path) -> EnsembleRecord:
        """Read and check a ``weights.yaml``; errors name the file."""
        data = read_yaml(path, "ensemble weights file not found (run make ensemble first)")
        return cls.from_dict(data, str(path))


@dataclass
class PostprocessRecord:
    """``ensembles/<name>/postprocess.yaml``: the post-processor chosen on OOF (``none`` when the
    selection rule refused the tuned one), its parameters, and the comparison that decided."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    oof_miou_without: float | None = None
    oof_miou_with: float | None = None
    oof_gain: dict[str, float] | None = None  # gain, low, high of the paired bootstrap interval
    accepted: bool | None = None
    # with several candidates: each comparison of the rule (current, candidate, gain, low, high, accepted)
    tried: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "params": self.params}
        if self.oof_gain is not None:
            out.update(oof_miou_without=self.oof_miou_without, oof_miou_with=self.oof_miou_with)
            out.update(oof_gain=self.oof_gain, accepted=self.accepted)
        if self.tried:
            out["tried"] = [dict(t) for t in self.tried]
        return out

    @classmethod
    def from_dict(cls, data: Any, source: str = "postprocess.yaml") -> PostprocessRecord:
        if not isinstance(data, dict) or "name" not in data:
            raise PipelineError(f"{source}: not a post-processing file (no name)")
        params = data.get("params") or {}
        if not isinstance(params, dict):
            raise PipelineError(f"{source}: params must be a mapping, got {params!r}")
        return cls(
            str(data["name"]),
            params,
            data.get("oof_miou_without"),
            data.get("oof_miou_with"),
            data.get("oof_gain"),
            data.get("accepted"),
            list(data.get("tried") or []),
        )
