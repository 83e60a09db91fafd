"""The two submission CSV formats (README, Contracts: submissions) and their validator.

``validate_submission`` checks a file against ``test.json``: header, every test image once,
well-formed rows (``rle``: runs by :func:`pipeline.submission.rle.rle_problem`, no pixel claimed
by two classes; ``dense``: 256x256 class indices), and lists every problem with its line.
``resolve_format`` turns the writers' ``format=auto`` into one of the formats from the data
folder's ``sample_submission.csv``.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.config import ConfigError
from pipeline.core.errors import PipelineError
from pipeline.data import CocoData
from pipeline.data.resize import resize_nearest  # noqa: F401 - the stage score.py still imports it from here
from pipeline.submission.rle import ORDERS, rle_problem

log = logging.getLogger(__name__)


FORMATS = ("rle", "dense")


HEADERS: dict[str, list[str]] = {
    "rle": ["image_id", "class_id", "EncodedPixels"],
    "dense": ["image_id", "PredictionString"],
}


CSV_FIELD_LIMIT = 2**31 - 1  # dense rows and large RLE strings exceed the csv module's default

SAMPLE_SUBMISSION = "sample_submission.csv"  # in the data folder: its header decides format=auto
DEFAULT_FORMAT = "rle"  # format=auto without a sample submission: the Kaggle convention


def check_format_options(fmt: str, order: str, dense_size: Sequence[int], allow_auto: bool = False) -> None:
    """Raise ConfigError for an unknown format or order, or a bad dense size."""
    known = (("auto",) if allow_auto else ()) + FORMATS
    if fmt not in known:
        raise ConfigError(f"format: unknown {fmt!r}; known: {', '.join(known)}")
    if order not in ORDERS:
        raise ConfigError(f"order: unknown {order!r}; known: {', '.join(ORDERS)} (F = column-major, the default)")
    if len(dense_size) != 2 or min(int(s) for s in dense_size) < 1:
        raise ConfigError(f"dense_size must be [height, width] with positive values, got {list(dense_size)}")


def format_problems(path: str | Path, problems: Sequence[str], max_report: int = 20) -> str:
    """One message listing the first ``max_report`` problems of a submission."""
    shown = list(problems[:max_report])
    more = len(problems) - len(shown)
    text = f"{path}: {len(problems)} problem(s) in the submission:\n  " + "\n  ".join(shown)
    return text + (f"\n  ... and {more} more" if more > 0 else "")


def detect_format(header: Sequence[str]) -> str | None:
    """The format whose header is exactly ``header``, else None."""
    for name, expected in HEADERS.items():
        if list(header) == expected:
            return name
    return None


def known_headers() -> str:
    """``image_id,class_id,EncodedPixels (rle) or image_id,PredictionString (dense)``."""
    return " or ".join(f"{','.join(h)} ({name})" for name, h in HEADERS.items())


def resolve_format(fmt: str, data_dir: str | Path) -> tuple[str, str]:
    """The format a writer's ``fmt`` stands for in ``data_dir``, and why (for the log and the manifest).

    ``rle`` and ``dense`` stand for themselves.  ``auto`` is the format whose header is the one of
    ``<data_dir>/sample_submission.csv`` (``image_id,PredictionString``: dense, the contest's
    leaderboard; ``image_id,class_id,EncodedPixels``: rle), or ``rle`` when there is no such file.
    A sample file with another header is a PipelineError naming the file, its header and the known
    ones.  Only the header is read (a BOM and spaces around the names are tolerated).
    """
    if fmt in FORMATS:
        return fmt, "given"
    if fmt != "auto":
        raise ConfigError(f"format: unknown {fmt!r}; known: auto, {', '.join(FORMATS)}")
    path = Path(data_dir) / SAMPLE_SUBMISSION
    if not path.is_file():
        return DEFAULT_FORMAT, f"no {path}, so the Kaggle convention"
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            header = [name.strip() for name in next(csv.reader(fh), [])]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise PipelineError(f"{path}: unreadable header ({exc}); known headers: {known_headers()}") from exc
    found = detect_format(header)
    if found is None:
        raise PipelineError(
            f"{path}: header {','.join(header)!r} is not a submission header; known headers: {known_headers()} "
            "(or pass format=rle or format=dense)"
        )
    return found, f"header of {path}"


def open_csv(path: str | Path):
    """A text handle for ``csv.reader`` (UTF-8, universal newlines off as the csv module wants)."""
    csv.field_size_limit(CSV_FIELD_LIMIT)
    return open(path, newline="", encoding="utf-8")


def read_format(path: str | Path, fmt: str = "auto") -> str:
    """The submission's format from its header; PipelineError when it is not one of FORMATS."""
    with open_csv(path) as fh:
        header = next(csv.reader(fh), None)
    found = detect_format(header or [])
    if found is None or (fmt != "auto" and found != fmt):
        want = HEADERS[fmt] if fmt != "auto" else " or ".join(",".join(h) for h in HEADERS.values())
        raise PipelineError(f"{path}: header {','.join(header or [])!r} is not {want!r}")
    return found


def iter_rows(path: str | Path) -> Iterator[tuple[int, list[str]]]:
    """``(line number, row)`` of every data row (the header, line 1, is skipped)."""
    with open_csv(path) as fh:
        reader = csv.reader(fh)
        next(reader, None)
        for row in reader:
            yield reader.line_num, row


def _where(line: int | None, file_name: str | None, class_id: Any = None) -> str:
    parts = []
    if line is not None:
        parts.append(f"line {line}")
    if file_name is not None:
        parts.append(f"image {file_name!r}")
    if class_id is not None:
        parts.append(f"class_id {class_id}")
    return ", ".join(parts)


def _parse_int(text: str) -> int | None:
    text = text.strip()
    if text.isascii() and text.lstrip("+-").isdigit():
        return int(text)
    return None


class _Checker:
    """Row-by-row checks common to both formats: image names, duplicates, missing images."""

    n_fields = 0

    def __init__(self, coco: CocoData):
        self.coco = coco
        self.images = {str(im["file_name"]): im for im in coco.images}
        self.problems: list[str] = []
        self.seen_images: set[str] = set()
        self.extra_reported: set[str] = set()
        self.rows = 0

    def add(self, line: int | None, file_name: str | None, message: str, class_id: Any = None) -> None:
        self.problems.append(f"{_where(line, file_name, class_id)}: {message}")

    def check_fields(self, line: int, row: list[str]) -> bool:
        if len(row) != self.n_fields:
            name = row[0] if row else None
            self.add(
                line, name, f"expected {self.n_fields} fields, got {len(row)}" + (" (empty line)" if not row else "")
            )
            return False
        return True

    def known_image(self, line: int, file_name: str) -> bool:
        if file_name in self.images:
            self.seen_images.add(file_name)
            return True
        if file_name not in self.extra_reported:
            self.extra_reported.add(file_name)
            self.add(line, file_name, f"extra image: not an image of {self.coco.path.name}")
        return False

    def missing_images(self) -> None:
        for file_name in self.images:
            if file_name not in self.seen_images:
                self.add(None, file_name, "missing image: no rows for this test image")


class _RleChecker(_Checker):
    n_fields = 3

    def __init__(self, coco: CocoData):
        super().__init__(coco)
        self.cat_ids = [int(c["id"]) for c in coco.categories]
        self.known_cats = set(self.cat_ids)
        self.first_line: dict[tuple[str, int], int] = {}
        self.done: dict[str, int] = {}  # rows of an image seen so far
        self.pending: dict[str, list[tuple[int, int, np.ndarray, np.ndarray]]] = {}

    def row(self, line: int, row: list[str]) -> None:
        self.rows += 1
        if not self.check_fields(line, row):
            return
        file_name, class_text, rle = row
        known = self.known_image(line, file_name)
        class_id = _parse_int(class_text)
        if class_id is None:
            self.add(line, file_name, f"class_id {class_text!r} is not an integer")
            return
        if class_id not in self.known_cats:
            self.add(line, file_name, f"unknown class id (known COCO category ids: {self.cat_ids})", class_id)
            return
        key = (file_name, class_id)
        if key in self.first_line:
            self.add(line, file_name, f"duplicate row (first at line {self.first_line[key]})", class_id)
            return
        self.first_line[key] = line
        if not known:
            return
        im = self.images[file_name]
        n_pixels = int(im["height"]) * int(im["width"])
        problem = rle_problem(rle, n_pixels)
        if problem is not None:
            self.add(line, file_name, f"EncodedPixels: {problem}", class_id)
        else:
            values = np.array(rle.split(), dtype=np.int64)
            if values.size:
                self.pending.setdefault(file_name, []).append((class_id, line, values[0::2] - 1, values[1::2]))
        self.done[file_name] = self.done.get(file_name, 0) + 1
        if self.done[file_name] == len(self.cat_ids):
            self.check_overlap(file_name)

    def check_overlap(self, file_name: str) -> None:
        """No pixel may be claimed by two classes of one image (first clash reported)."""
        runs = self.pending.pop(file_name, [])
        if len(runs) < 2:
            return
        starts = np.concatenate([r[2] for r in runs])
        lengths = np.concatenate([r[3] for r in runs])
        owner = np.concatenate([np.full(r[2].size, i) for i, r in enumerate(runs)])
        by_start = np.argsort(starts, kind="stable")
        starts, lengths, owner = starts[by_start], lengths[by_start], owner[by_start]
        ends = np.maximum.accumulate(starts + lengths)
        clash = np.flatnonzero(starts[1:] < ends[:-1])
        if clash.size:
            i = int(clash[0]) + 1
            j = int(np.flatnonzero(starts[:i] + lengths[:i] > starts[i])[-1])
            a, b = runs[owner[j]], runs[owner[i]]
            self.add(
                b[1],
                file_name,
                f"pixel {starts[i] + 1} is claimed by class ids {a[0]} (line {a[1]}) and {b[0]} (line {b[1]})",
            )

    def finish(self) -> list[str]:
        for file_name in list(self.pending):
            self.check_overlap(file_name)
        for file_name, count in self.done.items():
            if count < len(self.cat_ids):
                have = {c for (f, c) in self.first_line if f == file_name}
                missing = [c for c in self.cat_ids if c not in have]
                self.add(None, file_name, f"missing rows for class ids {missing} (one row per category is required)")
        self.missing_images()
        return self.problems


class _DenseChecker(_Checker):
    n_fields = 2

    def __init__(self, coco: CocoData, dense_size: Sequence[int]):
        super().__init__(coco)
        self.size = (int(dense_size[0]), int(dense_size[1]))
        self.first_line: dict[str, int] = {}

    def row(self, line: int, row: list[str]) -> None:
        self.rows += 1
        if not self.check_fields(line, row):
            return
        file_name, text = row
        if not self.known_image(line, file_name):
            return
        if file_name in self.first_line:
            self.add(line, file_name, f"duplicate row (first at line {self.first_line[file_name]})")
            return
        self.first_line[file_name] = line
        tokens = text.split()
        h, w = self.size
        if len(tokens) != h * w:
            self.add(line, file_name, f"PredictionString has {len(tokens)} values, expected {h * w} ({h}x{w})")
            return
        try:
            values = np.array(tokens, dtype=np.int64)
        except (ValueError, OverflowError):
            bad = next(i for i, t in enumerate(tokens) if _parse_int(t) is None)
            self.add(line, file_name, f"PredictionString value {bad + 1} ({tokens[bad]!r}) is not an integer")
            return
        k = self.coco.num_classes
        bad = np.flatnonzero((values < 0) | (values >= k))
        if bad.size:
            i = int(bad[0])
            self.add(
                line,
                file_name,
                f"PredictionString value {i + 1} (row {i // w}, column {i % w}) is {values[i]}, "
                f"outside the class indices [0, {k}) ({bad.size} such values)",
            )

    def finish(self) -> list[str]:
        self.missing_images()
        return self.problems


def validate_submission(
    path: str | Path,
    coco: CocoData,
    format: str = "auto",
    order: str = "F",
    dense_size: Sequence[int] = (256, 256),
) -> list[str]:
    """Every problem of the submission at ``path`` for the test images of ``coco`` (empty: valid).

    ``order`` does not change what is checked (run lists are valid or not in either
    numbering); it is accepted so callers pass the submission's settings unchanged.
    """
    check_format_options(format, order, dense_size, allow_auto=True)
    path = Path(path)
    if not path.is_file():
        return [f"{path}: file not found"]
    checker: _Checker | None = None
    line = 1
    try:
        with open_csv(path) as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None:
                return [f"{path}: empty file (no header)"]
            found = detect_format(header)
            expected = format if format != "auto" else found
            if expected is None or found != expected:
                want = (
                    ",".join(HEADERS[format])
                    if format != "auto"
                    else " or ".join(",".join(h) for h in HEADERS.values())
                )
                return [f"line 1: header {','.join(header)!r} must be exactly {want!r}"]
            checker = _RleChecker(coco) if expected == "rle" else _DenseChecker(coco, dense_size)
            for row in reader:
                line = reader.line_num
                checker.row(line, row)
    except csv.Error as exc:
        return (checker.problems if checker else []) + [f"line {line + 1}: unreadable CSV ({exc})"]
    except UnicodeDecodeError as exc:
        return (checker.problems if checker else []) + [f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})"]
    problems = checker.finish()
    log.debug("%s: %d rows checked, %d problem(s)", path, checker.rows, len(problems))
    return problems
