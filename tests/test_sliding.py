"""Sliding-window inference: exactness on a pointwise model, seams on a convolutional one,
small images, settings, and prediction of a tiny run with ``sliding=on``."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn.functional as F
from conftest import small_train_config
from torch import nn

from pipeline import data as data_layer
from pipeline.core.config import build_config
from pipeline.core.errors import ConfigError, PipelineError
from pipeline.data import load_coco
from pipeline.data.store import ProbReader
from pipeline.engine.checkpoint import load_checkpoint_model
from pipeline.inference.predictor import sliding_indices
from pipeline.inference.sliding import (
    SlidingWindow,
    blend_weights,
    count_windows,
    sliding_window,
    window_starts,
)
from pipeline.inference.tta import TTAModel
from pipeline.predict import PredictConfig, run

BLEND_NAMES = ("gaussian", "uniform")


class Counted(nn.Module):
    """A probability predictor that counts the windows it is sent."""

    def __init__(self, net: nn.Module, divisor: int = 1):
        super().__init__()
        self.net = net
        self.divisor = divisor
        self.windows = 0
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.windows += x.shape[0]
        self.calls += 1
        return self.net(x).softmax(1)


def pointwise(classes: int = 5, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Conv2d(3, classes, 1).eval()


def convolutional(classes: int = 4, seed: int = 0) -> nn.Module:
    """Three 3x3 convolutions with zero padding: translation-equivariant, receptive radius 3."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(8, classes, 3, padding=1),
    ).eval()


def smooth_image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """A 1 x 3 x height x width image of smooth random content (neighbouring pixels differ little)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, 3, max(2, height // 8), max(2, width // 8), generator=g)
    return F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)


def internal_edges(length: int, window: int, stride: int) -> list[int]:
    """Positions e where a window starts or ends inside the image (between pixels e - 1 and e)."""
    starts = window_starts(length, window, stride)
    return sorted({e for s in starts for e in (s, s + window) if 0 < e < length})


def seam_ratio(probs: torch.Tensor, edges_y: list[int], edges_x: list[int]) -> float:
    """Mean jump between neighbouring pixels across the given edges / the mean jump everywhere else."""
    dy = probs.diff(dim=2).abs().mean(dim=(0, 1, 3))  # row i vs i + 1
    dx = probs.diff(dim=3).abs().mean(dim=(0, 1, 2))
    on_y = torch.zeros_like(dy, dtype=torch.bool)
    on_x = torch.zeros_like(dx, dtype=torch.bool)
    on_y[[e - 1 for e in edges_y]] = True
    on_x[[e - 1 for e in edges_x]] = True
    across = torch.cat([dy[on_y], dx[on_x]]).mean()
    elsewhere = torch.cat([dy[~on_y], dx[~on_x]]).mean()
    return float(across / elsewhere)


def test_window_starts_cover_the_axis_with_the_last_window_flush():
    starts = window_starts(45, 16, 8)
    assert starts[0] == 0 and starts[-1] == 45 - 16
    assert all(0 < b - a <= 8 for a, b in zip(starts, starts[1:], strict=False))
    covered = torch.zeros(45, dtype=torch.bool)
    for s in starts:
        covered[s : s + 16] = True
    assert covered.all()
    assert window_starts(16, 16, 8) == window_starts(10, 16, 8) == [0]
    assert count_windows((45, 70), (16, 24), (8, 12)) == len(starts) * len(window_starts(70, 24, 12))


def test_gaussian_weights_peak_in_the_centre_and_stay_positive():
    w = blend_weights("gaussian", (16, 24))
    assert w.shape == (16, 24) and w.dtype == torch.float32
    assert (w > 0).all() and w.max() == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(w, w.flip(0)) and torch.allclose(w, w.flip(1))
    assert w[0, 0] < 1e-5 < w[8, 12]  # sigma = side / 8: corners count next to nothing
    assert torch.equal(blend_weights("uniform", (16, 24)), torch.ones(16, 24))


@pytest.mark.parametrize("blend", BLEND_NAMES)
def test_pointwise_model_gives_the_whole_image_result(blend):
    net = pointwise()
    images = torch.randn(2, 3, 45, 70)  # not a multiple of the stride 8 x 12 on either side
    counted = Counted(net)
    with torch.no_grad():
        whole = net(images).softmax(1)
        slid = sliding_window(counted, images, (16, 24), overlap=0.5, blend=blend, max_batch=7)
    per_image = count_windows((45, 70), (16, 24), (8, 12))
    assert per_image >= 4 and counted.windows == 2 * per_image
    assert counted.calls == -(-2 * per_image // 7)  # batches of at most max_batch windows
    assert slid.shape == whole.shape
    assert torch.allclose(slid, whole, atol=1e-6, rtol=0)


def test_seams_gaussian_blend_has_none_naive_tiling_has_them():
    net = convolutional()
    image = smooth_image(96, 128)
    window, stride = 32, 16
    with torch.no_grad():
        whole = net(image).softmax(1)
        model = Counted(net)
        gauss = sliding_window(model, image, window, stride=stride, blend="gaussian")
        naive = sliding_window(model, image, window, stride=window, blend="uniform")  # tiles, hard edges
    edges_y, edges_x = internal_edges(96, window, stride), internal_edges(128, window, stride)
    # window interiors (3 pixels or more from every window edge: beyond the receptive radius) are exact
    radius = 3
    far_y = torch.tensor([all(not (e - radius <= i < e + radius) for e in edges_y) for i in range(96)])
    far_x = torch.tensor([all(not (e - radius <= i < e + radius) for e in edges_x) for i in range(128)])
    interior = far_y[:, None] & far_x[None, :]
    assert interior.float().mean() > 0.2
    assert torch.allclose(gauss[..., interior], whole[..., interior], atol=1e-5, rtol=0)
    assert (gauss - whole).abs().max() < 1e-3  # close everywhere: borders of one window weigh little
    # jumps across window edges are no larger than neighbouring differences elsewhere
    assert seam_ratio(whole, edges_y, edges_x) < 1.25  # the check holds for the model itself
    assert seam_ratio(gauss, edges_y, edges_x) < 1.25
    # ... and fails for non-overlapping tiles with hard edges, whose borders see zero padding
    tile_y, tile_x = internal_edges(96, window, window), internal_edges(128, window, window)
    assert seam_ratio(naive, tile_y, tile_x) > 2.0
    assert seam_ratio(whole, tile_y, tile_x) < 1.25


@pytest.mark.parametrize("blend", BLEND_NAMES)
def test_probabilities_sum_to_one(blend):
    images = torch.randn(2, 3, 50, 37)
    with torch.no_grad():
        probs = sliding_window(Counted(convolutional(classes=6)), images, 16, overlap=0.25, blend=blend)
    assert probs.shape == (2, 6, 50, 37) and (probs >= 0).all()
    assert torch.allclose(probs.sum(1), torch.ones(2, 50, 37), atol=1e-5)


def test_images_smaller_than_the_window_are_padded_and_cropped_back():
    net = pointwise(classes=3)
    counted = Counted(net)
    for size in ((10, 13), (10, 40), (40, 13)):  # smaller on both sides, on one side only
        images = torch.randn(1, 3, *size)
        with torch.no_grad():
            probs = sliding_window(counted, images, 16, overlap=0.5)
            assert probs.shape == (1, 3, *size)
            assert torch.allclose(probs, net(images).softmax(1), atol=1e-6, rtol=0)
    with torch.no_grad():
        conv = sliding_window(Counted(convolutional()), torch.randn(1, 3, 7, 9), 16)
    assert conv.shape == (1, 4, 7, 9) and torch.allclose(conv.sum(1), torch.ones(1, 7, 9), atol=1e-5)


def test_a_tta_model_slides_and_stays_a_model():
    net = pointwise(classes=4)
    net.input_divisor = 8
    tta = TTAModel(net, "flip")
    slide = SlidingWindow(tta, (16, 24), overlap=0.5, blend="gaussian", max_batch=5)
    assert slide.divisor == 8 and slide.stride == (8, 12) and isinstance(slide, nn.Module)
    images = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        assert torch.allclose(slide(images), tta(images), atol=1e-6, rtol=0)
    with pytest.raises(ConfigError, match=r"window 20x24 must be a multiple of the model's input divisor 8"):
        SlidingWindow(tta, (20, 24))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"blend": "cosine"}, r"unknown blend mode 'cosine'.*known: gaussian, uniform"),
        ({"overlap": 1.0}, r"overlap must be in \[0, 1\).*got 1.0"),
        ({"stride": 20}, r"stride 20x20 is larger than the window 16x16"),
        ({"window": (16, 0)}, r"window must be .* got \(16, 0\)"),
        ({"max_batch": 0}, r"max_batch must be at least 1, got 0"),
    ],
)
def test_bad_settings_name_the_value(kwargs, message):
    params = {"window": 16, **kwargs}
    with pytest.raises(PipelineError, match=message):
        sliding_window(Counted(pointwise()), torch.randn(1, 3, 20, 20), **params)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("sliding", "maybe", r"sliding: unknown 'maybe'; known: auto, on, off"),
        ("blend", "cosine", r"blend: unknown 'cosine'; known: gaussian, uniform"),
        ("overlap", "1.5", r"overlap must be in \[0, 1\).*got 1.5"),
        ("sliding_factor", "0.5", r"sliding_factor must be at least 1.*got 0.5"),
        ("window", "[0]", r"window must be a positive side or \[height, width\].*got \[0\]"),
        ("window", "[8, 8, 8]", r"window must be .*got \[8, 8, 8\]"),
    ],
)
def test_predict_config_rejects_bad_sliding_values(key, value, message):
    with pytest.raises(ConfigError, match=message):
        build_config(PredictConfig, overrides={"run_dir": "runs/x/fold0", key: value})


@pytest.fixture(scope="module")
def tiny_run(demo_data_square, folds_file, tmp_path_factory):
    """A one-batch run trained at 32x32 on the 64x64 demo images: (data_dir, run_dir)."""
    from pipeline import train as train_stage

    runs = tmp_path_factory.mktemp("sliding_runs")
    cfg = small_train_config(
        demo_data_square,
        folds_file,
        runs,
        epochs=1,
        max_train_batches=1,
        max_val_batches=1,
        img_size=[32],
        augment="none",
        save_oof=False,
        plot=False,
    )
    return demo_data_square, train_stage.run(cfg).run_dir


def predict_cfg(tiny_run, out, **kw) -> PredictConfig:
    data, run_dir = tiny_run
    base = dict(
        run_dir=str(run_dir), data_dir=str(data), out_dir=str(out), tta="none", num_workers=0, progress=False, amp="off"
    )
    return build_config(PredictConfig, overrides={**base, **kw})


def test_predict_with_sliding_windows_stores_maps_like_any_prediction(tiny_run, tmp_path, caplog):
    data, run_dir = tiny_run
    # batch_size 9: the 3 x 3 windows of a 64x64 image in one call
    with caplog.at_level(logging.INFO, logger="pipeline.inference.predictor"):
        out = run(predict_cfg(tiny_run, tmp_path / "on", sliding="on", batch_size=9))
    modes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("sliding=")]
    assert len(modes) == 1 and "in 32x32 windows (stride 16x16, overlap 0.5, gaussian blend)" in modes[0]

    test = json.loads((data / "test.json").read_text())
    reader = ProbReader(out)
    assert sorted(reader.image_ids) == sorted(im["id"] for im in test["images"])
    meta = json.loads((out / "meta.json").read_text())
    assert meta["train_size"] == [32, 32]
    assert meta["sliding"] == {
        "mode": "on",
        "images": len(test["images"]),
        "window": [32, 32],
        "stride": [16, 16],
        "blend": "gaussian",
    }
    # each map is the sliding-window prediction of the image at its own size (64x64: 3 x 3 windows)
    model, _, ckpt = load_checkpoint_model(run_dir / "best.pt")
    coco = load_coco(data, "test.json", require_annotations=False)
    native = data_layer.TestDataset(
        coco, coco.image_ids, None, data_layer.Preprocessing.from_dict(ckpt["preprocessing"])
    )
    slide = SlidingWindow(TTAModel(model, "none"), (32, 32), overlap=0.5)
    for idx in (0, len(native) - 1):
        image, im = native[idx]
        with torch.inference_mode():
            expected = slide(image[None])[0]
        stored = reader.load(im["image_id"])
        assert stored.shape == expected.shape == (11, im["height"], im["width"])
        assert torch.allclose(stored, expected, atol=2e-3, rtol=0)
        assert torch.allclose(stored.sum(0), torch.ones(im["height"], im["width"]), atol=5e-3)

    # auto with a factor above 64 / 32: every image is resized to the trained size, as before
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pipeline.inference.predictor"):
        resized = ProbReader(run(predict_cfg(tiny_run, tmp_path / "resized", sliding_factor=2.5, batch_size=8)))
    assert resized.meta["sliding"]["images"] == 0
    assert any("no image has a side at least 2.5 x the trained size 32x32" in r.getMessage() for r in caplog.records)
    first = reader.image_ids[0]
    assert resized.load(first).shape == reader.load(first).shape
    assert not torch.allclose(resized.load(first), reader.load(first), atol=1e-3)


def test_auto_slides_images_with_a_side_beyond_the_factor():
    sizes = [(64, 64), (95, 64), (96, 40), (20, 180), (96, 96)]
    auto = build_config(PredictConfig, overrides={"run_dir": "r", "sliding_factor": 1.5})
    assert sliding_indices(auto, sizes, (64, 64)) == [2, 3, 4]
    assert sliding_indices(auto, sizes, (64, 128)) == [2, 4]
    on = build_config(PredictConfig, overrides={"run_dir": "r", "sliding": "on"})
    off = build_config(PredictConfig, overrides={"run_dir": "r", "sliding": "off"})
    assert sliding_indices(on, sizes, (64, 64)) == list(range(5)) and sliding_indices(off, sizes, (8, 8)) == []
    # a run trained on shrunk images (256 -> 128): windows at 256 would show objects twice as large
    assert sliding_indices(auto, [(256, 256)] * 4, (128, 128)) == []
    assert sliding_indices(on, [(256, 256)] * 4, (128, 128)) == [0, 1, 2, 3]
    # trained at the data's own scale: only the image far larger than the typical one slides
    assert sliding_indices(auto, [(128, 128), (130, 120), (512, 400), (128, 128)], (128, 128)) == [2]


def test_predict_val_with_sliding_windows_scores_the_maps(tiny_run, tmp_path):
    # a window of 64 (the image size): one window per image, the fold predicted at its own size
    out = run(predict_cfg(tiny_run, tmp_path / "val", split="val", sliding="on", window=[64], blend="uniform"))
    reader = ProbReader(out)
    sliding = reader.meta["sliding"]
    assert sliding["images"] == len(reader) > 0 and sliding["window"] == [64, 64] and sliding["blend"] == "uniform"
    assert {reader.stored_size(i) for i in reader.image_ids} == {(16, 16)}  # the run's oof size: half of 32
    assert 0.0 <= reader.meta["miou"] <= 1.0 and 0.0 <= reader.meta["miou_full_resolution"] <= 1.0
    i = reader.image_ids[0]
    assert torch.allclose(reader.load(i, (64, 64)).sum(0), torch.ones(64, 64), atol=5e-3)
