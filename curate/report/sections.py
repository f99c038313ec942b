"""The report's sections: each takes the loaded run (and what the page shares, like cluster labels) and
returns escaped HTML, or a `missing` note saying which file or column it would need.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import polars as pl

from curate.diversity import cluster_coverage, diversity_verdict
from curate.report.charts import (
    PALETTE,
    POOL,
    RANDOM,
    STATUS_COLORS,
    SUBSET,
    Raw,
    cluster_columns,
    esc,
    fmt,
    hbars,
    histogram,
    intervals,
    legend,
    pct,
    scatter,
    short_names,
    table,
)
from curate.report.load import RunData, flag_columns, has_texts, score_columns, texts
from curate.report.text import cluster_terms, example_ref

#: clusters shown with example rows (the largest ones), and labelled on the map
EXAMPLE_CLUSTERS = 8
MAP_LABELS = 10
#: rows per cluster whose instructions label it (fewer per cluster when there are many clusters)
LABEL_ROWS = 20_000


def section(title: str, body: str, sid: str) -> str:
    return f'<section id="{sid}"><h2>{esc(title)}</h2>{body}</section>'


def missing(what: str) -> str:
    return f'<p class="missing">{esc(what)}</p>'


def sec_summary(d: RunData, div: dict[str, Any] | None) -> str:
    """Headline counts, then the two sentences a reader needs first: diversity vs random, and the evaluation."""
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
    lines = []
    empty = empty_subset_sentence(d)
    if empty:  # "about as diverse as random: Vendi 0 vs 0" said nothing true about a subset of no rows
        lines.append(f'<p class="verdict less"><b>No row was selected.</b> {esc(empty)}</p>')
    elif div:
        kind, sentence = diversity_verdict(div)
        lines.append(f'<p class="verdict {kind}"><b>Diversity:</b> {esc(sentence)}</p>')
    tilt = score_tilt_sentence((d.manifest.get("stages") or {}).get("select") or {})
    if tilt:
        lines.append(f'<p class="verdict {tilt[0]}"><b>Score:</b> {esc(tilt[1])}</p>')
    ev = _eval_verdict(d.eval) if d.eval else None
    if ev:
        kind, lead = EVAL_LEADS.get(str(d.eval.get("verdict")), ("", ""))
        lines.append(f'<p class="verdict {kind}"><b>Evaluation:</b> {esc(lead)}{" " * bool(lead)}{esc(ev)}</p>')
    stale = eval_stale_note(d)
    if stale:
        lines.append(f'<p class="verdict less"><b>Evaluation out of date:</b> {esc(stale)}</p>')
    return f'<div class="cards">{html_cards}</div>{"".join(lines)}{notes}'


#: `curate eval`'s overall word -> (verdict class, a plain sentence before its verdict line): "no different" in a
#: grey box read as neutral news, where it means the selection did not beat a random subset of the same tokens
EVAL_LEADS = {
    "better": ("more", "The subset beat random subsets of equal tokens."),
    "no different": ("less", "The subset is no better than random subsets of equal tokens."),
    "worse": ("less", "The subset is worse than random subsets of equal tokens."),
    "mixed": ("mixed", "The subset is better than random on some reference sets and worse on others."),
}


def empty_subset_sentence(d: RunData) -> str | None:
    """Why the subset is empty (the pool's final reasons, most frequent first), or None when it is not empty or
    the pool is unknown."""
    pool = d.pool
    if pool is None or d.subset_only or not pool.height or bool(pool["selected"].any()):
        return None
    if "reason" in pool.columns:
        g = pool.group_by("reason").len().sort(["len", "reason"], descending=[True, False])
        why = ", ".join(f"{r}: {fmt(n)}" for r, n in g.iter_rows())
        text = f"The final reasons of the {fmt(pool.height)} pool rows are {why}"
    else:
        text = f"None of the {fmt(pool.height)} pool rows is in the subset"
    return (text + " (decisions.parquet has every row's). Loosen select.thresholds or quotas, or raise the "
            "budget, and run curate select again.")


def eval_stale_note(d: RunData) -> str | None:
    """Why eval.json may describe another subset than this run's: `curate select` re-run into the same folder
    (another budget, seed or strategy) leaves the earlier eval.json in place, and its verdict then headed the
    report of a subset it never trained on. Definite when its selected arm trained on another number of rows;
    likely when selected.parquet was written after eval.json."""
    ev = d.eval
    if not ev or d.pool is None:
        return None
    arms = ev.get("arms")
    rows = {int(v["rows"]) for k, v in (arms.items() if isinstance(arms, dict) else [])
            if isinstance(v, dict) and (v.get("arm") == "selected" or str(k).startswith("selected-seed"))
            and isinstance(v.get("rows"), int) and not isinstance(v.get("rows"), bool)}
    n_sel = d.pool.height if d.subset_only else int(d.pool["selected"].sum())
    again = "run `curate eval` on this run folder again (units whose subset did not change are read back)."
    if rows and n_sel not in rows:
        return (f"eval.json evaluated a subset of {', '.join(fmt(r) for r in sorted(rows))} rows, but this run's "
                f"subset has {fmt(n_sel)}: its verdict is about an earlier selection; {again}")
    if d.path is not None:
        sel, evf = d.path / "selected.parquet", d.path / "eval.json"
        try:
            newer = sel.stat().st_mtime > evf.stat().st_mtime
        except OSError:
            return None
        if newer:
            return ("selected.parquet was written after eval.json, so the evaluation may be of an earlier "
                    f"selection; {again}")
    return None


def score_tilt_sentence(select_stage: dict[str, Any]) -> tuple[str, str] | None:
    """(verdict class, sentence) on how many selected rows kMQ's quality score decided; None without a record."""
    t = select_stage.get("score_tilt")
    if not t or not t.get("selected"):
        return None
    n, shared = int(t["selected"]), int(t["shared_with_stratified_random"])
    sentence = (f"the quality score ({t['score']}, select.temperature {t['temperature']:g}) decided {fmt(n - shared)} "
                f"of the {fmt(n)} selected rows; the other {fmt(shared)} are the ones cluster-stratified random "
                "sampling with the same seed picks.")
    if shared > 0.8 * n:
        return "mixed", (sentence + " The selection is mostly stratified random: a lower select.temperature "
                         "makes the score count more.")
    return "neutral", sentence


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
        parts.append(missing("The manifest has no stages."))
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
                     else missing("No decisions.parquet and no inputs in the manifest."))
    return "".join(parts)


def sec_sources(d: RunData) -> str:
    if d.pool is None or "source" not in d.pool.columns:
        return missing("No per-source data (records, decisions or selected.parquet with a source column).")
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


def cluster_labels(d: RunData, seed: int = 0) -> dict[Any, list[str]]:
    """Top c-TF-IDF terms of each cluster, from a seeded sample of its pool rows' instructions."""
    if d.pool is None or not {"cluster", "id"} <= set(d.pool.columns):
        return {}
    cl = d.pool.filter(pl.col("cluster").is_not_null() & (pl.col("cluster") != -1) & pl.col("id").is_not_null())
    n_clusters = cl["cluster"].n_unique()
    if not n_clusters:
        return {}
    per = max(5, min(60, LABEL_ROWS // n_clusters))
    sample = (cl.select("id", "cluster")
              .with_columns(pl.int_range(pl.len()).shuffle(seed).over("cluster").alias("_r"))
              .filter(pl.col("_r") < per))
    txt = texts(d, sample["id"].to_list())
    if not txt:
        return {}
    docs: dict[Any, list[str]] = {}
    for i, c in sample.select("id", "cluster").iter_rows():
        if i in txt:
            docs.setdefault(c, []).append(txt[i]["instruction"])
    return cluster_terms(docs)


def _label(labels: dict[Any, list[str]], c: Any) -> str:
    return ", ".join(labels.get(c) or []) or "–"


def _where(r: dict[str, Any], names: dict[str, str] | None = None) -> Raw:
    """`file:row` of a decision row (the full path in the tooltip)."""
    src = str(r.get("source") or "")
    name = (names or {}).get(src) or src.rsplit("/", 1)[-1]
    return Raw(f'<span title="{esc(src)}">{esc(name)}:{esc(r.get("row"))}</span>')


def _status(r: dict[str, Any]) -> Raw:
    st = str(r.get("status") or "")
    reason = str(r.get("reason") or "")
    extra = f" <small>({esc(reason)})</small>" if reason and reason != st else ""
    return Raw(f'<span class="st" style="border-color:{STATUS_COLORS.get(st, "#64748b")}">{esc(st)}</span>{extra}')


def sec_clusters(d: RunData, labels: dict[Any, list[str]], seed: int = 0) -> str:
    if d.pool is None or "cluster" not in d.pool.columns:
        return missing("No cluster column in the decisions (the run was not clustered).")
    g = (d.pool.filter(pl.col("cluster").is_not_null())
         .group_by("cluster").agg(pl.len().alias("pool"), pl.col("selected").sum().alias("selected"))
         .sort(["pool", "cluster"], descending=[True, False]))
    if not g.height:
        return missing("Every cluster label is null.")
    pool_n, sel_n = g["pool"].to_list(), g["selected"].to_list()
    share = g["selected"] / g["pool"]
    covered = int((g["selected"] > 0).sum())
    stats = table(["clusters", "covered by subset", "selected per cluster (min / median / max)",
                   "share selected per cluster (min / median / max)"],
                  [[g.height, Raw(f"{covered:,} ({pct(covered, g.height)})"),
                    Raw(f"{min(sel_n):,} / {float(np.median(sel_n)):g} / {max(sel_n):,}"),
                    Raw(f"{100 * share.min():.1f}% / {100 * share.median():.1f}% / {100 * share.max():.1f}%")]])
    top = g.head(25)
    rows = [[r["cluster"], _label(labels, r["cluster"]), r["pool"], r["selected"], Raw(pct(r["selected"], r["pool"]))]
            for r in top.iter_rows(named=True)]
    note = ("<p><small>Labels: the words most specific to each cluster's instructions (c-TF-IDF over a sample "
            "of its rows).</small></p>" if labels else "")
    return (legend([("pool", POOL), ("subset", SUBSET)]) + cluster_columns(pool_n, sel_n, g["cluster"].to_list())
            + stats + note + _cluster_examples(d, g.head(EXAMPLE_CLUSTERS), labels, seed)
            + f"<details><summary>Largest {top.height} clusters</summary>"
            + table(["cluster", "top terms", "pool", "selected", "share"], rows) + "</details>")


def _cluster_examples(d: RunData, g: pl.DataFrame, labels: dict[Any, list[str]], seed: int) -> str:
    """Two subset rows (best ranked first) and one left-out row of each of the largest clusters."""
    if d.pool is None or "id" not in d.pool.columns or not g.height:
        return ""
    pool = d.pool.filter(pl.col("cluster").is_in(g["cluster"].implode()) & pl.col("id").is_not_null())
    pool = pool.with_columns(pl.int_range(pl.len()).shuffle(seed).over("cluster").alias("_r"))
    order = ["rank_in_cluster", "_r"] if "rank_in_cluster" in pool.columns else ["_r"]
    picks = pl.concat([
        pool.filter(pl.col("selected")).sort(order, nulls_last=True).group_by("cluster", maintain_order=True).head(2),
        pool.filter(~pl.col("selected")).sort("_r").group_by("cluster", maintain_order=True).head(1),
    ], how="diagonal_relaxed")
    if not has_texts(d):
        return ""
    by_cluster: dict[Any, list[dict]] = {}
    for r in picks.iter_rows(named=True):
        by_cluster.setdefault(r["cluster"], []).append(r)
    rows = []
    for r in g.iter_rows(named=True):
        ex = by_cluster.get(r["cluster"], [])
        sel = "".join(example_ref(e["id"], 160) for e in ex if e["selected"]) or "–"
        out = "".join(example_ref(e["id"], 160) for e in ex if not e["selected"]) or "–"
        head = (f'<b>{esc(r["cluster"])}</b><br>{esc(_label(labels, r["cluster"]))}<br><small>{r["selected"]:,} of '
                f'{r["pool"]:,} selected</small>')
        rows.append([Raw(head), Raw(sel), Raw(out)])
    return (f"<h3>Example rows of the {g.height} largest clusters</h3>"
            + table(["cluster", "selected (best ranked first)", "not selected (random)"], rows, "examples"))


def sec_map(d: RunData, labels: dict[Any, list[str]], max_points: int, seed: int) -> str:
    if d.map2d is None or not {"id", "x", "y"} <= set(d.map2d.columns):
        return missing("No map2d.parquet (id, x, y) in the run folder.")
    m = d.map2d.drop_nulls(["x", "y"])
    n = m.height
    if n > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(n, size=max_points, replace=False))
        m = m[keep]
    has_pool = d.pool is not None and "id" in d.pool.columns
    ids = set(d.pool.filter(pl.col("selected"))["id"].to_list()) if has_pool else set()
    sel = m["id"].is_in(list(ids)).to_numpy()
    note = (f"<p>{fmt(m.height)} of {fmt(n)} points shown (uniform seeded sample); "
            f"{fmt(int(sel.sum()))} of them selected.</p>")
    x, y = m["x"].cast(pl.Float64).to_numpy(), m["y"].cast(pl.Float64).to_numpy()
    if not has_pool or "cluster" not in d.pool.columns:
        return legend([("pool", POOL), ("subset", SUBSET)]) + note + scatter(x, y, sel)
    # colours by cluster size rank: the 20 largest clusters get distinct colours, smaller ones reuse them
    sizes = (d.pool.filter(pl.col("cluster").is_not_null() & (pl.col("cluster") != -1))
             .group_by("cluster").len().sort(["len", "cluster"], descending=[True, False]))
    rank = {c: i for i, c in enumerate(sizes["cluster"].to_list())}
    shown = d.pool.select("id", "cluster").filter(pl.col("id").is_in(m["id"].implode())).unique("id")
    cl = m.join(shown, on="id", how="left", maintain_order="left")["cluster"].to_list()
    groups = np.array([rank[c] if c in rank else -1 for c in cl], dtype=np.int64)
    marks = [(i, f"{c}: {_label(labels, c)}") for c, i in rank.items() if i < MAP_LABELS]
    items = [(f"{c}: {_label(labels, c)}", PALETTE[i]) for c, i in rank.items() if i < len(PALETTE)]
    more = (f" Colours repeat for the {sizes.height - len(PALETTE):,} smaller clusters."
            if sizes.height > len(PALETTE) else "")
    key = ("<p><small>Faint dots: pool rows; solid dots with a dark rim: the subset. Colour: cluster (legend: the "
           f"{min(len(PALETTE), sizes.height)} largest); the {min(MAP_LABELS, sizes.height)} largest are labelled "
           f"at the median position of their rows.{more}</small></p>")
    return note + key + scatter(x, y, sel, groups, marks) + legend(items)


def sec_scores(d: RunData) -> str:
    if d.pool is None:
        return missing("No pool data.")
    cols = score_columns(d.pool, d.scores)
    note = "" if cols else missing("No score columns in the decisions or the subset (the run was not scored).")
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


def sec_extremes(d: RunData, n: int = 3) -> str:
    """The highest and lowest rows of every score: what a score rewards and punishes, in the data's words."""
    if d.pool is None or "id" not in d.pool.columns:
        return missing("No pool data with row ids.")
    cols = [c for c in score_columns(d.pool, d.scores) if c != "heur_flags"]
    cols += ["n_tokens"] if "n_tokens" in d.pool.columns else []  # the shortest rows are often the junk
    if not cols:
        return missing("No score columns (the run was not scored).")
    picks: dict[str, tuple[pl.DataFrame, pl.DataFrame]] = {}
    for c in cols:
        v = d.pool.filter(pl.col(c).is_not_null() & pl.col(c).cast(pl.Float64).is_finite())
        if v.height:  # top_k/bottom_k: O(n), not a sort of the pool per column; ties go to the smaller id
            top = v.top_k(n, by=[c, "id"], reverse=[False, True]).sort([c, "id"], descending=[True, False])
            picks[c] = (top, v.bottom_k(n, by=[c, "id"]).sort([c, "id"]))
    names = short_names([str(s) for s in d.pool["source"].unique().to_list()]) if "source" in d.pool.columns else {}
    parts = []
    for k, (c, (top, bot)) in enumerate(picks.items()):
        rows = []
        for side, f in (("highest", top), ("lowest", bot)):
            for r in f.iter_rows(named=True):
                rows.append([side, float(r[c]), _status(r), _where(r, names), Raw(example_ref(r["id"]))])
        parts.append(f'<details{" open" if k == 0 else ""}><summary>{esc(c)}: {n} highest and {n} lowest pool rows'
                     f"</summary>{table(['', c, 'decision', 'row', 'text'], rows, 'examples')}</details>")
    return "".join(parts)


def sec_flags(d: RunData, n_examples: int = 2) -> str:
    """Which heuristic flag fired on how many rows, and on which (subset rows first: those are the ones trained on)."""
    if d.pool is None:
        return missing("No pool data.")
    flags = flag_columns(d.pool)
    if not flags:
        return missing("No heur_<flag> columns (the heuristics scorer did not run).")
    counts = d.pool.select([pl.col(f).fill_null(False).sum().alias(f) for f in flags]).row(0)
    sel_counts = d.pool.filter(pl.col("selected")).select(
        [pl.col(f).fill_null(False).sum().alias(f) for f in flags]).row(0)
    order = sorted(range(len(flags)), key=lambda i: (-counts[i], flags[i]))
    names = [flags[i].removeprefix("heur_") for i in order]
    chart = legend([("pool", POOL), ("subset", SUBSET)]) + hbars(
        names, [("pool", [counts[i] for i in order], POOL), ("subset", [sel_counts[i] for i in order], SUBSET)])
    fired = [flags[i] for i in order if counts[i]]
    picks = {}
    for f in fired:
        hit = d.pool.filter(pl.col(f).fill_null(False))
        if "id" in hit.columns:
            picks[f] = hit.sort(["selected", "id"], descending=[True, False]).head(n_examples)
    src = d.pool["source"].unique().to_list() if "source" in d.pool.columns else []
    where = short_names([str(s) for s in src])
    rows = []
    for i in order:
        f = flags[i]
        ex = "".join(f'<div class="exrow">{_status(r)} {_where(r, where)}{example_ref(r["id"], 160)}</div>'
                     for r in picks[f].iter_rows(named=True)) if f in picks else "–"
        rows.append([f.removeprefix("heur_"), counts[i], Raw(pct(counts[i], d.pool.height)), sel_counts[i],
                     Raw(ex)])
    return chart + table(["flag", "pool rows", "share of pool", "selected rows", "examples (selected first)"],
                         rows, "examples")


def sec_duplicates(d: RunData, n: int = 4) -> str:
    """Exact and semantic duplicate pairs: the dropped row next to the row it duplicates (with similarity)."""
    dec = d.decisions
    if dec is None or not {"status", "id", "source", "row"} <= set(dec.columns):
        return missing("No decisions.parquet with status, id, source and row: duplicates are not known.")
    parts = []
    kept = dec.filter(~pl.col("status").is_in(["duplicate", "rejected"]) & pl.col("id").is_not_null())
    names = short_names([str(s) for s in dec["source"].unique().to_list()])
    for status, title in (("duplicate", "Exact duplicates"), ("semantic_duplicate", "Semantic duplicates")):
        dups = dec.filter(pl.col("status") == status)
        parts.append(f"<h3>{title}: {dups.height:,} rows</h3>")
        if not dups.height:
            continue
        if "duplicate_of" not in dups.columns:
            parts.append(missing("decisions.parquet has no duplicate_of column: pairs cannot be shown."))
            continue
        has_sim = "similarity" in dups.columns and dups["similarity"].is_not_null().any()
        if has_sim:
            sim = dups["similarity"].drop_nulls().cast(pl.Float64)
            parts.append(f"<p>Cosine similarity to the kept row: min {sim.min():.4f}, median {sim.median():.4f}, "
                         f"max {sim.max():.4f}. The least similar pairs (nearest the threshold) come first: they "
                         "show whether the threshold drops what it should.</p>")
            dups = pl.concat([dups.sort("similarity").head(n),
                              dups.sort("similarity", descending=True).head(2)]).unique(
                                  ["source", "row"], maintain_order=True)
        else:
            dups = dups.head(n)
        pairs = dups.join(kept.select(pl.col("id").alias("duplicate_of"), pl.col("source").alias("k_source"),
                                      pl.col("row").alias("k_row")), on="duplicate_of", how="left")
        # an exact duplicate's own text is not in records.parquet: it equals its kept row's up to case/space
        rows = []
        for r in pairs.iter_rows(named=True):
            kept_at = _where({"source": r["k_source"], "row": r["k_row"]}, names) if r["k_source"] else "–"
            row = [_where(r, names), kept_at]
            if has_sim:
                sim = r["similarity"]
                row.append(Raw(f"{sim:.4f}") if sim is not None else None)
            if status == "semantic_duplicate":
                row += [Raw(example_ref(r["id"], 160)), Raw(example_ref(r["duplicate_of"], 160))]
            else:
                row.append(Raw(example_ref(r["duplicate_of"], 160)))
            rows.append(row)
        head = ["dropped row", "duplicate of"] + (["similarity"] if has_sim else [])
        head += ["dropped text", "kept text"] if status == "semantic_duplicate" else ["text (same, up to case/space)"]
        parts.append(table(head, rows, "examples"))
    return "".join(parts)


METRIC_HELP = {
    "vendi": "Vendi score (effective number of distinct rows; higher = more diverse)",
    "mean_nn_similarity": "mean nearest-neighbour cosine similarity (lower = less redundant)",
    "cluster_coverage": "share of pool clusters present (higher = broader)",
    "clusters": "clusters touched",
    "rows": "rows",
}


def diversity_of(d: RunData, seed: int, n_random: int = 10) -> dict[str, Any] | None:
    """manifest['diversity'] when the run stored it; else cluster coverage vs random draws from the decisions."""
    div = d.manifest.get("diversity")
    if isinstance(div, dict) and any(isinstance(v, dict) for v in div.values()):
        return div
    if d.pool is None or "cluster" not in d.pool.columns or d.subset_only:
        return None
    cl = d.pool["cluster"].to_numpy()
    sel = d.pool["selected"].to_numpy().astype(bool)
    k = int(sel.sum())
    rng = np.random.default_rng(seed)
    covs = [cluster_coverage(cl[rng.choice(len(cl), size=k, replace=False)], cl) for _ in range(n_random)]
    return {"subset": {"rows": k, "cluster_coverage": cluster_coverage(cl[sel], cl)},
            "random": {"rows": k, "cluster_coverage": float(np.mean(covs))},
            "random_std": {"cluster_coverage": float(np.std(covs))},
            "n_random": n_random, "seed": seed, "from_decisions": True}


def sec_diversity(d: RunData, div: dict[str, Any] | None) -> str:
    if empty_subset_sentence(d):
        return missing("No row was selected: there is no subset to compare with random subsets.")
    if not div:
        return missing("manifest['diversity'] is absent and the run has no clusters.")
    kind, sentence = diversity_verdict(div)
    verdict = f'<p class="verdict {kind}"><b>Verdict:</b> {esc(sentence)}</p>'
    pre = (missing("manifest['diversity'] is absent (no Vendi score or nearest-neighbour similarity); cluster "
                    "coverage below is computed from the decisions, against random draws of the same size.")
           if div.get("from_decisions") else "")
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
    head = ["metric"] + [f"random (mean of {n_rand} draws ± sd)" if k == "random" and std else k for k in sets]
    scal = ", ".join(f"{esc(k)} = {fmt(v)}" for k, v in div.items()
                     if not isinstance(v, dict) and k != "from_decisions")
    return (verdict + pre + '<div class="grid">' + "".join(figs) + "</div>" + table(head, rows)
            + (f"<p>{scal}. Embedding metrics are computed on the same number of rows (sample) for the "
               f"subset and the random subsets, so they compare.</p>" if scal and not pre else ""))


# ------------------------------------------------------------------------------------- evaluation

_MEAN_KEYS = ("mean", "value", "estimate", "avg")


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _stat(v: Any) -> tuple[float, float | None, float | None] | None:
    """(mean, lo, hi) from a number or a dict with a mean and some spelling of a confidence interval."""
    if _num(v) is not None:
        return _num(v), None, None
    if not isinstance(v, dict):
        return None
    mean = next((_num(v[k]) for k in _MEAN_KEYS if _num(v.get(k)) is not None), None)
    if mean is None:
        return None
    lo = hi = None
    for key in ("ci", "ci95", "ci_95", "interval"):
        ci = v.get(key)
        if isinstance(ci, (list, tuple)) and len(ci) == 2:
            lo, hi = _num(ci[0]), _num(ci[1])
        elif isinstance(ci, dict):
            lo = next((_num(ci[k]) for k in ("lo", "low", "lower") if k in ci), None)
            hi = next((_num(ci[k]) for k in ("hi", "high", "upper") if k in ci), None)
        if lo is not None or hi is not None:
            break
    if lo is None and hi is None:
        for a, b in (("ci_low", "ci_high"), ("ci_lo", "ci_hi"), ("lo", "hi"), ("low", "high"), ("lower", "upper")):
            if a in v or b in v:
                lo, hi = _num(v.get(a)), _num(v.get(b))
                break
    return mean, lo, hi


def eval_metrics(ev: dict[str, Any]) -> dict[str, list[tuple[str, float, float | None, float | None]]]:
    """{metric: [(arm, mean, lo, hi), ...]} from an eval.json, whichever of the shapes it takes:
    {"references": {set: {"loss": {arm: {mean, ci}}, "accuracy": {"arms": {...}}}}} (what `curate eval`
    writes), {"metric", "arms": {arm: {mean, ci}}}, arms as a list of {name, mean, ci_low, ci_high}, arms
    holding one entry per metric ({arm: {metric: {mean, ci}}}), or {"metrics": {metric: <any of those>}}."""
    out: dict[str, list] = {}
    refs = ev.get("references")
    if isinstance(refs, dict) and any(isinstance(v, dict) and ("loss" in v or "accuracy" in v)
                                      for v in refs.values()):
        for name, e in refs.items():
            if not isinstance(e, dict):
                continue
            for what, arms in (("loss", e.get("loss")), ("accuracy", (e.get("accuracy") or {}).get("arms"))):
                if isinstance(arms, dict):
                    rows = [(str(a), *st) for a, v in arms.items() if (st := _stat(v)) is not None]
                    if rows:
                        out[f"{name} {what}"] = rows
        return out
    if isinstance(ev.get("metrics"), dict) and not any(k in ev for k in ("arms", "results")):
        for name, block in ev["metrics"].items():
            if isinstance(block, dict):
                for m, rows in eval_metrics({"metric": name} | block).items():
                    out.setdefault(m, []).extend(rows)
        return out
    arms = ev.get("arms", ev.get("results"))
    if isinstance(arms, list):
        arms = {str(a.get("name", a.get("arm", i))): a for i, a in enumerate(arms) if isinstance(a, dict)}
    if not isinstance(arms, dict):
        return out
    default = str(ev.get("metric") or ev.get("metric_name") or "score")
    for arm, v in arms.items():
        st = _stat(v)
        if st is not None:
            metric = str(v.get("metric", default)) if isinstance(v, dict) else default
            out.setdefault(metric, []).append((str(arm), *st))
        elif isinstance(v, dict):
            for m, mv in v.items():
                st = _stat(mv) if isinstance(mv, dict) else None  # bare numbers there are bookkeeping (seconds)
                if st is not None:
                    out.setdefault(str(m), []).append((str(arm), *st))
    return out


def eval_diffs(ev: dict[str, Any]) -> list[list[Any]]:
    """Rows (set, measure, comparison, mean, CI low, CI high, verdict) of the paired differences, if given."""
    rows = []
    refs = ev.get("references")
    for name, e in (refs.items() if isinstance(refs, dict) else []):
        if not isinstance(e, dict):
            continue
        for what, diffs in (("loss", e.get("diff")), ("accuracy", (e.get("accuracy") or {}).get("diff"))):
            for pair, v in (diffs.items() if isinstance(diffs, dict) else []):
                st = _stat(v)
                if st is not None:
                    rows.append([name, what, pair, st[0], st[1], st[2], str(v.get("verdict", ""))])
    return rows


def _eval_verdict(ev: dict[str, Any] | None) -> str | None:
    if not ev:
        return None
    v = ev.get("verdict_line") or ev.get("verdict")
    if isinstance(v, dict):
        v = v.get("text") or v.get("summary") or "; ".join(f"{k}: {x}" for k, x in v.items())
    if isinstance(v, list):
        v = "; ".join(str(x) for x in v)
    return str(v) if v else None


def sec_eval(d: RunData) -> str:
    """RUN/eval.json (written by the evaluation, `curate eval`): per-arm means with CIs, and its verdict."""
    ev = d.eval
    if not ev:
        return missing("No eval.json in the run folder (the subset was not evaluated).")
    parts = []
    stale = eval_stale_note(d)
    if stale:
        parts.append(missing(f"Out of date: {stale}"))
    verdict = _eval_verdict(ev)
    if verdict:
        parts.append(f'<p class="verdict"><b>Verdict:</b> {esc(verdict)}</p>')
    fit = ev.get("fitted")
    if isinstance(fit, dict) and fit.get("left_out"):  # `curate eval --minutes`: say which arms and seeds are missing
        parts.append(f"<p>Fitted to {esc(fit.get('minutes'))} min (<code>curate eval --minutes</code>): left out "
                     f"{esc(', '.join(map(str, fit['left_out'])))}. The same command with more minutes adds them; "
                     "finished units are read back.</p>")
    metrics = eval_metrics(ev)
    if not metrics:
        parts.append(missing("eval.json holds no arms with a mean this report can read."))
    for m, rows in metrics.items():
        better = ev.get("higher_is_better")
        if better is None and m.endswith((" loss", " accuracy")):
            better = m.endswith(" accuracy")
        hint = "" if better is None else " (higher is better)" if better else " (lower is better)"
        parts.append(f"<figure><figcaption>{esc(m)}{esc(hint)}: mean and confidence interval per arm"
                     f"</figcaption>{intervals(rows)}</figure>")
        parts.append(table(["arm", "mean", "CI low", "CI high"], [[a, mu, lo, hi] for a, mu, lo, hi in rows]))
    diffs = eval_diffs(ev)
    if diffs:
        parts.append("<h3>Paired differences</h3>" + table(
            ["reference set", "measure", "comparison", "difference", "CI low", "CI high", "verdict"], diffs))
    for key in ("student", "n", "n_bootstrap", "ci_level", "method", "benchmark", "model"):
        if key in ev and not isinstance(ev[key], (dict, list)):
            parts.append(f"<p><small>{esc(key)}: {esc(ev[key])}</small></p>")
    parts.append(f"<details><summary>eval.json</summary><pre>{esc(json.dumps(ev, indent=2, default=str))}</pre>"
                 "</details>")
    return "".join(parts)


def sec_config(d: RunData) -> str:
    parts = []
    for key in ("config", "versions"):
        if d.manifest.get(key):
            parts.append(f"<details><summary>{key}</summary><pre>"
                         f"{esc(json.dumps(d.manifest[key], indent=2, default=str))}</pre></details>")
    return "".join(parts) or missing("The manifest has no config or versions.")

