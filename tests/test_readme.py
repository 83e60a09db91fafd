"""Every command of the README's code blocks parses: each `make` line is dry-run (`make -n`) in a
sandbox laid out as the README assumes, and each stage command that dry run prints (and each
`python -m pipeline.<stage>` line) resolves its config with `--print-config`."""

from __future__ import annotations

import importlib
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGE = re.compile(r"^(?:\S*/)?python3?(?:\.\d+)? -m (pipeline\.\w+)(?: |$)")


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.splitlines():
            line = line.strip()
            if line.startswith("make ") or STAGE.match(line):
                lines.append(line)
    return lines


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> Path:
    """A working folder with the repository's Makefile, package and set-up, plus the files the
    README's commands name (folds, run folders, a tuning report's best.yaml, a user config)."""
    box = tmp_path_factory.mktemp("readme")
    for name in ("Makefile", "pipeline", "benchmarks", "requirements.txt", "pyproject.toml", ".venv"):
        if (ROOT / name).exists():
            (box / name).symlink_to(ROOT / name)
    (box / "folds").mkdir()
    (box / "folds" / "folds.csv").write_text("image_id,fold\n" + "".join(f"{i},{i % 5}\n" for i in range(10)))
    for exp in ("first", "unet-lite2", "fpn-lite0", "unet"):
        for fold in range(5):
            (box / "runs" / exp / f"fold{fold}").mkdir(parents=True)
    (box / "reports" / "tune" / "unet-lr").mkdir(parents=True)
    (box / "reports" / "tune" / "unet-lr" / "best.yaml").write_text(
        "model: unet\nexperiment: unet-lr-best\nlr: 0.001\n"
    )
    (box / "my.yaml").write_text("base: pipeline/configs/fpn.yaml\nepochs: 30\n")
    return box


def stage_commands(dry_run: str) -> list[str]:
    return [line for line in dry_run.splitlines() if STAGE.match(line.strip())]


def print_config(command: str, box: Path, monkeypatch, capsys) -> str:
    """Run a stage command's ``main`` in-process with ``--print-config`` (shell quoting as bash)."""
    argv = shlex.split(command)
    module = argv[argv.index("-m") + 1]
    monkeypatch.chdir(box)
    code = importlib.import_module(module).main([*argv[argv.index("-m") + 2 :], "--print-config"])
    out = capsys.readouterr().out
    assert code == 0, f"{command}: exit {code}"
    return out


COMMANDS = readme_commands()


def test_the_readme_shows_the_single_model_recipe_first():
    makes = [c.split("#")[0].split() for c in COMMANDS if c.startswith("make ")]
    targets = [m[1] for m in makes]
    first = targets.index("folds")
    assert targets[first : first + 6] == ["folds", "train", "predict", "predict", "submit", "predict"]
    assert len(COMMANDS) > 25


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.parametrize("line", COMMANDS, ids=[c.split("#")[0].strip()[:60] for c in COMMANDS])
def test_readme_command_parses(line, sandbox, monkeypatch, capsys):
    words = shlex.split(line, comments=True)
    if words[0] == "make":
        done = subprocess.run(
            ["make", "-n", "--no-print-directory", *words[1:]], cwd=sandbox, capture_output=True, text=True
        )
        assert done.returncode == 0, f"{line}\n{done.stderr}"
        commands = stage_commands(done.stdout)
        target = words[1]
        if target not in ("demo", "test", "test-fast", "lint", "bench", "train-folds", "predict-folds"):
            assert commands, f"{line}: make -n printed no stage command\n{done.stdout}"
    else:
        commands = [" ".join(shlex.quote(w) for w in words)]
    for command in commands:
        out = print_config(command, sandbox, monkeypatch, capsys)
        assert re.search(r"^\w+: .*  # ", out, re.M), f"{command}: no resolved config printed"
