"""The import graph of a package, read statically (imports under ``if TYPE_CHECKING:`` excluded)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def import_graph(root: Path, *, external: bool = False) -> dict[str, set[str]]:
    """``{module: modules of the same package it imports}``, module- and function-level alike (with
    ``external``: every imported name, other packages' included)."""
    mods: dict[str, Path] = {}
    for path in root.rglob("*.py"):
        rel = path.relative_to(root.parent).with_suffix("")
        name = ".".join(rel.parts)
        mods[name.removesuffix(".__init__")] = path

    def imports(path: Path, name: str) -> set[str]:
        found: set[str] = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]

        class Visitor(ast.NodeVisitor):
            def visit_If(self, node: ast.If) -> None:
                test = node.test
                if getattr(test, "id", None) == "TYPE_CHECKING" or getattr(test, "attr", None) == "TYPE_CHECKING":
                    for child in node.orelse:
                        self.visit(child)
                    return
                self.generic_visit(node)

            def visit_Import(self, node: ast.Import) -> None:
                found.update(a.name for a in node.names)

            def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    module = ".".join(parts + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                found.add(module)
                found.update(f"{module}.{a.name}" for a in node.names)

        Visitor().visit(ast.parse(path.read_text(encoding="utf-8")))
        if external:
            return found
        out = set()
        for module in found:
            while module and module not in mods:
                module = module.rpartition(".")[0]
            if module and module != name:
                out.add(module)
        return out

    return {name: imports(path, name) for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found
