"""Diversity and redundancy of a subset, to compare a selection with a random one of the same size.

- `vendi_score` (Friedman & Dieng, 2023): exp of the entropy of the eigenvalues of K/n, K the cosine
  similarity matrix: the "effective number of distinct items". With a linear kernel on unit vectors the
  non-zero eigenvalues of XX^T/n equal those of X^TX/n, so it is exact for any n at O(n d^2) cost.
- `cluster_coverage`: share of the pool's clusters the subset touches.
- `nn_similarity`: mean cosine of each row to its nearest other row (redundancy; lower is more diverse).
"""

from __future__ import annotations

import faiss
import numpy as np
import polars as pl

from curate.select.budget import SelectionError


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise SelectionError(f"expected a 2-D embedding matrix, got shape {x.shape}")
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def vendi_score(x: np.ndarray, *, q: float = 1.0) -> float:
    """Vendi score of order q of the rows of x under cosine similarity (1 <= VS <= min(n, rank))."""
    u = _unit(x)
    n = u.shape[0]
    if n == 0:
        return 0.0
    gram = (u.T @ u) if u.shape[1] < n else (u @ u.T)
    lam = np.clip(np.linalg.eigvalsh(gram / n), 0.0, None)
    lam = lam[lam > 1e-12]
    lam = lam / lam.sum()
    if q == 1.0:
        return float(np.exp(-(lam * np.log(lam)).sum()))
    if np.isinf(q):
        return float(1.0 / lam.max())
    return float(np.exp(np.log((lam**q).sum()) / (1.0 - q)))


def cluster_coverage(
    subset_clusters: np.ndarray | pl.Series | list[int],
    pool_clusters: np.ndarray | pl.Series | list[int],
    *,
    weighted: bool = False,
) -> float:
    """Share of the pool's clusters (null/-1 excluded) with at least one subset row.

    `weighted=True`: share of pool rows whose cluster is covered (big clusters count more).
    """
    sub = _labels(subset_clusters)
    pool = _labels(pool_clusters)
    labels, counts = np.unique(pool[pool >= 0], return_counts=True)
    if labels.size == 0:
        return 0.0
    hit = np.isin(labels, sub[sub >= 0])
    return float(counts[hit].sum() / counts.sum()) if weighted else float(hit.mean())


def _labels(x: np.ndarray | pl.Series | list[int]) -> np.ndarray:
    if isinstance(x, pl.Series):
        return x.cast(pl.Int64).fill_null(-1).to_numpy()
    return np.asarray(x, dtype=np.int64)


def nn_similarity(x: np.ndarray) -> float:
    """Mean cosine similarity of each row to its nearest other row (exact, FAISS inner product)."""
    u = np.ascontiguousarray(_unit(x), dtype=np.float32)
    n = u.shape[0]
    if n < 2:
        return 0.0
    index = faiss.IndexFlatIP(u.shape[1])
    index.add(u)
    sims, nn = index.search(u, 2)
    # the nearest hit is usually the row itself; with exact duplicates it may be its twin (cos 1 either way)
    own = nn[:, 0] == np.arange(n)
    best = np.where(own, sims[:, 1], sims[:, 0])
    return float(best.mean())
