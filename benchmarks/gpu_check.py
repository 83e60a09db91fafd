"""The GPU proof in one prepared command: every CUDA path of the pipeline measured in about 6 minutes.

Sections, in order, each with its own time cap (``--cap NAME=SECONDS``; defaults in ``GPU_CAPS``).
A section checks its clock between items and stops adding them past its cap (``"truncated": true``,
``left_out``); a hard limit of 1.5x the cap + 30 s stops one that hangs (status ``stopped``); an
error is recorded in its section (status ``error``) and the run goes on.  The JSON is rewritten
atomically after every item and section, so a run stopped early still returns what it measured.

environment     torch, CUDA, cuDNN, the GPU and its memory, the versions (and places) of the packages
                the pipeline uses, and what the runtime picks (autocast dtype, channels_last, workers)
train           the pipeline's training step (``pipeline.engine.loop.train_one_epoch`` of a real
                ``Trainer``: the family's config, loss, optimizer, scheduler, EMA, micro-batching, loss
                checks) against a bare forward + loss + backward + clip + optimizer step of the same
                model, loss, optimizer, batch, precision and memory format; the batches (read and
                augmented by the pipeline's dataset) are on the device before timing, for both; median
                seconds per step of interleaved rounds after a warm-up; images/s both ways and their
                ratio (goal >= 0.9).  unet/resnet50 in every mode (bf16 | fp32 (TF32), channels_last
                on | off, torch.compile off | on; compiled modes last, each started only with 45 s of the
                cap left), upernet/tu-convnext_tiny and segformer/mit_b2 in bf16 + channels_last
loader          the training DataLoader alone (JPEG decode, mask from the cache, the family's
                augmentation, the workers the pipeline picks) in images/s, against the training step's
                (goal >= 1.5x, so it never starves the GPU)
inference       TTA sets none, hflip, d4, ms through ``TTAModel`` for each recipe: images/s and peak
                memory; ``SlidingWindow`` over images of twice the side (1024x1024)
device_profile  per recipe, the measured seconds per training step and per predicted image beside what
                the planner's probe (``pipeline.planning.probe.probe``) estimates on the same device: the
                figures a planner device profile reads (``PROFILE_FORMAT``)
memory          peak GPU memory of a training step per recipe, the largest batch that fits (a straight
                line through two batches, tried), and the training loop's out-of-memory fallback
                exercised once for real: the process held to its weights, optimizer state and 55% of one
                step's activations with ``torch.cuda.set_per_process_memory_fraction``
e2e             ``python3 -m pipeline.autopilot`` on generated contest-like data (512x512 JPEGs,
                11 classes, 400 train / 100 test) with a budget of 2 minutes: its plan, summary, score

On a lent GPU machine (its own ``python3``, no make, no venv: ``make gpu-wheels`` here first, and
``.whl/`` carried along; the script also installs it into /tmp/site itself when a module is missing)::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit; \\
        python3 benchmarks/gpu_check.py --out $OUT

``--only SECTION`` (repeatable) reruns parts and keeps the other sections of the JSON.  Without
CUDA the script stops with exit 2 unless ``--smoke``: every section on a CPU with tiny sizes (64x64,
batch 2, a few steps, unet on resnet18 for the matrix, torch.compile on it only and with the
``aot_eager`` backend, one torch thread, the budgeted run at 90 s on 24 + 6 images) in about
2-3 minutes: ``make gpu-check ARGS="--smoke"``.  Goals are judged on a GPU only (``report`` on a
CPU).  Output: ``reports/gpu_check.json`` (``--out DIR``: ``DIR/gpu_check.json``) and a closing table.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "benchmarks"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from results import Goal  # noqa: E402

log = logging.getLogger("gpu_check")

WHEELS = ROOT / ".whl"
SITE = Path(os.environ.get("GPU_CHECK_SITE", "/tmp/site"))
# module the pipeline imports -> the distribution that provides it (the environment section lists their versions)
NEEDED = {
    "torch": "torch",
    "torchvision": "torchvision",
    "segmentation_models_pytorch": "segmentation-models-pytorch",
    "timm": "timm",
    "transformers": "transformers",
    "albumentations": "albumentations",
    "cv2": "opencv-python-headless",
    "pycocotools": "pycocotools",
    "optuna": "optuna",
    "sqlalchemy": "sqlalchemy",
    "pydantic": "pydantic",
    "numpy": "numpy",
    "pandas": "pandas",
    "sklearn": "scikit-learn",
    "yaml": "pyyaml",
    "tqdm": "tqdm",
    "matplotlib": "matplotlib",
    "safetensors": "safetensors",
    "huggingface_hub": "huggingface-hub",
}
CLASSES = 11  # the contest's 10 categories and Background
TTA_SETS = ("none", "hflip", "d4", "ms")
STEP_GOAL = 0.9  # pipeline step throughput / bare step throughput
LOADER_GOAL = 1.5  # loader images/s / training step images/s
PROFILE_FORMAT = (
    "recipes: one entry per recipe name (pipeline.planning.probe.Recipe.name, <model>-<encoder>-<H>x<W>) with "
    "its model, encoder, size [H, W] and batch; step_s: measured seconds of one optimizer step of `batch` images "
    "through the training loop (train section, bf16 + channels_last, data on the device: the loop's overhead "
    "included, so no LOOP_OVERHEAD_FACTOR applies); image_s: measured seconds to predict one image, one view "
    "(inference section, TTA none); checkpoint_mb: one checkpoint (weights and AdamW moments); probe_step_s / "
    "probe_image_s: what pipeline.planning.probe.probe estimates on this device (its step with "
    "LOOP_OVERHEAD_FACTOR), for comparison. These are the figures a planner device profile reads in place of "
    "the probe's Throughput."
)


# --------------------------------------------------------------------------- packages


def missing_modules() -> list[str]:
    return [m for m in NEEDED if importlib.util.find_spec(m) is None]


def ensure_packages() -> None:
    """Install the carried wheels (``.whl/``) into ``SITE`` when a module is missing; stop naming any still missing."""
    missing = missing_modules()
    wheels = sorted(WHEELS.glob("*.whl")) if WHEELS.is_dir() else []
    if missing and wheels:
        log.info("missing %s: installing %d wheels from %s into %s", ", ".join(missing), len(wheels), WHEELS, SITE)
        pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
        pip += ["--no-cache-dir", "--upgrade", "--target", str(SITE), *map(str, wheels)]
        subprocess.run(pip, check=False)
        sys.path.insert(0, str(SITE))
        importlib.invalidate_caches()
        missing = missing_modules()
    if missing:
        names = ", ".join(f"{m} (pip package {NEEDED[m]})" for m in missing)
        raise SystemExit(
            f"gpu_check: missing Python packages: {names}. Run `make gpu-wheels` and carry .whl/ to this machine "
            "(the script installs it into /tmp/site), or install them."
        )


def child_env(threads: int | None = None) -> dict[str, str]:
    """The environment of the end-to-end run: the carried packages and the working tree importable, no hub."""
    paths = [str(SITE)] if SITE.is_dir() else []
    paths += [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths)), "HF_HUB_OFFLINE": "1"}
    return {**env, "OMP_NUM_THREADS": str(threads)} if threads else env


# --------------------------------------------------------------------------- settings, clock, report


@dataclass(frozen=True)
class Settings:
    """Sizes of one check: the GPU's (512x512, batch 8) or the CPU smoke run's (64x64, batch 2)."""

    smoke: bool
    size: tuple[int, int]
    batch: int
    warm_steps: int  # steps before timing (cuDNN autotuning, compilation)
    rounds: int  # timed rounds, pipeline and bare in turns; the median counts
    steps: int  # steps per round
    repeats: int  # timed inference calls per TTA set
    loader_batches: int
    n_train: int
    n_test: int
    budget: str  # the end-to-end run's
    matrix: tuple[str, str] = ("unet", "resnet50")
    others: tuple[tuple[str, str], ...] = (("upernet", "tu-convnext_tiny"), ("segformer", "mit_b2"))
    compile_backend: str = "inductor"  # the smoke run: aot_eager (Dynamo + AOTAutograd without code generation)
    threads: int | None = None  # torch CPU threads (the smoke run: 1, see settings())
    caps: dict[str, float] = field(default_factory=dict)

    @property
    def recipes(self) -> list[tuple[str, str]]:
        return [self.matrix, *self.others]


# device_profile: the check's three recipes, then each portfolio recipe of the device's tier that builds
# without a hub (the profile make plan reads)
GPU_CAPS = dict(environment=10, train=80, loader=15, inference=20, device_profile=45, memory=35, e2e=150)
# the smoke run's memory cap leaves room for three trainers and nine CPU steps on a slow shared runner (at 20 s
# the clock's 8 s reserve cut the third recipe there)
SMOKE_CAPS = dict(environment=10, train=60, loader=10, inference=20, device_profile=40, memory=45, e2e=120)


def settings(args: argparse.Namespace) -> Settings:
    if args.smoke:
        s = dict(smoke=True, size=(64, 64), batch=2, warm_steps=1, rounds=2, steps=2, repeats=2, loader_batches=4)
        s.update(n_train=24, n_test=6, budget="90s", matrix=("unet", "resnet18"), compile_backend="aot_eager")
        # one thread: on a shared CPU, OpenMP threads wait on each other at every barrier and slow
        # channels_last convolutions many times over (docs/measurements.md, "Speed")
        s.update(threads=args.threads or 1)
        caps = dict(SMOKE_CAPS)
    else:
        s = dict(smoke=False, size=(args.size, args.size), batch=args.batch, warm_steps=3, rounds=4, steps=8)
        s.update(repeats=5, loader_batches=60, n_train=400, n_test=100, budget=args.budget, threads=args.threads)
        caps = dict(GPU_CAPS)
    for item in args.cap:
        name, _, seconds = item.partition("=")
        if name not in SECTIONS or not seconds:
            raise SystemExit(f"--cap {item!r}: expected SECTION=SECONDS, SECTION one of {', '.join(SECTIONS)}")
        caps[name] = float(seconds)
    return Settings(**s, caps=caps)


class Clock:
    """A section's time cap: ``over(reserve)`` once fewer than ``reserve`` seconds are left."""

    def __init__(self, cap_s: float):
        self.cap_s, self.started = float(cap_s), time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def over(self, reserve: float = 0.0) -> bool:
        return self.elapsed() > self.cap_s - reserve


class SectionTimeout(Exception):
    """A section ran past its hard limit."""


@contextlib.contextmanager
def hard_limit(seconds: float) -> Iterator[None]:
    """Interrupt the block (SIGALRM, main thread) after ``seconds``."""

    def _stop(signum, frame):
        raise SectionTimeout(f"interrupted after {seconds:.0f} s (the section's hard limit)")

    previous = signal.signal(signal.SIGALRM, _stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class Check:
    """What the sections share: settings, device, the generated data, the report and where it goes."""

    s: Settings
    device: torch.device
    work: Path
    path: Path
    report: dict[str, Any]
    data: Path | None = None
    folds: Path | None = None

    def save(self) -> None:
        from pipeline.core.io import atomic_write_text

        self.report["goals"] = [dict(asdict(g), status=g.status(str(self.device))) for g in goals(self.report)]
        atomic_write_text(self.path, json.dumps(self.report, indent=2, default=str) + "\n")

    def section(self, name: str) -> dict[str, Any]:
        return self.report["sections"].get(name) or {}

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_mb(self) -> float | None:
        """Peak GPU memory allocated since ``reset_peak`` (None on a CPU)."""
        return torch.cuda.max_memory_allocated(self.device) / 2**20 if self.device.type == "cuda" else None

    def free(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def prepare_data(c: Check) -> None:
    """Contest-like demo data (JPEGs, 11 classes) and its 5 folds, once per work folder."""
    from pipeline import folds as folds_stage
    from pipeline.demo import DemoConfig
    from pipeline.demo import run as make_demo

    started = time.monotonic()
    h, w = c.s.size
    data = c.work / "data"
    if not (data / "test.json").is_file():
        make_demo(DemoConfig(out_dir=str(data), n_train=c.s.n_train, n_test=c.s.n_test, height=h, width=w, seed=0))
    folds = c.work / "folds"
    if not (folds / "folds.csv").is_file():
        cfg = folds_stage.FoldsConfig(
            data_dir=str(data), out_dir=str(folds), k=5, cache_dir=str(c.work / "cache"), pixel_stats=False
        )
        folds_stage.run(cfg)
    c.data, c.folds = data, folds / "folds.csv"
    c.report["data"] = dict(
        dir=str(data), n_train=c.s.n_train, n_test=c.s.n_test, size=[h, w], seconds=round(time.monotonic() - started, 2)
    )


# --------------------------------------------------------------------------- environment


def section_environment(c: Check, rec: dict, clock: Clock) -> None:
    from pipeline.engine.runtime import amp_dtype, channels_last_pays, default_workers

    rec.update(
        python=platform.python_version(),
        executable=sys.executable,
        platform=platform.platform(),
        cpus=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        device=str(c.device),
        gpu=None,
    )
    if c.device.type == "cuda":
        props = torch.cuda.get_device_properties(c.device)
        rec["gpu"] = dict(
            name=props.name,
            memory_gb=round(props.total_memory / 2**30, 2),
            capability=f"{props.major}.{props.minor}",
            multiprocessors=props.multi_processor_count,
            bf16=torch.cuda.is_bf16_supported(),
        )
    packages = {}
    for module, dist in NEEDED.items():
        spec = importlib.util.find_spec(module)
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            version = None
        packages[dist] = dict(version=version, where=str(Path(spec.origin).parent.parent) if spec else None)
    rec["packages"] = packages
    dtype = amp_dtype("auto", c.device)
    rec["runtime"] = dict(
        amp_auto=str(dtype).replace("torch.", "") if dtype else "off",
        channels_last=channels_last_pays(c.device),
        loader_workers=default_workers(c.device),
        cudnn_benchmark=torch.backends.cudnn.benchmark,
        tf32=torch.backends.cuda.matmul.allow_tf32,
    )


# --------------------------------------------------------------------------- training step


@dataclass(frozen=True)
class Mode:
    model: str
    encoder: str
    amp: str  # bf16 | off
    channels_last: bool
    compile: bool = False

    @property
    def label(self) -> str:
        parts = ["bf16" if self.amp == "bf16" else "fp32"] + (["channels_last"] if self.channels_last else [])
        return f"{self.model}/{self.encoder} " + " + ".join(parts + (["compile"] if self.compile else []))


def train_modes(s: Settings) -> list[Mode]:
    """The default mode first, then the rest of the matrix, the other recipes, and compilation last (slowest)."""
    m, e = s.matrix
    plain = [Mode(m, e, amp, cl) for amp, cl in (("bf16", True), ("bf16", False), ("off", True), ("off", False))]
    others = [Mode(om, oe, "bf16", True) for om, oe in s.others]
    compiled = [Mode(m, e, x.amp, x.channels_last, True) for x in plain]
    return [*plain, *others, *(compiled[:1] if s.smoke else compiled)]


def train_config(c: Check, model: str, encoder: str, **overrides):
    """The family's own config (pipeline/configs/<model>.yaml) on the generated data, random weights."""
    from pipeline.core.config import build_config
    from pipeline.engine.train_config import TrainConfig

    family = ROOT / "pipeline" / "configs" / f"{model}.yaml"
    values = dict(
        data_dir=str(c.data),
        folds_file=str(c.folds),
        runs_dir=str(c.work / "runs"),
        cache_dir=str(c.work / "cache"),
        model=model,
        encoder=encoder,
        encoder_weights=None,
        img_size=list(c.s.size),
        batch_size=c.s.batch,
        epochs=1000,  # the schedule never ends within the check
        device=str(c.device),
        save_oof=False,
        plot=False,
        progress=False,
        experiment=f"check-{model}-{encoder}",
        resume=False,
    )
    values.update(overrides)
    return build_config(TrainConfig, family if family.is_file() else None, values)


def device_batches(t, n: int = 2) -> list[tuple]:
    """``n`` batches read and augmented by the trainer's own dataset, moved to the device once."""
    from pipeline.data import collate

    ds, b = t.train_loader.dataset, t.cfg.batch_size
    out = []
    for k in range(n):
        batch = collate([ds[(0, (k * b + i) % len(ds))] for i in range(b)])
        if hasattr(t.train_loader, "to_device"):  # the image cache's uint8 batches, normalised on the device
            out.append(t.train_loader.to_device(batch))
        else:
            images, masks, metas = batch
            out.append((images.to(t.device), masks.to(t.device), metas))
    return out


def pipeline_step(t, batches: list[tuple], steps: int, epoch: int) -> float:
    """Seconds per step of ``train_one_epoch`` over ``steps`` batches already on the device."""
    from pipeline.engine.loop import train_one_epoch

    t.train_loader = [batches[i % len(batches)] for i in range(steps)]
    t.batches = steps
    _, seconds = train_one_epoch(t, epoch)  # ends with the loss read back: the device has finished
    return seconds / steps


def bare_step(t, batches: list[tuple], steps: int, sync: Callable[[], None]) -> float:
    """Seconds per step of forward, loss, backward, clip and optimizer step of the trainer's model, loss,
    optimizer, precision and memory format; no loop around it."""
    from pipeline.models.contract import model_loss

    t.net.train()
    sync()
    started = time.perf_counter()
    loss = None
    for i in range(steps):
        x, y = batches[i % len(batches)]
        with torch.autocast(t.device.type, dtype=t.dtype, enabled=t.dtype is not None):
            out = t.net(x)
            loss = model_loss(t.model, out.contiguous() if t.channels_last else out, y, t.criterion)
        t.scaler.scale(loss).backward()
        if t.cfg.grad_clip:
            t.scaler.unscale_(t.optimizer)
            torch.nn.utils.clip_grad_norm_(t.model.parameters(), t.cfg.grad_clip)
        t.scaler.step(t.optimizer)
        t.scaler.update()
        t.optimizer.zero_grad(set_to_none=True)
    float(loss.detach())
    sync()
    return (time.perf_counter() - started) / steps


def build_trainer(c: Check, mode: Mode, **overrides):
    from pipeline.engine.trainer import Trainer

    inductor = mode.compile and c.s.compile_backend == "inductor"
    cfg = train_config(
        c, mode.model, mode.encoder, amp=mode.amp, channels_last=mode.channels_last, compile=inductor, **overrides
    )
    t = Trainer(cfg)
    if mode.compile and not inductor:
        t.net = torch.compile(t.net, backend=c.s.compile_backend)
    return t


def measure_mode(c: Check, mode: Mode) -> dict[str, Any]:
    """Pipeline against bare step of one mode: warm-up, then interleaved timed rounds; medians."""
    t = build_trainer(c, mode)
    batches = device_batches(t)
    memory = torch.channels_last if t.channels_last else torch.contiguous_format
    bare = [(x.contiguous(memory_format=memory), y) for x, y, _ in batches]
    c.reset_peak()
    pipeline_step(t, batches, c.s.warm_steps, 0)
    bare_step(t, bare, c.s.warm_steps, c.sync)
    pipe_s, bare_s = [], []
    for r in range(c.s.rounds):
        pipe_s.append(pipeline_step(t, batches, c.s.steps, r + 1))
        bare_s.append(bare_step(t, bare, c.s.steps, c.sync))
    p, b = statistics.median(pipe_s), statistics.median(bare_s)
    record = dict(
        label=mode.label,
        model=mode.model,
        encoder=mode.encoder,
        amp=str(t.dtype).replace("torch.", "") if t.dtype else "off",
        channels_last=t.channels_last,
        compile=mode.compile,
        compile_backend=c.s.compile_backend if mode.compile else None,
        loss=t.cfg.loss,
        ema=t.cfg.ema,
        pipeline_step_s=p,
        bare_step_s=b,
        pipeline_images_per_s=c.s.batch / p,
        bare_images_per_s=c.s.batch / b,
        ratio=b / p,
        peak_mb=c.peak_mb(),
    )
    del t, batches, bare
    if mode.compile:
        torch._dynamo.reset()
    c.free()
    return record


COMPILE_RESERVE_S = 45.0  # a compiled mode starts only with this much of the cap left (compilation takes most)


def section_train(c: Check, rec: dict, clock: Clock) -> None:
    modes = train_modes(c.s)
    rec.update(size=list(c.s.size), batch=c.s.batch, classes=CLASSES, rounds=c.s.rounds, steps=c.s.steps)
    rec.update(warm_steps=c.s.warm_steps, items=[], errors=[], truncated=False)
    rec["tf32"] = torch.backends.cuda.matmul.allow_tf32  # fp32 modes compute their products in TF32 when set
    for i, mode in enumerate(modes):
        if clock.over(reserve=COMPILE_RESERVE_S if mode.compile and not c.s.smoke else 0.0):
            rec.update(truncated=True, left_out=[m.label for m in modes[i:]])
            break
        log.info("train: %s", mode.label)
        try:
            item = measure_mode(c, mode)
        except SectionTimeout:
            raise
        except Exception as exc:  # one mode failing (a compile error) does not hide the others
            log.exception("train: %s failed", mode.label)
            rec["errors"].append(dict(label=mode.label, error=f"{type(exc).__name__}: {exc}"))
            c.free()
            continue
        rec["items"].append(item)
        log.info(
            "train: %s: pipeline %.1f img/s, bare %.1f img/s, ratio %.3f",
            mode.label,
            item["pipeline_images_per_s"],
            item["bare_images_per_s"],
            item["ratio"],
        )
        c.save()


# --------------------------------------------------------------------------- loader


def section_loader(c: Check, rec: dict, clock: Clock) -> None:
    from pipeline.engine.trainer import Trainer

    m, e = c.s.matrix
    t = Trainer(train_config(c, m, e))
    loader = t.train_loader
    torch_loader = getattr(loader, "loader", loader)  # under the image cache's device normalisation
    rec.update(workers=t.workers, batch=c.s.batch, augment=t.cfg.augment, size=list(c.s.size))
    rec.update(pin_memory=torch_loader.pin_memory, prefetch_factor=torch_loader.prefetch_factor, truncated=False)
    rec.update(image_cache=t.images is not None)
    epoch, batches = 0, iter(loader)
    next(batches)  # warm-up: the workers start
    images, started = 0, time.perf_counter()
    for _ in range(c.s.loader_batches):
        if clock.over():
            rec["truncated"] = True
            break
        try:
            x, _, _ = next(batches)
        except StopIteration:
            epoch += 1
            t.sampler.set_epoch(epoch)
            batches = iter(loader)
            x, _, _ = next(batches)
        images += x.shape[0]
    seconds = time.perf_counter() - started
    rec.update(images=images, seconds_reading=seconds, images_per_s=images / seconds)
    step = default_items(c).get(c.s.matrix)
    rec["step_images_per_s"] = step["pipeline_images_per_s"] if step else None
    rec["step_label"] = step["label"] if step else None
    rec["ratio"] = rec["images_per_s"] / step["pipeline_images_per_s"] if step else None
    del batches, loader, t


# --------------------------------------------------------------------------- inference


def timed(fn: Callable[[], Any], repeats: int, sync: Callable[[], None]) -> float:
    """Median seconds of ``fn`` after one warm-up call."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def eval_model(c: Check, model_name: str, encoder: str):
    from pipeline.engine.runtime import channels_last_pays
    from pipeline.models import build_model

    torch.manual_seed(0)
    model = build_model(model_name, CLASSES, encoder=encoder, encoder_weights=None).to(c.device).eval()
    return model.to(memory_format=torch.channels_last) if channels_last_pays(c.device) else model


def measure_tta(c: Check, model, name: str, dtype) -> dict[str, Any]:
    from pipeline.inference.tta import TTAModel, auto_max_batch

    tta = TTAModel(model, name, max_batch=auto_max_batch(c.device, c.s.batch), dtype=dtype).eval()
    x = torch.randn(c.s.batch, 3, *c.s.size, device=c.device)
    c.reset_peak()
    with torch.inference_mode():
        seconds = timed(lambda: tta(x), c.s.repeats, c.sync)
    return dict(tta=name, views=len(tta.views), images_per_s=c.s.batch / seconds, peak_mb=c.peak_mb())


def measure_sliding(c: Check, model, dtype) -> dict[str, Any]:
    from pipeline.inference.sliding import SlidingWindow, count_windows
    from pipeline.inference.tta import TTAModel, auto_max_batch

    size = (2 * c.s.size[0], 2 * c.s.size[1])
    tta = TTAModel(model, "none", max_batch=auto_max_batch(c.device, c.s.batch), dtype=dtype).eval()
    slide = SlidingWindow(tta, c.s.size, overlap=0.5, max_batch=c.s.batch).eval()
    n = max(1, c.s.batch // 2)
    x = torch.randn(n, 3, *size, device=c.device)
    c.reset_peak()
    with torch.inference_mode():
        seconds = timed(lambda: slide(x), c.s.repeats, c.sync)
    windows = count_windows(size, slide.window, slide.stride)
    return dict(
        size=list(size),
        window=list(slide.window),
        windows_per_image=windows,
        images=n,
        images_per_s=n / seconds,
        peak_mb=c.peak_mb(),
    )


def section_inference(c: Check, rec: dict, clock: Clock) -> None:
    from pipeline.engine.runtime import amp_dtype

    dtype = amp_dtype("auto", c.device)
    rec.update(batch=c.s.batch, size=list(c.s.size), amp=str(dtype).replace("torch.", "") if dtype else "off")
    rec.update(items=[], sliding=None, truncated=False)
    for i, (m, e) in enumerate(c.s.recipes):
        model = eval_model(c, m, e)
        for name in TTA_SETS:
            if clock.over():
                rec["truncated"] = True
                break
            item = dict(model=m, encoder=e, **measure_tta(c, model, name, dtype))
            rec["items"].append(item)
            log.info("inference: %s/%s tta %s: %.1f img/s", m, e, name, item["images_per_s"])
        if i == 0 and not clock.over():
            rec["sliding"] = dict(model=m, encoder=e, **measure_sliding(c, model, dtype))
            log.info(
                "inference: sliding windows on %s: %.2f img/s", rec["sliding"]["size"], rec["sliding"]["images_per_s"]
            )
        del model
        c.free()
        c.save()
        if rec["truncated"]:
            break


# --------------------------------------------------------------------------- device profile


def default_items(c: Check) -> dict[tuple[str, str], dict[str, Any]]:
    """Training items in the pipeline's defaults (amp=auto, channels_last, no compile), by (model, encoder)."""
    from pipeline.engine.runtime import amp_dtype

    dtype = amp_dtype("auto", c.device)
    auto = str(dtype).replace("torch.", "") if dtype else "off"
    return {
        (i["model"], i["encoder"]): i
        for i in c.section("train").get("items", [])
        if i["channels_last"] and not i["compile"] and i["amp"] == auto
    }


def section_device_profile(c: Check, rec: dict, clock: Clock) -> None:
    from pipeline.planning.probe import Recipe, probe

    steps = default_items(c)
    images = {(i["model"], i["encoder"]): i for i in c.section("inference").get("items", []) if i["tta"] == "none"}
    rec.update(format=PROFILE_FORMAT, device=str(c.device), recipes={}, truncated=False)
    gpu = c.section("environment").get("gpu")
    rec["device_name"] = gpu["name"] if gpu else platform.processor() or "cpu"
    for m, e in c.s.recipes:
        if clock.over():
            rec["truncated"] = True
            break
        recipe = Recipe(m, e, tuple(c.s.size), c.s.batch)
        estimate = probe(recipe, CLASSES, c.device)
        step, image = steps.get((m, e)), images.get((m, e))
        entry = dict(model=m, encoder=e, size=list(c.s.size), batch=c.s.batch)
        entry.update(
            step_s=step["pipeline_step_s"] if step else None,
            image_s=1.0 / image["images_per_s"] if image else None,
            checkpoint_mb=estimate.checkpoint_mb,
            probe_step_s=estimate.step_s,
            probe_image_s=estimate.image_s,
        )
        rec["recipes"][recipe.name] = entry
        c.free()
    if not rec["truncated"]:
        rec["profile"] = str(write_profile(c, rec, clock))


def write_profile(c: Check, rec: dict, clock: Clock) -> Path:
    """A device profile of this device as ``make plan DEVICE_PROFILE=`` reads it (``device_profile.yaml``
    beside the JSON): each portfolio recipe of the device's tier that builds without a hub (a whole model
    from its architecture preset), timed by the probe at the check's size and batch; the others are listed
    in ``skipped`` and left to the profile's estimate."""
    import datetime
    import os
    from dataclasses import replace

    from pipeline.engine.runtime import amp_dtype, precision_name
    from pipeline.planning.devices import DeviceProfile, Measured, save_device_profile
    from pipeline.planning.measure import probe_recipe
    from pipeline.planning.portfolio import read_portfolio
    from pipeline.planning.probe import probe

    kind = "gpu" if c.device.type == "cuda" else "cpu"
    measured: dict[str, list[Measured]] = {}
    rec["skipped"] = []
    for r in read_portfolio().tier(kind):
        if (r.pretrained and not r.architecture) or clock.over():
            rec["skipped"].append(r.name)
            continue
        batch = c.s.batch if c.s.smoke else r.batch
        recipe, options = probe_recipe(replace(r, batch=batch), tuple(c.s.size), {})
        t = probe(recipe, CLASSES, c.device, options=options)
        measured[r.name] = [Measured(tuple(c.s.size), batch, t.step_s, t.image_s, t.checkpoint_mb)]
        c.free()
    name = str(rec["device_name"]).lower().replace(" ", "-")
    profile = DeviceProfile(
        f"measured-{name}",
        kind,
        f"{rec['device_name']}, measured by make gpu-check on {datetime.date.today()}",
        gpus=torch.cuda.device_count() if kind == "gpu" else 1,
        cpus=os.cpu_count() or 0,
        precision=precision_name(amp_dtype("auto", c.device)).split()[0],
        measured=measured,
    )
    header = (
        f"# Device profile of {rec['device_name']}: measured by `make gpu-check` on {datetime.date.today()}\n"
        f"# (benchmarks/gpu_check.py {' '.join(c.report.get('argv') or [])}): each recipe's probe at\n"
        f"# {c.s.size[0]}x{c.s.size[1]}; recipes not measured here: {', '.join(rec['skipped']) or 'none'}.\n"
    )
    return save_device_profile(profile, c.path.parent / "device_profile.yaml", header=header)


# --------------------------------------------------------------------------- memory

MAX_BATCH = 1024  # the largest batch tried


def random_batch(c: Check, n: int, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, 3, *c.s.size, device=c.device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, CLASSES, (n, *c.s.size), device=c.device)


def step_fits(c: Check, t, n: int) -> tuple[bool, float | None, str | None]:
    """Whether one bare training step of ``n`` random images fits, its peak memory (MB), and why not:
    ``"memory"`` or ``"index limit"`` (a kernel refusing a tensor of 2**31 elements or more)."""
    from pipeline.engine.loop import INDEX_LIMIT, OUT_OF_MEMORY, too_large

    c.free()
    c.reset_peak()
    try:
        bare_step(t, [random_batch(c, n, t.channels_last)], 1, c.sync)
    except RuntimeError as exc:  # torch.OutOfMemoryError, a library's allocation failure, a 32-bit index limit
        reason = too_large(exc)  # the training loop's own decision
        if reason is None:
            raise
        why = {INDEX_LIMIT: "index limit", OUT_OF_MEMORY: "memory"}[reason]
        t.optimizer.zero_grad(set_to_none=True)
        return False, None, why
    return True, c.peak_mb(), None


def largest_batch(c: Check, t, clock: Clock) -> dict[str, Any]:
    """Peak memory at the check's batch and twice it, the batch a straight line through them puts at 92% of
    the GPU's memory, tried (and lowered by 15% until it fits, a few times); ``limited_by`` says what stopped
    it (``cap``, ``memory``, or ``index limit``: a kernel's 32-bit indexing, which the trainer meets by halving
    its micro-batch as it does on out-of-memory). On a CPU: doubled up to 4x."""
    b = c.s.batch
    if c.device.type != "cuda":
        tried = [dict(batch=n, fits=step_fits(c, t, n)[0]) for n in (b, 2 * b, 4 * b)]
        fits = [x["batch"] for x in tried if x["fits"]]
        return dict(peak_mb=None, largest_batch=max(fits) if fits else None, limited_by="cap (CPU)", tried=tried)
    (ok1, p1, why1), (ok2, p2, why2) = step_fits(c, t, b), step_fits(c, t, 2 * b)
    tried = [dict(batch=b, fits=ok1, peak_mb=p1), dict(batch=2 * b, fits=ok2, peak_mb=p2)]
    if not (ok1 and ok2):
        return dict(peak_mb=p1, largest_batch=b if ok1 else None, limited_by=why1 or why2, tried=tried)
    per_image = max((p2 - p1) / b, 1e-3)
    total_mb = torch.cuda.get_device_properties(c.device).total_memory / 2**20
    guess = min(MAX_BATCH, int((0.92 * total_mb - (p1 - b * per_image)) / per_image) // 8 * 8)
    found, limited = 2 * b, "cap" if guess >= MAX_BATCH else "memory"
    for _ in range(4):
        if clock.over() or guess <= found:
            break
        ok, peak, why = step_fits(c, t, guess)
        tried.append(dict(batch=guess, fits=ok, peak_mb=peak, failed_on=why))
        if ok:
            found = guess
            break
        limited = why
        guess = int(guess * 0.85) // 8 * 8
    return dict(peak_mb=p1, per_image_mb=per_image, largest_batch=found, limited_by=limited, tried=tried)


class OutOfMemoryAbove(torch.nn.Module):
    """A CPU's stand-in for a full GPU: raises ``torch.OutOfMemoryError`` for inputs of more than ``limit``
    images, so the training loop's fallback (micro-batches of half the size) runs on a CPU too."""

    def __init__(self, net: torch.nn.Module, limit: int):
        super().__init__()
        self.net, self.limit = net, limit

    def forward(self, x: torch.Tensor):
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"simulated: {x.shape[0]} images > {self.limit}")
        return self.net(x)


def oom_fallback(c: Check) -> dict[str, Any]:
    """Two steps of the real training loop with the process held to its model, optimizer and 55% of one
    step's activations (``set_per_process_memory_fraction``): the loop must halve its micro-batch and go on."""
    m, e = c.s.matrix
    t = build_trainer(c, Mode(m, e, "bf16", True))
    batches = device_batches(t, 1)
    out: dict[str, Any] = dict(model=m, encoder=e, batch=c.s.batch, simulated=c.device.type != "cuda")
    if c.device.type == "cuda":
        pipeline_step(t, batches, 2, 0)  # warm-up: cuDNN's autotuning and the optimizer's state
        c.free()
        c.reset_peak()
        pipeline_step(t, batches, 1, 1)
        peak = c.peak_mb()
        c.free()
        base = torch.cuda.memory_reserved(c.device) / 2**20
        limit = base + 0.55 * (peak - base)
        total = torch.cuda.get_device_properties(c.device).total_memory / 2**20
        out.update(step_peak_mb=peak, held_mb=base, limit_mb=limit)
        torch.cuda.set_per_process_memory_fraction(limit / total, c.device)
        try:
            out["step_s"] = pipeline_step(t, batches, 2, 2)
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, c.device)
    else:
        t.net = OutOfMemoryAbove(t.net, max(1, c.s.batch // 2))
        out["step_s"] = pipeline_step(t, batches, 2, 1)
    out.update(micro_batch=t.micro_batch, fell_back=t.micro_batch is not None and t.micro_batch < c.s.batch)
    del t, batches
    c.free()
    return out


def section_memory(c: Check, rec: dict, clock: Clock) -> None:
    rec.update(batch=c.s.batch, size=list(c.s.size), max_batch=MAX_BATCH, items=[], errors=[], truncated=False)
    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False  # no autotuning at every new batch size of the search
    rec["cudnn_benchmark"] = False
    try:
        for m, e in c.s.recipes:
            if clock.over(reserve=8.0):
                rec["truncated"] = True
                break
            t = build_trainer(c, Mode(m, e, "bf16", True))
            try:
                item = dict(model=m, encoder=e, **largest_batch(c, t, clock))
            except SectionTimeout:
                raise
            except Exception as exc:  # one recipe failing does not hide the others
                log.exception("memory: %s/%s failed", m, e)
                rec["errors"].append(dict(label=f"{m}/{e}", error=f"{type(exc).__name__}: {exc}"))
            else:
                rec["items"].append(item)
                log.info(
                    "memory: %s/%s: peak %s MB at batch %d, largest batch %s",
                    m,
                    e,
                    item["peak_mb"],
                    c.s.batch,
                    item["largest_batch"],
                )
            finally:
                del t
                c.free()
            c.save()
    finally:
        torch.backends.cudnn.benchmark = benchmark
    rec["oom_fallback"] = oom_fallback(c)
    log.info("memory: out-of-memory fallback: micro-batch %s of %d", rec["oom_fallback"]["micro_batch"], c.s.batch)


# --------------------------------------------------------------------------- end to end


def read_if(path: Path) -> str | None:
    return path.read_text() if path.is_file() else None


def e2e_timeout(c: Check, clock: Clock) -> float:
    """Seconds the budgeted run may take: what the cap leaves, at least its budget + a quarter + 45 s of start-up."""
    from pipeline.planning.budget import parse_budget

    return max(clock.cap_s - clock.elapsed(), 1.25 * parse_budget(c.s.budget) + 45)


def section_e2e(c: Check, rec: dict, clock: Clock) -> None:
    from pipeline.planning.budget import parse_budget

    folder = c.work / "e2e"
    folder.mkdir(parents=True, exist_ok=True)
    ws = folder / "work" / "gpu_check"
    args = [f"data_dir={c.data}", f"budget={c.s.budget}", "name=gpu_check", f"work_dir={folder / 'work'}"]
    args += [f"submissions_dir={folder / 'submissions'}", "encoder_weights=null", f"weights_dir={folder / 'weights'}"]
    args += ["progress=false", *(["tta=[none]", "sizes=[1.0]"] if c.s.smoke else [])]
    args += [f"threads={c.s.threads}"] if c.s.threads else []
    command = [sys.executable, "-m", "pipeline.autopilot", *args]
    budget_s = parse_budget(c.s.budget)
    rec.update(command=" ".join(command[1:]), budget=c.s.budget, budget_s=budget_s, data=c.report.get("data"))
    timeout = e2e_timeout(c, clock)
    rec.update(timeout_s=timeout, truncated=False)
    started = time.monotonic()
    with open(folder / "autopilot.log", "w") as out:
        proc = subprocess.Popen(
            command,
            cwd=folder,
            env=child_env(c.s.threads),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc, rec["truncated"] = None, True
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    rec.update(rc=rc, wall_s=time.monotonic() - started, plan=read_if(ws / "plan.txt"))
    rec["summary"] = read_if(ws / "summary.txt")
    score = read_if(ws / "score.json")
    rec["miou"] = json.loads(score)["miou"] if score else None
    state = read_if(ws / "state.json")
    rec["stages_s"] = json.loads(state).get("stages") if state else None
    if rc != 0:
        rec["log_tail"] = (read_if(folder / "autopilot.log") or "")[-4000:]
        raise RuntimeError(f"the budgeted run {'ran past its timeout' if rc is None else f'failed (exit {rc})'}")


# --------------------------------------------------------------------------- goals, tables, main

SECTIONS: dict[str, Callable[[Check, dict, Clock], None]] = {
    "environment": section_environment,
    "train": section_train,
    "loader": section_loader,
    "inference": section_inference,
    "device_profile": section_device_profile,
    "memory": section_memory,
    "e2e": section_e2e,
}


def goals(report: dict[str, Any]) -> list[Goal]:
    sections = report["sections"]
    out = [
        Goal(f"train {i['label']}: pipeline / bare images/s", i["ratio"], ">=", STEP_GOAL, applies_on="cuda")
        for i in (sections.get("train") or {}).get("items", [])
    ]
    loader = sections.get("loader") or {}
    if loader.get("ratio") is not None:
        out.append(Goal("loader / training step images/s", loader["ratio"], ">=", LOADER_GOAL, applies_on="cuda"))
    fallback = (sections.get("memory") or {}).get("oom_fallback") or {}
    if fallback.get("micro_batch"):
        out.append(Goal("OOM fallback: micro-batch / batch", fallback["micro_batch"] / fallback["batch"], "<=", 0.5))
    e2e = sections.get("e2e") or {}
    if e2e.get("rc") == 0:
        out.append(Goal("end-to-end wall time / budget", e2e["wall_s"] / e2e["budget_s"], "<=", 1.1, applies_on="cuda"))
    return out


def fmt(value: Any, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def headline(name: str, rec: dict[str, Any]) -> str:
    """One line of a section's main figures for the closing table."""
    if rec.get("status") != "ok" and rec.get("error"):
        return rec["error"][:100]
    if name == "environment":
        gpu = rec.get("gpu") or {}
        where = f"{gpu['name']} {gpu['memory_gb']} GB" if gpu else "CPU"
        return f"{where}, torch {rec.get('torch')}, CUDA {rec.get('cuda')}, cuDNN {rec.get('cudnn')}"
    if name == "train":
        items = rec.get("items") or [{}]
        first = items[0]
        return (
            f"{len(items)} modes; {first.get('label')}: pipeline {fmt(first.get('pipeline_images_per_s'))} vs bare "
            f"{fmt(first.get('bare_images_per_s'))} img/s"
        )
    if name == "loader":
        return (
            f"{fmt(rec.get('images_per_s'))} img/s, {rec.get('workers')} workers, {fmt(rec.get('ratio'), '.2f')}x step"
        )
    if name == "inference":
        first = {i["tta"]: i["images_per_s"] for i in rec.get("items", []) if i["model"] == rec["items"][0]["model"]}
        slide = rec.get("sliding") or {}
        sets = ", ".join(f"{k} {v:.1f}" for k, v in first.items())
        return f"img/s {sets}; sliding {slide.get('size')}: {fmt(slide.get('images_per_s'), '.2f')}"
    if name == "device_profile":
        return f"{len(rec.get('recipes', {}))} recipes (step_s, image_s beside the probe's)"
    if name == "memory":
        sizes = ", ".join(f"{i['model']} {i['largest_batch']} ({i['limited_by']})" for i in rec.get("items", []))
        fb = rec.get("oom_fallback") or {}
        return f"largest batch {sizes}; OOM fallback micro-batch {fb.get('micro_batch')} of {fb.get('batch')}"
    wall = fmt(rec.get("wall_s"), ".0f")
    return f"rc {rec.get('rc')}, mIoU {fmt(rec.get('miou'), '.4f')}, {wall} s of {rec.get('budget')}"


def closing_tables(report: dict[str, Any]) -> str:
    from pipeline.core.tables import format_table

    device = report["device"]
    rows = [
        [name, rec.get("status"), fmt(rec.get("seconds")), fmt(rec.get("cap_s"), ".0f"), headline(name, rec)]
        for name, rec in report["sections"].items()
    ]
    text = [format_table(["section", "status", "s", "cap", "figures"], rows)]
    items = (report["sections"].get("train") or {}).get("items", [])
    if items:
        rows = [
            [
                i["label"],
                fmt(i["pipeline_images_per_s"]),
                fmt(i["bare_images_per_s"]),
                fmt(i["ratio"], ".3f"),
                fmt(i["peak_mb"], ".0f"),
            ]
            for i in items
        ]
        text.append(format_table(["training step", "pipeline img/s", "bare img/s", "ratio", "peak MB"], rows))
    rows = [
        [g.measure, f"{g.value:.3g}", "-" if g.op == "report" else f"{g.op} {g.bound:g}", g.status(device)]
        for g in goals(report)
    ]
    if rows:
        text.append(format_table(["goal", "value", "bound", "status"], rows))
    return "\n\n".join(text)


def run_section(c: Check, name: str) -> None:
    cap = c.s.caps[name]
    rec: dict[str, Any] = {"status": "running", "cap_s": cap}
    c.report["sections"][name] = rec
    c.save()
    clock = Clock(cap)
    log.info("== %s (cap %.0f s)", name, cap)
    try:
        with hard_limit(1.5 * max(cap, e2e_timeout(c, clock) if name == "e2e" else 0) + 30):
            SECTIONS[name](c, rec, clock)
        rec["status"] = "ok"
    except SectionTimeout as exc:  # what it measured before stays in the JSON
        log.error("%s: %s", name, exc)
        rec.update(status="stopped", error=str(exc), truncated=True)
        c.free()
    except Exception as exc:  # the run goes on to the next section; the error is in the JSON
        log.exception("%s failed", name)
        rec.update(status="error", error=f"{type(exc).__name__}: {exc}")
        c.free()
    finally:
        rec["seconds"] = round(clock.elapsed(), 2)
        c.save()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="folder of gpu_check.json (default: reports/; on a lent GPU: $OUT)")
    p.add_argument("--only", action="append", choices=list(SECTIONS), help="run this section (repeatable)")
    p.add_argument("--smoke", action="store_true", help="every section on a CPU with tiny sizes")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cpu with --smoke")
    p.add_argument("--size", type=int, default=512, help="training side (GPU run)")
    p.add_argument("--batch", type=int, default=8, help="training and inference batch (GPU run)")
    p.add_argument("--budget", default="2m", help="the end-to-end run's budget (GPU run)")
    p.add_argument("--cap", action="append", default=[], metavar="SECTION=SECONDS", help="a section's time cap")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; --smoke: 1)")
    p.add_argument("--work", default=None, help="folder for the generated data and runs (default: temporary)")
    return p.parse_args(argv)


def new_report(c_device: torch.device, s: Settings, argv: list[str], old: dict[str, Any] | None) -> dict[str, Any]:
    report = dict(old or {})
    report.update(
        check="gpu_check",
        when=dt.datetime.now().isoformat(timespec="seconds"),
        host=platform.node(),
        device=str(c_device),
        smoke=s.smoke,
        settings=asdict(s),
        argv=argv,
    )
    report.setdefault("sections", {})
    return report


def main(argv: list[str] | None = None) -> int:
    from pipeline.core.io import setup_logging

    args = parse_args(argv)
    setup_logging("INFO")
    if args.device == "cuda" or (args.device == "auto" and not args.smoke):
        if not torch.cuda.is_available():
            print("gpu_check needs a CUDA GPU (none is visible here); on a CPU run it with --smoke", file=sys.stderr)
            return 2
        device = torch.device("cuda", 0)
    else:
        device = torch.device("cpu")
    ensure_packages()
    from pipeline.engine.runtime import configure_runtime

    s = settings(args)
    configure_runtime(device, threads=s.threads)  # as the trainer and the predict stage set it
    path = (Path(args.out) if args.out else ROOT / "reports") / "gpu_check.json"
    old = json.loads(path.read_text()) if args.only and path.is_file() else None
    names = [n for n in SECTIONS if not args.only or n in args.only]
    with contextlib.ExitStack() as stack:
        work = (
            Path(args.work)
            if args.work
            else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu_check-")))
        )
        c = Check(s, device, work, path, new_report(device, s, sys.argv[1:] if argv is None else argv, old))
        if any(n != "environment" for n in names):
            prepare_data(c)
        for name in names:
            run_section(c, name)
        print(closing_tables(c.report))
    print(f"figures -> {path}")
    return 0 if all(c.report["sections"][n]["status"] == "ok" for n in names) else 1


if __name__ == "__main__":
    raise SystemExit(main())
