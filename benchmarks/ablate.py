"""Ablation of training techniques against one fixed base recipe, on out-of-fold mIoU.

Each variant trains fold 0 with the same recipe, seed and number of epochs plus one technique,
then its out-of-fold maps are scored per image; the table gives every variant's OOF mIoU with a
90% bootstrap interval and its paired gain over the base (same resampled images).  A technique
that does not help shows up as such.

    python benchmarks/ablate.py --data-dir ../shared/datasets/ccp --epochs 20 --out work/ablate
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np

from pipeline.core.tables import format_table
from pipeline.data import load_coco, load_folds
from pipeline.evaluation.metrics import confusion_matrix
from pipeline.evaluation.selection import bootstrap_miou, format_interval, paired_gain
from pipeline.inference.store import ProbReader
from pipeline.submission.formats import resize_nearest

RECIPE = Path(__file__).resolve().parents[1] / "pipeline" / "configs" / "recipes" / "budget.yaml"
VARIANTS = {
    "base": [],
    "copy-paste (3 rarest, p=0.5)": ["copy_paste=0.5"],
    "repeat-factor sampling (t=0.1)": ["rfs_threshold=0.1"],
    "EMA (0.99)": ["ema=true", "ema_decay=0.99"],
    "layer decay 0.8": ["layer_decay=0.8"],
    "SWA of the last 3 epochs": ["swa_epochs=3"],
}


def per_image(store: Path, coco, ids: list[int]) -> np.ndarray:
    reader = ProbReader(store)
    out = []
    for i in ids:
        labels = reader.load(i).argmax(0).numpy()
        out.append(confusion_matrix(labels, resize_nearest(coco.mask(i), labels.shape), coco.num_classes))
    return np.stack(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--folds-file", type=Path, default=None, help="default: make one with group_by=similar")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--size", default="[192,128]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", nargs="*", default=list(VARIANTS))
    p.add_argument("--out", type=Path, default=Path("work/ablate"))
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    folds = a.folds_file or a.out / "folds" / "folds.csv"
    if not folds.is_file():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pipeline.folds",
                f"data_dir={a.data_dir}",
                f"out_dir={folds.parent}",
                "group_by=similar",
                "pixel_stats=false",
            ],
            check=True,
        )
    coco = load_coco(a.data_dir)
    table = load_folds(folds, coco)
    ids = sorted(int(i) for i in table.loc[table["fold"] == 0, "image_id"])
    results = {}
    for name in a.variants:
        exp = "ablate-" + "".join(ch if ch.isalnum() else "-" for ch in name.lower()).strip("-")
        args = [
            f"data_dir={a.data_dir}",
            f"folds_file={folds}",
            "fold=0",
            "model=unet",
            "encoder=resnet18",
            "encoder_weights=null",
            f"img_size={a.size}",
            f"epochs={a.epochs}",
            f"seed={a.seed}",
            f"runs_dir={a.out / 'runs'}",
            f"experiment={exp}",
            "progress=false",
            *VARIANTS[name],
        ]
        subprocess.run([sys.executable, "-m", "pipeline.train", "--config", str(RECIPE), *args], check=True)
        run_dir = a.out / "runs" / exp / "fold0"
        checkpoint = "swa" if any(x.startswith("swa_epochs") for x in VARIANTS[name]) else "best"
        if checkpoint != "best":
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pipeline.predict",
                    f"run_dir={run_dir}",
                    f"data_dir={a.data_dir}",
                    "split=val",
                    "tta=none",
                    f"checkpoint={checkpoint}",
                    "progress=false",
                ],
                check=True,
            )
        store = run_dir / ("oof" if checkpoint == "best" else "oof_none")
        results[name] = per_image(store, coco, ids)
    base = results.get("base")
    rows = []
    for name, cms in results.items():
        gain = "" if base is None or name == "base" else format_interval(paired_gain(base, cms, seed=a.seed))
        rows.append([name, format_interval(bootstrap_miou(cms, seed=a.seed)), gain])
    text = format_table(["variant", "OOF mIoU [90% interval]", "gain over base [90% interval]"], rows)
    print(f"{a.data_dir}, fold 0 ({len(ids)} images), {a.epochs} epochs, seed {a.seed}\n{text}")
    (a.out / "ablation.txt").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
