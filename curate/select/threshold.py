"""Threshold filters over stored score columns: compute scores once, decide many times.

A threshold keeps rows that satisfy `column op value` (e.g. `ifd < 1`, Cherry's rule that a response
must make the answer easier to predict), or `column op q0.9` where the cutoff is a quantile of the
column over the pool. Pure functions of the table: no model is ever called here.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

from curate.select.budget import SelectionError, column_values

_OPS: dict[str, Callable[[np.ndarray, float], np.ndarray]] = {
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
}
_PATTERN = re.compile(
    r"^\s*([A-Za-z_][\w.\-]*)\s*(>=|<=|>|<)\s*(q)?\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$"
)


@dataclass(frozen=True)
class Threshold:
    """Keep rows where `column op cutoff`; cutoff is `value`, or the `quantile` of the column's values.

    Rows with a missing score fail unless `keep_missing`.
    """

    column: str
    op: str
    value: float | None = None
    quantile: float | None = None
    keep_missing: bool = False

    def __post_init__(self) -> None:
        if self.op not in _OPS:
            raise SelectionError(f"threshold operator must be one of {list(_OPS)}, got {self.op!r}")
        if (self.value is None) == (self.quantile is None):
            raise SelectionError(f"threshold on {self.column!r}: give exactly one of value or quantile")
        if self.quantile is not None and not 0.0 <= self.quantile <= 1.0:
            raise SelectionError(f"quantile must lie in [0, 1], got {self.quantile}")
        if self.value is not None and not math.isfinite(self.value):
            raise SelectionError(f"threshold value must be finite, got {self.value}")

    @classmethod
    def parse(cls, text: str) -> Threshold:
        """'ifd < 1', 'deita_score >= 4.5', 'perplexity <= q0.95' (quantile over the pool)."""
        m = _PATTERN.match(text)
        if not m:
            raise SelectionError(
                f"cannot read threshold {text!r}; write e.g. 'ifd < 1' or 'perplexity <= q0.95'"
            )
        col, op, q, num = m.groups()
        return cls(col, op, quantile=float(num)) if q else cls(col, op, value=float(num))

    def __str__(self) -> str:
        rhs = f"q{self.quantile:g}" if self.quantile is not None else f"{self.value:g}"
        return f"{self.column} {self.op} {rhs}"

    def _values(self, pool: pl.DataFrame) -> np.ndarray:
        return column_values(pool, self.column, "threshold")

    def cutoff(self, pool: pl.DataFrame) -> float:
        """The numeric cutoff; a quantile is over the pool's non-missing values (linear interpolation)."""
        if self.value is not None:
            return float(self.value)
        v = self._values(pool)
        v = v[~np.isnan(v)]
        if v.size == 0:
            raise SelectionError(f"cannot take a quantile of {self.column!r}: no values")
        return float(np.quantile(v, self.quantile))

    def passes(self, pool: pl.DataFrame, cutoff: float | None = None) -> np.ndarray:
        """Bool per row: does the row satisfy this threshold?"""
        v = self._values(pool)
        c = self.cutoff(pool) if cutoff is None else cutoff
        with np.errstate(invalid="ignore"):
            ok = _OPS[self.op](v, c)
        return np.where(np.isnan(v), self.keep_missing, ok)


def as_thresholds(thresholds: Sequence[Threshold | str] | None) -> list[Threshold]:
    return [t if isinstance(t, Threshold) else Threshold.parse(t) for t in (thresholds or ())]


def resolve_thresholds(
    pool: pl.DataFrame, thresholds: Sequence[Threshold | str]
) -> list[tuple[Threshold, float]]:
    """Each threshold with its numeric cutoff on this pool (record these in the manifest)."""
    return [(t, t.cutoff(pool)) for t in as_thresholds(thresholds)]


def apply_thresholds(pool: pl.DataFrame, thresholds: Sequence[Threshold | str]) -> pl.DataFrame:
    """One row per pool row: `id`, `passed` (all thresholds hold), `failed` (first failing threshold with
    the cutoff and the row's value, or null). All cutoffs are computed on the whole pool, independently.
    """
    n = pool.height
    passed = np.ones(n, bool)
    failed = pl.Series("failed", [None] * n, dtype=pl.String)
    for t, cut in resolve_thresholds(pool, thresholds):
        ok = t.passes(pool, cut)
        newly = np.flatnonzero(~ok & passed)
        if newly.size:
            vals = t._values(pool)[newly]
            rhs = f"{cut:.6g}" + (f" (q{t.quantile:g})" if t.quantile is not None else "")
            msgs = [
                f"{t.column} {t.op} {rhs} failed: {t.column}={'null' if np.isnan(x) else f'{x:.6g}'}"
                for x in vals.tolist()
            ]
            failed = failed.scatter(newly, msgs)
        passed &= ok
    return pl.DataFrame({"id": pool["id"].cast(pl.String), "passed": passed, "failed": failed})
