"""`curate inspect`: what is in a dataset or a run, at a glance."""

from __future__ import annotations

import tempfile
from pathlib import Path

import polars as pl
from rich.console import Console
from rich.table import Table

from curate.run import Run


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
    rej = pl.read_parquet(path)
    if rej.is_empty():
        console.print("rejects: none")
        return
    t = Table("reason", "rows", "example (source:row)", title="rejects by reason")
    for reason, n, src, row in (rej.group_by("reason").agg(pl.len(), pl.first("source"), pl.first("row"))
                                .sort("len", descending=True).iter_rows()):
        t.add_row(reason, str(n), f"{src}:{row}")
    console.print(t)


def inspect_run(run_dir: Path, console: Console) -> None:
    run = Run(run_dir)
    m = run.manifest
    t = Table("input", "rows", "records", "duplicates", "rejected", "formats", title=f"run {run_dir}")
    for path, e in m.get("inputs", {}).items():
        t.add_row(path, str(e["rows"]), str(e["records"]), str(e.get("duplicates", 0)),
                  str(sum(e.get("rejected", {}).values())),
                  ", ".join(f"{k}:{v}" for k, v in e.get("formats", {}).items()))
    console.print(t)
    st = Table("stage", "in", "out", "dropped", "seconds", title="stages")
    for name, s in m.get("stages", {}).items():
        st.add_row(name, str(s["rows_in"]), str(s["rows_out"]),
                   ", ".join(f"{k}:{v}" for k, v in s.get("dropped", {}).items()), f"{s['seconds']:.1f}")
    console.print(st)
    if run.file("records.parquet").exists():
        _lengths(pl.read_parquet(run.file("records.parquet")), console)
    _rejects(run.file("rejects.parquet"), console)
    if run.file("decisions.parquet").exists():
        d = pl.read_parquet(run.file("decisions.parquet"), columns=["status", "reason"])
        dt = Table("status", "reason", "rows", title="decisions")
        for status, reason, n in d.group_by("status", "reason").len().sort("status", "reason").iter_rows():
            dt.add_row(status, reason, str(n))
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
        inspect_run(Path(tmp), console)
