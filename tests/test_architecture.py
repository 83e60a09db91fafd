"""The package's shape: stages on top never import each other; building blocks never import
stages; no function is longer than 80 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "pipeline"
# every module with a main(): the stages, listed explicitly
STAGES = {
    "demo",
    "eda",
    "folds",
    "train",
    "predict",
    "ensemble",
    "submit",
    "validate",
    "score",
    "tune",
    "tune_report",
    "autopilot",
    "pseudo",
    "analyze",
    "average",
    "prepare_weights",
}
MAX_FUNCTION_LINES = 80


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PKG.rglob("*.py"))}


def imported(name: str, tree: ast.Module) -> set[str]:
    """Every module ``name`` imports, at the top or inside functions (relative imports resolved)."""
    out: set[str] = set()
    package = name if (PKG / Path(*name.split(".")[1:]) / "__init__.py").exists() else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)  # "from pipeline import train"
    return {m for m in out if m == "pipeline" or m.startswith("pipeline.")}


def stage_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) >= 2 and parts[1] in STAGES and len(parts) == 2 else None


def test_the_stage_list_is_complete():
    with_main = {
        name.split(".")[1]
        for name, tree in modules().items()
        if name.count(".") == 1 and any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body)
    }
    assert with_main == STAGES
    blocks = {name for name in modules() if name.count(".") >= 2}
    assert not any(any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in modules()[b].body) for b in blocks)


def test_no_stage_imports_another_stage_and_no_block_imports_a_stage():
    offences = []
    for name, tree in modules().items():
        for target in imported(name, tree):
            stage = stage_of(target)
            if stage is not None and stage != stage_of(name):
                offences.append(f"{name} imports {target}")
    assert offences == []


def test_the_import_walk_sees_imports_inside_functions():
    tree = ast.parse("def f():\n    from pipeline.train import run\n    import pipeline.tune\n")
    assert {"pipeline.train", "pipeline.train.run", "pipeline.tune"} <= imported("pipeline.engine.x", tree)


@pytest.mark.parametrize("path", sorted(PKG.rglob("*.py")), ids=lambda p: str(p.relative_to(PKG)))
def test_no_function_is_longer_than_80_lines(path):
    tree = ast.parse(path.read_text())
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines, line {node.lineno})"
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert long == []
