"""The transformers families: mask classification (Mask2Former, MaskFormer) through the family
contract, whole-model segmentation-pretrained weights from a local folder, and a run of each
kind through the engine, prediction and an ensemble."""

from __future__ import annotations

import pytest
import torch
from conftest import small_train_config
from torch import nn

from pipeline import ensemble as ensemble_stage
from pipeline.core.errors import ConfigError, PipelineError
from pipeline.data.store import ProbReader
from pipeline.engine.checkpoint import load_checkpoint_model
from pipeline.inference.predictor import PredictConfig, predict
from pipeline.models import build_model, get_spec, list_models
from pipeline.models.backends import hf
from pipeline.models.contract import has_own_loss, model_loss, model_probabilities
from pipeline.train import run as train

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
HF_NAMES = ["mask2former", "maskformer", "hf_upernet", "hf_segformer"]


def tiny(name: str, num_classes: int, **kw) -> nn.Module:
    torch.manual_seed(0)
    return build_model(name, num_classes, encoder=get_spec(name).test_encoder, **kw)


def test_the_families_are_registered_with_their_kind():
    assert set(HF_NAMES) <= set(list_models())
    assert all(has_own_loss(tiny(n, 3)) for n in hf.MASK_CLASSIFICATION)
    assert not has_own_loss(tiny("hf_upernet", 3)) and not has_own_loss(tiny("hf_segformer", 3))


def test_mask_targets_leave_ignore_pixels_out_of_every_mask():
    masks = torch.tensor([[[0, 0, 2], [255, 2, 2]], [[255, 255, 255], [255, 255, 255]]])
    classes, binary = hf.targets_of(masks)
    assert classes[0].tolist() == [0, 2] and classes[1].numel() == 0
    assert binary[0].shape == (2, 2, 3) and binary[1].shape == (0, 2, 3)
    assert binary[0][:, 1, 0].sum() == 0  # the ignored pixel: neither background (0) nor class 2
    assert binary[0][0].tolist() == [[1, 1, 0], [0, 0, 0]]


@pytest.mark.parametrize("name", hf.MASK_CLASSIFICATION)
def test_mask_classification_probabilities_and_loss(name):
    model = tiny(name, 5).train()
    x = torch.randn(2, 3, 64, 96)
    masks = torch.randint(0, 5, (2, 64, 96))
    masks[1] = 255  # an image with nothing but ignore pixels still gives a finite loss
    outputs = model(x)
    assert outputs["class"].shape[-1] == 6  # K + "no object"
    if name == "mask2former":  # the decoder layers' predictions while training (MaskFormer's config leaves them off)
        assert len(outputs["aux"]) == model.hf.config.decoder_layers - 1
    loss = model_loss(model, outputs, masks, criterion=None)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    probs = model_probabilities(model.eval(), model(x))
    assert probs.shape == (2, 5, 64, 96) and torch.allclose(probs.sum(1), torch.ones(()), atol=1e-5)
    assert model(x)["aux"] is None  # no auxiliary predictions at inference


def test_probabilities_are_class_scores_times_masks():
    model = tiny("mask2former", 3).eval()
    q = 2
    outputs = {
        # query 0 is class 1 for sure, query 1 is "no object"
        "class": torch.tensor([[[-20.0, 20.0, -20.0, -20.0], [-20.0, -20.0, -20.0, 20.0]]]),
        "masks": torch.stack([torch.full((4, 4), 20.0), torch.full((4, 4), -20.0)])[None],
        "size": (8, 8),
    }
    assert outputs["masks"].shape == (1, q, 4, 4)
    probs = model.to_probabilities(outputs)
    assert probs.shape == (1, 3, 8, 8) and torch.allclose(probs[0, 1], torch.ones(8, 8), atol=1e-4)


def test_whole_model_weights_from_a_local_folder_rebuild_only_the_classifier(tmp_path, caplog):
    source = tiny("mask2former", 4)
    source.hf.save_pretrained(tmp_path / "m2f")
    with caplog.at_level("INFO"):
        loaded = build_model("mask2former", 7, pretrained=str(tmp_path / "m2f"), encoder_weights="imagenet")
    assert loaded.num_classes == 7 and loaded.hf.config.num_labels == 7
    new = loaded.load_report["new"]
    assert new and all("class_predictor" in k or "empty_weight" in k for k in new)
    before, after = source.hf.state_dict(), loaded.hf.state_dict()
    same = [k for k in after if k not in new]
    assert len(same) > 100 and all(torch.equal(before[k], after[k]) for k in same)
    assert "tensors new for 7 classes" in caplog.text and "encoder_weights=imagenet is not used" in caplog.text

    semantic = tiny("hf_upernet", 3)
    semantic.hf.save_pretrained(tmp_path / "upernet")
    reloaded = build_model("hf_upernet", 9, pretrained=str(tmp_path / "upernet"))
    assert all("classifier" in k for k in reloaded.load_report["new"])
    assert reloaded(torch.randn(1, 3, 64, 64)).shape == (1, 9, 64, 64)


def test_smp_whole_model_from_a_local_folder(tmp_path):
    import segmentation_models_pytorch as smp

    torch.manual_seed(0)
    net = smp.Segformer(encoder_name="mit_b0", encoder_weights=None, classes=3)
    net.save_pretrained(str(tmp_path / "segformer"))
    model = build_model("segformer", 6, pretrained=str(tmp_path / "segformer"))
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 6, 64, 64)
    enc_before, enc_after = net.encoder.state_dict(), model.encoder.state_dict()
    assert all(torch.equal(enc_before[k], enc_after[k]) for k in enc_before)
    rebuilt = build_model("segformer", 6, architecture=model.architecture)  # offline, from a checkpoint's record
    rebuilt.load_state_dict(model.state_dict())
    with pytest.raises(PipelineError, match="is a Segformer, not model 'unet'"):
        build_model("unet", 6, pretrained=str(tmp_path / "segformer"))


def test_pretrained_errors_are_clear_offline(tmp_path):
    with pytest.raises(PipelineError, match=r"pretrained=no-such-org/no-such-model: cannot load it.*pretrained=DIR"):
        build_model("mask2former", 5, pretrained="no-such-org/no-such-model")
    with pytest.raises(PipelineError, match="no such folder"):
        build_model("mask2former", 5, pretrained=str(tmp_path / "missing"))
    with pytest.raises(PipelineError, match="not available for 'tv_fcn_resnet50'"):
        build_model("tv_fcn_resnet50", 5, pretrained=str(tmp_path))
    with pytest.raises(Exception, match="unknown encoder 'swin-huge' for model 'mask2former'"):
        build_model("mask2former", 5, encoder="swin-huge")


def test_loss_must_be_the_models_own_for_mask_classification(demo_data_square, folds_file, tmp_path):
    cfg = small_train_config(demo_data_square, folds_file, tmp_path, model="mask2former", encoder="test-swin")
    with pytest.raises(ConfigError, match="trains with its own loss.*set loss=model"):
        train(cfg)
    cfg = small_train_config(demo_data_square, folds_file, tmp_path, loss="model")
    with pytest.raises(ConfigError, match="loss=model: model 'unet' has no loss of its own"):
        train(cfg)


def test_every_new_family_trains_predicts_and_joins_an_ensemble(demo_data_square, folds_file, tmp_path):
    common = dict(epochs=1, max_train_batches=2, max_val_batches=2, img_size=[64], batch_size=4, plot=False)
    source = tiny("mask2former", 3)  # a "segmentation-pretrained" model of another class count
    source.hf.save_pretrained(tmp_path / "m2f")
    members = {
        "m2f": dict(model="mask2former", pretrained=str(tmp_path / "m2f"), loss="model"),
        "maskformer": dict(model="maskformer", encoder="test-swin", loss="model"),
        "upernet": dict(model="hf_upernet", encoder="test-convnext"),
        "segformer": dict(model="hf_segformer", encoder="mit-test"),
        "unet": dict(model="unet", encoder="resnet18"),
    }
    runs = []
    for exp, kw in members.items():
        cfg = small_train_config(demo_data_square, folds_file, tmp_path / "runs", experiment=exp, **common, **kw)
        result = train(cfg)
        assert result.epochs_done == 1 and (result.run_dir / "oof" / "index.csv").is_file()
        runs.append(result.run_dir)
    # the checkpoint rebuilds the pretrained architecture offline
    model, _, ckpt = load_checkpoint_model(runs[0] / "best.pt")
    assert ckpt["architecture"]["family"] == "mask2former" and model.num_classes == len(ckpt["class_names"])
    for run_dir in runs:
        for split in ("val", "test"):
            out = predict(
                PredictConfig(
                    run_dir=str(run_dir),
                    data_dir=str(demo_data_square),
                    tta="hflip",
                    split=split,
                    num_workers=0,
                    progress=False,
                )
            )
            assert len(ProbReader(out).image_ids) > 0
    ensemble_stage.run(
        ensemble_stage.EnsembleConfig(
            runs=[str(r) for r in runs],
            data_dir=str(demo_data_square),
            tta="hflip",
            n_trials=3,
            out_dir=str(tmp_path / "ensembles"),
            name="mixed",
            progress=False,
        )
    )
    weights = (tmp_path / "ensembles" / "mixed" / "weights.yaml").read_text()
    assert all(name in weights for name in members), weights
