"""Each benchmark's figures as JSON, and the one summary table of ``make bench``.

A benchmark calls :func:`save` once with its goals (a measured value, the comparison and
the bound) and any figures worth keeping; the file goes to ``$BENCH_DIR`` (default
``reports/bench/``) as ``<benchmark>.json``, written atomically.  ``python
benchmarks/results.py`` reads every file there and prints one table of every goal.

A goal whose bound only applies on some device (``applies_on="cuda"``) is reported with
its value and marked ``report`` elsewhere, never ``met`` or ``NOT met``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipeline.core.io import atomic_write_text  # noqa: E402

COMPARISONS = (">=", "<=", "report")  # "report": a figure shown without a bound


@dataclass
class Goal:
    """One measured figure against its bound, e.g. ``Goal("d4 time / none", 7.9, "<=", 8.5)``."""

    measure: str
    value: float
    op: str
    bound: float
    unit: str = "x"
    applies_on: str | None = None  # "cuda": the bound is judged only on a GPU

    def __post_init__(self) -> None:
        if self.op not in COMPARISONS:
            raise ValueError(f"goal {self.measure!r}: comparison {self.op!r} is not one of {COMPARISONS}")

    def status(self, device: str) -> str:
        if self.op == "report":
            return "report"
        if self.applies_on and not device.startswith(self.applies_on):
            return "report"
        ok = self.value >= self.bound if self.op == ">=" else self.value <= self.bound
        return "met" if ok else "NOT met"


def results_dir() -> Path:
    return Path(os.environ.get("BENCH_DIR") or ROOT / "reports" / "bench")


def save(benchmark: str, goals: list[Goal], *, device: str = "cpu", settings: dict | None = None, **figures) -> Path:
    """Write ``<results_dir>/<benchmark>.json`` and print its goal lines."""
    record = {
        "benchmark": benchmark,
        "when": dt.datetime.now().isoformat(timespec="seconds"),
        "host": platform.node(),
        "device": device,
        "settings": settings or {},
        "goals": [dict(asdict(g), status=g.status(device)) for g in goals],
        "figures": figures,
    }
    path = results_dir() / f"{benchmark}.json"
    atomic_write_text(path, json.dumps(record, indent=2, default=float) + "\n")
    for g in goals:
        bound = "" if g.op == "report" else f" {g.op} {g.bound:g}{g.unit}"
        print(f"goal {g.measure}{bound}: {g.status(device)} ({g.value:.3g}{g.unit})")
    print(f"figures -> {path}")
    return path


def load(directory: Path) -> list[dict]:
    records = []
    for path in sorted(directory.glob("*.json")):
        try:
            rec = json.loads(path.read_text())
            rec["goals"]  # noqa: B018  (a file without goals is not a benchmark record)
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise SystemExit(f"{path}: not a benchmark record ({exc})") from exc
        records.append(rec)
    return records


def summary_table(records: list[dict]) -> str:
    rows = [("benchmark", "measure", "value", "goal", "status", "device", "when")]
    for rec in records:
        for g in rec["goals"]:
            rows.append(
                (
                    rec["benchmark"],
                    g["measure"],
                    f"{g['value']:.3g}{g['unit']}",
                    "-"
                    if g["op"] == "report"
                    else f"{g['op']} {g['bound']:g}{g['unit']}"
                    + (f" ({g['applies_on']})" if g.get("applies_on") else ""),
                    g["status"],
                    rec["device"],
                    rec["when"],
                )
            )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one table of every benchmark's goals")
    parser.add_argument(
        "--dir", default=None, help="folder of benchmark JSON files (default: $BENCH_DIR or reports/bench)"
    )
    args = parser.parse_args(argv)
    directory = Path(args.dir) if args.dir else results_dir()
    records = load(directory)
    if not records:
        print(f"no benchmark results in {directory} (run `make bench`)")
        return 1
    print(summary_table(records))
    missed = sum(g["status"] == "NOT met" for r in records for g in r["goals"])
    print(f"{sum(len(r['goals']) for r in records)} goals, {missed} not met")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
