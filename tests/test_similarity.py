"""Look-alike image groups: near-duplicate sequences recovered exactly, unrelated images alone,
no giant group on the demo data, file-name order never links images alone, the chain guard."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import make_demo

from pipeline.core.errors import ConfigError
from pipeline.data import ImageHashes, SimilarityParams, group_hashes, image_hashes, load_coco, similarity_groups
from pipeline.data import similarity as sim


def make_sequences(
    root: Path, n_seq: int = 8, n_single: int = 16, size: int = 128, shift: int = 3, seed: int = 0
) -> tuple[Path, list[list[int]]]:
    """A contest-layout set of ``n_seq`` short sequences (3-4 frames: the view moved by up to
    ``shift`` px per frame, exposure changed by up to 10%, JPEG quality 60-90) and ``n_single``
    unrelated images, all numbered consecutively in one folder with the singles between the
    sequences.  Returns the data folder and the true groups (image ids), singles included.

    Base images come from the demo generator; annotations are the base's, moved with the view.
    """
    margin = 6 * shift
    src = make_demo(root / "src", n_train=n_seq + n_single, n_test=1, height=size + 2 * margin, width=size + 2 * margin,
                    seed=seed)  # fmt: skip
    raw = json.loads((src / "train_all.json").read_text())
    rng = np.random.default_rng(seed)
    images, annotations, truth = [], [], []
    order = [i for pair in zip(range(n_seq), range(n_seq, 2 * n_seq), strict=False) for i in pair]
    order += list(range(2 * n_seq, n_seq + n_single))  # sequences and singles alternate, then the other singles
    for base_index in order:
        base = raw["images"][base_index]
        pixels = cv2.imread(str(src / base["file_name"]))
        y = x = margin
        members = []
        for frame in range(3 + base_index % 2 if base_index < n_seq else 1):
            if frame:
                y = int(np.clip(y + rng.integers(-shift, shift + 1), 0, 2 * margin))
                x = int(np.clip(x + rng.integers(-shift, shift + 1), 0, 2 * margin))
            gain = 1.0 + (rng.uniform(-0.1, 0.1) if frame else 0.0)
            view = np.clip(pixels[y : y + size, x : x + size].astype(np.float32) * gain, 0, 255).astype(np.uint8)
            image_id = len(images) + 1
            name = f"batch_01/{image_id:04d}.jpg"
            (root / "batch_01").mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(root / name), view, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(60, 91))])
            images.append({"id": image_id, "file_name": name, "height": size, "width": size})
            for ann in (a for a in raw["annotations"] if a["image_id"] == base["id"]):
                seg = [[v - (x if k % 2 == 0 else y) for k, v in enumerate(poly)] for poly in ann["segmentation"]]
                annotations.append({**ann, "id": len(annotations) + 1, "image_id": image_id, "segmentation": seg})
            members.append(image_id)
        truth.append(members)
    coco = {"images": images, "annotations": annotations, "categories": raw["categories"]}
    (root / "train_all.json").write_text(json.dumps(coco))
    return root, truth


@pytest.fixture(scope="session")
def sequences(tmp_path_factory) -> tuple[Path, list[list[int]]]:
    """8 sequences of 3-4 near-duplicate frames (28 images) among 16 unrelated images, 128x128 JPEGs."""
    return make_sequences(tmp_path_factory.mktemp("sequences") / "data")


def as_sets(groups) -> set[frozenset[int]]:
    return {frozenset(g) for g in groups if len(g) > 1}


def test_sequences_are_recovered_exactly_and_singles_stay_alone(sequences, tmp_path):
    root, truth = sequences
    coco = load_coco(root)
    found = similarity_groups(coco, cache_dir=tmp_path, progress=False)
    assert as_sets(found.groups) == as_sets(truth)
    assert len(found.groups) == 8 and found.grouped_images == 28 and found.largest == 4
    singles = [g[0] for g in truth if len(g) == 1]
    assert len({found.group_of[i] for i in singles}) == len(singles) == 16
    assert set(found.group_of) == set(coco.image_ids)
    assert found.refused == 0 and found.params["threshold"] == sim.DEFAULT_THRESHOLD
    labels = found.labels(coco.image_ids)
    assert len(set(labels)) == 8 + 16
    summary = found.summary()
    assert summary["multi_image_groups"] == 8 and summary["largest_group"] == 4


def test_hashes_are_cached_per_annotation_file(sequences, tmp_path, monkeypatch):
    root, _ = sequences
    coco = load_coco(root)
    first = image_hashes(coco, cache_dir=tmp_path, progress=False)
    assert len(list((tmp_path / "similarity").glob("*.npz"))) == 1

    def fail(*args):
        raise AssertionError("read the images again instead of the cache")

    monkeypatch.setattr(sim, "_read_small", fail)
    again = image_hashes(coco, cache_dir=tmp_path, progress=False)
    for field in ("image_ids", "phash", "dhash", "colour"):
        np.testing.assert_array_equal(getattr(again, field), getattr(first, field))
    with pytest.raises(AssertionError, match="images again"):
        image_hashes(coco, cache_dir=None, progress=False)


def test_the_demo_data_has_no_spurious_group(demo_data_square, demo_data):
    for root in (demo_data_square, demo_data):
        coco = load_coco(root)
        found = similarity_groups(coco, progress=False)
        assert found.largest <= 2, [len(g) for g in found.groups]
        assert found.grouped_images <= 0.1 * len(coco.images)


def bits(*positions: int) -> int:
    """A 128-bit descriptor (pHash = bits 0-63, dHash = bits 64-127) with ``positions`` set."""
    return sum(1 << p for p in positions)


def hashes(values: list[int], colour: np.ndarray | None = None) -> ImageHashes:
    n = len(values)
    low = np.array([v & (2**64 - 1) for v in values], np.uint64)
    high = np.array([v >> 64 for v in values], np.uint64)
    return ImageHashes(np.arange(1, n + 1), low, high, np.ones((n, 48), np.float32) if colour is None else colour)


def test_file_name_order_only_strengthens_links_the_images_show():
    p = SimilarityParams()
    far = p.threshold + p.sequence_slack + 1
    loose = p.threshold + 2  # above the threshold, within the sequence slack
    values = [bits(), bits(*range(loose)), bits(*range(128 - far, 128))]
    h = hashes(values)
    consecutive = ["b/0001.jpg", "b/0002.jpg", "b/0003.jpg"]
    found = group_hashes(h, consecutive, p)
    assert as_sets(found.groups) == {frozenset({1, 2})} and found.kinds == {"sequence": 1}
    # the same two images numbered far apart, in other folders or with other prefixes: not linked
    for names in (
        ["b/0001.jpg", "b/0009.jpg", "b/0003.jpg"],
        ["a/0001.jpg", "b/0002.jpg", "c/0003.jpg"],
        ["b/x0001.jpg", "b/y0002.jpg", "b/z0003.jpg"],
        ["b/one.jpg", "b/two.jpg", "b/three.jpg"],
    ):
        assert group_hashes(h, names, p).groups == []
    # consecutive but of very different colour layout: not linked
    colour = np.ones((3, 48), np.float32)
    colour[1, :24] = 0.5
    assert group_hashes(hashes(values, colour), consecutive, p).groups == []
    # within the threshold the names do not matter
    near = hashes([bits(), bits(*range(p.threshold)), bits(*range(128 - far, 128))])
    assert as_sets(group_hashes(near, ["a/x.jpg", "b/y.jpg", "c/z.jpg"], p).groups) == {frozenset({1, 2})}


def test_chains_of_weak_links_are_capped_but_strict_duplicates_are_not():
    # image k has the first 9k bits set: neighbours (9 apart) and next-but-one (18) link, the ends are far apart
    chain = hashes([bits(*range(9 * k)) for k in range(14)])
    names = [f"v/{k:04d}.jpg" for k in range(14)]
    free = group_hashes(chain, names, SimilarityParams(max_group=100))
    assert free.largest == 14 and free.refused == 0 and free.kinds == {"similar": 13}
    capped = group_hashes(chain, names, SimilarityParams(max_group=4))
    assert capped.largest <= 4 and capped.refused > 0
    assert sum(len(g) for g in capped.groups) >= 12  # the chain is cut into pieces, not dissolved
    assert capped.params["max_group"] == 4 and capped.summary()["refused_merges"] == capped.refused
    same = hashes([bits(3, 70)] * 12)
    found = group_hashes(same, [f"x{k}.png" for k in range(12)], SimilarityParams(max_group=4))
    assert found.largest == 12 and found.kinds == {"strict": 11}
    assert SimilarityParams().group_cap(1000) == 50 and SimilarityParams().group_cap(20) == 8


def test_pairs_match_a_brute_force_count_and_the_popcount_fallback(monkeypatch):
    rng = np.random.default_rng(0)
    word = lambda *shape: rng.integers(0, 2**63, shape, dtype=np.uint64)  # noqa: E731
    ph = word(5)[rng.integers(0, 5, 300)] ^ (word(300) & word(300) & word(300))  # 5 clusters, ~8 bits of noise
    h = ImageHashes(np.arange(300), ph, np.zeros(300, np.uint64), np.ones((300, 48), np.float32))
    monkeypatch.setattr(sim, "_CHUNK_ENTRIES", 1000)  # several blocks of rows
    i, j, d = sim.close_pairs(h, 12)
    brute = {(a, b) for a in range(300) for b in range(a + 1, 300) if bin(int(ph[a]) ^ int(ph[b])).count("1") <= 12}
    assert set(zip(i.tolist(), j.tolist(), strict=True)) == brute and 100 < len(brute) < 300 * 299 / 2 / 5
    assert all(d[k] == bin(int(ph[i[k]]) ^ int(ph[j[k]])).count("1") for k in range(len(i)))
    x = word(7, 3)
    monkeypatch.delattr(np, "bitwise_count", raising=False)
    np.testing.assert_array_equal(sim.popcount(x), [[bin(int(v)).count("1") for v in row] for row in x])


def test_bad_parameters_are_refused():
    with pytest.raises(ConfigError, match="strict <= threshold"):
        SimilarityParams(threshold=4)
    with pytest.raises(ConfigError, match="max_group"):
        SimilarityParams(max_group=1)
    with pytest.raises(ConfigError, match="negative"):
        SimilarityParams(colour=-1)
