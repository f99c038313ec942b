"""`curate plan --measure`: the LM rates of a recipe timed on this machine, now, for `curate.plan` to price with.

The plan's rates were measured once on one CPU; on another they were 3-8x off (an AVX2-only EPYC: IFD 0.8 rows/s
against the assumed 4.8, BENCHMARKS.md). This module runs the stages the LM needs into a throwaway folder and
times the scorers the way a run's sample stage does, plus a fine-tune when the plan includes one. It sits above
`curate.pipeline` (whose stages it runs) and `curate.plan` (which stays free of both).
"""

from __future__ import annotations

from typing import Any

from curate.config import Recipe
from curate.plan import CALLS_PER_ROW, EVAL_RATES, lm_rows_per_second

FEEDBACK_CALIBRATION_STEPS = 2  # optimizer steps of a fine-tune that `curate plan --measure` times


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

    from curate.context import RunContext
    from curate.eval import _plain, _tokenizer, token_lengths, unit_rates
    from curate.ingest import EmptyPoolError
    from curate.pipeline import _lm_rate, build_pipeline, calibration_rows
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
        recs = ctx.records(["id", "messages"])
        info = _lm_rate(ctx, recs["id"], timed, None)
        dtype = info["dtype"] = ctx.dtype_choice()["dtype"]
        model, sel = ctx.model(), recipe.select
        convs = [_plain(m) for m in recs["messages"].gather(calibration_rows(recs["id"], recipe.seed)).to_list()]
        if eval_config is not None and eval_config.student == recipe.score.model:
            tokens = token_lengths(_tokenizer(model), convs, eval_config.max_length)
            rates, _ = unit_rates(model, convs, tokens, eval_config, dtype, steps=FEEDBACK_CALIBRATION_STEPS)
            info["eval_rates"] = {**rates, "generate_tps": EVAL_RATES["smollm2-135m"]["generate_tps"]}  # not priced
        if sel.strategy == "iterative" and sel.rounds > 1 and recipe.score.model != "proxy":
            from curate.lm.finetune import finetune
            from curate.select.iterative import feedback_config

            cfg = feedback_config(model, max_length=recipe.score.max_length, dtype=dtype,
                                  max_steps=FEEDBACK_CALIBRATION_STEPS)
            _, _, stats = finetune(model, convs, cfg, recipe.seed, dtype=dtype, label="feedback fine-tune (measure)")
            info["train_tps"] = stats["tokens_per_second"]
            info["train_calibration"] = {k: stats[k] for k in ("steps", "train_seconds", "epoch_tokens")}
    info["passes_per_second"] = info["rows_per_second"] * sum(CALLS_PER_ROW.get(n, 1) for n in timed)
    return info
