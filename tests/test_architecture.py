"""The package's shape: stages on top never import each other; building blocks never import
stages; imports run only down the floors (core < data < evaluation < models < engine < inference <
submission < planning/tuning < stages) and never in a circle; no function is longer than 80 lines.

Every import counts: at the top of a module, inside functions and under ``TYPE_CHECKING``."""

from __future__ import annotations

import ast
from collections.abc import Iterator
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
    "plan",
    "pseudo",
    "analyze",
    "bundle",
    "average",
    "prepare_weights",
}
MAX_FUNCTION_LINES = 80
# the floors, lowest first: a module imports only from its own floor or lower ones; the stages
# (the modules at the top of pipeline/) are the floor above the last
FLOORS: tuple[tuple[str, ...], ...] = (
    ("core",),
    ("data",),
    ("evaluation",),
    ("models",),
    ("engine",),
    ("inference",),
    ("submission",),
    ("planning", "tuning"),
)
STAGE_FLOOR = len(FLOORS)


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PKG.rglob("*.py"))}


def import_statements(name: str, tree: ast.Module) -> Iterator[tuple[str, str | None]]:
    """(module, imported name or None) of every import in ``name``, at the top, inside functions or
    under ``TYPE_CHECKING`` (relative imports resolved)."""
    package = name if (PKG / Path(*name.split(".")[1:]) / "__init__.py").exists() else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((a.name, None) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            yield from ((base, a.name) for a in node.names)


def imported(name: str, tree: ast.Module) -> set[str]:
    """Every module ``name`` imports, and every ``module.name`` it imports from one."""
    out: set[str] = set()
    for base, alias in import_statements(name, tree):
        out.add(base)
        if alias is not None:
            out.add(f"{base}.{alias}")  # "from pipeline import train"
    return {m for m in out if m == "pipeline" or m.startswith("pipeline.")}


def edges(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """The package's modules ``name`` imports: ``from a.b import c`` is module ``a.b.c`` when that is a
    module, else ``a.b`` (its ``__init__``)."""
    out = {
        f"{base}.{alias}" if alias is not None and f"{base}.{alias}" in known else base
        for base, alias in import_statements(name, tree)
    }
    return {m for m in out if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    trees = modules()
    return {name: edges(name, tree, set(trees)) for name, tree in trees.items()}


def floor_of(module: str) -> int:
    """The floor of a module: -1 for the package root (``pipeline/__init__.py``, the version number)."""
    parts = module.split(".")
    if len(parts) == 1:
        return -1
    for i, packages in enumerate(FLOORS):
        if parts[1] in packages:
            return i
    assert len(parts) == 2 and not (PKG / parts[1]).is_dir(), f"{module}: its subpackage has no floor in FLOORS"
    return STAGE_FLOOR


def circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


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


def test_every_module_has_a_floor_and_the_package_root_imports_nothing():
    graph = import_graph()
    assert {name for name in graph if floor_of(name) == STAGE_FLOOR} == {f"pipeline.{s}" for s in STAGES}
    assert graph["pipeline"] == set()


def test_no_import_runs_up_the_floors():
    offences = [
        f"{name} (floor {floor_of(name)}) imports {target} (floor {floor_of(target)})"
        for name, targets in sorted(import_graph().items())
        for target in sorted(targets)
        if floor_of(target) > floor_of(name)
    ]
    assert offences == []


def test_no_import_circle():
    found = circles(import_graph())
    assert found == [], "circles: " + "; ".join(" <-> ".join(sorted(c)) for c in found)


def test_the_graph_counts_type_checking_and_function_imports_and_finds_circles():
    known = {"pipeline.a", "pipeline.b", "pipeline.c", "pipeline.d"}
    tree = ast.parse(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pipeline.b import B\n"
        "def f():\n    from pipeline import c\n    import pipeline.d\n"
    )
    assert edges("pipeline.a", tree, known) == {"pipeline.b", "pipeline.c", "pipeline.d"}
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(graph) == [{"a", "b", "c"}]


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


def family_branches(tree: ast.AST, families: set[str]) -> list[str]:
    """Comparisons with a model family's name (``==``, ``!=``, ``in``, ``not in``), ``match`` cases on
    one, and dicts keyed by them: the places that branch on the family."""

    def names(node: ast.AST) -> set[str]:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return {node.value} & families
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return set().union(*(names(e) for e in node.elts)) if node.elts else set()
        return set()

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            hit = names(node.left).union(*(names(c) for c in node.comparators))
            if hit:
                found.append(f"line {node.lineno}: compares with {sorted(hit)}")
        elif isinstance(node, ast.MatchValue) and names(node.value):
            found.append(f"line {node.lineno}: match case {sorted(names(node.value))}")
        elif isinstance(node, ast.Dict):
            keys = set().union(*(names(k) for k in node.keys if k is not None)) if node.keys else set()
            if keys:
                found.append(f"line {node.lineno}: dict keyed by {sorted(keys)}")
    return found


def test_no_branch_on_the_model_family_outside_the_backends():
    from pipeline.models.registry import model_registry

    families = {n.lower() for n in model_registry().names()}
    offences = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).as_posix()
        if rel.startswith("models/backends/"):
            continue
        offences += [f"{rel} {hit}" for hit in family_branches(ast.parse(path.read_text()), families)]
    assert offences == []
    sample = ast.parse("if spec.name == 'unet': pass\nx = {'fpn': 1}\nok = name in ('tta', 'none')")
    assert len(family_branches(sample, {"unet", "fpn"})) == 2
