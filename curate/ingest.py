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
from curate.io.readers import RawRow, expand_inputs, iter_rows, source_path
from curate.io.writers import PartedParquet, unify_meta
from curate.progress import progress
from curate.run import Run, atomic_path, remove_stale_tmp, sha256_file, write_parquet
from curate.schema import META, RECORD_SCHEMA, REJECT_SCHEMA, RowError, make_record

CHUNK_ROWS = 20_000


def row_record(raw: RawRow, path: str, fmt: str = "auto") -> tuple[str, dict]:
    """(format name, record) of one read row; raises its RowError when it cannot become a record (unreadable,
    unknown format, no answer...). The one rule for what a row is, used by ingest and by `curate eval`'s
    reference sets."""
    if isinstance(raw.value, RowError):
        raise raw.value
    name, messages = to_messages(raw.value, fmt)
    return name, make_record(messages, source=path, row=raw.row, fmt=name, meta=extra_fields(raw.value, fmt))


class EmptyPoolError(ValueError):
    """No row survived ingest: nothing to select. decisions.parquet still records every input row."""


@dataclass
class SourceCounts:
    rows: int = 0
    records: int = 0
    rejected: Counter = field(default_factory=Counter)
    formats: Counter = field(default_factory=Counter)


def ingest(
    run: Run, inputs: list[str], *, fmt: str = "auto", container: str | None = None, split: str | None = None
) -> dict[str, SourceCounts]:
    """Read every input into the run's records_all.parquet and rejects.parquet; return per-source counts.

    `split` picks one split of DatasetDict folders and dict-of-splits JSON files (default: every split, each
    its own source). Temp files a killed earlier run left in the run folder are removed first.
    """
    t0 = time.perf_counter()
    remove_stale_tmp(run.path)
    files = list(dict.fromkeys(expand_inputs(inputs, split)))  # the same file twice is one source
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
            local = source_path(path)
            hashes[path] = sha256_file(local) if local is not None else "hub"
            task = bar.add_task(f"ingest {Path(path).name}", total=None)
            recs: list[dict] = []
            rejs: list[dict] = []
            for raw in iter_rows(path, container, split):
                c.rows += 1
                try:
                    name, rec = row_record(raw, path, fmt)
                    recs.append(rec)
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


def dedup(run: Run, *, require_records: bool = True) -> tuple[int, int]:
    """Keep the first row of each dedup_key; record the rest with `duplicate_of`. Returns (kept, dropped).

    With require_records, a pool left empty is an error (EmptyPoolError) raised after decisions.parquet is
    written, so every rejected row still has its final record.
    """
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
    if kept == 0 and require_records:
        _empty_pool(run)
    return kept, rows_in - kept


def _empty_pool(run: Run) -> None:
    """Write the decision log of a run whose pool is empty (every row rejected), then raise EmptyPoolError."""
    from curate.decisions import build_decisions

    none = pl.DataFrame(schema={"id": pl.String, "selected": pl.Boolean, "reason": pl.String,
                                "rank_in_cluster": pl.Int32})
    decisions = build_decisions(run, none)
    path = write_parquet(decisions.to_arrow(), run.file("decisions.parquet"))
    reasons = dict(decisions.group_by("reason").len().sort("len", descending=True).iter_rows())
    run.set("totals", {"input_rows": decisions.height, "selected": 0, "reasons": reasons})
    inputs = list(run.manifest.get("inputs", {}))
    where = ", ".join(inputs) if len(inputs) <= 3 else f"{len(inputs)} sources"
    if decisions.height == 0:
        raise EmptyPoolError(f"no rows to select: {where} hold(s) no rows")
    top = ", ".join(f"{k.removeprefix('rejected:')} {v}" for k, v in list(reasons.items())[:3])
    raise EmptyPoolError(f"no rows to select: all {decisions.height} rows read from {where} were rejected ({top}); "
                         f"each row's reason is in {path}")
