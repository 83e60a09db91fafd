"""Bundle stage: ``make bundle``, the one folder a competitor attaches to a Kaggle notebook as a dataset.

Kaggle's code competitions run notebooks with the internet off: whatever the Kaggle image lacks comes
with the notebook as an attached dataset.  ``make bundle`` writes it (``BUNDLE_DIR``, default ``bundle/``)::

    wheels/         the pipeline's wheel and a wheel of each dependency the image lacks
    weights/        the pretrained weights: a copy of WEIGHTS_DIR, which ``make weights`` fills
    kaggle.ipynb    installs from wheels/ with the index switched off, runs the budgeted run (make all)
                    on the competition's data and writes /kaggle/working/submission.csv
    manifest.json   every file with its size and sha256; each bundled package and why; the packages
                    left to the image

Which packages the image lacks is worked out, not listed by hand.  From the requirements in the
pipeline's wheel down, a package the image holds at a version the requirement admits is left to the
image (with its own dependencies, which the image holds); any other is bundled, at the version
installed here (the one the tests ran), and its requirements are followed in turn.  What the image
holds is ``configs/images/<image>.yaml`` (its header names the public lists it was read from).
"""

from __future__ import annotations

import email.parser
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.core.config import ConfigError, named_file, read_yaml_mapping, stage_main
from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_write_text

log = logging.getLogger(__name__)

PROJECT = "segmentation-contest-pipeline"
IMAGES_DIR = Path(__file__).resolve().parent / "configs" / "images"
# the files of a source checkout a wheel is built from
SOURCE_FILES = ("pyproject.toml", "README.md")
SOURCE_PACKAGE = "pipeline"
# glibc of the Kaggle image (Ubuntu 22.04: 2.35) and the manylinux tags below it that wheels are built for
MANYLINUX_X86_64 = tuple(f"manylinux_2_{v}_x86_64" for v in (35, 34, 31, 28, 27, 24, 17)) + (
    "manylinux2014_x86_64",
)  # pip adds manylinux2010 and manylinux1 to manylinux2014
WHEELS, WEIGHTS, NOTEBOOK, MANIFEST = "wheels", "weights", "kaggle.ipynb", "manifest.json"
KAGGLE_METADATA = "dataset-metadata.json"  # the kaggle CLI's description of the dataset: kept across rebuilds
SETUPTOOLS_BUILDS = 77  # pyproject.toml's build requirement: below it the wheel is built in an isolated environment


@dataclass
class BundleConfig:
    out_dir: str = "bundle"
    weights_dir: str = "weights"  # the weights folder copied into the bundle (make weights fills it)
    image: str = "kaggle"  # what the notebook's image holds: configs/images/<name>.yaml or a file
    extras: list[str] = field(default_factory=list)  # the pipeline's extras to carry too, e.g. [mlflow]
    # the wheels' target: the image's Python (null: the image file's) and platforms (empty: this machine's)
    python_version: str | None = None
    platforms: list[str] = field(default_factory=lambda: list(MANYLINUX_X86_64))
    find_links: list[str] = field(default_factory=list)  # folders of wheels pip looks in first
    no_index: bool = False  # take the dependency wheels from find_links only (no download)
    # the notebook's budget: Kaggle's 9 hours of a code competition's run less install, set-up and a margin
    budget: str = "8h"
    source: str | None = None  # the project's source folder (pyproject.toml); null: the checkout this runs from

    def validate(self) -> None:
        from pipeline.planning.budget import parse_budget

        parse_budget(self.budget)
        if not self.out_dir.strip():
            raise ConfigError("out_dir: name the bundle's folder")


@dataclass(frozen=True)
class Image:
    """The packages a notebook image holds: canonical name -> version (None: some version, the newest at
    the image's build), and its Python."""

    path: Path
    python: str
    packages: dict[str, str | None]

    def admits(self, name: str, specifier: Any) -> str | None:
        """Why the image serves a requirement (its version), or None when it does not."""
        from packaging.version import InvalidVersion, Version

        if name not in self.packages:
            return None
        held = self.packages[name]
        if held is None:
            return "the newest at the image's build"
        try:
            version = Version(held)
        except InvalidVersion:
            return None
        return held if specifier.contains(version, prereleases=True) else None


def read_image(name_or_path: str) -> Image:
    from packaging.utils import canonicalize_name

    path = named_file(name_or_path, IMAGES_DIR, "image")
    data = read_yaml_mapping(path)
    packages = data.get("packages")
    if not isinstance(packages, dict) or "python" not in data:
        raise ConfigError(f"{path}: expected python: <version> and packages: {{name: version}}")
    held = {canonicalize_name(k): None if str(v) == "*" else str(v) for k, v in packages.items()}
    return Image(path, str(data["python"]), held)


# ----------------------------------------------------------------------------- the pipeline's wheel
def project_source(source: str | None) -> Path:
    root = Path(source) if source else Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file() or not (root / SOURCE_PACKAGE).is_dir():
        raise PipelineError(f"{root}: not a source checkout of the pipeline (pyproject.toml, pipeline/): give source=")
    return root


def _isolation_flags() -> list[str]:
    """Build with this environment's setuptools when it is new enough (offline), else in pip's isolated
    build environment (which downloads one)."""
    from packaging.version import Version

    try:
        if Version(metadata.version("setuptools")).major >= SETUPTOOLS_BUILDS:
            return ["--no-build-isolation"]
    except metadata.PackageNotFoundError:
        pass
    return []


def build_wheel(source: Path, out: Path) -> Path:
    """The pipeline's wheel, built from a clean copy of ``source`` (no build/ folder of earlier builds
    can slip stale files in) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pipeline-wheel-") as tmp:
        tree = Path(tmp) / "src"
        tree.mkdir()
        for name in SOURCE_FILES:
            shutil.copy2(source / name, tree / name)
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
        shutil.copytree(source / SOURCE_PACKAGE, tree / SOURCE_PACKAGE, ignore=ignore)
        built = Path(tmp) / "dist"
        pip(["wheel", "--no-deps", *_isolation_flags(), "-w", str(built), str(tree)])
        (wheel,) = built.glob("*.whl")
        target = out / wheel.name
        shutil.move(str(wheel), target)
    log.info("built %s", target)
    return target


def wheel_requirements(wheel: Path) -> list[str]:
    """The Requires-Dist lines of a wheel's METADATA."""
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        message = email.parser.Parser().parsestr(zf.read(name).decode())
    return message.get_all("Requires-Dist") or []


# ----------------------------------------------------------------------------- what the image lacks
@dataclass
class WheelPlan:
    bundled: dict[str, str] = field(default_factory=dict)  # name -> version installed here
    why: dict[str, str] = field(default_factory=dict)  # name -> why it is bundled
    left: dict[str, str] = field(default_factory=dict)  # name -> the image's version


def _applies(marker: Any, environment: dict[str, str], extras: Iterable[str]) -> bool:
    return marker is None or any(marker.evaluate({**environment, "extra": e}) for e in ("", *extras))


def plan_wheels(requires: Sequence[str], image: Image, extras: Sequence[str] = ()) -> WheelPlan:
    """What to bundle for ``requires`` (a wheel's Requires-Dist) on ``image``: see the module docstring."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    environment = {
        "python_version": image.python,
        "python_full_version": f"{image.python}.0",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "os_name": "posix",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
    }
    plan = WheelPlan()
    queue = [(Requirement(r), tuple(extras)) for r in requires]
    while queue:
        req, parent_extras = queue.pop(0)
        if not _applies(req.marker, environment, parent_extras):
            continue
        name = canonicalize_name(req.name)
        if name in plan.bundled or name in plan.left or name == PROJECT:  # the project: its own wheel
            continue
        held = image.admits(name, req.specifier)
        if held is not None:
            plan.left[name] = held
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError as exc:
            raise PipelineError(
                f"{name} ({req}) is not in the image and not installed here: the bundle carries the versions "
                f"this environment runs (pip install '{req}', then make bundle again)"
            ) from exc
        plan.bundled[name] = dist.version
        version = image.packages.get(name, "missing")
        plan.why[name] = (
            f"{req} is not in the image"
            if version == "missing"
            else f"{req}: the image holds {version or 'some version'}, which does not satisfy it"
        )
        queue.extend((Requirement(r), tuple(req.extras)) for r in dist.requires or [])
    return plan


def pip(args: Sequence[str]) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise PipelineError(f"pip {' '.join(args[:2])} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")


def download_wheels(cfg: BundleConfig, specs: Sequence[str], python: str, out: Path) -> None:
    """A wheel of each ``name==version`` for the image's Python and platforms (no source builds)."""
    if not specs:
        return
    args = ["download", "--no-deps", "--only-binary=:all:", "--python-version", python, "--implementation", "cp"]
    for platform in cfg.platforms:
        args += ["--platform", platform]
    for folder in cfg.find_links:
        args += ["--find-links", str(folder)]
    if cfg.no_index:
        args.append("--no-index")
    pip([*args, "-d", str(out), *specs])


# ----------------------------------------------------------------------------- weights and notebook
def copy_weights(source: Path, out: Path) -> list[Path]:
    """Every file of the weights folder (encoder files and whole-model folders), hard-linked where the
    disk allows (weights can be gigabytes), else copied."""
    out.mkdir(parents=True, exist_ok=True)
    if not source.is_dir() or not any(source.iterdir()):
        log.warning(
            "%s holds no weights: the notebook trains only the recipes that start from scratch "
            "(make weights fills it, then make bundle again)",
            source,
        )
        return []
    files = []
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        target = out / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)
        files.append(target)
    return files


def _cell(kind: str, text: str, number: int) -> dict[str, Any]:
    lines = text.strip("\n").splitlines(keepends=True)
    cell: dict[str, Any] = {"cell_type": kind, "id": f"cell-{number}", "metadata": {}, "source": lines}
    if kind == "code":
        cell.update(execution_count=None, outputs=[])
    return cell


NOTEBOOK_INTRO = """
# Segmentation contest pipeline: a budgeted run, offline

Attach the competition and the dataset made with `make bundle` (this notebook comes with it), choose a
GPU accelerator, leave the internet off, then run all and submit. The notebook installs the pipeline
from the bundle's wheels (`pip install --no-index`), runs the budgeted run (`make all`: folds, probe,
plan, training, TTA chosen on out-of-fold predictions, ensemble, submission) on the competition's data
within `BUDGET`, and writes `/kaggle/working/submission.csv`.
"""

NOTEBOOK_SETTINGS = '''
import os
import shlex
import subprocess
import sys
from pathlib import Path

# Kaggle's folders; the environment moves them to run this notebook elsewhere (a local test of the bundle)
INPUT = Path(os.environ.get("KAGGLE_INPUT", "/kaggle/input"))  # the competition's data and the bundle
OUT = Path(os.environ.get("KAGGLE_WORKING", "/kaggle/working"))  # Kaggle takes submission.csv from here
WORK = Path(os.environ.get("PIPELINE_WORK", "/tmp/pipeline"))  # runs and predictions: more than OUT's 20 GB
# wall time of the budgeted run: the session's limit less installing, set-up and a margin
BUDGET = os.environ.get("PIPELINE_BUDGET", "{budget}")
ARGS = shlex.split(os.environ.get("PIPELINE_ARGS", ""))  # more key=value settings of make all, e.g. level=2
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the internet is off: never wait for the model hub


def find(pattern):
    """The one folder under INPUT (up to three levels down) that holds ``pattern``."""
    hits = sorted({{p.parent for depth in range(1, 4) for p in INPUT.glob("*/" * depth + pattern)}})
    if len(hits) != 1:
        raise RuntimeError(f"{{len(hits)}} folders under {{INPUT}} hold {{pattern}}: {{hits}}; attach exactly one")
    return hits[0]


def run(*args, cwd=None):
    """Run a command, its output shown here line by line; stop on failure."""
    with subprocess.Popen(args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            print(line, end="")
    if proc.returncode:
        raise RuntimeError(f"{{args[2] if len(args) > 2 else args[0]}} failed (exit {{proc.returncode}})")


BUNDLE = find("{wheels}/{wheel_glob}").parent
DATA = find("test.json")
print(f"bundle: {{BUNDLE}}\\ndata: {{DATA}}\\nbudget: {{BUDGET}}")
'''

NOTEBOOK_INSTALL = """
# the pipeline and what the image lacks, from the bundle only (--no-index: no package index is asked)
run(sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(BUNDLE / "{wheels}"), "{requirement}")
"""

NOTEBOOK_RUN = """
# the budgeted run (make all): its workspace under WORK, the submission straight into OUT
WORK.mkdir(parents=True, exist_ok=True)
run(
    sys.executable, "-m", "pipeline.autopilot",
    f"data_dir={{DATA}}", f"budget={{BUDGET}}", "name=submission", f"submissions_dir={{OUT}}",
    f"work_dir={{WORK / 'work'}}", f"weights_dir={{BUNDLE / '{weights}'}}", *ARGS,
    cwd=WORK,
)
"""

NOTEBOOK_CHECK = """
submission = OUT / "submission.csv"
print((WORK / "work" / "submission" / "summary.txt").read_text())
print(submission, f"{{submission.stat().st_size:,}} bytes")
"""


def notebook(cfg: BundleConfig, wheel: Path) -> dict[str, Any]:
    """The notebook (nbformat 4) that installs from the bundle and runs the budgeted run."""
    version = wheel.name.split("-")[1]
    fill = dict(
        budget=cfg.budget,
        wheels=WHEELS,
        weights=WEIGHTS,
        wheel_glob=f"{wheel.name.split('-')[0]}-*.whl",
        requirement=f"{PROJECT}=={version}",
    )
    texts = [NOTEBOOK_SETTINGS, NOTEBOOK_INSTALL, NOTEBOOK_RUN, NOTEBOOK_CHECK]
    cells = [_cell("markdown", NOTEBOOK_INTRO, 1)]
    cells += [_cell("code", text.format(**fill), i) for i, text in enumerate(texts, start=2)]
    return {
        "cells": cells,
        "metadata": {
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }


def notebook_script(path: str | Path) -> str:
    """The code cells of a notebook as one script (what running all its cells runs)."""
    cells = json.loads(Path(path).read_text())["cells"]
    return "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code") + "\n"


# ----------------------------------------------------------------------------- the stage
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def clear_bundle(out: Path) -> None:
    """Empty a bundle folder written before (but the kaggle CLI's metadata); refuse any other non-empty one."""
    out.mkdir(parents=True, exist_ok=True)
    found = [p for p in out.iterdir() if p.name != KAGGLE_METADATA]
    if found and not (out / MANIFEST).is_file():
        raise PipelineError(f"{out}: not empty and not a bundle (no {MANIFEST}): name another out_dir")
    for path in found:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def run(cfg: BundleConfig) -> dict[str, Any]:
    """Write the bundle folder; returns its manifest."""
    cfg.validate()
    image = read_image(cfg.image)
    python = cfg.python_version or image.python
    source = project_source(cfg.source)
    out = Path(cfg.out_dir)
    clear_bundle(out)
    wheel = build_wheel(source, out / WHEELS)
    plan = plan_wheels(wheel_requirements(wheel), image, cfg.extras)
    for name, why in plan.why.items():
        log.info("bundling %s %s: %s", name, plan.bundled[name], why)
    download_wheels(cfg, [f"{n}=={v}" for n, v in plan.bundled.items()], python, out / WHEELS)
    copy_weights(Path(cfg.weights_dir), out / WEIGHTS)
    atomic_write_text(out / NOTEBOOK, json.dumps(notebook(cfg, wheel), indent=1) + "\n")
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != KAGGLE_METADATA)
    manifest = {
        "pipeline": __version__,
        "image": str(image.path),
        "python": python,
        "bundled": {n: {"version": v, "why": plan.why[n]} for n, v in plan.bundled.items()},
        "left_to_image": plan.left,
        "files": [{"path": str(p.relative_to(out)), "bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files],
    }
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    total = sum(f["bytes"] for f in manifest["files"])
    log.info("bundle %s: %d files, %.1f MB (attach it as a Kaggle dataset)", out, len(files), total / 1e6)
    for f in manifest["files"]:
        log.info("  %10s  %s", f"{f['bytes']:,}", f["path"])
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main(BundleConfig, run, argv, "Offline bundle for a Kaggle notebook (make bundle)")


if __name__ == "__main__":
    raise SystemExit(main())
