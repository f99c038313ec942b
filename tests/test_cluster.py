"""FAISS spherical k-means and SemDeDup on real embeddings (the bundled sample, static model): determinism,
geometry, and the blockwise SemDeDup against a plain sequential reference."""

from __future__ import annotations

import json

import faiss
import numpy as np
import polars as pl
import pytest
from conftest import sample_rows

import curate.cluster as C
from curate.cluster import ClusterError, assign, default_k, kmeans, semdedup
from curate.embed import EmbeddingStore, embed, load_embedder
from curate.ingest import ingest
from curate.run import Run


@pytest.fixture(scope="module")
def X(tmp_path_factory) -> np.ndarray:
    """2,000 real rows of the bundled sample (maths, code, tool use, general tasks) embedded with the static
    model, plus 200 lightly perturbed copies of them (so SemDeDup has duplicates, chains and near-misses)."""
    tmp = tmp_path_factory.mktemp("sample")
    (tmp / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sample_rows(2000)))
    run = Run(tmp / "run")
    ingest(run, [str(tmp / "in.jsonl")])
    df = pl.read_parquet(run.file("records_all.parquet"))
    vecs = embed(df, model=load_embedder("minilm-static", max_seq_length=128), view="instruction_response",
                 store=EmbeddingStore(tmp / "store")).vectors
    rng = np.random.default_rng(0)
    src = rng.choice(len(vecs), 200, replace=False)
    noisy = vecs[src] + rng.normal(0, rng.uniform(0.002, 0.014, (200, 1)), (200, vecs.shape[1]))
    out = np.vstack([vecs, noisy]).astype(np.float32)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def test_default_k():
    assert [default_k(n) for n in (1, 2, 4, 100, 52_002, 1_000_000)] == [1, 1, 2, 10, 228, 1000]
    with pytest.raises(ClusterError):
        default_k(0)


def test_kmeans_geometry_and_determinism(X):
    a = kmeans(X, 20, seed=3, niter=10)
    b = kmeans(X, 20, seed=3, niter=10)
    assert np.array_equal(a.assign, b.assign) and np.array_equal(a.centroids, b.centroids)
    assert a.assign.dtype == np.int32 and a.distance.dtype == np.float32 and a.centroids.dtype == np.float32
    assert a.k == 20 and a.n_fit == len(X) and not a.gpu
    np.testing.assert_allclose(np.linalg.norm(a.centroids, axis=1), 1.0, atol=1e-5)
    sims = X @ a.centroids.T
    assert np.array_equal(a.assign, sims.argmax(axis=1))  # every row sits at its nearest centroid
    np.testing.assert_allclose(a.distance, 1 - sims.max(axis=1), atol=1e-5)
    assert a.objective == pytest.approx(float(a.distance.mean()))
    assert len(np.unique(a.assign)) == 20
    # a different seed gives a different partition; the thread count does not change the result
    assert not np.array_equal(kmeans(X, 20, seed=4, niter=10).assign, a.assign)
    threads = faiss.omp_get_max_threads()
    try:
        faiss.omp_set_num_threads(1)
        assert np.array_equal(kmeans(X, 20, seed=3, niter=10).assign, a.assign)
    finally:
        faiss.omp_set_num_threads(threads)
    # new rows go to the nearest saved centroid
    cl, dist = assign(X[:50], a.centroids)
    assert np.array_equal(cl, a.assign[:50]) and np.allclose(dist, a.distance[:50], atol=1e-5)


def test_kmeans_fits_on_a_seeded_sample(X):
    a = kmeans(X, 8, seed=0, niter=10, max_fit=500)
    assert a.n_fit == 500 and len(a.assign) == len(X)
    assert np.array_equal(a.assign, kmeans(X, 8, seed=0, niter=10, max_fit=500).assign)
    full = kmeans(X, 8, seed=0, niter=10)
    assert a.objective < full.objective * 1.1  # a sample of 500 is nearly as good as all 2,200 rows
    with pytest.raises(ClusterError, match="k must be"):
        kmeans(X[:5], 6)


def _reference(X, assign_, distance, eps, keep, scores=None, seed=0) -> dict[int, tuple[int, float]]:
    """Row-by-row greedy: compare each row with every kept row of its cluster (the definition)."""
    rng = np.random.default_rng(seed)
    by = np.argsort(assign_, kind="stable")
    out = {}
    for members in np.split(by, np.flatnonzero(np.diff(assign_[by])) + 1):
        if len(members) < 2:
            continue
        kept: list[int] = []
        for j in C._cluster_order(members, keep, distance, scores, rng):
            if kept:
                s = X[kept] @ X[j]
                i = int(s.argmax())
                if s[i] > np.float32(1 - eps):
                    out[int(j)] = (kept[i], float(s[i]))
                    continue
            kept.append(int(j))
    return out


@pytest.mark.parametrize("keep", ["farthest", "closest", "random", "score"])
def test_semdedup_blockwise_equals_reference(X, keep, monkeypatch):
    km = kmeans(X, 6, seed=0, niter=10)
    scores = np.random.default_rng(1).random(len(X))
    ref = _reference(X, km.assign, km.distance, 0.05, keep, scores)
    assert len(ref) >= 120  # most perturbed copies (and some natural pairs) are found
    for block, chunk in ((1024, 32_768), (13, 40)):  # tiny blocks exercise the cross-block path
        monkeypatch.setattr(C, "_BLOCK", block)
        monkeypatch.setattr(C, "_KEPT_CHUNK", chunk)
        got = semdedup(X, km.assign, km.distance, eps=0.05, keep=keep, scores=scores)
        assert got.columns == ["index", "duplicate_of", "similarity"]
        assert got["index"].to_list() == sorted(ref)
        assert got["duplicate_of"].to_list() == [ref[i][0] for i in sorted(ref)]
        np.testing.assert_allclose(got["similarity"].to_numpy(), [ref[i][1] for i in sorted(ref)], atol=1e-5)


def test_semdedup_keep_policies_on_exact_copies(X):
    base = X[:3]
    Y = np.vstack([base, base, base])  # rows i, i+3, i+6 are identical
    same = np.zeros(9, np.int32)
    dist = np.array([0.1, 0.1, 0.1, 0.3, 0.3, 0.3, 0.2, 0.2, 0.2], np.float32)

    def kept(df: pl.DataFrame) -> list[int]:
        return sorted(set(range(9)) - set(df["index"].to_list()))

    assert kept(semdedup(Y, same, dist, keep="farthest")) == [3, 4, 5]
    assert kept(semdedup(Y, same, dist, keep="closest")) == [0, 1, 2]
    scores = np.array([0, 0, 9, 0, 5, 0, 1, 0, 0], float)
    assert kept(semdedup(Y, same, dist, keep="score", scores=scores)) == [2, 4, 6]
    r1, r2 = semdedup(Y, same, dist, keep="random", seed=7), semdedup(Y, same, dist, keep="random", seed=7)
    assert r1.equals(r2) and r1.height == 6
    df = semdedup(Y, same, dist, keep="farthest")
    assert set(df["duplicate_of"].to_list()) <= set(kept(df))
    assert df["similarity"].min() > 0.999
    # different clusters never dedup against each other
    assert semdedup(Y, np.arange(9, dtype=np.int32), dist).height == 0


def test_semdedup_errors(X):
    a, d = np.zeros(len(X), np.int32), np.zeros(len(X), np.float32)
    with pytest.raises(ClusterError, match="keep policy"):
        semdedup(X, a, d, keep="longest")
    with pytest.raises(ClusterError, match="scores"):
        semdedup(X, a, d, keep="score")
    with pytest.raises(ClusterError, match="rows"):
        semdedup(X, a[:5], d)
    with pytest.raises(ClusterError, match="eps"):
        semdedup(X, a, d, eps=-0.1)
