"""Prefect's API server for curate: offline by default, one local server per process, orphans cleaned up.

Why here and first: Prefect reads its settings once, at import, so `configure_prefect_env()` runs when this
module is imported, before anything imports prefect (flows.pipeline imports this module first).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import time
from collections.abc import Iterator
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
    start_migrated(srv, int(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")))
    me, proc = psutil.Process(), srv.server_process
    if proc is not None:
        path = _servers_dir() / f"{proc.pid}.json"
        path.write_text(json.dumps({"server_pid": proc.pid, "server_started": psutil.Process(proc.pid).create_time(),
                                    "owner_pid": me.pid, "owner_started": me.create_time(), "url": srv.api_url}))
        record.append(path)
    _OWN_SERVER = srv
    os.environ["PREFECT_API_URL"] = srv.api_url  # inherited by worker processes spawned from here on
    return srv.api_url


def settle_task_runs(flow_run_id: Any, expected: int | None, timeout: float = 60.0) -> bool:
    """Before our ephemeral server stops: wait until it has recorded the flow run's task runs.

    Task runs reach the DB as events that the server's task-run recorder writes one at a time, behind the flow.
    A fast (fully cached) run ended while the recorder was still writing; stopping the server then cancelled the
    write, which Prefect logs as "Error flushing N events" with a traceback (and the task runs were lost). So
    wait until `expected` task runs are final, or, after a failure (some tasks never ran, so never end), until
    what is recorded stops changing between two polls. A server we did not start keeps running: no wait.
    Returns whether it settled within `timeout`.
    """
    if _OWN_SERVER is None or flow_run_id is None:
        return True
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    only = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
    deadline, previous = time.monotonic() + timeout, None
    try:
        with get_client(sync_client=True) as client:
            while True:
                runs, page = [], None
                while page is None or len(page) == 200:
                    page = client.read_task_runs(flow_run_filter=only, limit=200, offset=len(runs))
                    runs += page
                if expected is not None:
                    if len(runs) >= expected and all(r.state is not None and r.state.is_final() for r in runs):
                        return True
                else:
                    seen = sorted((str(r.id), str(r.state_type), str(r.state_name)) for r in runs)
                    if seen == previous:
                        return True
                    previous = seen
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.25 if expected is not None else 0.5)
    except Exception:  # noqa: BLE001 - a server that cannot answer has nothing left to record
        return False


def start_migrated(srv: Any, timeout: int) -> None:
    """Start an ephemeral server; the first one on a Prefect home creates and migrates its DB under a file lock.

    Each server runs Prefect's migrations when it starts. Two first runs at once on one cache both migrated the
    new SQLite DB: one failed ("duplicate column name", a traceback on the terminal) and could leave the DB half
    migrated. So until a server of this Prefect version has started once on this home, starting one holds an
    exclusive lock (fcntl, released by the kernel if the process dies); later starts find the DB at head and
    take no lock, so concurrent runs on a migrated cache do not queue behind each other.
    """
    import prefect
    from prefect.settings import PREFECT_HOME

    home = Path(PREFECT_HOME.value()).expanduser()
    home.mkdir(parents=True, exist_ok=True)
    ready = home / f".curate-migrated-{prefect.__version__}"
    db = _sqlite_file()
    if ready.exists() and (db is None or db.exists()):
        srv.start(timeout=timeout)
        return
    # the holder's own start is bounded by `timeout`, counted by Prefect in sleeps that a starved 2-core box
    # stretches many times over (seen: a migration of ~20 s idle took over 5 min): wait generously, never forever
    with _exclusive(home / ".curate-migrate.lock", wait=10 * timeout,
                    holder="another curate run that is creating Prefect's database"):
        srv.start(timeout=timeout)  # migrates (a no-op if a run that held the lock before did it)
        ready.touch()


def _sqlite_file() -> Path | None:
    """The SQLite file of Prefect's server DB (None: another database, whose migrations are not ours to guard)."""
    from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL
    from sqlalchemy.engine import make_url

    url = make_url(str(PREFECT_SERVER_DATABASE_CONNECTION_URL.value()))
    return Path(url.database).expanduser() if url.get_backend_name() == "sqlite" and url.database else None


@contextlib.contextmanager
def _exclusive(path: Path, wait: float, holder: str) -> Iterator[None]:
    """An exclusive fcntl lock on `path`, waited for at most `wait` seconds (then a clear error, not a hang)."""
    import errno
    import fcntl

    with open(path, "a+") as fh:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(errno.ETIMEDOUT, f"still locked after {wait:.0f} s by {holder}",
                                       str(path)) from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _check_reachable(url: str) -> None:
    """A configured server that does not answer is a user problem: one clear line, not a retry storm."""
    import httpx

    try:
        httpx.get(f"{url.rstrip('/')}/health", timeout=10).raise_for_status()
    except httpx.HTTPError as e:
        raise ValueError(f"PREFECT_API_URL={url} does not answer ({type(e).__name__}); start that server "
                         "(prefect server start) or unset PREFECT_API_URL to run offline") from None
