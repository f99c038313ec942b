"""What every strategy shares: the Strategy shape, the decision-log schema, and the two fill engines.

A strategy only decides an *order* of the pool (who comes first, per cluster or overall); the engines
here turn that order into a subset under a row or token budget and quotas, with one reason per row:

- `fill_stratified`: split the budget over clusters (and sources) with `allocate`, then take each
  cluster's first rows (kMQ, iterative, per-cluster fusion).
- `Gate` / `walk`: walk one global order, skipping rows whose cluster or source is full (fusion, deita,
  random).

Token budgets, one rule everywhere: walk in strategy order, take a row if its tokens fit in what is
left, otherwise skip it (reason as for a full quota) and keep trying the next, smaller ones; the total
never exceeds the budget. Stratified strategies first split tokens over clusters in proportion to their
token mass, fill each cluster's share that way, then offer the slack left by skipped rows to all
clusters in interleaved (divisor-method) order.

Determinism: ties are broken by the rank of the row's id, and random draws are made in id order, so
the same ids, scores and seed give the same subset whatever the pool's row order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import polars as pl

from curate.select.budget import Budget, Quotas, SelectionError, allocate, column_values

SELECTED = "selected"
BELOW_THRESHOLD = "below_threshold"
CLUSTER_QUOTA_FULL = "cluster_quota_full"
SOURCE_QUOTA_FULL = "source_quota_full"
OUTRANKED = "outranked"
REDUNDANT = "redundant"
REASONS: tuple[str, ...] = (
    SELECTED,
    BELOW_THRESHOLD,
    CLUSTER_QUOTA_FULL,
    SOURCE_QUOTA_FULL,
    OUTRANKED,
    REDUNDANT,
)
R_SELECTED, R_BELOW, R_CLUSTER, R_SOURCE, R_OUTRANKED, R_REDUNDANT = range(len(REASONS))

DECISION_SCHEMA: dict[str, pl.DataType] = {
    "id": pl.String(),
    "selected": pl.Boolean(),
    "reason": pl.String(),
    "rank_in_cluster": pl.Int64(),
    "round": pl.Int32(),
    "detail": pl.String(),
}
UNCLUSTERED = -1


@runtime_checkable
class Strategy(Protocol):
    """A selection strategy: a frozen config plus one pure `select` (iterative also keeps round state)."""

    name: str

    def select(
        self,
        pool: pl.DataFrame,
        budget: Budget,
        *,
        seed: int,
        quotas: Quotas | None = None,
        embeddings: np.ndarray | None = None,
    ) -> pl.DataFrame:
        """One row per pool row, in pool order, with the columns of DECISION_SCHEMA."""
        ...


@dataclass
class PoolView:
    """The numpy arrays a strategy works on, derived once from the pool."""

    pool: pl.DataFrame
    n: int
    id_rank: np.ndarray  # rank of each row's id in sorted order: the deterministic tie-break
    id_order: np.ndarray  # rows in id order (inverse of id_rank)
    cluster: np.ndarray  # cluster label per row; null and -1 -> UNCLUSTERED
    group: np.ndarray  # cluster code 0..G-1 per row (unclustered rows form one group)
    group_labels: np.ndarray  # cluster label of each code
    source: np.ndarray  # source code per row
    source_labels: list[str]
    costs: np.ndarray  # 1 per row, or tokens
    tokens: bool
    target: int

    @classmethod
    def build(cls, pool: pl.DataFrame, budget: Budget) -> PoolView:
        if not isinstance(pool, pl.DataFrame):
            raise SelectionError(f"pool must be a polars DataFrame, got {type(pool).__name__}")
        if "id" not in pool.columns:
            raise SelectionError("pool has no 'id' column")
        ids = pool["id"].cast(pl.String)
        if ids.null_count():
            raise SelectionError("pool has null ids")
        n = pool.height
        id_order = ids.arg_sort().to_numpy()
        sorted_ids = ids.gather(id_order)
        if n > 1 and (sorted_ids.slice(1) == sorted_ids.slice(0, n - 1)).any():
            raise SelectionError("pool ids are not unique (deduplicate before selecting)")
        id_rank = np.empty(n, dtype=np.int64)
        id_rank[id_order] = np.arange(n)
        if "cluster" in pool.columns:
            cluster = pool["cluster"].cast(pl.Int64).fill_null(UNCLUSTERED).to_numpy()
            cluster = np.where(cluster < 0, UNCLUSTERED, cluster)
        else:
            cluster = np.full(n, UNCLUSTERED, dtype=np.int64)
        group_labels, group = dense_codes(cluster)
        if "source" in pool.columns:
            src = pool["source"].cast(pl.String).fill_null("")
        else:
            src = pl.Series("source", [""] * n, dtype=pl.String)
        source_labels = sorted(src.unique().to_list())
        source = src.cast(pl.Enum(source_labels)).to_physical().cast(pl.Int64)
        return cls(
            pool=pool,
            n=n,
            id_rank=id_rank,
            id_order=id_order,
            cluster=cluster,
            group=group,
            group_labels=group_labels,
            source=source.to_numpy(),
            source_labels=source_labels,
            costs=budget.costs(pool),
            tokens=budget.is_tokens,
            target=budget.resolve(pool),
        )

    def scores(self, col: str) -> np.ndarray:
        """A score column as float64 with NaN for nulls; a clear error if it is absent or not numeric."""
        return column_values(self.pool, col)

    def random(self, seed: int, kind: str = "gumbel") -> np.ndarray:
        """One draw per row, made in id order (so row order does not matter)."""
        rng = np.random.default_rng(seed)
        draw = rng.gumbel(size=self.n) if kind == "gumbel" else rng.random(self.n)
        return draw[self.id_rank]

    def order_by(self, key: np.ndarray, descending: bool = True) -> np.ndarray:
        """Row indices sorted by key (NaN last), ties by id: the strategy's global order."""
        k = np.where(np.isnan(key), np.inf, -key if descending else key)[self.id_order]
        by = np.argsort(k)  # fast unstable sort; if any keys tie, redo it stably (ties then go by id)
        ks = k[by]
        if ks.size > 1 and (ks[1:] == ks[:-1]).any():
            by = np.argsort(k, kind="stable")
        return self.id_order[by]

    def decisions(
        self,
        reason: np.ndarray,
        order: np.ndarray,
        *,
        round_: np.ndarray | None = None,
        detail: tuple[np.ndarray, Sequence[str]] | None = None,
    ) -> pl.DataFrame:
        """The decision frame in pool order; rank_in_cluster is 1-based in the strategy's order."""
        return make_decisions(self.pool["id"], reason, rank_in_groups(self.group, order), round_, detail)


def make_decisions(
    ids: pl.Series,
    reason: np.ndarray,
    rank: np.ndarray | None = None,
    round_: np.ndarray | None = None,
    detail: tuple[np.ndarray, Sequence[str]] | None = None,
) -> pl.DataFrame:
    """Build a DECISION_SCHEMA frame; rank/round use -1 for null."""
    n = len(ids)
    reason = np.asarray(reason, dtype=np.int64)
    reasons = pl.Series("reason", REASONS, dtype=pl.String).gather(reason)
    cols = {
        "id": ids.cast(pl.String).alias("id"),
        "selected": pl.Series("selected", reason == R_SELECTED, dtype=pl.Boolean),
        "reason": reasons,
        "rank_in_cluster": _nullable("rank_in_cluster", rank, n, pl.Int64),
        "round": _nullable("round", round_, n, pl.Int32),
        "detail": _nulls("detail", n, pl.String()),
    }
    if detail is not None and len(detail[0]):
        cols["detail"] = cols["detail"].scatter(np.asarray(detail[0], dtype=np.int64), list(detail[1]))
    return pl.DataFrame(cols, schema=DECISION_SCHEMA)


def _nulls(name: str, n: int, dtype: pl.DataType) -> pl.Series:
    return pl.repeat(None, n, dtype=dtype, eager=True).alias(name)


def _nullable(name: str, values: np.ndarray | None, n: int, dtype: pl.DataType) -> pl.Series:
    if values is None:
        return _nulls(name, n, dtype)
    s = pl.Series(name, np.asarray(values, dtype=np.int64))
    return s.set(s < 0, None).cast(dtype) if (s < 0).any() else s.cast(dtype)


def dense_codes(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct labels, code per row) like np.unique, but O(n) when labels span a small range."""
    labels = np.asarray(labels, np.int64)
    if labels.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    lo, hi = int(labels.min()), int(labels.max())
    if hi - lo > 4 * labels.size + 1024:
        uniq, codes = np.unique(labels, return_inverse=True)
        return uniq, codes.reshape(-1).astype(np.int64)
    present = np.bincount(labels - lo, minlength=hi - lo + 1) > 0
    table = np.cumsum(present) - 1
    return np.flatnonzero(present).astype(np.int64) + lo, table[labels - lo].astype(np.int64)


def _small(codes: np.ndarray) -> np.ndarray:
    """Codes in the narrowest dtype: numpy's stable argsort is a radix sort for 8/16-bit ints."""
    top = int(codes.max()) if codes.size else 0
    return codes.astype(np.int16) if top < 2**15 else codes


def rank_in_groups(group: np.ndarray, order: np.ndarray) -> np.ndarray:
    """1-based rank of each row inside its group when rows are taken in `order`."""
    n = group.size
    by = order[np.argsort(_small(group[order]), kind="stable")]
    g = group[by]
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]]) if n else np.zeros(0, np.int64)
    first = np.repeat(starts, np.diff(np.r_[starts, n]))
    rank = np.empty(n, dtype=np.int64)
    rank[by] = np.arange(n) - first + 1
    return rank


def cluster_weights_of(view: PoolView, quotas: Quotas) -> np.ndarray:
    """Per-cluster-code multipliers from `Quotas.cluster_weights` (1 where not listed)."""
    w = np.ones(view.group_labels.size)
    for label, weight in (quotas.cluster_weights or {}).items():
        w[view.group_labels == int(label)] = float(weight)
    return w


def source_weights_of(view: PoolView, quotas: Quotas) -> np.ndarray | None:
    """Per-source-code target shares, or None when no source weights are set."""
    if not quotas.source_weights:
        return None
    unknown = set(quotas.source_weights) - set(view.source_labels)
    if unknown and not (set(quotas.source_weights) & set(view.source_labels)):
        raise SelectionError(f"no source in source_weights is in the pool ({sorted(unknown)})")
    return np.array([float(quotas.source_weights.get(s, 0.0)) for s in view.source_labels])


# --------------------------------------------------------------------------------------------------
# Global walk


class Gate:
    """Admission control for a global walk: budget left, per-cluster row cap, per-source caps."""

    def __init__(self, view: PoolView, target: int, quotas: Quotas) -> None:
        if quotas.cluster_min or quotas.cluster_weights:
            raise SelectionError(  # a recipe cannot set Fusion's per_cluster: name what it can set first
                "select.cluster_min (and cluster_weights) need a stratified strategy: select.strategy kmq or "
                "iterative (from Python also Fusion(per_cluster=True)); random, deita and fusion walk one global "
                "order, where only cluster_max and source_weights apply"
            )
        self.left = int(target)
        self.costs = view.costs.tolist() if view.tokens else None
        self.cap = quotas.cluster_max
        self.group = view.group.tolist() if self.cap is not None else None
        self.count = [0] * view.group_labels.size
        sw = source_weights_of(view, quotas)
        self.src_left: list[int] | None = None
        if sw is not None:
            cap = view.costs if view.tokens else np.ones(view.n, np.int64)
            if self.cap is not None:  # a source cannot get more than its clusters allow
                cap = np.where(rank_in_groups(view.group, np.arange(view.n)) <= self.cap, cap, 0)
            mass = np.bincount(view.source, weights=cap, minlength=len(view.source_labels)).astype(np.int64)
            self.src_left = allocate(mass, self.left, weights=sw).tolist()
            self.src = view.source.tolist()

    def check(self, i: int) -> int:
        """R_SELECTED if row i can be taken now, else the reason it cannot."""
        c = self.costs[i] if self.costs is not None else 1
        if c > self.left:
            return R_OUTRANKED
        if self.group is not None and self.count[self.group[i]] >= self.cap:
            return R_CLUSTER
        if self.src_left is not None and self.src_left[self.src[i]] < c:
            return R_SOURCE
        return R_SELECTED

    def take(self, i: int) -> None:
        c = self.costs[i] if self.costs is not None else 1
        self.left -= c
        if self.group is not None:
            self.count[self.group[i]] += 1
        if self.src_left is not None:
            self.src_left[self.src[i]] -= c

    @property
    def exhausted(self) -> bool:
        return self.left <= 0


def walk(view: PoolView, order: np.ndarray, quotas: Quotas | None = None) -> np.ndarray:
    """Reason codes for taking rows in `order` under the budget and quotas (global strategies)."""
    quotas = quotas or Quotas()
    reason = np.full(view.n, R_OUTRANKED, dtype=np.int64)
    if quotas.is_trivial and not view.tokens:
        reason[order[: view.target]] = R_SELECTED
        return reason
    gate = Gate(view, view.target, quotas)
    # once what is left is below every remaining row's cost, nothing else can fit
    suffix_min = np.minimum.accumulate(view.costs[order][::-1])[::-1].tolist()
    for pos, i in enumerate(order.tolist()):
        if gate.left < suffix_min[pos]:
            break
        r = gate.check(i)
        reason[i] = r
        if r == R_SELECTED:
            gate.take(i)
    return reason


# --------------------------------------------------------------------------------------------------
# Stratified fill


def fill_stratified(
    view: PoolView,
    order: np.ndarray,
    target: int,
    quotas: Quotas | None = None,
    *,
    proportional: bool = True,
    cluster_w: np.ndarray | None = None,
    available: np.ndarray | None = None,
    cluster_cap: np.ndarray | None = None,
    cluster_floor: np.ndarray | None = None,
) -> np.ndarray:
    """Reason codes after splitting `target` over clusters (and sources) and taking each one's first rows.

    `cluster_w` multiplies each cluster's base share (its size or token mass if `proportional`, else 1);
    `available` (bool per row) restricts the fill to some rows (iterative rounds); others get R_OUTRANKED.
    `cluster_cap` (rows per cluster code) overrides `quotas.cluster_max` (iterative: what is left of it), and
    `cluster_floor` (rows per cluster code) overrides `quotas.cluster_min` (iterative: what is still missing).
    """
    quotas = quotas or Quotas()
    n = view.n
    avail = np.ones(n, bool) if available is None else np.asarray(available, bool)
    cw = (
        cluster_weights_of(view, quotas)
        if cluster_w is None
        else cluster_w * cluster_weights_of(view, quotas)
    )
    sw = source_weights_of(view, quotas)
    # units: clusters, or (source, cluster) pairs when sources have target shares
    unit_key = view.group if sw is None else view.source * view.group_labels.size + view.group
    idx = np.flatnonzero(avail)
    _, u = dense_codes(unit_key[idx])
    unit = np.full(n, -1, np.int64)
    unit[idx] = u
    n_units = int(u.max()) + 1 if u.size else 0
    unit_cluster = np.zeros(n_units, np.int64)
    unit_cluster[u] = view.group[idx]
    unit_source = np.zeros(n_units, np.int64)
    unit_source[u] = view.source[idx]
    rank = np.zeros(n, np.int64)
    sub_order = order[avail[order]]
    rank[idx] = rank_in_groups(u, _positions(sub_order, idx))
    costs = view.costs[idx]
    mass = np.bincount(u, weights=costs, minlength=n_units).astype(np.int64)
    if cluster_cap is None:
        cluster_cap = np.full(
            view.group_labels.size, n + 1 if quotas.cluster_max is None else quotas.cluster_max
        )
    unit_cap = np.asarray(cluster_cap, np.int64)[unit_cluster]
    r = rank[idx]
    floor = quotas.cluster_min if cluster_floor is None else np.asarray(cluster_floor, np.int64)[unit_cluster][u]
    lo = np.bincount(u, weights=np.where(r <= floor, costs, 0), minlength=n_units).astype(np.int64)
    hi = np.bincount(u, weights=np.where(r <= unit_cap[u], costs, 0), minlength=n_units).astype(np.int64)
    uw = cw[unit_cluster] * (mass.astype(np.float64) if proportional else 1.0)
    # split over sources first (target shares), then over each source's clusters
    alloc = np.zeros(n_units, np.int64)
    if sw is None:
        buckets = [(np.arange(n_units), int(target))]
    else:
        cap_s = np.bincount(unit_source, weights=np.where(uw > 0, hi, lo), minlength=len(sw)).astype(np.int64)
        share = allocate(cap_s, int(target), weights=sw)
        buckets = [(np.flatnonzero(unit_source == s), int(share[s])) for s in range(len(sw))]
    for units, t in buckets:
        alloc[units] = allocate(mass[units], t, weights=uw[units], min_per=lo[units], max_per=hi[units])

    reason = np.full(n, R_OUTRANKED, dtype=np.int64)
    reason[idx] = R_CLUSTER
    if sw is not None:
        reason[idx[sw[view.source[idx]] == 0]] = R_SOURCE
    if not view.tokens:
        reason[idx[r <= alloc[u]]] = R_SELECTED
        return reason
    by_unit = idx[np.argsort(rank[idx], kind="stable")]
    by_unit = by_unit[np.argsort(_small(unit[by_unit]), kind="stable")]
    taken = _fill_tokens(by_unit, unit, rank, view.costs, alloc, unit_cap)
    # slack left by skipped rows: offered to every unit, interleaved by (rank - 0.5) / weight
    for units, t in buckets:
        in_bucket = np.isin(u, units)
        left = t - int(costs[in_bucket & taken[idx]].sum())
        if left <= 0:
            continue
        cand = idx[in_bucket & ~taken[idx] & (uw[u] > 0) & (costs <= left)]
        if cand.size == 0:
            continue
        key = (rank[cand] - 0.5) / uw[unit[cand]]
        cand = cand[np.lexsort((view.id_rank[cand], key))]
        counts = np.bincount(u[taken[idx]], minlength=n_units).tolist()
        c_l, u_l, cap = view.costs.tolist(), unit.tolist(), unit_cap.tolist()
        suffix_min = np.minimum.accumulate(view.costs[cand][::-1])[::-1].tolist()
        for pos, i in enumerate(cand.tolist()):
            if left < suffix_min[pos]:
                break
            if c_l[i] <= left and counts[u_l[i]] < cap[u_l[i]]:
                taken[i] = True
                left -= c_l[i]
                counts[u_l[i]] += 1
    reason[taken] = R_SELECTED
    return reason


def _positions(sub_order: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Order over the compacted rows `idx`, given an order over full-pool rows restricted to idx."""
    where = np.full(int(idx.max()) + 1 if idx.size else 0, -1, np.int64)
    where[idx] = np.arange(idx.size)
    return where[sub_order]


def _fill_tokens(
    by_unit: np.ndarray,
    unit: np.ndarray,
    rank: np.ndarray,
    costs: np.ndarray,
    alloc: np.ndarray,
    unit_cap: np.ndarray,
) -> np.ndarray:
    """Greedy per-unit fill: walk each unit's rows in rank order, take a row if it fits the unit's share."""
    taken = np.zeros(costs.size, bool)
    u_s, c_s = unit[by_unit], costs[by_unit]
    # rows of a fully fitting prefix need no loop: cumulative cost within the unit <= its share
    starts = np.r_[True, u_s[1:] != u_s[:-1]] if u_s.size else np.zeros(0, bool)
    cum = np.cumsum(c_s)
    base = np.maximum.accumulate(np.where(starts, cum - c_s, 0)) if u_s.size else cum
    within = cum - base
    prefix = (within <= alloc[u_s]) & (rank[by_unit] <= unit_cap[u_s])
    # prefix must be contiguous from the unit start: the first miss ends it
    miss = ~prefix
    seen_miss = np.zeros(u_s.size, bool)
    if u_s.size:
        grp_id = np.cumsum(starts) - 1
        first_miss = np.full(int(grp_id[-1]) + 1, u_s.size, np.int64)
        np.minimum.at(first_miss, grp_id[miss], np.flatnonzero(miss))
        seen_miss = np.arange(u_s.size) >= first_miss[grp_id]
    taken[by_unit[~seen_miss]] = True
    rem = alloc.astype(np.int64).copy()
    np.subtract.at(rem, u_s[~seen_miss], c_s[~seen_miss])
    counts = np.bincount(u_s[~seen_miss], minlength=alloc.size)
    tail = np.flatnonzero(seen_miss & (c_s <= rem[u_s]))
    rem_l, cnt_l, cap = rem.tolist(), counts.tolist(), unit_cap.tolist()
    for j in tail.tolist():
        uj, cj = int(u_s[j]), int(c_s[j])
        if cj <= rem_l[uj] and cnt_l[uj] < cap[uj]:
            rem_l[uj] -= cj
            cnt_l[uj] += 1
            taken[by_unit[j]] = True
    return taken
