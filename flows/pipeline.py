"""The curate pipeline as one Prefect flow: the same stage list as `curate.pipeline.run_local`, as tasks.

Why this shape (Prefect measured on this kind of machine: start-up, pins, per-task cost):
- One generic task runs any stage through `curate.pipeline.run_stage`, which owns caching (JSON results keyed
  by the stage's declared inputs, recipe sections and code), so the flow and the local executor give the same
  outputs and share a cache. Prefect persists no results (no pickles to tamper with); a cache hit shows as a
  task in state "Cached".
- Sharded stages (embedding, scoring) are submitted to the task runner (threads, Dask or Ray); stages over the
  whole pool run in the flow's process once their inputs are done. Scoring that needs no embeddings runs beside
  the embedding shards.
- Tasks pass only paths and small dicts: Parquet stays on disk.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

# isort: off
import flows.server  # noqa: F401  (must come before prefect: it sets Prefect's offline environment)
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture
from prefect.states import Completed
# isort: on

from curate import pipeline as P
from curate.config import Recipe
from curate.run import Run, run_lock
from flows.runners import _default_runner, _retry_transient, task_runner
from flows.server import ensure_api, settle_task_runs

_RETRY: dict[str, Any] = {"retries": 2, "retry_delay_seconds": [5, 30], "retry_condition_fn": _retry_transient}


@task(name="stage", cache_policy=NO_CACHE, persist_result=False, **_RETRY)
def stage_task(run_dir: str, recipe_json: dict, stage: str, shard: list[int] | None, key: str,
               refresh: bool = False) -> Any:
    """Run one stage (or one shard of it) of the recipe's pipeline; a cache hit returns a "Cached" state."""
    recipe = Recipe.model_validate(recipe_json)
    st = next(s for s in P.build_pipeline(recipe) if s.name == stage)
    res = P.run_stage(st, run_dir, recipe, key, tuple(shard) if shard else None, refresh=refresh)
    return Completed(name="Cached", data=res) if res["cached"] else res


@flow(name="curate", log_prints=True, task_runner=_default_runner())
def curate_flow(recipe_json: dict) -> dict:
    """Run every stage of the recipe over its run folder; finished stages and stored rows are skipped."""
    recipe = Recipe.model_validate(recipe_json)
    with run_lock(recipe.out):  # one run per folder: a scheduled tick and a `curate select` into it at once
        return _run_stages(recipe)


def _run_stages(recipe: Recipe) -> dict:
    t0 = time.perf_counter()
    log = get_run_logger()
    rj = recipe.model_dump(mode="json")
    run, plan = P.start_run(recipe)
    run_dir = plan.run_dir
    refresh = P.refresh_requested()
    futures: dict[str, list[tuple[str, PrefectFuture]]] = {}
    results: dict[str, dict[str, Any]] = {}
    n_records = 0

    def finish(name: str) -> None:
        """Wait for a submitted sharded stage; merge its shards' manifest entries; raise its own error."""
        futs = futures.pop(name, [])
        wait_interruptibly([f for _, f in futs])
        for tname, f in futs:
            res = f.result()  # raises the task's own exception (a ValueError stays a ValueError for the CLI)
            results[tname] = res
            run.merge(res["manifest"])
        if futs:
            run.save()

    for st in plan.stages:
        key = plan.key(st)
        deps = plan.deps[st.name]
        if st.sharded:
            after = [f for d in deps for _, f in futures.get(d, [])]
            futures[st.name] = [
                (P.task_name(st, s), stage_task.with_options(task_run_name=P.task_name(st, s)).submit(
                    run_dir, _server_for(rj, st, i), st.name, list(s), key, refresh, wait_for=after))
                for i, s in enumerate(plan.shards(n_records))]
            continue
        for d in deps:
            finish(d)
        res = stage_task.with_options(task_run_name=st.name)(run_dir, rj, st.name, None, key, refresh,
                                                             return_state=True).result()
        results[st.name] = res
        run.merge(res["manifest"])
        run.save()
        plan.done(st, res)
        log.info("%s: %s%s", st.name, "cached" if res["cached"] else f"{res['seconds']} s",
                 "".join(f", {k}={v}" for k, v in res["info"].items() if isinstance(v, int | str)))
        if st.name == "ingest":
            n_records = int(res["info"]["records"])
    for name in list(futures):
        finish(name)

    summary = P.summarise(run, results, time.perf_counter() - t0)
    run.set("executor", {"kind": "prefect", **summary})
    run.save()
    _artifacts(run, summary)
    return {"run": run_dir, "selected": results.get("select", {}).get("info", {}).get("selected"), **summary}


def wait_interruptibly(futures: list[PrefectFuture], poll: float = 0.5) -> None:
    """Wait until every future is done, in `poll`-second slices. Python runs a signal handler in the main thread
    only, and Ctrl-C delivered to a worker thread does not wake a main thread blocked on a lock: `curate select`
    sat out the running scoring shard (~1 minute) before it even noticed a Ctrl-C."""
    left, lock, done = [len(futures)], threading.Lock(), threading.Event()

    def one(_: Any) -> None:
        with lock:
            left[0] -= 1
            if left[0] == 0:
                done.set()

    if not futures:
        return
    for f in futures:
        f.add_done_callback(one)
    while not done.wait(poll):
        pass


def _server_for(rj: dict, stage: P.Stage, i: int) -> dict:
    """Data parallel over vLLM servers: scoring shard i goes to server i mod n (each may be tensor-parallel).
    The servers are not part of any cache key, so this changes where a shard runs, never its result."""
    urls = rj["score"]["vllm_urls"] if rj["score"]["engine"] == "vllm" else []
    if not stage.name.startswith("score:") or len(urls) < 2:
        return rj
    return {**rj, "score": {**rj["score"], "vllm_urls": [urls[i % len(urls)]]}}


def stage_rows(manifest: dict) -> list[dict[str, Any]]:
    """One row per stage from the run manifest: rows in/out, dropped by reason, seconds."""
    rows = []
    for name, s in manifest.get("stages", {}).items():
        rows.append({"stage": name, "rows_in": s.get("rows_in"), "rows_out": s.get("rows_out"),
                     "dropped": ", ".join(f"{k}: {v}" for k, v in s.get("dropped", {}).items()) or "0",
                     "seconds": s.get("seconds")})
    return rows


def _artifacts(run: Run, summary: dict) -> None:
    m = run.manifest
    rows = stage_rows(m)
    create_table_artifact(key="curate-stage-counts", table=rows, description=f"rows per stage: {run.path}")
    totals = m.get("totals", {})
    lines = [f"# curate run `{run.path}`", "",
             f"* input rows: **{totals.get('input_rows', '?')}**, selected: **{totals.get('selected', '?')}**",
             f"* tasks: {summary['computed']} computed, {summary['cached']} cached; {summary['seconds']} s",
             f"* subset: `{run.file('selected.parquet')}`; decisions: `{run.file('decisions.parquet')}`", "",
             "| stage | in | out | dropped | seconds |", "|---|---|---|---|---|"]
    lines += [f"| {r['stage']} | {r['rows_in']} | {r['rows_out']} | {r['dropped']} | {r['seconds']} |" for r in rows]
    reasons = totals.get("reasons", {})
    if reasons:
        lines += ["", "| final reason | rows |", "|---|---|"] + [f"| {k} | {v} |" for k, v in reasons.items()]
    create_markdown_artifact(key="curate-summary", markdown="\n".join(lines), description="curate run summary")


def run_flow(recipe: Recipe) -> Run:
    """Run `curate_flow` for a recipe (what `curate select` calls); returns the run folder.

    Offline by default (one local ephemeral server, no network); reports to PREFECT_API_URL when set. The
    task runner comes from CURATE_TASK_RUNNER (see `flows.runners.task_runner`). The flow run is named after
    the run folder. Raises the failing stage's own exception.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = ensure_api()
    runner = task_runner(recipe)
    with temporary_settings({PREFECT_API_URL: url}):
        state = curate_flow.with_options(task_runner=runner, flow_run_name=f"curate-{Path(recipe.out).name}")(
            recipe.model_dump(mode="json"), return_state=True)
        tasks = None
        try:
            tasks = len(state.result()["tasks"])  # raises the failing stage's own exception
        finally:  # our ephemeral server stops at exit: first let it record the last task runs
            settle_task_runs(state.state_details.flow_run_id, tasks)
    return Run(recipe.out)
