"""CLEAR (Chen & Mueller, arXiv 2403.12776): BSDetector confidence that a dataset response is good, the
auto-filter built on it, and the auto-correct step (`correct()`).

Confidence (BSDetector, arXiv 2308.16175; weights as in docs/methods.md §3):
- Observed consistency O: the judge LLM samples k answers y_1..y_k to the row's prompt at temperature 1
  (`engine.generate(n=k)`); s_i = α·agree(y, y_i) + (1−α)·1[y_i ≡ y] with the dataset response y as the
  "proposed answer"; O = mean_i s_i (α = 0.8). ≡ is equality after case/whitespace/trailing-punctuation
  folding.
- agree(): the paper uses 1 − P_contradiction from an NLI model (DeBERTa-MNLI), which cannot be fetched
  here. Two local substitutes, `agreement=`:
  "judge": the judge LLM reads both answers (fenced) and picks (A) agree / (B) contradict / (C) neither;
  agree = 1 − P(B) from `choice_probs`, the same 1 − P(contradiction) form as NLI.
  "embedding": max(0, cosine) of sentence embeddings (MiniLM from curate.embed); cheap, but it measures
  topical similarity, not contradiction.
- Self-reflection S: the two BSDetector Fig. 6b prompts; A (correct) = 1, B (incorrect) = 0, C (not sure)
  = 0.5; S = mean over the prompts answered. `reflection="generate"` (the paper): greedy generation parsed
  strictly against "explanation: ..., answer: X"; an answer off the template is recorded in
  clear_parse_error and left out, never guessed (both off template -> S and C null).
  `reflection="probs"`: the expected value over P(A), P(B), P(C) at the answer slot (no explanation);
  always defined, cheaper, and the sensible choice for small judges that never follow the template.
- C = β·O + (1−β)·S, β = 0.7.

Auto-filter: `clear_flag` = C < γ, a pool column (γ changes recompute nothing). Auto-correct:
`correct()` generates a candidate with the (fine-tuned) model and asks the judge to compare it with the
dataset response in BOTH orders; the row is replaced only when both orders prefer the candidate and the
mean preference exceeds η. Every prompt fences row text (scorers/_judge.py).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import polars as pl
from pydantic import Field

from curate.schema import conversation_text
from curate.scoring.contract import Needs, ScoreContext, Scorer, ScorerParams, engine_of
from scorers._judge import DATA_NOTE, expected_value, fence, parse_reflection, render_for_choice

if TYPE_CHECKING:
    from curate.lm.base import Engine

REFLECTION_VALUES = {"A": 1.0, "B": 0.0, "C": 0.5}
_TEMPLATE_LINE = (
    "The output should strictly use the following template: explanation: [insert analysis], answer: "
    "[choose one letter from among choices {first} through {last}]"
)
#: BSDetector Fig. 6b, with the question and answer fenced
REFLECTION_QUESTIONS = (
    "Is the proposed answer: (A) Correct (B) Incorrect (C) I am not sure.",
    "Are you really sure the proposed answer is correct? Choose again: (A) Correct (B) Incorrect (C) I am not sure.",
)
AGREE_QUESTION = (
    "Do Answer 1 and Answer 2 agree with each other? (A) They agree (B) They contradict each other "
    "(C) Neither: they are unrelated or it cannot be told."
)
PAIR_QUESTION = "Which response follows the instruction better and is more correct? (A) Response A (B) Response B"
_FOLD = re.compile(r"\s+")


def question_text(messages: list[dict]) -> str:
    """The prompt part of a conversation as one text: the user turn, or the role-tagged history."""
    prompt = messages[:-1]
    if len(prompt) == 1:
        return prompt[0]["content"]
    return conversation_text(prompt)


def same_answer(a: str, b: str) -> bool:
    """BSDetector's exact match, after folding case, whitespace and trailing punctuation."""

    def fold(s: str) -> str:
        return _FOLD.sub(" ", s).strip().rstrip(".!?;:, ").lower()

    return fold(a) == fold(b)


def reflection_prompt(question: str, answer: str, which: int, *, generate: bool = True) -> str:
    last = _TEMPLATE_LINE.format(first="A", last="C") if generate else "Reply with the letter of your choice."
    return (
        f"{DATA_NOTE}\nQuestion:\n{fence(question, 'QUESTION')}\nProposed Answer:\n{fence(answer, 'ANSWER')}\n"
        f"{REFLECTION_QUESTIONS[which]}\n{last}"
    )


def agreement_prompt(question: str, a: str, b: str) -> str:
    return (
        f"{DATA_NOTE}\nQuestion:\n{fence(question, 'QUESTION')}\nAnswer 1:\n{fence(a, 'ANSWER 1')}\n"
        f"Answer 2:\n{fence(b, 'ANSWER 2')}\n{AGREE_QUESTION}\nReply with the letter of your choice."
    )


def pair_prompt(question: str, a: str, b: str, *, generate: bool = False) -> str:
    last = _TEMPLATE_LINE.format(first="A", last="B") if generate else "Reply with the letter of your choice."
    return (
        f"{DATA_NOTE}\nInstruction:\n{fence(question, 'INSTRUCTION')}\nResponse A:\n{fence(a, 'RESPONSE A')}\n"
        f"Response B:\n{fence(b, 'RESPONSE B')}\n{PAIR_QUESTION}\n{last}"
    )


def observed_consistency(agree: np.ndarray, exact: np.ndarray, alpha: float) -> np.ndarray:
    """O per row from (rows, k) agreement in [0, 1] and exact-match indicators: mean_i α·agree + (1−α)·exact."""
    agree = np.asarray(agree, dtype=np.float64)
    exact = np.asarray(exact, dtype=np.float64)
    if agree.shape != exact.shape or agree.ndim != 2:
        raise ValueError(f"agree {agree.shape} and exact {exact.shape} must be the same (rows, k) shape")
    return (alpha * agree + (1.0 - alpha) * exact).mean(axis=1)


def reflection_certainty(letters: list[str | None]) -> float | None:
    """S = mean of A=1, B=0, C=0.5 over the prompts that were answered on template; None if none were."""
    vals = [REFLECTION_VALUES[x] for x in letters if x is not None]
    return float(np.mean(vals)) if vals else None


def confidence(o: float | None, s: float | None, beta: float) -> float | None:
    """C = β·O + (1−β)·S; None when either part is missing (nothing is imputed)."""
    if o is None or s is None:
        return None
    return beta * o + (1.0 - beta) * s


def choice_for(engine: Engine, texts: list[str], options: list[str]) -> np.ndarray:
    """choice_probs on chat-rendered prompts that end at the answer slot ("answer: (")."""
    if not texts:
        return np.zeros((0, len(options)), np.float32)
    return engine.choice_probs([render_for_choice(engine, t, "answer: (") for t in texts], options)


class _Embed:
    """Lazily loaded sentence embedder for agreement="embedding" (one per process and model)."""

    _cache: ClassVar[dict[str, Any]] = {}

    @classmethod
    def get(cls, model: str) -> Any:
        if model not in cls._cache:
            from curate.embed import load_embedder

            cls._cache[model] = load_embedder(model)
        return cls._cache[model]


def embedding_agreement(model: str, refs: list[str], samples: list[list[str]]) -> np.ndarray:
    """(rows, k) max(0, cos(ref, sample))."""
    emb = _Embed.get(model)
    k = len(samples[0]) if samples else 0
    flat = [s for row in samples for s in row]
    r = emb.encode(refs)
    s = emb.encode(flat).reshape(len(refs), k, -1)
    return np.clip(np.einsum("nd,nkd->nk", r, s), 0.0, 1.0)


class ClearParams(ScorerParams):
    k: int = Field(5, ge=1, le=64)
    temperature: float = Field(1.0, gt=0.0)
    max_tokens: int = Field(256, ge=1)
    seed: int = 0
    alpha: float = Field(0.8, ge=0.0, le=1.0)
    beta: float = Field(0.7, ge=0.0, le=1.0)
    agreement: Literal["judge", "embedding"] = "judge"
    embed_model: str = "minilm"
    reflection: Literal["generate", "probs"] = "generate"
    reflection_max_tokens: int = Field(256, ge=8)
    gamma: float = Field(0.5, ge=0.0, le=1.0)  # auto-filter threshold (pool param: only finalize reads it)


class Clear(Scorer):
    """BSDetector confidence that the row's response is good (CLEAR auto-filter)."""

    name = "clear"
    version = "3"  # 2: judge prompts longer than max_length lose their middle, not their start; 3: generation
    # prompts too (the reflection prompts, 256 tokens by default, lost their instructions and question)
    reads = ("messages",)
    writes = ("clear_consistency", "clear_reflection", "clear_confidence", "clear_parse_error")
    pool_writes = ("clear_flag",)
    pool_params = ("gamma",)
    needs = Needs(engine=("generate", "choice_probs"))
    multi_turn: ClassVar[str] = (
        "the last assistant turn is judged; samples are generated from the whole preceding conversation and "
        "the reflection prompts show it as role-tagged history"
    )
    higher_is_better: ClassVar[dict[str, bool]] = {
        "clear_consistency": True, "clear_reflection": True, "clear_confidence": True, "clear_flag": False,
    }
    Params = ClearParams

    def score(self, batch: pl.DataFrame, ctx: ScoreContext) -> pl.DataFrame:
        p = self.params
        engine = engine_of(ctx, self)
        convs = batch["messages"].to_list()
        prompts = [c[:-1] for c in convs]
        refs = [c[-1]["content"] or "" for c in convs]
        questions = [question_text(c) for c in convs]
        n = len(convs)
        if n == 0:
            return pl.DataFrame(schema=self._schema())

        samples = engine.generate(prompts, n=p.k, temperature=p.temperature, max_tokens=p.max_tokens, seed=p.seed)
        exact = np.array([[same_answer(s, r) for s in row] for row, r in zip(samples, refs, strict=True)])
        if p.agreement == "embedding":
            agree = embedding_agreement(p.embed_model, refs, samples)
        else:
            texts = [agreement_prompt(q, r, s) for q, r, row in zip(questions, refs, samples, strict=True) for s in row]
            probs = choice_for(engine, texts, ["A", "B", "C"])
            agree = (1.0 - probs[:, 1].astype(np.float64)).reshape(n, p.k)
        o = observed_consistency(agree, exact, p.alpha)

        letters: list[list[str | None]] = [[None, None] for _ in range(n)]
        errors: list[str | None] = [None] * n
        s_vals: list[float | None] = [None] * n
        if p.reflection == "generate":
            texts = [reflection_prompt(q, r, j) for q, r in zip(questions, refs, strict=True) for j in (0, 1)]
            outs = engine.generate([[{"role": "user", "content": t}] for t in texts], n=1, temperature=0.0,
                                   max_tokens=p.reflection_max_tokens, seed=p.seed)
            for i in range(n):
                errs = []
                for j in (0, 1):
                    letter, err = parse_reflection(outs[2 * i + j][0])
                    letters[i][j] = letter
                    if err:
                        errs.append(f"reflection {j + 1}: {err}")
                errors[i] = "; ".join(errs) or None
                s_vals[i] = reflection_certainty(letters[i])
        else:
            texts = [reflection_prompt(q, r, j, generate=False) for q, r in zip(questions, refs, strict=True)
                     for j in (0, 1)]
            ev = expected_value(choice_for(engine, texts, ["A", "B", "C"]), [1.0, 0.0, 0.5]).reshape(n, 2)
            s_vals = [float(v) for v in ev.mean(axis=1)]

        conf = [confidence(float(o[i]), s_vals[i], p.beta) for i in range(n)]
        return pl.DataFrame(
            {
                "clear_consistency": [float(x) for x in o],
                "clear_reflection": s_vals,
                "clear_confidence": conf,
                "clear_parse_error": errors,
            },
            schema=self._schema(),
        )

    def _schema(self) -> dict[str, Any]:
        return {"clear_consistency": pl.Float64, "clear_reflection": pl.Float64,
                "clear_confidence": pl.Float64, "clear_parse_error": pl.String}

    def finalize(self, scores: pl.DataFrame) -> pl.DataFrame:
        """clear_flag: confidence below γ (null where the confidence is null)."""
        return scores.with_columns(clear_flag=pl.col("clear_confidence") < self.params.gamma)


# ------------------------------------------------------------------------------------------- auto-correct


def replace_decision(pref_first: np.ndarray, pref_second: np.ndarray, eta: float) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, replace): confidence = mean preference for the candidate over both orders; replace only
    when each order prefers it (> 0.5) and the confidence exceeds η. A missing preference (NaN) never
    replaces."""
    p1 = np.asarray(pref_first, dtype=np.float64)
    p2 = np.asarray(pref_second, dtype=np.float64)
    conf = (p1 + p2) / 2.0
    with np.errstate(invalid="ignore"):
        replace = (p1 > 0.5) & (p2 > 0.5) & (conf > eta)
    return conf, replace

CORRECT_COLUMNS = (
    "id", "clear_original_response", "clear_candidate", "clear_pref_candidate_first",
    "clear_pref_candidate_second", "clear_correct_confidence", "clear_corrected", "clear_corrected_response",
    "clear_judge_error",
)


def correct(
    records: pl.DataFrame,
    judge: Engine,
    *,
    candidate_engine: Engine | None = None,
    candidates: list[str] | None = None,
    eta: float = 0.8,
    mode: Literal["probs", "generate"] = "probs",
    temperature: float = 0.0,
    max_tokens: int = 256,
    seed: int = 0,
) -> pl.DataFrame:
    """CLEAR auto-correct: replace a response only when the judge confidently prefers a new candidate.

    Candidates come from `candidates` (one per row) or are generated by `candidate_engine` (the model
    fine-tuned on the filtered data; default `judge`). The judge sees (dataset, candidate) in both orders:
    P(candidate) with the candidate as Response A, and again as Response B, which cancels position bias.
    mode="probs": P from choice_probs over A/B; mode="generate": the judge writes "explanation: ...,
    answer: X" (parsed strictly; an off-template answer leaves that preference null, recorded in
    clear_judge_error, and the row is not replaced).
    Replace iff both orders prefer the candidate (> 0.5) and their mean > `eta`. The original response is
    always kept in `clear_original_response`; `clear_corrected_response` is the response to train on.
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    convs = records["messages"].to_list()
    ids = records["id"].to_list() if "id" in records.columns else list(range(len(convs)))
    refs = [c[-1]["content"] or "" for c in convs]
    questions = [question_text(c) for c in convs]
    if candidates is None:
        gen = candidate_engine or judge
        candidates = [o[0] for o in gen.generate([c[:-1] for c in convs], n=1, temperature=temperature,
                                                 max_tokens=max_tokens, seed=seed)]
    if len(candidates) != len(convs):
        raise ValueError(f"{len(candidates)} candidates for {len(convs)} rows")
    # order 1: candidate is A; order 2: candidate is B
    first = [pair_prompt(q, c, r, generate=mode == "generate") for q, c, r in zip(questions, candidates, refs,
                                                                                    strict=True)]
    second = [pair_prompt(q, r, c, generate=mode == "generate") for q, c, r in zip(questions, candidates, refs,
                                                                                     strict=True)]
    errors: list[str | None] = [None] * len(convs)
    if mode == "probs":
        probs = choice_for(judge, first + second, ["A", "B"]).astype(np.float64)
        p1 = probs[: len(first), 0]
        p2 = probs[len(first):, 1]
    else:
        outs = judge.generate([[{"role": "user", "content": t}] for t in first + second], n=1, temperature=0.0,
                              max_tokens=max_tokens, seed=seed)
        p1 = np.full(len(first), np.nan)
        p2 = np.full(len(first), np.nan)
        for i in range(len(first)):
            errs = []
            for j, (arr, cand_letter) in enumerate(((p1, "A"), (p2, "B"))):
                letter, err = parse_reflection(outs[i + j * len(first)][0], letters="AB")
                if err:
                    errs.append(f"order {j + 1}: {err}")
                if letter is not None:
                    arr[i] = 1.0 if letter == cand_letter else 0.0
            errors[i] = "; ".join(errs) or None
    conf, replace = replace_decision(p1, p2, eta)
    return pl.DataFrame(
        {
            "id": ids,
            "clear_original_response": refs,
            "clear_candidate": candidates,
            "clear_pref_candidate_first": pl.Series(p1).fill_nan(None),
            "clear_pref_candidate_second": pl.Series(p2).fill_nan(None),
            "clear_correct_confidence": pl.Series(conf).fill_nan(None),
            "clear_corrected": replace,
            "clear_corrected_response": [c if r else o for c, o, r in zip(candidates, refs, replace, strict=True)],
            "clear_judge_error": pl.Series(errors, dtype=pl.String),
        }
    )
