"""Where Prefect runs the shard tasks: threads (default), a Dask cluster or a Ray cluster; and which errors are
worth a retry there."""

from __future__ import annotations

import errno
import os
from typing import Any

from curate.config import Recipe


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


def task_runner(recipe: Recipe | None = None) -> Any:
    """The task runner chosen by settings.

    CURATE_TASK_RUNNER = thread (default) | dask | ray. thread: CURATE_TASK_WORKERS threads (default 1, or one
    per vLLM server: the CPU work already uses every core inside a task). dask: CURATE_DASK_ADDRESS of a
    running scheduler, else a LocalCluster of CURATE_DASK_WORKERS (2) processes. ray: CURATE_RAY_ADDRESS.
    """
    import flows.server  # noqa: F401, I001  (Prefect's environment before prefect is imported)
    from prefect.task_runners import ThreadPoolTaskRunner

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
    from prefect.task_runners import ThreadPoolTaskRunner

    try:
        return task_runner()
    except (ValueError, ImportError):
        return ThreadPoolTaskRunner(max_workers=1)
