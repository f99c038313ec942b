"""`curate report RUN`: one self-contained HTML file that explains a run's subset.

Everything is inline SVG drawn by `charts` (plus a few lines of JS to sort tables): the file opens offline,
needs no CDN or plotting package, and stays small (a 20k-point map is one SVG path per colour, ~0.3 MB).
Every section reads only the files it needs and says so when they are missing, so a half-finished run
(no scores, no map, no decisions) still gets a report.

Layout: `load` reads the run folder, `text` labels clusters and shortens example rows, `charts` draws,
`sections` turns the run into HTML sections, this module assembles the page.

Hook for the evaluation: a RUN/eval.json (as `curate eval` writes it) is shown in the Evaluation section and its
verdict line in the summary; `sections.eval_metrics` reads the shapes it accepts (per-arm means with CIs, per
reference set or per metric) and anything else is shown as JSON, so the schema may still change.
"""

from __future__ import annotations

import time
from pathlib import Path

from curate.report import sections as S
from curate.report.charts import esc
from curate.report.load import ReportError, RunData, load_run, texts
from curate.report.text import fill_examples
from curate.run import atomic_path

__all__ = ["ReportError", "RunData", "load_run", "render", "write_report"]

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
svg .maplab{font-size:11px;font-weight:600;fill:#0f172a;paint-order:stroke;stroke:#fff;stroke-width:3px}
.verdict{font-size:15px;padding:6px 10px;border-left:4px solid #64748b;background:#f1f5f9}
.verdict.less{border-color:#dc2626;background:#fef2f2}.verdict.more{border-color:#16a34a;background:#f0fdf4}
.verdict.mixed{border-color:#f59e0b;background:#fffbeb}
table.examples td{max-width:520px}.ex{font-size:12px;color:#334155;margin:2px 0 6px}.ex b{color:#64748b}
.exrow{margin-bottom:4px}.muted{color:#94a3b8}.st{border-left:3px solid;padding-left:4px}
details summary{cursor:pointer;margin:6px 0}
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
    """The whole page as one string (every payload escaped by the sections)."""
    labels = S.cluster_labels(d, seed)
    div = S.diversity_of(d, seed)
    sections = [
        ("Summary", "summary", S.sec_summary(d, div)),
        ("Stage funnel", "funnel", S.sec_funnel(d)),
        ("Decisions and rejects", "reasons", S.sec_reasons(d)),
        ("Pool vs subset per source", "sources", S.sec_sources(d)),
        ("Pool vs subset per cluster", "clusters", S.sec_clusters(d, labels, seed)),
        ("Map of the pool, coloured by cluster", "map", S.sec_map(d, labels, max_points, seed)),
        ("Score distributions, pool vs subset", "scores", S.sec_scores(d)),
        ("Top and bottom rows per score", "extremes", S.sec_extremes(d)),
        ("Heuristic flags", "flags", S.sec_flags(d)),
        ("Duplicates", "duplicates", S.sec_duplicates(d)),
        ("Diversity and redundancy: subset vs random subsets of the same size", "diversity",
         S.sec_diversity(d, div)),
        ("Evaluation", "eval", S.sec_eval(d)),
        ("Config and versions", "config", S.sec_config(d)),
    ]
    nav = "".join(f'<a href="#{sid}">{esc(t.split(",")[0].split(":")[0])}</a>' for t, sid, _ in sections)
    body = "".join(S.section(t, b, sid) for t, sid, b in sections)
    body = fill_examples(body, lambda ids: texts(d, ids))  # one read of records.parquet for every example
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
