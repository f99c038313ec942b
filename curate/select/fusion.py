"""Score fusion: TOPSIS (Hwang & Yoon) or weighted rank over any set of score columns, then top-k.

`topsis` is public because DONOD's scorer combines DON (benefit) and NOD (cost) with it
(docs/methods.md section 1). Weights are normalised to sum 1; TOPSIS closeness does not depend on their scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import polars as pl
from scipy.stats import rankdata

from curate.select.base import PoolView, fill_stratified, walk
from curate.select.budget import Budget, Quotas, SelectionError, column_values


def _prepare(
    matrix: np.ndarray,
    weights: Sequence[float] | np.ndarray | None,
    benefit: Sequence[bool] | np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = np.asarray(matrix, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2:
        raise SelectionError(f"decision matrix must be 2-D (rows x criteria), got shape {x.shape}")
    m = x.shape[1]
    if not np.all(np.isfinite(x)):
        raise SelectionError("decision matrix has NaN or infinite values (impute missing scores first)")
    w = np.full(m, 1.0 / m) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (m,) or not np.all(np.isfinite(w)) or w.min() < 0 or w.sum() <= 0:
        raise SelectionError(f"need {m} finite non-negative weights with a positive sum, got {w.tolist()}")
    b = np.ones(m, bool) if benefit is None else np.asarray(benefit, dtype=bool)
    if b.shape != (m,):
        raise SelectionError(f"need {m} benefit flags, got {b.tolist()}")
    return x, w / w.sum(), b


def topsis(
    matrix: np.ndarray,
    weights: Sequence[float] | np.ndarray | None = None,
    benefit: Sequence[bool] | np.ndarray | None = None,
    *,
    normalization: Literal["vector", "minmax"] = "vector",
) -> np.ndarray:
    """TOPSIS closeness C in [0, 1] per row (higher is better).

    matrix: n rows x m criteria; weights: m (default equal); benefit: m flags, True = higher is better,
    False = a cost. "vector" divides each column by its L2 norm (the classic form; sign-sensitive when
    values can be negative, e.g. DON), "minmax" maps each column to [0, 1]. A constant column carries no
    information and is zeroed; a row equally far from both ideals (all columns constant) gets C = 0.5.
    """
    x, w, b = _prepare(matrix, weights, benefit)
    if normalization not in ("vector", "minmax"):
        raise SelectionError(f"normalization must be 'vector' or 'minmax', got {normalization!r}")
    if x.shape[0] == 0:
        return np.zeros(0)
    if normalization == "vector":
        norm = np.sqrt((x**2).sum(axis=0))
        r = np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)
    else:
        lo = x.min(axis=0)
        span = x.max(axis=0) - lo
        r = np.divide(x - lo, span, out=np.zeros_like(x), where=span > 0)
    v = r * w
    vmax, vmin = v.max(axis=0), v.min(axis=0)
    ideal, anti = np.where(b, vmax, vmin), np.where(b, vmin, vmax)
    d_pos = np.sqrt(((v - ideal) ** 2).sum(axis=1))
    d_neg = np.sqrt(((v - anti) ** 2).sum(axis=1))
    tot = d_pos + d_neg
    return np.divide(d_neg, tot, out=np.full_like(tot, 0.5), where=tot > 0)


def rank_fusion(
    matrix: np.ndarray,
    weights: Sequence[float] | np.ndarray | None = None,
    benefit: Sequence[bool] | np.ndarray | None = None,
) -> np.ndarray:
    """Weighted mean of per-column percentile ranks in [0, 1] (1 = best; ties share the average rank).

    Robust to scale and outliers where TOPSIS is not; use it when columns live on unrelated scales.
    """
    x, w, b = _prepare(matrix, weights, benefit)
    n = x.shape[0]
    if n == 0:
        return np.zeros(0)
    oriented = np.where(b, x, -x)
    ranks = rankdata(oriented, method="average", axis=0)
    pct = (ranks - 1.0) / (n - 1) if n > 1 else np.ones_like(ranks)
    return pct @ w


def fused_scores(
    pool: pl.DataFrame,
    columns: Sequence[str],
    weights: Sequence[float] | None = None,
    cost: Sequence[str] = (),
    *,
    method: Literal["topsis", "rank"] = "topsis",
    normalization: Literal["vector", "minmax"] = "vector",
) -> np.ndarray:
    """Fuse pool columns into one score. A missing value takes the column's worst observed value."""
    if not columns:
        raise SelectionError("fusion needs at least one score column")
    unknown = set(cost) - set(columns)
    if unknown:
        raise SelectionError(
            f"cost columns {sorted(unknown)} are not among the fused columns {list(columns)}"
        )
    view_cols = []
    for c in columns:
        v = column_values(pool, c)
        if pool.height and np.isnan(v).all():
            raise SelectionError(f"score column {c!r} has no values")
        if np.isnan(v).any():
            v[np.isnan(v)] = np.nanmax(v) if c in cost else np.nanmin(v)
        view_cols.append(v)
    x = np.column_stack(view_cols) if view_cols else np.zeros((pool.height, 0))
    benefit = [c not in cost for c in columns]
    if method == "topsis":
        return topsis(x, weights, benefit, normalization=normalization)
    if method == "rank":
        return rank_fusion(x, weights, benefit)
    raise SelectionError(f"fusion method must be 'topsis' or 'rank', got {method!r}")


@dataclass(frozen=True)
class Fusion:
    """Top-k by a fused score. `cost` names columns where lower is better (e.g. perplexity).

    Global top-k by default (cluster_max / source_weights act as caps, unselected rows are `outranked`);
    `per_cluster=True` splits the budget over clusters like kMQ and takes each cluster's best rows.
    """

    columns: tuple[str, ...]
    weights: tuple[float, ...] | None = None
    cost: tuple[str, ...] = ()
    method: Literal["topsis", "rank"] = "topsis"
    normalization: Literal["vector", "minmax"] = "vector"
    per_cluster: bool = False
    name: ClassVar[str] = "fusion"

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "columns", tuple([self.columns] if isinstance(self.columns, str) else self.columns)
        )
        object.__setattr__(self, "cost", tuple([self.cost] if isinstance(self.cost, str) else self.cost))
        if self.weights is not None:
            object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
            if len(self.weights) != len(self.columns):
                raise SelectionError(f"{len(self.columns)} columns but {len(self.weights)} weights")

    def scores(self, pool: pl.DataFrame) -> np.ndarray:
        return fused_scores(
            pool, self.columns, self.weights, self.cost, method=self.method, normalization=self.normalization
        )

    def select(
        self,
        pool: pl.DataFrame,
        budget: Budget,
        *,
        seed: int,
        quotas: Quotas | None = None,
        embeddings: np.ndarray | None = None,
    ) -> pl.DataFrame:
        view = PoolView.build(pool, budget)
        order = view.order_by(self.scores(pool))
        if self.per_cluster:
            reason = fill_stratified(view, order, view.target, quotas)
        else:
            reason = walk(view, order, quotas)
        return view.decisions(reason, order)
