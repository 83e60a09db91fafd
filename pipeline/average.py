"""Weight-averaging stage: ``make average RUN=runs/<exp>/fold0 K=3``.

Averages the weights of the run's ``K`` best epochs by val mIoU (kept under ``top/`` when the
run was trained with ``keep_top_k=`` >= K), recomputes the BatchNorm statistics on the run's
training images, validates the result on the fold and writes ``averaged.pt``: a checkpoint
the predict stage takes like any other (``make predict ARGS="checkpoint=averaged"``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from pipeline.core.config import ConfigError, stage_main
from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_write_bytes
from pipeline.core.layout import RunFolder
from pipeline.core.torch_files import check_trust_list
from pipeline.data import MaskCache, Preprocessing, SegmentationDataset, ValDataset, collate, load_coco, split_ids
from pipeline.engine.averaging import average_states, recompute_bn
from pipeline.engine.checkpoint import load_checkpoint_model, load_model_state, read_checkpoint, serialize
from pipeline.engine.loop import evaluate
from pipeline.engine.runtime import amp_dtype, resolve_device
from pipeline.evaluation.metrics import mean_iou

log = logging.getLogger(__name__)


@dataclass
class AverageConfig:
    run_dir: str = ""
    k: int = 3
    data_dir: str | None = None  # default: the run's own data_dir
    batch_size: int = 8
    bn_batches: int | None = None  # batches of training images for the BatchNorm statistics (None: all)
    device: str = "auto"
    trust_pickle: list[str] = field(default_factory=list)  # files you trust to unpickle in full (it can run code)

    def validate(self) -> None:
        if not self.run_dir:
            raise ConfigError("run_dir is required (a training run folder such as runs/<experiment>/fold0)")
        if self.k < 1:
            raise ConfigError(f"k must be at least 1, got {self.k}")
        check_trust_list(self.trust_pickle)


def top_weights(
    folder: RunFolder, k: int, trust_pickle: Iterable[str] = ()
) -> tuple[list[dict[str, Any]], list[dict[str, torch.Tensor]]]:
    """The index entries and weights of the ``k`` best epochs kept under ``top/``."""
    import json

    index = folder.top / "index.json"
    if not index.is_file():
        raise PipelineError(f"{index}: no kept epochs (train with keep_top_k={k} or more)")
    entries = json.loads(index.read_text())[:k]
    if len(entries) < k:
        raise PipelineError(f"{index}: {len(entries)} kept epoch(s), {k} asked (train with keep_top_k={k})")
    return entries, [read_checkpoint(folder.top / e["file"], trust_pickle)["model"] for e in entries]


def run(cfg: AverageConfig) -> Path:
    """Write ``<run_dir>/averaged.pt``; returns its path."""
    cfg.validate()
    folder = RunFolder(Path(cfg.run_dir))
    entries, states = top_weights(folder, cfg.k, cfg.trust_pickle)
    device = resolve_device(cfg.device)
    model, tcfg, base = load_checkpoint_model(folder.best, device, trust_pickle=cfg.trust_pickle)
    load_model_state(model, average_states(states), folder.top)
    coco = load_coco(cfg.data_dir or tcfg.data_dir, tcfg.ann_file, mask_rule=tcfg.mask_rule)
    train_ids, val_ids = split_ids(coco, tcfg.folds_file, tcfg.fold)
    size = (int(base["img_size"][0]), int(base["img_size"][1]))
    prep = Preprocessing.from_dict(base.get("preprocessing"))
    cache = MaskCache(coco, tcfg.cache_dir)

    def loader(ids):
        return DataLoader(
            ValDataset(SegmentationDataset(coco, ids, None, cache, prep), size),
            batch_size=cfg.batch_size,
            collate_fn=collate,
            shuffle=False,
        )

    batches = recompute_bn(model, loader(train_ids), device, cfg.bn_batches)
    miou = float("nan")
    if val_ids:
        miou = mean_iou(evaluate(model, loader(val_ids), coco.num_classes, device, amp_dtype("auto", device)))
    state = {**base, "model": model.state_dict(), "ema": None, "averaged_from": entries, "averaged_val_miou": miou}
    out = folder.checkpoint("averaged")
    atomic_write_bytes(out, serialize(state))
    log.info(
        "averaged epochs %s (val mIoU %s) with BatchNorm from %d batches: val mIoU %.4f (best alone %.4f) -> %s",
        [e["epoch"] for e in entries],
        [round(e["metric"], 4) for e in entries],
        batches,
        miou,
        base["best_metric"],
        out,
    )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main(AverageConfig, run, argv, "Average the top-k checkpoints of a run (averaged.pt)")


if __name__ == "__main__":
    raise SystemExit(main())
