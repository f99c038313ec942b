"""`curate report RUN`: one self-contained HTML file that explains a run's subset.

Everything is inline SVG drawn here (plus a few lines of JS to sort tables): the file opens offline,
needs no CDN or plotting package, and stays small (a 20k-point map is one SVG path per layer, ~0.3 MB).
Every section reads only the files it needs and says so when they are missing, so a half-finished run
(no scores, no map, no decisions) still gets a report.
"""

from __future__ import annotations

import html
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from curate.run import atomic_path

POOL, SUBSET, RANDOM = "#a7b1c2", "#2563eb", "#f59e0b"
STATUS_COLORS = {
    "selected": SUBSET, "not_selected": POOL, "rejected": "#dc2626",
    "duplicate": "#ea580c", "semantic_duplicate": "#9333ea",
}
#: statuses of rows that never reached the pool (they have no record, hence no scores or cluster)
NOT_IN_POOL = ("rejected", "duplicate")
#: numeric columns that are bookkeeping, not scores
NOT_SCORES = {"row", "cluster", "rank_in_cluster", "n_turns", "n_chars", "instruction_chars",
              "response_chars", "n_tokens", "x", "y", "selected", "in_pool"}
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
    name: str
    manifest: dict[str, Any]
    pool: pl.DataFrame | None  # one row per pool record: source, selected, cluster?, scores...
    decisions: pl.DataFrame | None
    map2d: pl.DataFrame | None
    notes: list[str] = field(default_factory=list)
    subset_only: bool = False  # the pool is unknown: `pool` holds the subset alone


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
    return RunData(run_dir.name, manifest, pool, decisions, map2d, notes,
                   subset_only=decisions is None and records is None)


def score_columns(df: pl.DataFrame) -> list[str]:
    return [c for c, t in df.schema.items() if t.is_numeric() and c not in NOT_SCORES]


# ------------------------------------------------------------------------------------------ format


def esc(v: Any) -> str:
    return html.escape(str(v), quote=True)


def fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    if isinstance(v, (float, np.floating)):
        v = float(v)
        return f"{v:,.0f}" if abs(v) >= 1e4 else f"{v:.4g}"
    return esc(v)


def pct(a: float, b: float) -> str:
    return f"{100 * a / b:.1f}%" if b else "–"


def nice_ticks(lo: float, hi: float, n: int = 5, *, extend: bool = False) -> list[float]:
    """Round tick values (steps of 1, 2 or 5 x 10^k) inside [lo, hi]; `extend` adds one tick >= hi,
    so a value axis can end on a labelled tick."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    count = (math.ceil if extend else math.floor)((hi - first) / step - (1e-9 if extend else -1e-9))
    return [round(first + i * step, 12) for i in range(int(count) + 1)]


def tick_label(v: float) -> str:
    if v == int(v) and abs(v) < 1e15:
        iv = int(v)
        return f"{iv / 1e6:g}M" if abs(iv) >= 1e6 else f"{iv / 1e3:g}k" if abs(iv) >= 1e4 else str(iv)
    return f"{v:.3g}"


def short_names(paths: Sequence[str]) -> dict[str, str]:
    """File names when they are unique, full paths otherwise (a source is its input path)."""
    names = {p: Path(p).name or p for p in paths}
    return names if len(set(names.values())) == len(names) else {p: p for p in paths}


def table(head: Sequence[str], rows: Sequence[Sequence[Any]], cls: str = "") -> str:
    """A sortable table; cells are formatted by `fmt`, numbers carry data-v for sorting."""
    th = "".join(f"<th>{esc(h)}</th>" for h in head)
    body = []
    for r in rows:
        tds = []
        for v in r:
            if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool):
                num = float(v)
                tds.append(f'<td class="n" data-v="{num if math.isfinite(num) else ""}">{fmt(v)}</td>')
            else:
                tds.append(f"<td>{v if isinstance(v, Raw) else fmt(v)}</td>")
        body.append("<tr>" + "".join(tds) + "</tr>")
    return f'<table class="sortable {cls}"><thead><tr>{th}</tr></thead><tbody>{"".join(body)}</tbody></table>'


class Raw(str):
    """Already-escaped HTML for a table cell."""


# --------------------------------------------------------------------------------------------- svg


def _svg(w: int, h: int, body: str, label: str) -> str:
    return (f'<svg class="plot" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}" width="{w}" '
            f'height="{h}" role="img" aria-label="{esc(label)}">{body}</svg>')


def legend(items: Sequence[tuple[str, str]]) -> str:
    return '<div class="legend">' + "".join(
        f'<span><i style="background:{c}"></i>{esc(n)}</span>' for n, c in items) + "</div>"


def hbars(labels: Sequence[str], series: Sequence[tuple[str, Sequence[float], str]], *,
          titles: Sequence[str] | None = None, stacked: bool = False, width: int = 760) -> str:
    """Horizontal bars: one group per label, one bar per series (or stacked segments)."""
    if not labels:
        return ""
    lab_w = min(260, 12 + 7 * max(len(s) for s in labels))
    bar_h = 14 if stacked or len(series) == 1 else 9
    group_h = (bar_h if stacked else bar_h * len(series)) + 8
    top, bottom, right = 6, 22, 60
    h = top + group_h * len(labels) + bottom
    totals = [sum(s[1][i] for s in series) for i in range(len(labels))] if stacked else []
    vmax = max(totals) if stacked else max((max(s[1]) for s in series if len(s[1])), default=1)
    vmax = vmax or 1
    ticks = nice_ticks(0, vmax, extend=True)
    vmax = max(vmax, ticks[-1])
    plot_w = width - lab_w - right
    sx = plot_w / vmax
    out = []
    for t in ticks:
        x = lab_w + t * sx
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{h - bottom}" class="grid"/>'
                   f'<text x="{x:.1f}" y="{h - 6}" class="tick" text-anchor="middle">{tick_label(t)}</text>')
    for i, lab in enumerate(labels):
        y0 = top + i * group_h + 4
        tip = titles[i] if titles else lab
        out.append(f'<text x="{lab_w - 6}" y="{y0 + (group_h - 8) / 2 + 4:.1f}" class="lab" '
                   f'text-anchor="end"><title>{esc(tip)}</title>{esc(lab[:40])}</text>')
        x = float(lab_w)
        for j, (name, vals, color) in enumerate(series):
            v = float(vals[i])
            y = y0 if stacked else y0 + j * bar_h
            bw = v * sx
            out.append(f'<rect x="{x:.1f}" y="{y}" width="{max(bw, 0):.1f}" height="{bar_h - 1}" '
                       f'fill="{color}"><title>{esc(tip)} · {esc(name)}: {fmt(vals[i])}</title></rect>')
            if stacked:
                x += bw
            else:
                out.append(f'<text x="{lab_w + bw + 4:.1f}" y="{y + bar_h - 2}" class="val">{fmt(vals[i])}</text>')
        if stacked:
            out.append(f'<text x="{x + 4:.1f}" y="{y0 + bar_h - 3}" class="val">{fmt(totals[i])}</text>')
    return _svg(width, h, "".join(out), "bar chart")


def _axes(x0: float, y0: float, x1: float, y1: float, xt: list[float], yt: list[float], sx: Any, sy: Any,
          ylab: Any = tick_label, xlab: Any = tick_label) -> list[str]:
    out = [f'<line x1="{x0}" x2="{x1}" y1="{y1}" y2="{y1}" class="axis"/>']
    for t in yt:
        y = sy(t)
        out.append(f'<line x1="{x0}" x2="{x1}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                   f'<text x="{x0 - 4}" y="{y + 3:.1f}" class="tick" text-anchor="end">{ylab(t)}</text>')
    for t in xt:
        x = sx(t)
        out.append(f'<text x="{x:.1f}" y="{y1 + 13}" class="tick" text-anchor="middle">{xlab(t)}</text>')
    return out


def cluster_columns(pool: Sequence[int], sub: Sequence[int], ids: Sequence[Any], width: int = 900) -> str:
    """Clusters sorted by pool size; pool bar behind, subset bar in front.

    Heavy-tailed sizes (largest > 30x the median, common with k-means on real pools) get a log axis,
    or the small clusters would be invisible.
    """
    n = len(pool)
    if not n:
        return ""
    h, left, top, bottom = 226, 46, 8, 32
    pw, ph = width - left - 24, h - top - bottom
    top_v = max(pool) or 1
    log = top_v > 30 * max(float(np.median(pool)), 1.0)
    if log:
        yt = [10.0**e for e in range(0, math.ceil(math.log10(top_v)) + 1)]
        ymax = math.log10(1 + yt[-1])
        def sy(v: float) -> float:  # log(1 + v): a cluster with one selected row still shows
            return top + ph - math.log10(1 + v) * ph / ymax
    else:
        yt = nice_ticks(0, top_v, extend=True)
        ymax = max(yt[-1], top_v)
        def sy(v: float) -> float:
            return top + ph - v * ph / ymax
    step = pw / n
    xt = [t - 1 for t in nice_ticks(1, n) if t >= 1]  # 1-based ranks
    out = _axes(left, top, left + pw, top + ph, xt, yt, lambda t: left + (t + 0.5) * step, sy,
                xlab=lambda t: tick_label(t + 1))
    if n <= 300:  # one rect per cluster, with a tooltip
        for i in range(n):
            x = left + i * step
            w = max(step - (1 if step > 3 else 0), 0.5)
            tip = f"cluster {ids[i]}: pool {pool[i]:,}, subset {sub[i]:,} ({pct(sub[i], pool[i])})"
            out.append(f'<g><title>{esc(tip)}</title><rect x="{x:.1f}" y="{sy(pool[i]):.1f}" width="{w:.2f}" '
                       f'height="{ph + top - sy(pool[i]):.1f}" fill="{POOL}"/><rect x="{x:.1f}" '
                       f'y="{sy(sub[i]):.1f}" width="{w:.2f}" height="{ph + top - sy(sub[i]):.1f}" '
                       f'fill="{SUBSET}"/></g>')
    else:  # thousands of clusters: two step areas keep the file small
        for vals, color in ((pool, POOL), (sub, SUBSET)):
            d = [f"M{left} {top + ph}"]
            for i, v in enumerate(vals):
                d.append(f"V{sy(v):.1f}H{left + (i + 1) * step:.1f}")
            d.append(f"V{top + ph}Z")
            out.append(f'<path d="{"".join(d)}" fill="{color}"/>')
    out.append(f'<text x="{left + pw / 2}" y="{h - 1}" class="tick" text-anchor="middle">'
               f'clusters ranked by pool size{" (log scale)" if log else ""}</text>')
    return _svg(width, h, "".join(out), "rows per cluster")


def histogram(pool: np.ndarray, sub: np.ndarray, name: str, width: int = 430) -> str:
    """Share of rows per bin, pool vs subset on shared bins (0.5-99.5% range; outliers go to the edges)."""
    ref = pool if len(pool) else sub
    if not len(ref):
        return ""
    distinct = np.unique(ref)
    if len(distinct) <= 30 and np.all(distinct == np.round(distinct)):
        edges = np.arange(distinct.min() - 0.5, distinct.max() + 1.5)  # one bin per integer value
    else:
        lo, hi = np.quantile(ref, [0.005, 0.995])
        if hi <= lo:
            lo, hi = float(ref.min()) - 0.5, float(ref.max()) + 0.5
        edges = np.linspace(lo, hi, 31)
    def share(v: np.ndarray) -> np.ndarray:
        if not len(v):
            return np.zeros(len(edges) - 1)
        c, _ = np.histogram(np.clip(v, edges[0], edges[-1]), edges)
        return c / len(v)
    hp, hs = share(pool), share(sub)
    h, left, top, bottom = 196, 44, 8, 32
    pw, ph = width - left - 10, h - top - bottom
    ymax = max(hp.max(), hs.max()) or 1
    yt = nice_ticks(0, ymax, 4, extend=True)
    ymax = max(ymax, yt[-1])
    def sx(v: float) -> float:
        return left + (v - edges[0]) * pw / (edges[-1] - edges[0])
    def sy(v: float) -> float:
        return top + ph - v * ph / ymax
    out = _axes(left, top, left + pw, top + ph, nice_ticks(edges[0], edges[-1], 5), yt, sx, sy,
                lambda t: f"{100 * t:.0f}%" if ymax >= 0.05 else f"{100 * t:.1f}%")
    for vals, color, style in ((hp, POOL, f'fill="{POOL}" fill-opacity="0.8"'),
                               (hs, SUBSET, f'fill="{SUBSET}" fill-opacity="0.15" stroke="{SUBSET}" '
                                            f'stroke-width="1.5"')):
        if not vals.any() and color == SUBSET and not len(sub):
            continue
        d = [f"M{sx(edges[0]):.1f} {sy(0):.1f}"]
        for i, v in enumerate(vals):
            d.append(f"V{sy(v):.1f}H{sx(edges[i + 1]):.1f}")
        d.append(f"V{sy(0):.1f}Z")
        out.append(f'<path d="{"".join(d)}" {style}/>')
    out.append(f'<text x="{left + pw / 2}" y="{h - 1}" class="tick" text-anchor="middle">{esc(name)}</text>')
    return _svg(width, h, "".join(out), f"histogram of {name}")


def scatter(x: np.ndarray, y: np.ndarray, sel: np.ndarray, size: int = 640) -> str:
    """Pool dots in grey, subset dots on top; each layer is one path of zero-length round-capped strokes."""
    if not len(x):
        return ""
    pad = 10
    def scale(v: np.ndarray) -> np.ndarray:
        lo, hi = np.quantile(v, [0.001, 0.999])
        span = (hi - lo) or 1.0
        return pad + np.clip((v - lo) / span, 0, 1) * (size - 2 * pad)
    px, py = scale(x), size - scale(y)
    out = []
    for mask, color, w in ((~sel, POOL, 3), (sel, SUBSET, 3.5)):
        pts = "".join(f"M{a:.1f} {b:.1f}h0" for a, b in zip(px[mask], py[mask], strict=True))
        if pts:
            out.append(f'<path d="{pts}" stroke="{color}" stroke-width="{w}" stroke-linecap="round" '
                       f'stroke-opacity="{0.55 if color == POOL else 0.85}" fill="none"/>')
    return _svg(size, size, f'<rect width="{size}" height="{size}" class="frame"/>' + "".join(out), "2-D map")


# ---------------------------------------------------------------------------------------- sections


def _section(title: str, body: str, sid: str) -> str:
    return f'<section id="{sid}"><h2>{esc(title)}</h2>{body}</section>'


def _missing(what: str) -> str:
    return f'<p class="missing">{esc(what)}</p>'


def sec_summary(d: RunData) -> str:
    m, pool, dec = d.manifest, d.pool, d.decisions
    cards = []
    if dec is not None:
        cards.append(("input rows", fmt(dec.height)))
    elif m.get("inputs"):
        cards.append(("input rows", fmt(sum(int(v.get("rows", 0)) for v in m["inputs"].values()))))
    if pool is not None and d.subset_only:
        cards.append(("selected rows", fmt(pool.height)))
    elif pool is not None:
        n_sel = int(pool["selected"].sum())
        cards.append(("pool rows", fmt(pool.height)))
        cards.append(("selected rows", f"{fmt(n_sel)} <small>({pct(n_sel, pool.height)})</small>"))
        if "n_tokens" in pool.columns:
            tok = pool["n_tokens"].fill_null(0)
            sel_tok = int(tok.filter(pool["selected"]).sum())
            cards.append(("selected tokens", f"{fmt(sel_tok)} <small>({pct(sel_tok, int(tok.sum()))})</small>"))
        if "cluster" in pool.columns:
            cl = pool.filter(pl.col("cluster").is_not_null() & (pl.col("cluster") != -1))
            n_cl = cl["cluster"].n_unique()
            cov = cl.filter(pl.col("selected"))["cluster"].n_unique()
            cards.append(("clusters covered", f"{fmt(cov)} / {fmt(n_cl)}"))
    html_cards = "".join(f'<div class="card"><div class="k">{esc(k)}</div><div class="v">{v}</div></div>'
                         for k, v in cards)
    notes = "".join(f'<p class="missing">{esc(n)}</p>' for n in d.notes)
    return f'<div class="cards">{html_cards}</div>{notes}'


def sec_funnel(d: RunData) -> str:
    stages = d.manifest.get("stages") or {}
    parts = []
    if stages:
        names = list(stages)
        rin = [int(stages[s].get("rows_in", 0)) for s in names]
        rout = [int(stages[s].get("rows_out", 0)) for s in names]
        parts.append(legend([("rows in", POOL), ("rows out", SUBSET)]))
        parts.append(hbars(names, [("rows in", rin, POOL), ("rows out", rout, SUBSET)]))
        rows = []
        for s in names:
            e = stages[s]
            dropped = e.get("dropped") or {}
            drop = ", ".join(f"{esc(k)}: {fmt(v)}" for k, v in dropped.items()) or "–"
            rows.append([s, e.get("rows_in"), e.get("rows_out"), sum(dropped.values()), Raw(drop),
                         e.get("seconds")])
        total = sum(float(stages[s].get("seconds") or 0) for s in names)
        parts.append(table(["stage", "rows in", "rows out", "dropped", "dropped by reason", "seconds"], rows))
        parts.append(f"<p>Total stage time: {total:.2f} s.</p>")
    else:
        parts.append(_missing("The manifest has no stages."))
    inputs = d.manifest.get("inputs") or {}
    if inputs:
        names = short_names(list(inputs))
        rows = []
        for p, e in inputs.items():
            rej = e.get("rejected") or {}
            forms = ", ".join(f"{esc(k)}: {fmt(v)}" for k, v in (e.get("formats") or {}).items())
            rows.append([Raw(f'<span title="{esc(p)}">{esc(names[p])}</span>'), e.get("rows"),
                         e.get("records"), sum(rej.values()), e.get("duplicates"), Raw(forms or "–"),
                         Raw(f'<code>{esc(str(e.get("sha256", ""))[:12])}</code>')])
        parts.append("<h3>Inputs</h3>" + table(
            ["input", "rows", "records", "rejected", "duplicates", "formats", "sha256"], rows))
    return "".join(parts)


def sec_reasons(d: RunData) -> str:
    dec = d.decisions
    parts = []
    if dec is not None and {"status", "reason"} <= set(dec.columns):
        g = (dec.group_by("status", "reason").len().sort("len", descending=True))
        labels = [str(r) for r in g["reason"].to_list()]
        statuses = [str(x) for x in g["status"].to_list()]
        # one stacked series per status: each bar then has exactly one non-zero segment, in its colour
        series = [(s, [n if st == s else 0 for st, n in zip(statuses, g["len"].to_list(), strict=True)],
                   STATUS_COLORS.get(s, "#64748b")) for s in dict.fromkeys(statuses)]
        parts.append("<h3>Final reason of every input row</h3>")
        parts.append(legend([(s, c) for s, _, c in series]))
        parts.append(hbars(labels, series, stacked=True))
        rej = dec.filter(pl.col("status") == "rejected").with_columns(
            pl.col("reason").str.replace(r"^rejected:", ""))
        rej_counts = dict(rej.group_by("reason").len().sort("len", descending=True).rows())
    else:
        rej_counts = {}
        for e in (d.manifest.get("inputs") or {}).values():
            for k, v in (e.get("rejected") or {}).items():
                rej_counts[k] = rej_counts.get(k, 0) + int(v)
        rej_counts = dict(sorted(rej_counts.items(), key=lambda kv: -kv[1]))
    parts.append("<h3>Rejected rows by reason</h3>")
    if rej_counts:
        parts.append(hbars(list(rej_counts), [("rejected", list(rej_counts.values()), STATUS_COLORS["rejected"])]))
    else:
        parts.append("<p>No rejected rows.</p>" if dec is not None or d.manifest.get("inputs")
                     else _missing("No decisions.parquet and no inputs in the manifest."))
    return "".join(parts)


def sec_sources(d: RunData) -> str:
    if d.pool is None or "source" not in d.pool.columns:
        return _missing("No per-source data (records, decisions or selected.parquet with a source column).")
    pool = d.pool
    has_tok = "n_tokens" in pool.columns
    aggs = [pl.len().alias("pool"), pl.col("selected").sum().alias("selected")]
    if has_tok:
        aggs += [pl.col("n_tokens").sum().alias("pool_tokens"),
                 pl.col("n_tokens").filter(pl.col("selected")).sum().alias("sel_tokens")]
    g = pool.group_by("source").agg(aggs).sort("pool", descending=True)
    if d.decisions is not None and "source" in d.decisions.columns:
        st = d.decisions.group_by("source").agg(
            pl.len().alias("input"),
            (pl.col("status") == "rejected").sum().alias("rejected"),
            (pl.col("status") == "duplicate").sum().alias("duplicate"),
            (pl.col("status") == "semantic_duplicate").sum().alias("semantic_duplicate"))
        g = g.join(st, on="source", how="left")
    srcs = [str(s) for s in g["source"].to_list()]
    names = short_names(srcs)
    chart = legend([("pool", POOL), ("subset", SUBSET)]) + hbars(
        [names[s] for s in srcs], [("pool", g["pool"].to_list(), POOL), ("subset", g["selected"].to_list(), SUBSET)],
        titles=srcs)
    head = ["source"]
    cols = []
    for c, label in (("input", "input rows"), ("rejected", "rejected"), ("duplicate", "duplicates"),
                     ("semantic_duplicate", "semantic dups"), ("pool", "pool"), ("selected", "selected")):
        if c in g.columns:
            head.append(label)
            cols.append(c)
    head.append("share selected")
    if has_tok:
        head += ["pool tokens", "selected tokens"]
    rows = []
    for r in g.iter_rows(named=True):
        row = [Raw(f'<span title="{esc(r["source"])}">{esc(names[str(r["source"])])}</span>')]
        row += [r[c] for c in cols] + [Raw(pct(r["selected"], r["pool"]))]
        if has_tok:
            row += [r["pool_tokens"], r["sel_tokens"]]
        rows.append(row)
    return chart + table(head, rows)


def sec_clusters(d: RunData) -> str:
    if d.pool is None or "cluster" not in d.pool.columns:
        return _missing("No cluster column in the decisions (the run was not clustered).")
    g = (d.pool.filter(pl.col("cluster").is_not_null())
         .group_by("cluster").agg(pl.len().alias("pool"), pl.col("selected").sum().alias("selected"))
         .sort(["pool", "cluster"], descending=[True, False]))
    if not g.height:
        return _missing("Every cluster label is null.")
    pool_n, sel_n = g["pool"].to_list(), g["selected"].to_list()
    share = g["selected"] / g["pool"]
    covered = int((g["selected"] > 0).sum())
    stats = table(["clusters", "covered by subset", "selected per cluster (min / median / max)",
                   "share selected per cluster (min / median / max)"],
                  [[g.height, Raw(f"{covered:,} ({pct(covered, g.height)})"),
                    Raw(f"{min(sel_n):,} / {float(np.median(sel_n)):g} / {max(sel_n):,}"),
                    Raw(f"{100 * share.min():.1f}% / {100 * share.median():.1f}% / {100 * share.max():.1f}%")]])
    top = g.head(25)
    rows = [[r["cluster"], r["pool"], r["selected"], Raw(pct(r["selected"], r["pool"]))]
            for r in top.iter_rows(named=True)]
    return (legend([("pool", POOL), ("subset", SUBSET)]) + cluster_columns(pool_n, sel_n, g["cluster"].to_list())
            + stats + f"<details><summary>Largest {top.height} clusters</summary>"
            + table(["cluster", "pool", "selected", "share"], rows) + "</details>")


def sec_scores(d: RunData) -> str:
    if d.pool is None:
        return _missing("No pool data.")
    cols = score_columns(d.pool)
    note = "" if cols else _missing("No score columns in the decisions or the subset (the run was not scored).")
    if "n_tokens" in d.pool.columns:
        cols.append("n_tokens")
    if not cols:
        return note
    figs, rows = [], []
    sel = d.pool["selected"].to_numpy()
    for c in cols:
        v = d.pool[c].cast(pl.Float64).to_numpy()
        ok = np.isfinite(v)
        pv, sv = v[ok], v[ok & sel]
        if not len(pv):
            rows.append([c, 0, 0, None, None, None, None])
            continue
        figs.append(f'<figure><figcaption>{esc(c)}</figcaption>{histogram(pv, sv, c)}</figure>')
        rows.append([c, len(pv), len(sv), float(np.mean(pv)), float(np.mean(sv)) if len(sv) else None,
                     float(np.median(pv)), float(np.median(sv)) if len(sv) else None])
    return (note + legend([("pool", POOL), ("subset", SUBSET)])
            + "<p><small>Share of rows per bin; bins span the pool's 0.5-99.5% range (one bin per value for "
              "small integers), rows outside it are counted in the edge bins.</small></p>"
            + '<div class="grid">' + "".join(figs) + "</div>"
            + table(["column", "pool rows", "subset rows", "pool mean", "subset mean", "pool median",
                     "subset median"], rows))


def sec_map(d: RunData, max_points: int, seed: int) -> str:
    if d.map2d is None or not {"id", "x", "y"} <= set(d.map2d.columns):
        return _missing("No map2d.parquet (id, x, y) in the run folder.")
    m = d.map2d.drop_nulls(["x", "y"])
    ids = set()
    if d.pool is not None and "id" in d.pool.columns:
        ids = set(d.pool.filter(pl.col("selected"))["id"].to_list())
    n = m.height
    if n > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(n, size=max_points, replace=False))
        m = m[keep]
    sel = m["id"].is_in(list(ids)).to_numpy()
    note = (f"<p>{fmt(m.height)} of {fmt(n)} points shown (uniform seeded sample); "
            f"{fmt(int(sel.sum()))} of them selected.</p>")
    return (legend([("pool", POOL), ("subset", SUBSET)]) + note
            + scatter(m["x"].cast(pl.Float64).to_numpy(), m["y"].cast(pl.Float64).to_numpy(), sel))


METRIC_HELP = {
    "vendi": "Vendi score (effective number of distinct rows; higher = more diverse)",
    "mean_nn_similarity": "mean nearest-neighbour cosine similarity (lower = less redundant)",
    "cluster_coverage": "share of pool clusters present (higher = broader)",
    "clusters": "clusters touched",
    "rows": "rows",
}


def sec_diversity(d: RunData, seed: int) -> str:
    div = d.manifest.get("diversity")
    if isinstance(div, dict) and any(isinstance(v, dict) for v in div.values()):
        std = div.get("random_std") if isinstance(div.get("random_std"), dict) else {}
        order = ["subset", "random", "pool"]
        sets = [k for k in order if isinstance(div.get(k), dict)]
        sets += [k for k, v in div.items() if isinstance(v, dict) and k not in sets and k != "random_std"]
        metrics: list[str] = []
        for k in sets:
            metrics += [mk for mk in div[k] if mk not in metrics]

        def cell(k: str, mk: str) -> Any:
            v = div[k].get(mk)
            if k == "random" and isinstance(std.get(mk), (int, float)) and isinstance(v, (int, float)):
                return Raw(f'<span data-v="{v}">{fmt(v)} <small>± {fmt(std[mk])}</small></span>')
            return v

        rows = [[Raw(f'{esc(mk)}<br><small>{esc(METRIC_HELP.get(mk, ""))}</small>')]
                + [cell(k, mk) for k in sets] for mk in metrics]
        colors = {"subset": SUBSET, "random": RANDOM, "pool": POOL}
        figs = []
        for mk in ("vendi", "mean_nn_similarity", "cluster_coverage"):
            vals = [(k, div[k][mk]) for k in sets if isinstance(div[k].get(mk), (int, float))]
            if vals:  # one chart per metric, a stacked series per set: a shared scale, one colour each
                series = [(k, [v if j == i else 0 for j in range(len(vals))], colors.get(k, "#64748b"))
                          for i, (k, v) in enumerate(vals)]
                figs.append(f"<figure><figcaption>{esc(METRIC_HELP[mk])}</figcaption>"
                            f"{hbars([k for k, _ in vals], series, stacked=True, width=440)}</figure>")
        n_rand = div.get("n_random", 1)
        head = ["metric"] + [f"random (mean of {n_rand} draws ± sd)" if k == "random" and std else k
                             for k in sets]
        scal = ", ".join(f"{esc(k)} = {fmt(v)}" for k, v in div.items() if not isinstance(v, dict))
        return ('<div class="grid">' + "".join(figs) + "</div>" + table(head, rows)
                + (f"<p>{scal}. Embedding metrics are computed on the same number of rows (sample) for the "
                   f"subset and the random subsets, so they compare.</p>" if scal else ""))
    # no embeddings-based metrics: cluster coverage can still be computed from the decisions
    if d.pool is None or "cluster" not in d.pool.columns:
        return _missing("manifest['diversity'] is absent and the run has no clusters.")
    from curate.diversity import cluster_coverage

    cl = d.pool["cluster"].to_numpy()
    sel = d.pool["selected"].to_numpy()
    k = int(sel.sum())
    rand = np.random.default_rng(seed).choice(len(cl), size=k, replace=False)
    sub_cov, rand_cov = cluster_coverage(cl[sel], cl), cluster_coverage(cl[rand], cl)
    return (_missing("manifest['diversity'] is absent (no Vendi score or nearest-neighbour similarity); "
                     "cluster coverage below is computed from the decisions.")
            + table(["metric", "subset", f"random subset (n={k:,}, seed {seed})"],
                    [["cluster_coverage", sub_cov, rand_cov]]))


def sec_config(d: RunData) -> str:
    parts = []
    for key in ("config", "versions"):
        if d.manifest.get(key):
            parts.append(f"<details><summary>{key}</summary><pre>"
                         f"{esc(json.dumps(d.manifest[key], indent=2, default=str))}</pre></details>")
    return "".join(parts) or _missing("The manifest has no config or versions.")


# -------------------------------------------------------------------------------------------- page

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#0f172a;background:#f8fafc}
header{background:#0f172a;color:#fff;padding:18px 28px}header h1{margin:0;font-size:20px}
header p{margin:4px 0 0;color:#cbd5e1}nav{padding:8px 28px;background:#e2e8f0}nav a{margin-right:14px;color:#1e40af}
main{padding:8px 28px 40px;max-width:1200px}section{background:#fff;border:1px solid #e2e8f0;border-radius:8px;
padding:8px 18px 16px;margin:16px 0}h2{font-size:17px}h3{font-size:14px;margin:14px 0 6px}
.cards{display:flex;flex-wrap:wrap;gap:10px}.card{border:1px solid #e2e8f0;border-radius:6px;padding:8px 14px}
.card .k{color:#64748b;font-size:12px}.card .v{font-size:20px;font-weight:600}
table{border-collapse:collapse;margin:10px 0;font-size:13px}th,td{padding:3px 10px;border-bottom:1px solid #e2e8f0;
text-align:left;vertical-align:top}th{cursor:pointer;background:#f1f5f9;user-select:none}td.n{text-align:right;
font-variant-numeric:tabular-nums}.missing{color:#92400e;background:#fffbeb;padding:6px 10px;border-radius:4px}
.legend span{margin-right:14px;font-size:12px}.legend i{display:inline-block;width:11px;height:11px;
margin-right:4px;vertical-align:-1px;border-radius:2px}.grid{display:flex;flex-wrap:wrap;gap:8px 24px}
figure{margin:6px 0}figcaption{font-weight:600;font-size:13px}svg.plot{max-width:100%;height:auto;display:block}
svg .grid{stroke:#e2e8f0}svg .axis{stroke:#94a3b8}svg .tick,svg .val{font-size:10px;fill:#475569}
svg .lab{font-size:11px;fill:#0f172a}svg .frame{fill:#fff;stroke:#e2e8f0}pre{font-size:12px;overflow:auto}
"""

JS = """
document.querySelectorAll("table.sortable th").forEach(function (th, _) {
  th.addEventListener("click", function () {
    var table = th.closest("table"), body = table.tBodies[0], col = th.cellIndex;
    var asc = th.dataset.dir !== "asc";
    th.dataset.dir = asc ? "asc" : "desc";
    var key = function (tr) {
      var td = tr.cells[col];
      if (!td) return "";
      return td.dataset.v !== undefined && td.dataset.v !== "" ? parseFloat(td.dataset.v) : td.textContent;
    };
    Array.from(body.rows).sort(function (a, b) {
      var x = key(a), y = key(b), c = typeof x === "number" && typeof y === "number" ? x - y
        : String(x).localeCompare(String(y));
      return asc ? c : -c;
    }).forEach(function (tr) { body.appendChild(tr); });
  });
});
"""


def render(d: RunData, *, max_points: int = 20_000, seed: int = 0) -> str:
    sections = [
        ("Summary", "summary", sec_summary(d)),
        ("Stage funnel", "funnel", sec_funnel(d)),
        ("Decisions and rejects", "reasons", sec_reasons(d)),
        ("Pool vs subset per source", "sources", sec_sources(d)),
        ("Pool vs subset per cluster", "clusters", sec_clusters(d)),
        ("Score distributions, pool vs subset", "scores", sec_scores(d)),
        ("Map of the pool", "map", sec_map(d, max_points, seed)),
        ("Diversity and redundancy: subset vs a random subset of the same size", "diversity",
         sec_diversity(d, seed)),
        ("Config and versions", "config", sec_config(d)),
    ]
    nav = "".join(f'<a href="#{sid}">{esc(t.split(",")[0].split(":")[0])}</a>' for t, sid, _ in sections)
    body = "".join(_section(t, b, sid) for t, sid, b in sections)
    created = d.manifest.get("created", "")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>curate report: {esc(d.name)}'
            f'</title><meta name="viewport" content="width=device-width,initial-scale=1"><style>{CSS}</style>'
            f'</head><body><header><h1>curate report: {esc(d.name)}</h1><p>run created {esc(created)} · '
            f'report written {time.strftime("%Y-%m-%d %H:%M:%S")}</p></header><nav>{nav}</nav>'
            f"<main>{body}</main><script>{JS}</script></body></html>")


def write_report(run_dir: str | Path, out: str | Path | None = None, *, max_points: int = 20_000,
                 seed: int = 0) -> Path:
    """Write the run's report (default `<run_dir>/report.html`, atomically) and return its path.

    Raises ReportError when the folder is missing or holds no run files.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"run folder {run_dir} does not exist")
    page = render(load_run(run_dir), max_points=max_points, seed=seed)
    path = Path(out) if out else run_dir / "report.html"
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path
