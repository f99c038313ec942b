"""Ingest and exact dedup: the first two stages of every run.

ingest: inputs -> `records_all.parquet` (every row that normalised) + `rejects.parquet` (every row that did
not, with file, line, reason). Rows stream through in chunks, so memory does not grow with the input.
dedup:  `records_all.parquet` -> `records.parquet` (first of each `dedup_key`) + `duplicates.parquet`
(`duplicate_of` = the kept row's id, source and row).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from curate.io.formats import extra_fields, to_messages
from curate.io.readers import expand_inputs, iter_rows
from curate.io.writers import PartedParquet, unify_meta
from curate.progress import progress
from curate.run import Run, atomic_path, sha256_file
from curate.schema import META, RECORD_SCHEMA, REJECT_SCHEMA, RowError, make_record

CHUNK_ROWS = 20_000


@dataclass
class SourceCounts:
    rows: int = 0
    records: int = 0
    rejected: Counter = field(default_factory=Counter)
    formats: Counter = field(default_factory=Counter)


def ingest(
    run: Run, inputs: list[str], *, fmt: str = "auto", container: str | None = None
) -> dict[str, SourceCounts]:
    """Read every input into the run's records_all.parquet and rejects.parquet; return per-source counts."""
    t0 = time.perf_counter()
    files = list(dict.fromkeys(expand_inputs(inputs)))  # the same file twice is one source
    counts: dict[str, SourceCounts] = {}
    hashes: dict[str, str] = {}
    rec_path, rej_path = run.file("records_all.parquet"), run.file("rejects.parquet")
    # the user's own columns (`meta`) vary by file: both tables are written in parts, then merged under one type
    with (
        PartedParquet(rec_path, RECORD_SCHEMA) as rec_w,
        PartedParquet(rej_path, REJECT_SCHEMA) as rej_w,
        progress() as bar,
    ):
        for path in files:
            # an input given twice keeps one source name; its rows are then exact duplicates
            c = counts.setdefault(path, SourceCounts())
            hashes[path] = sha256_file(path) if Path(path).exists() else "hub"
            task = bar.add_task(f"ingest {Path(path).name}", total=None)
            recs: list[dict] = []
            rejs: list[dict] = []
            for raw in iter_rows(path, container):
                c.rows += 1
                try:
                    if isinstance(raw.value, RowError):
                        raise raw.value
                    name, messages = to_messages(raw.value, fmt)
                    recs.append(make_record(messages, source=path, row=raw.row, fmt=name,
                                            meta=extra_fields(raw.value, fmt)))
                    c.formats[name] += 1
                except RowError as e:
                    c.rejected[e.reason] += 1
                    rejs.append({"source": path, "row": raw.row, "reason": e.reason, "detail": e.detail,
                                 "raw": raw.raw, META: extra_fields(raw.value, fmt)})
                if len(recs) >= CHUNK_ROWS:
                    rec_w.write(recs)
                    c.records += len(recs)
                    recs = []
                    bar.update(task, completed=c.rows)
                if len(rejs) >= CHUNK_ROWS:
                    rej_w.write(rejs)
                    rejs = []
            rec_w.write(recs)
            c.records += len(recs)
            rej_w.write(rejs)
            bar.update(task, completed=c.rows, total=c.rows)
        # records and rejects keep only their own meta fields, typed alike so decisions can join them
        every = rec_w.meta_types + rej_w.meta_types
        rec_w.close(unify_meta(every, only=rec_w.meta_types))
        rej_w.close(unify_meta(every, only=rej_w.meta_types))
    rows_in = sum(c.rows for c in counts.values())
    rejected: Counter = Counter()
    for c in counts.values():
        rejected.update(c.rejected)
    run.set("inputs", {p: {"sha256": hashes[p], "rows": c.rows, "records": c.records,
                           "rejected": dict(c.rejected), "formats": dict(c.formats)}
                       for p, c in counts.items()})
    run.stage("ingest", rows_in=rows_in, rows_out=sum(c.records for c in counts.values()),
              dropped={f"rejected:{k}": v for k, v in sorted(rejected.items())},
              seconds=time.perf_counter() - t0, files=len(files))
    return counts


def dedup(run: Run) -> tuple[int, int]:
    """Keep the first row of each dedup_key; record the rest with `duplicate_of`. Returns (kept, dropped)."""
    t0 = time.perf_counter()
    src = run.file("records_all.parquet")
    lf = pl.scan_parquet(src).with_row_index("_order")
    first = lf.filter(pl.col("dedup_key").is_first_distinct())
    with atomic_path(run.file("records.parquet")) as tmp:
        first.drop("_order").sink_parquet(tmp, compression="zstd")
    keys = first.select(
        "dedup_key",
        pl.col("id").alias("duplicate_of"),
        pl.col("source").alias("duplicate_of_source"),
        pl.col("row").alias("duplicate_of_row"),
    )
    has_meta = META in lf.collect_schema().names()
    dups = (
        lf.filter(~pl.col("dedup_key").is_first_distinct())
        .select("_order", "id", "source", "row", "dedup_key", *([META] if has_meta else []))
        .join(keys, on="dedup_key", how="left")
        .sort("_order")
        .drop("_order")
    )
    with atomic_path(run.file("duplicates.parquet")) as tmp:
        dups.sink_parquet(tmp, compression="zstd")
    rows_in = pl.scan_parquet(src).select(pl.len()).collect().item()
    kept = pl.scan_parquet(run.file("records.parquet")).select(pl.len()).collect().item()
    dup_counts = (
        pl.scan_parquet(run.file("duplicates.parquet")).group_by("source").len().collect().rows()
    )
    per_source = {s: n for s, n in dup_counts}
    inputs = run.manifest.get("inputs", {})
    for path, entry in inputs.items():
        entry["duplicates"] = per_source.get(path, 0)
    run.set("inputs", inputs)
    run.stage("dedup", rows_in=rows_in, rows_out=kept, dropped={"duplicate": rows_in - kept},
              seconds=time.perf_counter() - t0)
    return kept, rows_in - kept
