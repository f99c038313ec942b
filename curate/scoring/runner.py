"""Score a pool with one scorer: only what the store lacks is computed, each finished batch is kept.

`score_pool` returns `id` + the scorer's columns in `records` order. A re-run over the same pool, scorer
parameters and model computes nothing; a killed run resumes from its last finished batch; pool-relative
columns (`Scorer.pool_writes`, e.g. TOPSIS closeness) are recomputed from the stored per-row columns.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from curate.progress import progress
from curate.scoring.contract import ScoreContext, Scorer, ScorerError
from curate.scoring.store import ScoreStore, make_key

COMPACT_AFTER_PARTS = 64


@dataclass
class ScoreRun:
    """The result of scoring one pool with one scorer."""

    df: pl.DataFrame  # `id` + writes (+ pool_writes), in records order
    n_computed: int  # distinct ids computed in this call
    n_cached: int  # distinct ids served from the store
    seconds: float
    key: str = ""  # the store key used (scorer signature | model signature | context)


def model_signature(scorer: Scorer, engine: Any) -> str:
    """The model part of the key: the engine's signature when the scorer uses an engine, else "none"."""
    if not scorer.needs.engine or engine is None:
        return "none"
    return str(engine.signature())


def _check_inputs(records: pl.DataFrame, scorer: Scorer, engine: Any, embeddings: Any,
                  other_scores: pl.DataFrame | None) -> None:
    if "id" not in records.columns:
        raise ScorerError("records need an 'id' column (see curate/schema.py)")
    lacking = [c for c in scorer.reads if c not in records.columns]
    if lacking:
        raise ScorerError(f"scorer {scorer.name!r} reads columns {lacking} that the records lack")
    if scorer.needs.engine:
        if engine is None:
            raise ScorerError(f"scorer {scorer.name!r} needs a language model engine "
                              f"({', '.join(scorer.needs.engine)}); none was given")
        for cap in scorer.needs.engine:
            if not callable(getattr(engine, cap, None)):
                raise ScorerError(f"scorer {scorer.name!r} needs engine capability {cap!r}, which "
                                  f"{type(engine).__name__} lacks (hidden_and_logits needs kind='hf')")
    if scorer.needs.embeddings and embeddings is None:
        raise ScorerError(f"scorer {scorer.name!r} needs {scorer.needs.embeddings!r} embeddings; none given")
    if embeddings is not None and len(embeddings) != records.height:
        raise ScorerError(f"embeddings have {len(embeddings)} rows but records have {records.height}")
    if scorer.needs.scores and other_scores is None:
        raise ScorerError(f"scorer {scorer.name!r} reads scores of {list(scorer.needs.scores)}; "
                          "pass other_scores")


def _align_scores(records: pl.DataFrame, other: pl.DataFrame | None) -> pl.DataFrame | None:
    """Other scorers' columns row-aligned with `records` (joined on `id` when it has one)."""
    if other is None:
        return None
    if "id" in other.columns:
        other = other.unique(subset="id", keep="last")
        return records.select("id").join(other, on="id", how="left", maintain_order="left").drop("id")
    if other.height != records.height:
        raise ScorerError(f"other_scores has {other.height} rows but records have {records.height} "
                          "(give it an 'id' column to align by id)")
    return other


def _validate(out: Any, scorer: Scorer, n: int) -> pl.DataFrame:
    if not isinstance(out, pl.DataFrame):
        raise ScorerError(f"scorer {scorer.name!r} returned {type(out).__name__}, not a polars DataFrame")
    if set(out.columns) != set(scorer.writes) or out.height != n:
        raise ScorerError(f"scorer {scorer.name!r} returned columns {out.columns} x {out.height} rows; "
                          f"expected {list(scorer.writes)} x {n} rows")
    return out.select(scorer.writes)


def score_batch(batch: pl.DataFrame, scorer: Scorer, *, engine: Any = None, embeddings: np.ndarray | None = None,
                pool_embeddings: np.ndarray | None = None, scores: pl.DataFrame | None = None) -> pl.DataFrame:
    """The scorer's per-row columns (`writes`) for one batch: the one place a `ScoreContext` is built, so the
    score stage (`score_pool`) and the rate measurement (`curate.scoring.recipe.measure_rate`) run a scorer alike.
    `embeddings` and `scores` are row-aligned with `batch`; the engine is passed only to a scorer that needs one."""
    ctx = ScoreContext(engine=engine if scorer.needs.engine else None, embeddings=embeddings,
                       pool_embeddings=pool_embeddings, scores=scores)
    return _validate(scorer.score(batch, ctx), scorer, batch.height)


def finalize_pool(scorer: Scorer, df: pl.DataFrame) -> pl.DataFrame:
    """`id` + the scorer's columns: its pool-relative columns (`pool_writes`) computed by `finalize` over the
    distinct rows of df (`id` + writes), in df's order. What a reader of the scorer's columns gets."""
    if not scorer.pool_writes:
        return df.select(["id", *scorer.writes])
    uniq = df.unique(subset="id", keep="first", maintain_order=True)
    fin = scorer.finalize(uniq)
    lacking = [c for c in scorer.pool_writes if c not in fin.columns]
    if lacking or fin.height != uniq.height:
        raise ScorerError(f"scorer {scorer.name!r}: finalize() must add {list(scorer.pool_writes)} "
                          "and keep every row")
    df = df.join(fin.select(["id", *scorer.pool_writes]), on="id", how="left", maintain_order="left")
    return df.select(["id", *scorer.columns])


def score_pool(
    records: pl.DataFrame,
    scorer: Scorer,
    *,
    engine: Any = None,
    embeddings: np.ndarray | None = None,
    pool_embeddings: np.ndarray | None = None,
    other_scores: pl.DataFrame | None = None,
    store: ScoreStore | None = None,
    batch_size: int = 256,
    context: str = "",
) -> ScoreRun:
    """Score every row of `records` with `scorer`, serving what the store holds and storing the rest.

    `store=None` uses the default store (`cache_dir()/scores`). `context` names upstream inputs that
    change the values but are not the model (e.g. the embedding model, or other scores' signatures) and
    becomes part of the store key.
    """
    t0 = time.perf_counter()
    if batch_size < 1:
        raise ScorerError("batch_size must be >= 1")
    _check_inputs(records, scorer, engine, embeddings, other_scores)
    store = store if store is not None else ScoreStore()
    key = make_key(scorer.signature(), model_signature(scorer, engine), context)
    ids = records["id"].to_list()
    if not ids:
        empty = pl.DataFrame({c: [] for c in ["id", *scorer.columns]}).with_columns(pl.col("id").cast(pl.String))
        return ScoreRun(df=empty, n_computed=0, n_cached=0, seconds=time.perf_counter() - t0, key=key)
    todo = store.missing(key, ids)
    n_unique = len(set(ids))
    if todo:
        first = records.with_row_index("_pos").unique(subset="id", keep="first", maintain_order=True)
        want = pl.DataFrame({"id": todo}, schema={"id": pl.String})
        rows = want.join(first, on="id", how="left", maintain_order="left")
        aligned = _align_scores(records, other_scores)
        with progress() as bar:
            task = bar.add_task(f"score {scorer.name}", total=len(todo))
            for start in range(0, rows.height, batch_size):
                chunk = rows.slice(start, batch_size)
                pos = chunk["_pos"].to_numpy()
                batch = chunk.drop("_pos")
                out = score_batch(batch, scorer, engine=engine, pool_embeddings=pool_embeddings,
                                  embeddings=None if embeddings is None else np.asarray(embeddings)[pos],
                                  scores=None if aligned is None else aligned[pos])
                store.put(key, out.insert_column(0, batch["id"]))
                bar.advance(task, batch.height)
        if len(list(store.folder(key).glob("part-*.parquet"))) > COMPACT_AFTER_PARTS:
            store.compact(key)
    df = finalize_pool(scorer, store.get(key, ids).select(["id", *scorer.writes]))
    return ScoreRun(df=df, n_computed=len(todo), n_cached=n_unique - len(todo),
                    seconds=time.perf_counter() - t0, key=key)
