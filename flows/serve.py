"""`curate serve`: run the curate flow on a cron schedule over a folder where new data lands.

Each scheduled run ingests the whole folder again (cheap), embeds and scores only rows the content-addressed
stores have not seen, and re-selects the subset over the whole pool into the same run folder. Schedules need a
real Prefect server (the ephemeral one refuses to schedule): with PREFECT_API_URL unset, `serve_command`
starts `prefect server start` on 127.0.0.1 (UI included) for as long as it serves.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from curate.config import Recipe
from curate.progress import catches
from curate.run import stop_process_group
from curate.validate import watch_recipe  # noqa: F401  (the recipe serve_command takes, checked before Prefect)
from flows.pipeline import curate_flow  # sets Prefect's environment before prefect is imported
from flows.server import _check_reachable


def check_cron(cron: str) -> str:
    from prefect.client.schemas.schedules import CronSchedule

    try:
        CronSchedule(cron=cron)
    except Exception as e:  # pydantic ValidationError: one clear line for the CLI
        raise ValueError(f"--cron {cron!r} is not a valid cron expression ({type(e).__name__})") from None
    return cron


def make_deployment(recipe: Recipe, cron: str, name: str = "curate-serve", timezone: str = "UTC") -> Any:
    """A RunnerDeployment of `curate_flow` for `recipe` on `cron`; runs never overlap (concurrency 1)."""
    from prefect.client.schemas.schedules import CronSchedule

    return curate_flow.to_deployment(
        name=name,
        schedule=CronSchedule(cron=check_cron(cron), timezone=timezone),
        parameters={"recipe_json": recipe.model_dump(mode="json")},
        concurrency_limit=1,
        description=f"curate {recipe.inputs[0]} -> {recipe.out} on '{cron}' ({timezone})",
        tags=["curate"],
    )


def start_local_server(port: int = 4200, timeout: float = 120.0) -> tuple[subprocess.Popen, str]:
    """`prefect server start` on 127.0.0.1:port (API, scheduler, UI); returns (process, API URL)."""
    import httpx

    url = f"http://127.0.0.1:{port}/api"
    try:
        if httpx.get(f"{url}/health", timeout=2).status_code == 200:
            raise ValueError(f"a Prefect server already listens on port {port}: export PREFECT_API_URL={url}")
    except httpx.HTTPError:
        pass
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    # its stderr goes to a file: a pipe nobody reads while serving would stall the server once full
    err = tempfile.TemporaryFile()
    # a Ctrl-C inside Popen (a fork of a large process is slow under load) left the started server running with
    # no handle to stop it: the interrupt waits until Popen has returned
    interrupted: list[int] = []
    ours = catches(signal.SIGINT)
    previous = signal.signal(signal.SIGINT, lambda *_: interrupted.append(1)) if ours else None
    try:
        proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                 "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)  # Ctrl-C stops serve first; serve then stops the server
    finally:
        if ours:
            signal.signal(signal.SIGINT, previous)
    deadline = time.monotonic() + timeout
    try:
        if interrupted:
            raise KeyboardInterrupt
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                err.seek(0)
                raise ValueError(f"prefect server start exited ({proc.returncode}): "
                                 f"{err.read().decode(errors='replace')[-500:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    return proc, url
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise ValueError(f"prefect server did not answer on {url} within {timeout:.0f} s")
    except BaseException:  # Ctrl-C while it starts: its own session does not get the SIGINT, so stop it here
        stop_process_group(proc)
        raise
    finally:
        err.close()  # the server keeps its own descriptor


async def _serve(deployment: Any, cron: str) -> None:
    """Prefect's runner for `deployment` until Ctrl-C or SIGTERM, both a graceful stop (`Runner.astop`: running flow
    runs are cancelled, the schedule paused). The signals are event-loop callbacks, never an exception raised
    wherever the main thread happens to be: a KeyboardInterrupt landing in the runner's start-up imports became
    pydantic's SchemaError ("internal error") or killed the process at exit (-2), and Prefect's own SIGTERM handler
    calls sys.exit from inside one and leaves `Runner.astop` un-awaited."""
    import prefect.runner.server  # noqa: F401  (imported by Runner.start: here, where a signal cannot interrupt it)
    from prefect.runner import Runner

    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    runner = Runner(pause_on_shutdown=True)
    stops = 0

    def stop() -> None:
        nonlocal stops
        stops += 1
        if stops == 1 and runner.started:
            loop.create_task(runner.astop())  # start() then leaves its loops and pauses the schedule
        else:  # before the runner started, or a second Ctrl-C while it stops
            main.cancel()

    handled = [sig for sig in (signal.SIGINT, signal.SIGTERM) if catches(sig)]
    for sig in handled:
        loop.add_signal_handler(sig, stop)
    # start() installs `runner.handle_sigterm` as the SIGTERM handler: make it this one, run on the loop
    term = signal.SIGTERM in handled
    runner.handle_sigterm = lambda *_: loop.call_soon_threadsafe(stop) if term else None  # type: ignore
    try:
        await runner.add_deployment(deployment)
        print(f"curate serve: deployment {deployment.flow_name}/{deployment.name} on '{cron}' is being served and "
              "polling for scheduled runs (Ctrl-C stops)", flush=True)
        await runner.start()
    except asyncio.CancelledError:  # stopped before the runner started (nothing to pause) or a second Ctrl-C
        pass
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
        if not term:  # start() set its handler over an ignored SIGTERM
            signal.signal(signal.SIGTERM, signal.SIG_IGN)


def serve_command(recipe: Recipe, cron: str = "0 * * * *", name: str = "curate-serve", port: int = 4200) -> None:
    """Serve the scheduled deployment of `recipe` (from `watch_recipe`: already checked) until interrupted
    (Ctrl-C or SIGTERM); starts a local server when none is set."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    deployment = make_deployment(recipe, cron, name)
    server, url = None, os.environ.get("PREFECT_API_URL")
    if url:  # one line naming the setting, as `curate select` says it, not a ConnectError from deep in Prefect
        _check_reachable(url)
    try:
        if not url:  # a Ctrl-C while it starts is a KeyboardInterrupt in our own wait loop, which stops that server
            server, url = start_local_server(port)
            os.environ["PREFECT_API_URL"] = url  # for Dask/Ray workers started by the flow runs
            print(f"Prefect server + UI: {url.removesuffix('/api')}  (runs are listed under flow 'curate')")
        with temporary_settings({PREFECT_API_URL: url}):
            asyncio.run(_serve(deployment, cron))
    except KeyboardInterrupt:  # Ctrl-C before _serve took the signal over: the way to stop serving, not an error
        pass
    finally:
        if server is not None:  # stop the server only after the runner has stopped (its runs are done)
            stop_process_group(server)
