"""The scorer contract: what every method in `scorers/` declares and how it is called.

A scorer is one class in one module. It declares its name, version, parameters, the record columns it
reads, what it needs (an engine capability, an embedding view, other scores) and the columns it writes.
The runner (`curate.scoring.runner.score_pool`) batches rows, skips what the score store already holds and puts
each finished batch in the store; the scorer only turns a batch into columns.

Per-row columns (`writes`) are stored. Columns that depend on the whole pool (TOPSIS closeness, the
best candidate of a group) are `pool_writes`: the runner computes them with `finalize()` after every
row is scored, from the stored per-row columns, so they are never stale and never stored.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict, ValidationError

if TYPE_CHECKING:  # the engine layer is optional for rule-based scorers
    from curate.lm.base import Engine

ENGINE_CAPABILITIES = ("response_logprobs", "generate", "choice_probs", "hidden_and_logits")


class ScorerError(ValueError):
    """A user-facing scorer problem: bad parameters, missing inputs, unknown scorer."""


@dataclass(frozen=True)
class Needs:
    """What a scorer needs besides the record columns it reads."""

    engine: tuple[str, ...] = ()  # engine capabilities used (ENGINE_CAPABILITIES)
    embeddings: str | None = None  # embedding view name ("user", "instruction_response", "conversation")
    scores: tuple[str, ...] = ()  # names of other scorers whose output columns this one reads


@dataclass
class ScoreContext:
    """Everything a batch may use besides its rows; arrays are row-aligned with the batch."""

    engine: Engine | None = None
    embeddings: np.ndarray | None = None  # (len(batch), dim) float32, L2-normalised
    pool_embeddings: np.ndarray | None = None  # the whole pool (kNN-style scorers)
    scores: pl.DataFrame | None = None  # other scorers' columns, row-aligned with the batch


class ScorerParams(BaseModel):
    """Base for every scorer's `Params`: frozen and strict, so a typo in a parameter is an error."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class Scorer:
    """Base class; subclasses set the ClassVars and implement `score` (and `finalize` for pool columns)."""

    name: ClassVar[str]
    prefix: ClassVar[str] = ""  # output column prefix when it differs from `name` (default: the name)
    version: ClassVar[str]
    reads: ClassVar[tuple[str, ...]]
    writes: ClassVar[tuple[str, ...]]
    needs: ClassVar[Needs] = Needs()
    multi_turn: ClassVar[str]
    higher_is_better: ClassVar[dict[str, bool]]
    # additions to the contract (see module docstring): pool-relative columns made by finalize(), and
    # the params that only finalize() uses (left out of the signature, so changing them recomputes nothing)
    pool_writes: ClassVar[tuple[str, ...]] = ()
    pool_params: ClassVar[tuple[str, ...]] = ()

    Params: ClassVar[type[BaseModel]] = ScorerParams

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if "name" not in cls.__dict__:  # abstract intermediate class
            return
        missing = [a for a in ("version", "reads", "writes", "multi_turn", "higher_is_better")
                   if not hasattr(cls, a)]
        if missing:
            raise TypeError(f"scorer {cls.name!r} does not declare {missing}")
        cols = tuple(cls.writes) + tuple(cls.pool_writes)
        prefix = cls.prefix or cls.name
        bad = [c for c in cols if c != prefix and not c.startswith(prefix + "_")]
        if bad:
            raise TypeError(f"scorer {cls.name!r}: output columns {bad} must be prefixed with {prefix!r}")
        if len(set(cols)) != len(cols):
            raise TypeError(f"scorer {cls.name!r}: duplicate output columns in {cols}")
        unknown = set(cls.higher_is_better) - set(cols)
        if unknown:
            raise TypeError(f"scorer {cls.name!r}: higher_is_better names unknown columns {sorted(unknown)}")
        caps = set(cls.needs.engine) - set(ENGINE_CAPABILITIES)
        if caps:
            raise TypeError(f"scorer {cls.name!r}: unknown engine capabilities {sorted(caps)}")
        extra = set(cls.pool_params) - set(cls.Params.model_fields)
        if extra:
            raise TypeError(f"scorer {cls.name!r}: pool_params {sorted(extra)} are not Params fields")

    def __init__(self, **params: Any) -> None:
        try:
            self.params = self.Params(**params)
        except ValidationError as e:
            msgs = "; ".join((f"{'.'.join(map(str, err['loc']))}: " if err["loc"] else "")  # none: a cross-field rule
                             + err["msg"].removeprefix("Value error, ") for err in e.errors())
            raise ScorerError(f"invalid parameters for scorer {self.name!r}: {msgs}") from None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params!r})"

    @property
    def columns(self) -> tuple[str, ...]:
        """Every column a scored pool carries: the stored ones, then the pool-relative ones."""
        return tuple(self.writes) + tuple(self.pool_writes)

    def signature(self) -> str:
        """`name@version:hash(params)`: the scorer part of a score-store key (pool_params excluded)."""
        params = self.params.model_dump(mode="json", exclude=set(self.pool_params))
        canon = json.dumps(params, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return f"{self.name}@{self.version}:{hashlib.sha256(canon.encode()).hexdigest()[:16]}"

    def score(self, batch: pl.DataFrame, ctx: ScoreContext) -> pl.DataFrame:
        """Return exactly the `writes` columns, same length and order as `batch` (null = not scorable)."""
        raise NotImplementedError

    def finalize(self, scores: pl.DataFrame) -> pl.DataFrame:
        """Given `id` + `writes` for the whole pool, return it with the `pool_writes` columns added."""
        return scores


def engine_of(ctx: ScoreContext, scorer: Scorer) -> Engine:
    """The context's engine, or a clear error naming the scorer (for scorers with Needs.engine)."""
    if ctx.engine is None:
        raise ScorerError(f"scorer {scorer.name!r} needs a language model engine (none was given)")
    return ctx.engine


def last_turn(messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], str]:
    """(prompt, response) of the last assistant turn: the response with its full history as the prompt."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return [dict(m) for m in messages[:last]], messages[last]["content"]


def assistant_turns(messages: list[dict[str, str]]) -> list[tuple[list[dict[str, str]], str]]:
    """(prompt, response) of every assistant turn, each with the messages before it as the prompt."""
    return [([dict(m) for m in messages[:i]], m["content"]) for i, m in enumerate(messages)
            if m["role"] == "assistant"]


def end_token_counts(engine: Engine, responses: list[str]) -> list[int]:
    """How many end-of-turn tokens the engine appends to each response (after its truncation rule)."""
    return [engine.encode([], r).n_end for r in responses]


def token_nll(engine: Engine, prompts: list[list[dict[str, str]]], responses: list[str], *,
              include_end: bool) -> list[np.ndarray]:
    """Per-token negative log-likelihood (float64) of each response; end-of-turn tokens dropped unless
    `include_end` (Cherry scores the answer text only; an SFT loss also trains the end token)."""
    lps = engine.response_logprobs(prompts, responses)
    ends = [0] * len(responses) if include_end else end_token_counts(engine, responses)
    return [-np.asarray(lp[: len(lp) - e], dtype=np.float64) for lp, e in zip(lps, ends, strict=True)]
