"""A plain baseline recipe, the yardstick of `make all` (kept as it was first committed).

Unet-ResNet18 from scratch, images at half size rounded to multiples of 32, horizontal flips
only, cross-entropy, AdamW lr 1e-3 with cosine decay over the wall budget, batch 8, one model
on all labelled images, predicted at the same size; writes an rle submission.

    python benchmarks/plain_recipe.py --data-dir DIR --budget-min 20 --out submissions/plain.csv
"""

import argparse
import csv
import json
import math
import time
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

MEAN, STD = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)


def load(data_dir, name, size, labelled):
    coco = json.loads((data_dir / name).read_text())
    index = {c["id"]: k + 1 for k, c in enumerate(coco["categories"])}
    anns = {}
    for a in coco.get("annotations", []):
        anns.setdefault(a["image_id"], []).append(a)
    images, masks = [], []
    for im in coco["images"]:
        h, w = im["height"], im["width"]
        img = cv2.cvtColor(cv2.imread(str(data_dir / im["file_name"])), cv2.COLOR_BGR2RGB)
        images.append(cv2.resize(img, size[::-1], interpolation=cv2.INTER_LINEAR))
        if labelled:
            m = np.zeros((h, w), np.uint8)
            for a in sorted(anns.get(im["id"], []), key=lambda a: -a["area"]):  # area descending, stable
                seg = a["segmentation"]
                rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w)) if isinstance(seg, list) else seg
                m[mask_utils.decode(rle).astype(bool)] = index[a["category_id"]]
            masks.append(cv2.resize(m, size[::-1], interpolation=cv2.INTER_NEAREST))
    x = torch.from_numpy(((np.stack(images) / 255.0 - MEAN) / STD).astype(np.float32)).permute(0, 3, 1, 2)
    y = torch.from_numpy(np.stack(masks).astype(np.int64)) if labelled else None
    return coco, x, y, len(coco["categories"]) + 1


def rle(mask):
    pixels = np.concatenate([[0], mask.flatten(order="F").astype(np.uint8), [0]])
    runs = np.flatnonzero(pixels[1:] != pixels[:-1]) + 1
    runs[1::2] -= runs[::2]
    return " ".join(map(str, runs))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--budget-min", type=float, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("submissions/plain.csv"))
    # a row beside the yardstick, not the yardstick: the same recipe on a pretrained encoder
    p.add_argument("--encoder", default="resnet18", help="smp encoder name (default: the yardstick's resnet18)")
    p.add_argument("--encoder-file", type=Path, default=None, help="pretrained encoder state dict (default: none)")
    a = p.parse_args()
    start = time.time()
    torch.manual_seed(a.seed)
    np.random.seed(a.seed)
    train = json.loads((a.data_dir / "train_all.json").read_text())
    (h, w), _ = Counter((i["height"], i["width"]) for i in train["images"]).most_common(1)[0]
    size = (max(32, round(h / 2 / 32) * 32), max(32, round(w / 2 / 32) * 32))
    _, x, y, k = load(a.data_dir, "train_all.json", size, True)
    model = smp.Unet(a.encoder, encoder_weights=None, classes=k)
    if a.encoder_file is not None:  # timm key names under the encoder's model (tu- encoders) or its own
        from pipeline.models.weights import read_state_dict  # the pipeline's one reader: files load as data

        state = read_state_dict(a.encoder_file)
        target = model.encoder.model if hasattr(model.encoder, "model") else model.encoder
        missing, _ = target.load_state_dict(state, strict=False)
        print(f"plain recipe: {a.encoder} from {a.encoder_file}, {len(missing)} encoder tensors missing")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    budget = a.budget_min * 60 * 0.93 - (time.time() - start)  # the rest: loading the test set, predicting
    t0, steps = time.time(), 0
    while (elapsed := time.time() - t0) < budget:
        for g in opt.param_groups:
            g["lr"] = 1e-3 * 0.5 * (1 + math.cos(math.pi * elapsed / budget))
        idx = torch.randint(len(x), (8,))
        xb, yb = x[idx], y[idx]
        flip = torch.rand(8) < 0.5
        xb[flip], yb[flip] = xb[flip].flip(-1), yb[flip].flip(-1)
        model.train()
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
    test, xt, _, _ = load(a.data_dir, "test.json", size, False)
    model.eval()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), open(a.out, "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["image_id", "class_id", "EncodedPixels"])
        for im, xi in zip(test["images"], xt, strict=True):
            prob = F.interpolate(model(xi[None]).softmax(1), (im["height"], im["width"]), mode="bilinear")
            label = prob[0].argmax(0).numpy()
            for k_, c in enumerate(test["categories"]):
                out.writerow([im["file_name"], c["id"], rle(label == k_ + 1)])
    print(f"plain recipe: {steps} steps of batch 8 at {size[0]}x{size[1]}, {time.time() - start:.0f} s -> {a.out}")


if __name__ == "__main__":
    main()
