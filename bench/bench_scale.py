"""`curate select` end to end, default recipe, on pools of growing size: where does the time and memory go?

Users hold pools of 50k-10M rows; the other benchmarks time one stage or one 52k pool. This one runs the product's
own command, the way a user would (`curate select POOL --out RUN --budget B`, Prefect executor, cold cache but
for the converted SmolLM2 model), on pools built from Alpaca-52k:

- the first 52,002 rows are Alpaca itself;
- every further block of 52,002 rows pairs each Alpaca row with another one drawn by a seeded permutation
  (instruction, input and output joined with a blank line), so rows are distinct and not near-duplicates of
  one another (each shares half its text with ~N/52k others); answers are twice Alpaca's length on average.

It samples the resident memory of the whole process tree (curate and its embedded Prefect server) every 0.5 s,
keeps the timestamped log, and reads the run's manifest: stage seconds, rows in and out, the LM sample, and
whether the row counts add up.

    nice -n 5 .venv/bin/python bench/bench_scale.py --source ALPACA.jsonl --rows 200000 1000000 --work DIR

Writes bench/results/scale.md (one row per pool size, merged with earlier rows) and DIR/run-N/ with its log.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import polars as pl
import psutil

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "scale.md"
CURATE = str(Path(sys.executable).parent / "curate")
NOTES = "<!-- notes: kept when the table is rewritten -->"


def make_pool(source: Path, rows: int, path: Path, seed: int = 0) -> None:
    """`rows` distinct instruction rows from Alpaca (see the module docstring), as JSONL."""
    base = pl.read_ndjson(source).select("instruction", "input", "output")
    m = base.height
    rng = np.random.default_rng(seed)
    parts = [base]
    for _ in range((rows - 1) // m):
        perm = rng.permutation(m)
        perm = np.where(perm == np.arange(m), (perm + 1) % m, perm)  # never a row with itself
        other = base[perm].rename(lambda c: f"{c}_b")
        parts.append(pl.concat([base, other], how="horizontal").select(
            pl.concat_str([c, f"{c}_b"], separator="\n\n").str.strip_chars().alias(c) for c in base.columns))
    pool = pl.concat(parts).head(rows).with_row_index("id")
    path.parent.mkdir(parents=True, exist_ok=True)
    pool.write_ndjson(path)


class Sampler(threading.Thread):
    """Peak RSS of a process and of its whole tree, every `period` seconds."""

    def __init__(self, pid: int, t0: float, period: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.proc, self.t0, self.period = psutil.Process(pid), t0, period
        self.peak_main = self.peak_tree = 0
        self.peak_at = 0.0
        self.series: list[tuple[float, int, int]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                main = self.proc.memory_info().rss
                tree = main + sum(c.memory_info().rss for c in self.proc.children(recursive=True))
            except psutil.Error:
                break
            t = time.perf_counter() - self.t0
            if main > self.peak_main:
                self.peak_main, self.peak_at = main, t
            self.peak_tree = max(self.peak_tree, tree)
            self.series.append((t, main, tree))
            time.sleep(self.period)


def _stage_at(log: Path, t: float) -> str:
    """The last progress line logged before `t` seconds (the log's lines start with their time)."""
    last = ""
    for line in log.read_text().splitlines():
        head, _, rest = line.strip().partition(" ")
        try:
            if float(head) > t:
                break
        except ValueError:
            continue
        last = rest.split(":")[0] if rest.strip() else last
    return last


def run_select(pool: Path, run: Path, budget: int, models: Path | None, cache: Path, warm: bool) -> dict:
    shutil.rmtree(run, ignore_errors=True)
    if not warm:
        shutil.rmtree(cache, ignore_errors=True)
        cache.mkdir(parents=True)
        if models:  # the SmolLM2 GGUF -> HF conversion is a one-off per machine, not a cost of the pool size
            shutil.copytree(models, cache / "models")
    env = {**os.environ, "CURATE_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1"}
    cmd = [CURATE, "select", str(pool), "--out", str(run), "--budget", str(budget)]
    log = run.parent / f"{run.name}.log"
    t0 = time.perf_counter()
    with log.open("w") as f:
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        s = Sampler(p.pid, t0)
        s.start()
        for line in p.stdout:  # type: ignore[union-attr]
            f.write(f"{time.perf_counter() - t0:8.1f} {line}")
            f.flush()
        rc = p.wait()
        s.stop.set()
    wall = time.perf_counter() - t0
    with (run.parent / f"{run.name}.rss.tsv").open("w") as f:
        f.write("seconds\tcurate_bytes\ttree_bytes\n")
        f.writelines(f"{t:.1f}\t{m}\t{tr}\n" for t, m, tr in s.series)
    out = {"rows": None, "rc": rc, "wall_s": round(wall, 1), "peak_main_gb": round(s.peak_main / 2**30, 2),
           "peak_tree_gb": round(s.peak_tree / 2**30, 2), "peak_at_s": round(s.peak_at, 1),
           "peak_during": _stage_at(log, s.peak_at), "warm": warm, "log": str(log), "cmd": " ".join(cmd)}
    if rc == 0:
        m = json.loads((run / "manifest.json").read_text())
        out["stages"] = {k: {"in": v["rows_in"], "out": v["rows_out"], "s": v["seconds"]}
                         for k, v in m["stages"].items()}
        tot = m["totals"]
        out.update(input_rows=tot["input_rows"], selected=tot["selected"],
                   adds_up=sum(tot["reasons"].values()) == tot["input_rows"], reasons=tot["reasons"],
                   lm_sample=m["score_sample"]["sample"], lm_rate=m["score_sample"]["rate"].get("rows_per_second"),
                   k=m["stages"]["cluster"].get("k"))
    return out


def write(results: dict[str, dict], load: str) -> None:
    lines = ["# Scale: `curate select` end to end as the pool grows", "",
             "`nice -n 5 .venv/bin/python bench/bench_scale.py --source ../shared/data/alpaca-52k/alpaca_data.jsonl "
             "--rows N... --work DIR` (pools built from Alpaca-52k as the script's docstring says; default recipe, "
             "Prefect executor, budget as given, cold cache but for the converted SmolLM2 model; peak RSS of the "
             "process tree sampled every 0.5 s). Stage seconds are the manifest's; the LM sample and its rate "
             "are the sample stage's (it buys as many LM-scored rows as `score.minutes` allows on this CPU).", "",
             f"Load while measuring: {load}", "",
             "| pool rows | wall | peak RSS (curate / tree) | peak during | ingest | dedup | cluster (embed + k-means) "
             "| semdedup | score | select | k | LM sample (rows/s) | selected | counts add up |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    def order(kv: tuple[str, dict]) -> tuple:
        return kv[1]["rows"], kv[1].get("warm", False), "before" not in kv[1].get("label", "")

    for _, r in sorted(results.items(), key=order):
        label = r.get("label") or f"{r['rows']:,}" + (" (warm stores)" if r.get("warm") else "")
        during = f"{r['peak_during']} ({r['peak_at_s']:.0f} s)" if "peak_during" in r else "-"
        if r["rc"] != 0:
            lines.append(f"| {label} | failed (exit {r['rc']}) after {r['wall_s'] / 60:.1f} min | "
                         f"{r['peak_main_gb']} / {r['peak_tree_gb']} GB | {during} | see {r['log']} |||||||||")
            continue
        st = r["stages"]
        lines.append(
            f"| {label} | {r['wall_s'] / 60:.1f} min | {r['peak_main_gb']} / {r['peak_tree_gb']} GB | {during} | "
            + " | ".join(f"{st[k]['s']:.0f} s" if k in st else "-" for k in
                         ("ingest", "dedup", "cluster", "semdedup", "score", "select"))
            + f" | {r['k']} | {r['lm_sample']} ({r['lm_rate']:.2f}) | {r['selected']:,} | {r['adds_up']} |")
    notes = OUT.read_text().split(NOTES, 1)[1] if OUT.exists() and NOTES in OUT.read_text() else "\n"
    OUT.write_text("\n".join(lines) + "\n\n<!-- raw: " + json.dumps(results) + " -->\n\n" + NOTES + notes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", type=Path, required=True, help="alpaca_data.jsonl")
    ap.add_argument("--rows", type=int, nargs="+", required=True)
    ap.add_argument("--budget", type=int, default=1000)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--models", type=Path, default=None, help="a cache's models/ folder to start from")
    ap.add_argument("--load", default="idle", help="what else ran, for the results file")
    ap.add_argument("--warm", action="store_true", help="a new run folder on the last run's stores (embeddings, "
                    "scores): every stage runs again but the embedding model and the LM sample are read back")
    a = ap.parse_args()
    results: dict[str, dict] = {}
    if OUT.exists() and "<!-- raw: " in OUT.read_text():
        results = json.loads(OUT.read_text().split("<!-- raw: ")[1].split(" -->")[0])
    for n in a.rows:
        pool = a.work / f"pool-{n}.jsonl"
        if not pool.exists():
            t = time.perf_counter()
            make_pool(a.source, n, pool)
            mib = pool.stat().st_size / 2**20
            print(f"pool {n:,} rows: {time.perf_counter() - t:.0f} s, {mib:.0f} MiB", flush=True)
        name = f"run-{n}" + ("-warm" if a.warm else "")
        r = run_select(pool, a.work / name, a.budget, a.models, a.work / f"run-{n}-cache", a.warm)
        r["rows"] = n
        results[str(n) + ("-warm" if a.warm else "")] = r
        print(json.dumps(r)[:600], flush=True)
        write(results, a.load)


if __name__ == "__main__":
    main()
