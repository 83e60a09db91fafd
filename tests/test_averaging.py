"""Weight averaging: top-k checkpoints (make average) and SWA, BatchNorm statistics recomputed."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import small_train_config
from torch import nn

from pipeline.average import AverageConfig
from pipeline.average import run as average
from pipeline.engine.averaging import average_states, recompute_bn
from pipeline.engine.checkpoint import read_checkpoint
from pipeline.inference.predictor import PredictConfig, predict
from pipeline.train import run


def test_average_states_is_the_mean_and_keeps_counters():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(9)}
    out = average_states([a, b])
    assert torch.equal(out["w"], torch.tensor([2.0, 4.0])) and int(out["n"]) == 3


def test_recompute_bn_gives_the_statistics_of_the_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4))
    batches = [(torch.randn(2, 3, 5, 5) * 3 + 1,) for _ in range(4)]
    model[1].running_mean.fill_(100.0)
    model.eval()  # the mode it was in is restored
    assert recompute_bn(model, batches, torch.device("cpu")) == 4
    with torch.no_grad():
        feats = torch.cat([model[0](b[0]) for b in batches])
    # the cumulative average of per-batch means equals the overall mean for equal batch sizes
    assert torch.allclose(model[1].running_mean, feats.mean((0, 2, 3)), atol=1e-5)
    assert model[1].momentum == 0.1 and not model.training


def test_recompute_bn_keeps_the_statistics_of_a_batchnorm_the_forward_never_reaches():
    class Net(nn.Module):  # a head run outside forward (Mask R-CNN's RoI heads run in its loss)
        def __init__(self):
            super().__init__()
            self.body, self.head = nn.BatchNorm2d(3), nn.BatchNorm2d(3)

        def forward(self, x):
            return self.body(x)

    model = Net()
    model.head.running_mean.fill_(7.0)
    batches = [(torch.randn(2, 3, 4, 4) + 2,) for _ in range(3)]
    assert recompute_bn(model, batches, torch.device("cpu")) == 3
    assert torch.equal(model.head.running_mean, torch.full((3,), 7.0)) and model.head.momentum == 0.1
    expected = torch.cat([b[0] for b in batches]).mean((0, 2, 3))
    assert torch.allclose(model.body.running_mean, expected, atol=1e-5) and model.body.momentum == 0.1


@pytest.fixture(scope="module")
def averaged_run(demo_data_square, folds_file, tmp_path_factory):
    runs = tmp_path_factory.mktemp("avg")
    cfg = small_train_config(
        demo_data_square,
        folds_file,
        runs,
        encoder="tu-mobilenetv3_small_050",
        experiment="a",
        epochs=3,
        augment="none",
        plot=False,
        save_oof=False,
        keep_top_k=3,
        swa_epochs=2,
        img_size=[64],
        threads=None,
    )
    return cfg, run(cfg)


@pytest.mark.slow
def test_top_k_and_swa(averaged_run, demo_data_square, tmp_path):
    cfg, result = averaged_run
    folder = cfg.folder()
    index = json.loads((folder.top / "index.json").read_text())
    assert [e["epoch"] for e in sorted(index, key=lambda e: e["epoch"])] == [0, 1, 2]
    assert [e["metric"] for e in index] == sorted((e["metric"] for e in index), reverse=True)
    weights = {e["epoch"]: read_checkpoint(folder.top / e["file"])["model"] for e in index}
    # SWA over the last two epochs: the mean of their weights, BatchNorm statistics recomputed
    swa = read_checkpoint(folder.checkpoint("swa"))
    mean12 = average_states([weights[1], weights[2]])
    conv = next(k for k, v in mean12.items() if v.is_floating_point() and v.dim() == 4)
    assert torch.allclose(swa["model"][conv], mean12[conv], atol=1e-6)
    bn = next(k for k in mean12 if k.endswith("running_mean"))
    assert not torch.allclose(swa["model"][bn], mean12[bn]) and swa["swa_epochs"] == 2
    # make average K=2: the two best epochs
    out = average(AverageConfig(run_dir=str(folder.path), k=2))
    avg = read_checkpoint(out)
    best2 = average_states([weights[e["epoch"]] for e in index[:2]])
    assert torch.allclose(avg["model"][conv], best2[conv], atol=1e-6)
    assert not torch.allclose(avg["model"][bn], best2[bn])
    assert [e["epoch"] for e in avg["averaged_from"]] == [e["epoch"] for e in index[:2]]
    # the predict stage takes it like any other checkpoint
    store = predict(
        PredictConfig(
            run_dir=str(folder.path),
            data_dir=str(demo_data_square),
            split="val",
            tta="none",
            checkpoint="averaged",
            out_dir=str(tmp_path / "s"),
            progress=False,
            num_workers=0,
        )
    )
    meta = json.loads((store / "meta.json").read_text())
    assert meta["miou_full_resolution"] == pytest.approx(avg["averaged_val_miou"], abs=1e-6)


def test_keep_top_k_evicts_and_average_refuses_missing_epochs(tmp_path):
    from pipeline.core.errors import PipelineError
    from pipeline.core.layout import RunFolder
    from pipeline.engine.checkpoint import CheckpointSaver

    saver = CheckpointSaver(RunFolder(tmp_path / "r"), keep_top_k=2)
    for epoch, metric in enumerate([0.1, 0.3, 0.2, 0.05]):
        state = {"model": {"w": torch.tensor(float(epoch))}, "config": {}, "epoch": epoch}
        saver.save(state, best=False, metric=metric, eval_weights=state["model"])
    assert [e["epoch"] for e in saver.top_index()] == [1, 2]
    assert sorted(p.name for p in (tmp_path / "r" / "top").iterdir()) == ["epoch0001.pt", "epoch0002.pt", "index.json"]
    with pytest.raises(PipelineError, match="keep_top_k"):
        average(AverageConfig(run_dir=str(tmp_path / "nope"), k=2))
