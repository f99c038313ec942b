"""Fuzz figures: seeded random corruptions of each container through `curate ingest` (in process) and a few
through `curate select --no-prefect`; writes bench/results/fuzz.md (cases, exit codes, error kinds, rows, peak
memory, time). The same engine is the test tests/test_fuzz.py.

    nice -n 15 .venv/bin/python bench/bench_fuzz.py [--per-container 200] [--seeds 0] [--select 10]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("CURATE_PROGRESS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from test_fuzz import CONTAINERS, fuzz_ingest, fuzz_select  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-container", type=int, default=200)
    ap.add_argument("--seeds", default="0", help="comma-separated seeds, one full round each")
    ap.add_argument("--select", type=int, default=10, help="cases through `curate select --no-prefect`")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "fuzz.md"))
    args = ap.parse_args()
    cmd = "nice -n 15 .venv/bin/python bench/bench_fuzz.py " + " ".join(sys.argv[1:])
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    lines = ["# Fuzz: corrupted inputs through `curate ingest` and `curate select`", "",
             f"Command: `{cmd.strip()}`  ", f"Machine load before: `{load}`  ",
             f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
             "Each case is one seeded random corruption (bit flips, truncation, inserted/deleted/duplicated/swapped "
             "ranges, structural junk, NULs, BOMs, 30-digit integers, 5-6 MB lines; for .gz half corrupt the "
             "compressed stream, half the text inside) of a file of 17 real rows, run in one process through the CLI "
             "(typer's CliRunner). Pass: exit 0 with rows read = records + rejects + duplicates, or exit 2 with one "
             "error line naming the file (an empty pool also writes decisions.parquet with every row); never a "
             "traceback.", ""]
    total_fail = 0
    cache = tempfile.mkdtemp(prefix="curate-fuzz-cache-")
    os.environ["CURATE_CACHE_DIR"] = cache
    models = Path(os.environ.get("CURATE_TEST_MODELS", "/tmp/curate-test-models"))
    if models.exists():
        (Path(cache) / "models").symlink_to(models, target_is_directory=True)
    for seed in [int(s) for s in args.seeds.split(",")]:
        with tempfile.TemporaryDirectory(prefix="curate-fuzz-") as tmp:
            st = fuzz_ingest(Path(tmp), per_container=args.per_container, seed=seed)
        total_fail += len(st.failures)
        lines += [f"## `curate ingest`, seed {seed}", "",
                  f"{sum(st.cases.values())} cases in {st.seconds:.0f} s; anonymous RSS {st.rss_start_mb:.0f} MB "
                  f"after warm-up, peak {st.peak_mb:.0f} MB (+{st.peak_mb - st.rss_start_mb:.0f} MB); "
                  f"failures: {len(st.failures)}", "",
                  "| container | cases | exit 0 | exit 2 | other | error kinds (exit 2) |", "|---|---|---|---|---|---|"]
        for c in CONTAINERS:
            other = sum(v for (cc, code), v in st.exits.items() if cc == c and code not in (0, 2))
            kinds = ", ".join(f"{k} {v}" for (cc, k), v in sorted(st.errors.items()) if cc == c) or "-"
            lines.append(f"| {c} | {st.cases[c]} | {st.exits[(c, 0)]} | {st.exits[(c, 2)]} | {other} | {kinds} |")
        lines += ["", f"Rows in the cases that ingested: {st.rows['read']:,} read, {st.rows['records']:,} records, "
                  f"{st.rows['rejected']:,} rejected (with a reason each).", "",
                  "Corruptions: " + ", ".join(f"{k} {v}" for k, v in sorted(st.ops.items())), ""]
        if st.failures:
            lines += ["Failures:", ""] + [f"- {f}" for f in st.failures[:20]] + [""]
    if args.select:
        with tempfile.TemporaryDirectory(prefix="curate-fuzz-sel-") as tmp:
            t0 = time.perf_counter()
            exits, failures = fuzz_select(Path(tmp), cases=args.select, seed=0)
            secs = time.perf_counter() - t0
        total_fail += len(failures)
        lines += ["## `curate select --no-prefect` (embed, cluster, heuristics, select)", "",
                  f"{sum(exits.values())} cases in {secs:.0f} s: "
                  + ", ".join(f"exit {k}: {v}" for k, v in sorted(Counter(exits).items()))
                  + f"; failures: {len(failures)} (exit 0 cases checked: decisions.parquet has one row per input "
                    "row)", ""]
        lines += [f"- {f}" for f in failures[:20]]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines).rstrip() + "\n")
    print("\n".join(lines))
    sys.exit(1 if total_fail else 0)


if __name__ == "__main__":
    main()
