"""`make all` against the plain recipe (benchmarks/plain_recipe.py) at the same budget and seed.

Runs both on DATA_DIR one after the other (never side by side: they share the CPU), scores both
submissions against the test labels with the pipeline's scorer and prints a table of test mIoU
with 90% bootstrap intervals over test images and the paired gain of make all.

    python benchmarks/compare_plain.py --data-dir ../shared/datasets/ccp --budget 20m --out work/compare
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from pipeline.core.tables import format_table
from pipeline.evaluation.selection import bootstrap_miou, format_interval, paired_gain
from pipeline.planning.budget import parse_budget


def timed(command: list[str], log: Path) -> float:
    started = time.monotonic()
    with open(log, "w") as fh:
        subprocess.run(command, check=True, stdout=fh, stderr=subprocess.STDOUT)
    return time.monotonic() - started


def score(sub: Path, data_dir: Path, gt: Path, out: Path) -> np.ndarray:
    args = [f"sub={sub}", f"gt={gt}", f"data_dir={data_dir}", f"out_json={out}"]
    subprocess.run([sys.executable, "-m", "pipeline.score", *args], check=True, capture_output=True)
    return np.load(out.with_suffix(".npz"))["per_image"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--budget", default="20m")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("work/compare"))
    p.add_argument("--skip-plain", action="store_true", help="reuse the plain submission of an earlier run")
    p.add_argument("--plain-args", nargs="*", default=[], help="extra plain_recipe.py options (a row, not the bar)")
    p.add_argument(
        "--baseline", type=Path, default=None, help="an earlier --out: also the paired gain over its make all"
    )
    p.add_argument("--args", nargs="*", default=[], help="extra key=value for make all (e.g. encoder_weights=null)")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    minutes = parse_budget(a.budget) / 60
    gt = a.data_dir / "test_gt.json"
    plain_sub = a.out / "plain.csv"
    times = {}
    if not a.skip_plain:
        plain = [
            sys.executable,
            str(Path(__file__).parent / "plain_recipe.py"),
            f"--data-dir={a.data_dir}",
            f"--budget-min={minutes}",
            f"--seed={a.seed}",
            f"--out={plain_sub}",
            *a.plain_args,
        ]
        times["plain recipe"] = timed(plain, a.out / "plain.log")
    auto = [
        sys.executable,
        "-m",
        "pipeline.autopilot",
        f"data_dir={a.data_dir}",
        f"budget={a.budget}",
        "name=compare",
        f"seed={a.seed}",
        f"work_dir={a.out / 'work'}",
        f"submissions_dir={a.out}",
        "progress=false",
        *a.args,
    ]
    times["make all"] = timed(auto, a.out / "autopilot.log")
    plain_cms = score(plain_sub, a.data_dir, gt, a.out / "plain_score.json")
    auto_cms = score(a.out / "compare.csv", a.data_dir, gt, a.out / "auto_score.json")
    rows = [
        [
            "plain recipe",
            format_interval(bootstrap_miou(plain_cms, seed=a.seed)),
            f"{times['plain recipe'] / 60:.1f}" if "plain recipe" in times else "earlier run",
        ],
        ["make all", format_interval(bootstrap_miou(auto_cms, seed=a.seed)), f"{times['make all'] / 60:.1f}"],
    ]
    gain = paired_gain(plain_cms, auto_cms, seed=a.seed)
    table = format_table(["method", "test mIoU [90% interval]", "minutes"], rows)
    text = (
        f"{table}\ngain of make all: {gain.point:+.4f} [{gain.low:+.4f}, {gain.high:+.4f}] (paired bootstrap over "
        f"{len(auto_cms)} test images), budget {a.budget}, seed {a.seed}"
    )
    if a.baseline is not None:
        base_cms = np.load(a.baseline / "auto_score.npz")["per_image"]
        versus = paired_gain(base_cms, auto_cms, seed=a.seed)
        text += (
            f"\ngain of make all over {a.baseline}'s make all: {versus.point:+.4f} "
            f"[{versus.low:+.4f}, {versus.high:+.4f}] (paired bootstrap)"
        )
    print(text)
    (a.out / "compare.txt").write_text(text + "\n")
    summary = a.out / "work" / "compare" / "summary.txt"
    if summary.is_file():
        print(summary.read_text())
    json.dump({"times_s": times, "gain": gain.as_dict()}, open(a.out / "compare.json", "w"), indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
