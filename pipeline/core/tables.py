"""Text tables for the terminal and Markdown reports.

:func:`format_table` lays out a fixed-width table; given a ``width`` it wraps its text columns so that
every line fits (a key column at most ``key_width`` wide, the widest text column narrowed first).
:func:`shorten_paths` shows the absolute paths in a text relative to where a reader finds them (the
package, site-packages, the working directory, the home folder); records keep the full paths."""

from __future__ import annotations

import logging
import os
import re
import site
import sysconfig
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TEXT_WIDTH = 100  # columns of the tables and text a person reads (plan.txt, summary.txt)
KEY_WIDTH = 36  # the most a wrapped table's first (key) column takes of that width
MIN_TEXT_COLUMN = 12  # a wrapped text column is never narrower than this


def format_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[Any]],
    width: int | None = None,
    align: str | None = None,
    key_width: int = KEY_WIDTH,
) -> str:
    """Plain fixed-width text table. ``align``: one letter per column, ``l`` or ``r`` (default: the
    first column left, the others right). ``width``: wrap the left-aligned columns so that every line
    fits in ``width`` characters (the first column at most ``key_width``, the widest narrowed first;
    a continuation line leaves the other columns blank); None: each column as wide as its widest cell."""
    n = len(headers)
    align = align or "l" + "r" * (n - 1)
    if len(align) != n or set(align) - {"l", "r"}:
        raise ValueError(f"align needs one of l/r per column ({n}), got {align!r}")
    cells = [[str(h) for h in headers]] + [[str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(n)]
    if width is not None:
        widths = _fit(widths, align, width, key_width)
    lines = []
    for k, r in enumerate(cells):
        wrapped = [wrap_text(v, w) if a == "l" else [v] for v, w, a in zip(r, widths, align, strict=False)]
        for j in range(max(len(c) for c in wrapped)):
            parts = [c[j] if j < len(c) else "" for c in wrapped]
            lines.append(
                "  ".join(v.ljust(w) if a == "l" else v.rjust(w) for v, w, a in zip(parts, widths, align, strict=False))
            )
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def _fit(widths: list[int], align: str, width: int, key_width: int) -> list[int]:
    """Column widths that fit ``width``: as they are when they fit; else the left-aligned (text) columns
    narrowed, the first to ``key_width`` (or what the others leave it), then the widest first, none
    below ``MIN_TEXT_COLUMN``."""
    out = list(widths)
    gaps = 2 * (len(out) - 1)
    if sum(out) + gaps <= width:
        return out
    text = [i for i, a in enumerate(align) if a == "l"]
    if 0 in text:
        room = width - gaps - sum(out[1:])
        out[0] = min(out[0], max(key_width, MIN_TEXT_COLUMN, room))
    while sum(out) + gaps > width:
        i = max(text, key=lambda c: out[c], default=None)
        if i is None or out[i] <= MIN_TEXT_COLUMN:
            break  # the numeric columns alone are wider: the table is as narrow as it gets
        out[i] -= 1
    return out


def wrap_text(text: str, width: int, indent: str = "") -> list[str]:
    """``text`` in lines of at most ``width`` characters, broken at spaces; a word longer than a line
    (a path, a long name) is broken after a ``/`` or ``-`` (or, failing that, anywhere). Continuation lines start with
    ``indent``."""
    lines: list[str] = []
    for para in text.split("\n"):
        line = ""
        for word in para.split(" "):
            for k, piece in enumerate(_pieces(word, max(1, width - len(indent)))):
                sep = "" if k or not line else " "
                if line and len(line) + len(sep) + len(piece) > width:
                    lines.append(line)
                    line = indent + piece
                else:
                    line += sep + piece
        lines.append(line)
    return lines


def _pieces(word: str, width: int) -> list[str]:
    """``word`` itself, or (longer than ``width``) its parts after each ``/`` or ``-``, each at most
    ``width``."""
    if len(word) <= width:
        return [word]
    out: list[str] = []
    for part in re.findall(r"[^/-]*[/-]|[^/-]+$", word):
        out += [part[i : i + width] for i in range(0, len(part), width)]
    return out


def path_prefixes() -> list[tuple[str, str]]:
    """(absolute folder, how a reader names it), the longest first: the pipeline package (as
    ``pipeline/``), site-packages, the working directory (``./`` dropped) and the home folder (``~/``)."""
    package = Path(__file__).resolve().parents[1]
    pairs = [(str(package), "pipeline")]
    for sp in {*site.getsitepackages(), site.getusersitepackages(), sysconfig.get_paths()["purelib"]}:
        pairs.append((str(Path(sp).resolve()), "site-packages"))
        pairs.append((str(Path(sp).absolute()), "site-packages"))
    pairs += [(os.getcwd(), ""), (str(Path.cwd().resolve()), ""), (str(Path.home()), "~")]
    unique = {p: short for p, short in pairs if p not in ("", "/")}
    return sorted(unique.items(), key=lambda kv: -len(kv[0]))


def shorten_paths(text: str) -> str:
    """``text`` with each absolute path under one of :func:`path_prefixes` written relative to it, as a
    person reads it (``pipeline/configs/devices/h100.yaml``, ``site-packages/<package>/...``)."""
    for prefix, short in path_prefixes():
        pattern = re.compile(r"(?<![\w./~-])" + re.escape(prefix) + r"(/|(?=[^\w.-]|$))")
        text = pattern.sub(lambda m, s=short: _relative(s, m.group(1) == "/"), text)
    return text


def _relative(short: str, below: bool) -> str:
    """How a prefix is written: ``short/`` before the rest of a path, the folder itself as ``short``
    (the working directory as ``.``)."""
    if below:
        return short + "/" if short else ""
    return short or "."


def readable_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A table a person reads in a terminal or a text file: its paths shortened (:func:`shorten_paths`),
    its text columns wrapped to ``TEXT_WIDTH``."""
    return format_table(headers, [[shorten_paths(str(v)) for v in r] for r in rows], TEXT_WIDTH, align)


def readable_lines(lines: Sequence[str], first: str = "", indent: str = "") -> str:
    """``lines`` with their paths shortened, each wrapped to ``TEXT_WIDTH`` (prefixed by ``first``, its
    continuation lines by ``indent``)."""
    out: list[str] = []
    for line in lines:
        out += wrap_text(first + shorten_paths(line), TEXT_WIDTH, indent)
    return "\n".join(out)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(str(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(v).replace("|", "\\|") for v in r) + " |" for r in rows]
    return "\n".join(out)
