"""Formatting helpers and the small inline-SVG chart kit the report draws with.

Why hand-written SVG rather than a vendored JS chart library: the charts are bars, step histograms, a scatter
and whiskers, which this kit draws in a few hundred lines; the page then renders without JavaScript (prints,
greps, opens in any viewer), every label goes through one escaping function (`esc`), and tests read the
charts as text. The candidates on npm cost more than the whole report of the bundled sample: Chart.js 4.6
is 210 KB minified, uPlot 1.6 is 51 KB and has no labelled horizontal bars.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

POOL, SUBSET, RANDOM = "#a7b1c2", "#2563eb", "#f59e0b"
STATUS_COLORS = {
    "selected": SUBSET, "not_selected": POOL, "rejected": "#dc2626",
    "duplicate": "#ea580c", "semantic_duplicate": "#9333ea",
}
#: 20 distinguishable colours (Tableau 20 order: strong, then light) for clusters, largest first
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7",
           "#dbdb8d", "#9edae5")

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
    """One tick on its own (no neighbours to compare with): integers with k/M, else 3 significant digits."""
    return tick_formatter([v])(v)


def tick_formatter(ticks: Sequence[float]) -> Callable[[float], str]:
    """A label function for a whole axis: as many decimals as the tick step needs, so ticks that differ
    get labels that differ (1.0015, 1.0020, ... rather than 1, 1, ...); integers keep k/M."""
    vals = [float(t) for t in ticks if math.isfinite(t)]
    if vals and all(v == int(v) for v in vals) and all(abs(v) < 1e15 for v in vals):
        big = max(abs(v) for v in vals) >= 1e4
        def as_int(v: float) -> str:
            iv = int(round(v))
            if not big:
                return str(iv)
            return f"{iv / 1e6:g}M" if abs(iv) >= 1e6 else f"{iv / 1e3:g}k" if abs(iv) >= 1e4 else str(iv)
        return as_int
    steps = [b - a for a, b in zip(vals, vals[1:], strict=False) if b > a]
    if not steps:
        return lambda v: f"{v:.3g}"
    step = min(steps)
    dec = max(0, -math.floor(math.log10(step) + 1e-9))
    if dec > 6 or max(abs(v) for v in vals) >= 1e6:  # tiny or huge: scientific, enough digits to differ
        digits = max(3, math.ceil(math.log10(max(abs(v) for v in vals) / step + 1)) + 1)
        return lambda v: f"{v:.{digits}g}"
    return lambda v: f"{v:.{dec}f}"


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
    label = tick_formatter(ticks)
    plot_w = width - lab_w - right
    sx = plot_w / vmax
    out = []
    for t in ticks:
        x = lab_w + t * sx
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{h - bottom}" class="grid"/>'
                   f'<text x="{x:.1f}" y="{h - 6}" class="tick" text-anchor="middle">{label(t)}</text>')
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
          ylab: Any = None, xlab: Any = None) -> list[str]:
    ylab, xlab = ylab or tick_formatter(yt), xlab or tick_formatter(xt)
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
    xt: list[float] | None = None
    if len(distinct) <= 30 and np.all(distinct == np.round(distinct)):
        edges = np.arange(distinct.min() - 0.5, distinct.max() + 1.5)  # one bin per integer value
        xt = [t for t in nice_ticks(float(distinct.min()), float(distinct.max()), 5) if t == int(t)]
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
    pct_label = tick_formatter([100 * t for t in yt])
    out = _axes(left, top, left + pw, top + ph, xt or nice_ticks(edges[0], edges[-1], 5), yt, sx, sy,
                lambda t: pct_label(100 * t) + "%")
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


def scatter(x: np.ndarray, y: np.ndarray, sel: np.ndarray, groups: np.ndarray | None = None,
            labels: Sequence[tuple[int, str]] = (), size: int = 640) -> str:
    """The 2-D map: pool dots faint, subset dots solid with a dark rim; each colour layer is one path of
    zero-length round-capped strokes (20k points stay ~0.3 MB).

    groups: per point, its cluster's size rank (colour PALETTE[rank % 20]) or -1 for grey; without it the pool
    is grey and the subset blue. labels: (group, text) at the median position of that group's points, moved
    down when it would overlap a label already placed.
    """
    if not len(x):
        return ""
    pad = 10
    def scale(v: np.ndarray) -> np.ndarray:
        lo, hi = np.quantile(v, [0.001, 0.999])
        span = (hi - lo) or 1.0
        return pad + np.clip((v - lo) / span, 0, 1) * (size - 2 * pad)
    px, py = scale(x), size - scale(y)
    def dots(mask: np.ndarray) -> str:
        return "".join(f"M{a:.1f} {b:.1f}h0" for a, b in zip(px[mask], py[mask], strict=True))
    out = []
    if groups is None:
        layers = [(~sel, POOL, 3, 0.55, ""), (sel, SUBSET, 3.5, 0.85, ' class="sel"')]
        for mask, color, w, op, cls in layers:
            if mask.any():
                out.append(f'<path{cls} d="{dots(mask)}" stroke="{color}" stroke-width="{w}" '
                           f'stroke-linecap="round" stroke-opacity="{op}" fill="none"/>')
    else:
        groups = np.asarray(groups)
        colour: dict[str, np.ndarray] = {}  # one path per colour, not per cluster
        for g in np.unique(groups).tolist():
            c = PALETTE[g % len(PALETTE)] if g >= 0 else POOL
            colour[c] = colour[c] | (groups == g) if c in colour else groups == g
        for c, members in colour.items():
            mask = ~sel & members
            if mask.any():
                out.append(f'<path d="{dots(mask)}" stroke="{c}" stroke-width="3.5" stroke-linecap="round" '
                           f'stroke-opacity="0.45" fill="none"/>')
        if sel.any():  # the rim: one dark layer under the coloured subset dots
            out.append(f'<path class="sel" d="{dots(sel)}" stroke="#0f172a" stroke-width="6" '
                       f'stroke-linecap="round" fill="none"/>')
        for c, members in colour.items():
            mask = sel & members
            if mask.any():
                out.append(f'<path d="{dots(mask)}" stroke="{c}" stroke-width="4" stroke-linecap="round" '
                           f'fill="none"/>')
        placed: list[tuple[float, float, float]] = []  # (left, right, baseline) of labels drawn
        for g, text in labels:
            mask = groups == g
            if mask.any():
                lx, ly = float(np.median(px[mask])), float(np.median(py[mask]))
                anchor = "end" if lx > size * 0.75 else "start" if lx < size * 0.25 else "middle"
                w = 6.2 * len(text)
                left = lx - (w if anchor == "end" else w / 2 if anchor == "middle" else 0)
                while any(left < r and left + w > a and abs(ly - b) < 13 for a, r, b in placed):
                    ly += 13
                placed.append((left, left + w, ly))
                out.append(f'<text x="{lx:.1f}" y="{ly:.1f}" class="maplab" text-anchor="{anchor}">'
                           f'{esc(text)}</text>')
    return _svg(size, size, f'<rect width="{size}" height="{size}" class="frame"/>' + "".join(out), "2-D map")


def intervals(rows: Sequence[tuple[str, float, float | None, float | None]], *, unit: str = "",
              width: int = 640) -> str:
    """One dot per arm at its mean, with a whisker over its confidence interval (lo, hi may be None)."""
    rows = [r for r in rows if r[1] is not None and math.isfinite(r[1])]
    if not rows:
        return ""
    vals = [v for _, m, lo, hi in rows for v in (m, lo, hi) if v is not None and math.isfinite(v)]
    lo_v, hi_v = min(vals), max(vals)
    span = (hi_v - lo_v) or abs(hi_v) or 1.0
    xt = nice_ticks(lo_v - 0.08 * span, hi_v + 0.08 * span, 5)
    x_lo, x_hi = min(xt[0], lo_v - 0.08 * span), max(xt[-1], hi_v + 0.08 * span)
    lab_w = min(220, 12 + 7 * max(len(r[0]) for r in rows))
    row_h, top, bottom = 26, 8, 30
    h = top + row_h * len(rows) + bottom
    pw = width - lab_w - 20
    def sx(v: float) -> float:
        return lab_w + (v - x_lo) * pw / (x_hi - x_lo)
    out = _axes(lab_w, top, lab_w + pw, h - bottom, xt, [], sx, lambda v: 0.0)
    for i, (name, m, lo, hi) in enumerate(rows):
        y = top + row_h * i + row_h / 2
        low = name.lower()
        color = (SUBSET if "select" in low or "subset" in low else RANDOM if "random" in low
                 else "#64748b" if low in ("base", "pool") else PALETTE[(i + 2) % len(PALETTE)])
        tip = f"{name}: {fmt(m)}" + (f" [{fmt(lo)}, {fmt(hi)}]" if lo is not None and hi is not None else "")
        out.append(f'<g><title>{esc(tip)}</title><text x="{lab_w - 6}" y="{y + 4:.1f}" class="lab" '
                   f'text-anchor="end">{esc(name[:32])}</text>')
        if lo is not None and hi is not None and math.isfinite(lo) and math.isfinite(hi):
            out.append(f'<line x1="{sx(lo):.1f}" x2="{sx(hi):.1f}" y1="{y:.1f}" y2="{y:.1f}" stroke="{color}" '
                       f'stroke-width="2"/><line x1="{sx(lo):.1f}" x2="{sx(lo):.1f}" y1="{y - 5:.1f}" '
                       f'y2="{y + 5:.1f}" stroke="{color}" stroke-width="2"/><line x1="{sx(hi):.1f}" '
                       f'x2="{sx(hi):.1f}" y1="{y - 5:.1f}" y2="{y + 5:.1f}" stroke="{color}" stroke-width="2"/>')
        out.append(f'<circle cx="{sx(m):.1f}" cy="{y:.1f}" r="4.5" fill="{color}"/>'
                   f'<text x="{sx(m):.1f}" y="{y - 8:.1f}" class="val" text-anchor="middle">{fmt(m)}</text></g>')
    if unit:
        out.append(f'<text x="{lab_w + pw / 2}" y="{h - 2}" class="tick" text-anchor="middle">{esc(unit)}</text>')
    return _svg(width, h, "".join(out), "means with confidence intervals")
