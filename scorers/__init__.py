"""Scorer registry: every module in this package is scanned, so adding a method = adding one file.

`get_scorer(name, **params)` builds a scorer; `available()` lists the registered names. A module that
fails to import is reported (warning, and in the error for its name) instead of hiding every scorer.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import warnings
from typing import Any

from scorers.base import Needs, ScoreContext, Scorer, ScorerError, ScorerParams

__all__ = [
    "Needs", "ScoreContext", "Scorer", "ScorerError", "ScorerParams",
    "available", "get_scorer", "scorer_class",
]

_REGISTRY: dict[str, type[Scorer]] | None = None
_BROKEN: dict[str, str] = {}  # module name -> import error


def _discover() -> dict[str, type[Scorer]]:
    global _REGISTRY
    if _REGISTRY is not None:
        return _REGISTRY
    found: dict[str, type[Scorer]] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name == "base" or info.name.startswith("_"):
            continue
        modname = f"{__name__}.{info.name}"
        try:
            mod = importlib.import_module(modname)
        except Exception as e:  # one broken method must not take the others down
            _BROKEN[info.name] = f"{type(e).__name__}: {e}"
            warnings.warn(f"scorer module {modname} failed to import: {e}", stacklevel=2)
            continue
        for _, cls in inspect.getmembers(mod, inspect.isclass):
            if issubclass(cls, Scorer) and cls.__module__ == modname and "name" in cls.__dict__:
                if cls.name in found and found[cls.name] is not cls:
                    raise ScorerError(f"two scorers are named {cls.name!r}: {found[cls.name]} and {cls}")
                found[cls.name] = cls
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
    hint = f"; module {name!r} failed to import: {_BROKEN[name]}" if name in _BROKEN else ""
    raise ScorerError(f"unknown scorer {name!r}; available: {', '.join(reg) or 'none'}{hint}")


def get_scorer(name: str, **params: Any) -> Scorer:
    """Build the scorer `name` with validated parameters."""
    return scorer_class(name)(**params)
