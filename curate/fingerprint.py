"""The code part of a stage's cache key: the source of the modules a stage declares, and of every project
module they import (at module level or inside functions), found by reading their syntax trees.

Why derived, not listed: hand-kept lists of files went stale (a stage read code its list did not name, so an
edit left stale cached results). Following imports means a stage is invalidated by an edit of anything it can
run, and by nothing else.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import os
import threading
from pathlib import Path

#: top-level packages whose source counts (third-party code is pinned by version in the manifest instead)
PROJECT_PACKAGES = ("curate", "scorers", "flows")


@functools.cache
def package_roots() -> dict[str, Path]:
    """Where each project package's source lies (found without importing it)."""
    roots = {}
    for pkg in PROJECT_PACKAGES:
        spec = importlib.util.find_spec(pkg)
        if spec is not None and spec.submodule_search_locations:
            roots[pkg] = Path(list(spec.submodule_search_locations)[0])
    return roots


def module_file(name: str, roots: dict[str, Path] | None = None) -> Path | None:
    """The source file of a project module, or None when `name` is not a project module."""
    pkg, *rest = name.split(".")
    base = (roots or package_roots()).get(pkg)
    if base is None:
        return None
    path = base.joinpath(*rest)
    for candidate in (path / "__init__.py", path.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


_PARSE_LOCK = threading.Lock()  # CPython 3.11's ast.parse is not safe in concurrent threads


def _imports(path: Path, module: str, roots: dict[str, Path] | None) -> set[str]:
    """Project modules imported anywhere in a file (`import a.b`, `from a import b`, `from a.b import c`)."""
    with _PARSE_LOCK:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
    out = set()
    for name in found:
        # importing a.b.c runs a/__init__ and a/b/__init__ too
        parts = name.split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return {m for m in out if module_file(m, roots) is not None}


def closure(modules: tuple[str, ...], roots: dict[str, Path] | None = None) -> tuple[str, ...]:
    """Every project module reachable by imports from `modules` (themselves included), sorted."""
    missing = [m for m in modules if module_file(m, roots) is None]
    if missing:
        raise ValueError(f"not project modules: {missing}")
    seen: set[str] = set()
    todo = list(modules)
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo.extend(_imports(module_file(m, roots), m, roots) - seen)  # type: ignore[arg-type]
    return tuple(sorted(seen))


def code_fingerprint(modules: tuple[str, ...], extra: str = "", roots: dict[str, Path] | None = None) -> str:
    """sha256 (16 hex) over the source of `closure(modules)` plus `extra` (e.g. a function's own source).

    CURATE_CODE_VERSION, when set, replaces the source hashes (pin caches across an edit known to be harmless).
    `roots` points the packages at another source tree (tests).
    """
    if os.environ.get("CURATE_CODE_VERSION"):
        return os.environ["CURATE_CODE_VERSION"]
    h = hashlib.sha256(extra.encode())
    for m in closure(tuple(sorted(set(modules))), roots):
        h.update(m.encode() + b"\0")
        h.update(module_file(m, roots).read_bytes())  # type: ignore[union-attr]
    return h.hexdigest()[:16]
