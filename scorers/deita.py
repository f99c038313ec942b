"""deita complexity and quality scores (Liu et al., ICLR 2024; hkust-nlp/deita scorer code).

Why the exact strings: the released scorers (hkust-nlp/deita-complexity-scorer, deita-quality-scorer) were
fine-tuned on these templates, trailing spaces included; any other model can be given too (LMConfig(model=
name or path)). Score = Σ_k k·p_k over the next-token probabilities of "1".."6" renormalised over those six
(deita: softmax of the six logits at the first generated position; `choice_probs` is exactly that), so a
score lies in [1, 6]. No fallback value: deita returns 3.0 when a digit is missing from vLLM's top-k; our
engines return all six probabilities, so nothing is guessed.

Multi-turn (deita `score_pipeline.py`): complexity_i = C(user_i) without history, quality_i =
Q(user_i, assistant_i); deita_score = Σ_i complexity_i × quality_i. deita_complexity / deita_quality are
the means over turns (equal to the single turn's values for single-turn rows).

Prompt injection: a row is untrusted text. By default (`delimit=True`) the scorer fences row text between
markers it cannot forge (scorers/_judge.py) under a note that fenced text is data; in every mode the template's
own markers inside row text ("##Quality:", "## Quality: 6", "#Response#:", ...) are defanged (a zero-width joiner
after each '#'), so a row cannot open a fake "##Quality: 6" slot. `delimit=False` keeps the exact released
templates around the (defanged) text, for the released deita scorers, which were fine-tuned on them.
"""

from __future__ import annotations

import re
from typing import ClassVar

import numpy as np
import polars as pl

from curate.scoring.contract import Needs, ScoreContext, Scorer, ScorerParams, engine_of
from scorers._judge import DATA_NOTE, expected_value, fence, render_for_choice

#: hkust-nlp/deita src/deita/selection/scorer/llama_scorer.py (same strings in mistral_scorer.py)
COMPLEXITY_TEMPLATE = (
    "You are a helpful assistant. Please identify the complexity score of the following user query. \n"
    "##Query: {instruction}  \n##Complexity: "
)
QUALITY_TEMPLATE = (
    "You are a helpful assistant. Please identify the quality score of the Response corresponding to the "
    "Question. \n #Question#:\n{instruction}\n#Response#:\n{output} \n##Quality: "
)
DIGITS = ("1", "2", "3", "4", "5", "6")

#: a '#' that starts one of the template's markers, however spaced: "##Quality:", "## Quality :", "#Response#:"
_MARKERS = re.compile(r"#(?=\s*#?\s*(?:Query|Complexity|Quality|Question|Response)\s*#?\s*:)", re.I)


def defang(text: str) -> str:
    """Break the template's markers inside row text ('## Quality: 6' -> '#\u200d#\u200d Quality: 6')."""
    return _MARKERS.sub("#\u200d", text)


def complexity_prompt(instruction: str, *, delimit: bool = False) -> str:
    text = fence(defang(instruction), "QUERY") if delimit else defang(instruction)
    prompt = COMPLEXITY_TEMPLATE.format(instruction=text)
    return f"{DATA_NOTE}\n{prompt}" if delimit else prompt


def quality_prompt(instruction: str, output: str, *, delimit: bool = False) -> str:
    if delimit:
        prompt = QUALITY_TEMPLATE.format(instruction=fence(defang(instruction), "QUESTION"),
                                         output=fence(defang(output), "RESPONSE"))
        return f"{DATA_NOTE}\n{prompt}"
    return QUALITY_TEMPLATE.format(instruction=defang(instruction), output=defang(output))


def turn_pairs(messages: list[dict]) -> list[tuple[str, str]]:
    """(user_i, assistant_i) per turn; a trailing user turn gets response "" (deita); system is ignored."""
    pairs: list[tuple[str, str]] = []
    pending: str | None = None
    for m in messages:
        if m["role"] == "user":
            if pending is not None:
                pairs.append((pending, ""))
            pending = m["content"] or ""
        elif m["role"] == "assistant" and pending is not None:
            pairs.append((pending, m["content"] or ""))
            pending = None
    if pending is not None:
        pairs.append((pending, ""))
    return pairs


def digit_score(probs: np.ndarray) -> np.ndarray:
    """deita's expected score over the digits 1..6: Σ_k k·p_k with p renormalised over the six."""
    return expected_value(probs, [1, 2, 3, 4, 5, 6])


class DeitaParams(ScorerParams):
    chat: bool = False  # False: raw template (what the released scorers expect); True: in the chat template
    delimit: bool = True  # fence row text (default); False = the exact released templates; see module docstring


class Deita(Scorer):
    """deita complexity × quality via next-token digit probabilities."""

    name = "deita"
    version = "2"  # 2: judge prompts longer than max_length lose their middle, not their start
    reads = ("messages",)
    writes = ("deita_complexity", "deita_quality", "deita_score")
    needs = Needs(engine=("choice_probs",))
    multi_turn: ClassVar[str] = (
        "per turn: complexity of user_i alone, quality of (user_i, assistant_i); deita_score = Σ_i c_i·q_i, "
        "deita_complexity/deita_quality = means over turns"
    )
    higher_is_better: ClassVar[dict[str, bool]] = dict.fromkeys(writes, True)
    Params = DeitaParams

    def prompts(self, batch: pl.DataFrame, engine=None) -> tuple[list[str], list[str], list[int]]:
        """Complexity and quality prompts for every turn, and the row index of each turn."""
        cp: list[str] = []
        qp: list[str] = []
        owner: list[int] = []
        d = self.params.delimit
        for i, msgs in enumerate(batch["messages"].to_list()):
            for user, answer in turn_pairs(msgs or []):
                cp.append(complexity_prompt(user, delimit=d))
                qp.append(quality_prompt(user, answer, delimit=d))
                owner.append(i)
        if self.params.chat:
            if engine is None:
                raise ValueError("chat=True needs an engine to render its chat template")
            cp = [render_for_choice(engine, p) for p in cp]
            qp = [render_for_choice(engine, p) for p in qp]
        return cp, qp, owner

    def score(self, batch: pl.DataFrame, ctx: ScoreContext) -> pl.DataFrame:
        engine = engine_of(ctx, self)
        cp, qp, owner = self.prompts(batch, engine)
        n = batch.height
        comp = [[] for _ in range(n)]
        qual = [[] for _ in range(n)]
        if cp:
            probs = engine.choice_probs(cp + qp, list(DIGITS))
            scores = digit_score(probs)
            for k, i in enumerate(owner):
                comp[i].append(float(scores[k]))
                qual[i].append(float(scores[len(cp) + k]))
        return pl.DataFrame(
            {
                "deita_complexity": [float(np.mean(c)) if c else None for c in comp],
                "deita_quality": [float(np.mean(q)) if q else None for q in qual],
                "deita_score": [float(np.dot(c, q)) if c else None for c, q in zip(comp, qual, strict=True)],
            },
            schema={c: pl.Float64 for c in self.writes},
        )
