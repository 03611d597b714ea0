"""The package's shape, checked on its source (oracle: Python's own parser, ``ast``).

- No import cycles between fisherscan's modules, imports inside functions included (those under
  ``if TYPE_CHECKING:`` excluded). Importing ``a.b.c`` runs the package ``__init__`` of ``a.b`` too, so that edge
  counts as well (except towards the importer's own packages).
- The layers: the model layer imports nothing from the Fisher layer; nothing imports a recipe except the command
  line and the built-in benchmarks.
- No function over 80 lines (``end_lineno - lineno + 1`` of the def) and no module over 500 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import fisherscan

PACKAGE = Path(fisherscan.__file__).resolve().parent
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 500


def module_name(path: Path) -> str:
    parts = ["fisherscan", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (getattr(test, "id", None) == "TYPE_CHECKING"
                                         or getattr(test, "attr", None) == "TYPE_CHECKING")


def _statements(tree: ast.AST):
    """Every import statement, at any depth, outside ``if TYPE_CHECKING:`` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if _type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _targets(node: ast.AST, importer: str) -> set[str]:
    """The fisherscan modules an import statement loads."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name.split(".")[0] == "fisherscan"}
    base = importer if is_package(importer) else importer.rsplit(".", 1)[0]
    for _ in range(node.level - 1):
        base = base.rsplit(".", 1)[0]
    module = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
    if module is None or module.split(".")[0] != "fisherscan":
        return set()
    found = {module}
    for alias in node.names:  # ``from package import submodule`` loads the submodule
        if f"{module}.{alias.name}" in MODULES:
            found.add(f"{module}.{alias.name}")
    return found


def imports_of(name: str) -> set[str]:
    """The modules ``name`` makes Python run: its imports and their parent packages, not its own ancestors."""
    tree = ast.parse(MODULES[name].read_text())
    own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    edges = set()
    for node in _statements(tree):
        for target in _targets(node, name):
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                step = ".".join(parts[:i])
                if step in MODULES and step not in own and step != name:
                    edges.add(step)
    return edges


GRAPH = {name: imports_of(name) for name in MODULES}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_cycle_and_only_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_an_import_inside_a_function_counts_and_type_checking_does_not(tmp_path):
    source = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import x\n"
              "def f():\n    from .c import y\n")
    tree = ast.parse(source)
    found = [(node.module, node.level) for node in _statements(tree) if isinstance(node, ast.ImportFrom)]
    assert ("c", 1) in found and ("b", 1) not in found


def test_the_graph_sees_real_edges():
    assert "fisherscan.fisher.loss" in GRAPH["fisherscan.fisher.engine"]
    assert "fisherscan.models" in GRAPH["fisherscan.fisher.engine"]  # the package __init__ runs too
    assert "fisherscan.recipes.score" in GRAPH["fisherscan.cli.score"]  # an import inside a function


def test_no_import_cycles():
    assert cycles(GRAPH) == []


def test_the_model_layer_imports_nothing_from_the_fisher_layer():
    bad = {(m, t) for m, targets in GRAPH.items() if m.startswith("fisherscan.models")
           for t in targets if t.startswith("fisherscan.fisher")}
    assert not bad


def test_only_the_command_line_and_the_benchmarks_import_recipes():
    allowed = ("fisherscan.cli", "fisherscan.bench", "fisherscan.recipes", "fisherscan.__main__")
    bad = {(m, t) for m, targets in GRAPH.items() if not m.startswith(allowed)
           for t in targets if t.startswith("fisherscan.recipes")}
    assert not bad


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_and_function_lengths(name):
    source = MODULES[name].read_text()
    assert len(source.splitlines()) <= MAX_MODULE_LINES, f"{name}: {len(source.splitlines())} lines"
    long = [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{name}: functions over {MAX_FUNCTION_LINES} lines: {long}"
