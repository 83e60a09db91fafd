"""RLE in the Kaggle convention: known strings, malformed strings, round trips (hypothesis)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pipeline.submission.rle import (
    _format_ints,
    decode_label_map,
    decode_mask,
    encode_label_map,
    encode_mask,
    rle_problem,
)


def classic_encode(img: np.ndarray, order: str = "F") -> str:
    """The classic per-class Kaggle encoder, as the reference."""
    pixels = np.concatenate([[0], np.asarray(img, dtype=bool).flatten(order=order), [0]])
    runs = np.where(pixels[1:] != pixels[:-1])[0] + 1
    runs[1::2] -= runs[::2]
    return " ".join(str(x) for x in runs)


# ----------------------------------------------------------------------------- known strings
MASK_3X3 = np.array(
    [
        [1, 0, 0],
        [1, 1, 0],
        [0, 0, 1],
    ],
    dtype=bool,
)


def test_known_3x3_column_and_row_major():
    # column-major: pixels 1,2 | 5 | 9    row-major: pixel 1 | 4,5 | 9
    assert encode_mask(MASK_3X3) == "1 2 5 1 9 1"
    assert encode_mask(MASK_3X3, order="F") == "1 2 5 1 9 1"
    assert encode_mask(MASK_3X3, order="C") == "1 1 4 2 9 1"
    np.testing.assert_array_equal(decode_mask("1 2 5 1 9 1", (3, 3)), MASK_3X3)
    np.testing.assert_array_equal(decode_mask("1 1 4 2 9 1", (3, 3), order="C"), MASK_3X3)


def test_known_run_crosses_column_boundary():
    mask = np.array([[0, 1, 1], [1, 1, 0]], dtype=bool)  # 2x3: columns (0,1) (1,1) (1,0)
    assert encode_mask(mask) == "2 4"
    assert encode_mask(mask, order="C") == "2 4"
    mask = np.array([[0, 1, 0], [1, 1, 0]], dtype=bool)
    assert encode_mask(mask) == "2 3"
    assert encode_mask(mask, order="C") == "2 1 4 2"


def test_known_non_square_label_map():
    label_map = np.array(
        [
            [0, 2, 2, 5],
            [1, 2, 0, 5],
        ]
    )  # column-major numbering: (0,0)=1 (1,0)=2 (0,1)=3 (1,1)=4 (0,2)=5 (1,2)=6 (0,3)=7 (1,3)=8
    assert encode_label_map(label_map, [1, 2, 3, 5]) == {1: "2 1", 2: "3 3", 3: "", 5: "7 2"}
    # row-major numbering: row 0 = 1..4, row 1 = 5..8
    assert encode_label_map(label_map, [1, 2, 5], order="C") == {1: "5 1", 2: "2 2 6 1", 5: "4 1 8 1"}
    decoded = decode_label_map({1: "2 1", 2: "3 3", 5: "7 2"}, (2, 4))
    np.testing.assert_array_equal(decoded, label_map)
    assert decoded.dtype == np.uint8 and decoded.flags.c_contiguous


def test_empty_full_and_one_pixel_masks():
    assert encode_mask(np.zeros((4, 7), dtype=bool)) == ""
    assert encode_mask(np.ones((4, 7), dtype=bool)) == "1 28"
    assert encode_mask(np.ones((4, 7), dtype=bool), order="C") == "1 28"
    assert encode_mask(np.ones((1, 1), dtype=bool)) == "1 1"
    assert encode_mask(np.zeros((1, 1), dtype=bool)) == ""
    np.testing.assert_array_equal(decode_mask("", (4, 7)), np.zeros((4, 7), dtype=bool))
    np.testing.assert_array_equal(decode_mask("1 28", (4, 7)), np.ones((4, 7), dtype=bool))
    np.testing.assert_array_equal(decode_mask("1 1", (1, 1)), np.ones((1, 1), dtype=bool))
    assert encode_label_map(np.zeros((1, 1), dtype=np.uint8), [0, 1]) == {0: "1 1", 1: ""}
    assert encode_label_map(np.zeros((0, 5), dtype=np.uint8), [0, 1]) == {0: "", 1: ""}
    assert decode_mask("", (0, 5)).shape == (0, 5)


def test_single_row_and_single_column():
    row = np.array([[1, 1, 0, 1]], dtype=bool)
    col = row.T
    assert encode_mask(row) == encode_mask(row, order="C") == "1 2 4 1"
    assert encode_mask(col) == encode_mask(col, order="C") == "1 2 4 1"


def test_integer_mask_counts_non_zero_as_inside():
    assert encode_mask(np.array([[0, 3], [7, 0]], dtype=np.uint8)) == "2 2"


def test_large_numbers_are_written_exactly():
    numbers = np.array([0, 9, 10, 99, 100, 999_999_999, 1_000_000_000, 2**40 + 7, 12345678901234], dtype=np.int64)
    text, offsets = _format_ints(numbers)
    assert text == " ".join(str(n) for n in numbers.tolist())
    assert [text[offsets[i] : offsets[i + 1] - 1] for i in range(numbers.size)] == [str(n) for n in numbers.tolist()]


# ----------------------------------------------------------------------------- malformed strings
MALFORMED = [
    ("1", "odd number of values"),
    ("1 2 3", "odd number of values"),
    ("1 x", "not an integer"),
    ("1.5 2", "not an integer"),
    ("1 2e1", "not an integer"),
    ("0 2", "below 1"),
    ("-1 2", "below 1"),
    ("1 0", "length 0 is not positive"),
    ("1 -2", "length -2 is not positive"),
    ("5 1 2 1", "not sorted"),
    ("3 1 3 1", "not sorted"),
    ("1 3 3 1", "overlaps run 1"),
    ("10 1", "past the end"),
    ("8 3", "ends at pixel 10, past the end"),
    ("1 99999999999999999999999", "too large"),
]


@pytest.mark.parametrize(("rle", "message"), MALFORMED)
def test_malformed_strings_raise(rle, message):
    with pytest.raises(ValueError, match=message):
        decode_mask(rle, (3, 3))
    problem = rle_problem(rle, 9)
    assert problem is not None and message.split(",")[0] in problem
    with pytest.raises(ValueError, match=f"class 4: .*{message}"):
        decode_label_map({1: "1 1", 4: rle}, (3, 3))


def test_non_string_is_rejected_with_a_hint():
    assert "keep_default_na" in rle_problem(float("nan"), 9)
    with pytest.raises(ValueError, match="must be a string"):
        decode_mask(None, (3, 3))


@pytest.mark.parametrize("rle", ["", "   ", "1 9", "1 2 3 1", "  1 2   4 1 ", "1\t2\n4 1", "+1 2"])
def test_valid_strings(rle):
    assert rle_problem(rle, 9) is None


def test_whitespace_variants_decode_like_canonical():
    canonical = decode_mask("1 2 5 1 9 1", (3, 3))
    for text in [" 1 2 5 1 9 1", "1  2 5 1 9 1 ", "1\t2 5 1\n9 1"]:
        np.testing.assert_array_equal(decode_mask(text, (3, 3)), canonical)
        np.testing.assert_array_equal(
            decode_label_map({1: text, 2: "3 2"}, (3, 3)), canonical + 2 * decode_mask("3 2", (3, 3))
        )


def test_two_classes_claiming_a_pixel():
    with pytest.raises(ValueError, match="classes 1 and 2 both claim pixel 3"):
        decode_label_map({1: "1 3", 2: "3 2"}, (3, 3))
    with pytest.raises(ValueError, match="classes 2 and 1 both claim pixel 5"):
        decode_label_map({1: "5 1", 2: "4 2"}, (3, 3))


def test_bad_order_and_shape():
    with pytest.raises(ValueError, match="order"):
        encode_mask(MASK_3X3, order="K")
    with pytest.raises(ValueError, match="2-D"):
        encode_label_map(np.zeros((2, 2, 2), dtype=np.uint8), [0])
    with pytest.raises(ValueError, match="integer class indices"):
        encode_label_map(np.zeros((2, 2)), [0])
    with pytest.raises(ValueError, match="shape"):
        decode_mask("", (3,))


def test_decode_label_map_background_and_dtype():
    decoded = decode_label_map({3: "2 2"}, (2, 2), background=7)
    np.testing.assert_array_equal(decoded, [[7, 3], [3, 7]])
    assert decoded.dtype == np.uint8
    assert decode_label_map({300: "1 1"}, (1, 2)).dtype == np.int64
    assert decode_label_map({}, (2, 3), background=255).tolist() == [[255] * 3] * 2
    assert decode_label_map({1: "1 1"}, (1, 2), dtype=np.int32).dtype == np.int32
    with pytest.raises(ValueError, match="does not fit"):
        decode_label_map({300: "1 1"}, (1, 2), dtype=np.uint8)


# ----------------------------------------------------------------------------- round trips
def blobs(rng: np.random.Generator, h: int, w: int, num_classes: int, n: int) -> np.ndarray:
    out = np.zeros((h, w), dtype=np.uint8)
    for _ in range(n):
        y0, x0 = rng.integers(0, h), rng.integers(0, w)
        y1, x1 = y0 + rng.integers(1, h + 1), x0 + rng.integers(1, w + 1)
        out[y0:y1, x0:x1] = rng.integers(0, num_classes)
    return out


label_maps = st.one_of(
    hnp.arrays(
        dtype=st.sampled_from([np.uint8, np.int16, np.int64, np.uint16]),
        shape=hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=24),
        elements=st.integers(0, 5),
    ),
    st.builds(
        lambda seed, h, w, k, n: blobs(np.random.default_rng(seed), h, w, k, n),
        st.integers(0, 2**32 - 1),
        st.integers(1, 48),
        st.integers(1, 48),
        st.integers(1, 12),
        st.integers(0, 10),
    ),
)
layouts = st.sampled_from(["C", "F", "strided"])


def with_layout(array: np.ndarray, layout: str) -> np.ndarray:
    if layout == "F":
        return np.asfortranarray(array)
    if layout == "strided":  # neither C- nor F-contiguous
        wide = np.zeros((array.shape[0], 2 * array.shape[1]), dtype=array.dtype)
        wide[:, ::2] = array
        return wide[:, ::2]
    return np.ascontiguousarray(array)


@settings(max_examples=150, deadline=None)
@given(label_map=label_maps, order=st.sampled_from(["F", "C"]), layout=layouts)
def test_label_map_round_trip_and_matches_per_class(label_map, order, layout):
    view = with_layout(label_map, layout)
    classes = list(range(int(label_map.max()) + 2))  # one class more than present
    encoded = encode_label_map(view, classes, order=order)
    assert list(encoded) == classes
    for c in classes:
        assert encoded[c] == encode_mask(view == c, order=order) == classic_encode(label_map == c, order=order)
        assert rle_problem(encoded[c], label_map.size) is None
    assert encoded[classes[-1]] == ""
    decoded = decode_label_map(encoded, label_map.shape, order=order)
    np.testing.assert_array_equal(decoded, label_map)
    fg = {c: s for c, s in encoded.items() if c != 0}
    np.testing.assert_array_equal(decode_label_map(fg, label_map.shape, order=order, background=0), label_map)


@settings(max_examples=100, deadline=None)
@given(
    mask=hnp.arrays(np.bool_, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=30)),
    order=st.sampled_from(["F", "C"]),
    layout=layouts,
)
def test_mask_round_trip(mask, order, layout):
    rle = encode_mask(with_layout(mask, layout), order=order)
    assert rle == classic_encode(mask, order=order)
    decoded = decode_mask(rle, mask.shape, order=order)
    assert decoded.dtype == bool and decoded.shape == mask.shape
    np.testing.assert_array_equal(decoded, mask)


def test_unlisted_values_are_not_encoded_and_negative_labels_work():
    label_map = np.array([[255, 1], [-1, 1]], dtype=np.int16)
    assert encode_label_map(label_map, [1, -1]) == {1: "3 2", -1: "2 1"}
    assert encode_label_map(label_map, [1, 1]) == {1: "3 2"}


def test_busy_and_sparse_maps_agree():
    rng = np.random.default_rng(0)
    for label_map in (rng.integers(0, 11, (64, 80)).astype(np.uint8), blobs(rng, 64, 80, 11, 8)):
        classes = list(range(11))
        for order in "FC":
            encoded = encode_label_map(label_map, classes, order=order)
            assert all(encoded[c] == classic_encode(label_map == c, order=order) for c in classes)
            np.testing.assert_array_equal(decode_label_map(encoded, label_map.shape, order=order), label_map)
