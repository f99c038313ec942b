"""`curate inspect`: what is in a dataset or a run, at a glance."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path, PurePath

import polars as pl
from rich.console import Console, Group, RenderableType
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from curate.run import Run


def short_names(paths: list[str]) -> tuple[str, dict[str, str]]:
    """(the folder the inputs share, each input's name below it), so a table shows whole, distinct names.

    A single input is named by its file name; hub names and paths outside the shared folder stay as given.
    """
    local = [p for p in paths if os.path.isabs(p) or os.path.exists(p) or p.startswith(".")]
    if not local:
        return "", {p: p for p in paths}
    parents = [str(PurePath(p).parent) for p in local]
    try:
        common = os.path.commonpath(parents) if len({os.path.isabs(p) for p in local}) == 1 else ""
    except ValueError:
        common = ""
    names = {}
    for p in paths:
        names[p] = os.path.relpath(p, common) if common and p in local else p
    return common, names


def input_table(manifest: dict, title: str) -> RenderableType:
    """Per-input counts with short, whole names, under a line naming the folder they share."""
    inputs = manifest.get("inputs", {})
    common, names = short_names(list(inputs))
    # cells are escaped: rich reads `[...]` as markup, so `data[v2].jsonl` showed as `data.jsonl`, `[red]a` in red
    t = Table("input", "rows", "records", "duplicates", "rejected", "formats", title=escape(title))
    t.columns[0].overflow = "fold"
    t.columns[5].overflow = "fold"
    for path, e in inputs.items():
        rej = ", ".join(f"{k}:{v}" for k, v in e.get("rejected", {}).items()) or "0"
        fm = ", ".join(f"{k}:{v}" for k, v in e.get("formats", {}).items())
        t.add_row(escape(names[path]), f"{e['rows']:,}", f"{e['records'] - e.get('duplicates', 0):,}",
                  f"{e.get('duplicates', 0):,}", rej, fm)
    if common in ("", "."):
        return t
    return Group(Text(f"inputs in {common}/", no_wrap=True, overflow="ignore"), t)


def _lengths(df: pl.DataFrame, console: Console) -> None:
    t = Table("column", "min", "p25", "median", "p75", "p95", "max", title="lengths (characters / tokens)")
    for col in ("instruction_chars", "response_chars", "n_tokens", "n_turns"):
        s = df[col]
        qs = [s.min(), s.quantile(0.25), s.median(), s.quantile(0.75), s.quantile(0.95), s.max()]
        t.add_row(col, *(f"{q:,.0f}" if q is not None else "-" for q in qs))
    console.print(t)


def _rejects(path: Path, console: Console) -> None:
    if not path.exists():
        return
    rej = pl.read_parquet(path, glob=False)  # glob=False: a '[' in a folder name is not a pattern
    if rej.is_empty():
        console.print("rejects: none")
        return
    t = Table("reason", "rows", "example (source:row)", title="rejects by reason")
    t.columns[2].overflow = "fold"
    _, names = short_names(rej["source"].unique().to_list())
    for reason, n, src, row in (rej.group_by("reason").agg(pl.len(), pl.first("source"), pl.first("row"))
                                .sort("len", descending=True).iter_rows()):
        t.add_row(escape(reason), f"{n:,}", escape(f"{names[src]}:{row}"))
    console.print(t)


def stage_table(manifest: dict) -> Table:
    """Rows in / out / dropped and seconds per stage."""
    t = Table("stage", "in", "out", "dropped", "seconds", title="stages")
    t.columns[3].overflow = "fold"
    for name, s in manifest.get("stages", {}).items():
        dropped = ", ".join(f"{k}:{v:,}" if isinstance(v, int) else f"{k}:{v}" for k, v in s.get("dropped", {}).items())
        t.add_row(name, f"{s['rows_in']:,}", f"{s['rows_out']:,}", dropped, f"{s['seconds']:.1f}")
    return t


def inspect_run(run_dir: Path, console: Console, title: str | None = None) -> None:
    """Inputs, stages, lengths, rejects and decisions of a run folder, as tables."""
    run = Run(run_dir)
    m = run.manifest
    console.print(input_table(m, title or f"run {run_dir}"))
    console.print(stage_table(m))
    if run.file("records.parquet").exists():
        _lengths(pl.read_parquet(run.file("records.parquet"), glob=False), console)
    _rejects(run.file("rejects.parquet"), console)
    if run.file("decisions.parquet").exists():
        d = pl.read_parquet(run.file("decisions.parquet"), columns=["status", "reason"], glob=False)
        dt = Table("status", "reason", "rows", title="decisions")
        for status, reason, n in d.group_by("status", "reason").len().sort("status", "reason").iter_rows():
            dt.add_row(status, escape(reason), str(n))
        console.print(dt)


def inspect_path(path: Path, console: Console) -> None:
    """A run folder is summarised from its manifest; anything else is ingested into a temporary run."""
    if (path / "manifest.json").exists():
        inspect_run(path, console)
        return
    from curate.ingest import dedup, ingest

    with tempfile.TemporaryDirectory(prefix="curate-inspect-") as tmp:
        run = Run(tmp)
        ingest(run, [str(path)])
        dedup(run, require_records=False)
        inspect_run(Path(tmp), console, title=str(path))
