"""DONOD: how one SGD step on a sample would move the output layer, from one forward pass.

For a sample with response positions t = 1..T (final hidden h_t, logits z_t = W h_t, p_t = softmax(z_t),
target y_t) the SFT loss gradient w.r.t. lm_head is G = (1/T) sum_t (p_t - e_yt) h_t^T, and W' = W - lr G.
docs/methods.md §1 derives, without materialising G or running a backward pass:
    <W, G>  = (1/T) sum_t (p_t . z_t - z_t[y_t])                       (logits only)
    ||G||^2 = (1/T^2) sum_{t,t'} ((p_t - e_t) . (p_t' - e_t')) (h_t . h_t')   (Gram form; G itself when T > d)
    NOD = ||W - W'|| = lr ||G||
    DON = ||W|| - ||W'|| = (2 lr <W,G> - lr^2 ||G||^2) / (||W|| + ||W'||)    (no cancellation)
Only the output projection is updated (tied embeddings are treated as untied, docs/methods.md §1).

`donod` is the TOPSIS closeness over (DON benefit, NOD cost). It is pool-relative, so it is not stored:
the runner calls `finalize()` with every row's stored DON/NOD after scoring, and `donod_closeness(df)`
does the same for any frame. TOPSIS weights and normalisation are `pool_params`: changing them re-ranks
from the store without a forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import polars as pl
import torch
from pydantic import Field, field_validator

from curate.scoring.contract import (
    Needs,
    ScoreContext,
    Scorer,
    ScorerError,
    ScorerParams,
    end_token_counts,
    engine_of,
    last_turn,
)

_LOGIT_BYTES = 1 << 30  # float32 logits fetched from the engine at once (T x V per row)


def donod_update(hidden: Any, logits: Any, targets: Any, w_sq_norm: float, lr: float) -> tuple[float, float]:
    """(DON, NOD) of lm_head for one SGD step of size `lr` on one sample (float64 throughout)."""
    h = torch.as_tensor(np.asarray(hidden), dtype=torch.float64)
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(targets), dtype=torch.long)
    t = len(y)
    a = torch.softmax(z, dim=-1)
    a[torch.arange(t), y] -= 1.0  # p_t - e_t
    wg = float(a.reshape(-1) @ z.reshape(-1)) / t  # BLAS dot, no T x V temporary
    if t <= h.shape[1]:  # Gram form: T^2 (V + d) flops
        g2 = float(((a @ a.T) * (h @ h.T)).sum()) / t**2
    else:  # materialise G (V x d): T V d flops
        g2 = float(((a.T @ h) ** 2).sum()) / t**2
    g2 = max(g2, 0.0)
    w_norm = float(np.sqrt(w_sq_norm))
    new_norm = float(np.sqrt(max(w_sq_norm - 2 * lr * wg + lr * lr * g2, 0.0)))
    don = (2 * lr * wg - lr * lr * g2) / (w_norm + new_norm)
    return don, lr * float(np.sqrt(g2))


def _topsis() -> Any:
    try:
        from curate.select.fusion import topsis
    except ImportError as e:  # the selection layer owns TOPSIS
        raise ScorerError(f"DONOD's TOPSIS needs curate.select.fusion.topsis: {e}") from None
    return topsis


def donod_closeness(
    df: pl.DataFrame, weights: Sequence[float] = (0.5, 0.5), normalisation: str = "vector"
) -> pl.Series:
    """TOPSIS closeness over (donod_don benefit, donod_nod cost) for every row of `df`, named `donod`.

    Rows without DON/NOD get null; the others are ranked against each other (pool-relative).
    """
    don = df["donod_don"].cast(pl.Float64).to_numpy()
    nod = df["donod_nod"].cast(pl.Float64).to_numpy()
    ok = np.isfinite(don) & np.isfinite(nod)
    out = np.full(df.height, np.nan)
    if ok.any():
        matrix = np.column_stack([don[ok], nod[ok]])
        out[ok] = _topsis()(matrix, list(weights), [True, False], normalization=normalisation)
    return pl.Series("donod", out, dtype=pl.Float64).fill_nan(None)


class DONOD(Scorer):
    name = "donod"
    version = "1"
    reads = ("messages",)
    writes = ("donod_don", "donod_nod", "donod_n_tokens", "donod_error")
    pool_writes = ("donod",)
    pool_params = ("weights", "normalisation")
    needs = Needs(engine=("hidden_and_logits",))
    multi_turn = ("one SGD step on the last assistant turn with the whole earlier conversation as the "
                  "(masked) prompt")
    higher_is_better = {"donod": True, "donod_don": True, "donod_nod": False}

    class Params(ScorerParams):
        lr: float = Field(1e-5, gt=0)  # SGD learning rate of the simulated step
        weights: tuple[float, float] = (0.5, 0.5)  # TOPSIS weights of (DON, NOD)
        normalisation: Literal["vector", "minmax"] = "vector"  # TOPSIS column normalisation
        include_end: bool = True  # the end-of-turn token is part of the SFT loss

        @field_validator("weights")
        @classmethod
        def _nonneg(cls, v: tuple[float, float]) -> tuple[float, float]:
            if min(v) < 0 or sum(v) <= 0:
                raise ValueError("TOPSIS weights must be >= 0 and not all zero")
            return v

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._w_sq: dict[int, float] = {}

    def _w_sq_norm(self, engine: Any) -> float:
        if id(engine) not in self._w_sq:
            if not callable(getattr(engine, "output_weight", None)):
                raise ScorerError("donod needs the transformers engine (kind='hf'): it reads lm_head's weight")
            w = engine.output_weight().detach()
            self._w_sq[id(engine)] = float((w.double() ** 2).sum())
        return self._w_sq[id(engine)]

    @staticmethod
    def _check_logits(engine: Any, hl: Any) -> None:
        """The closed form needs logits = W h (no bias, scale or soft-cap); check one position.

        The tolerance follows the engine's precision: bf16/fp16 logits are rounded to 8 (11) significant bits,
        so in bf16 W h and the model's own logits differ by up to ~1% of the largest logit (SmolLM2 in bf16, the
        default scoring model, failed a float32 tolerance); a bias, scale or soft-cap moves them far more."""
        w = engine.output_weight().detach().float().cpu()
        z = torch.as_tensor(hl.hidden[:1]).float() @ w.T
        ref = torch.as_tensor(hl.logits[:1]).float()
        dtype = str(getattr(getattr(engine, "config", None), "dtype", "float32"))
        tol = {"bfloat16": 2e-2, "float16": 5e-3}.get(dtype, 1e-3)
        if not torch.allclose(z, ref, rtol=tol, atol=tol * float(ref.abs().max()) + 1e-5):
            raise ScorerError("donod: this model's logits are not lm_head(hidden) (bias, logit scale or "
                              "soft-capping); the analytic DON/NOD would be wrong for it")

    def score(self, batch: pl.DataFrame, ctx: ScoreContext) -> pl.DataFrame:
        engine = engine_of(ctx, self)
        w_sq = self._w_sq_norm(engine)
        pairs = [last_turn(m) for m in batch["messages"].to_list()]
        ends = [0] * len(pairs) if self.params.include_end else end_token_counts(engine, [r for _, r in pairs])
        lengths = [len(engine.encode(p, r).response_ids) for p, r in pairs]
        vocab = int(engine.output_weight().shape[0])
        cols: dict[str, list] = {c: [] for c in self.writes}
        checked = False
        start = 0
        while start < len(pairs):  # fetch logits in chunks that fit _LOGIT_BYTES
            stop, size = start, 0
            while stop < len(pairs) and (stop == start or size + lengths[stop] * vocab * 4 <= _LOGIT_BYTES):
                size += lengths[stop] * vocab * 4
                stop += 1
            chunk = pairs[start:stop]
            outs = engine.hidden_and_logits([p for p, _ in chunk], [r for _, r in chunk])
            for hl, e in zip(outs, ends[start:stop], strict=True):
                t = len(hl.targets) - e
                if t <= 0:
                    for c in self.writes:
                        cols[c].append("no response tokens" if c == "donod_error" else None)
                    continue
                if not checked:
                    self._check_logits(engine, hl)
                    checked = True
                don, nod = donod_update(hl.hidden[:t], hl.logits[:t], hl.targets[:t], w_sq, self.params.lr)
                cols["donod_don"].append(don)
                cols["donod_nod"].append(nod)
                cols["donod_n_tokens"].append(t)
                cols["donod_error"].append(None)
            start = stop
        return pl.DataFrame(cols, schema={"donod_don": pl.Float64, "donod_nod": pl.Float64,
                                          "donod_n_tokens": pl.Int64, "donod_error": pl.String})

    def finalize(self, scores: pl.DataFrame) -> pl.DataFrame:
        return scores.with_columns(donod_closeness(scores, self.params.weights, self.params.normalisation))
