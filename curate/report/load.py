"""Reading a run folder into one pool table (the report's only view of the run), plus row texts on demand.

Only the columns a section needs are read: records.parquet holds whole conversations, and at a million rows
the texts are read for the few ids the page shows (examples, extremes, duplicate pairs), never for all.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.parquet as pq

POOL, SUBSET, RANDOM = "#a7b1c2", "#2563eb", "#f59e0b"
STATUS_COLORS = {
    "selected": SUBSET, "not_selected": POOL, "rejected": "#dc2626",
    "duplicate": "#ea580c", "semantic_duplicate": "#9333ea",
}
#: statuses of rows that never reached the pool (they have no record, hence no scores or cluster)
NOT_IN_POOL = ("rejected", "duplicate")
#: numeric columns that are bookkeeping, not scores
NOT_SCORES = {"row", "cluster", "rank_in_cluster", "n_turns", "n_chars", "instruction_chars",
              "response_chars", "n_tokens", "x", "y", "selected", "in_pool", "similarity", "distance"}
RECORD_COLUMNS = ("id", "source", "row", "format", "n_turns", "n_chars", "n_tokens")


class ReportError(ValueError):
    """The run folder cannot be reported on (missing, or holds none of the run files)."""


# ----------------------------------------------------------------------------------------- loading


def _read(path: Path, columns: Sequence[str] | None = None) -> pl.DataFrame | None:
    """Read the wanted columns that exist (records.parquet holds full conversations: skip them)."""
    if not path.exists():
        return None
    names = pq.read_schema(path).names
    cols = [c for c in (columns or names) if c in names and c != "messages"]
    return pl.read_parquet(path, columns=cols)


@dataclass
class RunData:
    """What the report knows about a run; every field but `name` may be missing."""

    name: str
    manifest: dict[str, Any]
    pool: pl.DataFrame | None  # one row per pool record: source, selected, cluster?, scores...
    decisions: pl.DataFrame | None
    map2d: pl.DataFrame | None
    notes: list[str] = field(default_factory=list)
    subset_only: bool = False  # the pool is unknown: `pool` holds the subset alone
    path: Path | None = None
    scores: list[str] | None = None  # score columns named by scores.parquet (None: guess from dtypes)
    eval: dict[str, Any] | None = None  # RUN/eval.json, as written by the evaluation


def load_run(run_dir: Path) -> RunData:
    """Gather what the run folder has into one pool table (selected flag, cluster, scores, lengths)."""
    notes: list[str] = []
    manifest: dict[str, Any] = {}
    mpath = run_dir / "manifest.json"
    if mpath.exists():
        try:
            manifest = json.loads(mpath.read_text())
        except json.JSONDecodeError as e:
            notes.append(f"manifest.json is not valid JSON ({e}); manifest sections are left out.")
    records = _read(run_dir / "records.parquet", RECORD_COLUMNS)
    decisions = _read(run_dir / "decisions.parquet")
    selected = _read(run_dir / "selected.parquet")
    map2d = _read(run_dir / "map2d.parquet", ("id", "x", "y"))
    if not manifest and records is None and decisions is None and selected is None:
        raise ReportError(f"{run_dir} holds no manifest.json, records, decisions or selected.parquet")

    pool: pl.DataFrame | None = None
    if decisions is not None and "status" in decisions.columns:
        pool = decisions.filter(~pl.col("status").is_in(NOT_IN_POOL))
        pool = pool.with_columns((pl.col("status") == "selected").alias("selected"))
        if records is not None and {"source", "row"} <= set(pool.columns) and "n_tokens" not in pool.columns:
            extra = [c for c in records.columns if c not in pool.columns or c in ("source", "row")]
            pool = pool.join(records.select(extra), on=["source", "row"], how="left")
    elif records is not None:
        notes.append("decisions.parquet is missing: the pool is records.parquet, scores come from the subset.")
        ids = set(selected["id"].to_list()) if selected is not None and "id" in selected.columns else set()
        pool = records.with_columns(pl.col("id").is_in(list(ids)).alias("selected"))
        if selected is not None:
            extra = [c for c in selected.columns if c not in pool.columns or c == "id"]
            pool = pool.join(selected.select(extra).unique("id"), on="id", how="left")
    elif selected is not None:
        notes.append("Only selected.parquet is present: pool figures are left out.")
        pool = selected.with_columns(pl.lit(True).alias("selected"))
    scores = None
    if (run_dir / "scores.parquet").exists():
        scores = [c for c in pq.read_schema(run_dir / "scores.parquet").names if c != "id"]
    ev = None
    if (run_dir / "eval.json").exists():
        try:
            ev = json.loads((run_dir / "eval.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            notes.append(f"eval.json is not valid JSON ({e}); the evaluation section is left out.")
        if ev is not None and not isinstance(ev, dict):
            notes.append("eval.json does not hold a JSON object; the evaluation section is left out.")
            ev = None
    return RunData(run_dir.name, manifest, pool, decisions, map2d, notes,
                   subset_only=decisions is None and records is None, path=run_dir, scores=scores, eval=ev)


def score_columns(df: pl.DataFrame, named: Sequence[str] | None = None) -> list[str]:
    """Numeric score columns: those scores.parquet names when known, else every numeric non-bookkeeping column."""
    return [c for c, t in df.schema.items() if t.is_numeric() and c not in NOT_SCORES
            and (named is None or c in named)]


def flag_columns(df: pl.DataFrame) -> list[str]:
    """Boolean heuristic flags (`heur_<flag>`, as scorers/heuristics.py writes them)."""
    return [c for c, t in df.schema.items() if c.startswith("heur_") and t == pl.Boolean]


TEXT_COLUMNS = ("instruction", "response")


def _text_file(d: RunData) -> Path | None:
    """records.parquet, or the subset when that is all there is, if it has ids and texts."""
    for name in ("records.parquet", "selected.parquet"):
        path = d.path / name if d.path else None
        if path is not None and path.exists():
            names = pq.read_schema(path).names
            if "id" in names and any(c in names for c in TEXT_COLUMNS):
                return path
    return None


def has_texts(d: RunData) -> bool:
    return _text_file(d) is not None


def texts(d: RunData, ids: Iterable[Any]) -> dict[str, dict[str, str]]:
    """{id: {"instruction": ..., "response": ...}} for the given ids, read from records.parquet (or the
    subset when that is all there is); only the matching rows' texts are kept in memory."""
    want = sorted({str(i) for i in ids if i is not None})
    path = _text_file(d)
    if not want or path is None:
        return {}
    cols = [c for c in TEXT_COLUMNS if c in pq.read_schema(path).names]
    df = pl.scan_parquet(path).select("id", *cols).filter(pl.col("id").is_in(want)).unique("id").collect()
    return {r["id"]: {c: r.get(c) or "" for c in TEXT_COLUMNS} for r in df.iter_rows(named=True)}

