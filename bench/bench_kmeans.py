"""FAISS spherical k-means (the cluster stage) vs scikit-learn at equal iterations.

    .venv/bin/python bench/bench_kmeans.py --n 100000
    .venv/bin/python bench/bench_kmeans.py --n 500000 --skip-default --minibatch default

Vectors: `static_pool(n)` from bench_embed.py (real minilm-static embeddings of Alpaca; above 104k rows,
perturbed copies). k = default_k(n), 20 iterations for everyone:
- curate `kmeans()` (FAISS, fitted on a seeded sample of k*256 rows, then all rows assigned), and FAISS on all rows;
- sklearn `KMeans(n_clusters=k, max_iter=20)` (k-means++ init, what a user reaches for);
- sklearn `KMeans(init="random", n_init=1, max_iter=20)`;
- sklearn `MiniBatchKMeans(n_clusters=k, max_iter=20)` (20 epochs, default batch 1024).
tol=0 where offered, so each runs its 20 iterations. Every partition is scored the same way, on all rows,
from its labels alone: mean cosine distance to the normalised cluster mean (spherical objective, lower is
better) and mean squared Euclidean distance to the cluster mean (sklearn's inertia / n).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_embed import ROOT, machine, static_pool  # noqa: E402

from curate.cluster import default_k, kmeans  # noqa: E402


def score(X: np.ndarray, labels: np.ndarray, k: int) -> tuple[float, float]:
    sums = np.zeros((k, X.shape[1]), np.float64)
    np.add.at(sums, labels, X)
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    means = sums / np.maximum(counts, 1)[:, None]
    unit = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
    cos = float(1 - np.mean(np.einsum("ij,ij->i", X, unit[labels].astype(np.float32))))
    sq = float(np.mean(np.sum((X - means[labels].astype(np.float32)) ** 2, axis=1)))
    return cos, sq


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--niter", type=int, default=20)
    ap.add_argument("--skip-default", action="store_true", help="skip sklearn KMeans() (k-means++ init)")
    ap.add_argument("--minibatch", choices=("equal", "default", "skip"), default="equal",
                    help="MiniBatchKMeans at 20 epochs (equal), with its defaults (early stopping), or not at all")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    from sklearn.cluster import KMeans, MiniBatchKMeans

    X, what = static_pool(a.n)
    k = default_k(len(X))
    rows = []

    def record(name: str, seconds: float, labels: np.ndarray, note: str = "") -> None:
        cos, sq = score(X, labels.astype(np.int64), k)
        rows.append((name, seconds, cos, sq, note))
        print(f"{name}: {seconds:.1f} s, cos-obj {cos:.5f}, sq {sq:.5f} {note}", flush=True)

    r = kmeans(X, k, seed=0, niter=a.niter)
    record("curate kmeans (FAISS spherical, sampled fit)", r.seconds, r.assign, f"fit on {r.n_fit:,} rows")
    r = kmeans(X, k, seed=0, niter=a.niter, max_fit=len(X))
    record("FAISS spherical, fit on all rows", r.seconds, r.assign)
    for name, est in [
        ('sklearn KMeans(init="random", n_init=1)', KMeans(k, init="random", n_init=1, max_iter=a.niter, tol=0,
                                                          random_state=0)),
        (f"sklearn MiniBatchKMeans(max_iter={a.niter}, no early stop)",
         MiniBatchKMeans(k, max_iter=a.niter, tol=0, max_no_improvement=None, random_state=0)
         if a.minibatch == "equal" else None),
        ("sklearn MiniBatchKMeans() defaults (early stopping)",
         MiniBatchKMeans(k, random_state=0) if a.minibatch == "default" else None),
        ("sklearn KMeans() default (k-means++)", None if a.skip_default else
         KMeans(k, max_iter=a.niter, tol=0, random_state=0)),
    ]:
        if est is None:
            if "defaults" not in name or a.minibatch == "default":
                rows.append((name, float("nan"), float("nan"), float("nan"), "skipped (see notes)"))
            continue
        t = time.perf_counter()
        est.fit(X)
        record(name, time.perf_counter() - t, est.labels_)
    out = [f"n={len(X):,} x {X.shape[1]}, k={k}, {a.niter} iterations; vectors: {what}", f"machine: {machine()}",
           f"command: .venv/bin/python bench/bench_kmeans.py {' '.join(sys.argv[1:])}", "",
           "| method | seconds | mean cosine distance | mean sq. distance | note |", "|---|---|---|---|---|"]
    out += [f"| {n} | {s:.1f} | {c:.5f} | {q:.5f} | {note} |" for n, s, c, q, note in rows]
    text = "\n".join(out) + "\n"
    print(text)
    path = Path(a.out or ROOT / "bench" / "out" / f"kmeans-{a.n}.md")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


if __name__ == "__main__":
    main()
