"""Run-length encoding of masks and label maps in the Kaggle convention (README, Contracts).

``EncodedPixels`` is a string of space-separated ``start length`` pairs at the image's own
height x width.  Pixels are numbered from 1, column-major by default (``order="F"``: top to
bottom, then left to right) or row-major with ``order="C"``.  A class that is absent is the
empty string.  Runs are sorted, do not overlap and lie inside the image.

Everything here is pure, vectorised numpy: a label map is encoded for all classes in one
pass (run boundaries are found once, then the runs are grouped by value), strings are
written and parsed without a Python loop over runs, and decoding uses ``np.repeat``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np
from numpy.typing import DTypeLike

ORDERS = ("F", "C")

_POW10 = 10 ** np.arange(19, dtype=np.int64)
_INT64_MAX = np.iinfo(np.int64).max
_INT_TOKEN = re.compile(r"[+-]?[0-9]+")
_DIGIT_OR_SPACE = np.zeros(256, dtype=bool)
_DIGIT_OR_SPACE[list(b"0123456789 ")] = True


# ----------------------------------------------------------------------------- helpers
def _check_order(order: str) -> str:
    if order not in ORDERS:
        raise ValueError(f"order must be 'F' (column-major, the default) or 'C' (row-major), got {order!r}")
    return order


def _check_shape(shape: Sequence[int]) -> tuple[int, int]:
    try:
        h, w = (int(s) for s in shape)
    except (TypeError, ValueError):
        raise ValueError(f"shape must be (height, width), got {shape!r}") from None
    if h < 0 or w < 0:
        raise ValueError(f"shape must be non-negative, got {shape!r}")
    return h, w


def _as_2d(array, what: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 2:
        raise ValueError(f"{what} must be a 2-D array (height x width), got shape {array.shape}")
    return array


def _runs(values: np.ndarray, order: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Maximal runs of equal values of a 2-D array flattened in ``order``.

    Returns 0-based run starts, run lengths and the value of each run (int64, int64, dtype
    of ``values``), in flattened order.  Boundaries are found in one pass over the array.
    """
    h, w = values.shape
    n = h * w
    if n == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, values.reshape(-1)[:0]
    flat = None
    if order == "C" or values.flags.f_contiguous:
        flat = values.ravel(order=order)  # a view whenever the memory layout already matches
        changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    else:
        # Column-major runs of a row-major array without a transposed copy: the flattened
        # neighbours are vertical neighbours, plus the wrap from a column's last row to the
        # next column's first row.  Both are compared in memory order, then sorted.
        vertical = np.flatnonzero(values[1:] != values[:-1])
        if vertical.size > n // 8:  # busy map: a transposed copy is cheaper than the sort
            flat = values.ravel(order="F")
            changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
        else:
            row, col = np.divmod(vertical, w)
            wrap = np.flatnonzero(values[0, 1:] != values[-1, :-1]) + 1  # columns whose first pixel starts a run
            # order by column; a column's wrap boundary comes first, then its rows in order
            key = np.concatenate([wrap, col]).astype(np.uint16 if w < 2**16 else np.int64)
            by_column = np.argsort(key, kind="stable")
            changes = np.concatenate([wrap * h, col * h + row + 1])[by_column]
    starts = np.empty(changes.size + 1, dtype=np.int64)
    starts[0] = 0
    starts[1:] = changes
    lengths = np.empty_like(starts)
    lengths[:-1] = np.diff(starts)
    lengths[-1] = n - starts[-1]
    if flat is not None:
        run_values = flat[starts]
    else:
        start_col, start_row = np.divmod(starts, h)
        if values.flags.c_contiguous:
            run_values = np.take(values.reshape(-1), start_row * w + start_col)
        else:
            run_values = values[start_row, start_col]
    return starts, lengths, run_values


def _format_ints(numbers: np.ndarray) -> tuple[str, np.ndarray]:
    """Space-separated decimal text of non-negative integers, written with array operations.

    Also returns ``offsets``: the text of number ``i`` is ``text[offsets[i]:offsets[i + 1] - 1]``.
    """
    numbers = np.asarray(numbers, dtype=np.int64)
    n = numbers.size
    if n == 0:
        return "", np.zeros(1, dtype=np.int64)
    width = len(str(int(numbers.max())))
    rest = numbers.astype(np.uint32 if width <= 9 else np.uint64)
    # one row per number: its digits right-aligned with leading zeros, then a space;
    # keep marks the characters to write (no leading zeros, always the last digit and the space)
    chars = np.empty((n, width + 1), dtype=np.uint8)
    chars[:, width] = (ord(" ") - ord("0")) % 256  # becomes " " when "0" is added below, wrapping
    keep = np.empty((n, width + 1), dtype=bool)
    keep[:, width - 1] = True
    keep[:, width] = True
    for j in range(width - 1):
        np.greater_equal(rest, _POW10[width - 1 - j], out=keep[:, j])
    for k in range(width):
        quotient = rest // 10
        np.subtract(rest, quotient * 10, out=chars[:, width - 1 - k], casting="unsafe")
        rest = quotient
    chars += ord("0")
    written = chars[keep]
    offsets = np.empty(n + 1, dtype=np.int64)
    offsets[0] = 0
    offsets[1:] = np.flatnonzero(written == ord(" ")) + 1
    return written[:-1].tobytes().decode("ascii"), offsets


def _parse_ints(rle) -> np.ndarray:
    """The integers of an ``EncodedPixels`` string; ValueError names the first bad token."""
    if not isinstance(rle, str):
        hint = (
            " (an empty CSV cell read as NaN? read the file with keep_default_na=False)"
            if isinstance(rle, float)
            else ""
        )
        raise ValueError(f"EncodedPixels must be a string, got {type(rle).__name__} {rle!r}{hint}")
    text = rle.strip()
    if not text:
        return np.zeros(0, dtype=np.int64)
    if _DIGIT_OR_SPACE[np.frombuffer(text.encode("ascii", errors="replace"), dtype=np.uint8)].all():
        values = np.fromstring(text, dtype=np.int64, sep=" ")  # only digits and spaces: text mode is exact
    else:
        tokens = text.split()
        for i, token in enumerate(tokens):
            if not (token.isascii() and _INT_TOKEN.fullmatch(token)):
                raise ValueError(f"value {i + 1} ({token!r}) is not an integer")
        ints = [int(token) for token in tokens]
        if any(abs(v) >= _INT64_MAX for v in ints):
            values = np.array([_INT64_MAX], dtype=np.int64)
        else:
            values = np.array(ints, dtype=np.int64)
    if values.size and values.max() >= _INT64_MAX:
        raise ValueError("a value is too large to be a pixel number or a run length")
    return values


def _runs_ok(starts: np.ndarray, lengths: np.ndarray, n_pixels: int, same: np.ndarray | None = None) -> bool:
    """Fast all-or-nothing check of 1-based runs (``same[i]``: runs i and i+1 belong together)."""
    if starts.size == 0:
        return True
    if starts.min() < 1 or lengths.min() < 1 or max(starts.max(), lengths.max()) > n_pixels:
        return False
    ends = starts + lengths
    if ends.max() - 1 > n_pixels:
        return False
    in_order = starts[1:] >= ends[:-1]
    if same is not None:
        in_order |= ~same
    return bool(in_order.all())


def _runs_problem(starts: np.ndarray, lengths: np.ndarray, n_pixels: int) -> str | None:
    """What is wrong with the 1-based runs of one string, or None."""
    bad = np.flatnonzero(starts < 1)
    if bad.size:
        i = int(bad[0])
        return f"run {i + 1}: start {starts[i]} is below 1 (pixels are numbered from 1)"
    bad = np.flatnonzero(lengths < 1)
    if bad.size:
        i = int(bad[0])
        return f"run {i + 1} (start {starts[i]}): length {lengths[i]} is not positive"
    bad = np.flatnonzero((starts > n_pixels) | (lengths > n_pixels))
    if bad.size:
        i = int(bad[0])
        return (
            f"run {i + 1} (start {starts[i]}, length {lengths[i]}) goes past the end of the image ({n_pixels} pixels)"
        )
    ends = starts + lengths  # one past the run's last pixel
    bad = np.flatnonzero(starts[1:] < ends[:-1])
    if bad.size:
        i = int(bad[0])
        if starts[i + 1] <= starts[i]:
            return f"runs are not sorted: run {i + 2} starts at {starts[i + 1]}, run {i + 1} at {starts[i]}"
        return (
            f"run {i + 2} (start {starts[i + 1]}) overlaps run {i + 1} "
            f"(start {starts[i]}, length {lengths[i]}, last pixel {ends[i] - 1})"
        )
    if starts.size and ends[-1] - 1 > n_pixels:
        return (
            f"run {starts.size} (start {starts[-1]}, length {lengths[-1]}) ends at pixel {ends[-1] - 1}, "
            f"past the end of the image ({n_pixels} pixels)"
        )
    return None


def _parse_runs(rle, n_pixels: int) -> tuple[np.ndarray, np.ndarray]:
    """Validated runs of ``rle`` as 0-based starts and lengths; ValueError says what is wrong."""
    values = _parse_ints(rle)
    if values.size % 2:
        raise ValueError(f"odd number of values ({values.size}): EncodedPixels must be 'start length' pairs")
    starts = values[0::2]
    lengths = values[1::2]
    if not _runs_ok(starts, lengths, n_pixels):
        problem = _runs_problem(starts, lengths, n_pixels)
        if problem is not None:
            raise ValueError(problem)
    return starts - 1, lengths


def _parse_many(rles: Sequence, n_pixels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Runs of several canonical strings parsed and checked in one go, or None.

    Canonical: digits and single spaces, no space at either end.  Returns 0-based starts,
    lengths and the number of runs of each string; None when a string is not canonical or
    something is wrong, for the per-string path to parse it and name the problem.
    """
    n_values = []
    for rle in rles:
        if not isinstance(rle, str) or rle[:1] == " " or rle[-1:] == " " or "  " in rle:
            return None
        n_values.append(rle.count(" ") + 1 if rle else 0)
    text = " ".join(rle for rle in rles if rle)
    if not _DIGIT_OR_SPACE[np.frombuffer(text.encode("ascii", errors="replace"), dtype=np.uint8)].all():
        return None
    values = np.fromstring(text, dtype=np.int64, sep=" ") if text else np.zeros(0, dtype=np.int64)
    n_values = np.asarray(n_values, dtype=np.int64)
    if values.size != n_values.sum() or (n_values % 2).any() or (values.size and values.max() >= _INT64_MAX):
        return None
    starts = values[0::2]
    lengths = values[1::2]
    n_runs = n_values // 2
    same = np.repeat(np.arange(n_runs.size), n_runs)
    if not _runs_ok(starts, lengths, n_pixels, same[1:] == same[:-1]):
        return None
    return starts - 1, lengths, n_runs


def _paint(starts: np.ndarray, lengths: np.ndarray, labels: np.ndarray, fill, n: int, dtype) -> np.ndarray:
    """Flat array of ``n`` pixels: ``fill`` everywhere but the sorted, disjoint runs given."""
    values = np.full(2 * starts.size + 1, fill, dtype=dtype)
    values[1::2] = labels
    counts = np.empty(2 * starts.size + 1, dtype=np.int64)
    counts[1::2] = lengths
    counts[0] = starts[0] if starts.size else n
    if starts.size:
        counts[2:-1:2] = starts[1:] - starts[:-1] - lengths[:-1]
        counts[-1] = n - starts[-1] - lengths[-1]
    return np.repeat(values, counts)


def _unflatten(flat: np.ndarray, shape: tuple[int, int], order: str) -> np.ndarray:
    return np.ascontiguousarray(flat.reshape(shape, order=order))


def _isin(values: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """``np.isin(values, wanted)``, by table look-up for 8- and 16-bit integers."""
    if values.dtype.kind in "biu" and values.dtype.itemsize <= 2:
        info = np.iinfo(np.uint8 if values.dtype == bool else values.dtype)
        table = np.zeros(int(info.max) - int(info.min) + 1, dtype=bool)
        inside = wanted[(wanted >= info.min) & (wanted <= info.max)]
        table[inside - int(info.min)] = True
        index = values.view(np.uint8) if values.dtype == bool else values
        if info.min < 0:
            index = index.astype(np.int64) - int(info.min)
        return table[index]
    return np.isin(values, wanted)


# ----------------------------------------------------------------------------- public API
def rle_problem(rle, n_pixels: int) -> str | None:
    """None when ``rle`` is well-formed for an image of ``n_pixels`` pixels, else what is wrong.

    Well-formed: integer ``start length`` pairs, starts from 1, positive lengths, runs sorted,
    not overlapping and inside the image.  The empty string is valid (class absent).
    """
    try:
        _parse_runs(rle, int(n_pixels))
    except ValueError as exc:
        return str(exc)
    return None


def encode_mask(mask: np.ndarray, order: str = "F") -> str:
    """``EncodedPixels`` of a 2-D mask (non-zero = inside); "" when the mask is empty."""
    order = _check_order(order)
    mask = _as_2d(mask, "mask")
    if mask.dtype != bool:
        mask = mask != 0
    starts, lengths, inside = _runs(mask, order)
    pairs = np.empty((int(inside.sum()), 2), dtype=np.int64)
    pairs[:, 0] = starts[inside] + 1
    pairs[:, 1] = lengths[inside]
    return _format_ints(pairs.reshape(-1))[0]


def decode_mask(rle: str, shape: tuple[int, int], order: str = "F") -> np.ndarray:
    """Boolean HxW mask of an ``EncodedPixels`` string; ValueError if the string is malformed."""
    order = _check_order(order)
    h, w = _check_shape(shape)
    starts, lengths = _parse_runs(rle, h * w)
    flat = _paint(starts, lengths, True, False, h * w, bool)
    return _unflatten(flat, (h, w), order)


def encode_label_map(label_map: np.ndarray, class_indices: Sequence[int], order: str = "F") -> dict[int, str]:
    """``EncodedPixels`` of every class in ``class_indices`` from one pass over a class-index map.

    The runs of the map are found once and grouped by value; a class that does not occur
    gets "".  Values not listed in ``class_indices`` (e.g. an ignore index) are not encoded.
    """
    order = _check_order(order)
    label_map = _as_2d(label_map, "label_map")
    if not (np.issubdtype(label_map.dtype, np.integer) or label_map.dtype == bool):
        raise ValueError(f"label_map must hold integer class indices, got dtype {label_map.dtype}")
    classes = [int(c) for c in class_indices]
    wanted = np.unique(np.asarray(classes, dtype=np.int64))
    starts, lengths, values = _runs(label_map, order)
    keep = _isin(values, wanted)
    starts, lengths, values = starts[keep], lengths[keep], values[keep]
    by_class = np.argsort(values, kind="stable")  # grouped by class, each group in pixel order
    values = values[by_class].astype(np.int64)
    pairs = np.empty((values.size, 2), dtype=np.int64)
    pairs[:, 0] = starts[by_class] + 1
    pairs[:, 1] = lengths[by_class]
    text, offsets = _format_ints(pairs.reshape(-1))
    first = 2 * np.searchsorted(values, wanted, side="left")
    last = 2 * np.searchsorted(values, wanted, side="right")
    encoded = {
        int(c): text[offsets[a] : offsets[b] - 1] if b > a else ""
        for c, a, b in zip(wanted.tolist(), first.tolist(), last.tolist(), strict=False)
    }
    return {c: encoded[c] for c in classes}


def decode_label_map(
    rles: Mapping[int, str],
    shape: tuple[int, int],
    order: str = "F",
    background: int = 0,
    dtype: DTypeLike | None = None,
) -> np.ndarray:
    """HxW class-index map from ``{class_index: EncodedPixels}``; unclaimed pixels get ``background``.

    Raises ValueError for a malformed string (naming its class) or when two classes claim
    the same pixel.  ``dtype`` defaults to uint8 when the background and every class index
    fit in 0..255, else int64.
    """
    order = _check_order(order)
    h, w = _check_shape(shape)
    n = h * w
    classes = [int(c) for c in rles]
    lowest, highest = min(classes + [int(background)]), max(classes + [int(background)])
    if dtype is None:
        dtype = np.uint8 if 0 <= lowest and highest <= 255 else np.int64
    info = np.iinfo(dtype)
    if lowest < info.min or highest > info.max:
        raise ValueError(f"class indices and background span {lowest}..{highest}, which does not fit {np.dtype(dtype)}")
    parsed = _parse_many(list(rles.values()), n)
    if parsed is None:  # one string at a time, to name the class and the problem
        parts = []
        for cls, rle in rles.items():
            try:
                parts.append(_parse_runs(rle, n))
            except ValueError as exc:
                raise ValueError(f"class {cls}: {exc}") from None
        parsed = (
            np.concatenate([p[0] for p in parts] or [np.zeros(0, dtype=np.int64)]),
            np.concatenate([p[1] for p in parts] or [np.zeros(0, dtype=np.int64)]),
            np.asarray([p[0].size for p in parts], dtype=np.int64),
        )
    starts, lengths, n_runs = parsed
    labels = np.repeat(np.asarray(classes, dtype=np.int64), n_runs)
    by_start = np.argsort(starts, kind="stable")
    starts, lengths, labels = starts[by_start], lengths[by_start], labels[by_start]
    clash = np.flatnonzero(starts[1:] < starts[:-1] + lengths[:-1])
    if clash.size:
        i = int(clash[0])
        raise ValueError(
            f"classes {labels[i]} and {labels[i + 1]} both claim pixel {starts[i + 1] + 1} "
            f"({'column' if order == 'F' else 'row'}-major numbering from 1)"
        )
    flat = _paint(starts, lengths, labels, background, n, dtype)
    return _unflatten(flat, (h, w), order)
