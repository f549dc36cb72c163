"""The shape a newcomer can hold in their head (issue 19): rooms of a readable size and imports that flow one way.

Every module of `wiki_embeddings/` under 600 lines, every class under 350, no import cycle between the package's
modules (imports inside functions count; a `TYPE_CHECKING` import is no runtime edge), no Dagster in core/, and
SQL / HTTP each in one place."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PACKAGE = Path(__file__).resolve().parents[2] / "wiki_embeddings"
MAX_MODULE_LINES = 600
MAX_CLASS_LINES = 350


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def runtime_imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules `name` imports when it runs (module level or inside functions)."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    edges: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                edges.add(target)
    return edges


def test_every_module_is_a_few_hundred_lines_and_every_class_has_one_job():
    too_long = []
    for name, path in modules().items():
        text = path.read_text()
        lines = text.count("\n") + 1
        if lines > MAX_MODULE_LINES:
            too_long.append(f"{name}: {lines} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef) and node.end_lineno is not None:
                size = node.end_lineno - node.lineno + 1
                if size > MAX_CLASS_LINES:
                    too_long.append(f"{name}.{node.name}: {size} lines")
    assert too_long == []


def test_no_import_cycle_between_the_packages_modules():
    found = modules()
    known = set(found)
    graph = {name: runtime_imports(name, path, known) for name, path in found.items()}
    # A package's __init__ re-exporting its own modules is no cycle of its modules: edges from a package to its
    # submodules are dropped (a submodule importing its package's facade is kept, and would be a cycle).
    for name in graph:
        graph[name] = {t for t in graph[name] if not t.startswith(name + ".")}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert cycles == [], " | ".join(" -> ".join(c) for c in cycles)


def test_the_core_imports_no_dagster_and_sql_and_http_live_in_one_place_each():
    for name, path in modules().items():
        text = path.read_text()
        if name.startswith("wiki_embeddings.core"):
            assert "import dagster" not in text, name
        if "import psycopg" in text or "from psycopg" in text:
            assert name.startswith(("wiki_embeddings.core.db", "wiki_embeddings.devtools")), name
        if "import httpx" in text:
            assert name.startswith(("wiki_embeddings.core.embedders", "wiki_embeddings.devtools")), name
