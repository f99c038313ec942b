"""`curate plan`: estimate rows, tokens, engine calls, time and memory per stage before running anything.

Rows are counted exactly where that is cheap (lines of JSONL/CSV, Parquet metadata) and tokens are estimated
from bytes on a sample. Throughputs are the CPU numbers measured on a 2-core machine (BENCHMARKS.md); a GPU
changes the embed and score rows. Treat the output as an order of magnitude, not a promise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from curate.config import Recipe
from curate.io.readers import detect_container, expand_inputs
from curate.select.recipe import DEFAULT_FRACTION

# rows/s on 2 CPU cores (see BENCHMARKS.md); keyed by stage or model
RATES = {
    "ingest": 13_000,
    "embed:minilm-static": 5_000,
    "embed:minilm": 25,
    "embed:other": 20,
    "cluster": 50_000,
    "semdedup": 40_000,
    "select": 500_000,
}
# engine forward passes (or generations) per row, per scorer; rows/s of one pass with the default CPU proxy
CALLS_PER_ROW = {"perplexity": 1, "ifd": 2, "grape": 1, "donod": 1, "deita": 2, "clear": 8,
                 "instructmining": 0, "heuristics": 0}
PROXY_PASS_RATE = 150.0
RULE_RATE = 20_000.0
# rows/s of one proxy fine-tune epoch: iterative feedback on 1000 vs 2000 rows took 21.1 vs 38.6 s, i.e. ~57 rows/s
# (bench/results/subsets.md, 3,000-row budget)
FINETUNE_RATE = 57.0


@dataclass
class StagePlan:
    stage: str
    rows: int
    calls: int
    seconds: float
    memory_mb: float


def count_rows(path: str) -> tuple[int, int]:
    """(rows, bytes) of one input without parsing it fully."""
    kind = detect_container(path)
    p = Path(path)
    size = p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    if kind == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows, size
    if kind in ("jsonl", "csv", "tsv"):
        with open(path, "rb") as fh:
            n = sum(block.count(b"\n") for block in iter(lambda: fh.read(1 << 20), b""))
        return n - (1 if kind != "jsonl" else 0), size
    if kind == "hf_disk":
        import datasets

        return len(datasets.load_from_disk(path)), size
    return max(1, size // 400), size  # JSON arrays: ~400 bytes a row


def plan(recipe: Recipe) -> list[StagePlan]:
    files = expand_inputs(recipe.inputs)
    rows = 0
    nbytes = 0
    for f in files:
        r, b = count_rows(f)
        rows += r
        nbytes += b
    tokens = nbytes // 4
    dim = 384  # MiniLM and the static model distilled from it (PCA to 384)
    k = recipe.cluster.k or max(1, round(math.sqrt(rows)))
    out = [StagePlan("ingest+dedup", rows, 0, rows / RATES["ingest"], 400.0)]
    if recipe.embed.enabled:
        rate = RATES.get(f"embed:{recipe.embed.model}", RATES["embed:other"])
        emb_mb = rows * dim * 4 / 2**20
        out.append(StagePlan("embed", rows, 0, rows / rate, 600 + emb_mb))
        out.append(StagePlan("cluster", rows, 0, rows / RATES["cluster"] * max(1, k / 300), 300 + 2 * emb_mb))
        if recipe.semdedup.enabled:
            out.append(StagePlan("semdedup", rows, 0, rows / RATES["semdedup"], 300 + 2 * emb_mb))
    for name in recipe.score.scorers:
        calls = rows * CALLS_PER_ROW.get(name, 1)
        secs = calls / PROXY_PASS_RATE if calls else rows / RULE_RATE
        out.append(StagePlan(f"score:{name}", rows, calls, secs, 800.0 if calls else 300.0))
    out.append(StagePlan("select", rows, 0, rows / RATES["select"] + 2, 200 + rows * 1e-4))
    sel = recipe.select
    if sel.strategy == "iterative" and sel.rounds > 1:
        # after each round but the last: fine-tune the scoring LM on the rows so far, then score the probe
        budget = sel.budget or math.ceil(rows * (sel.fraction or DEFAULT_FRACTION))
        trained = sum(budget * r // sel.rounds for r in range(1, sel.rounds))
        probe = min(rows, k * sel.probe_per_cluster) * (sel.rounds - 1)
        out.append(StagePlan("select:feedback", trained, probe,
                             trained / FINETUNE_RATE + probe / PROXY_PASS_RATE, 1000.0))
    out.append(StagePlan("(tokens, estimated)", tokens, 0, 0.0, 0.0))
    return out
