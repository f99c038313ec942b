"""Response perplexity given the prompt: exp(mean token NLL of the answer), optionally also unconditioned.

Low perplexity = the model already finds the answer likely (fluent, or easy); InstructMining reads it as
a quality indicator. The unconditioned column (answer after the engine's minimal prefix only) lets a
user see how much the prompt helps; IFD (scorers/ifd.py) is the ratio built from the same two passes.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import polars as pl

from curate.scoring.contract import (
    Needs,
    ScoreContext,
    Scorer,
    ScorerParams,
    assistant_turns,
    engine_of,
    last_turn,
    token_nll,
)


class Perplexity(Scorer):
    name = "perplexity"
    version = "1"
    reads = ("messages",)
    writes = ("perplexity", "perplexity_loss", "perplexity_n_tokens", "perplexity_uncond", "perplexity_error")
    needs = Needs(engine=("response_logprobs",))
    multi_turn = ("turns='last' (default): the last assistant turn with every earlier message as its prompt; "
                  "turns='all': every assistant turn given its history, pooled as the token-weighted mean NLL "
                  "(the SFT loss of the whole conversation)")
    higher_is_better = {"perplexity": False, "perplexity_loss": False, "perplexity_uncond": False}

    class Params(ScorerParams):
        turns: Literal["last", "all"] = "last"
        unconditioned: bool = False  # also fill perplexity_uncond (one more forward pass per turn)
        include_end: bool = True  # count the end-of-turn token(s), as SFT trains on them

    def score(self, batch: pl.DataFrame, ctx: ScoreContext) -> pl.DataFrame:
        engine = engine_of(ctx, self)
        owner: list[int] = []
        prompts: list[list[dict[str, str]]] = []
        responses: list[str] = []
        for row, msgs in enumerate(batch["messages"].to_list()):
            turns = assistant_turns(msgs) if self.params.turns == "all" else [last_turn(msgs)]
            for p, r in turns:
                owner.append(row)
                prompts.append(p)
                responses.append(r)
        n = len(owner)
        if self.params.unconditioned:
            nll = token_nll(engine, prompts + [[]] * n, responses * 2, include_end=self.params.include_end)
            cond, uncond = nll[:n], nll[n:]
        else:
            cond, uncond = token_nll(engine, prompts, responses, include_end=self.params.include_end), None
        sums = np.zeros((batch.height, 3))  # cond NLL, tokens, uncond NLL
        for i, row in enumerate(owner):
            sums[row, 0] += cond[i].sum()
            sums[row, 1] += len(cond[i])
            if uncond is not None:
                sums[row, 2] += uncond[i][: len(cond[i])].sum()
        loss, ppl, ppl_u, err = [], [], [], []
        for s_cond, count, s_unc in sums:
            if count == 0 or not np.isfinite(s_cond):
                loss.append(None), ppl.append(None), ppl_u.append(None)
                err.append("no response tokens" if count == 0 else "non-finite log-probability")
                continue
            loss.append(s_cond / count)
            ppl.append(float(np.exp(s_cond / count)))
            ppl_u.append(float(np.exp(s_unc / count)) if uncond is not None else None)
            err.append(None)
        return pl.DataFrame(
            {
                "perplexity": ppl,
                "perplexity_loss": loss,
                "perplexity_n_tokens": sums[:, 1].astype(np.int64),
                "perplexity_uncond": ppl_u,
                "perplexity_error": err,
            },
            schema={"perplexity": pl.Float64, "perplexity_loss": pl.Float64, "perplexity_n_tokens": pl.Int64,
                    "perplexity_uncond": pl.Float64, "perplexity_error": pl.String},
        )
