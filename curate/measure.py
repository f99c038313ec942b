"""`curate plan --measure`: the LM rates of a recipe timed on this machine, now, for `curate.plan` to price with.

The plan's rates were measured once on one CPU; on another they were 3-8x off (an AVX2-only EPYC: IFD 0.8 rows/s
against the assumed 4.8, BENCHMARKS.md). This module runs the stages the LM needs into a throwaway folder and
times the scorers the way a run's sample stage does, plus a fine-tune when the plan includes one. It sits above
`curate.pipeline` (whose stages it runs) and `curate.plan` (which stays free of both).
"""

from __future__ import annotations

import time
from typing import Any

from curate.config import Recipe
from curate.plan import CALLS_PER_ROW, EVAL_RATES, lm_rows_per_second

FEEDBACK_CALIBRATION_STEPS = 2  # optimizer steps of a fine-tune that `curate plan --measure` times


def _time_eval_unit(student: str, convs: list[Any], config: Any, seed: int, dtype: str) -> dict[str, float]:
    """`curate eval`'s rates on this machine, measured as `curate.eval.calibrate` measures them (a fine-tune of
    FEEDBACK_CALIBRATION_STEPS steps with the eval's settings, then one loss pass over the same rows); the
    generation rate stays assumed (eval_plan does not price generation)."""
    from dataclasses import replace

    from curate.eval import _engine, _tokenizer, token_lengths
    from curate.lm.evaluate import response_losses
    from curate.lm.finetune import finetune

    t0 = time.perf_counter()
    model, tok, st = finetune(student, convs, replace(config, max_steps=FEEDBACK_CALIBRATION_STEPS, epochs=1.0),
                              seed, dtype=dtype)
    engine = _engine(student, model, tok, config, dtype)
    setup = time.perf_counter() - t0 - st["train_seconds"]
    t1 = time.perf_counter()
    response_losses(engine, convs)
    forward = time.perf_counter() - t1
    tokens = sum(token_lengths(_tokenizer(student), convs, config.max_length))
    return {"setup_seconds": round(setup, 2), "train_tps": st["tokens_per_second"],
            "forward_tps": round(tokens / max(forward, 1e-6), 1),
            "generate_tps": EVAL_RATES["smollm2-135m"]["generate_tps"]}


def measure_lm_rate(recipe: Recipe, eval_config: Any = None) -> dict[str, Any] | None:
    """The LM scoring rate on this machine, now, measured as a run's sample stage measures it: the stages the
    LM needs (ingest, resolving the model, the embeddings when a timed scorer reads them) run into a throwaway
    folder, then the timed scorers run on the same CALIBRATION_ROWS pool rows (curate.pipeline._lm_rate).
    One-off work of the model (training the proxy, converting a packaged model) happens here and is kept, as a
    run would keep it. For the iterative strategy (a model other than the proxy) the feedback fine-tune is timed
    too: FEEDBACK_CALIBRATION_STEPS optimizer steps of its settings on the same rows. None when no scorer runs
    an LM. Returns _lm_rate's dict plus `passes_per_second` (engine passes, CALLS_PER_ROW), the `dtype` the
    engine ran in and, when timed, `train_tps` (fine-tune tokens/s; its first step's set-up included).
    `eval_config` (a `curate.eval.EvalConfig`, for `curate plan --eval`): when its student is the scoring model,
    its unit rates are measured on the same rows too (`eval_rates`); another student keeps the assumed ones."""
    import tempfile

    import numpy as np

    from curate.context import RunContext
    from curate.distill import hash_rank
    from curate.ingest import EmptyPoolError
    from curate.pipeline import CALIBRATION_ROWS, _lm_rate, build_pipeline
    from curate.run import Run
    from curate.scoring.recipe import make_scorer, timed_scorers

    timed = timed_scorers(recipe)
    if not timed or not lm_rows_per_second(recipe):
        return None
    embeddings = any(make_scorer(recipe, n).needs.embeddings for n in timed)
    needed = {"ingest", "model"} | ({"embed"} if embeddings else set())
    with tempfile.TemporaryDirectory(prefix="curate-plan-") as tmp:
        r = recipe.model_copy(update={"out": tmp})
        ctx = RunContext(Run(tmp, autosave=False), r)
        try:
            for st in build_pipeline(r):
                if st.name in needed:
                    st(ctx, None)
        except EmptyPoolError as e:  # its message names a file in the throwaway folder: name the command instead
            raise EmptyPoolError(str(e).split("; each row's reason is in ")[0]
                                 + "; `curate ingest INPUTS --out DIR` writes each row's reason") from None
        info = _lm_rate(ctx, ctx.records(["id"])["id"], timed, None)
        info["dtype"] = ctx.dtype_choice()["dtype"]
        sel = recipe.select
        recs = ctx.records(["id", "messages"])
        rows = recs[np.sort(np.argsort(hash_rank(recs["id"].to_list(), recipe.seed))[:CALIBRATION_ROWS])]
        convs = [[{"role": m["role"], "content": m["content"]} for m in msgs] for msgs in rows["messages"]]
        if eval_config is not None and eval_config.student == recipe.score.model:
            info["eval_rates"] = _time_eval_unit(ctx.model(), convs, eval_config, recipe.seed, info["dtype"])
        if sel.strategy == "iterative" and sel.rounds > 1 and recipe.score.model != "proxy":
            from curate.lm.finetune import FinetuneConfig, finetune
            from curate.select.iterative import feedback_settings

            fs = feedback_settings(ctx.model())
            cfg = FinetuneConfig(max_steps=FEEDBACK_CALIBRATION_STEPS, lr=fs["lr"], batch_size=int(fs["batch_size"]),
                                 micro_batch=fs["micro_batch"], max_length=recipe.score.max_length,
                                 dtype=info["dtype"], threads=None)
            _, _, stats = finetune(ctx.model(), convs, cfg, recipe.seed, dtype=info["dtype"])
            info["train_tps"] = stats["tokens_per_second"]
            info["train_calibration"] = {k: stats[k] for k in ("steps", "train_seconds", "epoch_tokens")}
    info["passes_per_second"] = info["rows_per_second"] * sum(CALLS_PER_ROW.get(n, 1) for n in timed)
    return info
