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


#: record columns that a threshold, fusion weight or select.score may name (curate/validate.py accepts them) but
#: the candidate pool (RunContext.pool) does not carry: without them a recipe the check passed failed at the select
#: stage, after ingest, embedding and scoring, with "threshold column 'response_chars' not in pool"
RECORD_COLUMNS = ("n_chars", "instruction_chars", "response_chars", "n_turns")


def _named_columns(recipe: Recipe) -> set[str]:
    """Pool columns the select section names: thresholds, fusion weights, the quality score."""
    from curate.select import as_thresholds

    cfg = recipe.select
    return {t.column for t in as_thresholds(cfg.thresholds)} | set(cfg.fusion) | ({cfg.score} if cfg.score else set())


def _with_record_columns(ctx: RunContext, pool: pl.DataFrame) -> pl.DataFrame:
    """The pool plus the RECORD_COLUMNS the select section names and the pool lacks, from records.parquet (read
    only when a recipe names one)."""
    named = _named_columns(ctx.recipe)
    missing = [c for c in RECORD_COLUMNS if c in named and c not in pool.columns]
    if not missing:
        return pool
    return pool.join(ctx.records(["id", *missing]), on="id", how="left", maintain_order="left")


def _budget(recipe: Recipe, pool: pl.DataFrame) -> tuple[Any, pl.DataFrame]:
    from curate.select import Budget, SelectionError

    cfg = recipe.select
    named = "n_tokens_model" in _named_columns(recipe)  # a threshold or fusion weight on it, not only the budget
    if named and not cfg.tokenizer:
        raise SelectionError("select: n_tokens_model is counted by select.tokenizer (a model name or folder); "
                             "set it, or name n_tokens (curate's own estimate) instead")
    if cfg.tokenizer and (named or cfg.budget_tokens is not None):
        pool = pool.with_columns(n_tokens_model=pl.Series(token_counts(pool["messages"], cfg.tokenizer)))
    if cfg.budget_tokens is not None:
        if cfg.tokenizer:
            return Budget(tokens=cfg.budget_tokens, token_col="n_tokens_model"), pool
        return Budget(tokens=cfg.budget_tokens), pool
    if cfg.budget is not None:
        return Budget(rows=cfg.budget), pool
    if cfg.strategy == "threshold":
        return Budget(fraction=1.0), pool
    return Budget(fraction=cfg.fraction if cfg.fraction is not None else DEFAULT_FRACTION), pool


def token_counts(messages: pl.Series, tokenizer: str) -> np.ndarray:
    """Exact token counts of each conversation under `tokenizer`'s chat template (plain text if it has none).

    The template is rendered to text and then tokenized: `apply_chat_template(tokenize=True)` returns a
    BatchEncoding in transformers 5 (not a dict), whose len() is its 2 keys, so every row counted 2 tokens and a
    `budget_tokens` of 3,000 took 99 of 100 rows."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer)
    out = np.empty(len(messages), dtype=np.int64)
    for i, msgs in enumerate(messages.to_list()):
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(msgs, tokenize=False)
            out[i] = len(tok(text, add_special_tokens=False)["input_ids"])
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


def check_source_weights(ctx: RunContext, pool: pl.DataFrame) -> None:
    """Every source named in select.source_weights is one of the run's sources. A source not listed gets weight 0,
    so one misspelt name (`code.jsonl` for `data/code.jsonl`) silently left that whole file out of the subset,
    every row "source_quota_full"."""
    from curate.select import SelectionError

    weights = ctx.recipe.select.source_weights
    if not weights:
        return
    known = set(ctx.run.manifest.get("inputs") or {}) | set(pool["source"].unique().to_list())
    unknown = sorted(set(weights) - known)
    if unknown:
        raise SelectionError(f"select.source_weights: {', '.join(map(repr, unknown))} is not a source of this run; "
                             f"its sources (input files as named on the command line or found in a folder) are "
                             f"{', '.join(map(repr, sorted(known)))}")


def select_pool(ctx: RunContext, pool: pl.DataFrame) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Decisions for every pool row plus what the manifest should record about the choice."""
    from curate.select import Quotas, resolve_thresholds, select

    recipe = ctx.recipe
    cfg = recipe.select
    check_source_weights(ctx, pool)
    budget, pool = _budget(recipe, _with_record_columns(ctx, pool))
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
    # what the subset holds in the budget's token column: a token budget's use, and the number `curate plan`'s
    # "(subset tokens, estimated)" is checked against (the manifest had the subset's rows only)
    col = budget.token_col if budget.token_col in pool.columns else None
    if col:
        picked = pool[col].filter(decisions["selected"]).fill_null(0)
        info["tokens"] = {"column": col, "pool": int(pool[col].fill_null(0).sum()), "selected": int(picked.sum())}
    if cfg.strategy == "kmq" and getattr(strategy, "score_col", None):
        info["score_tilt"] = score_tilt(pool, decisions, strategy, budget, quotas, thresholds, recipe.seed)
    if cfg.strategy == "iterative":
        fb = iter(strategy.feedback_fn.history)  # rounds whose feedback was skipped (feedback_moot) say so
        info["rounds"] = [h | {"feedback": None if h["round"] == 0 else h.get("feedback") or next(fb)}
                          for h in strategy.history]
    if X is not None and pool.height:
        from curate.diversity import diversity_summary

        mask = decisions["selected"].to_numpy()
        ctx.run.set("diversity", diversity_summary(X, mask, pool["cluster"].to_numpy(), seed=recipe.seed))
    return decisions, info
