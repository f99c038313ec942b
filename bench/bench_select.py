"""Selection benchmark: 1M synthetic scored rows in 2,000 clusters (target < 5 s for kMQ and fusion), and
the deita filter on 100k x 384 embeddings, each against the baseline a user would write.

    .venv/bin/python bench/bench_select.py [--rows 1000000] [--clusters 2000] [--deita-rows 100000]

Every case runs in its own subprocess so its peak RSS (getrusage ru_maxrss) is its own; times are
the strategy call only (the pool is already loaded), best and median of --repeats runs.
Baselines:
- kMQ: the reference code's shape (for-ai/iterative-data-selection `KMenasRandomDeita`): a Python loop
  over clusters, floor(B/K) per cluster, `np.random.choice(p=softmax, replace=False)` in each.
- fusion: polars `top_k` on one precomputed column (a lower bound: no fusion, no decision log).
- deita: the sequential loop of hkust-nlp/deita with a FAISS IndexFlatIP (search one row, then add).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import polars as pl
import psutil

os.environ.setdefault("CURATE_PROGRESS", "0")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make_pool(n: int, k: int, seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(k, 0.5))  # skewed sizes: some clusters are tiny
    cluster = rng.choice(k, size=n, p=p).astype(np.int64)
    cluster[rng.random(n) < 0.01] = -1

    def nulls(x: np.ndarray, frac: float) -> pl.Series:
        s = pl.Series(x)
        return s.set(pl.Series(rng.random(n) < frac), None)

    return pl.DataFrame(
        {
            "id": pl.Series(np.arange(n)).cast(pl.String).str.zfill(9),
            "source": rng.choice(["alpaca", "sharegpt", "gsm8k"], size=n, p=[0.5, 0.3, 0.2]),
            "cluster": cluster,
            "n_tokens": np.clip(rng.lognormal(5.0, 0.8, n), 4, 4096).astype(np.int64),
            "quality": nulls(rng.normal(3.5, 1.0, n), 0.03),
            "ifd": nulls(rng.uniform(0.2, 1.3, n), 0.03),
            "perplexity": nulls(rng.lognormal(2.0, 0.5, n), 0.03),
        }
    )


def make_dense_embeddings(n: int, d: int, topics: int, seed: int = 0) -> np.ndarray:
    """Tight topics (cosine to the topic centre ~0.96): most rows are redundant with tau = 0.9."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(topics, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    noise = rng.normal(scale=0.28 / np.sqrt(d), size=(n, d)).astype(np.float32)
    x = centres[rng.integers(0, topics, n)] + noise
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_embeddings(n: int, d: int, seed: int = 0) -> np.ndarray:
    """Topic structure (500 centres) plus 20% near-copies of other rows, unit length."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(500, d)).astype(np.float32)
    x = centres[rng.integers(0, 500, n)] * 0.35 + rng.normal(size=(n, d)).astype(np.float32)
    dups = np.flatnonzero(rng.random(n) < 0.2)
    noise = rng.normal(scale=0.15, size=(dups.size, d)).astype(np.float32)
    x[dups] = x[rng.integers(0, n, dups.size)] + noise
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# ---------------------------------------------------------------------------------------------------
# cases (run inside a subprocess)


def dc_reference_kmq(pool: pl.DataFrame, budget: int, seed: int) -> list[str]:
    """The reference code's kMQ: loop over clusters, floor(B/K) each, numpy choice with softmax p."""
    rng = np.random.default_rng(seed)
    df = pool.select("id", "cluster", pl.col("quality").fill_null(3.5))
    groups = df.partition_by("cluster", as_dict=False)
    per = budget // len(groups)
    out: list[str] = []
    for g in groups:
        q = g["quality"].to_numpy()
        p = np.exp(q - q.max())
        p /= p.sum()
        take = min(per, g.height)
        out.extend(g["id"].gather(rng.choice(g.height, size=take, replace=False, p=p)).to_list())
    return out


def run_case(case: str, pool_path: str, emb_path: str, repeats: int) -> dict:
    from curate.select import KMQ, Budget, DeitaFilter, Fusion, Quotas, RandomSubset, select
    from curate.select.base import PoolView
    from curate.select.deita import check_embeddings

    pool = pl.read_parquet(pool_path)
    n = pool.height
    b_rows = Budget(rows=n // 20)
    b_tok = Budget(tokens=int(pool["n_tokens"].sum()) // 20)
    fuse = Fusion(columns=("quality", "ifd", "perplexity"), cost=("ifd", "perplexity"), weights=(2, 1, 1))
    quotas = Quotas(cluster_min=2, cluster_max=200, source_weights={"alpaca": 2, "sharegpt": 1, "gsm8k": 1})
    x = None
    deita = DeitaFilter(score_col="quality")
    if "deita" in case:
        x = np.load(emb_path.replace(".npy", "_dense.npy") if case.endswith("dense") else emb_path)
        pool = make_pool(x.shape[0], 500, seed=1)
        b_rows = Budget(rows=x.shape[0] // 10)
    calls = {
        "kmq_rows": lambda: KMQ(score_col="quality").select(pool, b_rows, seed=0),
        "kmq_tokens": lambda: KMQ(score_col="quality").select(pool, b_tok, seed=0),
        "kmq_quotas": lambda: KMQ(score_col="quality").select(pool, b_rows, seed=0, quotas=quotas),
        "kmq_dc_reference_loop": lambda: dc_reference_kmq(pool, n // 20, 0),
        "fusion_topsis": lambda: fuse.select(pool, b_rows, seed=0),
        "fusion_rank_per_cluster": lambda: Fusion(
            columns=fuse.columns, cost=fuse.cost, method="rank", per_cluster=True
        ).select(pool, b_rows, seed=0),
        "fusion_topsis_cluster_cap": lambda: fuse.select(pool, b_rows, seed=0, quotas=Quotas(cluster_max=60)),
        "fusion_topsis_tokens": lambda: fuse.select(pool, b_tok, seed=0),
        "polars_top_k_baseline": lambda: pool.top_k(n // 20, by="quality"),
        "random": lambda: RandomSubset().select(pool, b_rows, seed=0),
        "select_thresholds_kmq": lambda: select(
            pool, KMQ(score_col="quality"), b_rows, thresholds=["ifd < 1", "perplexity <= q0.95"], seed=0
        ),
        "poolview_build_only": lambda: PoolView.build(pool, b_rows),
        "deita_batched": lambda: deita.select(pool, b_rows, seed=0, embeddings=x),
        "naive_deita": lambda: naive_deita(check_embeddings(x, pool.height), pool, b_rows.rows or 0),
        "deita_batched_dense": lambda: deita.select(pool, b_rows, seed=0, embeddings=x),
        "naive_deita_dense": lambda: naive_deita(check_embeddings(x, pool.height), pool, b_rows.rows or 0),
    }
    proc = psutil.Process()
    rss_before = proc.memory_info().rss / 2**20
    peak = [rss_before]
    running = threading.Event()
    running.set()

    def sample() -> None:  # peak RSS during the calls (ru_maxrss would only show the parquet load)
        while running.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss / 2**20)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    times, cpu, result = [], [], None
    for _ in range(1 if case.startswith("naive_deita") else repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        result = calls[case]()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    running.clear()
    sampler.join()
    extra = {}
    if isinstance(result, pl.DataFrame) and "selected" in result.columns:
        extra["selected"] = int(result["selected"].sum())
        if "tokens" in case:
            extra["tokens_used"] = int(pool.filter(result["selected"])["n_tokens"].sum())
            extra["token_budget"] = b_tok.tokens
        extra["reasons"] = dict(result.group_by("reason").len().sort("reason").iter_rows())
    elif isinstance(result, list):
        extra["selected"] = len(result)
    elif isinstance(result, np.ndarray):
        extra["selected"] = int(result.sum())
    elif isinstance(result, pl.DataFrame):
        extra["selected"] = result.height
    if "deita" in case:
        sel = result["selected"] if isinstance(result, pl.DataFrame) else result
        extra["selected_ids_hash"] = hash(tuple(np.flatnonzero(np.asarray(sel)).tolist()))
    return {
        "case": case,
        "best_s": min(times),
        "median_s": statistics.median(times),
        "cpu_s": min(cpu),
        "rss_before_mb": rss_before,
        "peak_rss_mb": peak[0],
        "maxrss_process_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **extra,
    }


def naive_deita(x: np.ndarray, pool: pl.DataFrame, budget: int) -> np.ndarray:
    """hkust-nlp/deita's loop: rows by score, one search against the kept index, then add."""
    import faiss

    q = pool["quality"].fill_null(-np.inf).to_numpy()
    order = np.lexsort((np.arange(len(q)), -q))
    index = faiss.IndexFlatIP(x.shape[1])
    selected = np.zeros(len(q), bool)
    for i in order:
        if index.ntotal >= budget:
            break
        v = x[i : i + 1]
        if index.ntotal and index.search(v, 1)[0][0, 0] > 0.9:
            continue
        index.add(v)
        selected[i] = True
    return selected


# ---------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--clusters", type=int, default=2000)
    ap.add_argument("--deita-rows", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-naive-deita", action="store_true")
    ap.add_argument("--cases", help="comma-separated subset of cases to run")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--pool", help=argparse.SUPPRESS)
    ap.add_argument("--emb", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.pool, args.emb, args.repeats)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        pool_path, emb_path = f"{tmp}/pool.parquet", f"{tmp}/emb.npy"
        make_pool(args.rows, args.clusters).write_parquet(pool_path)
        np.save(emb_path, make_embeddings(args.deita_rows, args.dim))
        dense = make_dense_embeddings(args.deita_rows, args.dim, 5000)
        np.save(emb_path.replace(".npy", "_dense.npy"), dense)
        print(f"# data generated in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        cases = [
            "poolview_build_only", "kmq_rows", "kmq_tokens", "kmq_quotas", "kmq_dc_reference_loop",
            "fusion_topsis", "fusion_rank_per_cluster", "fusion_topsis_cluster_cap", "fusion_topsis_tokens",
            "polars_top_k_baseline", "random", "select_thresholds_kmq",
            "deita_batched", "deita_batched_dense",
        ]
        if not args.skip_naive_deita:
            cases += ["naive_deita", "naive_deita_dense"]
        if args.cases:
            cases = [c for c in cases if c in args.cases.split(",")]
        rows = []
        for case in cases:
            out = subprocess.run(
                [sys.executable, __file__, "--case", case, "--pool", pool_path, "--emb", emb_path,
                 "--repeats", str(args.repeats)],
                capture_output=True, text=True, check=False,
            )
            if out.returncode:
                print(out.stderr, file=sys.stderr)
                raise SystemExit(f"case {case} failed")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), file=sys.stderr)

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"load average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"pool: {args.rows:,} rows, {args.clusters} clusters; deita: {args.deita_rows:,} x {args.dim}\n")
    print("| case | best wall s | median wall s | CPU s | selected | RSS before MB | peak RSS MB | + MB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        before, peak = r["rss_before_mb"], r["peak_rss_mb"]
        print(f"| {r['case']} | {r['best_s']:.2f} | {r['median_s']:.2f} | {r['cpu_s']:.2f} | "
              f"{r.get('selected', '')} | "
              f"{before:.0f} | {peak:.0f} | {peak - before:.0f} |")
    by = {r["case"]: r for r in rows}
    for suffix in ("", "_dense"):
        if f"naive_deita{suffix}" in by and f"deita_batched{suffix}" in by:
            a, b = by[f"naive_deita{suffix}"], by[f"deita_batched{suffix}"]
            same = a["selected_ids_hash"] == b["selected_ids_hash"]
            print(f"\ndeita{suffix} batched selects the same rows as the sequential loop: {same}")
    for r in rows:
        if "reasons" in r:
            print(f"- {r['case']}: {r['reasons']}")


if __name__ == "__main__":
    main()
