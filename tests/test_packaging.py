"""The pipeline as a package: its wheel holds every config file of the tree, a non-editable install plans
from its own copy, and the Kaggle bundle installs with the index switched off, in an environment holding
only what the Kaggle image holds, and its notebook runs a tiny budgeted run to a submission."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import sysconfig
import venv
import zipfile
from importlib import metadata
from pathlib import Path

import pandas as pd
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from pipeline import __version__
from pipeline.bundle import (
    KAGGLE_METADATA,
    MANIFEST,
    NOTEBOOK,
    BundleConfig,
    Image,
    build_wheel,
    clear_bundle,
    notebook_script,
    plan_wheels,
    read_image,
    wheel_requirements,
)
from pipeline.bundle import run as make_bundle
from pipeline.core.errors import PipelineError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "pipeline" / "configs"
# dependency wheels downloaded once (git-ignored): the bundle test then builds offline
WHEEL_CACHE = ROOT / ".cache" / "bundle-wheels"
THIS_PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return build_wheel(ROOT, tmp_path_factory.mktemp("wheel"))


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without pip's settings (no find-links, no extra index: only what a test names)
    and without PYTHONPATH, so a child imports only what its own interpreter holds."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k != "PYTHONPATH"}
    return {**env, "PIP_CONFIG_FILE": os.devnull, "HF_HUB_OFFLINE": "1", **extra}


def new_venv(folder: Path, site_dirs: list[Path], with_pip: bool = False) -> Path:
    """A virtual environment that also imports from ``site_dirs`` (a .pth file: packages used where they
    are, not reinstalled); returns its python."""
    venv.EnvBuilder(with_pip=with_pip, symlinks=True).create(folder)
    python = folder / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(purelib) / "reused.pth").write_text("".join(f"{d}\n" for d in site_dirs))
    if with_pip and any(Path(purelib).glob("setuptools-*.dist-info")):  # ensurepip's own (Python 3.11) would
        uninstall = [python, "-m", "pip", "uninstall", "-y", "-q", "setuptools"]  # shadow the reused one
        subprocess.run(uninstall, capture_output=True, check=True, env=clean_env())
    return python


def test_the_wheel_holds_every_config_file_of_the_tree(wheel):
    tree = {p.relative_to(ROOT).as_posix(): p.read_bytes() for p in CONFIGS.rglob("*") if p.is_file()}
    with zipfile.ZipFile(wheel) as zf:
        packed = {n: zf.read(n) for n in zf.namelist() if n.startswith("pipeline/configs/")}
    assert sorted(packed) == sorted(tree)
    assert packed == tree
    for folder in ("recipes", "devices", "fingerprints", "images"):
        assert any(name.startswith(f"pipeline/configs/{folder}/") for name in packed), folder
    assert wheel.name == f"segmentation_contest_pipeline-{__version__}-py3-none-any.whl"


def test_a_non_editable_install_plans_for_the_h100_from_its_own_configs(wheel, tmp_path):
    # the project's dependencies from this environment, the project itself only from the wheel
    python = new_venv(tmp_path / "venv", [Path(sysconfig.get_paths()["purelib"])])
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)]
    subprocess.run(install, capture_output=True, text=True, check=True, env=clean_env())
    (tmp_path / "run").mkdir()
    where = subprocess.run(
        [python, "-c", "import pipeline; print(pipeline.__file__)"],
        cwd=tmp_path / "run",
        capture_output=True,
        text=True,
        env=clean_env(),
    )
    installed = Path(where.stdout.strip()).parent
    assert installed.is_relative_to(tmp_path / "venv") and not installed.is_relative_to(ROOT), where
    # make plan's command (python -m pipeline.plan) with the h100 profile and the contest's fingerprint
    args = ["device_profile=h100", "fingerprint=recycle-trash", "budget=2h", "name=wheel"]
    plan = subprocess.run(
        [python, "-m", "pipeline.plan", *args], cwd=tmp_path / "run", capture_output=True, text=True, env=clean_env()
    )
    assert plan.returncode == 0, plan.stderr[-3000:]
    # the plan's records keep full paths (its tables may shorten them): the installed package's files
    saved = json.loads((tmp_path / "run" / "work" / "wheel" / "plan.json").read_text())
    assert saved["planned_for"]["device"] == "profile h100"
    assert str(installed / "configs" / "devices" / "h100.yaml") in saved["schedule"]["device"]
    fingerprint = installed / "configs" / "fingerprints" / "recycle-trash.yaml"
    assert saved["schedule"]["fingerprint"]["source"] == str(fingerprint)
    assert 0 < saved["schedule"]["planned_s"] <= 2 * 3600


def test_the_bundle_carries_what_the_kaggle_image_lacks(wheel):
    requires = wheel_requirements(wheel)
    image = read_image("kaggle")
    assert image.python == "3.12" and image.path == CONFIGS / "images" / "kaggle.yaml"
    plan = plan_wheels(requires, image)
    smp = metadata.version("segmentation-models-pytorch")
    assert plan.bundled == {"segmentation-models-pytorch": smp}
    assert "is not in the image" in plan.why["segmentation-models-pytorch"]
    # every requirement of the pipeline's is served, by the image or the bundle
    direct = {canonicalize_name(Requirement(r).name) for r in requires if Requirement(r).marker is None}
    assert direct <= set(plan.left) | set(plan.bundled)
    assert plan.left["torch"] == "2.10.0" and plan.left["optuna"] == "the newest at the image's build"
    # an image whose timm is too old for the pipeline: timm is bundled, at the version installed here
    old = Image(image.path, image.python, {**image.packages, "timm": "0.6.13"})
    stale = plan_wheels(requires, old)
    assert stale.bundled["timm"] == metadata.version("timm") and "does not satisfy" in stale.why["timm"]
    # an extra the image does not hold comes with its own requirements where the image lacks them
    with_mlflow = plan_wheels(requires, image, extras=["mlflow"])
    assert "mlflow-skinny" in with_mlflow.bundled and "sqlalchemy" in with_mlflow.left


def test_a_bundle_is_rewritten_whole_but_the_kaggle_cli_metadata(tmp_path):
    out = tmp_path / "bundle"
    (out / "wheels").mkdir(parents=True)
    (out / "wheels" / "old-0.1-py3-none-any.whl").write_text("x")
    (out / MANIFEST).write_text("{}")
    (out / KAGGLE_METADATA).write_text('{"id": "me/bundle"}')
    clear_bundle(out)
    assert [p.name for p in out.iterdir()] == [KAGGLE_METADATA]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(PipelineError, match="not a bundle"):
        clear_bundle(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").is_file()


def image_site(names: set[str], folder: Path) -> set[str]:
    """A folder of links to the installed distributions ``names`` and everything they require (what the
    Kaggle image holds of them); returns the distributions linked."""
    folder.mkdir()
    linked: set[str] = set()
    done: set[tuple[str, str]] = set()
    queue = [(name, "") for name in names]
    while queue:
        name, extra = queue.pop()
        name = canonicalize_name(name)
        if (name, extra) in done:
            continue
        done.add((name, extra))
        linked.add(name)
        dist = metadata.distribution(name)
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": extra}):
                queue += [(req.name, e) for e in ("", *req.extras)]
        if extra:
            continue
        site = Path(str(dist.locate_file("")))
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops - {"__pycache__"}:
            if not (folder / top).exists() and not top.endswith(".pth"):
                (folder / top).symlink_to(site / top)
    return linked


def cached_wheels(specs: list[str]) -> Path:
    """The dependency wheels of this Python in the (git-ignored) cache, downloaded once."""
    WHEEL_CACHE.mkdir(parents=True, exist_ok=True)
    have = {p.name.split("-")[0].lower().replace("_", "-") + "==" + p.name.split("-")[1] for p in WHEEL_CACHE.glob("*")}
    missing = [s for s in specs if s.lower() not in have]
    if missing:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(WHEEL_CACHE)]
        subprocess.run([*cmd, *missing], capture_output=True, text=True, check=True)
    return WHEEL_CACHE


@pytest.mark.slow
def test_the_kaggle_bundle_installs_offline_and_its_notebook_writes_the_submission(demo_data, wheel, tmp_path):
    from pipeline.prepare_weights import WeightsConfig
    from pipeline.prepare_weights import run as make_weights

    image = read_image("kaggle")
    plan = plan_wheels(wheel_requirements(wheel), image)
    # the bundle as make bundle writes it, for this machine's Python, from wheels cached here
    make_weights(WeightsConfig(source="lite0", weights_dir=str(tmp_path / "weights")))
    cache = cached_wheels([f"{n}=={v}" for n, v in plan.bundled.items()])
    bundle = tmp_path / "bundle"
    cfg = BundleConfig(
        out_dir=str(bundle),
        weights_dir=str(tmp_path / "weights"),
        python_version=THIS_PYTHON,
        platforms=[],
        find_links=[str(cache)],
        no_index=True,
    )
    manifest = make_bundle(cfg)
    assert json.loads((bundle / MANIFEST).read_text()) == manifest
    files = {f["path"] for f in manifest["files"]}
    assert files == {
        f"wheels/segmentation_contest_pipeline-{__version__}-py3-none-any.whl",
        *(f"wheels/{p.name}" for p in (bundle / "wheels").glob("segmentation_models_pytorch-*.whl")),
        "weights/tu-tf_efficientnet_lite0.safetensors",
        NOTEBOOK,
    }
    assert len(files) == 4
    nb = json.loads((bundle / NOTEBOOK).read_text())
    assert nb["nbformat"] == 4 and all({"cell_type", "id", "metadata", "source"} <= set(c) for c in nb["cells"])
    script = notebook_script(bundle / NOTEBOOK)
    compile(script, NOTEBOOK, "exec")
    assert '"--no-index"' in script and 'BUDGET = os.environ.get("PIPELINE_BUDGET", "8h")' in script

    # an environment as the Kaggle image: the packages it holds of the pipeline's requirements (and what they
    # require), linked from this environment; none of the bundled ones, nor the pipeline
    linked = image_site(set(plan.left), tmp_path / "image-site")
    assert "torch" in linked and not linked & {*plan.bundled, "segmentation-contest-pipeline"}
    python = new_venv(tmp_path / "kaggle-env", [tmp_path / "image-site"], with_pip=True)
    probe = subprocess.run([python, "-c", "import segmentation_models_pytorch"], capture_output=True, env=clean_env())
    assert probe.returncode != 0  # the image lacks it

    # Kaggle's folders: the attached bundle and the competition's data under INPUT
    (tmp_path / "input").mkdir()
    (tmp_path / "input" / "my-bundle").symlink_to(bundle)
    (tmp_path / "input" / "the-contest").symlink_to(demo_data)
    (tmp_path / "working").mkdir()
    light = {"unet": {"decoder_channels": [64, 32, 16, 16, 8]}}
    # one thread: on a test machine whose two cores are shared, two threads ran a step five times slower
    run_args = ["recipes=[unet-lite0]", "sizes=[0.5]", "tta=[none,hflip]", "threads=1", "progress=false"]
    run_args.append(f"model_options={json.dumps(light)}")
    env = clean_env(
        KAGGLE_INPUT=str(tmp_path / "input"),
        KAGGLE_WORKING=str(tmp_path / "working"),
        PIPELINE_WORK=str(tmp_path / "work"),
        PIPELINE_BUDGET="150s",
        PIPELINE_ARGS=shlex.join(run_args),
        # no model cache to fall back on: the encoder's weights can only come from the bundle
        HF_HOME=str(tmp_path / "hf"),
        TORCH_HOME=str(tmp_path / "torch"),
        XDG_CACHE_HOME=str(tmp_path / "cache"),
    )
    (tmp_path / "notebook.py").write_text(script)
    done = subprocess.run([python, "notebook.py"], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    installed = {line for line in done.stdout.splitlines() if line.startswith("Successfully installed")}
    assert installed == {
        f"Successfully installed segmentation-contest-pipeline-{__version__} "
        f"segmentation-models-pytorch-{plan.bundled['segmentation-models-pytorch']}"
    }

    submission = pd.read_csv(tmp_path / "working" / "submission.csv", keep_default_na=False)
    test = json.loads((demo_data / "test.json").read_text())
    assert list(submission.columns) == ["image_id", "class_id", "EncodedPixels"]
    assert set(submission.image_id) == {im["file_name"] for im in test["images"]}
    assert len(submission) == len(test["images"]) * len(test["categories"])
    (config,) = (tmp_path / "work" / "work" / "submission" / "runs").glob("*/fold0/config.yaml")
    started = yaml.safe_load(config.read_text())["weights_source"]
    assert started["source"] == "folder"
    assert started["path"] == str(tmp_path / "input" / "my-bundle" / "weights" / "tu-tf_efficientnet_lite0.safetensors")
