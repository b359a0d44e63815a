"""The project's shape, read from its source: the imports of every module of `llama_jax/` and `api/`
(at any level: inside functions and `TYPE_CHECKING` blocks too) form no circle, `llama_jax` never
imports `api`, no module is over 450 lines, and no module reaches for another project module's
`_private` name (imported, or as `module._name`). Known exceptions are named below, each with the
issue that removes it; anything new fails.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("llama_jax", "api")
MAX_LINES = 450


def module_files() -> dict[str, Path]:
    """Every module of the project packages, by dotted name (a package by its own name)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = module_files()


def _base(name: str, path: Path, node: ast.ImportFrom) -> str:
    """The module an `from X import ...` names, relative imports resolved."""
    if not node.level:
        return node.module or ""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    package = package[: len(package) - node.level + 1]
    return ".".join(package + ([node.module] if node.module else []))


def _owner(dotted: str) -> str | None:
    """The project module `dotted` is, or lies in (`api.x.y` -> `api.x` when that is a module)."""
    while dotted:
        if dotted in MODULES:
            return dotted
        dotted = dotted.rpartition(".")[0]
    return None


def imports(name: str) -> tuple[set[str], list[tuple[str, str]]]:
    """(project modules `name` imports, its uses of other modules' private names as (module, name))."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(), str(path))
    targets: set[str] = set()
    private: list[tuple[str, str]] = []
    aliases: dict[str, str] = {}  # local name -> the project module it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if (owner := _owner(alias.name)) is not None:
                    targets.add(owner)
                    if alias.asname:
                        aliases[alias.asname] = owner
        elif isinstance(node, ast.ImportFrom):
            base = _base(name, path, node)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                if full in MODULES:  # `from package import module`
                    targets.add(full)
                    aliases[alias.asname or alias.name] = full
                elif (owner := _owner(base)) is not None:
                    targets.add(owner)
                    if alias.name.startswith("_") and owner != name:
                        private.append((owner, alias.name))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            private.append((aliases[node.value.id], node.attr))
    targets.discard(name)
    return targets, private


GRAPH = {name: imports(name)[0] for name in MODULES}


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_walk_sees_every_kind_of_import():
    """The walk is not vacuous: it finds both packages, a function-level import (api.cli imports
    api.app inside `serve`) and a TYPE_CHECKING one (api.shutdown's ServerContext)."""
    assert {"llama_jax.engine", "api.app", "api.chat", "api.context"} <= MODULES.keys()
    assert "api.app" in GRAPH["api.cli"] and "api.context" in GRAPH["api.shutdown"]
    assert "llama_jax.request" in GRAPH["api.context"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [frozenset("abc")]


def test_no_import_cycles():
    assert set(cycles(GRAPH)) == set(), "import cycles"


def test_engine_never_imports_the_server():
    offenders = {name: sorted(t for t in targets if t.split(".")[0] == "api")
                 for name, targets in GRAPH.items() if name.split(".")[0] == "llama_jax"}
    assert {name: t for name, t in offenders.items() if t} == {}


def test_no_module_over_450_lines():
    long = {name for name, path in MODULES.items() if len(path.read_text().splitlines()) > MAX_LINES}
    assert long == set(), f"modules over {MAX_LINES} lines"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_private_names_cross_modules(name):
    used = {(name, module, private) for module, private in imports(name)[1]}
    assert used == set()
