"""The post-processor contract, its registry, the choice on OOF under the selection rule, and the
record a choice leaves beside the ensemble (``postprocess.yaml``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import yaml

from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_write_text, read_yaml
from pipeline.core.records import PostprocessRecord
from pipeline.core.registry import Registry
from pipeline.evaluation.metrics import mean_iou
from pipeline.evaluation.selection import select

POSTPROCESS_FILE = "postprocess.yaml"


class OofMaps(Protocol):
    """What a post-processor is tuned on: the chosen fusion's out-of-fold predictions at the OOF
    stores' resolution."""

    def label_maps(self) -> Sequence[tuple[np.ndarray, np.ndarray]]:
        """(fused class map, ground truth) per image."""

    def samples(self) -> Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(fused probabilities K x h x w, the image resized to h x w, ground truth) per image."""


@dataclass
class Tuned:
    """A tuning's outcome: the parameters, and per-image confusion matrices (N x K x K) without the
    post-processor and with it at those parameters, which the selection rule compares."""

    params: dict[str, Any]
    without: np.ndarray
    with_: np.ndarray


@dataclass(frozen=True)
class PostProcessor:
    name: str
    description: str
    # (OOF maps, number of classes, seed) -> the parameters and the confusion matrices with and without
    tune: Callable[[OofMaps, int, int], Tuned]
    # (params, one image's fused class map, its fused probabilities, the image) -> the final class map
    apply: Callable[[dict[str, Any], np.ndarray, np.ndarray | None, np.ndarray | None], np.ndarray]
    needs_image: bool = False  # apply needs the fused probabilities and the image, not only the class map

    def __call__(
        self,
        params: dict[str, Any],
        labels: np.ndarray,
        probs: np.ndarray | None = None,
        image: np.ndarray | None = None,
    ) -> np.ndarray:
        return self.apply(params, labels, probs, image)


POSTPROCESSORS: Registry = Registry("post-processor")


def _no_tuning(oof: OofMaps, num_classes: int, seed: int) -> Tuned:  # pragma: no cover - never tuned
    raise PipelineError("the 'none' post-processor has nothing to tune")


POSTPROCESSORS.add(
    "none",
    PostProcessor("none", "the fused argmax as it is", _no_tuning, lambda params, labels, probs, image: labels),
    "the fused argmax as it is",
)


def candidates(names: str) -> list[str]:
    """The post-processors of ``names`` (one, or several joined by commas, simplest first), ``none`` left out;
    an unknown one is an error listing the known."""
    out = [n.strip() for n in str(names).split(",") if n.strip()]
    for n in out:
        POSTPROCESSORS.get(n)
    return [n for n in out if POSTPROCESSORS.key(n) != "none"]


def choose(names: str, oof: OofMaps, num_classes: int, seed: int = 0) -> PostprocessRecord:
    """Tune each post-processor of ``names`` (``min_area``, or several such as ``min_area,crf``, simplest
    first) on ``oof`` and keep one only when the paired bootstrap interval of its OOF mIoU gain over the
    choice so far lies above zero; the record for ``postprocess.yaml`` (with every comparison when there
    were several)."""
    wanted = candidates(names)
    if not wanted:
        return PostprocessRecord("none")
    tuned = {n: POSTPROCESSORS.get(n).tune(oof, num_classes, seed) for n in wanted}
    base = tuned[wanted[0]].without
    choice = select([("none", base), *[(POSTPROCESSORS.get(n).name, tuned[n].with_) for n in wanted]], seed=seed)
    chosen = wanted[choice.index - 1] if choice.index else wanted[0]
    c = next((c for c in choice.comparisons if c.candidate == POSTPROCESSORS.get(chosen).name), choice.comparisons[0])
    return PostprocessRecord(
        choice.chosen,
        tuned[chosen].params,
        float(mean_iou(base.sum(0))),
        float(mean_iou(tuned[chosen].with_.sum(0))),
        {"gain": c.gain, "low": c.low, "high": c.high},
        c.accepted,
        [cmp.as_dict() for cmp in choice.comparisons] if len(wanted) > 1 else [],
    )


def needs_image(record: PostprocessRecord | None) -> bool:
    """Whether applying ``record`` needs each image's fused probabilities and the image itself."""
    return record is not None and POSTPROCESSORS.get(record.name).needs_image


def apply_postprocess(
    record: PostprocessRecord | None,
    labels: np.ndarray,
    probs: np.ndarray | None = None,
    image: np.ndarray | None = None,
) -> np.ndarray:
    """The chosen post-processing of ``record`` (none when absent or refused) on one image's map."""
    if record is None or record.name == "none":
        return labels
    pp: PostProcessor = POSTPROCESSORS.get(record.name)
    if pp.needs_image and (probs is None or image is None):
        raise PipelineError(f"the {pp.name} post-processing needs the fused probabilities and the image")
    return pp.apply(record.params, labels, probs, image)


def write_postprocess(folder: Path, record: PostprocessRecord) -> Path:
    return atomic_write_text(folder / POSTPROCESS_FILE, yaml.safe_dump(record.to_dict(), sort_keys=False))


def read_postprocess(folder: Path) -> PostprocessRecord | None:
    path = folder / POSTPROCESS_FILE
    if not path.is_file():
        return None
    record = PostprocessRecord.from_dict(read_yaml(path, "no post-processing file"), str(path))
    if record.name not in POSTPROCESSORS:
        known = ", ".join(POSTPROCESSORS.names())
        raise PipelineError(f"{path}: unknown post-processor {record.name!r}; known: {known}")
    return record
