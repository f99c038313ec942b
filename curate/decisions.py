"""The decision log: one row per INPUT row with its final status and reason, the proof that nothing was lost.

Below the pipeline so that ingest (a pool left empty still gets its log) and the select stage share it.
"""

from __future__ import annotations

import polars as pl

from curate.run import ConservationError, Run


def build_decisions(run: Run, pool_decisions: pl.DataFrame) -> pl.DataFrame:
    """One row per INPUT row with its final status and reason; raises ConservationError if any is missing.

    pool_decisions: id, selected, reason, rank_in_cluster, and when the strategy gives them detail (which threshold
    failed, which kept row made a row redundant) and round (iterative) (one row per pool row).
    A rejected row's detail is the reader's message (which field, which turn).
    The user's own columns (`meta`, when the inputs had any) are carried for every row, so the log joins back
    to the user's ids.
    """
    def meta_of(name: str) -> list[str]:
        return ["meta"] if "meta" in pl.read_parquet_schema(run.file(name)) else []

    meta, rej_meta = meta_of("records_all.parquet"), meta_of("rejects.parquet")
    rej = pl.read_parquet(run.file("rejects.parquet"), columns=["source", "row", "reason", "detail", *rej_meta]).select(
        "source", "row", pl.lit(None, pl.String).alias("id"), pl.lit("rejected").alias("status"),
        ("rejected:" + pl.col("reason")).alias("reason"), "detail", *rej_meta)
    dups = pl.read_parquet(run.file("duplicates.parquet")).select(
        "source", "row", "id", pl.lit("duplicate").alias("status"), pl.lit("duplicate").alias("reason"),
        pl.col("duplicate_of"), *meta)
    recs = pl.read_parquet(run.file("records.parquet"), columns=["source", "row", "id", *meta])
    sem = (pl.read_parquet(run.file("semdedup.parquet")) if run.file("semdedup.parquet").exists()
           else pl.DataFrame(schema={"id": pl.String, "duplicate_of": pl.String, "similarity": pl.Float32}))
    sem_rows = recs.join(sem, on="id", how="inner").select(
        "source", "row", "id", pl.lit("semantic_duplicate").alias("status"),
        pl.lit("semantic_duplicate").alias("reason"), "duplicate_of", "similarity", *meta)
    # detail and round say why (the failed threshold, the kept row a redundant one was near) and when (iterative)
    why = [c for c in ("detail", "round") if c in pool_decisions.columns]
    pd_ = pool_decisions.select("id", "selected", "reason", "rank_in_cluster", *why)
    pool_rows = recs.join(pd_, on="id", how="inner").select(
        "source", "row", "id",
        pl.when(pl.col("selected")).then(pl.lit("selected")).otherwise(pl.lit("not_selected")).alias("status"),
        "reason", "rank_in_cluster", *why, *meta)
    out = pl.concat([rej, dups, sem_rows, pool_rows], how="diagonal_relaxed")
    for name in ("clusters.parquet", "scores.parquet"):
        if run.file(name).exists():
            extra = pl.read_parquet(run.file(name))
            out = out.join(extra.select("id", "cluster") if name == "clusters.parquet" else extra, on="id",
                           how="left")
    n_in = sum(v["rows"] for v in run.manifest.get("inputs", {}).values())
    if out.height != n_in:
        raise ConservationError(f"decision log has {out.height} rows but {n_in} input rows were read")
    if out.select(pl.struct("source", "row").is_duplicated().any()).item():
        raise ConservationError("decision log has more than one final reason for some input row")
    return out.sort("source", "row")
