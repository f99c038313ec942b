"""Which scorers exist: every class registered under the `curate.scorers` entry-point group.

Why entry points: the core must not import the method packages built on it (they import the core), and a
user's own package can add a scorer by declaring one entry point, with no change to curate. The built-in
methods (`scorers/`) are registered in curate's own pyproject.toml. A scorer that fails to load is reported
(in the error for its name) instead of hiding every other scorer.
"""

from __future__ import annotations

import warnings
from importlib.metadata import entry_points
from typing import Any

from curate.scoring.contract import Scorer, ScorerError

GROUP = "curate.scorers"
_REGISTRY: dict[str, type[Scorer]] | None = None
_BROKEN: dict[str, str] = {}  # entry-point name -> load error


def _discover() -> dict[str, type[Scorer]]:
    global _REGISTRY
    if _REGISTRY is not None:
        return _REGISTRY
    found: dict[str, type[Scorer]] = {}
    for ep in entry_points(group=GROUP):
        try:
            cls = ep.load()
        except Exception as e:  # one broken method must not take the others down
            _BROKEN[ep.name] = f"{type(e).__name__}: {e}"
            warnings.warn(f"scorer {ep.name!r} ({ep.value}) failed to load: {e}", stacklevel=2)
            continue
        if not (isinstance(cls, type) and issubclass(cls, Scorer)) or getattr(cls, "name", None) != ep.name:
            _BROKEN[ep.name] = f"{ep.value} is not a Scorer named {ep.name!r}"
            continue
        if ep.name in found and found[ep.name] is not cls:
            raise ScorerError(f"two scorers are named {ep.name!r}: {found[ep.name]} and {cls}")
        found[ep.name] = cls
    _REGISTRY = dict(sorted(found.items()))
    return _REGISTRY


def available() -> list[str]:
    """Names of every registered scorer, sorted."""
    return list(_discover())


def scorer_class(name: str) -> type[Scorer]:
    """The Scorer subclass registered under `name` (clear error when unknown or broken)."""
    reg = _discover()
    if name in reg:
        return reg[name]
    hint = f"; {name!r} failed to load: {_BROKEN[name]}" if name in _BROKEN else ""
    none = "none (is curate installed? pip install -e .)"
    raise ScorerError(f"unknown scorer {name!r}; available: {', '.join(reg) or none}{hint}")


def get_scorer(name: str, **params: Any) -> Scorer:
    """Build the scorer `name` with validated parameters."""
    return scorer_class(name)(**params)
