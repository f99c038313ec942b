"""How much does the quality score move kMQ's draw? kMQ samples inside each cluster with p proportional to
exp(score / temperature) on the score's own scale, so the default temperature 1 means something different for
deita's 1..6 scores than for IFD (std ~0.2). This replays a finished run's selection stage on its own eligible
rows at several temperatures and compares each pick with cluster-stratified uniform random of the same seed.

    .venv/bin/python bench/bench_kmq_temperature.py --run RUN [--seeds 0 1 2] [--out bench/results/kmq-temperature.md]

The run's own pick must come back exactly at its recipe's temperature (checked and printed), so the table
describes the selection the run made. CPU seconds only; no model is loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import polars as pl

os.environ.setdefault("CURATE_PROGRESS", "0")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from curate.select import KMQ, Budget, select  # noqa: E402

TEMPERATURES = (1.0, 0.3, 0.1, 0.03, 0.0)


def eligible_pool(run: Path) -> tuple[pl.DataFrame, str, dict]:
    """The rows the run's strategy chose from (not rejected, not a duplicate, past the thresholds), with the
    columns kMQ reads, and the run's quality column."""
    manifest = json.loads((run / "manifest.json").read_text())
    sel = manifest["stages"]["select"]
    col = sel.get("strategy_params", {}).get("score_col") or "ifd"
    dec = pl.read_parquet(run / "decisions.parquet", columns=["id", "reason"])
    ids = dec.filter(pl.col("reason").is_in(["selected", "cluster_quota_full", "outranked"]))["id"]
    pool = (pl.read_parquet(run / "records.parquet", columns=["id", "n_tokens", "response_chars"])
            .filter(pl.col("id").is_in(ids.implode()))
            .join(pl.read_parquet(run / "clusters.parquet", columns=["id", "cluster"]), on="id")
            .join(pl.read_parquet(run / "scores.parquet", columns=["id", col]), on="id"))
    return pool, col, manifest


def picked(pool: pl.DataFrame, strategy: KMQ, rows: int, seed: int) -> set[str]:
    return set(select(pool, strategy, Budget(rows=rows), seed=seed).filter(pl.col("selected"))["id"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "kmq-temperature.md")
    args = ap.parse_args()
    t0 = time.perf_counter()
    pool, col, manifest = eligible_pool(args.run)
    cfg = manifest["config"]
    rows = int(manifest["totals"]["selected"])
    seed0 = int(cfg["seed"])
    run_ids = set(pl.read_parquet(args.run / "selected.parquet", columns=["id"])["id"])
    strategy = cfg["select"]["strategy"]
    replay = picked(pool, KMQ(score_col=col, temperature=float(cfg["select"].get("temperature", 1.0))), rows, seed0)
    same = len(replay & run_ids)
    uniform = {s: picked(pool, KMQ(score_col=None), rows, s) for s in args.seeds}
    stats = pool[col].drop_nulls()
    lines = [
        f"`.venv/bin/python bench/bench_kmq_temperature.py --run {args.run} --seeds {' '.join(map(str, args.seeds))}`",
        "",
        f"Run `{args.run}` ({strategy}, budget {rows:,}, seed {seed0}): {pool.height:,} eligible rows in "
        f"{pool['cluster'].n_unique()} clusters; quality column `{col}`: mean {stats.mean():.3f}, std "
        f"{stats.std():.3f}, range {stats.min():.3f}..{stats.max():.3f}. Replaying kMQ at the recipe's temperature "
        f"gives {same:,} of the run's {len(run_ids):,} selected rows"
        + (" (the run's own pick: the table describes what it selected)." if strategy == "kmq" and same == rows
           else f" ({strategy} run: its rounds re-weight clusters, so the replay is not its pick)."),
        "",
        "| temperature | shared with uniform (same seed) | mean " + col + " | mean n_tokens | tokens (n_tokens) |"
        " mean response chars |",
        "|---|---|---|---|---|---|",
    ]
    for t in (None, *TEMPERATURES):
        shared, means, tok, per_row, resp = [], [], [], [], []
        for s in args.seeds:
            ids = uniform[s] if t is None else picked(pool, KMQ(score_col=col, temperature=t), rows, s)
            sub = pool.filter(pl.col("id").is_in(list(ids)))
            shared.append(len(ids & uniform[s]))
            means.append(sub[col].mean())
            tok.append(sub["n_tokens"].sum())
            per_row.append(sub["n_tokens"].mean())
            resp.append(sub["response_chars"].mean())
        k = len(args.seeds)
        name = "uniform (no score)" if t is None else (f"{t:g} (greedy)" if t == 0 else f"{t:g}")
        lines.append(f"| {name} | {sum(shared) / k:,.0f} of {rows:,} | {sum(means) / k:.3f} | {sum(per_row) / k:.1f}"
                     f" | {sum(tok) / k:,.0f} | {sum(resp) / k:.0f} |")
    lines += ["", f"Means over seeds {', '.join(map(str, args.seeds))}; {time.perf_counter() - t0:.1f} s."]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    head = "# kMQ: how much the quality score moves the draw\n\n"
    old = args.out.read_text() if args.out.exists() else head
    args.out.write_text((old if old.startswith(head) else head + old).rstrip("\n") + "\n\n" + text)


if __name__ == "__main__":
    main()
