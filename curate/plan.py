"""`curate plan`: estimate rows, tokens, engine calls, time and memory per stage before running anything.

Rows are counted exactly where that is cheap (lines of JSONL/CSV, Parquet metadata) and tokens are estimated
from bytes on a sample. Throughputs are the CPU numbers measured on a 2-core machine (BENCHMARKS.md); a GPU
changes the embed and score rows. Treat the output as an order of magnitude, not a promise.

One-off work is priced too, only when it will happen (issue #13: a 200-row run planned at 6 s took 5 min):
start-up (imports), the Prefect server, distilling the static embedder, training the proxy LM, converting a
packaged model (SmolLM2). With `score.sample` / `score.minutes` the LM scores a stratified sample and
`curate.distill` predicts the rest: the plan prices both parts. The LM rate here is an assumption
(`lm_rate_note` says so in the output); a run measures it before sizing the sample, and `curate plan --measure`
measures it the same way first (`curate.measure`): on a CPU without fast bf16 the assumed rate was 6-8.5x too
high.

`curate plan --eval` adds `curate eval` of the subset (`eval_plan`): the formula `curate eval --dry-run` uses,
at assumed rates (EVAL_RATES), or with `--measure` at rates timed on the calibration rows.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from curate.config import Recipe
from curate.io.readers import detect_container, expand_inputs, split_source
from curate.select.recipe import DEFAULT_FRACTION

# rows/s on 2 CPU cores (see BENCHMARKS.md); keyed by stage or model
RATES = {
    "ingest": 13_000,
    "embed:minilm-static": 5_000,
    "embed:minilm": 25,
    "embed:other": 20,
    "cluster": 50_000,
    "semdedup": 40_000,
    "select": 500_000,
}
# engine forward passes (or generations) per row, per scorer; rows/s of one pass with the default CPU proxy
CALLS_PER_ROW = {"perplexity": 1, "ifd": 2, "grape": 1, "donod": 1, "deita": 2, "clear": 8,
                 "instructmining": 0, "heuristics": 0}
PROXY_PASS_RATE = 150.0
# one forward pass per second over an Alpaca-sized row (~415 input bytes), per scoring model, 2 CPU cores:
# SmolLM2-135M bf16 through curate's HF engine: 4.85 IFD rows/s = 9.7 passes/s (issue #15, machine half loaded);
# any other model: an assumption for a ~100M-parameter model (give score.minutes and check the first run)
PASS_RATES = {"proxy": PROXY_PASS_RATE, "smollm2-135m": 9.7, "other": 5.0}
REF_BYTES_PER_ROW = 415.0  # Alpaca-52k: 21.6 MB / 52,002 rows
RULE_RATE = 20_000.0
# `select:feedback` (the iterative strategy; curate.select.iterative.loss_feedback), each round but the last: a fixed
# setup, a fine-tune of the scoring LM on the rows chosen so far, one forward pass over the probe (probe_per_cluster
# rows per cluster). Measured 2026-12-02 on Alpaca-52k with SmolLM2-135M in FLOAT32 (the feedback's dtype before it
# followed the scoring dtype), 2 idle cores, budget 300, 3 rounds, 228 clusters -> a 1,824-row probe: the rounds took
# 591.8 and 609.6 s, of which the probe pass 340 and 331 s (5.4 rows/s) and the fine-tune on 100 / 200 rows plus the
# setup 252 and 279 s; the `curate select` process peaked at 20 GB resident. The model below (float32 x
# FLOAT32_SLOWDOWN on the bf16 rates, FEEDBACK_SETUP_S fitted to the two rounds' total) gives 600 s a round for that
# run; the measured rounds differ less than its token term says (more of a round is fixed than it splits out). In
# bf16 (what `auto` picks on this CPU, now the feedback's dtype too) the same model ESTIMATES ~375 s a round (95 s
# setup, 188 s probe, 94 s fine-tune on average): an estimate, not measured yet; the manifest's rounds[].feedback
# (train_seconds, probe_seconds, seconds) of the next such run gives the numbers to put here.
# Measured afterwards, same run in bf16 (lr 1e-4, batch 8): rounds of 213.5 and 246.4 s (fine-tune 79 / 127 s, probe
# 133 / 119 s), select 461 s, peak 12.7 GB resident: this model overestimates bf16 rounds ~1.6x (kept: the safe side).
# The toy proxy: 1000 vs 2000 rows took 21.1 vs 38.6 s a round (bench/results/subsets.md, 3,000-row budget), i.e.
# ~57 rows/s of fine-tune plus a few seconds, with the hand-written loop the feedback used before curate.lm.finetune
# (SFTTrainer); not re-measured on that path. Its probe is priced at the proxy's pass rate.
FINETUNE_RATE = 57.0  # rows/s of one proxy fine-tune epoch (the proxy only; other models: EVAL_RATES' train_tps)
FEEDBACK_SETUP_S = {"proxy": 4.0, "other": 95.0}  # per round: model load, trainer and engine set-up (fitted, above)
FLOAT32_SLOWDOWN = 1.8  # float32 over bf16 time: SmolLM2's probe at 5.4 rows/s (above) vs PASS_RATES' 9.7 in bf16
FEEDBACK_MEMORY_MB = {"proxy": 1000.0, "other": 13_000.0}  # "other": the bf16 SmolLM2 run's peak (float32: 20 GB)
# one-off costs, seconds on 2 idle cores
ONE_OFF = {
    "startup": 15.0,  # importing torch, transformers, polars, sklearn, curate in a fresh process
    "prefect_server": 10.0,  # the ephemeral Prefect API server: 5-12 s (bench/results/flow.md)
    "embedder_distill": 100.0,  # minilm-static from the packaged MiniLM: 99.3 s (bench/results/embed.md)
    "proxy_per_step": 0.17,  # tiny proxy: 1000 steps in 169 s (curate/lm/proxy.py, bench/results/engines.md)
    "proxy_tokenizer": 10.0,  # BPE tokenizer + packing before the first step
    "convert:smollm2-135m": 45.0,  # GGUF -> bf16 safetensors: 20-60 s (issue #15, curate.lm.models)
}
# `curate plan --eval`: what `curate eval RUN` will cost, by the formula `curate eval --dry-run` uses
# (curate.eval.unit_cost), at assumed rates instead of a calibration. SmolLM2-135M-Instruct (the default student),
# bf16, 2 threads, micro-batches of 2: the calibration `curate eval --dry-run` wrote for the Alpaca-52k 1,000-row
# benchmark on this machine (2026-12-02 evening, idle; bench/results/eval.md), whose 7 units then took 82.0 min
# against the 80.6 min it estimated (before the CPU fine-tune took the model's own loss, 1.3-1.4x in interleaved
# pairs; the four units re-run with it on 2026-12-03 trained at 166 tokens/s on a machine ~20 % slower that
# morning, so these rates are kept). Other students: no rate is assumed beyond these; `curate eval RUN --dry-run`
# measures the real ones.
EVAL_RATES = {"smollm2-135m": {"setup_seconds": 1.17, "train_tps": 158.5, "forward_tps": 1517.3,
                               "generate_tps": 124.7}}
# input-file bytes per SmolLM2 chat token (its default system prompt included): Alpaca-52k's first 3,000 rows
# 389 bytes -> 102.7 tokens (3.8); the bundled sample (maths, code) is denser: 512 -> 172 (3.0)
EVAL_BYTES_PER_TOKEN = 3.8
# curate.distill on the sample: seconds per 1,000 sampled rows per predicted column (three candidates, hold-out
# and refit). Measured: ~1.2 s at 150 rows under load (bench/results/distill.md); HGB grows with rows, so 3 s
DISTILL_FIT_S_PER_1K_PER_COLUMN = 3.0
DISTILL_COLUMNS = {"perplexity": 3, "ifd": 5, "grape": 2, "donod": 3, "deita": 4, "clear": 3}

@dataclass
class StagePlan:
    stage: str
    rows: int
    calls: int
    seconds: float
    memory_mb: float


def count_rows(path: str) -> tuple[int, int]:
    """(rows, bytes) of one input without parsing it fully.

    A split of a dict-of-splits JSON file (`data.json#train`, as `expand_inputs` names it) is priced as its share
    of the file: the path with its `#split` is no file, and each split was counted as 1 row of 0 bytes."""
    kind = detect_container(path)
    base, split = split_source(path)
    p = Path(base)
    size = p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    if split is not None:
        size //= max(1, len(expand_inputs([base])))
    if kind == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows, size
    if kind in ("jsonl", "csv", "tsv"):
        with open(path, "rb") as fh:
            n = sum(block.count(b"\n") for block in iter(lambda: fh.read(1 << 20), b""))
        return n - (1 if kind != "jsonl" else 0), size
    if kind == "hf_disk":
        import datasets

        return len(datasets.load_from_disk(path)), size
    return max(1, size // 400), size  # JSON arrays: ~400 bytes a row


def pass_rate(model: str, bytes_per_row: float = REF_BYTES_PER_ROW) -> float:
    """Forward passes per second for `model` on rows of this size (longer rows: proportionally fewer)."""
    base = PASS_RATES.get(model, PASS_RATES["other"])
    return base * REF_BYTES_PER_ROW / max(bytes_per_row, 50.0)


def lm_rows_per_second(recipe: Recipe, bytes_per_row: float = REF_BYTES_PER_ROW) -> float | None:
    """Rows per second through every LM scorer of the recipe together (None when no scorer uses the LM).

    Assumed (no model is loaded to plan): a run measures the rate instead (curate.pipeline.stage_sample) and
    falls back to this only when that timing fails."""
    passes = sum(CALLS_PER_ROW.get(n, 1) for n in recipe.score.scorers)
    return pass_rate(recipe.score.model, bytes_per_row) / passes if passes else None


def lm_rate_note(recipe: Recipe, bytes_per_row: float = REF_BYTES_PER_ROW,
                 measured: dict[str, Any] | None = None) -> str | None:
    """The plan's LM rate is ASSUMED (PASS_RATES, measured once on an idle machine; no model is loaded to
    plan) unless `curate plan --measure` measured it (`measured`). A run does not use the assumed rate: its
    sample stage times the scorers on the real engine and sizes the sample by `score.minutes` from that
    (curate.pipeline.stage_sample). None when no scorer uses an LM."""
    rps = lm_rows_per_second(recipe, bytes_per_row)
    if rps is None:
        return None
    lm = ", ".join(n for n in recipe.score.scorers if CALLS_PER_ROW.get(n, 1))
    if measured:
        return (f"LM scoring rate measured: {measured['rows_per_second']:.2f} rows/s for "
                f"{', '.join(measured['scorers'])} with {recipe.score.model!r} in {measured['dtype']} "
                f"({measured['calibration_rows']} pool rows in {measured['calibration_seconds']:.1f} s; "
                f"assumed: {rps:.1f})" + (f"; feedback fine-tune {measured['train_tps']:.0f} tokens/s "
                                          f"(assumed: {EVAL_RATES['smollm2-135m']['train_tps']:.0f} in bf16)."
                                          if measured.get("train_tps") else "."))
    note = (f"LM scoring rate assumed, not measured: {rps:.1f} rows/s on Alpaca-sized rows for {lm} with "
            f"{recipe.score.model!r} on 2 idle CPU cores.")
    if recipe.score.minutes is not None and recipe.score.sample is None:
        note += (f" The run measures the real rate on a few pool rows and scores as many rows as fit in "
                 f"score.minutes ({recipe.score.minutes:g}); the manifest's score_sample.rate records it.")
    return note


def gpu_available() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return False
    return bool(torch.cuda.is_available())


def _static_embedder_missing() -> bool:
    try:
        from curate.embed import STATIC_MODEL, resolve_model

        return not (Path(resolve_model(STATIC_MODEL).path) / "model.safetensors").exists()
    except Exception:  # the teacher package is absent: the run will fail anyway, price the distillation
        return True


def _proxy_pinned(recipe: Recipe) -> bool:
    """A run folder whose manifest pins an existing proxy reuses it (curate.scoring.resolve_model)."""
    import json

    manifest = Path(recipe.out) / "manifest.json"
    try:
        pinned = json.loads(manifest.read_text()).get("proxy_model")
    except (OSError, ValueError):
        return False
    return bool(pinned) and Path(pinned).exists()


def _conversion_needed(model: str) -> bool:
    """A packaged model (SmolLM2) is converted once into the model cache; False for any other name."""
    try:
        from curate.lm import models as packaged
    except ImportError:
        return model == "smollm2-135m"
    if not packaged.is_packaged(model):
        return False
    try:
        return not (Path(packaged.model_pin(model)["path"]) / "model.safetensors").exists()
    except ValueError:  # the package is not installed: the run will say so
        return True


def one_off(recipe: Recipe, rows: int, *, prefect: bool = True) -> list[StagePlan]:
    """Work done once per process or once per machine, listed only when this run will do it."""
    out = [StagePlan("one-off: start-up (imports)", 0, 0, ONE_OFF["startup"], 600.0)]
    if prefect and not os.environ.get("PREFECT_API_URL"):
        out.append(StagePlan("one-off: Prefect server start", 0, 0, ONE_OFF["prefect_server"], 300.0))
    if recipe.embed.enabled and recipe.embed.model == "minilm-static" and _static_embedder_missing():
        out.append(StagePlan("one-off: distil the static embedder", 0, 0, ONE_OFF["embedder_distill"], 2000.0))
    uses_lm = any(CALLS_PER_ROW.get(n, 1) > 0 for n in recipe.score.scorers)
    if uses_lm and recipe.score.model == "proxy" and not _proxy_pinned(recipe):
        steps = int(min(1000, max(150, rows // 10)))  # as curate.scoring.resolve_model trains it
        out.append(StagePlan("one-off: train the proxy LM", rows, steps,
                             ONE_OFF["proxy_tokenizer"] + steps * ONE_OFF["proxy_per_step"], 1000.0))
    if uses_lm and _conversion_needed(recipe.score.model):
        out.append(StagePlan(f"one-off: convert {recipe.score.model}", 0, 0,
                             ONE_OFF.get(f"convert:{recipe.score.model}", 60.0), 1500.0))
    return out


def eval_plan(recipe: Recipe, config: Any = None, measured: dict[str, Any] | None = None) -> list[StagePlan]:
    """`curate eval` of the subset this recipe will select, one row per arm (calls = units): the subset's rows
    from the budget, tokens from input bytes (EVAL_BYTES_PER_TOKEN), the default reference set (the held-out
    pool slice), at EVAL_RATES or the rates `curate.measure.measure_lm_rate` measured (`measured["eval_rates"]`).
    Generation is not priced: the held-out slice gets exact-match questions only when most of its rows carry a
    GSM8K-style `#### answer`."""
    from curate.eval import EvalConfig, unit_cost

    cfg = config or EvalConfig()
    rows, nbytes = 0, 0
    for f in expand_inputs(recipe.inputs):
        r, b = count_rows(f)
        rows, nbytes = rows + r, nbytes + b
    per_row = min(float(cfg.max_length), nbytes / max(rows, 1) / EVAL_BYTES_PER_TOKEN)
    sel = recipe.select
    if sel.budget is not None:
        n = min(rows, sel.budget)
    elif sel.budget_tokens is not None:
        n = min(rows, math.ceil(sel.budget_tokens / max(per_row, 1.0)))
    else:
        n = math.ceil(rows * (sel.fraction if sel.fraction is not None else DEFAULT_FRACTION))
    held = min(cfg.heldout_rows, max(0, rows - n) // 4)
    rates = EVAL_RATES.get(cfg.student, EVAL_RATES["smollm2-135m"])
    if measured and measured.get("eval_rates"):
        rates = measured["eval_rates"]
    out = []
    if cfg.student == "smollm2-135m" and _conversion_needed(cfg.student) and not (
            recipe.score.model == cfg.student and any(CALLS_PER_ROW.get(x, 1) for x in recipe.score.scorers)):
        out.append(StagePlan(f"eval one-off: convert {cfg.student}", 0, 0, ONE_OFF[f"convert:{cfg.student}"], 1500.0))
    for arm in cfg.arms:
        units = [u for u in cfg.units() if u[0] == arm]
        _, secs = unit_cost(cfg, arm, n, n * per_row, held * per_row, 0.0, rates)
        out.append(StagePlan(f"eval:{arm} ({len(units)} unit{'s' if len(units) > 1 else ''})",
                             0 if arm == "base" else n, len(units), secs * len(units), 3000.0))
    return out


def feedback_seconds(recipe: Recipe, trained_rows: int, probe_rows: int,
                     bytes_per_row: float = REF_BYTES_PER_ROW, measured: dict[str, Any] | None = None) -> float:
    """Seconds of the iterative strategy's feedback over all its rounds: per round but the last, a set-up, a
    fine-tune of the scoring LM on the rows chosen so far (`trained_rows`: summed over the rounds) and one pass over
    the probe (`probe_rows`: summed too). The proxy at its own rates; any other model from tokens (input bytes /
    EVAL_BYTES_PER_TOKEN, capped at score.max_length) at EVAL_RATES' train_tps and its PASS_RATES, in the scoring
    dtype: `score.dtype: float32` costs FLOAT32_SLOWDOWN, `auto` is priced as bf16 (what it picks on a CPU with
    fast bf16; one without runs float32, ~1.8x slower). A model without EVAL_RATES trains at SmolLM2's rate scaled
    by the two models' pass rates. `measured` (`curate.measure.measure_lm_rate`): the probe at the measured pass
    rate, the fine-tune at the measured training rate (else the assumed one, in the dtype the run picks)."""
    sc, sel = recipe.score, recipe.select
    setups = (sel.rounds - 1) * FEEDBACK_SETUP_S["proxy" if sc.model == "proxy" else "other"]
    if sc.model == "proxy":
        probe_rate = measured["passes_per_second"] if measured else pass_rate("proxy", bytes_per_row)
        return setups + trained_rows / FINETUNE_RATE + probe_rows / probe_rate
    ref = EVAL_RATES["smollm2-135m"]["train_tps"]
    tps = EVAL_RATES[sc.model]["train_tps"] if sc.model in EVAL_RATES else ref * pass_rate(sc.model) / pass_rate(
        "smollm2-135m")
    tokens = trained_rows * min(float(sc.max_length), bytes_per_row / EVAL_BYTES_PER_TOKEN)
    dtype = measured["dtype"] if measured else sc.dtype
    slow = FLOAT32_SLOWDOWN if dtype == "float32" else 1.0
    if measured:
        train = tokens / measured["train_tps"] if measured.get("train_tps") else slow * tokens / tps
        return setups + train + probe_rows / measured["passes_per_second"]
    return setups + slow * (tokens / tps + probe_rows / pass_rate(sc.model, bytes_per_row))


def subset_estimate(recipe: Recipe, rows: int, tokens: int) -> tuple[int, int]:
    """(rows, tokens) of the subset the budget asks for, resolved as the select stage resolves it
    (`curate.select.recipe._budget`, `Budget.resolve`); thresholds and quotas can only make it smaller. A token
    budget is turned into rows at the pool's mean tokens per row. Why: the plan priced the iterative strategy's
    feedback fine-tunes at 10% of the pool whatever `--budget-tokens` said, and never said what the subset would
    be."""
    from curate.select import Budget

    sel = recipe.select
    per_row = tokens / max(rows, 1)
    if sel.budget_tokens is not None:
        n = min(rows, int(math.floor(sel.budget_tokens / max(per_row, 1e-9) + 0.5)))
        return n, min(int(sel.budget_tokens), tokens)
    if sel.budget is not None:
        n = Budget(rows=sel.budget).resolve(rows)
    elif sel.strategy == "threshold":
        n = rows
    else:
        n = Budget(fraction=sel.fraction if sel.fraction is not None else DEFAULT_FRACTION).resolve(rows)
    return n, round(n * per_row)


def plan(recipe: Recipe, *, prefect: bool = True, measured: dict[str, Any] | None = None) -> list[StagePlan]:
    """Every stage of the run (one-off work first), with rows, engine calls, seconds and peak memory.

    `prefect=False` for `--no-prefect` (no server to start). `measured` (`curate.measure.measure_lm_rate`): the
    LM stages at the rate measured on this machine instead of the assumed one; it sizes a `score.minutes` sample
    as the run would."""
    from curate.distill import FEATURE_VIEWS, sample_size

    files = expand_inputs(recipe.inputs)
    rows = 0
    nbytes = 0
    for f in files:
        r, b = count_rows(f)
        rows += r
        nbytes += b
    tokens = nbytes // 4
    dim = 384  # MiniLM and the static model distilled from it (PCA to 384)
    k = recipe.cluster.k or max(1, round(math.sqrt(rows)))
    out = one_off(recipe, rows, prefect=prefect)
    out.append(StagePlan("ingest+dedup", rows, 0, rows / RATES["ingest"], 400.0))
    embed_rate = RATES.get(f"embed:{recipe.embed.model}", RATES["embed:other"])
    if recipe.embed.enabled:
        emb_mb = rows * dim * 4 / 2**20
        out.append(StagePlan("embed", rows, 0, rows / embed_rate, 600 + emb_mb))
        out.append(StagePlan("cluster", rows, 0, rows / RATES["cluster"] * max(1, k / 300), 300 + 2 * emb_mb))
        if recipe.semdedup.enabled:  # its own view (instruction + response) is embedded too when it differs
            extra = rows / embed_rate if recipe.semdedup.view != recipe.embed.view else 0.0
            out.append(StagePlan("semdedup", rows, 0, rows / RATES["semdedup"] + extra, 300 + 2 * emb_mb))
    bytes_per_row = nbytes / max(rows, 1)
    rate = pass_rate(recipe.score.model, bytes_per_row)
    rps = lm_rows_per_second(recipe, bytes_per_row)
    if measured and rps:
        rate, rps = measured["passes_per_second"], measured["rows_per_second"]
    sc = recipe.score
    n_lm = sample_size(rows, sc.sample, sc.minutes, rps, engine_is_gpu=gpu_available()) if rps else rows
    for name in sc.scorers:
        per_row = CALLS_PER_ROW.get(name, 1)
        n = n_lm if per_row else rows
        calls = n * per_row
        secs = calls / rate if calls else rows / RULE_RATE
        out.append(StagePlan(f"score:{name}", n, calls, secs, 800.0 if calls else 300.0))
    if n_lm < rows:  # sample-then-distill: features for every row, one cheap model per score column
        secs = 0.0 if any(n in ("heuristics", "heur") for n in sc.scorers) else rows / RULE_RATE
        have = {recipe.embed.view} | ({recipe.semdedup.view} if recipe.semdedup.enabled else set())
        secs += sum(rows / embed_rate for v in FEATURE_VIEWS if v not in have)
        cols = sum(DISTILL_COLUMNS.get(n, 2) for n in sc.scorers if CALLS_PER_ROW.get(n, 1))
        secs += n_lm / 1000 * cols * DISTILL_FIT_S_PER_1K_PER_COLUMN
        out.append(StagePlan("distill (predict the rest)", rows - n_lm, 0, secs, 400 + rows * 0.004))
    out.append(StagePlan("select", rows, 0, rows / RATES["select"] + 2, 200 + rows * 1e-4))
    sel = recipe.select
    sub_rows, sub_tokens = subset_estimate(recipe, rows, tokens)
    if sel.strategy == "iterative" and sel.rounds > 1 and sub_rows < rows:  # else every row is taken: no feedback
        budget = sub_rows
        trained = sum(budget * r // sel.rounds for r in range(1, sel.rounds))
        probe = min(rows, k * sel.probe_per_cluster) * (sel.rounds - 1)
        secs = feedback_seconds(recipe, trained, probe, bytes_per_row, measured)
        memory = FEEDBACK_MEMORY_MB["proxy" if sc.model == "proxy" else "other"]
        out.append(StagePlan("select:feedback", trained, probe, secs, memory))
    out.append(StagePlan("(tokens, estimated)", tokens, 0, 0.0, 0.0))
    out.append(StagePlan("(subset rows, at most)", sub_rows, 0, 0.0, 0.0))
    out.append(StagePlan("(subset tokens, estimated)", sub_tokens, 0, 0.0, 0.0))
    return out
