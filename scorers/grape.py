"""GRAPE: among several candidate responses to one instruction, keep the one the target model finds likeliest.

Rule (docs/methods.md §7): y* = argmax_k mean_t log p(y_k,t | x, y_k,<t) under the *target base* model, i.e.
the candidate closest to the model's own distribution. Rows are grouped by their prompt (every message
before the last assistant turn, case- and whitespace-folded), so a pool holding K rows per instruction
gets one `grape_best` per group; a singleton group's only row is its best.

`grape_logp` (per row, stored) is the length-normalised log-probability; `grape_best` / `grape_rank` /
`grape_group_size` depend on the other candidates in the pool and are computed by `finalize()` over the
whole scored pool. Ties go to the shortest response (fewest scored tokens), then to the smaller id.
"""

from __future__ import annotations

import hashlib
import re
from typing import Literal

import numpy as np
import orjson
import polars as pl

from curate.scoring.contract import Needs, ScoreContext, Scorer, ScorerParams, engine_of, last_turn, token_nll

_WS = re.compile(r"\s+")


def group_key(prompt: list[dict[str, str]], by: str = "prompt") -> str:
    """Hash of the folded prompt (all earlier messages) or of the last user turn only (`by="instruction"`)."""
    if by == "instruction":
        prompt = [m for m in prompt if m["role"] == "user"][-1:]
    folded = [(m["role"], _WS.sub(" ", m["content"]).strip().lower()) for m in prompt]
    return hashlib.sha256(orjson.dumps(folded)).hexdigest()[:16]


class GRAPE(Scorer):
    name = "grape"
    version = "1"
    reads = ("messages",)
    writes = ("grape_logp", "grape_n_tokens", "grape_group", "grape_error")
    pool_writes = ("grape_best", "grape_rank", "grape_group_size")
    needs = Needs(engine=("response_logprobs",))
    multi_turn = ("the last assistant turn is the candidate, with the whole earlier conversation as its prompt; "
                  "candidates compete when those prompts are equal")
    higher_is_better = {"grape_logp": True, "grape_best": True, "grape_rank": False}

    class Params(ScorerParams):
        group_by: Literal["prompt", "instruction"] = "prompt"  # instruction = last user turn only
        include_end: bool = True  # the end-of-turn token counts, as SFT trains on it

    def score(self, batch: pl.DataFrame, ctx: ScoreContext) -> pl.DataFrame:
        engine = engine_of(ctx, self)
        pairs = [last_turn(m) for m in batch["messages"].to_list()]
        nll = token_nll(engine, [p for p, _ in pairs], [r for _, r in pairs], include_end=self.params.include_end)
        logp, count, err = [], [], []
        for x in nll:
            ok = len(x) > 0 and bool(np.isfinite(x).all())
            logp.append(float(-x.mean()) if ok else None)
            count.append(len(x))
            err.append(None if ok else "no response tokens" if len(x) == 0 else "non-finite log-probability")
        return pl.DataFrame(
            {"grape_logp": logp, "grape_n_tokens": count,
             "grape_group": [group_key(p, self.params.group_by) for p, _ in pairs], "grape_error": err},
            schema={"grape_logp": pl.Float64, "grape_n_tokens": pl.Int64, "grape_group": pl.String,
                    "grape_error": pl.String},
        )

    def finalize(self, scores: pl.DataFrame) -> pl.DataFrame:
        return grape_pick(scores)


def grape_pick(scores: pl.DataFrame) -> pl.DataFrame:
    """Add grape_rank (1 = best in its group; null when unscored), grape_best and grape_group_size."""
    ranked = (
        scores.select("id", "grape_group", "grape_logp", "grape_n_tokens").unique("id", keep="first")
        .filter(pl.col("grape_logp").is_not_null())
        .sort(["grape_group", "grape_logp", "grape_n_tokens", "id"], descending=[False, True, False, False])
        .with_columns(grape_rank=pl.int_range(1, pl.len() + 1).over("grape_group").cast(pl.Int64))
        .select("id", "grape_rank")
    )
    out = scores.join(ranked, on="id", how="left", maintain_order="left")
    return out.with_columns(
        grape_best=(pl.col("grape_rank") == 1).fill_null(False),
        grape_group_size=pl.len().over("grape_group").cast(pl.Int64),
    )
