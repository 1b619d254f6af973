"""The package's layout: packages by job, imports run one way only (down the layers below), no import circle.

Every import is counted, at the top of a module or inside a function; only `if TYPE_CHECKING:` blocks (type
hints, never run) are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "moefuse"

# Lowest first. A module may import from its own layer and the layers below, never from one above. The model folder
# format (pretrained) and the inference on raw inputs know no model class: the model class is passed in, so the
# model (fusion) can offer save_pretrained / from_pretrained / predict without an import running upward.
LAYERS = [
    {"moefuse.errors", "moefuse.configutil", "moefuse.outputs", "moefuse.progress", "moefuse.lazy"},
    {"moefuse.datasets"},
    {"moefuse.encoders"},
    {"moefuse.pretrained"},
    {"moefuse.inference"},
    {"moefuse.fusion"},
    {"moefuse.evaluation"},
    {"moefuse.train", "moefuse.config"},
    {"moefuse.commands", "moefuse.cli", "moefuse.__main__", "moefuse"},
]


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def layer_of(module: str) -> int:
    for depth in range(module.count(".") + 1, 0, -1):  # the longest prefix that names a layer
        prefix = ".".join(module.split(".")[:depth])
        for i, names in enumerate(LAYERS):
            if prefix in names:
                return i
    raise AssertionError(f"{module} is in no layer of tests/test_layout.py: place its package there")


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    hidden = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            hidden |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return hidden


def imports_of(module: str) -> set[str]:
    """The moefuse modules `module` imports (a package counts as its __init__)."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    hidden = _type_checking_nodes(tree)
    found = set()
    for node in ast.walk(tree):
        if id(node) in hidden:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                      for a in node.names}
    return {m for m in found if m in MODULES and m != module}


GRAPH = {m: imports_of(m) for m in MODULES}


def test_every_module_has_a_layer_and_no_import_runs_upward() -> None:
    upward = [f"{m} (layer {layer_of(m)}) imports {d} (layer {layer_of(d)})"
              for m, deps in GRAPH.items() for d in deps if layer_of(d) > layer_of(m)]
    assert not upward, "\n".join(upward)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan 1972), and modules importing themselves."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle() -> None:
    assert not _cycles(GRAPH)


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("package", sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()))
def test_every_package_says_what_lives_there(package: str) -> None:
    doc = ast.get_docstring(ast.parse((PACKAGE / package / "__init__.py").read_text()))
    assert doc and len(doc) > 40, f"moefuse/{package}/__init__.py needs a docstring saying what lives there"
