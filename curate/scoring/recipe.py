"""Pipeline glue for scoring: which scorer instance, which engine, which embeddings — from the run context.

The scorers themselves (`scorers/`) and the runner (`curate.scoring.runner.score_pool`) know nothing of recipes or
run folders. What a scorer needs is read from the configured INSTANCE (its parameters may narrow it: e.g.
InstructMining without UniEval needs no LM), never from the class.
"""

from __future__ import annotations

import time
from typing import Any

import polars as pl

from curate.context import RunContext


def make_scorer(ctx_or_params: Any, name: str) -> Any:
    """The scorer `name` built with its `score.params.<name>` (a Recipe, or a RunContext)."""
    from curate.scoring.registry import get_scorer

    recipe = getattr(ctx_or_params, "recipe", ctx_or_params)
    return get_scorer(name, **recipe.score.params.get(name, {}))


def ordered(recipe: Any, names: list[str]) -> list[str]:
    """Scorers that read other scorers' columns go after them."""
    deps = {n: set(make_scorer(recipe, n).needs.scores) for n in names}
    out: list[str] = []
    while len(out) < len(names):
        ready = [n for n in names if n not in out and deps[n] <= set(out) | (deps[n] - set(names))]
        if not ready:
            raise ValueError(f"scorers depend on each other in a cycle: {deps}")
        out.extend(ready)
    return out


def uses_engine(recipe: Any) -> bool:
    """Does any configured scorer (or a scorer one depends on) need a language model?"""
    return any(make_scorer(recipe, n).needs.engine for n in _with_deps(recipe, recipe.score.scorers))


def sampled(recipe: Any) -> list[str]:
    """The configured scorers that run a language model (themselves or through a scorer they read): these
    score a sample when `score.sample`/`score.minutes` ask for one, and are predicted for the other rows."""
    out: list[str] = []
    for name in ordered(recipe, recipe.score.scorers):
        scorer = make_scorer(recipe, name)
        if scorer.needs.engine or any(d in out for d in scorer.needs.scores):
            out.append(name)
    return out


def timed_scorers(recipe: Any) -> list[str]:
    """The scorers whose work grows with the LM sample, in the order they run: the sampled scorers and the
    unconfigured scorers they read (computed on the same rows). Their summed time per row is what
    `score.minutes` buys (`measure_rate`)."""
    lm = sampled(recipe)
    configured = set(recipe.score.scorers)
    return [n for n in ordered(recipe, _with_deps(recipe, lm)) if n in lm or n not in configured]


def measure_rate(ctx: RunContext, ids: pl.Series | list[str], scorers: list[str], warmup: int = 4) -> dict[str, Any]:
    """Rows per second of `scorers` together on this machine, now: each scorer is run as the score stage runs
    it (the run's engine, its batch code, the same record columns) on the rows `ids`, once untimed on the first
    `warmup` rows (the first call pays for kernel set-up), then timed on all of them.

    The score store is neither read nor written: a stored row would time as free. Scorers the timed ones read
    but that are not timed (configured rule scorers, computed for every row anyway) run untimed.
    Returns {rows_per_second, calibration_rows, calibration_seconds, warmup_seconds, scorer_seconds}.
    """
    from curate.scoring.runner import finalize_pool, score_batch

    recipe = ctx.recipe
    names = ordered(recipe, _with_deps(recipe, list(scorers)))
    rows = ctx.records().join(pl.DataFrame({"id": pl.Series(ids, dtype=pl.String)}), on="id", how="semi")
    if rows.height == 0:
        raise ValueError("no calibration rows")
    instances = {n: make_scorer(ctx, n) for n in names}
    engine = ctx.engine() if any(s.needs.engine for s in instances.values()) else None

    def run_all(batch: pl.DataFrame) -> dict[str, float]:
        outs: dict[str, pl.DataFrame] = {}
        secs: dict[str, float] = {}
        for n in names:
            scorer = instances[n]
            kw: dict[str, Any] = {}
            if scorer.needs.embeddings:
                kw = _embedding_inputs(ctx, scorer.needs.embeddings, batch["id"])
            if scorer.needs.scores:
                kw["scores"] = pl.concat([outs[d] for d in scorer.needs.scores], how="horizontal")
            t0 = time.perf_counter()
            out = score_batch(batch, scorer, engine=engine, **kw)
            secs[n] = time.perf_counter() - t0
            # what a reader of this scorer gets: per-row and pool columns, row-aligned with the batch
            outs[n] = finalize_pool(scorer, out.insert_column(0, batch["id"])).drop("id")
        return secs

    t0 = time.perf_counter()
    run_all(rows.head(max(1, warmup)))
    warm = time.perf_counter() - t0
    secs = run_all(rows)
    total = sum(secs[n] for n in scorers)
    if not total > 0:
        raise ValueError(f"calibration took {total} s")
    return {"rows_per_second": rows.height / total, "calibration_rows": rows.height,
            "calibration_seconds": round(total, 3), "warmup_seconds": round(warm, 3),
            "scorer_seconds": {n: round(secs[n], 3) for n in scorers}}


def sample_ids(ctx: RunContext) -> pl.Series | None:
    """The ids the LM scores (score_sample.parquet, written by the sample stage), or None: every row."""
    path = ctx.run.file("score_sample.parquet")
    return pl.read_parquet(path)["id"] if path.exists() else None


def scored_rows(ctx: RunContext, name: str, df: pl.DataFrame) -> pl.DataFrame:
    """The rows of df that scorer `name` computes: the sample for LM scorers when there is one, else all."""
    ids = sample_ids(ctx) if name in sampled(ctx.recipe) else None
    return df if ids is None else df.join(pl.DataFrame({"id": ids}), on="id", how="semi")


def _with_deps(recipe: Any, names: list[str]) -> list[str]:
    out: list[str] = []
    todo = list(names)
    while todo:
        n = todo.pop()
        if n not in out:
            out.append(n)
            todo.extend(make_scorer(recipe, n).needs.scores)
    return out


def _embedding_inputs(ctx: RunContext, view: str, ids: pl.Series) -> dict[str, Any]:
    """The pool's vectors in `view` and those of the rows `ids` (row-aligned), as a scorer gets them."""
    return {"pool_embeddings": ctx.vectors(view), "embeddings": ctx.vectors_of(ids, view)}


def _inputs(ctx: RunContext, name: str, df: pl.DataFrame) -> dict[str, Any]:
    """Engine, embeddings and other scores that scorer `name` needs, for the rows of df."""
    scorer = make_scorer(ctx, name)
    kw: dict[str, Any] = {"store": None, "batch_size": ctx.recipe.score.batch_size}
    context: list[str] = []
    if scorer.needs.engine:
        kw["engine"] = ctx.engine()
    if scorer.needs.embeddings:  # the view the scorer declares (e.g. instruction + response for kNN)
        view = scorer.needs.embeddings
        kw.update(_embedding_inputs(ctx, view, df["id"]))
        context.append(f"embed={ctx.recipe.embed.model}/{view}")
    if scorer.needs.scores:
        other = pl.DataFrame({"id": df["id"]})
        for dep in scorer.needs.scores:
            res = _score(ctx, dep, df)
            other = other.join(res.df, on="id", how="left")
            context.append(f"{dep}={res.key}")
        kw["other_scores"] = other
    kw["context"] = ";".join(context)
    return {"scorer": scorer, **kw}


def _score(ctx: RunContext, name: str, df: pl.DataFrame) -> Any:
    from curate.scoring.runner import score_pool

    kw = _inputs(ctx, name, df)
    scorer = kw.pop("scorer")
    return score_pool(df, scorer, **kw)


def score_records(ctx: RunContext, name: str, df: pl.DataFrame) -> dict[str, Any]:
    """Score df (all records or one shard) with scorer `name`; stored batches are never recomputed."""
    res = _score(ctx, name, df)
    return {"scorer": name, "rows": df.height, "computed": res.n_computed, "cached": res.n_cached,
            "seconds": round(res.seconds, 3)}


def collect_scores(ctx: RunContext, ids: pl.DataFrame) -> pl.DataFrame:
    """id + every scorer's columns for the whole pool (pool-relative columns finalised over all rows).

    With a sample, LM scorers' columns are computed on the sample and predicted for the other rows
    (`curate.distill`); `score_predicted` says which, and the predictor's agreement on held-out sampled rows
    goes to the manifest (`distill`).
    """
    recipe = ctx.recipe
    df = ctx.records()
    out = ids.select("id")
    info: dict[str, Any] = {}
    for name in ordered(recipe, recipe.score.scorers):
        t0 = time.perf_counter()
        res = _score(ctx, name, scored_rows(ctx, name, df))
        out = out.join(res.df, on="id", how="left")
        info[name] = {"computed": res.n_computed, "cached": res.n_cached, "key": res.key,
                      "seconds": round(time.perf_counter() - t0, 3)}
    lm = sampled(recipe)
    if lm:
        out = _fill_predicted(ctx, df, out, lm)
    ctx.run.set("scoring", {"scorers": info, "model": ctx.engine().signature() if uses_engine(recipe) else None})
    return out


def _fill_predicted(ctx: RunContext, records: pl.DataFrame, out: pl.DataFrame, lm: list[str]) -> pl.DataFrame:
    """LM columns for rows outside the sample, predicted from features the pipeline has (curate.distill)."""
    ids = sample_ids(ctx)
    if ids is None or ids.len() >= out.height:
        return out.with_columns(score_predicted=pl.lit(False))
    from curate.distill import distill, features

    cols = [c for n in lm for c in make_scorer(ctx, n).columns]
    flags = [c for c in out.columns if c.startswith("heur_")]
    cfg = ctx.recipe.embed
    feats = features(records, model=cfg.model, flags=out.select("id", *flags) if flags else None,
                     batch_size=cfg.batch_size, max_seq_length=cfg.max_seq_length)
    computed = out.join(pl.DataFrame({"id": ids}), on="id", how="semi").select("id", *cols)
    table, report = distill(feats, computed, all_ids=out["id"], seed=ctx.recipe.seed)
    ctx.run.set("distill", report)
    return out.drop(cols).join(table, on="id", how="left", maintain_order="left")
