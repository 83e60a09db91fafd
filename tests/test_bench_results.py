"""The benchmarks' shared JSON record and the summary table of `make bench`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import results  # noqa: E402


def test_goal_status_follows_the_bound_and_the_device():
    assert results.Goal("a", 2.0, ">=", 1.5).status("cpu") == "met"
    assert results.Goal("a", 1.0, ">=", 1.5).status("cpu") == "NOT met"
    assert results.Goal("b", 9.0, "<=", 8.5).status("cpu") == "NOT met"
    gpu_only = results.Goal("c", 0.9, ">=", 1.5, applies_on="cuda")
    assert gpu_only.status("cpu") == "report"
    assert gpu_only.status("cuda:0") == "NOT met"
    with pytest.raises(ValueError, match="comparison"):
        results.Goal("d", 1.0, ">", 1.0)


def test_save_then_summary_lists_every_goal(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BENCH_DIR", str(tmp_path))
    results.save("bench_x", [results.Goal("speed-up", 3.0, ">=", 2.0)], settings={"n": 1}, ms={"a": 1.0})
    results.save("bench_y", [results.Goal("seconds", 2.0, "<=", 1.0, unit=" s")])
    record = json.loads((tmp_path / "bench_x.json").read_text())
    assert record["goals"][0]["status"] == "met" and record["figures"] == {"ms": {"a": 1.0}}
    capsys.readouterr()
    assert results.main(["--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("bench_")]
    assert len(lines) == 2
    assert "met" in lines[0] and "NOT met" in lines[1]
    assert "2 goals, 1 not met" in out


def test_summary_names_a_file_that_is_not_a_record(tmp_path):
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(SystemExit, match="broken.json"):
        results.main(["--dir", str(tmp_path)])


def test_a_benchmark_writes_its_record(tmp_path):
    env = dict(os.environ, BENCH_DIR=str(tmp_path))
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_rle.py"), "--size", "32", "48", "--classes", "4"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    record = json.loads((tmp_path / "bench_rle.json").read_text())
    assert len(record["goals"]) == 4
    assert all(g["value"] > 0 for g in record["goals"])
    assert record["settings"]["size"] == [32, 48]
