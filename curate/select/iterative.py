"""Iterative refinement (Diversify-and-Conquer, arXiv 2409.11378; `KMeansIter` + `selection/iter.py`).

Round 0 splits budget/rounds over clusters (by size, or uniformly) and draws inside each cluster. After
each round a caller-supplied feedback signal (the paper: reward(gold) - reward(model's generation), or
the proxy fine-tune loss) is averaged per cluster; the next round adds budget/rounds NEW rows, allocated
by w = softmax(mean feedback / temperature) among rows not yet selected. Higher feedback = the cluster
still needs data.

Fixed from the reference code: `select_new_iter` draws int(N * portion / K / rounds) rows in total per
round (it divides by K twice); here each round adds budget/rounds rows. Allocation is deterministic
largest remainder on w (capped by what each cluster has left, shortfall redistributed), not the code's
Multinomial(w) draw, which can ask a cluster for more rows than it has and varies the round size.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import polars as pl

from curate.select.base import R_SELECTED, PoolView, fill_stratified
from curate.select.budget import Budget, Quotas, SelectionError, allocate
from curate.select.kmq import sampling_order

Feedback = Mapping[int, float] | pl.DataFrame
FeedbackFn = Callable[[list[str]], Feedback]


def softmax(x: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(x, np.float64) / temperature
    z = np.exp(z - z.max())
    return z / z.sum()


@dataclass
class IterativeRefinement:
    """D&C iterative selection. Use `select` with `feedback_fn`, or drive it: `start`, then `next_round`.

    `feedback_fn(selected_ids) -> {cluster: value}` or a DataFrame (`id` or `cluster`, `feedback`); it is
    called after each round but the last. `score_col` makes the in-cluster draw quality-weighted as in
    kMQ (default: uniform, as the paper). Clusters without feedback get the mean of the others.
    """

    rounds: int = 3
    temperature: float = 1.0
    split: Literal["proportional", "uniform"] = "proportional"
    score_col: str | None = None
    sample_temperature: float = 1.0
    feedback_fn: FeedbackFn | None = None
    name: ClassVar[str] = "iterative"
    history: list[dict[str, Any]] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.rounds, int) or self.rounds < 1:
            raise SelectionError(f"rounds must be a positive integer, got {self.rounds!r}")
        if not self.temperature > 0:
            raise SelectionError(f"temperature must be > 0, got {self.temperature}")
        if self.split not in ("proportional", "uniform"):
            raise SelectionError(f"split must be 'proportional' or 'uniform', got {self.split!r}")
        self._view: PoolView | None = None

    # -- driving it round by round ----------------------------------------------------------------
    def start(
        self, pool: pl.DataFrame, budget: Budget, *, seed: int, quotas: Quotas | None = None
    ) -> pl.DataFrame:
        """Round 0: the first budget/rounds rows. Returns the decisions so far."""
        view = PoolView.build(pool, budget)
        self._view, self._quotas = view, quotas or Quotas()
        self._order = sampling_order(view, self.score_col, self.sample_temperature, seed)
        self._round_of = np.full(view.n, -1, np.int64)
        self._per_round = allocate(np.full(self.rounds, view.target), view.target, proportional=False)
        self._carry, self._round = 0, 0
        self.history = []
        self._add_round(self._quotas, proportional=self.split == "proportional", cluster_w=None)
        return self.decisions()

    def next_round(self, feedback: Feedback) -> pl.DataFrame:
        """Add the next budget/rounds rows, weighted by per-cluster feedback on what is selected so far."""
        view = self._require()
        if self.done:
            raise SelectionError(f"all {self.rounds} rounds are done")
        w = softmax(self._cluster_feedback(feedback), self.temperature)
        q = Quotas(source_weights=self._quotas.source_weights, cluster_weights=self._quotas.cluster_weights)
        self._add_round(q, proportional=False, cluster_w=w)
        self.history[-1]["weights"] = dict(zip(view.group_labels.tolist(), w.round(6).tolist(), strict=True))
        return self.decisions()

    @property
    def done(self) -> bool:
        return self._view is not None and self._round >= self.rounds

    @property
    def selected_ids(self) -> list[str]:
        view = self._require()
        return view.pool["id"].cast(pl.String).filter(pl.Series(self._round_of >= 0)).to_list()

    def decisions(self) -> pl.DataFrame:
        view = self._require()
        reason = np.where(self._round_of >= 0, R_SELECTED, self._unselected_reason)
        return view.decisions(reason, self._order, round_=self._round_of)

    # -- the Strategy shape -----------------------------------------------------------------------
    def select(
        self,
        pool: pl.DataFrame,
        budget: Budget,
        *,
        seed: int,
        quotas: Quotas | None = None,
        embeddings: np.ndarray | None = None,
    ) -> pl.DataFrame:
        if self.feedback_fn is None and self.rounds > 1:
            raise SelectionError(
                "iterative selection needs a feedback_fn (selected ids -> per-cluster values)"
            )
        out = self.start(pool, budget, seed=seed, quotas=quotas)
        while not self.done:
            if self.feedback_moot:
                out = self._round_without_feedback()
                continue
            assert self.feedback_fn is not None
            out = self.next_round(self.feedback_fn(self.selected_ids))
        return out

    @property
    def feedback_moot(self) -> bool:
        """Whether feedback can no longer change the subset: the budget left takes every row left and no source
        quota chooses among them. A feedback round fine-tunes a model (up to an hour on a CPU) and a budget that
        covers the pool ran every one of them for nothing."""
        view = self._require()
        left = self._round_of < 0
        return not self._quotas.source_weights and view.costs[left].sum() <= view.target - view.costs[~left].sum()

    # -- internals --------------------------------------------------------------------------------
    def _round_without_feedback(self) -> pl.DataFrame:
        """A round split uniformly over clusters (see `feedback_moot`); its history says the feedback was skipped."""
        q = Quotas(source_weights=self._quotas.source_weights, cluster_weights=self._quotas.cluster_weights)
        self._add_round(q, proportional=False, cluster_w=None)
        self.history[-1]["feedback"] = "skipped: the budget left takes every row left"
        return self.decisions()

    def _require(self) -> PoolView:
        if self._view is None:
            raise SelectionError("call start(pool, budget, seed=...) first")
        return self._view

    def _add_round(self, quotas: Quotas, *, proportional: bool, cluster_w: np.ndarray | None) -> None:
        view = self._require()
        chosen = self._round_of >= 0
        have = np.bincount(view.group[chosen], minlength=view.group_labels.size)
        cap = floor = None
        if self._quotas.cluster_max is not None:  # the cap is on the whole subset, not on one round
            cap = np.maximum(self._quotas.cluster_max - have, 0)
        if self._quotas.cluster_min:  # so is the minimum: it held for round 0's budget/rounds rows only, and a
            floor = np.maximum(self._quotas.cluster_min - have, 0)  # budget that could meet it left clusters short
        target = int(self._per_round[self._round]) + self._carry
        reason = fill_stratified(
            view,
            self._order,
            target,
            quotas,
            proportional=proportional,
            cluster_w=cluster_w,
            available=~chosen,
            cluster_cap=cap,
            cluster_floor=floor,
        )
        new = (reason == R_SELECTED) & ~chosen
        self._round_of[new] = self._round
        self._unselected_reason = np.where(chosen, R_SELECTED, reason)
        added = int(view.costs[new].sum())
        self._carry = target - added  # under-filled budget moves on to the next round
        self.history.append({"round": self._round, "target": target, "added": added, "rows": int(new.sum())})
        self._round += 1

    def _cluster_feedback(self, feedback: Feedback) -> np.ndarray:
        """Mean feedback per cluster code; clusters without any take the mean of those with some."""
        view = self._require()
        g = view.group_labels.size
        if isinstance(feedback, pl.DataFrame):
            if "feedback" not in feedback.columns:
                raise SelectionError("feedback frame needs a 'feedback' column (and 'id' or 'cluster')")
            vals = feedback["feedback"].cast(pl.Float64).to_numpy()
            if "id" in feedback.columns:
                pos = pl.DataFrame({"id": view.pool["id"].cast(pl.String), "_i": np.arange(view.n)})
                joined = feedback.select(pl.col("id").cast(pl.String)).join(
                    pos, on="id", how="left", maintain_order="left"
                )
                if joined["_i"].null_count():
                    raise SelectionError(f"{joined['_i'].null_count()} feedback ids are not in the pool")
                codes = view.group[joined["_i"].to_numpy()]
            elif "cluster" in feedback.columns:
                codes = self._codes(feedback["cluster"].cast(pl.Int64).fill_null(-1).to_list())
            else:
                raise SelectionError("feedback frame needs an 'id' or a 'cluster' column")
        else:
            items = list(dict(feedback).items())
            codes = self._codes([int(k) for k, _ in items])
            vals = np.array([float(v) for _, v in items], np.float64)
        ok = np.isfinite(vals)
        sums = np.bincount(codes[ok], weights=vals[ok], minlength=g)
        counts = np.bincount(codes[ok], minlength=g)
        if counts.sum() == 0:
            raise SelectionError("feedback has no finite values")
        mean = np.divide(sums, counts, out=np.zeros(g), where=counts > 0)
        return np.where(counts > 0, mean, mean[counts > 0].mean())

    def _codes(self, labels: list[int]) -> np.ndarray:
        view = self._require()
        labels_arr = np.where(np.asarray(labels, np.int64) < 0, -1, np.asarray(labels, np.int64))
        codes = np.searchsorted(view.group_labels, labels_arr)
        bad = (codes >= view.group_labels.size) | (
            view.group_labels[np.minimum(codes, len(view.group_labels) - 1)] != labels_arr
        )
        if bad.any():
            raise SelectionError(
                f"feedback names clusters not in the pool: {sorted(set(labels_arr[bad].tolist()))}"
            )
        return codes


# ---------------------------------------------------------------------------- feedback: a proxy fine-tune


#: the toy proxy's feedback fine-tune (curate.lm.proxy, ~0.4M parameters trained from scratch): a high learning
#: rate and batches of 16 suit a model that small. Any other model gets FinetuneConfig's defaults (lr 1e-4, batch 8:
#: what `curate eval` fine-tunes SmolLM2 with); lr 1e-3 on SmolLM2-135M moves it far from what it scored with.
#: The proxy runs each batch in one forward pass (a model that small is all per-call overhead); others take
#: `curate.lm.finetune.micro_batch`'s choice (the same training, faster on a CPU).
PROXY_FEEDBACK = {"lr": 1e-3, "batch_size": 16, "micro_batch": 16}


def feedback_settings(model_dir: str | Path) -> dict[str, float | None]:
    """Learning rate, batch and micro-batch size of the feedback fine-tune for this model: the proxy's own, else
    FinetuneConfig's."""
    from curate.lm.proxy import is_proxy

    if is_proxy(model_dir):
        return dict(PROXY_FEEDBACK)
    from curate.lm.finetune import FinetuneConfig

    return {"lr": FinetuneConfig.lr, "batch_size": FinetuneConfig.batch_size, "micro_batch": FinetuneConfig.micro_batch}


def feedback_config(model_dir: str | Path, *, max_length: int, dtype: str, epochs: float = 1.0,
                    lr: float | None = None, batch_size: int | None = None, max_steps: int | None = None) -> Any:
    """The feedback fine-tune's `FinetuneConfig` for this model (`feedback_settings` unless lr / batch_size are
    given); `curate plan --measure` times a few `max_steps` of the same settings."""
    from curate.lm.finetune import FinetuneConfig

    settings = feedback_settings(model_dir)
    return FinetuneConfig(epochs=epochs, max_steps=max_steps, lr=settings["lr"] if lr is None else lr,
                          batch_size=int(settings["batch_size"] if batch_size is None else batch_size),
                          micro_batch=settings["micro_batch"], max_length=max_length, dtype=dtype, threads=None)


def loss_feedback(
    base_dir: str | Path,
    pool: Any,
    *,
    probe_per_cluster: int = 8,
    seed: int = 0,
    max_length: int = 512,
    epochs: float = 1.0,
    lr: float | None = None,
    batch_size: int | None = None,
    dtype: str = "auto",
    store: str | Path | None = None,
) -> Any:
    """Diversify-and-Conquer's iterative feedback with a proxy fine-tune in place of the paper's reward model.

    Returns `fn(selected_ids) -> DataFrame(cluster, feedback)` for `IterativeRefinement`. Each call fine-tunes
    `base_dir` on the rows selected so far (`curate.lm.finetune`: the fine-tune `curate eval` and `curate proxy
    finetune` run), then measures the tuned model's mean response loss (nats/token) on a fixed probe of up to
    `probe_per_cluster` rows per cluster, leaving out probe rows that are selected by then. A cluster the model
    still fits badly (high loss) gets a larger share of the next round, as a large reward(gold) -
    reward(generation) gap does in the paper. `pool` needs `id`, `cluster` and `messages`.

    `lr` / `batch_size` default to `feedback_settings(base_dir)` (the toy proxy keeps its own). `dtype` is the
    run's scoring dtype (`auto`: decided as the scoring engine decides, `curate.lm.hf.resolve_dtype`): the fine-tune
    runs bf16 autocast and the probe bf16 weights when that is bf16. Chosen for speed: float32 made a SmolLM2 round
    on Alpaca-52k take ~600 s on 2 CPU cores, and bf16 is ~2.5-3x faster there; the scores the selection starts
    from were computed in that dtype anyway. The cost: bf16 sums change with the torch thread count (the engines'
    default: $CURATE_TORCH_THREADS, else every usable core), so executors with different thread counts can choose
    different rows; pin CURATE_TORCH_THREADS, or set `score.dtype: float32`, where selections must match across
    machines. The function's `history` attribute gets one dict per call (rows trained on, probe rows, per-cluster
    loss, dtype, lr, batch size, the fine-tune's steps, tokens and training loss, seconds), for the manifest.

    `store`: a folder where each round's result is kept as JSON under a hash of everything it depends on (the
    base weights, the fine-tune settings, seed, and the text of the rows trained on and probed). A round costs up
    to an hour on a CPU and a killed select starts the stage again, so the rerun reads the finished rounds back
    (`"cached": true` in their history) and resumes at the round it was in. A file that does not parse, or whose
    key does not match, is computed again.
    """
    import torch

    from curate.lm.base import LMConfig, weights_fingerprint
    from curate.lm.evaluate import response_losses
    from curate.lm.finetune import PROMPT_CUT, finetune, prompt_overflow, training_chat_template
    from curate.lm.hf import HFEngine, resolve_dtype

    if probe_per_cluster < 1:
        raise ValueError(f"probe_per_cluster must be >= 1, got {probe_per_cluster}")
    missing = {"id", "cluster", "messages"} - set(pool.columns)
    if missing:
        raise ValueError(f"loss_feedback needs pool columns {sorted(missing)}")
    probe = (pool.select(pl.col("id").cast(pl.String), pl.col("cluster").fill_null(-1), "messages")
             .sample(fraction=1.0, shuffle=True, seed=seed)
             .group_by("cluster", maintain_order=True).head(probe_per_cluster)
             .sort("cluster", "id"))
    by_id = pool.select(pl.col("id").cast(pl.String), "messages")
    dtype = resolve_dtype(dtype)  # concrete before the first round, so every round (and the manifest) agrees
    cfg = feedback_config(base_dir, max_length=max_length, dtype=dtype, epochs=epochs, lr=lr, batch_size=batch_size)
    lr, batch_size = cfg.lr, cfg.batch_size
    lm = LMConfig(str(base_dir), max_length=max_length, dtype=dtype)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base_dir))
    tok.chat_template = training_chat_template(tok)

    base_key = {"version": FEEDBACK_VERSION, "base": str(Path(base_dir).resolve()),
                "weights": weights_fingerprint(base_dir), "lr": lr,
                "batch_size": batch_size, "micro_batch": cfg.micro_batch, "epochs": epochs, "max_length": max_length,
                "dtype": dtype, "seed": seed}

    def feedback(selected_ids: list[str]) -> pl.DataFrame:
        t0 = time.perf_counter()
        chosen = pl.DataFrame({"id": selected_ids}, schema={"id": pl.String})
        train = [[{"role": m["role"], "content": m["content"]} for m in msgs]
                 for msgs in by_id.join(chosen, on="id", how="semi")["messages"].to_list()]
        left = probe.join(chosen, on="id", how="anti")
        path = None
        if store is not None:
            # a round whose rows the fine-tune cuts (keep_responses) trained differently before: computed again
            cuts = any(prompt_overflow(tok, train, cfg.max_length))
            key = _round_key({**base_key, **({"prompt_cut": PROMPT_CUT} if cuts else {})}, train, left)
            path = Path(store) / f"{key}.json"
            hit = _read_round(path, key, left["cluster"].dtype)
            if hit is not None:
                feedback.history.append({**hit[1], "cached": True})
                return hit[0]
        model, _, stats = finetune(str(base_dir), train, cfg, seed, dtype=dtype,
                                  label=f"feedback fine-tune on {len(train):,} rows")
        # the tuned weights (float32 master copy) cast to the run's dtype, measured with the base's own tokenizer
        # and template, as the scoring engine measures; nothing is written to disk
        t1 = time.perf_counter()
        nll, toks = response_losses(HFEngine(lm, model=model.to(getattr(torch, dtype))), left["messages"].to_list())
        rows = left.select("cluster").with_columns(nll=nll, toks=toks).filter(pl.col("toks") > 0)
        out = rows.group_by("cluster").agg(feedback=pl.col("nll").sum() / pl.col("toks").sum()).sort("cluster")
        feedback.history.append({
            "trained_rows": len(train), "probe_rows": rows.height,
            "loss": dict(zip(out["cluster"].to_list(), out["feedback"].round(4).to_list(), strict=True)),
            "dtype": dtype, "lr": lr, "batch_size": batch_size, "micro_batch": stats["micro_batch"],
            "steps": stats["steps"], "train_loss": stats["train_loss"], "train_tokens": stats["epoch_tokens"],
            "train_seconds": stats["train_seconds"], "probe_seconds": round(time.perf_counter() - t1, 1),
            "seconds": round(time.perf_counter() - t0, 1)})
        if path is not None:
            _write_round(path, key, out, feedback.history[-1])
        return out

    feedback.history = []
    return feedback


#: bump when a round's result would change for the same inputs (the fine-tune or the probe's loss)
FEEDBACK_VERSION = 1


def _round_key(base: dict[str, Any], train: list[Any], probe: pl.DataFrame) -> str:
    """Hash of one feedback round's inputs: `base` plus the text of the rows trained on (in training order) and
    of the probe rows with their clusters."""
    h = hashlib.sha256(json.dumps(base, sort_keys=True).encode())
    for part in (train, probe["cluster"].to_list(), probe["messages"].to_list()):
        h.update(json.dumps(part, sort_keys=True, ensure_ascii=False).encode())
    return h.hexdigest()[:24]


def _read_round(path: Path, key: str, cluster_dtype: Any) -> tuple[pl.DataFrame, dict[str, Any]] | None:
    """A stored round, or None when there is none or it is not one we wrote (it is then computed again)."""
    try:
        doc = json.loads(path.read_text())
        clusters, values, history = doc["clusters"], doc["feedback"], doc["history"]
        if not (doc["key"] == key and len(clusters) == len(values) and all(type(c) is int for c in clusters)
                and all(type(v) is float for v in values)):
            return None
        # JSON made the loss's cluster keys strings; a fresh round has ints
        history = {**history, "loss": {int(k): float(v) for k, v in history["loss"].items()}}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    out = pl.DataFrame({"cluster": pl.Series(clusters, dtype=cluster_dtype),
                        "feedback": pl.Series(values, dtype=pl.Float64)})
    return out, history


def _write_round(path: Path, key: str, out: pl.DataFrame, history: dict[str, Any]) -> None:
    from curate.run import write_json

    path.parent.mkdir(parents=True, exist_ok=True)
    write_json({"key": key, "clusters": [int(c) for c in out["cluster"].to_list()],
                "feedback": [float(v) for v in out["feedback"].to_list()], "history": history}, path)
