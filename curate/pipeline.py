"""The pipeline as a list of small stages over one run folder.

Each stage is a plain function `(run, recipe[, shard]) -> dict` that reads Parquet from the run folder (or a
content-addressed store), writes its outputs atomically, records counts in the manifest, and knows nothing of
Prefect or the CLI. `flows/pipeline.py` wires the same functions into a Prefect flow; `run_direct()` calls them
in order without orchestration (used by tests and the overhead benchmark).

    ingest -> dedup -> embed -> cluster -> semdedup -> score (per scorer, per shard) -> select -> export -> report
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import polars as pl

from curate.config import Recipe
from curate.run import ConservationError, Run, write_parquet

STAGES = ("ingest", "embed", "cluster", "semdedup", "score", "select", "export", "report")


def open_run(recipe: Recipe) -> Run:
    run = Run(recipe.out)
    run.manifest["config"] = recipe.model_dump(mode="json")
    run.save()
    return run


def records(run: Run, columns: list[str] | None = None) -> pl.DataFrame:
    return pl.read_parquet(run.file("records.parquet"), columns=columns)


# ---------------------------------------------------------------- ingest + exact dedup


def stage_ingest(run: Run, recipe: Recipe) -> dict[str, Any]:
    """Inputs -> records.parquet (+ rejects, duplicates); per-file counts in the manifest."""
    from curate.ingest import dedup, ingest

    counts = ingest(run, recipe.inputs, fmt=recipe.ingest.format, container=recipe.ingest.container)
    kept, dups = dedup(run)
    return {"rows": sum(c.rows for c in counts.values()), "records": kept, "duplicates": dups}


# ---------------------------------------------------------------- embeddings, clusters, semantic dedup


def shard_bounds(n: int, shards: int) -> list[tuple[int, int]]:
    """Split range(n) into `shards` contiguous, nearly equal (start, stop) pairs."""
    shards = max(1, min(shards, n)) if n else 1
    edges = np.linspace(0, n, shards + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def stage_embed(run: Run, recipe: Recipe, shard: tuple[int, int] | None = None) -> dict[str, Any]:
    """Embed records (or one shard of them) into the embedding store; only unseen ids are computed."""
    from curate.embed import embed

    cfg = recipe.embed
    df = records(run, ["id", "messages", "instruction", "response"])
    if shard is not None:
        df = df.slice(shard[0], shard[1] - shard[0])
    res = embed(df, model=cfg.model, view=cfg.view, batch_size=cfg.batch_size,
                max_seq_length=cfg.max_seq_length)
    return {"rows": df.height, "new": res.n_new, "cached": res.n_cached, "seconds": res.seconds,
            "model": res.model_signature}


def pool_vectors(run: Run, recipe: Recipe, view: str | None = None) -> np.ndarray:
    """All records' embeddings in records.parquet order, from the store (embedding anything missing)."""
    from curate.embed import embed

    cfg = recipe.embed
    df = records(run, ["id", "messages", "instruction", "response"])
    return embed(df, model=cfg.model, view=view or cfg.view, batch_size=cfg.batch_size,
                 max_seq_length=cfg.max_seq_length).vectors


def stage_cluster(run: Run, recipe: Recipe) -> dict[str, Any]:
    """k-means over the pool -> clusters.parquet (id, cluster, distance), centroids.npy, map2d.parquet."""
    from sklearn.decomposition import PCA

    from curate.cluster import kmeans

    t0 = time.perf_counter()
    ids = records(run, ["id"])["id"]
    X = pool_vectors(run, recipe)
    res = kmeans(X, recipe.cluster.k, seed=recipe.seed, niter=recipe.cluster.niter)
    write_parquet(pl.DataFrame({"id": ids, "cluster": res.assign, "distance": res.distance}).to_arrow(),
                  run.file("clusters.parquet"))
    np.save(run.file("centroids.npy"), res.centroids)
    xy = PCA(n_components=2, random_state=recipe.seed).fit_transform(X) if len(X) > 2 else np.zeros((len(X), 2))
    write_parquet(pl.DataFrame({"id": ids, "x": xy[:, 0], "y": xy[:, 1]}).to_arrow(), run.file("map2d.parquet"))
    run.stage("cluster", rows_in=len(ids), rows_out=len(ids), seconds=time.perf_counter() - t0,
              k=int(res.k), objective=float(res.objective), embed_model=recipe.embed.model,
              embed_view=recipe.embed.view)
    return {"k": int(res.k)}


def stage_semdedup(run: Run, recipe: Recipe) -> dict[str, Any]:
    """Drop near-duplicates inside each cluster -> semdedup.parquet (id, duplicate_of, similarity)."""
    from curate.cluster import semdedup

    t0 = time.perf_counter()
    cfg = recipe.semdedup
    ids = records(run, ["id"])["id"]
    empty = pl.DataFrame(schema={"id": pl.String, "duplicate_of": pl.String, "similarity": pl.Float32})
    if not cfg.enabled:
        dropped = empty
    else:
        # near-duplicates are judged on instruction + response: rows that only share a question are not copies
        X = pool_vectors(run, recipe, cfg.view)
        cl = pl.read_parquet(run.file("clusters.parquet"))
        scores = None
        if cfg.keep == "score":
            if not cfg.keep_score:
                raise ValueError("semdedup.keep = 'score' needs semdedup.keep_score (a score column)")
            scores = _score_column(run, cfg.keep_score, ids)
        res = semdedup(X, cl["cluster"].to_numpy(), cl["distance"].to_numpy(), eps=cfg.eps, keep=cfg.keep,
                       scores=scores, seed=recipe.seed)
        idx, dup = res["index"].to_numpy(), res["duplicate_of"].to_numpy()
        dropped = pl.DataFrame({"id": ids.gather(idx), "duplicate_of": ids.gather(dup),
                                "similarity": res["similarity"].cast(pl.Float32)}) if len(idx) else empty
    write_parquet(dropped.to_arrow(), run.file("semdedup.parquet"))
    run.stage("semdedup", rows_in=len(ids), rows_out=len(ids) - dropped.height,
              dropped={"semantic_duplicate": dropped.height}, seconds=time.perf_counter() - t0,
              eps=cfg.eps, keep=cfg.keep, view=cfg.view, enabled=cfg.enabled)
    return {"dropped": dropped.height}


def _score_column(run: Run, column: str, ids: pl.Series) -> np.ndarray:
    path = run.file("scores.parquet")
    if not path.exists():
        raise ValueError(f"score column {column!r} requested but {path} does not exist yet")
    sc = pl.read_parquet(path)
    if column not in sc.columns:
        raise ValueError(f"score column {column!r} not in scores ({', '.join(sc.columns[1:])})")
    return pl.DataFrame({"id": ids}).join(sc, on="id", how="left")[column].to_numpy()


# ---------------------------------------------------------------- decisions


def pool(run: Run) -> pl.DataFrame:
    """The candidates for selection: records minus semantic duplicates, with clusters and scores joined."""
    df = records(run, ["id", "source", "row", "n_tokens", "messages"])
    if run.file("semdedup.parquet").exists():
        df = df.join(pl.read_parquet(run.file("semdedup.parquet"), columns=["id"]), on="id", how="anti")
    if run.file("clusters.parquet").exists():
        df = df.join(pl.read_parquet(run.file("clusters.parquet")), on="id", how="left")
    else:
        df = df.with_columns(cluster=pl.lit(-1, pl.Int32), distance=pl.lit(None, pl.Float32))
    if run.file("scores.parquet").exists():
        df = df.join(pl.read_parquet(run.file("scores.parquet")), on="id", how="left")
    return df


def build_decisions(run: Run, pool_decisions: pl.DataFrame) -> pl.DataFrame:
    """One row per INPUT row with its final status and reason; raises ConservationError if any is missing.

    pool_decisions: id, selected, reason, rank_in_cluster (one row per pool row).
    """
    def meta_of(name: str) -> list[str]:  # the user's own columns, when the inputs had any
        return ["meta"] if "meta" in pl.read_parquet_schema(run.file(name)) else []

    meta, rej_meta = meta_of("records_all.parquet"), meta_of("rejects.parquet")
    rej = pl.read_parquet(run.file("rejects.parquet"), columns=["source", "row", "reason", *rej_meta]).select(
        "source", "row", pl.lit(None, pl.String).alias("id"), pl.lit("rejected").alias("status"),
        ("rejected:" + pl.col("reason")).alias("reason"), pl.col("reason").alias("_detail"), *rej_meta)
    dups = pl.read_parquet(run.file("duplicates.parquet")).select(
        "source", "row", "id", pl.lit("duplicate").alias("status"), pl.lit("duplicate").alias("reason"),
        pl.col("duplicate_of"), *meta)
    recs = records(run, ["source", "row", "id", *meta])
    sem = (pl.read_parquet(run.file("semdedup.parquet")) if run.file("semdedup.parquet").exists()
           else pl.DataFrame(schema={"id": pl.String, "duplicate_of": pl.String, "similarity": pl.Float32}))
    sem_rows = recs.join(sem, on="id", how="inner").select(
        "source", "row", "id", pl.lit("semantic_duplicate").alias("status"),
        pl.lit("semantic_duplicate").alias("reason"), "duplicate_of", "similarity", *meta)
    pd_ = pool_decisions.select("id", "selected", "reason", "rank_in_cluster")
    pool_rows = recs.join(pd_, on="id", how="inner").select(
        "source", "row", "id",
        pl.when(pl.col("selected")).then(pl.lit("selected")).otherwise(pl.lit("not_selected")).alias("status"),
        "reason", "rank_in_cluster", *meta)
    out = pl.concat([rej.drop("_detail"), dups, sem_rows, pool_rows], how="diagonal_relaxed")
    extra = []
    if run.file("clusters.parquet").exists():
        extra.append(pl.read_parquet(run.file("clusters.parquet"), columns=["id", "cluster"]))
    if run.file("scores.parquet").exists():
        extra.append(pl.read_parquet(run.file("scores.parquet")))
    for e in extra:
        out = out.join(e, on="id", how="left")
    n_in = sum(v["rows"] for v in run.manifest.get("inputs", {}).values())
    if out.height != n_in:
        raise ConservationError(f"decision log has {out.height} rows but {n_in} input rows were read")
    if out.select(pl.struct("source", "row").is_duplicated().any()).item():
        raise ConservationError("decision log has more than one final reason for some input row")
    return out.sort("source", "row")


# ---------------------------------------------------------------- scoring


def stage_score(run: Run, recipe: Recipe, scorer_name: str, shard: tuple[int, int] | None = None) -> dict:
    """Score records (or one shard) with one scorer into the score store; only unscored ids are computed."""
    from curate.scoring import score_records

    df = records(run)
    if shard is not None:
        df = df.slice(shard[0], shard[1] - shard[0])
    return score_records(run, recipe, scorer_name, df)


def stage_collect_scores(run: Run, recipe: Recipe) -> dict[str, Any]:
    """Gather every scorer's columns from the store into scores.parquet (id + one column per score)."""
    from curate.scoring import collect_scores

    t0 = time.perf_counter()
    ids = records(run, ["id"])
    table = collect_scores(run, recipe, ids)
    write_parquet(table.to_arrow(), run.file("scores.parquet"))
    run.stage("score", rows_in=ids.height, rows_out=ids.height, seconds=time.perf_counter() - t0,
              scorers=recipe.score.scorers, columns=table.columns[1:])
    return {"columns": table.columns[1:]}


# ---------------------------------------------------------------- selection, export, report


def stage_select(run: Run, recipe: Recipe) -> dict[str, Any]:
    """Choose the subset -> selected.parquet + decisions.parquet (one row per input row)."""
    from curate.selection import select_pool

    t0 = time.perf_counter()
    candidates = pool(run)
    pool_decisions, info = select_pool(run, recipe, candidates)
    decisions = build_decisions(run, pool_decisions)
    write_parquet(decisions.to_arrow(), run.file("decisions.parquet"))
    chosen = pool_decisions.filter(pl.col("selected")).select("id", "rank_in_cluster")
    full = records(run).join(chosen, on="id", how="inner")
    for name in ("clusters.parquet", "scores.parquet"):
        if run.file(name).exists():
            full = full.join(pl.read_parquet(run.file(name)), on="id", how="left")
    full = full.sort("source", "row")
    write_parquet(full.to_arrow(), run.file("selected.parquet"))
    reasons = dict(decisions.group_by("reason").len().sort("reason").iter_rows())
    run.stage("select", rows_in=candidates.height, rows_out=full.height,
              dropped={"not_selected": candidates.height - full.height}, seconds=time.perf_counter() - t0,
              strategy=recipe.select.strategy, reasons=reasons, **info)
    run.set("totals", {"input_rows": decisions.height, "selected": full.height, "reasons": reasons})
    return {"selected": full.height}


def stage_export(run: Run, recipe: Recipe) -> dict[str, Any]:
    """Write the subset as Alpaca / ShareGPT JSONL next to selected.parquet, if asked."""
    from curate.io.writers import export

    paths = [str(export(run.file("selected.parquet"), fmt, run.file(f"selected.{fmt}.jsonl")))
             for fmt in recipe.export]
    return {"files": paths}


def stage_report(run: Run, recipe: Recipe) -> dict[str, Any]:
    from curate.report import write_report

    return {"report": str(write_report(run.path))} if recipe.report else {}


def run_direct(recipe: Recipe) -> Run:
    """Every stage in order, in this process, without Prefect (the flow runs the same functions)."""
    run = open_run(recipe)
    stage_ingest(run, recipe)
    if recipe.embed.enabled:
        stage_embed(run, recipe)
        stage_cluster(run, recipe)
        stage_semdedup(run, recipe)
    for name in recipe.score.scorers:
        stage_score(run, recipe, name)
    if recipe.score.scorers:
        stage_collect_scores(run, recipe)
    stage_select(run, recipe)
    stage_export(run, recipe)
    stage_report(run, recipe)
    return run
