"""deita's Repr Filter (Liu et al., ICLR 2024; hkust-nlp/deita `filter/base.py`): score-first,
diversity-aware greedy selection.

Walk rows by score (descending); reject a row whose cosine similarity to any already *kept* row exceeds
tau (0.9); stop at the budget. The reference walks one row at a time. Here a chunk of candidates is
searched at once against a FAISS IndexFlatIP of the kept rows (rows redundant with earlier-kept rows stay
redundant: the kept set only grows), and the survivors are resolved in order against each other with
one small similarity matrix. The result is identical to the sequential algorithm (tested).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import faiss
import numpy as np
import polars as pl

from curate.progress import progress
from curate.select.base import R_OUTRANKED, R_REDUNDANT, R_SELECTED, Gate, PoolView
from curate.select.budget import Budget, Quotas, SelectionError


def check_embeddings(embeddings: np.ndarray | None, n: int) -> np.ndarray:
    """float32, C-contiguous, one row per pool row, unit length (normalised on a copy if not)."""
    if embeddings is None:
        raise SelectionError(
            "the deita filter needs the pool's embeddings (one L2-normalised row per pool row)"
        )
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] != n:
        raise SelectionError(f"embeddings have shape {x.shape}, expected ({n}, dim)")
    sample = x[:: max(1, n // 1000)]
    if sample.size and not np.allclose(np.linalg.norm(sample, axis=1), 1.0, atol=1e-3):
        x = x.copy()
        faiss.normalize_L2(x)
    return x


def repr_filter(
    x: np.ndarray, order: np.ndarray, tau: float, gate: Gate, *, chunk_size: int = 4096
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run the greedy filter over rows in `order`.

    Returns (reason code per row, index of the kept row that made a row redundant or -1, that cosine).
    Rows never reached (budget spent) keep R_OUTRANKED.
    """
    n, d = x.shape
    reason = np.full(n, R_OUTRANKED, dtype=np.int64)
    dup_of = np.full(n, -1, dtype=np.int64)
    dup_sim = np.zeros(n, dtype=np.float32)
    index = faiss.IndexFlatIP(d)
    kept: list[np.ndarray] = []  # pool row indices, in index order
    kept_rows = np.zeros(0, np.int64)
    costs = gate.costs
    suffix_min = (
        np.minimum.accumulate(
            (np.ones(n, np.int64) if costs is None else np.asarray(costs, np.int64)[order])[::-1]
        )[::-1]
        if n
        else np.zeros(0, np.int64)
    )
    pos, stop = 0, n == 0
    with progress() as bar:
        task = bar.add_task("deita filter", total=int(gate.left) or None)
        while pos < n and not stop:
            step = chunk_size if costs is not None else int(np.clip(2 * gate.left, 64, chunk_size))
            chunk = order[pos : pos + step]
            xc = x[chunk]
            if index.ntotal:
                sims, nn = index.search(xc, 1)
                sims, nn = sims[:, 0], nn[:, 0]
            else:
                sims, nn = np.full(len(chunk), -np.inf, np.float32), np.full(len(chunk), -1, np.int64)
            red = sims > tau
            surv = np.flatnonzero(~red)
            local = np.full(len(chunk), -1, np.int64)
            local[surv] = np.arange(surv.size)
            s = xc[surv] @ xc[surv].T
            acc: list[int] = []  # survivor indices kept in this chunk
            left_before = gate.left
            chunk_list = chunk.tolist()
            for j, i in enumerate(chunk_list):
                if gate.left < suffix_min[pos + j] or gate.exhausted:
                    stop = True
                    break
                if red[j]:
                    reason[i], dup_sim[i] = R_REDUNDANT, sims[j]
                    dup_of[i] = kept_rows[nn[j]]
                    continue
                sj = int(local[j])
                if acc:
                    row = s[sj, acc]
                    k = int(np.argmax(row))
                    if row[k] > tau:
                        reason[i], dup_of[i], dup_sim[i] = R_REDUNDANT, chunk_list[surv[acc[k]]], row[k]
                        continue
                r = gate.check(i)
                reason[i] = r
                if r == R_SELECTED:
                    gate.take(i)
                    acc.append(sj)
            if acc:
                index.add(xc[surv[acc]])
                kept.append(chunk[surv[acc]])
            kept_rows = np.concatenate(kept) if kept else np.zeros(0, np.int64)
            bar.update(task, advance=int(left_before - gate.left))
            pos += len(chunk)
    return reason, dup_of, dup_sim


@dataclass(frozen=True)
class DeitaFilter:
    """Score-first diversity filter: best `score_col` first, skip rows with cos > `tau` to a kept row.

    Rows with a missing score come last. Quotas act as caps (cluster_max, source_weights).
    Reasons: selected, redundant (detail names the kept row and the cosine), cluster/source_quota_full,
    outranked (not reached, or does not fit the token budget).
    """

    score_col: str = "deita_score"
    tau: float = 0.9
    chunk_size: int = 4096
    name: ClassVar[str] = "deita"

    def __post_init__(self) -> None:
        if not -1.0 <= self.tau <= 1.0:
            raise SelectionError(f"tau is a cosine similarity in [-1, 1], got {self.tau}")
        if self.chunk_size < 1:
            raise SelectionError("chunk_size must be >= 1")

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
        x = check_embeddings(embeddings, view.n)
        order = view.order_by(view.scores(self.score_col))
        gate = Gate(view, view.target, quotas or Quotas())
        reason, dup_of, dup_sim = repr_filter(x, order, self.tau, gate, chunk_size=self.chunk_size)
        red = np.flatnonzero((reason == R_REDUNDANT) & (dup_of >= 0))
        ids = view.pool["id"].cast(pl.String)
        kept_ids = ids.gather(dup_of[red]).to_list() if red.size else []
        detail = [f"cos {s:.3f} to {k}" for s, k in zip(dup_sim[red].tolist(), kept_ids, strict=True)]
        return view.decisions(reason, order, detail=(red, detail))
