"""Instruction-Following Difficulty: how much the instruction helps the model predict the answer.

Two published definitions from the same two passes (docs/methods.md §6), kept as separate columns because they
rank differently:
- `ifd`     Cherry LLM (tianyi-lab/Cherry_LLM data_by_IFD.py): mean answer-token loss given the prompt /
            mean answer-token loss after the unconditioned prefix, a ratio of losses.
- `ifd_ppl` Superfiltering (tianyi-lab/Superfiltering put_analysis_to_data.py): PPL(A|Q) / PPL(A) =
            exp(loss(A|Q) - loss(A)), a difference of losses.
The IFD > 1 rule (the instruction makes the answer *less* likely: misaligned, both papers drop it) is the
boolean `ifd_gt1`; for positive losses ifd > 1 <=> ifd_ppl > 1, so one column serves both definitions.

Unconditioned pass = the engine's empty prompt: BOS + the template's assistant header, i.e. Cherry's
`### Response:` prefix under the alpaca template, so the first answer token is scored in both passes.
Both passes score the same answer tokens: the engine truncates the prompt, never the answer, to fit. When the
answer (nearly) fills `max_length` the prompt is cut down to template tokens only (e.g. `<|im_end|>\n<|im_start|>
assistant\n`, or the very prefix of the unconditioned pass, which makes IFD exactly 1.0): the ratio then says
nothing about the instruction, so such rows get null scores and `ifd_error` "instruction cut away ...".
By default end-of-turn tokens are left out (Cherry and Superfiltering score the answer text only).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from curate.scoring.contract import Needs, ScoreContext, Scorer, ScorerParams, engine_of, last_turn, token_nll

if TYPE_CHECKING:
    from curate.lm.base import Engine


class IFD(Scorer):
    name = "ifd"
    version = "2"  # 2: rows whose response fills max_length get null + ifd_error, not ~1.0
    reads = ("messages",)
    writes = ("ifd", "ifd_ppl", "ifd_gt1", "ifd_cond_loss", "ifd_uncond_loss", "ifd_n_tokens", "ifd_error")
    needs = Needs(engine=("response_logprobs",))
    multi_turn = ("the last assistant turn, with the whole earlier conversation (system, user and assistant "
                  "turns) as its instruction; the unconditioned pass sees that answer alone")
    higher_is_better = {"ifd": True, "ifd_ppl": True, "ifd_gt1": False}

    class Params(ScorerParams):
        include_end: bool = False  # score end-of-turn tokens too (the papers do not)

    def score(self, batch: pl.DataFrame, ctx: ScoreContext) -> pl.DataFrame:
        engine = engine_of(ctx, self)
        pairs = [last_turn(m) for m in batch["messages"].to_list()]
        prompts = [p for p, _ in pairs]
        responses = [r for _, r in pairs]
        n = len(pairs)
        # one engine call for both passes, so the engine can bucket all sequences together
        nll = token_nll(engine, prompts + [[]] * n, responses * 2, include_end=self.params.include_end)
        cols: dict[str, list] = {c: [] for c in self.writes}
        for p, r, cond, unc in zip(prompts, responses, nll[:n], nll[n:], strict=True):
            m = min(len(cond), len(unc))
            err = None
            if m and not p:  # API callers only: ingest rejects rows without a user turn
                err = "no instruction: an empty prompt is the unconditioned pass itself"
            elif m and _instruction_cut_away(engine, p, r):
                err = (f"instruction cut away: the response fills max_length {engine.config.max_length}, "
                       "leaving the prompt only template tokens")
            elif m == 0:
                err = "no response tokens"
            elif not (np.isfinite(cond[:m]).all() and np.isfinite(unc[:m]).all()):
                err = "non-finite log-probability"
            else:
                lc, lu = float(cond[:m].mean()), float(unc[:m].mean())
                if lu <= 0.0:
                    err = "unconditioned loss is zero"
            if err:
                for c in self.writes:
                    cols[c].append(err if c == "ifd_error" else None)
                continue
            ratio = lc / lu
            cols["ifd"].append(ratio)
            cols["ifd_ppl"].append(float(np.exp(lc - lu)))
            cols["ifd_gt1"].append(ratio > 1.0)
            cols["ifd_cond_loss"].append(lc)
            cols["ifd_uncond_loss"].append(lu)
            cols["ifd_n_tokens"].append(m)
            cols["ifd_error"].append(None)
        return pl.DataFrame(cols, schema={
            "ifd": pl.Float64, "ifd_ppl": pl.Float64, "ifd_gt1": pl.Boolean, "ifd_cond_loss": pl.Float64,
            "ifd_uncond_loss": pl.Float64, "ifd_n_tokens": pl.Int64, "ifd_error": pl.String,
        })


def _instruction_cut_away(engine: Engine, prompt: list[dict[str, str]], response: str) -> bool:
    """True when truncation left the conditioned pass no token of the conversation's text, only template tokens
    (a response that fills, or nearly fills, max_length): the ratio then measures the chat template, not the
    instruction (exactly 1.0 when the kept tokens are the unconditioned prefix itself)."""
    kept = engine.encode(prompt, response).prompt_ids
    if len(kept) == len(engine.encoder.prompt_ids(prompt)):
        return False  # nothing was cut
    try:  # the same conversation with every text emptied: what is left is the template
        bare = engine.encoder.prompt_ids([{**m, "content": ""} for m in prompt])
    except Exception:  # noqa: BLE001 - a template that refuses empty turns: fall back to the exact-1.0 case
        return kept == engine.encode([], response).prompt_ids
    if engine.config.truncation_side == "left":
        return bare[-len(kept):] == kept
    return bare[: len(kept)] == kept
