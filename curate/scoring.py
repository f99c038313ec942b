"""Pipeline glue for scoring: which engine, which embeddings, which store key — from the recipe.

The scorers themselves (`scorers/`) and the runner (`curate.score.score_pool`) know nothing of recipes or
run folders; this module resolves `score.model` (a proxy trained on the pool, or a name/path), keeps one
engine per process, and records what was computed in the manifest.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import polars as pl

from curate.config import Recipe
from curate.run import Run

_ENGINES: dict[tuple, Any] = {}
ALIASES = {"heuristics": "heur"}  # the scorer module is heuristics.py; its columns are heur_*


def canonical(name: str) -> str:
    return ALIASES.get(name, name)


def resolve_model(run: Run, recipe: Recipe) -> str:
    """`score.model`, with "proxy" resolved to a small LM trained on this pool (trained once, then pinned).

    The proxy used by a run folder is recorded in its manifest and reused on later runs over the same
    folder, so an incremental run (new rows added) keeps its model and rescoring stays incremental.
    """
    if recipe.score.model != "proxy":
        return recipe.score.model
    pinned = run.manifest.get("proxy_model")
    if pinned and Path(pinned).exists():
        return pinned
    import polars as pl

    from curate.lm.proxy import ensure_default_proxy

    # training steps scale with the pool (about 1.5 epochs of a small pool), capped at the proxy default (1000),
    # so the bundled sample trains its proxy in a few CPU minutes and a 52k pool gets the full schedule
    n = pl.scan_parquet(run.file("records.parquet")).select(pl.len()).collect().item()
    steps = int(min(1000, max(150, n // 10)))
    path = str(ensure_default_proxy(run.file("records.parquet"), seed=recipe.seed, steps=steps))
    run.set("proxy_model", path)
    return path


def engine_for(run: Run, recipe: Recipe) -> Any:
    """One engine per (model, engine kind, settings) per process."""
    from curate.lm.base import LMConfig, load_engine

    cfg = recipe.score
    model = resolve_model(run, recipe)
    key = (model, cfg.engine, cfg.max_length, tuple(cfg.vllm_urls))
    if key not in _ENGINES:
        config = LMConfig(model=model, max_length=cfg.max_length)
        kw: dict[str, Any] = {}
        if cfg.engine == "vllm":
            kw = {"urls": cfg.vllm_urls} if cfg.vllm_urls else {}  # interpreter: CURATE_VLLM_PYTHON / --vllm-python
        _ENGINES[key] = load_engine(config, kind=cfg.engine, **kw)
    return _ENGINES[key]


def _ordered(names: list[str]) -> list[str]:
    """Scorers that read other scorers' columns go after them."""
    from scorers import scorer_class

    names = [canonical(n) for n in names]
    deps = {n: set(scorer_class(n).needs.scores) for n in names}
    out: list[str] = []
    while len(out) < len(names):
        ready = [n for n in names if n not in out and deps[n] <= set(out) | (deps[n] - set(names))]
        if not ready:
            raise ValueError(f"scorers depend on each other in a cycle: {deps}")
        out.extend(ready)
    return out


def _inputs(run: Run, recipe: Recipe, name: str, df: pl.DataFrame) -> dict[str, Any]:
    """Engine, embeddings and other scores that scorer `name` needs, for the rows of df."""
    from scorers import get_scorer

    scorer = get_scorer(canonical(name), **recipe.score.params.get(name, {}))
    kw: dict[str, Any] = {"store": None, "batch_size": recipe.score.batch_size}
    context: list[str] = []
    if scorer.needs.engine:
        kw["engine"] = engine_for(run, recipe)
    if scorer.needs.embeddings:
        from curate.pipeline import pool_vectors, records

        all_ids = records(run, ["id"])["id"]
        X = pool_vectors(run, recipe)
        pos = pl.DataFrame({"id": all_ids}).with_row_index("_p").join(df.select("id"), on="id")["_p"].to_numpy()
        kw["pool_embeddings"], kw["embeddings"] = X, X[pos]
        context.append(f"embed={recipe.embed.model}/{recipe.embed.view}")
    if scorer.needs.scores:
        other = pl.DataFrame({"id": df["id"]})
        for dep in scorer.needs.scores:
            res = _score(run, recipe, dep, df)
            other = other.join(res.df, on="id", how="left")
            context.append(f"{dep}={res.key}")
        kw["other_scores"] = other
    kw["context"] = ";".join(context)
    return {"scorer": scorer, **kw}


def _score(run: Run, recipe: Recipe, name: str, df: pl.DataFrame) -> Any:
    from curate.score import score_pool

    kw = _inputs(run, recipe, name, df)
    scorer = kw.pop("scorer")
    return score_pool(df, scorer, **kw)


def score_records(run: Run, recipe: Recipe, name: str, df: pl.DataFrame) -> dict[str, Any]:
    """Score df (all records or one shard) with scorer `name`; stored batches are never recomputed."""
    res = _score(run, recipe, name, df)
    return {"scorer": name, "rows": df.height, "computed": res.n_computed, "cached": res.n_cached,
            "seconds": round(res.seconds, 3)}


def collect_scores(run: Run, recipe: Recipe, ids: pl.DataFrame) -> pl.DataFrame:
    """id + every scorer's columns for the whole pool (pool-relative columns finalised over all rows)."""
    df = pl.read_parquet(run.file("records.parquet"))
    out = ids.select("id")
    info: dict[str, Any] = {}
    for name in _ordered(recipe.score.scorers):
        t0 = time.perf_counter()
        res = _score(run, recipe, name, df)
        out = out.join(res.df, on="id", how="left")
        info[name] = {"computed": res.n_computed, "cached": res.n_cached, "key": res.key,
                      "seconds": round(time.perf_counter() - t0, 3)}
    from scorers import scorer_class

    uses_lm = any(scorer_class(canonical(n)).needs.engine for n in recipe.score.scorers)
    run.set("scoring", {"scorers": info, "model": engine_for(run, recipe).signature() if uses_lm else None})
    return out
