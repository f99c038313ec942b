"""The curate pipeline as one Prefect flow: the stages of `curate.pipeline` as tasks over shards of the pool.

    ingest -> embed[shard]* -> cluster -> semdedup -> score[scorer, shard]* -> collect -> select -> export -> report

Why this shape (measured in /work/shared/PREFECT-NOTES.md):
- Tasks pass only paths and small dicts: Parquet stays on disk, a cache hit costs milliseconds.
- Every task caches on `key` (sha256 of the files it reads, the recipe sections it uses, a fingerprint of
  curate's code) + TASK_SOURCE, with results and cache records under cache_dir()/prefect. So a re-run of a
  crashed flow skips finished tasks, across processes and even with a wiped PREFECT_HOME.
- A run-folder task whose cached outputs were deleted or changed since is re-run (sha256 check).
- Per-row work (embedding, scoring) is split in few coarse shard tasks: the unit of resume and of scale-out
  (Dask/Ray cost ~0.2 s per task here). Inside a shard the content-addressed stores skip every row already
  done, so a shard killed half-way resumes at its last stored batch and a pool with new rows only computes those.
"""

from __future__ import annotations

import atexit
import errno
import functools
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from curate.run import Run, cache_dir, sha256_file


def configure_prefect_env() -> dict[str, str]:
    """Set Prefect's offline environment; must run BEFORE `import prefect` (settings are read once, at import).

    PREFECT_HOME, results and cache records under cache_dir()/prefect (a bare import would create ~/.prefect),
    ephemeral server with a 120 s start-up timeout (20 s trips on 2 loaded cores), telemetry off (no DNS
    lookups), console logs at WARNING. Values already exported win; returns what it set. Without
    PREFECT_API_URL, `run_flow` starts one local ephemeral server: no network, no extra command.
    """
    state = cache_dir() / "prefect"
    home = state / "home"
    home.mkdir(parents=True, exist_ok=True)  # Prefect does not create it; its server then cannot open the DB
    wanted = {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_EPHEMERAL_ENABLED": "true",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(state / "results"),
        "DASK_LOGGING__DISTRIBUTED": "warning",  # a LocalCluster logs every worker start/stop at INFO
    }
    done = {k: v for k, v in wanted.items() if k not in os.environ}
    os.environ.update(done)
    if not os.environ.get("PREFECT_API_URL"):
        os.environ.pop("PREFECT_API_URL", None)  # an empty value would disable ephemeral mode
    return done


configure_prefect_env()

from prefect import flow, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact, create_table_artifact  # noqa: E402
from prefect.cache_policies import INPUTS, NO_CACHE, TASK_SOURCE  # noqa: E402
from prefect.futures import PrefectFuture, wait  # noqa: E402
from prefect.task_runners import ThreadPoolTaskRunner  # noqa: E402

from curate import pipeline as P  # noqa: E402
from curate.config import Recipe  # noqa: E402

_SERVER_MARK = "prefect.server.api.server:create_app"

# ---------------------------------------------------------------------------------------------- helpers


#: the sources each task's results depend on (globs under the installed packages)
CODE = {
    "ingest": ("curate/ingest.py", "curate/io/*.py", "curate/schema.py", "curate/run.py"),
    "embed": ("curate/embed.py", "curate/schema.py"),
    "cluster": ("curate/cluster.py", "curate/embed.py", "curate/pipeline.py"),
    "score": ("curate/score.py", "curate/scoring.py", "curate/store.py", "curate/lm/*.py", "scorers/*.py"),
    "select": ("curate/pipeline.py", "curate/selection.py", "curate/select/*.py", "curate/diversity.py"),
    "export": ("curate/io/writers.py", "curate/io/formats.py"),
    "report": ("curate/report.py", "curate/diversity.py"),
}


@functools.cache
def code_fingerprint(part: str) -> str:
    """sha256 of the sources a task depends on (CODE[part]): editing them invalidates its cached results.

    CURATE_CODE_VERSION, when set, replaces the file hashes (pin caches across an edit known to be harmless).
    """
    if os.environ.get("CURATE_CODE_VERSION"):
        return os.environ["CURATE_CODE_VERSION"]
    import importlib.util

    h = hashlib.sha256()
    for pattern in CODE[part]:
        pkg, _, rest = pattern.partition("/")
        spec = importlib.util.find_spec(pkg)
        for base in (spec.submodule_search_locations or []) if spec else []:
            for f in sorted(Path(base).glob(rest)):
                h.update(f"{pkg}/{f.relative_to(base).as_posix()}".encode())
                h.update(f.read_bytes())
    return h.hexdigest()[:16]


def input_fingerprints(inputs: list[str]) -> dict[str, str]:
    """sha256 per input file/folder (a hub name that is not a local path stands for itself)."""
    out = {}
    for src in inputs:
        p = Path(src)
        out[src] = sha256_file(p) if p.exists() else f"name:{src}"
    return out


def _outputs(run: Run, *names: str) -> dict[str, str]:
    return {n: sha256_file(run.file(n)) for n in names if run.file(n).exists()}


def _intact(run_dir: str, result: Any) -> bool:
    """Are the files a (possibly cached) task result says it wrote still there, unchanged?"""
    if not isinstance(result, dict):
        return True
    for name, sha in result.get("outputs", {}).items():
        path = Path(run_dir) / name
        if not path.exists() or sha256_file(path) != sha:
            return False
    return True


def is_transient(exc: BaseException) -> bool:
    """Errors worth a retry (network, busy files, a lost Dask worker), not user mistakes or bugs."""
    import httpx

    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code in (429, 502, 503, 504)
    if isinstance(exc, ConnectionError | TimeoutError | httpx.TransportError):
        return True
    if isinstance(exc, OSError) and exc.errno in (errno.EAGAIN, errno.EBUSY, errno.EIO, errno.ESTALE, errno.EINTR):
        return True
    return type(exc).__name__ in ("KilledWorker", "CommClosedError", "RayActorError", "WorkerCrashedError")


def _retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    try:
        exc = state.result(raise_on_failure=False)
    except BaseException as e:  # noqa: BLE001 - the result itself could not be read: worth one more try
        exc = e
    return isinstance(exc, BaseException) and is_transient(exc)


def _open(run_dir: str, recipe_json: dict) -> tuple[Run, Recipe]:
    return Run(run_dir), Recipe.model_validate(recipe_json)


def _sections(rj: dict, *names: str, drop: tuple[str, ...] = ()) -> dict:
    return {n: {k: v for k, v in rj[n].items() if k not in drop} if isinstance(rj[n], dict) else rj[n]
            for n in names}


C = code_fingerprint

# ---------------------------------------------------------------------------------------------- tasks
# `key` is what the cache policy hashes (with the task's source); recipe_json and run_dir are left out of it,
# so an edit of an unrelated recipe section does not invalidate a task.

_RETRY: dict[str, Any] = {"retries": 2, "retry_delay_seconds": [5, 30], "retry_condition_fn": _retry_transient}


@task(name="ingest", **_RETRY)
def ingest_task(run_dir: str, recipe_json: dict, key: dict) -> dict:
    run, recipe = _open(run_dir, recipe_json)
    info = P.stage_ingest(run, recipe)
    return {**info, "outputs": _outputs(run, "records.parquet", "rejects.parquet", "duplicates.parquet")}


@task(name="embed", task_run_name="embed-{shard}", **_RETRY)
def embed_task(run_dir: str, recipe_json: dict, shard: list[int], key: dict) -> dict:
    run, recipe = _open(run_dir, recipe_json)
    return P.stage_embed(run, recipe, shard=(shard[0], shard[1]))


@task(name="cluster", **_RETRY)
def cluster_task(run_dir: str, recipe_json: dict, key: dict) -> dict:
    run, recipe = _open(run_dir, recipe_json)
    info = P.stage_cluster(run, recipe)
    return {**info, "outputs": _outputs(run, "clusters.parquet", "centroids.npy", "map2d.parquet")}


@task(name="semdedup", **_RETRY)
def semdedup_task(run_dir: str, recipe_json: dict, key: dict) -> dict:
    run, recipe = _open(run_dir, recipe_json)
    info = P.stage_semdedup(run, recipe)
    return {**info, "outputs": _outputs(run, "semdedup.parquet")}


@task(name="scoring-model", cache_policy=NO_CACHE, **_RETRY)
def scoring_model_task(run_dir: str, recipe_json: dict) -> str:
    """Resolve score.model once before the shards fan out ("proxy" trains a small LM once, pinned per run)."""
    from curate.scoring import resolve_model

    run, recipe = _open(run_dir, recipe_json)
    return resolve_model(run, recipe)


@task(name="score", task_run_name="score-{scorer_name}-{shard}", **_RETRY)
def score_task(run_dir: str, recipe_json: dict, scorer_name: str, shard: list[int], key: dict) -> dict:
    run, recipe = _open(run_dir, recipe_json)
    return P.stage_score(run, recipe, scorer_name, shard=(shard[0], shard[1]))


@task(name="collect-scores", **_RETRY)
def collect_task(run_dir: str, recipe_json: dict, key: dict) -> dict:
    run, recipe = _open(run_dir, recipe_json)
    info = P.stage_collect_scores(run, recipe)
    return {**info, "outputs": _outputs(run, "scores.parquet")}


@task(name="select", **_RETRY)
def select_task(run_dir: str, recipe_json: dict, key: dict) -> dict:
    run, recipe = _open(run_dir, recipe_json)
    info = P.stage_select(run, recipe)
    return {**info, "outputs": _outputs(run, "selected.parquet", "decisions.parquet")}


@task(name="export", **_RETRY)
def export_task(run_dir: str, recipe_json: dict, key: dict) -> dict:
    run, recipe = _open(run_dir, recipe_json)
    info = P.stage_export(run, recipe)
    return {**info, "outputs": _outputs(run, *(Path(f).name for f in info.get("files", [])))}


@task(name="report", **_RETRY)
def report_task(run_dir: str, recipe_json: dict, key: dict) -> dict:
    run, recipe = _open(run_dir, recipe_json)
    info = P.stage_report(run, recipe)
    return {**info, "outputs": _outputs(run, "report.html") if recipe.report else {}}


def task_options() -> dict[str, Any]:
    """Persisted results + cache records under cache_dir()/prefect (resolved now, so tests and runs can move it)."""
    state = cache_dir() / "prefect"
    policy = ((INPUTS - "recipe_json" - "run_dir") + TASK_SOURCE).configure(key_storage=state / "cache-keys")
    return {"cache_policy": policy, "persist_result": True, "result_storage": state / "results"}


# ---------------------------------------------------------------------------------------------- runners


def task_runner(recipe: Recipe | None = None) -> Any:
    """The task runner chosen by settings.

    CURATE_TASK_RUNNER = thread (default) | dask | ray. thread: CURATE_TASK_WORKERS threads (default 1, or one
    per vLLM server: the CPU work already uses every core inside a task). dask: CURATE_DASK_ADDRESS of a
    running scheduler, else a LocalCluster of CURATE_DASK_WORKERS (2) processes. ray: CURATE_RAY_ADDRESS.
    """
    kind = os.environ.get("CURATE_TASK_RUNNER", "thread").strip().lower() or "thread"
    if kind in ("thread", "threads", "default"):
        default = 1
        if recipe is not None and recipe.score.engine == "vllm":
            default = max(1, len(recipe.score.vllm_urls))
        return ThreadPoolTaskRunner(max_workers=int(os.environ.get("CURATE_TASK_WORKERS") or default))
    if kind == "dask":
        from prefect_dask import DaskTaskRunner

        address = os.environ.get("CURATE_DASK_ADDRESS")
        if address:
            return DaskTaskRunner(address=address)
        n = int(os.environ.get("CURATE_DASK_WORKERS") or 2)
        return DaskTaskRunner(cluster_kwargs={"n_workers": n, "threads_per_worker": 1, "processes": True,
                                              "dashboard_address": ":0"})
    if kind == "ray":
        try:
            from prefect_ray import RayTaskRunner
        except ImportError:
            raise ValueError("CURATE_TASK_RUNNER=ray needs prefect-ray: pip install 'curate[ray]'") from None
        address = os.environ.get("CURATE_RAY_ADDRESS")
        return RayTaskRunner(address=address) if address else RayTaskRunner()
    raise ValueError(f"CURATE_TASK_RUNNER must be thread, dask or ray, not {kind!r}")


def _default_runner() -> Any:
    """The runner a deployment's flow runs use (settings read at import); a bad setting is reported by run_flow."""
    try:
        return task_runner()
    except (ValueError, ImportError):
        return ThreadPoolTaskRunner(max_workers=1)


# ---------------------------------------------------------------------------------------------- the flow


def _scorer_groups(names: list[str]) -> tuple[list[str], dict[str, list[str]], set[str]]:
    """Scorers (as the recipe names them) in dependency order, their in-recipe dependencies, and those needing
    embeddings (directly or through a dependency)."""
    from curate.scoring import _ordered, canonical
    from scorers import scorer_class

    given = {canonical(n): n for n in names}  # registry name -> the recipe's name (params are keyed by it)
    order = _ordered(list(names))
    deps = {given[c]: [given[d] for d in scorer_class(c).needs.scores if d in given] for c in order}
    late: set[str] = set()
    for c in order:
        if scorer_class(c).needs.embeddings or any(d in late for d in deps[given[c]]):
            late.add(given[c])
    return [given[c] for c in order], deps, late


@flow(name="curate", log_prints=True, task_runner=_default_runner())
def curate_flow(recipe_json: dict) -> dict:
    """Run every stage of the recipe over its run folder; finished tasks and stored rows are skipped."""
    recipe = Recipe.model_validate(recipe_json)
    rj = recipe.model_dump(mode="json")
    run = P.open_run(recipe)
    run_dir = str(run.path.resolve())
    opts = task_options()
    states: dict[str, str] = {}
    secs: dict[str, float] = {}  # wall time of stages run here; a shard's own compute time (its result's seconds)
    t0 = time.perf_counter()

    def call(t: Any, name: str, key: dict) -> dict:
        """A run-folder stage, here in the flow's thread; re-run when its cached outputs are gone or changed."""
        t1 = time.perf_counter()
        st = t.with_options(**opts)(run_dir, rj, key=key, return_state=True)
        res = st.result()
        if not _intact(run_dir, res):
            st = t.with_options(**opts, refresh_cache=True)(run_dir, rj, key=key, return_state=True)
            res = st.result()
        states[name], secs[name] = st.name, round(time.perf_counter() - t1, 3)
        return res

    def gather(futs: dict[str, PrefectFuture]) -> None:
        wait(list(futs.values()))
        for name, f in futs.items():
            res = f.result()  # raises the task's own exception (a ValueError stays a ValueError for the CLI)
            states[name] = f.state.name
            if states[name] != "Cached" and isinstance(res, dict) and "seconds" in res:
                secs[name] = round(float(res["seconds"]), 3)

    ing = call(ingest_task, "ingest", {"inputs": input_fingerprints(recipe.inputs), "ingest": rj["ingest"],
                                       "run": run_dir, "code": C("ingest")})
    rec = ing["outputs"]["records.parquet"]
    shards = [list(s) for s in P.shard_bounds(int(ing["records"]), recipe.score.shards)]

    order, deps, late = _scorer_groups(recipe.score.scorers) if recipe.score.scorers else ([], {}, set())
    model = "none"
    if any(_needs_engine(n) for n in order):
        t1 = time.perf_counter()
        st = scoring_model_task(run_dir, rj, return_state=True)
        model, states["scoring-model"] = st.result(), st.name
        secs["scoring-model"] = round(time.perf_counter() - t1, 3)

    embed_futs: dict[str, PrefectFuture] = {}
    if recipe.embed.enabled:
        ekey = {"records": rec, **_sections(rj, "embed", drop=("enabled", "batch_size")), "code": C("embed")}
        t = embed_task.with_options(**opts)
        for s in shards:
            embed_futs[f"embed-{s[0]}-{s[1]}"] = t.submit(run_dir, rj, s, key={**ekey, "shard": s})

    score_futs: dict[str, PrefectFuture] = {}
    skey = {"records": rec, "model": model, "code": C("score"),
            **_sections(rj, "score", drop=("scorers", "shards", "vllm_urls", "batch_size")),
            **_sections(rj, "embed", drop=("enabled", "batch_size"))}
    urls = recipe.score.vllm_urls if recipe.score.engine == "vllm" else []

    def submit_scores(names: list[str]) -> None:
        t = score_task.with_options(**opts)
        for name in names:
            for i, s in enumerate(shards):
                srj = rj
                if len(urls) > 1:  # data parallel: shard i goes to server i mod n (each may be tensor-parallel)
                    srj = {**rj, "score": {**rj["score"], "vllm_urls": [urls[i % len(urls)]]}}
                after = [score_futs[f"score-{d}-{s[0]}-{s[1]}"] for d in deps[name]]
                score_futs[f"score-{name}-{s[0]}-{s[1]}"] = t.submit(
                    run_dir, srj, name, s, key={**skey, "scorer": name, "shard": s}, wait_for=after)

    submit_scores([n for n in order if n not in late])  # these need no embeddings: run beside the embed shards

    outs: dict[str, str] = {"records.parquet": rec}
    sem_after_scores = recipe.semdedup.enabled and recipe.semdedup.keep == "score"
    if recipe.embed.enabled:
        gather(embed_futs)
        cl = call(cluster_task, "cluster", {"records": rec, "run": run_dir, "code": C("cluster"), "seed": recipe.seed,
                                            **_sections(rj, "embed", "cluster", drop=("enabled", "batch_size"))})
        outs.update(cl["outputs"])
    if recipe.embed.enabled and not sem_after_scores:
        outs.update(call(semdedup_task, "semdedup", _semkey(rj, outs, run_dir))["outputs"])
    submit_scores([n for n in order if n in late])
    if order:
        gather(score_futs)
        outs.update(call(collect_task, "collect-scores", {**skey, "run": run_dir})["outputs"])
    if recipe.embed.enabled and sem_after_scores:
        outs.update(call(semdedup_task, "semdedup", _semkey(rj, outs, run_dir))["outputs"])

    sel = call(select_task, "select", {"pool": outs, "select": rj["select"], "seed": recipe.seed,
                                       "semdedup": rj["semdedup"], "run": run_dir, "code": C("select")})
    outs.update(sel["outputs"])
    call(export_task, "export", {"selected": sel["outputs"].get("selected.parquet"), "export": rj["export"],
                                 "run": run_dir, "code": C("export")})
    if recipe.report:
        call(report_task, "report", {"outputs": outs, "run": run_dir, "code": C("report")})

    run = Run(run_dir)
    summary = {"tasks": states, "computed": sum(s != "Cached" for s in states.values()),
               "cached": sum(s == "Cached" for s in states.values()), "seconds": round(time.perf_counter() - t0, 3),
               "task_seconds": secs}
    run.set("flow", summary)
    _artifacts(run, summary)
    return {"run": run_dir, "selected": sel.get("selected"), **summary}


def _needs_engine(name: str) -> bool:
    from curate.scoring import canonical
    from scorers import scorer_class

    return bool(scorer_class(canonical(name)).needs.engine)


def _semkey(rj: dict, outs: dict, run_dir: str) -> dict:
    return {"pool": outs, "semdedup": rj["semdedup"], "seed": rj["seed"], "run": run_dir, "code": C("cluster")}


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


# ---------------------------------------------------------------------------------------------- API server

_OWN_SERVER: Any = None


def _servers_dir() -> Path:
    d = cache_dir() / "prefect" / "servers"
    d.mkdir(parents=True, exist_ok=True)
    return d


def cleanup_orphaned_servers() -> list[int]:
    """Stop ephemeral API servers that an earlier run started and could not stop (SIGKILL, OOM, power cut).

    atexit does not run on a hard crash, so each server we start is recorded (its pid and its owner's); a
    server whose owner is gone is terminated here, on the next run. Returns the pids stopped.
    """
    import psutil

    stopped = []
    for rec in _servers_dir().glob("*.json"):
        try:
            info = json.loads(rec.read_text())
        except (OSError, ValueError):
            rec.unlink(missing_ok=True)
            continue
        if _alive(info.get("owner_pid"), info.get("owner_started")):
            continue  # still in use by a running curate
        pid = info.get("server_pid")
        if _alive(pid, info.get("server_started")):
            try:
                proc = psutil.Process(pid)
                if any(_SERVER_MARK in part for part in proc.cmdline()):
                    proc.terminate()
                    try:
                        proc.wait(10)
                    except psutil.TimeoutExpired:
                        proc.kill()
                    stopped.append(pid)
            except psutil.Error:
                pass
        rec.unlink(missing_ok=True)
    return stopped


def _alive(pid: int | None, started: float | None) -> bool:
    import psutil

    if not pid:
        return False
    try:
        p = psutil.Process(pid)
        return started is None or abs(p.create_time() - started) < 1.0  # same process, not a reused pid
    except psutil.Error:
        return False


def ensure_api() -> str:
    """The API URL to report to: PREFECT_API_URL if set, else one local ephemeral server for this process.

    The server is started here (not lazily by Prefect) so its pid is recorded for orphan cleanup and its URL
    is exported to Dask/Ray workers, which would otherwise each start their own server on the same SQLite file.
    """
    global _OWN_SERVER
    from prefect.settings import PREFECT_API_URL

    url = os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value()
    if url:
        _check_reachable(str(url))
        return str(url)
    cleanup_orphaned_servers()
    import psutil
    from prefect.server.api.server import SubprocessASGIServer

    record: list[Path] = []
    atexit.register(lambda: [p.unlink(missing_ok=True) for p in record])  # runs after the server's own stop
    srv = SubprocessASGIServer()
    srv.start(timeout=int(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")))
    me, proc = psutil.Process(), srv.server_process
    if proc is not None:
        path = _servers_dir() / f"{proc.pid}.json"
        path.write_text(json.dumps({"server_pid": proc.pid, "server_started": psutil.Process(proc.pid).create_time(),
                                    "owner_pid": me.pid, "owner_started": me.create_time(), "url": srv.api_url}))
        record.append(path)
    _OWN_SERVER = srv
    os.environ["PREFECT_API_URL"] = srv.api_url  # inherited by worker processes spawned from here on
    return srv.api_url


def _check_reachable(url: str) -> None:
    """A configured server that does not answer is a user problem: one clear line, not a retry storm."""
    import httpx

    try:
        httpx.get(f"{url.rstrip('/')}/health", timeout=10).raise_for_status()
    except httpx.HTTPError as e:
        raise ValueError(f"PREFECT_API_URL={url} does not answer ({type(e).__name__}); start that server "
                         "(prefect server start) or unset PREFECT_API_URL to run offline") from None


def run_flow(recipe: Recipe) -> Run:
    """Run `curate_flow` for a recipe (what `curate select` calls); returns the run folder.

    Offline by default (one local ephemeral server, no network); reports to PREFECT_API_URL when set. The
    task runner comes from CURATE_TASK_RUNNER (see `task_runner`). Raises the failing stage's own exception.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = ensure_api()
    runner = task_runner(recipe)
    with temporary_settings({PREFECT_API_URL: url}):
        curate_flow.with_options(task_runner=runner)(recipe.model_dump(mode="json"))
    return Run(recipe.out)

