"""Ingest throughput and peak memory on Alpaca-52k vs the plain readers a user would reach for.

Each contender runs in its own fresh process so peak RSS is its own (ru_maxrss of the child).
curate's ingest does more (per-row validation with line numbers, normalisation, hashing, rejects, exact dedup);
the baselines only parse. Usage: python bench/bench_ingest.py [path] [repeats]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = ROOT.parent / "shared" / "data" / "alpaca-52k" / "alpaca_data.jsonl"

CONTENDERS = {
    "curate ingest + dedup": """
from curate.run import Run
from curate.ingest import ingest, dedup
run = Run(OUT)
c = ingest(run, [PATH]); dedup(run)
rows = sum(v.rows for v in c.values())
""",
    "polars.read_ndjson": """
import polars as pl
rows = pl.read_ndjson(PATH).height
""",
    "datasets.load_dataset('json')": """
import datasets
datasets.disable_progress_bars()
rows = len(datasets.load_dataset("json", data_files=PATH, split="train", cache_dir=OUT))
""",
}

RUNNER = """
import os, resource, sys, time, json
os.environ["CURATE_PROGRESS"] = "0"
PATH, OUT = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
{code}
dt = time.perf_counter() - t0
print(json.dumps({{"rows": rows, "seconds": dt,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def measure(code: str, path: str) -> dict:
    with tempfile.TemporaryDirectory() as out:
        p = subprocess.run([sys.executable, "-c", RUNNER.format(code=code), path, out],
                           capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else str(DEFAULT)
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    print(f"input: {path}")
    print(f"| reader | rows | seconds (best of {repeats}) | rows/s | peak RSS MB |")
    print("|---|---|---|---|---|")
    for name, code in CONTENDERS.items():
        runs = [measure(code, path) for _ in range(repeats)]
        best = min(runs, key=lambda r: r["seconds"])
        print(f"| {name} | {best['rows']:,} | {best['seconds']:.2f} | {best['rows'] / best['seconds']:,.0f} "
              f"| {max(r['peak_rss_mb'] for r in runs):,.0f} |")


if __name__ == "__main__":
    main()
