"""Budgets, quotas and the one allocation rule every stratified strategy shares.

`allocate` is the arithmetic behind "split B over clusters": largest-remainder rounding on top of a
water-filling share, so a cluster smaller than its share gives its shortfall to the others and the
sizes always add up to exactly min(budget, capacity). D&C's code uses floor(B/K) per cluster, which
silently under-fills when clusters are small; this is the fix (docs/methods.md section 4).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import polars as pl


class SelectionError(ValueError):
    """A user mistake in a selection config or pool (bad budget, missing column, ...): no traceback needed."""


@dataclass(frozen=True)
class Budget:
    """How much to keep: exactly one of `rows`, `fraction` (of the pool) or `tokens` (sum of `token_col`).

    A budget larger than the pool takes everything; that is not an error.
    """

    rows: int | None = None
    fraction: float | None = None
    tokens: int | None = None
    token_col: str = "n_tokens"

    def __post_init__(self) -> None:
        given = [k for k in ("rows", "fraction", "tokens") if getattr(self, k) is not None]
        if len(given) != 1:
            raise SelectionError(f"give exactly one of rows, fraction or tokens (got {given or 'none'})")
        if self.rows is not None and (not _is_int(self.rows) or self.rows < 0):
            raise SelectionError(f"rows budget must be a non-negative integer, got {self.rows!r}")
        if self.tokens is not None and (not _is_int(self.tokens) or self.tokens < 0):
            raise SelectionError(f"token budget must be a non-negative integer, got {self.tokens!r}")
        if self.fraction is not None and not (0.0 <= float(self.fraction) <= 1.0):
            raise SelectionError(f"fraction must lie in [0, 1], got {self.fraction!r}")

    @property
    def is_tokens(self) -> bool:
        return self.tokens is not None

    def resolve(self, pool: pl.DataFrame | int) -> int:
        """Target rows (row/fraction budgets) or tokens, clipped to what the pool holds.

        A fraction rounds half up: round(N * F), as D&C's B = round(N * fraction), but a positive fraction of a
        non-empty pool keeps at least one row: `--fraction 0.001` of 100 rows asked for a subset, and 0 rows
        gave an empty one with every row "cluster_quota_full" and exit code 0.
        """
        n = pool if isinstance(pool, int) else pool.height
        if self.rows is not None:
            return min(int(self.rows), n)
        if self.fraction is not None:
            k = int(math.floor(n * float(self.fraction) + 0.5))
            return min(max(k, 1) if float(self.fraction) > 0 else k, n)
        assert self.tokens is not None
        total = int(self.costs(pool).sum()) if isinstance(pool, pl.DataFrame) else int(self.tokens)
        return min(int(self.tokens), total)

    def costs(self, pool: pl.DataFrame) -> np.ndarray:
        """Per-row cost against this budget: 1 per row, or the row's token count (int64)."""
        if not self.is_tokens:
            return np.ones(pool.height, dtype=np.int64)
        if self.token_col not in pool.columns:
            raise SelectionError(f"token budget needs column {self.token_col!r} in the pool")
        col = pool[self.token_col]
        if col.null_count():
            raise SelectionError(f"column {self.token_col!r} has {col.null_count()} null token counts")
        out = col.cast(pl.Int64).to_numpy()
        if out.size and out.min() < 0:
            raise SelectionError(f"column {self.token_col!r} has negative token counts")
        return out

    def describe(self) -> str:
        if self.rows is not None:
            return f"{self.rows} rows"
        if self.fraction is not None:
            return f"{self.fraction:g} of the pool"
        return f"{self.tokens} tokens ({self.token_col})"


@dataclass(frozen=True)
class Quotas:
    """Per-source and per-cluster constraints on the subset.

    - `source_weights`: target *shares* of the budget per source (normalised); a source not listed gets
      weight 0 and is not selected. Shortfall of a small source goes to the others.
    - `cluster_weights`: *multipliers* on a cluster's base share (its size, or 1 for a uniform split);
      clusters not listed keep 1. Only stratified strategies (kMQ, iterative, per-cluster fusion) use them.
    - `cluster_min` / `cluster_max`: rows per cluster (bounded by the cluster's size). With
      `source_weights`, the bounds apply to each source's part of a cluster.
    """

    source_weights: Mapping[str, float] | None = None
    cluster_weights: Mapping[int, float] | None = None
    cluster_min: int = 0
    cluster_max: int | None = None

    def __post_init__(self) -> None:
        if not _is_int(self.cluster_min) or self.cluster_min < 0:
            raise SelectionError(f"cluster_min must be a non-negative integer, got {self.cluster_min!r}")
        if self.cluster_max is not None and (not _is_int(self.cluster_max) or self.cluster_max < 0):
            raise SelectionError(f"cluster_max must be a non-negative integer, got {self.cluster_max!r}")
        if self.cluster_max is not None and self.cluster_max < self.cluster_min:
            raise SelectionError(f"cluster_max ({self.cluster_max}) < cluster_min ({self.cluster_min})")
        for what, weights in (("source", self.source_weights), ("cluster", self.cluster_weights)):
            for key, w in (weights or {}).items():
                if not (isinstance(w, int | float) and math.isfinite(w) and w >= 0):
                    raise SelectionError(f"{what} weight for {key!r} must be a finite number >= 0, got {w!r}")
        if self.source_weights is not None and not any(w > 0 for w in self.source_weights.values()):
            raise SelectionError("source_weights must give at least one source a positive weight")

    @property
    def is_trivial(self) -> bool:
        return (
            not self.source_weights
            and not self.cluster_weights
            and self.cluster_min == 0
            and self.cluster_max is None
        )


def _is_int(x: object) -> bool:
    return isinstance(x, int | np.integer) and not isinstance(x, bool)


def allocate(
    sizes: np.ndarray | list[int],
    budget: int,
    *,
    proportional: bool = True,
    weights: np.ndarray | list[float] | None = None,
    min_per: int | np.ndarray = 0,
    max_per: int | np.ndarray | None = None,
) -> np.ndarray:
    """Split an integer `budget` over groups of the given `sizes` (int64 array, same length).

    Shares follow `weights` (default: the sizes if `proportional`, else equal for non-empty groups),
    capped by each group's capacity min(size, max_per); a capped group's shortfall is redistributed by
    weight (water-filling), then rounded by largest remainder (ties: lower index first). Every group
    first gets min(min_per, capacity). The result sums to exactly min(budget, capacity of groups that
    can receive). If the minimums alone exceed the budget, the budget is shared in proportion to them.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    if sizes.ndim != 1:
        raise SelectionError("sizes must be a 1-D array")
    if sizes.size and sizes.min() < 0:
        raise SelectionError("sizes must be >= 0")
    if not _is_int(budget) or budget < 0:
        raise SelectionError(f"budget must be a non-negative integer, got {budget!r}")
    g = sizes.size
    if weights is None:
        w = sizes.astype(np.float64) if proportional else (sizes > 0).astype(np.float64)
    else:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != sizes.shape:
            raise SelectionError(f"weights has shape {w.shape}, sizes {sizes.shape}")
        if not np.all(np.isfinite(w)) or (w.size and w.min() < 0):
            raise SelectionError("weights must be finite and >= 0")
    w = np.where(sizes > 0, w, 0.0)
    cap = sizes if max_per is None else np.minimum(sizes, np.broadcast_to(np.asarray(max_per, np.int64), g))
    lo = np.minimum(np.broadcast_to(np.asarray(min_per, np.int64), g), cap)
    cap_eff = np.where(w > 0, cap, lo)
    target = int(min(int(budget), int(cap_eff.sum())))
    if int(lo.sum()) >= target:
        if int(lo.sum()) == target:
            return lo.astype(np.int64).copy()
        return _water_fill(lo, lo.astype(np.float64), target)
    return lo + _water_fill(cap_eff - lo, w, target - int(lo.sum()))


def _water_fill(room: np.ndarray, w: np.ndarray, total: int) -> np.ndarray:
    """Integer a <= room with sum(a) == total, a ~ w * lam capped at room (largest remainder)."""
    room = np.asarray(room, dtype=np.int64)
    out = np.zeros_like(room)
    active = np.flatnonzero((room > 0) & (w > 0))
    if total <= 0 or active.size == 0:
        return out
    if total >= int(room[active].sum()):
        out[active] = room[active]
        return out
    r, wa = room[active].astype(np.float64), w[active]
    ratio = r / wa
    order = np.argsort(ratio, kind="stable")
    r_s, w_s, ratio_s = r[order], wa[order], ratio[order]
    # With the first k (smallest ratio) groups saturated, the rest share what is left at level lam_k.
    room_before = np.concatenate(([0.0], np.cumsum(r_s)[:-1]))
    w_from = np.cumsum(w_s[::-1])[::-1]
    lam = (total - room_before) / w_from
    k = int(np.argmax(lam <= ratio_s))  # first group the level does not saturate
    x = np.empty_like(r)
    x[order[:k]] = r_s[:k]
    x[order[k:]] = np.minimum(w_s[k:] * lam[k], r_s[k:])
    base = np.floor(x + 1e-9).astype(np.int64)
    base = np.minimum(base, room[active])
    left = total - int(base.sum())
    frac = x - base
    if left > 0:
        can = np.flatnonzero(base < room[active])
        pick = can[np.lexsort((can, -frac[can]))[:left]]
        base[pick] += 1
    elif left < 0:  # float slack only: take back from the smallest remainders
        can = np.flatnonzero(base > 0)
        pick = can[np.lexsort((can, frac[can]))[:-left]]
        base[pick] -= 1
    out[active] = base
    return out


def column_values(pool: pl.DataFrame, col: str, what: str = "score") -> np.ndarray:
    """A pool column as float64, NaN for nulls and non-finite values; a boolean flag (`heur_refusal`) reads as 0/1.
    One reading for scores, fusion criteria and thresholds; `what` names the column's role in the errors."""
    if col not in pool.columns:
        raise SelectionError(f"{what} column {col!r} not in pool (columns: {', '.join(pool.columns)})")
    s = pool[col]
    if s.dtype == pl.Boolean:
        s = s.cast(pl.Int8)
    if not s.dtype.is_numeric():
        raise SelectionError(f"{what} column {col!r} is {s.dtype}, not numeric")
    v = s.cast(pl.Float64).fill_null(np.nan).to_numpy().copy()
    v[~np.isfinite(v)] = np.nan
    return v
