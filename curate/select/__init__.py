"""Selection: from a scored, clustered pool, choose the subset to train on and say why for every row.

    from curate.select import select, Budget, Quotas, KMQ
    decisions = select(pool, KMQ(score_col="deita_quality"), Budget(rows=5000), seed=0)

`select` applies threshold filters first, then the strategy within quotas, and checks that every pool
row ends with exactly one reason and that the budget holds. Strategies share one shape (`Strategy`):
a frozen config with `select(pool, budget, *, seed, quotas=None, embeddings=None) -> decisions`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import polars as pl

from curate.run import ConservationError
from curate.select.base import (
    BELOW_THRESHOLD,
    CLUSTER_QUOTA_FULL,
    DECISION_SCHEMA,
    OUTRANKED,
    R_BELOW,
    REASONS,
    REDUNDANT,
    SELECTED,
    SOURCE_QUOTA_FULL,
    Strategy,
    make_decisions,
)
from curate.select.baseline import RandomSubset
from curate.select.budget import Budget, Quotas, SelectionError, allocate
from curate.select.deita import DeitaFilter
from curate.select.fusion import Fusion, rank_fusion, topsis
from curate.select.iterative import IterativeRefinement
from curate.select.kmq import KMQ
from curate.select.threshold import Threshold, apply_thresholds, as_thresholds, resolve_thresholds

STRATEGIES: dict[str, type] = {
    "kmq": KMQ,
    "iterative": IterativeRefinement,
    "deita": DeitaFilter,
    "fusion": Fusion,
    "random": RandomSubset,
}

__all__ = [
    "BELOW_THRESHOLD",
    "CLUSTER_QUOTA_FULL",
    "DECISION_SCHEMA",
    "KMQ",
    "OUTRANKED",
    "REASONS",
    "REDUNDANT",
    "SELECTED",
    "SOURCE_QUOTA_FULL",
    "STRATEGIES",
    "Budget",
    "DeitaFilter",
    "Fusion",
    "IterativeRefinement",
    "Quotas",
    "RandomSubset",
    "SelectionError",
    "Strategy",
    "Threshold",
    "allocate",
    "apply_thresholds",
    "make_strategy",
    "rank_fusion",
    "resolve_thresholds",
    "select",
    "topsis",
]


def make_strategy(name: str, **params: Any) -> Strategy:
    """A strategy by name (`kmq`, `iterative`, `deita`, `fusion`, `random`) from config parameters."""
    cls = STRATEGIES.get(name)
    if cls is None:
        raise SelectionError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    try:
        return cls(**params)
    except TypeError as e:
        raise SelectionError(f"bad parameters for strategy {name!r}: {e}") from None


def select(
    pool: pl.DataFrame,
    strategy: Strategy | str,
    budget: Budget,
    quotas: Quotas | None = None,
    thresholds: Sequence[Threshold | str] = (),
    seed: int = 0,
    embeddings: np.ndarray | None = None,
) -> pl.DataFrame:
    """Decisions for every pool row (pool order): id, selected, reason, rank_in_cluster, round, detail.

    A fraction budget is a fraction of the whole pool given here (before thresholds); rows failing a
    threshold get `below_threshold` (detail: which one) and the strategy chooses among the rest.
    """
    if isinstance(strategy, str):
        strategy = make_strategy(strategy)
    if not isinstance(pool, pl.DataFrame):
        raise SelectionError(f"pool must be a polars DataFrame, got {type(pool).__name__}")
    if "id" not in pool.columns:
        raise SelectionError("pool has no 'id' column")
    if embeddings is not None and len(embeddings) != pool.height:
        raise SelectionError(f"{len(embeddings)} embedding rows for a pool of {pool.height}")
    inner = budget if budget.is_tokens else Budget(rows=budget.resolve(pool))
    ths = as_thresholds(thresholds)
    if ths:
        checked = apply_thresholds(pool, ths)
        mask = checked["passed"].to_numpy()
    else:
        mask = np.ones(pool.height, bool)
    eligible = pool.filter(pl.Series(mask)) if not mask.all() else pool
    emb = None if embeddings is None else (embeddings if mask.all() else np.asarray(embeddings)[mask])
    dec = strategy.select(eligible, inner, seed=seed, quotas=quotas, embeddings=emb)
    dec = _aligned(eligible, dec, strategy)
    if not mask.all():
        below = np.flatnonzero(~mask)
        rejected = make_decisions(
            pool["id"].cast(pl.String).gather(below),
            np.full(below.size, R_BELOW),
            detail=(np.arange(below.size), checked["failed"].gather(below).to_list()),
        )
        pos = np.empty(pool.height, np.int64)
        pos[np.flatnonzero(mask)] = np.arange(int(mask.sum()))
        pos[below] = int(mask.sum()) + np.arange(below.size)
        dec = pl.concat([dec, rejected]).select(pl.all().gather(pos))
    check_decisions(pool, dec, budget)
    return dec


def _aligned(eligible: pl.DataFrame, dec: pl.DataFrame, strategy: Strategy) -> pl.DataFrame:
    """The strategy's decisions in eligible-pool order, with the schema (foreign strategies may reorder)."""
    missing = set(DECISION_SCHEMA) - set(dec.columns) - {"detail", "round", "rank_in_cluster"}
    if missing:
        raise ConservationError(f"strategy {strategy.name!r} returned no {sorted(missing)} columns")
    for col, dtype in DECISION_SCHEMA.items():
        dec = dec.with_columns(
            pl.col(col).cast(dtype) if col in dec.columns else pl.lit(None, dtype).alias(col)
        )
    dec = dec.select(list(DECISION_SCHEMA))
    ids = eligible["id"].cast(pl.String)
    if dec.height == eligible.height and dec["id"].equals(ids):
        return dec
    if dec.height != eligible.height or dec["id"].n_unique() != dec.height:
        raise ConservationError(
            f"strategy {strategy.name!r} returned {dec.height} decisions for {len(ids)} rows"
        )
    return ids.to_frame("id").join(dec, on="id", how="left", maintain_order="left")


def check_decisions(pool: pl.DataFrame, dec: pl.DataFrame, budget: Budget) -> None:
    """Every pool row has exactly one final reason, `selected` agrees with it, and the budget holds."""
    if dec.height != pool.height or not dec["id"].equals(pool["id"].cast(pl.String)):
        raise ConservationError(f"{dec.height} decisions for {pool.height} pool rows, or ids out of order")
    if dec["reason"].null_count() or not dec["reason"].is_in(list(REASONS)).all():
        raise ConservationError("a decision has no reason or an unknown one")
    if not (dec["selected"] == (dec["reason"] == SELECTED)).all():
        raise ConservationError("'selected' disagrees with the reason")
    picked = dec["selected"].to_numpy()
    if budget.is_tokens:
        used = int(budget.costs(pool)[picked].sum())
        if used > int(budget.tokens or 0):
            raise ConservationError(f"selected {used} tokens over a budget of {budget.tokens}")
    elif int(picked.sum()) > budget.resolve(pool):
        raise ConservationError(f"selected {int(picked.sum())} rows over a budget of {budget.resolve(pool)}")
