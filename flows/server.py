"""Prefect's API server for curate: offline by default, one local server per process, orphans cleaned up.

Why here and first: Prefect reads its settings once, at import, so `configure_prefect_env()` runs when this
module is imported, before anything imports prefect (flows.pipeline imports this module first).
"""

from __future__ import annotations

import atexit
import json
import os
from pathlib import Path
from typing import Any

from curate.run import cache_dir

_SERVER_MARK = "prefect.server.api.server:create_app"


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
