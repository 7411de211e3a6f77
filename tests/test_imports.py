"""
No import cycle among rtunnel's modules.

Every module under C{rtunnel/} is parsed (not imported) with L{ast}, and each
import of another rtunnel module is an edge of a graph; a cycle in that
graph fails the test, named module by module. What counts as an edge:

 - C{import rtunnel.x.y}, C{from rtunnel.x import y}, and the relative
   forms (C{from .x import y}, C{from .. import x}); C{from P import y}
   is an edge to the module C{P.y} when that is a module, else to C{P}
   (its C{__init__}).
 - Imports inside functions count: they run later, so the interpreter
   would not trip over such a cycle, but the two modules still know each
   other, which is what layering forbids (the lazy imports rtunnel has all
   point down the layers).
 - Imports under C{if TYPE_CHECKING:} count as well, for the same reason:
   they create no cycle at run time, but a type-only import back up the
   layers is still two modules written against each other (the cycle this
   test was written for was one: C{adapter/stream.py} imported
   C{MuxProtocol} for type checking only, while C{adapter/protocol.py}
   imports the stream).
 - The implicit import of a module's own parent packages is not an edge:
   C{rtunnel/adapter/__init__.py} importing C{.protocol}, which is inside
   that package, is how packages work, not a cycle.

Run as a script (C{.venv/bin/python tests/test_imports.py}) it prints the
cycles, or that there are none, and exits 1 or 0.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "rtunnel"


def module_names(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the package: dotted name (a package by its own name) to file."""
    names = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The rtunnel modules that module C{name} (at C{path}) imports, anywhere in it."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def add(target: str) -> None:
        # The longest prefix that is one of ours: "rtunnel.mux.errors.ErrorCode" is rtunnel.mux.errors.
        parts = target.split(".")
        while parts:
            candidate = ".".join(parts)
            if candidate in modules:
                if candidate != name:
                    found.add(candidate)
                return
            parts.pop()

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            if not (prefix == PACKAGE or prefix.startswith(PACKAGE + ".")):
                continue
            for alias in node.names:
                add(f"{prefix}.{alias.name}" if f"{prefix}.{alias.name}" in modules else prefix)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = module_names(root)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """
    The graph's strongly connected components of more than one module (or
    a module importing itself), each as one cycle through them, found with
    Tarjan's algorithm.
    """
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_one_cycle(graph, set(component)) for component in components]


def _one_cycle(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A path from the component's first module back to itself, within the component."""
    start = min(component)
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for succ in sorted(graph[node] & component):
            if succ == start:
                return [*paths[node], start]
            if succ not in paths:
                paths[succ] = [*paths[node], succ]
                queue.append(succ)
    raise AssertionError(f"no cycle through {sorted(component)}")  # pragma: no cover


class ImportCycleTests(SynchronousTestCase):
    def test_no_import_cycle(self) -> None:
        """No rtunnel module imports, directly or through others, one that imports it."""
        found = cycles(import_graph())
        self.assertEqual(found, [], "import cycles: " + "; ".join(" -> ".join(c) for c in found))

    def test_graph_sees_every_kind_of_import(self) -> None:
        """
        The graph has the edges it must: relative and absolute imports,
        C{from . import x}, imports inside functions and type-only ones
        (parsed from a package written for the test).
        """
        root = Path(self.mktemp())
        pkg = root / PACKAGE / "sub"
        pkg.mkdir(parents=True)
        (root / PACKAGE / "__init__.py").write_text("")
        (root / PACKAGE / "top.py").write_text("import rtunnel.sub.b\n")
        (pkg / "__init__.py").write_text("from . import a\n")
        (pkg / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import B\n")
        (pkg / "b.py").write_text("def f():\n    from ..top import x\n")
        graph = import_graph(root)
        self.assertEqual(
            graph,
            {
                "rtunnel": set(),
                "rtunnel.top": {"rtunnel.sub.b"},
                "rtunnel.sub": {"rtunnel.sub.a"},
                "rtunnel.sub.a": {"rtunnel.sub.b"},
                "rtunnel.sub.b": {"rtunnel.top"},
            },
        )
        self.assertEqual(cycles(graph), [["rtunnel.sub.b", "rtunnel.top", "rtunnel.sub.b"]])

    def test_cycle_is_named(self) -> None:
        """A cycle is reported as the path of modules that closes it."""
        graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
        self.assertEqual(cycles(graph), [["a", "b", "c", "a"], ["e", "e"]])


if __name__ == "__main__":
    found = cycles(import_graph())
    for cycle in found:
        print("import cycle: " + " -> ".join(cycle))
    if not found:
        print(f"no import cycle among {len(module_names())} rtunnel modules")
    sys.exit(1 if found else 0)
