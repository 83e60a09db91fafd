"""Ablation of training techniques against one fixed base recipe, on out-of-fold mIoU.

Each variant trains fold 0 with the same recipe, seed and number of epochs plus one technique,
then its out-of-fold maps are scored per image; the table gives every variant's OOF mIoU with a
90% bootstrap interval and its paired gain over the base (same resampled images).  A technique
that does not help shows up as such.

Rows that need no training of their own come from the base run: ``--average`` (its 3 best
epochs averaged, BatchNorm statistics recomputed), ``--postprocess min_area crf`` (tuned on its
OOF maps by the ensemble stage under the selection rule; the row shows the recorded OOF gain)
and ``--pseudo`` (its test predictions as pseudo-labels, a second run trained with them; judged
on the test labels, ``test_gt.json``, since their OOF is inflated).

    python benchmarks/ablate.py --data-dir ../shared/datasets/ccp --epochs 20 --out work/ablate

Other variants are named on the command line (``--variant "label: key=value key=value"``), and
``--minutes M`` gives every run the same wall time instead of the same epochs (the schedule is
sized to it), which is how a faster recipe or a lighter model has to be judged.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

from pipeline.core.tables import format_table
from pipeline.data import load_coco, load_folds
from pipeline.evaluation.metrics import confusion_matrix
from pipeline.evaluation.selection import bootstrap_miou, format_interval, paired_gain
from pipeline.inference.postprocessing import POSTPROCESSORS
from pipeline.inference.store import ProbReader

RECIPE = Path(__file__).resolve().parents[1] / "pipeline" / "configs" / "recipes" / "budget.yaml"
# the base: the budget recipe without the repeat-factor sampling it now enables (a row of its own),
# keeping its 3 best epochs for the averaging row
BASE_ARGS = ["rfs_threshold=null", "keep_top_k=3"]
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
    for i in ids:  # scored at each image's own size, as the submission is
        truth = coco.mask(i)
        labels = reader.load(i, truth.shape).argmax(0).numpy()
        out.append(confusion_matrix(labels, truth, coco.num_classes))
    return np.stack(out)


def py(*args: str) -> None:
    subprocess.run([sys.executable, "-m", *args], check=True)


def train(a, folds: Path, exp: str, extra: list[str]) -> Path:
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
        *a.base_args,
        *extra,
    ]
    if a.minutes:  # equal wall time: the schedule is sized to it after the second epoch
        args += [f"time_budget={a.minutes * 60:.0f}"]
    py("pipeline.train", "--only-config", "--config", str(RECIPE), *args)
    return a.out / "runs" / exp / "fold0"


def predict(a, run_dir: Path, split: str, checkpoint: str, out: Path) -> Path:
    if not (out / "meta.json").is_file():
        py(
            "pipeline.predict",
            f"run_dir={run_dir}",
            f"data_dir={a.data_dir}",
            f"split={split}",
            "tta=none",
            f"checkpoint={checkpoint}",
            f"out_dir={out}",
            "progress=false",
        )
    return out


def epochs_of(run_dir: Path | None) -> str:
    """Epochs the run trained (its metrics file has a row per epoch)."""
    metrics = run_dir / "metrics.csv" if run_dir else None
    if metrics is None or not metrics.is_file():
        return ""
    return str(max(0, len(metrics.read_text().strip().splitlines()) - 1))


def experiment(name: str) -> str:
    return "ablate-" + "".join(ch if ch.isalnum() else "-" for ch in name.lower()).strip("-")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--folds-file", type=Path, default=None, help="default: make one with group_by=similar")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--size", default="[192,128]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", nargs="*", default=list(VARIANTS))
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL: ARGS",
        help='another variant, e.g. "lighter decoder: model_options={decoder_channels:[128,64,32,16,8]}"',
    )
    p.add_argument("--base-args", nargs="*", default=BASE_ARGS, help=f"the base's changes to the recipe ({BASE_ARGS})")
    p.add_argument("--minutes", type=float, default=None, help="every run gets this wall time (epochs: the cap)")
    p.add_argument("--average", action="store_true", help="a row for the base run's 3 best epochs averaged")
    p.add_argument("--postprocess", nargs="*", default=[], choices=[n for n in POSTPROCESSORS.names() if n != "none"])
    p.add_argument("--pseudo", action="store_true", help="pseudo-labels of the base run, judged on test_gt.json")
    p.add_argument("--out", type=Path, default=Path("work/ablate"))
    a = p.parse_args()
    for spec in a.variant:
        label, sep, rest = spec.partition(":")
        if not sep or not label.strip():
            p.error(f"--variant {spec!r}: expected 'label: key=value ...'")
        VARIANTS[label.strip()] = rest.split()
        a.variants.append(label.strip())
    unknown = [v for v in a.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    a.out.mkdir(parents=True, exist_ok=True)
    folds = a.folds_file or a.out / "folds" / "folds.csv"
    if not folds.is_file():
        py(
            "pipeline.folds",
            f"data_dir={a.data_dir}",
            f"out_dir={folds.parent}",
            "group_by=similar",
            "pixel_stats=false",
        )
    coco = load_coco(a.data_dir)
    table = load_folds(folds, coco)
    ids = sorted(int(i) for i in table.loc[table["fold"] == 0, "image_id"])
    names = list(dict.fromkeys(["base", *a.variants] if (a.average or a.postprocess or a.pseudo) else a.variants))
    results, runs = {}, {}
    for name in names:
        run_dir = train(a, folds, experiment(name), VARIANTS[name])
        runs[name] = run_dir
        if any(x.startswith("swa_epochs") for x in VARIANTS[name]):
            store = predict(a, run_dir, "val", "swa", a.out / "stores" / f"{experiment(name)}-swa")
        else:
            store = run_dir / "oof"
        results[name] = per_image(store, coco, ids)
    if a.average:
        base = runs["base"]
        if not (base / "averaged.pt").is_file():
            py("pipeline.average", f"run_dir={base}", "k=3")
        store = predict(a, base, "val", "averaged", a.out / "stores" / "base-averaged")
        results["top-3 checkpoint average (base run)"] = per_image(store, coco, ids)
    base = results.get("base")
    rows = []
    for name, cms in results.items():
        gain = "" if base is None or name == "base" else format_interval(paired_gain(base, cms, seed=a.seed))
        epochs = epochs_of(runs.get(name, runs.get("base")))
        rows.append([name, format_interval(bootstrap_miou(cms, seed=a.seed)), gain, epochs])
    for method in a.postprocess:
        name = f"pp-{method}"
        py(
            "pipeline.ensemble",
            f"runs={runs['base']}",
            f"data_dir={a.data_dir}",
            f"name={name}",
            f"out_dir={a.out / 'ensembles'}",
            f"postprocess={method}",
            "tune=false",
            f"seed={a.seed}",
            "progress=false",
        )
        record = yaml.safe_load((a.out / "ensembles" / name / "postprocess.yaml").read_text())
        g = record["oof_gain"]
        verdict = "kept" if record["accepted"] else "refused"
        rows.append(
            [
                f"{method} post-processing (tuned on base OOF)",
                f"{record['oof_miou_with']:.4f} (point)",
                f"{g['gain']:+.4f} [{g['low']:+.4f}, {g['high']:+.4f}] {verdict}",
                epochs_of(runs["base"]),
            ]
        )
    text = format_table(["variant", "OOF mIoU [90% interval]", "gain over base [90% interval]", "epochs"], rows)
    length = f"{a.minutes:g} minutes each (at most {a.epochs} epochs)" if a.minutes else f"{a.epochs} epochs"
    text = f"{a.data_dir}, fold 0 ({len(ids)} images), {length}, seed {a.seed}\n{text}"
    if a.pseudo:
        text += "\n\n" + pseudo_rows(a, folds, runs["base"])
    print(text)
    (a.out / "ablation.txt").write_text(text + "\n")
    return 0


def pseudo_rows(a, folds: Path, base: Path) -> str:
    """Base run and a run trained with the base run's confident test pixels, on the test labels."""
    gt = load_coco(a.data_dir, "test_gt.json")
    test_ids = sorted(gt.image_ids)
    base_test = predict(a, base, "test", "best", base / "test_none")
    py(
        "pipeline.pseudo",
        "name=ablate",
        f"runs=[{base}]",
        "tta=none",
        f"data_dir={a.data_dir}",
        "threshold=0.9",
        f"out_dir={a.out / 'pseudo'}",
        "progress=false",
    )
    run_dir = train(a, folds, "ablate-pseudo-labels", [f"pseudo_dir={a.out / 'pseudo' / 'ablate'}"])
    pseudo_test = predict(a, run_dir, "test", "best", run_dir / "test_none")
    base_cms, pseudo_cms = per_image(base_test, gt, test_ids), per_image(pseudo_test, gt, test_ids)
    rows = [
        ["base", format_interval(bootstrap_miou(base_cms, seed=a.seed)), ""],
        [
            "pseudo-labels (base test maps, t=0.9)",
            format_interval(bootstrap_miou(pseudo_cms, seed=a.seed)),
            format_interval(paired_gain(base_cms, pseudo_cms, seed=a.seed)),
        ],
    ]
    head = f"pseudo-labels judged on {len(test_ids)} test images (test_gt.json)"
    return head + "\n" + format_table(["variant", "test mIoU [90% interval]", "gain over base [90% interval]"], rows)


if __name__ == "__main__":
    raise SystemExit(main())
