"""InstructMining (Cao et al., arXiv 2307.06290, COLM 2024): indicators, the two published rules, and a fit.

Idea: a linear rule predicts the log evaluation loss of a model fine-tuned on the data from natural-language
indicators; rank rows by predicted log loss (lower is better). No official code is public (docs/methods.md §2).

Indicators (stored per row, `instructmining_<indicator>`):
- len_in, len_out: token counts of the prompt and response (the `tokenizer` param's HF tokenizer, else
  curate.schema.count_tokens, a words+punctuation estimate).
- mtld: MTLD of the response (McCarthy & Jarvis 2010), bidirectional, TTR threshold 0.72.
- knn6: L2 distance, in the embedding space the pipeline gives (MiniLM, a SentenceBERT model; L2-normalised
  vectors), to the 6th nearest other row of the pool (FAISS exact search). Distances are relative to the
  pool at scoring time: rows added later do not update it.
- ppl: the perplexity scorer's `perplexity` column (needs.scores), when `ppl_scorer` is set.
- rew: a reward/quality score read from another scorer's column (default deita's `deita_quality`). The
  paper used an OpenAssistant Pythia-1.4B reward model, whose raw scale differs: the published
  coefficients then only rank, they do not predict a calibrated loss.
- und, nat, coh: UniEval-dialog understandability, naturalness, coherence. UniEval is a T5 answering the
  Bool-QA questions below with Yes/No (score = P(Yes)/(P(Yes)+P(No))). Substitute, `unieval=`:
  "judge" (default): the same three questions, verbatim from UniEval's utils.add_question, asked to the
  scoring engine as (A) Yes / (B) No, score = P(A)/(P(A)+P(B)); the instruction is the dialogue history.
  "model": a local UniEval checkpoint (`unieval_model`, e.g. MingZhong/unieval-dialog) run exactly as
  UniEval does. "off": null (the v3 rule is then null).

Rules (pool columns, recomputed from stored indicators, so choosing or refitting a rule recomputes nothing):
- v1 (arXiv v1):  1.0694 − 0.1498·Rew + 8.257e−5·Len − 0.9350·Knn6   (Len = response length)
- v3 (COLM):      0.0274 − 0.0078·Rew + 0.4421·Und − 0.3212·Nat − 0.1520·Coh
- fit: a rule fitted to the user's own (subset -> eval loss) results by `fit_rule` (`fitted_rule` = its JSON).

`fit_rule(indicator_means, eval_losses)`: OLS of log loss on subset-mean indicators, optional backward
stepwise removal by p-value (the paper's variable selection); `subset_means` builds its input from scores.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import polars as pl
from pydantic import Field

from curate.schema import count_tokens
from curate.scoring.contract import Needs, ScoreContext, Scorer, ScorerError, ScorerParams
from scorers._judge import DATA_NOTE, fence, render_for_choice

INDICATORS = ("len_in", "len_out", "mtld", "knn6", "ppl", "rew", "und", "nat", "coh")

#: published rules: intercept + coefficients over indicator names (Len = len_out, Knn6 = knn6)
RULE_V1 = {"intercept": 1.0694, "rew": -0.1498, "len_out": 8.257e-5, "knn6": -0.9350}
RULE_V3 = {"intercept": 0.0274, "rew": -0.0078, "und": 0.4421, "nat": -0.3212, "coh": -0.1520}

#: UniEval utils.add_question, task='dialogue' (maszhongming/UniEval)
UNIEVAL_QUESTIONS = {
    "nat": "question: Is this a natural response in the dialogue? </s> response: {output}",
    "coh": "question: Is this a coherent response given the dialogue history? </s> response: {output} "
           "</s> dialogue history: {src}",
    "und": "question: Is this an understandable response in the dialogue? </s> response: {output}",
}
_JUDGE_QUESTIONS = {
    "nat": "Is this a natural response in the dialogue?",
    "coh": "Is this a coherent response given the dialogue history?",
    "und": "Is this an understandable response in the dialogue?",
}

_MTLD_WORD = re.compile(r"\w+(?:['’]\w+)*", re.UNICODE)


# ------------------------------------------------------------------------------------------------- MTLD


def _mtld_pass(tokens: Sequence[str], threshold: float) -> float | None:
    factors = 0.0
    types: set[str] = set()
    count = 0
    ttr = 1.0
    for tok in tokens:
        count += 1
        types.add(tok)
        ttr = len(types) / count
        if ttr <= threshold:
            factors += 1.0
            types, count, ttr = set(), 0, 1.0
    factors += (1.0 - ttr) / (1.0 - threshold)  # partial factor for the remainder
    return len(tokens) / factors if factors > 0 else None


def mtld(text: str, threshold: float = 0.72) -> float | None:
    """MTLD (McCarthy & Jarvis 2010): mean of the forward and backward factor-length passes.

    None when it is undefined: no words, or every TTR stays at 1 (all words distinct, no factor at all).
    """
    tokens = [t.lower() for t in _MTLD_WORD.findall(text)]
    if not tokens:
        return None
    fwd = _mtld_pass(tokens, threshold)
    bwd = _mtld_pass(tokens[::-1], threshold)
    if fwd is None or bwd is None:
        return None
    return (fwd + bwd) / 2.0


# ------------------------------------------------------------------------------------------------- rules


def apply_rule(rule: Mapping[str, float], indicators: pl.DataFrame, prefix: str = "") -> pl.Series:
    """intercept + Σ coef · indicator (null when any used indicator is null)."""
    expr = pl.lit(float(rule.get("intercept", 0.0)))
    for name, coef in rule.items():
        if name == "intercept":
            continue
        col = prefix + name
        if col not in indicators.columns:
            raise ValueError(f"rule uses indicator {name!r} but the frame has no column {col!r}")
        expr = expr + float(coef) * pl.col(col).cast(pl.Float64)
    return indicators.select(expr.alias("rule")).to_series()


@dataclass
class FittedRule:
    """A linear rule log(loss) ≈ intercept + Σ coef·indicator fitted on subset means."""

    intercept: float
    coefs: dict[str, float]
    pvalues: dict[str, float] = field(default_factory=dict)
    r2: float = float("nan")
    n: int = 0
    dropped: list[str] = field(default_factory=list)  # removed by stepwise selection, in order

    def as_rule(self) -> dict[str, float]:
        return {"intercept": self.intercept, **self.coefs}

    def predict(self, indicators: pl.DataFrame, prefix: str = "") -> pl.Series:
        """Predicted log loss per row (null where an indicator the rule uses is null)."""
        return apply_rule(self.as_rule(), indicators, prefix)

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.write_text(json.dumps(asdict(self), indent=2, sort_keys=True))
        return p

    @classmethod
    def load(cls, path: str | Path) -> FittedRule:
        try:
            return cls(**json.loads(Path(path).read_text()))
        except (OSError, ValueError, TypeError) as e:
            raise ScorerError(f"cannot read a fitted InstructMining rule from {path}: {e}") from None


def _ols(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Coefficients (intercept first), two-sided p-values, R²."""
    from scipy import stats

    n, k = X.shape
    A = np.column_stack([np.ones(n), X])
    beta, *_ = np.linalg.lstsq(A, y, rcond=None)
    resid = y - A @ beta
    dof = n - A.shape[1]
    ss_res = float(resid @ resid)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")
    if dof > 0:
        sigma2 = ss_res / dof
        cov = sigma2 * np.linalg.pinv(A.T @ A)
        se = np.sqrt(np.maximum(np.diag(cov), 0.0))
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(se > 0, beta / se, np.inf)
        p = 2.0 * stats.t.sf(np.abs(t), dof)
    else:
        p = np.full(A.shape[1], np.nan)
    return beta, p, r2


def fit_rule(
    indicator_means: pl.DataFrame,
    eval_losses: Sequence[float] | np.ndarray,
    *,
    columns: Sequence[str] | None = None,
    stepwise: bool = False,
    p_threshold: float = 0.05,
    log: bool = True,
) -> FittedRule:
    """OLS of log(eval loss) on subset-mean indicators (one row per fine-tuned subset).

    `columns`: the indicators to use (default: every numeric column without nulls). `stepwise`: drop the
    least significant indicator while its p-value exceeds `p_threshold` (backward elimination).
    `log=False` when `eval_losses` are already log losses.
    """
    y = np.asarray(eval_losses, dtype=np.float64)
    if indicator_means.height != len(y):
        raise ValueError(f"{indicator_means.height} subsets but {len(y)} losses")
    if log:
        if np.any(y <= 0):
            raise ValueError("evaluation losses must be positive to take their log")
        y = np.log(y)
    if columns is None:
        columns = [c for c, t in indicator_means.schema.items()
                   if t.is_numeric() and indicator_means[c].null_count() == 0]
    cols = list(columns)
    if not cols:
        raise ValueError("no indicator columns to fit")
    X_all = indicator_means.select([pl.col(c).cast(pl.Float64) for c in cols]).to_numpy()
    if not np.all(np.isfinite(X_all)):
        raise ValueError("indicator means must be finite (fill or drop subsets with missing indicators)")
    if len(y) <= len(cols) + 1 and not stepwise:
        raise ValueError(f"{len(y)} subsets cannot fit {len(cols)} indicators + intercept; use more subsets")
    dropped: list[str] = []
    keep = list(range(len(cols)))
    while True:
        beta, p, r2 = _ols(X_all[:, keep], y)
        if not stepwise or len(keep) <= 1:
            break
        worst = int(np.nanargmax(p[1:])) if np.any(np.isfinite(p[1:])) else 0
        if np.isfinite(p[1 + worst]) and p[1 + worst] <= p_threshold:
            break
        dropped.append(cols[keep[worst]])
        keep.pop(worst)
    names = [cols[i] for i in keep]
    return FittedRule(
        intercept=float(beta[0]),
        coefs={nm: float(b) for nm, b in zip(names, beta[1:], strict=True)},
        pvalues={nm: float(q) for nm, q in zip(names, p[1:], strict=True)},
        r2=float(r2),
        n=len(y),
        dropped=dropped,
    )


def subset_means(scores: pl.DataFrame, subsets: Mapping[str, Sequence[str]],
                 columns: Sequence[str] | None = None, prefix: str = "instructmining_") -> pl.DataFrame:
    """One row per subset: the mean of each indicator over the subset's ids (input of `fit_rule`)."""
    if "id" not in scores.columns:
        raise ValueError("scores need an 'id' column")
    cols = list(columns) if columns is not None else [prefix + i for i in INDICATORS if prefix + i in scores.columns]
    rows = []
    for name, ids in subsets.items():
        sub = scores.filter(pl.col("id").is_in(list(ids)))
        if sub.height == 0:
            raise ValueError(f"subset {name!r} has no scored rows")
        rows.append({"subset": name, "n": sub.height,
                     **{c.removeprefix(prefix): sub[c].cast(pl.Float64).mean() for c in cols}})
    return pl.DataFrame(rows)


# -------------------------------------------------------------------------------------------- indicators


def history_text(prompt: list[dict]) -> str:
    """The input of a response: the user turn, or every earlier non-system turn joined by blank lines."""
    turns = [m["content"] or "" for m in prompt if m["role"] != "system"]
    return turns[0] if len(turns) == 1 else "\n\n".join(turns)


def knn_distance(query: np.ndarray, pool: np.ndarray, k: int = 6, index: Any = None) -> np.ndarray:
    """L2 distance to the k-th nearest OTHER pool row (a query found in the pool skips itself)."""
    import faiss

    pool = np.ascontiguousarray(pool, dtype=np.float32)
    query = np.ascontiguousarray(query, dtype=np.float32)
    if pool.shape[0] < k + 1:
        raise ScorerError(f"kNN_{k} needs at least {k + 1} rows in the pool, got {pool.shape[0]}")
    if index is None:
        index = faiss.IndexFlatL2(pool.shape[1])
        index.add(pool)
    d2, _ = index.search(query, k + 1)
    d = np.sqrt(np.maximum(d2, 0.0))
    # a row of the pool finds itself at distance 0 first: take the (k+1)-th; an outside query the k-th
    in_pool = d[:, 0] <= 1e-4
    return np.where(in_pool, d[:, k], d[:, k - 1])


class InstructMiningParams(ScorerParams):
    knn_k: int = Field(6, ge=1, le=100)
    mtld_threshold: float = Field(0.72, gt=0.0, lt=1.0)
    tokenizer: str | None = None  # HF tokenizer (name/path) for len_in/len_out; None = count_tokens estimate
    reward_scorer: str | None = "deita"
    reward_column: str = "deita_quality"
    ppl_scorer: str | None = "perplexity"
    ppl_column: str = "perplexity"
    unieval: Literal["judge", "model", "off"] = "judge"
    unieval_model: str | None = None  # local UniEval checkpoint for unieval="model"
    fitted_rule: str | None = None  # JSON written by FittedRule.save (pool param: read only by finalize)


class InstructMining(Scorer):
    """InstructMining indicators per row; v1/v3/fitted rules as pool columns (predicted log loss)."""

    name = "instructmining"
    version = "2"  # 2: judge prompts longer than max_length lose their middle, not their start
    reads = ("messages",)
    writes = tuple(f"instructmining_{i}" for i in INDICATORS)
    pool_writes = ("instructmining_v1", "instructmining_v3", "instructmining_fit")
    pool_params = ("fitted_rule",)
    # class-level needs are the defaults'; an instance narrows or widens them from its params (see __init__)
    needs = Needs(engine=("choice_probs",), embeddings="instruction_response", scores=("deita", "perplexity"))
    multi_turn: ClassVar[str] = (
        "the last assistant turn is the response and the whole preceding conversation the input (len_in, "
        "dialogue history); MTLD, reward and UniEval judge the last response"
    )
    higher_is_better: ClassVar[dict[str, bool]] = {
        "instructmining_v1": False, "instructmining_v3": False, "instructmining_fit": False,
        "instructmining_mtld": True, "instructmining_knn6": True, "instructmining_rew": True,
        "instructmining_ppl": False,
    }
    Params = InstructMiningParams

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        p = self.params
        if p.unieval == "model" and not p.unieval_model:
            raise ScorerError("instructmining: unieval='model' needs unieval_model (a local UniEval checkpoint)")
        scores = tuple(s for s in (p.reward_scorer, p.ppl_scorer) if s)
        self.needs = Needs(engine=("choice_probs",) if p.unieval == "judge" else (),
                           embeddings="instruction_response", scores=scores)
        self._index: tuple[tuple[int, tuple[int, ...]], Any] | None = None
        self._tok: Any = None
        self._unieval: Any = None

    # -- pieces ---------------------------------------------------------------------------------------------
    def _count(self, texts: list[str]) -> list[int]:
        if self.params.tokenizer is None:
            return [count_tokens(t) for t in texts]
        if self._tok is None:
            from transformers import AutoTokenizer

            try:
                self._tok = AutoTokenizer.from_pretrained(self.params.tokenizer)
            except (OSError, ValueError) as e:
                raise ScorerError(f"instructmining: cannot load tokenizer {self.params.tokenizer!r}: {e}") from None
        return [len(x) for x in self._tok(texts, add_special_tokens=False)["input_ids"]]

    def _knn(self, ctx: ScoreContext) -> np.ndarray | None:
        if ctx.embeddings is None or ctx.pool_embeddings is None:
            return None
        import faiss

        pool = ctx.pool_embeddings
        key = (id(pool), tuple(pool.shape))
        if self._index is None or self._index[0] != key:
            index = faiss.IndexFlatL2(pool.shape[1])
            index.add(np.ascontiguousarray(pool, dtype=np.float32))
            self._index = (key, index)
        return knn_distance(ctx.embeddings, pool, self.params.knn_k, index=self._index[1])

    def _other(self, ctx: ScoreContext, scorer: str | None, column: str, n: int) -> list[float | None]:
        if scorer is None:
            return [None] * n
        if ctx.scores is None or column not in ctx.scores.columns:
            raise ScorerError(f"instructmining reads column {column!r} of scorer {scorer!r}, which was not "
                              "given; score it first, or set that *_scorer param to None to leave it out")
        return ctx.scores[column].cast(pl.Float64).to_list()

    def _unieval_scores(self, ctx: ScoreContext, histories: list[str], responses: list[str]) -> dict[str, list]:
        n = len(responses)
        dims = ("und", "nat", "coh")
        if self.params.unieval == "off" or n == 0:
            return {d: [None] * n for d in dims}
        if self.params.unieval == "model":
            return {d: self._unieval_model_scores(d, histories, responses) for d in dims}
        if ctx.engine is None:
            raise ScorerError("instructmining: unieval='judge' needs a language model engine")
        texts = []
        for d in dims:
            for h, r in zip(histories, responses, strict=True):
                hist = f"Dialogue history:\n{fence(h, 'DIALOGUE HISTORY')}\n" if d == "coh" else ""
                texts.append(f"{DATA_NOTE}\n{hist}Response:\n{fence(r, 'RESPONSE')}\n"
                             f"{_JUDGE_QUESTIONS[d]} (A) Yes (B) No\nReply with the letter of your choice.")
        prompts = [render_for_choice(ctx.engine, t, "answer: (") for t in texts]
        probs = np.asarray(ctx.engine.choice_probs(prompts, ["A", "B"]), dtype=np.float64)
        yes = probs[:, 0] / probs.sum(axis=1)
        return {d: [float(v) for v in yes[i * n:(i + 1) * n]] for i, d in enumerate(dims)}

    def _unieval_model_scores(self, dim: str, histories: list[str], responses: list[str]) -> list[float]:
        """UniEval's own scorer (metric/scorer.py): P(Yes)/(P(Yes)+P(No)) at the first decoder step."""
        import torch

        if self._unieval is None:
            from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

            from curate.embed import allow_unsafe_weights, check_safe_weights

            try:
                check_safe_weights(self.params.unieval_model, "UniEval model")
                tok = AutoTokenizer.from_pretrained(self.params.unieval_model)
                model = AutoModelForSeq2SeqLM.from_pretrained(
                    self.params.unieval_model, use_safetensors=not allow_unsafe_weights()).eval()
            except (OSError, ValueError) as e:
                raise ScorerError(f"instructmining: cannot load UniEval model {self.params.unieval_model!r}: "
                                  f"{e}") from None
            self._unieval = (tok, model, tok("Yes")["input_ids"][0], tok("No")["input_ids"][0])
        tok, model, pos, neg = self._unieval
        out: list[float] = []
        inputs = [UNIEVAL_QUESTIONS[dim].format(output=r, src=h) for h, r in zip(histories, responses, strict=True)]
        start = torch.full((1, 1), model.config.decoder_start_token_id, dtype=torch.long)
        for i in range(0, len(inputs), 8):
            enc = tok(inputs[i:i + 8], max_length=1024, truncation=True, padding=True, return_tensors="pt")
            with torch.no_grad():
                logits = model(**enc, decoder_input_ids=start.expand(enc["input_ids"].shape[0], 1)).logits[:, 0]
            p = torch.softmax(logits.float(), -1)
            out.extend((p[:, pos] / (p[:, pos] + p[:, neg])).tolist())
        return out

    # -- contract -------------------------------------------------------------------------------------------
    def score(self, batch: pl.DataFrame, ctx: ScoreContext) -> pl.DataFrame:
        p = self.params
        convs = batch["messages"].to_list()
        n = len(convs)
        last = [max(i for i, m in enumerate(c) if m["role"] == "assistant") for c in convs]
        responses = [c[i]["content"] or "" for c, i in zip(convs, last, strict=True)]
        histories = [history_text(c[:i]) for c, i in zip(convs, last, strict=True)]
        knn = self._knn(ctx)
        uni = self._unieval_scores(ctx, histories, responses)
        data = {
            "instructmining_len_in": self._count(histories),
            "instructmining_len_out": self._count(responses),
            "instructmining_mtld": [mtld(r, p.mtld_threshold) for r in responses],
            "instructmining_knn6": [None] * n if knn is None else [float(x) for x in knn],
            "instructmining_ppl": self._other(ctx, p.ppl_scorer, p.ppl_column, n),
            "instructmining_rew": self._other(ctx, p.reward_scorer, p.reward_column, n),
            "instructmining_und": uni["und"],
            "instructmining_nat": uni["nat"],
            "instructmining_coh": uni["coh"],
        }
        schema = {c: (pl.Int64 if c.endswith(("len_in", "len_out")) else pl.Float64) for c in self.writes}
        return pl.DataFrame(data, schema=schema)

    def finalize(self, scores: pl.DataFrame) -> pl.DataFrame:
        """The v1/v3 rules (and the fitted one, when given) from the stored indicators: predicted log loss."""
        pre = "instructmining_"
        out = scores.with_columns(
            instructmining_v1=apply_rule(RULE_V1, scores, pre),
            instructmining_v3=apply_rule(RULE_V3, scores, pre),
        )
        if self.params.fitted_rule:
            fit = FittedRule.load(self.params.fitted_rule)
            return out.with_columns(instructmining_fit=fit.predict(scores, pre))
        return out.with_columns(instructmining_fit=pl.lit(None, dtype=pl.Float64))
