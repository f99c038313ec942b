"""Import structure, read from the source (AST), so a cycle cannot hide in a function-level import.

Every `import` and `from ... import` of the packages `curate`, `scorers` and `flows` counts, at module level or
inside a function or class; relative imports are resolved; `from pkg import name` points at the submodule
`pkg.name` when there is one, else at `pkg` itself. Imports under `if TYPE_CHECKING:` never run, so they are
left out of the cycle check (they still count for the layering check: the core must not even name its users).
Imports through `importlib.import_module(...)` are not seen (a registry that finds scorers that way is the
intended way to stay acyclic).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

from conftest import ROOT

PACKAGES = ("curate", "scorers", "flows")


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int
    where: str  # "module level" or "in f()"
    type_only: bool


def module_files(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the packages (a package is its __init__)."""
    out: dict[str, Path] = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest known module that `name` is or lies in (None: outside the packages)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return None


def import_edges(modules: dict[str, Path]) -> list[Edge]:
    """Every import between the modules, with its line, the function it sits in, and whether it is type-only."""
    edges: list[Edge] = []
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        _visit(tree, name, package, modules, edges, None, False)
    return list(dict.fromkeys(edges))  # `from m import a, b` is one import of m


def _visit(node: ast.AST, name: str, package: str, modules: dict[str, Path], edges: list[Edge], func: str | None,
           type_only: bool) -> None:
    targets: list[str] = []
    if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            anchor = package.split(".")
            anchor = anchor[:len(anchor) - (node.level - 1)]
            base = ".".join([*anchor, base] if base else anchor)
        targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    for t in targets:
        target = _resolve(t, modules)
        if target is not None and target != name:
            edges.append(Edge(name, target, node.lineno, f"in {func}()" if func else "module level", type_only))
    for child in ast.iter_child_nodes(node):
        inner = func
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inner = f"{func}.{node.name}" if func else node.name
        guarded = type_only or (isinstance(node, ast.If) and _is_type_checking(node.test) and child in node.body)
        _visit(child, name, package, modules, edges, inner, guarded)


def find_cycles(edges: list[Edge]) -> list[tuple[list[str], list[Edge]]]:
    """Each group of modules that import each other (directly or through one another), with one cycle as its
    edges: the shortest through the group's first module (the group may hold more cycles than the one shown)."""
    graph: dict[str, dict[str, Edge]] = {}
    for e in edges:
        graph.setdefault(e.source, {}).setdefault(e.target, e)  # the first import of a target is the example
        graph.setdefault(e.target, {})
    # Tarjan's strongly connected components, iterative (no recursion limit on big graphs)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    group.append(m)
                    if m == node:
                        break
                if len(group) > 1:
                    groups.append(sorted(group))
    cycles = []
    for group in groups:  # a shortest cycle through the group's first module (breadth-first inside the group)
        members, start = set(group), group[0]
        prev: dict[str, str] = {}
        frontier, seen, end = [start], {start}, None
        while frontier and end is None:
            nxt = []
            for u in frontier:
                for v in sorted(graph[u]):
                    if v == start:
                        end = u
                        break
                    if v in members and v not in seen:
                        seen.add(v)
                        prev[v] = u
                        nxt.append(v)
                if end is not None:
                    break
            frontier = nxt
        path = [end]
        while path[-1] != start:
            path.append(prev[path[-1]])
        path.reverse()
        cycles.append((group, [graph[a][b] for a, b in zip(path, [*path[1:], start], strict=True)]))
    return cycles


def describe(cycle: list[Edge]) -> str:
    hops = " -> ".join(f"{e.source} (line {e.line}, {e.where})" for e in cycle)
    return f"{hops} -> {cycle[0].source}"


# ---------------------------------------------------------------------------------------------- the checker


def test_checker_finds_function_level_and_relative_cycles(tmp_path):
    """The checker itself: a cycle hidden in a function, a relative import, a TYPE_CHECKING import."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("import pkg.b\n")
    (pkg / "b.py").write_text("def f():\n    from .sub import c\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("from ..a import x\n")  # a cycle: a -> b -> sub.c -> a
    (pkg / "d.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import e\n")
    (pkg / "e.py").write_text("from pkg import d\n")  # d <-> e only through a type-only import
    modules = module_files(tmp_path, ("pkg",))
    edges = import_edges(modules)
    runtime = [e for e in edges if not e.type_only]
    cycles = find_cycles(runtime)
    assert [(g, describe(c)) for g, c in cycles] == [(["pkg.a", "pkg.b", "pkg.sub.c"],
        "pkg.a (line 1, module level) -> pkg.b (line 2, in f()) -> pkg.sub.c (line 1, module level) -> pkg.a")]
    assert len(find_cycles(edges)) == 2  # counting the type-only import, d <-> e is a cycle too
    assert Edge("pkg.d", "pkg.e", 3, "module level", True) in edges


# ---------------------------------------------------------------------------------------------- the project


def test_no_import_cycles():
    edges = [e for e in import_edges(module_files(ROOT)) if not e.type_only]
    assert len(edges) > 50  # the checker sees the project (a wrong root would pass vacuously)
    cycles = find_cycles(edges)
    assert not cycles, "modules that import each other:\n" + "\n".join(
        f"{', '.join(g)}\n  e.g. {describe(c)}" for g, c in cycles)


def test_core_never_imports_scorers_or_flows():
    """`curate` is the core: only its CLI, at the top, may import the packages built on it."""
    modules = module_files(ROOT)
    assert "curate.cli" in modules and "scorers" in modules
    bad = [e for e in import_edges(modules)
           if e.source.split(".")[0] == "curate" and e.source != "curate.cli"
           and e.target.split(".")[0] in ("scorers", "flows")]
    assert not bad, f"{len(bad)} upward import(s):\n" + "\n".join(
        f"{e.source} line {e.line} ({e.where}{', type-only' if e.type_only else ''}) imports {e.target}"
        for e in bad)
