"""`curate eval` as a Prefect flow: one task per (arm, seed) unit, the same units `curate.eval.run_eval` runs.

Why this shape (as `flows.pipeline` for `curate select`):
- The unit files RUN/eval/<arm>-seed<k>.json are the cache (`curate.eval.unit_done`: same key, same numbers),
  so the flow and `curate eval --no-prefect` share it and give identical eval.json numbers. Prefect caches and
  persists nothing (no pickles); a unit read back from its file is a task in state "Cached". A killed eval
  resumes at the unit it was in: the finished units are Cached, that one runs again.
- Units run one after another in the flow's process: each fine-tune already uses every core (or the GPU).
- The plan (the pool tokenized, the arms drawn) is made once: `run_eval_flow` hands the plan the CLI already
  made (and priced) to the flow in this process; a flow started any other way (a deployment) plans from its
  parameters. The plan goes to tasks `quote`d: Prefect does not walk its tables.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

# isort: off
import flows.server  # noqa: F401  (must come before prefect: it sets Prefect's offline environment)
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed
from prefect.utilities.annotations import quote
# isort: on

from curate.eval import EvalConfig, EvalPlan, plan_eval, run_unit, unit_done, write_eval
from flows.server import ensure_api

_PLANS: dict[str, EvalPlan] = {}  # plans handed from run_eval_flow to the flow in this process


@task(name="eval-unit", cache_policy=NO_CACHE, persist_result=False)
def unit_task(plan: EvalPlan, arm: str, seed: int) -> Any:
    """Fine-tune and measure one (arm, seed); a unit whose file is already there returns a "Cached" state."""
    done = unit_done(plan, arm, seed)
    if done is not None:
        return Completed(name="Cached", data=done)
    return run_unit(plan, arm, seed, force=True)


@flow(name="curate-eval")
def eval_flow(run_dir: str, config: dict, references: list[str] | None = None, plan_id: str | None = None) -> dict:
    """Every (arm, seed) unit of the eval of `run_dir` as a task, then RUN/eval.json; returns its verdict."""
    t0 = time.perf_counter()
    log = get_run_logger()
    plan = _PLANS.pop(plan_id, None) if plan_id else None
    if plan is None:
        plan = plan_eval(run_dir, EvalConfig.from_json(config), references)
    results, states = {}, {}
    for arm, seed in plan.units():
        name = f"{arm}-seed{seed}"
        state = unit_task.with_options(task_run_name=name)(quote(plan), arm, seed, return_state=True)
        results[(arm, seed)] = state.result()  # raises the unit's own exception
        states[name] = state.name
        log.info("%s: %s", name, "cached" if state.name == "Cached" else f"{results[(arm, seed)]['seconds']} s")
    doc = write_eval(plan, results, time.perf_counter() - t0, executor={"kind": "prefect", "units": states})
    return {"eval": str(Path(plan.run_dir) / "eval.json"), "verdict": doc["verdict"], "units": states}


def run_eval_flow(plan: EvalPlan, references: list[str] | None = None) -> dict[str, Any]:
    """Run `eval_flow` for a plan (what `curate eval` calls); returns RUN/eval.json's dict.

    `references`: the reference files the plan was made from (None: the held-out slice), for the flow run's
    parameters. Offline by default (one local ephemeral server); reports to PREFECT_API_URL when set.
    """
    import json

    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = ensure_api()
    token = uuid.uuid4().hex
    _PLANS[token] = plan
    try:
        with temporary_settings({PREFECT_API_URL: url}):
            eval_flow.with_options(flow_run_name=f"curate-eval-{Path(plan.run_dir).name}")(
                str(plan.run_dir), asdict(plan.config), list(references) if references else None, plan_id=token)
    finally:
        _PLANS.pop(token, None)
    return json.loads((Path(plan.run_dir) / "eval.json").read_text())
