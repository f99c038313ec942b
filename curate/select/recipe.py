"""Pipeline glue for selection: recipe -> strategy, budget, quotas, thresholds; plus diversity numbers.

The strategies (`curate/select/`) are pure functions of a pool table; this module builds that table's
extra inputs from the run folder (embeddings for deita, exact token counts for a named tokenizer) and picks
defaults from the scores that exist.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl

from curate.config import Recipe
from curate.context import RunContext

#: quality column used by kMQ / deita when `select.score` is not given: the first present, higher = better
QUALITY_PRIORITY = ("deita_score", "deita_quality", "clear_confidence", "ifd", "grape_logp", "donod")
#: filters applied by default when their column exists: a heuristic defect flag. Cherry's `ifd < 1` is not a
#: default: with the pool-trained proxy it removed long rows and made subsets worse than random (BENCHMARKS.md,
#: "subsets"); with SmolLM2 almost no row has IFD > 1. Add it in select.thresholds to use it.
DEFAULT_THRESHOLDS = (("heur_flags", "heur_flags < 1"),)
DEFAULT_FRACTION = 0.1  # Diversify-and-Conquer's scripts select 10 % of the pool


def _quality_column(pool: pl.DataFrame, wanted: str | None) -> str | None:
    if wanted:
        return wanted
    return next((c for c in QUALITY_PRIORITY if c in pool.columns and pool[c].null_count() < pool.height), None)


def _budget(recipe: Recipe, pool: pl.DataFrame) -> tuple[Any, pl.DataFrame]:
    from curate.select import Budget

    cfg = recipe.select
    if cfg.budget_tokens is not None:
        if cfg.tokenizer:
            pool = pool.with_columns(n_tokens_model=pl.Series(token_counts(pool["messages"], cfg.tokenizer)))
            return Budget(tokens=cfg.budget_tokens, token_col="n_tokens_model"), pool
        return Budget(tokens=cfg.budget_tokens), pool
    if cfg.budget is not None:
        return Budget(rows=cfg.budget), pool
    if cfg.strategy == "threshold":
        return Budget(fraction=1.0), pool
    return Budget(fraction=cfg.fraction if cfg.fraction is not None else DEFAULT_FRACTION), pool


def token_counts(messages: pl.Series, tokenizer: str) -> np.ndarray:
    """Exact token counts of each conversation under `tokenizer`'s chat template (plain text if it has none)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer)
    out = np.empty(len(messages), dtype=np.int64)
    for i, msgs in enumerate(messages.to_list()):
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template(msgs, tokenize=True)
            out[i] = len(ids["input_ids"] if isinstance(ids, dict) else ids)
        else:
            out[i] = len(tok("\n".join(m["content"] for m in msgs))["input_ids"])
    return out


def _strategy(recipe: Recipe, pool: pl.DataFrame, ctx: RunContext | None = None, thresholds: Any = ()) -> Any:
    from curate.select import make_strategy

    cfg = recipe.select
    quality = _quality_column(pool, cfg.score)
    split = "proportional" if cfg.proportional else "uniform"
    if cfg.strategy == "kmq":
        return make_strategy("kmq", score_col=quality, split=split, temperature=cfg.temperature)
    if cfg.strategy == "iterative":
        if ctx is None:
            raise ValueError("the iterative strategy needs a run folder (its feedback fine-tunes the scoring LM)")
        from curate.run import cache_dir
        from curate.select import apply_thresholds, as_thresholds
        from curate.select.iterative import loss_feedback

        # probe only rows the strategy may choose from, so every cluster fed back is one it can draw on
        eligible = pool.filter(apply_thresholds(pool, as_thresholds(thresholds))["passed"]) if thresholds else pool
        # in the scoring engine's dtype (`auto` made concrete); lr and batch size follow the model (the proxy: its own)
        # each finished round is kept in the cache folder: a killed select resumes at the round it was in
        fn = loss_feedback(ctx.model(), eligible, probe_per_cluster=cfg.probe_per_cluster,
                           seed=recipe.seed, max_length=recipe.score.max_length, dtype=ctx.dtype_choice()["dtype"],
                           store=cache_dir() / "feedback")
        return make_strategy("iterative", rounds=cfg.rounds, temperature=cfg.feedback_temperature,
                             split=split, score_col=quality,
                             sample_temperature=cfg.temperature, feedback_fn=fn)
    if cfg.strategy == "deita":
        if quality is None:
            raise ValueError("the deita strategy needs a score column: add a scorer or set select.score")
        return make_strategy("deita", score_col=quality, tau=cfg.tau)
    if cfg.strategy == "fusion":
        if not cfg.fusion:
            raise ValueError("the fusion strategy needs select.fusion: {column: weight}, negative = lower is better")
        cols = tuple(cfg.fusion)
        return make_strategy("fusion", columns=cols, weights=tuple(abs(w) for w in cfg.fusion.values()),
                             cost=tuple(c for c, w in cfg.fusion.items() if w < 0), method=cfg.fusion_method)
    return make_strategy("random")


def score_tilt(pool: pl.DataFrame, decisions: pl.DataFrame, strategy: Any, budget: Any, quotas: Any,
               thresholds: Any, seed: int) -> dict[str, Any]:
    """How many of kMQ's rows the quality score decided: the same draw without the score (cluster-stratified
    uniform, same seed, quotas and thresholds) shares the rest. At temperature 1 a score with IFD's spread moves
    few rows (BENCHMARKS.md "kmq-temperature"), which a reader of a "no better than random" verdict should know."""
    from curate.select import make_strategy, select

    uniform = select(pool, make_strategy("kmq", score_col=None, split=strategy.split), budget, quotas=quotas,
                     thresholds=thresholds, seed=seed)
    mine = decisions.filter(pl.col("selected"))["id"]
    shared = int(mine.is_in(uniform.filter(pl.col("selected"))["id"].implode()).sum())
    return {"score": strategy.score_col, "temperature": strategy.temperature, "selected": mine.len(),
            "shared_with_stratified_random": shared}


def select_pool(ctx: RunContext, pool: pl.DataFrame) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Decisions for every pool row plus what the manifest should record about the choice."""
    from curate.select import Quotas, resolve_thresholds, select

    recipe = ctx.recipe
    cfg = recipe.select
    budget, pool = _budget(recipe, pool)
    thresholds = list(cfg.thresholds) or [t for col, t in DEFAULT_THRESHOLDS if col in pool.columns]
    strategy = _strategy(recipe, pool, ctx, thresholds)
    quotas = Quotas(source_weights=cfg.source_weights or None, cluster_min=cfg.cluster_min,
                    cluster_max=cfg.cluster_max)
    X = ctx.vectors_of(pool["id"]) if recipe.embed.enabled and pool.height else None
    decisions = select(pool, strategy, budget, quotas=quotas, thresholds=thresholds, seed=recipe.seed,
                       embeddings=X if cfg.strategy == "deita" else None)
    info: dict[str, Any] = {
        "budget": budget.describe(),
        "strategy_params": {k: v for k, v in vars(strategy).items()
                            if not k.startswith("_") and k not in ("feedback_fn", "history")},
        "thresholds": {str(t.column) + " " + t.op: cut for t, cut in resolve_thresholds(pool, thresholds)}
        if thresholds else {},
    }
    if cfg.strategy == "kmq" and getattr(strategy, "score_col", None):
        info["score_tilt"] = score_tilt(pool, decisions, strategy, budget, quotas, thresholds, recipe.seed)
    if cfg.strategy == "iterative":
        info["rounds"] = [h | {"feedback": f} for h, f in
                          zip(strategy.history, [None, *strategy.feedback_fn.history], strict=True)]
    if X is not None and pool.height:
        from curate.diversity import diversity_summary

        mask = decisions["selected"].to_numpy()
        ctx.run.set("diversity", diversity_summary(X, mask, pool["cluster"].to_numpy(), seed=recipe.seed))
    return decisions, info
