"""The run folder: one Parquet per stage, written atomically, and a manifest that must add up.

    runs/<name>/
      manifest.json      config, versions, input sha256s, counts per stage and source, timings
      records.parquet    normalised, exactly-deduplicated rows (+ rejects.parquet, duplicates.parquet)
      <stage>.parquet    one per later stage
      selected.parquet   the subset;  decisions.parquet  one row per input row

Stores that outlive a run (embeddings, scores, proxy models) live in the cache folder (`cache_dir()`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

_TRACKED_PACKAGES = (
    "curate", "polars", "pyarrow", "datasets", "transformers", "sentence-transformers", "torch",
    "faiss-cpu", "scikit-learn", "prefect", "model2vec", "numpy",
)


class ConservationError(RuntimeError):
    """Row counts of a stage do not add up: something was lost or invented."""


def cache_dir() -> Path:
    """Where content-addressed stores live (embeddings, scores, models); `CURATE_CACHE_DIR` overrides."""
    path = Path(os.environ.get("CURATE_CACHE_DIR", ".curate")).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success it replaces `path`, on failure it vanishes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_parquet(table: pa.Table, path: Path) -> Path:
    """Write a table atomically (temp file + rename), so a crash never leaves half a file."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return path


def write_json(obj: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    return path


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    p = Path(path)
    if p.is_dir():  # HF datasets folder: hash its files in order
        for f in sorted(x for x in p.rglob("*") if x.is_file()):
            h.update(f.relative_to(p).as_posix().encode())
            h.update(sha256_file(f).encode())
        return h.hexdigest()
    if not stat.S_ISREG(os.stat(p).st_mode):  # a FIFO or /dev/zero would block or never end
        raise ValueError(f"{p}: not a regular file or folder")
    with open(p, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def remove_stale_tmp(folder: str | Path, older_than_s: float = 0.0, pattern: str = ".*.tmp") -> int:
    """Delete `.*.tmp` files that atomic_path left behind when a process was killed; returns how many.

    A run folder is used by one run at a time, so its temp files are all stale when a run starts
    (older_than_s=0); a shared store passes an age, so a concurrent writer's live temp file is kept.
    `pattern` may reach into sub-folders (`*/*/.*.tmp`).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    now, n = time.time(), 0
    for f in folder.glob(pattern):
        try:
            if f.is_file() and now - f.stat().st_mtime >= older_than_s:
                f.unlink()
                n += 1
        except OSError:
            continue
    return n


LOCK_NAME = ".curate.lock"


@contextmanager
def run_lock(path: str | Path) -> Iterator[None]:
    """Hold a run folder for one run at a time (an fcntl lock the kernel drops if the process dies).

    Two runs into one folder deleted each other's temp files (ingest removes the folder's `.*.tmp` as stale) and
    wrote each other's manifest and subset; the second run now stops at once with one line naming the holder.
    """
    import fcntl

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    fh = open(folder / LOCK_NAME, "a+")  # noqa: SIM115 - held open for the whole run
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise ValueError(f"{folder}: another curate run is writing this run folder ({holder}); wait for it to "
                             "end or choose another --out") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%dT%H:%M:%S%z')}")
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
    finally:
        fh.close()


#: a stage output that an earlier recipe may have left -> the files written with it and the manifest entry it made
_LEFTOVER = {"clusters.parquet": (("centroids.npy", "map2d.parquet"), ("stages", "cluster")),
             "semdedup.parquet": ((), ("stages", "semdedup")), "scores.parquet": ((), ("stages", "score")),
             "score_sample.parquet": ((), ("score_sample",))}


def drop_leftovers(run: Run, stages: Iterable[Any]) -> list[str]:
    """Remove the run-folder files that this run's stages read but none of them writes, with their manifest entries.

    Such a file is an earlier recipe's output (embeddings on, then off; scorers, then none): no stage key covers it,
    yet the pool read it, so a re-run into the same folder dropped the old semantic duplicates and kept the old
    clusters and scores, unlike the same recipe in a new folder. Returns the names removed.
    """
    written = {w for s in stages for w in s.files()}
    read = {r for s in stages for r in s.reads if not r.startswith("@")}
    removed = []
    for name in sorted((read - written) & _LEFTOVER.keys()):
        siblings, entry = _LEFTOVER[name]
        for f in (name, *siblings):
            if f not in written and run.file(f).exists():
                run.file(f).unlink()
                removed.append(f)
        (run.manifest.get("stages", {}) if len(entry) == 2 else run.manifest).pop(entry[-1], None)
    return removed


@functools.cache
def _versions() -> tuple[tuple[str, str], ...]:
    out = [("python", platform.python_version())]
    for name in _TRACKED_PACKAGES:
        try:
            out.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            pass
    return tuple(out)


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape results (read once per process: ~50 ms of metadata parsing)."""
    return dict(_versions())


class Run:
    """A run folder plus its manifest. Stages call `stage()` and `set()` to record counts and facts.

    One writer: the executors open runs with `autosave=False`, so a stage only collects its manifest entries in
    `updates`; the executor merges them (`merge`) and writes manifest.json once per stage. Ad-hoc use (tests,
    notebooks) keeps the default `autosave=True`.
    """

    def __init__(self, path: str | Path, *, autosave: bool = True):
        self.path = Path(path)
        self.autosave = autosave
        self.updates: dict[str, Any] = {}
        self.path.mkdir(parents=True, exist_ok=True)
        self.manifest_path = self.path / "manifest.json"
        if self.manifest_path.exists():
            try:
                self.manifest: dict[str, Any] = json.loads(self.manifest_path.read_text())
            except (ValueError, UnicodeDecodeError) as e:
                raise ValueError(f"{self.manifest_path}: corrupt manifest ({e}); delete it or use another "
                                 "run folder") from None
            if not isinstance(self.manifest, dict):
                raise ValueError(f"{self.manifest_path}: corrupt manifest (not a JSON object)")
        else:
            self.manifest = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "stages": {}}
        self.manifest.setdefault("stages", {})
        self.manifest["versions"] = package_versions()

    def file(self, name: str) -> Path:
        return self.path / name

    def write(self, name: str, table: pa.Table) -> Path:
        return write_parquet(table, self.file(name))

    def save(self) -> None:
        write_json(self.manifest, self.manifest_path)

    def set(self, key: str, value: Any) -> None:
        self.manifest[key] = value
        self.updates[key] = value
        if self.autosave:
            self.save()

    def merge(self, updates: dict[str, Any]) -> None:
        """Apply a stage's manifest entries (`stages` merged per stage name, other keys replaced)."""
        for key, value in updates.items():
            if key == "stages":
                self.manifest.setdefault("stages", {}).update(value)
            else:
                self.manifest[key] = value

    def stage(
        self,
        name: str,
        *,
        rows_in: int,
        rows_out: int,
        dropped: dict[str, int] | None = None,
        seconds: float,
        **extra: Any,
    ) -> None:
        """Record a stage; raise ConservationError unless rows_in == rows_out + sum(dropped)."""
        dropped = dropped or {}
        entry = {"rows_in": rows_in, "rows_out": rows_out, "dropped": dropped,
                 "seconds": round(seconds, 3), **extra}
        self.manifest["stages"][name] = entry
        self.updates.setdefault("stages", {})[name] = entry
        if self.autosave:
            self.save()
        if rows_in != rows_out + sum(dropped.values()):
            raise ConservationError(
                f"stage {name!r}: {rows_in} rows in != {rows_out} out + {sum(dropped.values())} dropped "
                f"{dropped}; see {self.manifest_path}"
            )


def stop_process_group(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM the process group `proc` leads (started with `start_new_session`) and wait until none of it is
    left; SIGKILL after `timeout`. For the servers curate starts: vLLM (API server, engine core, workers) and
    `curate serve`'s Prefect server."""
    for sig, wait_s in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)  # the group's id is the leader's pid
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            proc.poll()  # reap the leader, or the group never empties
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
    proc.poll()
