"""The metric module: hand-computed confusion matrices and IoUs, and the fast path vs a plain reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.evaluation import metrics
from pipeline.evaluation.metrics import (
    MeanIoU,
    confusion_matrix,
    confusion_matrix_torch,
    image_level_miou,
    iou_per_class,
    mean_iou,
    pixel_accuracy,
)


def reference_confusion_matrix(pred, target, num_classes, ignore_index=255) -> np.ndarray:
    """Pixel by pixel, as the definition reads."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    for t, p in zip(np.asarray(target).reshape(-1).tolist(), np.asarray(pred).reshape(-1).tolist(), strict=False):
        if t < 0 or t >= num_classes or (ignore_index is not None and t == ignore_index):
            continue
        if not 0 <= p < num_classes:
            raise ValueError("predicted class index out of range")
        cm[int(t), int(p)] += 1
    return cm


# ----------------------------------------------------------------------------- hand-computed
GT = np.array([[0, 0, 1], [1, 2, 255]], dtype=np.uint8)
PRED = np.array([[0, 1, 1], [1, 2, 0]], dtype=np.uint8)


def test_hand_computed_confusion_iou_and_miou():
    cm = confusion_matrix(PRED, GT, num_classes=4)
    expected = np.array(
        [
            [1, 1, 0, 0],  # gt 0: one right, one predicted as 1
            [0, 2, 0, 0],  # gt 1: both right
            [0, 0, 1, 0],  # gt 2: right
            [0, 0, 0, 0],  # class 3 absent from both; the 255 pixel (predicted 0) is skipped
        ]
    )
    np.testing.assert_array_equal(cm, expected)
    assert cm.dtype == np.int64
    ious = iou_per_class(cm)
    np.testing.assert_allclose(ious[:3], [1 / 2, 2 / 3, 1.0])  # 1/(1+0+1), 2/(2+1+0), 1/1
    assert math.isnan(ious[3])
    assert mean_iou(cm) == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert pixel_accuracy(cm) == pytest.approx(4 / 5)


def test_background_is_a_class_in_the_mean():
    gt = np.array([[0, 0, 0, 1]])
    pred = np.array([[0, 0, 1, 1]])
    cm = confusion_matrix(pred, gt, 2)
    np.testing.assert_array_equal(cm, [[2, 1], [0, 1]])
    np.testing.assert_allclose(iou_per_class(cm), [2 / 3, 1 / 2])
    assert mean_iou(cm) == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_predicted_but_absent_class_counts_as_zero():
    gt = np.array([[0, 0]])
    pred = np.array([[0, 2]])
    ious = iou_per_class(confusion_matrix(pred, gt, 3))
    assert ious[0] == pytest.approx(1 / 2) and math.isnan(ious[1]) and ious[2] == 0.0
    assert mean_iou(confusion_matrix(pred, gt, 3)) == pytest.approx(1 / 4)


def test_all_ignored_gives_nan():
    gt = np.full((2, 2), 255, dtype=np.uint8)
    cm = confusion_matrix(np.zeros((2, 2), dtype=np.uint8), gt, 3)
    assert cm.sum() == 0 and math.isnan(mean_iou(cm)) and math.isnan(pixel_accuracy(cm))


def test_image_level_differs_from_dataset_level():
    gts = [np.zeros((2, 2), dtype=np.uint8), np.ones((2, 2), dtype=np.uint8)]
    preds = [np.zeros((2, 2), dtype=np.uint8), np.array([[1, 1], [0, 0]], dtype=np.uint8)]
    # image 1: IoU_0 = 1, class 1 absent -> 1.0;  image 2: IoU_0 = 0/2, IoU_1 = 2/4 -> 0.25
    assert image_level_miou(preds, gts, 2) == pytest.approx((1.0 + 0.25) / 2)
    # dataset: cm = [[4, 0], [2, 2]] -> IoU_0 = 4/6, IoU_1 = 2/4
    meter = MeanIoU(2)
    for p, g in zip(preds, gts, strict=False):
        meter.update(p, g)
    np.testing.assert_array_equal(meter.cm, [[4, 0], [2, 2]])
    assert meter.compute() == pytest.approx((4 / 6 + 2 / 4) / 2)
    assert meter.compute() != pytest.approx(image_level_miou(preds, gts, 2))
    np.testing.assert_allclose(meter.per_class(), [4 / 6, 2 / 4])


def test_torch_and_numpy_agree():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 6, (3, 17, 23)).astype(np.int64)
    gt[0, :4] = 255
    pred = rng.integers(0, 5, gt.shape)
    expected = reference_confusion_matrix(pred, gt, 5)
    np.testing.assert_array_equal(confusion_matrix(pred, gt, 5), expected)
    np.testing.assert_array_equal(confusion_matrix(torch.from_numpy(pred), torch.from_numpy(gt), 5), expected)
    np.testing.assert_array_equal(
        confusion_matrix_torch(torch.from_numpy(pred), torch.from_numpy(gt), 5).numpy(), expected
    )


def test_shape_mismatch_and_prediction_out_of_range():
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(np.zeros((2, 3)), np.zeros((3, 2)), 2)
    with pytest.raises(ValueError, match="out of range"):
        confusion_matrix(np.array([[0, 5]], dtype=np.uint8), np.array([[0, 1]], dtype=np.uint8), 3)
    # an out-of-range prediction on an ignored pixel is not an error, and is not counted
    cm = confusion_matrix(np.array([[0, 5]], dtype=np.uint8), np.array([[0, 255]], dtype=np.uint8), 3)
    np.testing.assert_array_equal(cm, [[1, 0, 0], [0, 0, 0], [0, 0, 0]])


# ----------------------------------------------------------------------------- fast path vs reference
def blob_map(rng, shape, num_classes):
    out = np.zeros(shape, dtype=np.int64)
    for _ in range(6):
        y, x = rng.integers(0, shape[-2]), rng.integers(0, shape[-1])
        out[..., y : y + rng.integers(1, shape[-2] + 1), x : x + rng.integers(1, shape[-1] + 1)] = rng.integers(
            0, num_classes
        )
    return out


@pytest.mark.parametrize("num_classes", [1, 2, 11, 15, 16, 40, 256])
@pytest.mark.parametrize("structured", [False, True])
def test_fast_path_matches_reference(num_classes, structured):
    rng = np.random.default_rng(num_classes)
    for shape in [(1, 1), (7, 9), (2, 31, 17)]:
        if structured:  # long runs
            gt = blob_map(rng, shape, num_classes + 2)
            pred = blob_map(rng, shape, num_classes)
        else:  # noise: short runs
            gt = rng.integers(0, num_classes + 2, shape)
            pred = rng.integers(0, num_classes, shape)
        gt[rng.random(shape) < 0.1] = 255
        for ignore_index in (255, 0, None):
            for t_dtype, p_dtype in [
                (np.uint8, np.uint8),
                (np.int64, np.int64),
                (np.uint8, np.int64),
                (np.uint16, np.uint8),
            ]:
                p, t = pred.astype(p_dtype), gt.astype(t_dtype)
                expected = reference_confusion_matrix(p, t, num_classes, ignore_index)
                got = confusion_matrix(p, t, num_classes, ignore_index)
                assert got.dtype == np.int64
                np.testing.assert_array_equal(got, expected)


def test_fast_path_handles_negative_bool_and_float_inputs():
    rng = np.random.default_rng(1)
    gt = rng.integers(-2, 5, (13, 11))
    pred = rng.integers(0, 4, (13, 11))
    np.testing.assert_array_equal(confusion_matrix(pred, gt, 4), reference_confusion_matrix(pred, gt, 4))
    np.testing.assert_array_equal(
        confusion_matrix(pred.astype(np.int8), gt.astype(np.int8), 4), reference_confusion_matrix(pred, gt, 4)
    )
    gt_bool, pred_bool = gt > 1, pred > 1
    np.testing.assert_array_equal(
        confusion_matrix(pred_bool, gt_bool, 2),
        reference_confusion_matrix(pred_bool.astype(int), gt_bool.astype(int), 2),
    )
    np.testing.assert_array_equal(
        confusion_matrix(pred.astype(np.float32), gt.astype(np.float32), 4), reference_confusion_matrix(pred, gt, 4)
    )


def test_fast_path_chunks_and_odd_sizes(monkeypatch):
    rng = np.random.default_rng(2)
    gt = blob_map(rng, (3, 21, 19), 13).astype(np.uint8)
    gt[rng.random(gt.shape) < 0.05] = 255
    noisy = rng.integers(0, 11, gt.shape).astype(np.uint8)  # short runs
    smooth = blob_map(rng, gt.shape, 11).astype(np.uint8)  # long runs
    for pred in (noisy, smooth):
        expected = reference_confusion_matrix(pred, gt, 11)
        for chunk in (37, 64, 1 << 21):  # odd and even chunk lengths, and one chunk
            monkeypatch.setattr(metrics, "_CHUNK", chunk)
            np.testing.assert_array_equal(confusion_matrix(pred, gt, 11), expected)
            np.testing.assert_array_equal(
                confusion_matrix(pred[:, :, :-1], gt[:, :, :-1], 11),
                reference_confusion_matrix(pred[:, :, :-1], gt[:, :, :-1], 11),
            )


def test_meter_accumulates_like_one_matrix():
    rng = np.random.default_rng(3)
    gts = [blob_map(rng, (16, 20), 11).astype(np.uint8) for _ in range(5)]
    preds = [blob_map(rng, (16, 20), 11).astype(np.uint8) for _ in range(5)]
    meter = MeanIoU(11)
    for p, g in zip(preds, gts, strict=False):
        meter.update(p, g)
    expected = reference_confusion_matrix(np.stack(preds), np.stack(gts), 11)
    np.testing.assert_array_equal(meter.cm, expected)
    np.testing.assert_array_equal(confusion_matrix(np.stack(preds), np.stack(gts), 11), expected)
    assert meter.compute() == pytest.approx(mean_iou(expected))
