"""Which detections a Mask R-CNN run turns into probabilities: the out-of-fold mIoU of its best
checkpoint for each ``box_score_thresh`` (detections scoring at or below it dropped) and each cap
on detections per image (``box_detections_per_img``), each with its paired bootstrap gain over the
first pair, on the run's validation fold (docs/measurements.md records the runs that set the
defaults).

One forward pass per image at the lowest threshold and the highest cap: every other pair keeps
the highest-scoring of those detections above its threshold, up to its cap, which are exactly the
detections the model keeps with that pair (per-class NMS suppresses a box only by a higher-scoring
one, and the cap keeps the highest scores).  Images that reach the highest cap are counted.

    .venv/bin/python benchmarks/maskrcnn_thresholds.py RUN_DIR [--thresholds 0.05 0.1 0.2 0.3 0.5]
        [--detections 100 200] [--data-dir DIR] [--threads N]
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.core.layout import RunFolder
from pipeline.data import MaskCache, Preprocessing, SegmentationDataset, ValDataset, load_coco, split_ids
from pipeline.engine.checkpoint import load_checkpoint_model
from pipeline.evaluation.metrics import confusion_matrix
from pipeline.evaluation.selection import bootstrap_miou, format_interval, paired_gain
from pipeline.models.backends.detection import detection_probabilities
from pipeline.models.contract import unwrap


def per_image_confusions(run_dir: Path, data_dir: str | None, pairs: list[tuple[float, int]]) -> tuple[dict, int, int]:
    """Per (threshold, cap), one confusion matrix per validation image; the images, and those at the cap."""
    model, cfg, ckpt = load_checkpoint_model(RunFolder(run_dir).best)
    heads = unwrap(model).net.roi_heads
    heads.score_thresh = min(t for t, _ in pairs)
    heads.detections_per_img = max(c for _, c in pairs)
    coco = load_coco(data_dir or cfg.data_dir, cfg.ann_file, mask_rule=cfg.mask_rule)
    _, val_ids = split_ids(coco, cfg.folds_file, cfg.fold)
    size = tuple(ckpt["img_size"])
    prep = Preprocessing.from_dict(ckpt.get("preprocessing"))
    images = ValDataset(SegmentationDataset(coco, val_ids, None, MaskCache(coco, cfg.cache_dir), prep), size)
    k = coco.num_classes
    cms: dict[tuple[float, int], list] = {p: [] for p in pairs}
    capped = 0
    with torch.inference_mode():
        for image, mask, _ in images:
            detection = model(image[None])["detections"][0]
            order = detection["scores"].argsort(descending=True)
            detection = {n: v[order] for n, v in detection.items()}
            capped += int(detection["scores"].numel() >= heads.detections_per_img)
            for t, cap in pairs:
                keep = (detection["scores"] > t).nonzero()[:cap, 0]
                probs = detection_probabilities({n: v[keep] for n, v in detection.items()}, k, size)
                full = F.interpolate(probs[None], size=tuple(mask.shape), mode="bilinear", align_corners=False)[0]
                cms[(t, cap)].append(confusion_matrix(full.argmax(0).numpy(), mask.numpy(), k))
    return cms, len(val_ids), capped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.3, 0.5])
    parser.add_argument("--detections", type=int, nargs="+", default=[100])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pairs = list(itertools.product(args.thresholds, args.detections))
    cms, n, capped = per_image_confusions(args.run_dir, args.data_dir, pairs)
    print(f"{args.run_dir}: {n} validation images, {capped} at {max(args.detections)} detections")
    print("box_score_thresh | box_detections_per_img | OOF mIoU [90% interval] | gain over the first [90% interval]")
    for t, cap in pairs:
        gain = paired_gain(cms[pairs[0]], cms[(t, cap)])
        print(f"{t:g} | {cap} | {format_interval(bootstrap_miou(cms[(t, cap)]))} | {format_interval(gain)}")


if __name__ == "__main__":
    main()
