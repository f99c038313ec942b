"""Spherical k-means (FAISS) over L2-normalised embeddings, and SemDeDup inside each cluster.

Why FAISS: at 100k x 384, k=316, 20 iterations it is ~65x faster than scikit-learn's default `KMeans()` at
the same objective (bench/results/kmeans.md), and the same call runs on a GPU when a GPU build is installed.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import faiss
import numpy as np
import polars as pl

from curate.progress import progress

KEEP_POLICIES = ("farthest", "closest", "random", "score")
#: training points per centroid before fitting on a sample (FAISS's own default cap is 256)
POINTS_PER_CENTROID = 256


class ClusterError(ValueError):
    """A user-facing problem (bad k, eps, policy, shapes); no traceback needed."""


def default_k(n: int) -> int:
    """round(sqrt(n)), clipped to [1, n].

    Why: clusters then hold ~sqrt(n) rows each, so (a) per-cluster quotas in diversity-balanced sampling stay
    meaningful at 5-10% budgets (a cluster of sqrt(n) rows gets >= 1 pick once n >= 400), (b) SemDeDup's
    in-cluster pairwise cost totals n*sqrt(n) instead of n^2, and (c) it sits at the low end of the
    sqrt(N)..N/100 range docs/methods.md recommends (52k Alpaca -> 228; 1M rows -> 1000, D&C's K=1024).
    """
    if n < 1:
        raise ClusterError("cannot cluster an empty pool")
    return int(min(n, max(1, round(math.sqrt(n)))))


@dataclass
class KMeansResult:
    assign: np.ndarray  # int32 (n,), cluster id per row
    distance: np.ndarray  # float32 (n,), cosine distance (1 - cos) to the assigned centroid
    centroids: np.ndarray  # float32 (k, d), unit norm
    k: int
    objective: float  # mean cosine distance over all rows (lower is better)
    seconds: float
    n_fit: int  # rows the centroids were fitted on (all rows, or a seeded sample)
    gpu: bool

    def manifest(self) -> dict[str, object]:
        return {"k": self.k, "objective": round(self.objective, 6), "seconds": round(self.seconds, 3),
                "n_fit": self.n_fit, "gpu": self.gpu}


@contextmanager
def _omp_threads(n: int | None) -> Iterator[None]:
    """Set FAISS's OpenMP threads for a block, then restore them.

    Why: on few cores, FAISS's OpenMP threads and its BLAS's threads spin-wait on each other between the
    matmul and the argmin. On this 2-core machine one OpenMP thread (BLAS still uses both cores) fits 100k x
    384, k=316 in 3.9 s instead of 7.3 s; results are identical for any thread count (tested).
    """
    if n is None:
        n = 1 if (os.cpu_count() or 1) <= 4 else faiss.omp_get_max_threads()
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(max(1, n))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _as_unit(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ClusterError(f"expected a non-empty (n, d) matrix, got shape {x.shape}")
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))  # no n x d temporary, unlike np.linalg.norm
    if np.abs(norms - 1).max() > 1e-3:  # cosine geometry needs unit rows; normalise a copy
        x = x / np.maximum(norms, 1e-12)[:, None]
    return x


def kmeans(
    X: np.ndarray,
    k: int | None = None,
    *,
    seed: int = 0,
    niter: int = 20,
    max_fit: int | None = None,
    nredo: int = 1,
    gpu: bool | None = None,
    threads: int | None = None,
) -> KMeansResult:
    """Spherical k-means with FAISS; fit on a seeded sample of `max_fit` rows, then assign every row.

    `max_fit` defaults to k * POINTS_PER_CENTROID (what FAISS would subsample to anyway, but here the
    sample is ours, so it is seeded and the same whatever the thread count). `gpu=None` uses a GPU when
    the installed faiss has one. `threads`: FAISS OpenMP threads during the call (default 1 on <= 4 cores,
    see _omp_threads). Deterministic for a fixed seed, whatever the thread count.
    """
    x = _as_unit(X)
    n, d = x.shape
    k = default_k(n) if k is None else int(k)
    if not 1 <= k <= n:
        raise ClusterError(f"k must be between 1 and the number of rows ({n}), got {k}")
    if niter < 1:
        raise ClusterError(f"niter must be >= 1, got {niter}")
    use_gpu = faiss.get_num_gpus() > 0 if gpu is None else bool(gpu)
    t0 = time.perf_counter()
    cap = max_fit or k * POINTS_PER_CENTROID
    fit = x
    if n > cap:
        rng = np.random.default_rng(seed)
        fit = x[np.sort(rng.choice(n, size=max(cap, k), replace=False))]
    km = faiss.Kmeans(
        d, k, niter=niter, nredo=nredo, seed=seed, spherical=True, gpu=use_gpu, verbose=False,
        max_points_per_centroid=fit.shape[0], min_points_per_centroid=1,
    )
    with _omp_threads(threads):
        km.train(fit)
        centroids = np.ascontiguousarray(km.centroids, dtype=np.float32)
        centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
        sim, idx = _assign(x, centroids, use_gpu)
    dist = np.clip(1.0 - sim, 0.0, 2.0).astype(np.float32)
    return KMeansResult(idx.astype(np.int32), dist, centroids, k, float(dist.mean()),
                        time.perf_counter() - t0, int(fit.shape[0]), use_gpu)


def _assign(x: np.ndarray, centroids: np.ndarray, use_gpu: bool) -> tuple[np.ndarray, np.ndarray]:
    index = faiss.IndexFlatIP(centroids.shape[1])
    if use_gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(centroids)
    sims = np.empty(x.shape[0], np.float32)
    ids = np.empty(x.shape[0], np.int64)
    step = 262_144
    for s in range(0, x.shape[0], step):
        D, Ix = index.search(x[s:s + step], 1)
        sims[s:s + step], ids[s:s + step] = D[:, 0], Ix[:, 0]
    return sims, ids


def assign(X: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest saved centroid for new rows: (cluster int32, cosine distance float32)."""
    x = _as_unit(X)
    with _omp_threads(None):
        sim, idx = _assign(x, np.ascontiguousarray(centroids, dtype=np.float32), faiss.get_num_gpus() > 0)
    return idx.astype(np.int32), np.clip(1.0 - sim, 0.0, 2.0).astype(np.float32)


# ---------------------------------------------------------------------------------------------- SemDeDup

_BLOCK = 1024  # rows compared at once inside a cluster
_KEPT_CHUNK = 32_768  # kept rows per matmul (bounds memory to BLOCK x KEPT_CHUNK floats = 128 MiB)


def _cluster_order(members: np.ndarray, keep: str, distance: np.ndarray, scores: np.ndarray | None,
                   rng: np.random.Generator) -> np.ndarray:
    """Members in keep-priority order (first = most wanted); ties broken by row position."""
    if keep == "farthest":
        key = -distance[members]
    elif keep == "closest":
        key = distance[members]
    elif keep == "random":
        key = rng.random(len(members))
    else:
        assert scores is not None
        key = -np.nan_to_num(scores[members], nan=-np.inf)
    return members[np.lexsort((members, key))]


def _dedup_cluster(x: np.ndarray, order: np.ndarray, thr: float,
                   block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy over `order`: drop a row whose cosine to an already-kept row exceeds thr.

    Returns (dropped positions, the kept position each duplicates, similarity), blockwise: each block is
    first compared with every row kept before it (one matmul), then resolved sequentially only for the
    few rows that have an in-block neighbour above the threshold.
    """
    kept_rows = np.empty(len(order), np.int64)  # positions kept so far (first n_kept entries)
    kept_vecs = np.empty((len(order), x.shape[1]), np.float32)
    n_kept = 0
    d_idx: list[np.ndarray] = []
    d_of: list[np.ndarray] = []
    d_sim: list[np.ndarray] = []
    for s in range(0, len(order), block):
        rows = order[s:s + block]
        v = x[rows]
        m = len(rows)
        best = np.full(m, -np.inf, np.float32)
        best_of = np.full(m, -1, np.int64)
        for c in range(0, n_kept, _KEPT_CHUNK):
            e = min(c + _KEPT_CHUNK, n_kept)
            sims = v @ kept_vecs[c:e].T
            j = sims.argmax(axis=1)
            mx = sims[np.arange(m), j]
            better = mx > best
            best[better], best_of[better] = mx[better], kept_rows[c + j[better]]
        alive = best <= thr
        inner = v @ v.T
        inner[np.tri(m, dtype=bool)] = -np.inf  # only earlier rows (i < j) count
        # every row with an earlier in-block neighbour above thr: a row already dropped by an earlier block may
        # still have its MOST similar kept row here
        for j in np.flatnonzero((inner > thr).any(axis=0)):
            earlier = np.flatnonzero(alive[:j] & (inner[:j, j] > thr))
            if earlier.size:
                i = earlier[inner[earlier, j].argmax()]
                if inner[i, j] > best[j]:
                    best[j], best_of[j] = inner[i, j], rows[i]
                alive[j] = False
        n_new = int(alive.sum())
        kept_rows[n_kept:n_kept + n_new] = rows[alive]
        kept_vecs[n_kept:n_kept + n_new] = v[alive]
        n_kept += n_new
        gone = ~alive
        d_idx.append(rows[gone])
        d_of.append(best_of[gone])
        d_sim.append(best[gone])
    return np.concatenate(d_idx), np.concatenate(d_of), np.concatenate(d_sim)


def semdedup(
    X: np.ndarray,
    assign: np.ndarray,
    distance: np.ndarray,
    *,
    eps: float = 0.05,
    keep: str = "farthest",
    scores: np.ndarray | None = None,
    seed: int = 0,
) -> pl.DataFrame:
    """SemDeDup inside each cluster; one output row per DROPPED row: index, duplicate_of, similarity.

    Within a cluster, rows are ranked by `keep` (farthest from the centroid first, as in the paper;
    closest; random under `seed`; or highest `scores`), and a row is dropped when its cosine similarity
    to an already-KEPT higher-ranked row exceeds 1 - eps. Comparing against kept rows (the issue's rule,
    as in deita's filter) rather than against all earlier rows (the paper's M_j) means a chain A~B~C with
    A and C apart keeps C; every `duplicate_of` therefore names a kept row (the most similar one).
    """
    x = _as_unit(X)
    n = x.shape[0]
    assign = np.asarray(assign).ravel()
    distance = np.asarray(distance, dtype=np.float32).ravel()
    if assign.shape[0] != n or distance.shape[0] != n:
        raise ClusterError(f"X has {n} rows but assign has {assign.shape[0]} and distance {distance.shape[0]}")
    if keep not in KEEP_POLICIES:
        raise ClusterError(f"unknown keep policy {keep!r}; choose one of {', '.join(KEEP_POLICIES)}")
    if keep == "score":
        if scores is None:
            raise ClusterError("keep='score' needs a scores array (higher is kept)")
        scores = np.asarray(scores, dtype=np.float64).ravel()
        if scores.shape[0] != n:
            raise ClusterError(f"scores has {scores.shape[0]} values for {n} rows")
    if not 0.0 <= eps < 2.0:
        raise ClusterError(f"eps must be in [0, 2), got {eps}")
    thr = np.float32(1.0 - eps)
    rng = np.random.default_rng(seed)
    by_cluster = np.argsort(assign, kind="stable")
    bounds = np.flatnonzero(np.diff(assign[by_cluster])) + 1
    groups = np.split(by_cluster, bounds)
    out_idx, out_of, out_sim = [], [], []
    with progress() as bar:
        task = bar.add_task(f"semdedup eps={eps}", total=n)
        for members in groups:
            if len(members) > 1:
                order = _cluster_order(members, keep, distance, scores, rng)
                i, of, sim = _dedup_cluster(x, order, float(thr), _BLOCK)
                out_idx.append(i)
                out_of.append(of)
                out_sim.append(sim)
            bar.update(task, advance=len(members))
    empty = np.zeros(0, np.int64)
    df = pl.DataFrame({
        "index": np.concatenate(out_idx) if out_idx else empty,
        "duplicate_of": np.concatenate(out_of) if out_of else empty,
        "similarity": (np.concatenate(out_sim) if out_sim else empty).astype(np.float32),
    }, schema={"index": pl.Int64, "duplicate_of": pl.Int64, "similarity": pl.Float32})
    return df.sort("index")
