"""How long `curate report` and `diversity_summary` take, and how big the HTML is, at pool scale.

A synthetic run folder (N pool rows in 2,000 clusters, 4 score columns, a 2-D map of every row, 10%
selected) stands in for a real one: the report only reads counts, scores, clusters and coordinates.
diversity_summary runs on random 384-d vectors (the MiniLM width) with a 10% subset.

    .venv/bin/python bench/bench_report.py [--rows 1000000] [--div-rows 200000]
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

from curate.diversity import diversity_summary
from curate.report import write_report


def synth_run(folder: Path, n: int, k: int = 2000, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    clusters = rng.zipf(1.3, n) % k
    sources = rng.choice(["data/alpaca.jsonl", "data/gsm8k.jsonl", "data/lima.jsonl"], n, p=[0.7, 0.25, 0.05])
    ids = [f"{i:032x}" for i in range(n)]
    quality = rng.normal(size=n)
    selected = quality > np.quantile(quality, 0.9)
    status = np.where(selected, "selected", "not_selected")
    reason = np.where(selected, "selected", rng.choice(["outranked", "cluster_quota_full"], n))
    n_tok = rng.lognormal(5, 1, n).astype(np.int64)
    dec = pl.DataFrame({
        "source": sources, "row": np.arange(n), "id": ids, "status": status, "reason": reason,
        "cluster": clusters, "rank_in_cluster": rng.integers(1, 500, n),
        "ifd": rng.beta(5, 2, n) + 0.1 * quality, "perplexity": rng.lognormal(1.5, 0.6, n),
        "heur_flags": rng.poisson(0.4, n), "deita_quality": rng.normal(3, 1, n) + 0.3 * quality,
    })
    run = folder / "run"
    run.mkdir()
    extra = pl.DataFrame({"source": ["data/alpaca.jsonl"] * 500, "row": np.arange(n, n + 500),
                          "status": ["rejected"] * 500, "reason": ["rejected:malformed_json"] * 500})
    pl.concat([dec, extra], how="diagonal").write_parquet(run / "decisions.parquet")
    pl.DataFrame({"id": ids, "source": sources, "row": np.arange(n), "n_tokens": n_tok,
                  "n_chars": 4 * n_tok, "n_turns": np.ones(n, np.int32)}).write_parquet(run / "records.parquet")
    dec.filter(pl.Series(selected)).write_parquet(run / "selected.parquet")
    centers = rng.normal(size=(k, 2)) * 10
    xy = centers[clusters] + rng.normal(size=(n, 2))
    pl.DataFrame({"id": ids, "x": xy[:, 0], "y": xy[:, 1]}).write_parquet(run / "map2d.parquet")
    stages = {"ingest": {"rows_in": n + 500, "rows_out": n, "dropped": {"rejected:malformed_json": 500},
                         "seconds": 12.0},
              "select": {"rows_in": n, "rows_out": int(selected.sum()),
                         "dropped": {"not_selected": int((~selected).sum())}, "seconds": 3.0}}
    (run / "manifest.json").write_text(json.dumps({"stages": stages, "config": {"budget": int(selected.sum())}}))
    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--div-rows", type=int, default=200_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        run = synth_run(Path(tmp), args.rows)
        print(f"synthetic run with {args.rows:,} pool rows written in {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        path = write_report(run)
        dt = time.perf_counter() - t0
        print(f"write_report: {dt:.2f} s, report.html {path.stat().st_size / 1e6:.2f} MB, peak RSS so far "
              f"(synthesis + report) {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    rng = np.random.default_rng(1)
    X = rng.normal(size=(args.div_rows, 384)).astype(np.float32)
    mask = rng.random(args.div_rows) < 0.1
    clusters = rng.integers(0, 2000, args.div_rows)
    t0 = time.perf_counter()
    s = diversity_summary(X, mask, clusters)
    print(f"diversity_summary ({args.div_rows:,} x 384, {mask.sum():,} selected, sample {s['sample']}, "
          f"{s['n_random']} random draws): {time.perf_counter() - t0:.2f} s")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
