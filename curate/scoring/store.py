"""Content-addressed score store: compute a score once, decide with it many times.

A value is addressed by (record id, scorer signature, model signature [, context]). The last three form
the *key*; each key owns a folder of immutable Parquet part files (`id` + the scorer's columns):

    <root>/<scorer name>/<sha256(key)[:24]>/key.json           the key in words
    <root>/<scorer name>/<sha256(key)[:24]>/part-*.parquet     one per finished batch

Why part files: a write is a temp file + rename of a fresh, unique name, so two processes writing at
once never touch the same file, a killed writer leaves no half file, and every finished batch stays.
The same id may be present twice (two writers raced); readers keep the last copy, values are equal.
A part that cannot be read (damaged on disk: truncated, overwritten) is renamed `damaged-*` and ignored, with a
warning, so its ids count as missing and are scored again: the store is a cache, never a reason to fail a run.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
import warnings
from pathlib import Path

import orjson
import polars as pl

from curate.run import atomic_path, cache_dir, remove_stale_tmp

_RETRIES = 5


def make_key(scorer_signature: str, model_signature: str = "none", context: str = "") -> str:
    """The store key: scorer signature | model signature | context (upstream inputs, e.g. embeddings)."""
    return f"{scorer_signature}|{model_signature}|{context}"


def _read_part(path: Path, columns: list[str] | None = None) -> pl.DataFrame | None:
    """One part file, or None when it is damaged (then renamed `damaged-*`, so its ids are scored again).
    FileNotFoundError passes through: a part removed by a concurrent compaction means "list again"."""
    try:
        return pl.read_parquet(path, columns=columns)
    except FileNotFoundError:
        raise
    except (pl.exceptions.PolarsError, OSError) as e:
        try:
            path.rename(path.with_name("damaged-" + path.name))
        except OSError:  # another reader moved it first, or a read-only store: it is skipped all the same
            pass
        warnings.warn(f"score store: {path} is damaged ({type(e).__name__}: {str(e)[:200]}); "
                      "it was set aside and its rows will be scored again", stacklevel=3)
        return None


class ScoreStore:
    """Score store under `root` (default `cache_dir()/scores`); safe for concurrent processes."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else cache_dir() / "scores"
        self.root.mkdir(parents=True, exist_ok=True)
        remove_stale_tmp(self.root, 3600.0, "*/*/.*.tmp")  # parts of writers killed mid-write (live ones are new)

    def __repr__(self) -> str:
        return f"ScoreStore({str(self.root)!r})"

    def folder(self, key: str) -> Path:
        """The folder holding one key's parts (named by the scorer, then the key's hash)."""
        scorer = key.split("@", 1)[0].split("|", 1)[0] or "_"
        scorer = "".join(c if c.isalnum() or c in "-_." else "_" for c in scorer)
        return self.root / scorer / hashlib.sha256(key.encode()).hexdigest()[:24]

    def _parts(self, key: str) -> list[Path]:
        return sorted(self.folder(key).glob("part-*.parquet"))

    def _read(self, key: str, columns: list[str] | None = None) -> pl.DataFrame | None:
        # a part may vanish between listing and reading (compact() in another process): list again
        for attempt in range(_RETRIES):
            parts = self._parts(key)
            if not parts:
                return None
            try:
                frames = [f for p in parts if (f := _read_part(p, columns)) is not None]
            except FileNotFoundError:
                time.sleep(0.05 * (attempt + 1))
                continue
            return pl.concat(frames, how="diagonal_relaxed") if frames else None
        raise RuntimeError(f"score store {self.folder(key)} kept changing while being read")

    def ids(self, key: str) -> set[str]:
        """Every record id stored under `key`."""
        df = self._read(key, ["id"])
        return set() if df is None else set(df["id"].to_list())

    def missing(self, key: str, ids: list[str]) -> list[str]:
        """The ids (in the given order, each once) that have no stored value under `key`."""
        have = self.ids(key)
        seen: set[str] = set()
        out = []
        for i in ids:
            if i not in have and i not in seen:
                seen.add(i)
                out.append(i)
        return out

    def put(self, key: str, df: pl.DataFrame) -> Path | None:
        """Store one batch (`id` + columns) as a new part file, atomically; returns its path."""
        if "id" not in df.columns:
            raise ValueError("score store: a batch to put needs an 'id' column")
        if df.height == 0:
            return None
        folder = self.folder(key)
        folder.mkdir(parents=True, exist_ok=True)
        meta = folder / "key.json"
        if not meta.exists():
            with atomic_path(meta) as tmp:
                tmp.write_bytes(orjson.dumps({"key": key, "columns": [c for c in df.columns if c != "id"]}))
        path = folder / f"part-{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}.parquet"
        with atomic_path(path) as tmp:
            df.write_parquet(tmp, compression="zstd")
        return path

    def get(self, key: str, ids: list[str]) -> pl.DataFrame:
        """Stored rows for `ids`, in that order (duplicates repeated); KeyError if any id is missing."""
        df = self._read(key)
        want = pl.DataFrame({"id": ids}, schema={"id": pl.String})
        if df is None:
            if ids:
                raise KeyError(f"score store has nothing under key {key!r}")
            return want
        df = df.unique(subset="id", keep="last", maintain_order=True)
        out = want.join(df, on="id", how="left", maintain_order="left")
        have = set(df["id"].to_list())
        lost = [i for i in ids if i not in have]
        if lost:
            raise KeyError(f"{len(lost)} ids have no stored value under key {key!r} (first: {lost[0]})")
        return out

    def compact(self, key: str) -> int:
        """Merge a key's parts into one (fewer files to list); returns the number of parts merged.

        Safe with concurrent writers (their new parts are not touched) and readers (they re-list).
        """
        parts = self._parts(key)
        if len(parts) < 2:
            return 0
        frames = []
        for p in parts:
            try:
                if (frame := _read_part(p)) is not None:
                    frames.append(frame)
            except FileNotFoundError:  # another compaction got there first
                return 0
        if not frames:
            return 0
        df = pl.concat(frames, how="diagonal_relaxed").unique(subset="id", keep="last", maintain_order=True)
        self.put(key, df)
        for p in parts:
            try:
                p.unlink()
            except FileNotFoundError:
                pass
        return len(parts)

    def keys(self) -> list[str]:
        """Every key in the store (from key.json)."""
        out = []
        for meta in sorted(self.root.glob("*/*/key.json")):
            try:
                out.append(orjson.loads(meta.read_bytes())["key"])
            except (OSError, orjson.JSONDecodeError, KeyError):
                continue
        return out
