"""The training engine: sampling with persistent workers, exact resume with workers, the
checkpoint saver, hooks, runtime settings and the model-family contract."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import small_train_config
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pipeline.core.config import build_config, read_yaml_mapping
from pipeline.core.errors import ConfigError
from pipeline.core.layout import RunFolder
from pipeline.engine import runtime
from pipeline.engine.checkpoint import CheckpointSaver, read_checkpoint
from pipeline.engine.hooks import Hook
from pipeline.engine.loop import evaluate
from pipeline.engine.runtime import amp_dtype, configure_runtime, loader_options, precision_name, wants_grad_scaler
from pipeline.engine.sampling import EpochSeededDataset, EpochShuffleSampler
from pipeline.models.contract import model_loss, model_probabilities
from pipeline.train import TrainConfig, run


class RandomDraw(Dataset):
    """Each item is a draw of numpy's global generator: what an augmentation would see."""

    transform = None

    def __len__(self) -> int:
        return 6

    def __getitem__(self, idx: int):
        return torch.tensor([idx, np.random.rand()])


def draws(workers: int, epochs: int = 3) -> list[torch.Tensor]:
    sampler = EpochShuffleSampler(6, seed=7)
    loader = DataLoader(
        EpochSeededDataset(RandomDraw(), seed=7),
        batch_size=3,
        sampler=sampler,
        **loader_options(torch.device("cpu"), workers),
    )
    out = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        out.append(torch.cat(list(loader)))
    return out


def test_persistent_workers_see_the_epoch_through_the_sampled_indices():
    with_workers = draws(workers=1)
    in_process = draws(workers=0)
    for a, b in zip(with_workers, in_process, strict=False):
        assert torch.equal(a, b)  # the same order and the same augmentation draws
    # augmentations differ between epochs (a worker that never saw the epoch would repeat them)
    by_index = [e[e[:, 0].argsort()][:, 1] for e in with_workers]
    assert not torch.equal(by_index[0], by_index[1]) and not torch.equal(by_index[1], by_index[2])
    assert list(iter(EpochShuffleSampler(4, seed=1, shuffle=False)))[0] == (0, 0)


def tiny(data: Path, folds: Path, runs: Path, **kw) -> TrainConfig:
    base = dict(encoder="tu-mobilenetv3_small_050", epochs=3, augment="strong", plot=False, save_oof=False)
    return small_train_config(data, folds, runs, **{**base, **kw})


class Crash(Hook):
    """Dies after the checkpoint of epoch ``at`` is written, like a killed process."""

    def __init__(self, at: int):
        self.at = at

    def on_epoch_end(self, trainer, row) -> None:
        if row["epoch"] == self.at:
            raise KeyboardInterrupt


class Counter(Hook):
    def __init__(self):
        self.calls = {"start": 0, "step": 0, "epoch": [], "end": 0}

    def on_train_start(self, trainer):
        self.calls["start"] += 1

    def on_step_end(self, trainer):
        self.calls["step"] += 1

    def on_epoch_end(self, trainer, row):
        self.calls["epoch"].append(row["epoch"])

    def on_train_end(self, trainer):
        self.calls["end"] += 1


@pytest.mark.slow
def test_resume_is_exact_with_persistent_loader_workers(demo_data_square, folds_file, tmp_path):
    full = tiny(demo_data_square, folds_file, tmp_path / "a", num_workers=1)
    run(full)
    cut = tiny(demo_data_square, folds_file, tmp_path / "b", num_workers=1)
    with pytest.raises(KeyboardInterrupt):
        run(cut, [Crash(at=0)])
    assert read_checkpoint(cut.folder().last)["epoch"] == 0
    counter = Counter()
    result = run(cut, [counter])  # resumes from last.pt
    n_train = int((pd.read_csv(folds_file)["fold"] != 0).sum())
    assert counter.calls == {"start": 1, "step": 2 * (n_train // 8), "epoch": [1, 2], "end": 1}
    assert result.epochs_done == 3
    assert (cut.folder().metrics).read_text() == full.folder().metrics.read_text()
    # the augmentation changed between epochs: losses differ although the weights barely moved
    assert pd.read_csv(full.folder().metrics)["train_loss"].nunique() == 3


def test_checkpoint_saver_serializes_once_and_best_is_the_same_bytes(tmp_path, monkeypatch):
    folder = RunFolder(tmp_path / "run")
    saver = CheckpointSaver(folder)
    calls = []
    real = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: (calls.append(1), real(obj, f, *a, **k)))
    saver.save({"model": {"w": torch.ones(2)}, "config": {}, "epoch": 0}, best=True)
    assert len(calls) == 1 and folder.best.read_bytes() == folder.last.read_bytes()
    saver.save({"model": {"w": torch.zeros(2)}, "config": {}, "epoch": 1}, best=False)
    assert len(calls) == 2 and read_checkpoint(folder.best)["epoch"] == 0 and read_checkpoint(folder.last)["epoch"] == 1
    assert sorted(p.name for p in folder.path.iterdir()) == ["best.pt", "last.pt"]  # no temporary files left


def test_runtime_settings_are_harmless_on_a_cpu():
    before = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32)
    assert configure_runtime(torch.device("cpu"), cudnn_benchmark=True, tf32=True) == {
        "cudnn_benchmark": False,
        "tf32": False,
    }
    assert (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32) == before
    assert loader_options(torch.device("cpu"), 0) == {"num_workers": 0, "pin_memory": False}
    assert loader_options(torch.device("cpu"), 2, 4) == {
        "num_workers": 2,
        "pin_memory": False,
        "persistent_workers": True,
        "prefetch_factor": 4,
    }
    with pytest.raises(Exception, match="prefetch_factor"):
        build_config(TrainConfig, overrides={"prefetch_factor": 0})


@pytest.mark.parametrize("native", [True, False])
def test_cpu_mixed_precision_is_bf16_only_where_the_cpu_computes_it_natively(monkeypatch, native):
    monkeypatch.setattr(runtime, "cpu_bf16_native", lambda: native)
    cpu = torch.device("cpu")
    expected = torch.bfloat16 if native else None
    assert amp_dtype("auto", cpu) is expected and amp_dtype("bf16", cpu) is expected
    assert amp_dtype("fp16", cpu) is None and amp_dtype("off", cpu) is None
    with pytest.raises(Exception, match="amp: unknown 'half'"):
        amp_dtype("half", cpu)


@pytest.mark.parametrize(
    "capability, expected",
    [((7, 0), torch.float16), ((7, 5), torch.float16), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)],
)
def test_cuda_mixed_precision_is_bf16_only_where_the_gpu_computes_it_natively(monkeypatch, capability, expected):
    """V100 (7.0) and T4 (7.5) train in fp16 with the gradient scaler, A100 (8.0) and H100 (9.0) in bf16,
    although torch.cuda.is_bf16_supported() answers True on all four (through emulation below 8.0)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    gpu = torch.device("cuda", 0)
    dtype = amp_dtype("auto", gpu)
    assert dtype is expected and wants_grad_scaler(dtype) == (expected is torch.float16)
    assert precision_name(dtype) == ("bf16" if expected is torch.bfloat16 else "fp16 with the gradient scaler")
    assert amp_dtype("bf16", gpu) is torch.bfloat16 and amp_dtype("fp16", gpu) is torch.float16  # forced
    assert amp_dtype("off", gpu) is None and precision_name(None) == "fp32" and not wants_grad_scaler(None)


def test_a_bf16_run_on_a_cpu_validates_in_the_precision_it_trained_in(
    demo_data_square, folds_file, tmp_path, monkeypatch
):
    monkeypatch.setattr(runtime, "cpu_bf16_native", lambda: True)  # bf16 autocast also runs (emulated) elsewhere
    cfg = tiny(demo_data_square, folds_file, tmp_path, epochs=2, amp="auto", augment="none")
    result = run(cfg)
    metrics = pd.read_csv(cfg.folder().metrics)
    assert np.isfinite(metrics["train_loss"]).all() and metrics["train_loss"].iloc[-1] < metrics["train_loss"].iloc[0]
    assert read_yaml_mapping(cfg.folder().config)["precision"] == "bf16"  # the run records what amp resolved to
    from pipeline.data import MaskCache, SegmentationDataset, ValDataset, collate, load_coco
    from pipeline.engine.checkpoint import load_checkpoint_model

    model, _, ckpt = load_checkpoint_model(cfg.folder().best)
    coco = load_coco(demo_data_square)
    table = pd.read_csv(folds_file)
    ids = table.loc[table.fold == 0, "image_id"].tolist()
    ds = ValDataset(SegmentationDataset(coco, ids, None, MaskCache(coco, tmp_path / "cache")), (64, 64))
    loader = DataLoader(ds, batch_size=4, collate_fn=collate)
    from pipeline.evaluation.metrics import mean_iou

    bf16 = mean_iou(evaluate(model, loader, coco.num_classes, torch.device("cpu"), torch.bfloat16))
    assert ckpt["best_metric"] == pytest.approx(bf16, abs=1e-9) == pytest.approx(result.best_miou, abs=1e-9)
    # the float32 parameters are kept; only the computation is bf16
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_loss_options_reach_the_loss_terms_that_take_them(demo_data_square, folds_file, tmp_path):
    from pipeline.engine.trainer import Trainer

    trainer = Trainer(tiny(demo_data_square, folds_file, tmp_path, loss="ce+dice", loss_options={"classes": "present"}))
    assert trainer.criterion.parts["dice"].classes == "present"
    assert (
        Trainer(tiny(demo_data_square, folds_file, tmp_path, loss="ce+dice")).criterion.parts["dice"].classes == "all"
    )
    with pytest.raises(Exception, match="gamma"):
        Trainer(tiny(demo_data_square, folds_file, tmp_path, loss="ce+dice", loss_options={"gamma": 2}))


class OwnHead(nn.Module):
    """A family with its own outputs, loss and probabilities (as mask classification has)."""

    def __init__(self, k: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(3, k, 1)

    def forward(self, x):
        return {"scores": self.conv(x)}

    def compute_loss(self, outputs, masks):
        return nn.functional.cross_entropy(outputs["scores"], masks, ignore_index=255) * 0 + 7.0

    def to_probabilities(self, outputs):
        return torch.nn.functional.one_hot(torch.zeros_like(outputs["scores"][:, 0], dtype=torch.long), 3).permute(
            0, 3, 1, 2
        )


def test_a_family_with_its_own_loss_and_head_goes_through_the_contract():
    model = OwnHead()
    x, masks = torch.randn(2, 3, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long)
    assert model_loss(model, model(x), masks, criterion=None).item() == 7.0
    probs = model_probabilities(model, model(x))
    assert probs.dtype == torch.float32 and probs.shape == (2, 3, 4, 4) and torch.all(probs[:, 0] == 1)
    # the plain logits family uses the criterion and softmax
    plain = nn.Conv2d(3, 3, 1)
    logits = plain(x)
    assert torch.allclose(model_probabilities(plain, logits), logits.softmax(1))
    crit = nn.CrossEntropyLoss()
    assert model_loss(plain, logits, masks, crit).item() == pytest.approx(crit(logits, masks).item())
    # evaluation scores the family's own probabilities: everything predicted as class 0
    loader = [(x, torch.tensor([[[0, 1], [1, 1]]]).repeat(2, 2, 2), [{}, {}])]
    cm = evaluate(model, loader, 3, torch.device("cpu"), None)
    assert cm[:, 1:].sum() == 0 and cm[:, 0].sum() == 32


def fake_clock(monkeypatch, steps: list[float]) -> None:
    """The time budget's clock advances by the next of ``steps`` at each reading: once at the train
    start, then once at each epoch's end."""
    import pipeline.engine.hooks as hooks_mod

    ticks, clock = iter(steps), {"t": 1000.0}

    def monotonic() -> float:
        clock["t"] += next(ticks)
        return clock["t"]

    monkeypatch.setattr(hooks_mod.time, "monotonic", monotonic)


def test_time_budget_shortens_the_run_and_ends_the_schedule_on_time(
    demo_data_square, folds_file, tmp_path, monkeypatch
):
    fake_clock(monkeypatch, [10.0] * 20)  # every epoch "takes" 10 s
    cfg = tiny(
        demo_data_square, folds_file, tmp_path, epochs=6, time_budget=25, augment="none", lr=1e-3, min_lr_ratio=0.1
    )
    result = run(cfg)
    metrics = pd.read_csv(cfg.folder().metrics)
    # 10 s per epoch and 25 s: after epoch 0 only two epochs fit, so the run ends after epoch 1 ...
    assert list(metrics["epoch"]) == [0, 1] and result.epochs_done == 2
    # ... validated at its new last epoch, with the cosine schedule ended at min_lr_ratio x lr
    assert not metrics["val_miou"].isna().any()
    assert metrics["lr"].iloc[-1] == pytest.approx(1e-4)
    assert read_checkpoint(cfg.folder().last)["time_budget"] == {"end_epoch": 2}
    with pytest.raises(Exception, match="time_budget must be positive"):
        tiny(demo_data_square, folds_file, tmp_path, time_budget=0)


def test_time_budget_gives_back_the_time_of_a_slow_start(demo_data_square, folds_file, tmp_path, monkeypatch):
    fake_clock(monkeypatch, [0.0, 30.0] + [10.0] * 20)  # epoch 0 takes 30 s, every later one 10 s
    cfg = tiny(
        demo_data_square, folds_file, tmp_path, epochs=8, time_budget=75, augment="none", lr=1e-3, min_lr_ratio=0.1
    )
    result = run(cfg)
    metrics = pd.read_csv(cfg.folder().metrics)
    # after epoch 0 (30 s, 45 s left) only 2 epochs fit; after epoch 1 the pace is 10 s and 35 s are
    # left: 3 more fit with 5 s (half an epoch) in hand, so the run ends after epoch 4, not 1
    assert list(metrics["epoch"]) == [0, 1, 2, 3, 4] and result.epochs_done == 5
    # the schedule was re-sized with it: the epochs given back train above min_lr_ratio x lr, and it
    # ends there on the new last epoch
    assert metrics["lr"].iloc[-1] == pytest.approx(1e-4)
    assert metrics["lr"].iloc[2] > metrics["lr"].iloc[1]
    assert read_checkpoint(cfg.folder().last)["time_budget"] == {"end_epoch": 5}


def test_a_lengthened_run_keeps_a_quarter_of_an_epoch_in_hand(demo_data_square, folds_file, tmp_path, monkeypatch):
    fake_clock(monkeypatch, [0.0, 30.0] + [10.0] * 20)  # as above, with 2 s less: 33 s left after epoch 1
    cfg = tiny(demo_data_square, folds_file, tmp_path, epochs=8, time_budget=73, augment="none")
    result = run(cfg)
    # 3.3 epochs' time left: the third would leave 0.3 of an epoch (>= 0.25) in hand, so it is taken
    assert result.epochs_done == 5
    cfg = tiny(demo_data_square, folds_file, tmp_path / "b", epochs=8, time_budget=72, augment="none")
    fake_clock(monkeypatch, [0.0, 30.0] + [10.0] * 20)
    # 3.2 epochs' time left: a third would leave 0.2 in hand, too little
    assert run(cfg).epochs_done == 4


def record_input_sizes(monkeypatch) -> list[tuple[int, int]]:
    """The (H, W) of every training batch that reaches the forward pass."""
    import pipeline.engine.loop as loop_mod

    sizes: list[tuple[int, int]] = []
    inner = loop_mod.backward_batch

    def backward_batch(t, images, masks):
        assert masks.shape[-2:] == images.shape[-2:]
        sizes.append(tuple(images.shape[-2:]))
        return inner(t, images, masks)

    monkeypatch.setattr(loop_mod, "backward_batch", backward_batch)
    return sizes


def test_low_size_and_shrunk_batches():
    from pipeline.engine.loop import shrink_batch
    from pipeline.inference.tta import scaled_size as low_size  # the progressive phase's size

    assert low_size((192, 128), 0.5, 32) == (96, 64)
    assert low_size((100, 60), 0.5, 32) == (64, 32)  # rounded to the divisor, never below it
    assert low_size((64, 64), 1.0, 32) == (64, 64)
    images = torch.rand(2, 3, 8, 6)
    masks = torch.zeros(2, 8, 6, dtype=torch.long)
    masks[:, :4] = 3
    masks[:, 0, 0] = 255
    small, labels = shrink_batch(images, masks, (4, 3))
    assert small.shape == (2, 3, 4, 3) and labels.shape == (2, 4, 3) and labels.dtype == torch.long
    assert set(labels[:, :2].unique().tolist()) == {3, 255} and (labels[:, 2:] == 0).all()  # labels, never blends
    assert small.mean().item() == pytest.approx(images.mean().item(), abs=0.05)


def test_progressive_resizing_trains_the_first_epochs_small_and_the_budget_costs_them_apart(
    demo_data_square, folds_file, tmp_path, monkeypatch
):
    """Low-size epochs "take" 4 s and full-size ones 10 s, in a 60 s budget with half of the epochs
    planned small.  After epoch 1 the full size is projected from the low one by pixels (4 x 4 s):
    the run is sized to 6 epochs, 3 of them small.  Once full-size epochs are measured (10 s) it is
    lengthened to 7, and the phase boundary stays where it was: epochs 0-2 small, 3-6 full."""
    sizes = record_input_sizes(monkeypatch)
    fake_clock(monkeypatch, [0.0, 4.0, 4.0, 4.0] + [10.0] * 20)
    cfg = tiny(demo_data_square, folds_file, tmp_path, epochs=10, time_budget=60, augment="none", progressive=0.5)
    result = run(cfg)
    assert result.epochs_done == 7
    full = tuple(read_checkpoint(cfg.folder().last)["img_size"])
    per_epoch = len(sizes) // 7
    by_epoch = [sizes[e * per_epoch] for e in range(7)]
    assert by_epoch == [(full[0] // 2, full[1] // 2)] * 3 + [full] * 4
    assert len(set(sizes[: 3 * per_epoch])) == 1 and len(set(sizes[3 * per_epoch :])) == 1
    ckpt = read_checkpoint(cfg.folder().last)
    assert ckpt["low_until"] == 3 and ckpt["time_budget"] == {"end_epoch": 7}
    with pytest.raises(ConfigError, match="progressive must be in"):
        tiny(demo_data_square, folds_file, tmp_path, progressive=1.0)


class _Step:
    """The parts of a Trainer that ``backward_batch`` uses, around a model without BatchNorm."""

    def __init__(self, model: nn.Module, oom_above: int | None = None, error=None) -> None:
        self.model = self.net = model
        self.device = torch.device("cpu")
        self.dtype = None
        self.criterion = nn.CrossEntropyLoss()
        self.cfg = type("Cfg", (), {"accum_steps": 2})()
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        self.scaler = torch.amp.GradScaler("cpu", enabled=False)
        self.micro_batch = None
        self.channels_last = False
        self.oom_above = oom_above
        self.error = error or (lambda: torch.OutOfMemoryError("CUDA out of memory (simulated)"))
        self.calls: list[int] = []
        if oom_above is not None:
            inner = model.forward

            def forward(x):  # what CUDA does when a batch does not fit
                self.calls.append(x.shape[0])
                if x.shape[0] > self.oom_above:
                    raise self.error()
                return inner(x)

            model.forward = forward


# what CUDA raises when a batch does not fit, and the message of a kernel refusing a tensor past 2**31 elements
# (seen on an H200 at batch 296, 512 x 512, channels_last)
TOO_LARGE = {
    "out of memory": lambda: torch.OutOfMemoryError("CUDA out of memory (simulated)"),
    "a kernel's 32-bit index limit": lambda: RuntimeError(
        "upsample_nearest_nhwc only supports grad_output tensors with less than INT_MAX elements, "
        "but got [296, 32, 512, 512]"
    ),
}


@pytest.mark.parametrize("why", sorted(TOO_LARGE))
def test_a_batch_too_large_halves_the_micro_batch_and_keeps_the_gradient(caplog, why):
    from pipeline.engine.loop import backward_batch

    torch.manual_seed(0)
    images, masks = torch.randn(6, 3, 5, 7), torch.randint(0, 4, (6, 5, 7))
    reference = nn.Conv2d(3, 4, 3, padding=1)
    whole = _Step(reference)
    loss_whole = backward_batch(whole, images, masks)
    grads_whole = [p.grad.clone() for p in reference.parameters()]

    model = nn.Conv2d(3, 4, 3, padding=1)
    model.load_state_dict(reference.state_dict())
    for p in model.parameters():  # a gradient left from an earlier batch of the window
        p.grad = torch.ones_like(p)
    step = _Step(model, oom_above=2, error=TOO_LARGE[why])
    with caplog.at_level("WARNING"):
        loss = backward_batch(step, images, masks)
    assert f"{why} with micro-batches of 6 images: now 3" in caplog.text
    # 6 failed, then 3 failed, then three micro-batches of 2 (the last one's size is what was asked)
    assert step.calls == [6, 3, 2, 2, 2] and step.micro_batch == 2
    assert "now 2 (gradient accumulation x6, effective batch 12 unchanged)" in caplog.text
    # the window's earlier gradient was dropped; this batch's gradient is the whole batch's
    for p, g in zip(model.parameters(), grads_whole, strict=True):
        assert torch.allclose(p.grad, g, atol=1e-6)
    assert loss.item() == pytest.approx(loss_whole.item(), rel=1e-5)
    # the next batch goes straight through in micro-batches of 2
    step.calls.clear()
    backward_batch(step, images, masks)
    assert step.calls == [2, 2, 2]


@pytest.mark.parametrize("why", sorted(TOO_LARGE))
def test_a_batch_too_large_at_one_image_is_a_clear_error(why):
    from pipeline.core.errors import PipelineError
    from pipeline.engine.loop import backward_batch

    step = _Step(nn.Conv2d(3, 4, 1), oom_above=0, error=TOO_LARGE[why])
    with pytest.raises(
        PipelineError, match=f"^{why} with one image per micro-batch at size \\(5, 7\\): lower img_size="
    ):
        backward_batch(step, torch.randn(4, 3, 5, 7), torch.zeros(4, 5, 7, dtype=torch.long))
    assert step.calls == [4, 2, 1]


# what an allocator's failure looks like when it reaches Python as a plain RuntimeError
ALLOCATOR_FAILURES = [
    "CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported at some other API call",
    "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
    "cuDNN error: CUDNN_STATUS_ALLOC_FAILED",
]


@pytest.mark.parametrize("message", ALLOCATOR_FAILURES)
def test_an_allocator_failure_raised_as_a_plain_runtime_error_halves_the_micro_batch(message):
    from pipeline.engine.loop import OUT_OF_MEMORY, backward_batch, too_large

    assert too_large(RuntimeError(message)) == OUT_OF_MEMORY
    step = _Step(nn.Conv2d(3, 4, 1), oom_above=2, error=lambda: RuntimeError(message))
    backward_batch(step, torch.randn(4, 3, 5, 7), torch.zeros(4, 5, 7, dtype=torch.long))
    assert step.calls == [4, 2, 2] and step.micro_batch == 2


def test_any_other_runtime_error_is_raised_as_it_is():
    from pipeline.engine.loop import backward_batch

    step = _Step(nn.Conv2d(3, 4, 1), oom_above=0, error=lambda: RuntimeError("cuDNN error: CUDNN_STATUS_BAD_PARAM"))
    with pytest.raises(RuntimeError, match="^cuDNN error: CUDNN_STATUS_BAD_PARAM$"):
        backward_batch(step, torch.randn(4, 3, 5, 7), torch.zeros(4, 5, 7, dtype=torch.long))
    assert step.calls == [4] and step.micro_batch is None


def test_a_run_survives_out_of_memory_with_the_same_number_of_steps(
    demo_data_square, folds_file, tmp_path, monkeypatch
):
    import pipeline.engine.loop as loop

    real = loop.model_loss

    def model_loss(model, outputs, masks, criterion):
        if masks.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(model, outputs, masks, criterion)

    monkeypatch.setattr(loop, "model_loss", model_loss)
    cfg = tiny(demo_data_square, folds_file, tmp_path, epochs=2, batch_size=4, max_train_batches=3, lr=1e-3)
    result = run(cfg)
    assert result.epochs_done == 2
    metrics = pd.read_csv(cfg.folder().metrics)
    assert np.isfinite(metrics["train_loss"]).all()
    # the scheduler stepped once per batch as planned: 3 steps an epoch, 2 epochs
    assert read_checkpoint(cfg.folder().last)["scheduler"]["last_epoch"] == 6


def test_inverse_sqrt_class_weights_come_from_the_training_pixels(demo_data_square, folds_file, tmp_path):
    from pipeline.engine.trainer import Trainer
    from pipeline.models.losses import frequency_class_weights

    trainer = Trainer(tiny(demo_data_square, folds_file, tmp_path, loss="ce+dice", class_weights="inverse_sqrt"))
    k = trainer.coco.num_classes
    counts = np.zeros(k, dtype=np.int64)
    for image_id in trainer.train_ids:  # this fold's training images only
        counts += np.bincount(trainer.cache.get(image_id).ravel(), minlength=k)[:k]
    weights = trainer.criterion.parts["ce"].weight.tolist()
    assert weights == pytest.approx(frequency_class_weights(counts))
    assert weights[0] == min(weights)  # Background, the most frequent class, weighs least
    assert trainer.criterion.parts["dice"].weight.tolist() == pytest.approx(weights)
    with pytest.raises(ConfigError, match="class_weights: unknown 'inverse'"):
        tiny(demo_data_square, folds_file, tmp_path, class_weights="inverse").validate()


def test_frequency_class_weights():
    from pipeline.models.losses import frequency_class_weights

    # frequencies 0.9, 0.09, 0.009, 0.001 (median 0.0495); a class without pixels gets 1
    w = frequency_class_weights([9000, 900, 90, 10, 0])
    assert w[4] == 1.0
    assert w[1] == pytest.approx((0.0495 / 0.09) ** 0.5) and w[2] == pytest.approx((0.0495 / 0.009) ** 0.5)
    assert w[0] == pytest.approx((0.0495 / 0.9) ** 0.5) and w[3] == pytest.approx((0.0495 / 0.001) ** 0.5)
    assert frequency_class_weights([10**9, 1])[1] == 10.0 and frequency_class_weights([0, 0]) == [1.0, 1.0]


def test_the_delayed_loss_check_returns_the_previous_read_and_a_direct_one_the_value():
    from pipeline.engine.loop import LossCheck

    total = torch.zeros((), dtype=torch.float64)
    delayed, direct = LossCheck(torch.device("cpu"), delayed=True), LossCheck(torch.device("cpu"))
    total += 6.0
    assert delayed.read(total, 3, 19) is None and direct.read(total, 3, 19) == (2.0, 19)
    total += float("nan")  # the copy taken at batch 19 keeps its value
    assert delayed.read(total, 4, 39) == (2.0, 19)
    value, at = delayed.read(total, 5, 59)
    assert math.isnan(value) and at == 39
