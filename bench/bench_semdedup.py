"""SemDeDup on 100k rows: time and peak RSS, vs the reference implementation's per-cluster full matrix.

    .venv/bin/python bench/bench_semdedup.py [--n 100000]

Vectors: `static_pool(n)` from bench_embed.py (real minilm-static Alpaca embeddings), clustered once with
the stage's `kmeans` (k = default_k(n)). Then, per eps:
- curate `semdedup()` (blockwise; compares with already-kept rows);
- the baseline a user would write from facebookresearch/SemDeDup: per cluster, sort by distance, build the
  full m x m similarity matrix, take the upper triangle's column max M_j and drop j if M_j > 1 - eps
  (compares with all earlier rows, so it can drop a little more: chains).
Each method runs in a fresh child process: peak RSS (ru_maxrss, includes imports and the 150 MiB input) and,
from a second untimed call under tracemalloc, the method's own peak allocation.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_embed import ROOT, machine, static_pool  # noqa: E402

from curate.cluster import default_k, kmeans, semdedup  # noqa: E402


def reference(X: np.ndarray, assign: np.ndarray, distance: np.ndarray, eps: float) -> int:
    """facebookresearch/SemDeDup's per-cluster step (numpy instead of torch), keep='farthest'."""
    dropped = 0
    for c in np.unique(assign):
        idx = np.flatnonzero(assign == c)
        idx = idx[np.argsort(-distance[idx], kind="stable")]
        v = X[idx]
        S = np.triu(v @ v.T, k=1)
        M = S.max(axis=0)
        dropped += int((M > 1 - eps).sum())
    return dropped


def _child(method: str, path: str, eps: float, q) -> None:
    d = np.load(path)
    X, assign, distance = d["X"], d["assign"], d["distance"]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    def call() -> int:
        return semdedup(X, assign, distance, eps=eps).height if method == "curate" else reference(
            X, assign, distance, eps)

    n = call()
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()  # a second, untimed call: the method's own peak allocation (numpy reports here)
    call()
    extra = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    q.put((method, eps, seconds, n, base / 1024, peak / 1024, extra / 2**20))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    a = ap.parse_args()
    X, what = static_pool(a.n)
    k = default_k(len(X))
    km = kmeans(X, k, seed=0)
    sizes = np.bincount(km.assign, minlength=k)
    path = ROOT / "bench" / "out" / "semdedup-input.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, X=X, assign=km.assign, distance=km.distance)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    rows = []
    for eps in (0.01, 0.05, 0.1):
        for method in ("curate", "reference"):
            p = ctx.Process(target=_child, args=(method, str(path), eps, q))
            p.start()
            rows.append(q.get())
            p.join()
            print(rows[-1], flush=True)
    out = [f"n={len(X):,} x {X.shape[1]} ({what}); k={k} (cluster sizes: median {int(np.median(sizes))}, "
           f"max {sizes.max()}); kmeans {km.seconds:.1f} s", f"machine: {machine()}",
           f"command: .venv/bin/python bench/bench_semdedup.py {' '.join(sys.argv[1:])}", "",
           "| method | eps | seconds | dropped | RSS after loading input (MiB) | peak RSS (MiB) "
           "| own peak alloc (MiB) |",
           "|---|---|---|---|---|---|---|"]
    out += [f"| {m} | {e} | {s:.2f} | {n:,} | {b:.0f} | {p:.0f} | {x:.0f} |" for m, e, s, n, b, p, x in rows]
    text = "\n".join(out) + "\n"
    print(text)
    (ROOT / "bench" / "out" / f"semdedup-{a.n}.md").write_text(text)


if __name__ == "__main__":
    main()
