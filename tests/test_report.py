"""Report and diversity metrics: hand-checkable metric cases, then a real run folder rendered and checked in
headless Chromium (page renders, plots present, no console errors).

The fixture run is built from the bundled sample (data/sample: GSM8K, GPTeacher, Self-Instruct rows) with the
project's own ingest/dedup; its embeddings are TF-IDF + SVD (real vectors, cheap enough for a unit test), its
clusters k-means, its scores the project's heuristic flags plus two text statistics, its semantic duplicates
a cosine threshold, its selection a per-cluster quota filled by score, so every file has the shape the
pipeline writes (decisions with duplicate_of and similarity, heur_<flag> columns).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from curate import diversity
from curate.diversity import cluster_coverage, diversity_summary, mean_nn_similarity, vendi_score
from curate.ingest import dedup, ingest
from curate.report import ReportError, write_report
from curate.report.charts import cluster_columns, esc, tick_formatter
from curate.run import Run

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"
#: an instruction that would run as script, or break out of an attribute, if the page did not escape it
HOSTILE = '<script>alert("x")</script> </textarea>" onmouseover="alert(1)'
CHROMIUM = Path("/usr/bin/chromium")
N_SECTIONS = 13
#: a hand-written RUN/eval.json in the shape the evaluation writes (per-arm means, CIs, a verdict)
EVAL = {"metric": "lima_response_loss", "higher_is_better": False, "n": 300, "ci_level": 0.95,
        "verdict": "The subset's proxy fine-tune reaches a lower LIMA loss than random (CIs do not overlap).",
        "arms": {"subset": {"mean": 2.314, "ci": [2.281, 2.347]}, "random": {"mean": 2.402, "ci": [2.366, 2.437]},
                 "pool": {"mean": 2.376, "ci": [2.344, 2.409]}}}

# ------------------------------------------------------------------------------- diversity metrics


def test_vendi_hand_cases():
    assert vendi_score(np.ones((6, 4))) == pytest.approx(1.0)  # six copies of one vector
    assert vendi_score(np.eye(7)) == pytest.approx(7.0)  # orthonormal: seven distinct items
    assert vendi_score(3 * np.eye(5)[:, :5]) == pytest.approx(5.0)  # scale does not matter (cosine)
    # two orthogonal directions, 3 copies each: K/n has eigenvalues 1/2, 1/2 -> exp(log 2) = 2
    X = np.array([[1, 0]] * 3 + [[0, 1]] * 3, dtype=float)
    assert vendi_score(X) == pytest.approx(2.0)
    # unequal groups (1 and 3 copies): eigenvalues 1/4 and 3/4
    X = np.array([[1, 0]] + [[0, 1]] * 3, dtype=float)
    assert vendi_score(X) == pytest.approx(math.exp(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75))))
    assert vendi_score(np.zeros((0, 3))) == 0.0
    with pytest.raises(ValueError, match="all zeros"):
        vendi_score(np.array([[1.0, 0.0], [0.0, 0.0]]))


def test_vendi_both_gram_forms_and_sampling_agree():
    rng = np.random.default_rng(1)
    wide = rng.normal(size=(20, 50))  # n < d: the n x n matrix is decomposed
    tall = rng.normal(size=(300, 8))  # n > d: the d x d matrix is decomposed
    for X in (wide, tall):
        Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
        lam = np.clip(np.linalg.eigvalsh(Xn @ Xn.T / len(X)), 1e-15, None)
        assert vendi_score(X) == pytest.approx(math.exp(-np.sum(lam * np.log(lam))), rel=1e-6)
    # above `sample` rows the score is that of a seeded sample: reproducible, and equal to scoring the sample
    idx = np.sort(np.random.default_rng(3).choice(300, size=100, replace=False))
    assert vendi_score(tall, sample=100, seed=3) == pytest.approx(vendi_score(tall[idx], sample=None))
    assert vendi_score(tall, sample=100, seed=3) == vendi_score(tall, sample=100, seed=3)


def test_mean_nn_similarity_hand_case_and_chunking(monkeypatch):
    # neighbours: row0 <-> row1 (sim 1), row2's best is 0 (orthogonal to both) -> (1 + 1 + 0) / 3
    X = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    assert mean_nn_similarity(X) == pytest.approx(2 / 3)
    assert math.isnan(mean_nn_similarity(X[:1]))
    rng = np.random.default_rng(0)
    Y = rng.normal(size=(57, 6))
    Yn = Y / np.linalg.norm(Y, axis=1, keepdims=True)
    S = Yn @ Yn.T
    np.fill_diagonal(S, -np.inf)
    brute = S.max(axis=1).mean()
    monkeypatch.setattr(diversity, "_NN_CHUNK", 10)  # blocks of 10 queries x 10 rows, with self-masking
    assert mean_nn_similarity(Y) == pytest.approx(brute, rel=1e-5)
    # sampled queries still search the whole set
    idx = np.sort(np.random.default_rng(4).choice(57, size=20, replace=False))
    assert mean_nn_similarity(Y, sample=20, seed=4) == pytest.approx(S.max(axis=1)[idx].mean(), rel=1e-5)


def test_cluster_coverage():
    assert cluster_coverage([1, 2], [1, 2, 3, 3]) == pytest.approx(2 / 3)
    assert cluster_coverage(np.array([0]), np.array([0, 1, -1, 1])) == 0.5  # -1 = unclustered
    assert cluster_coverage(["b"], ["a", "b", None]) == 0.5
    assert math.isnan(cluster_coverage([], [None, -1]))


def test_diversity_summary_prefers_spread_over_copies():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(10, 16))
    clusters = np.repeat(np.arange(10), 30)
    X = centers[clusters] + 0.05 * rng.normal(size=(300, 16))
    mask = np.zeros(300, bool)
    mask[:20] = True  # a subset from cluster 0 only: redundant and narrow
    s = diversity_summary(X, mask, clusters, seed=1)
    assert s["subset"]["rows"] == s["random"]["rows"] == 20 and s["pool"]["rows"] == 300
    assert s["subset"]["cluster_coverage"] == 0.1 and s["subset"]["clusters"] == 1
    assert s["random"]["cluster_coverage"] > 0.5
    assert s["subset"]["vendi"] < 1.1 < s["random"]["vendi"]
    assert s["subset"]["mean_nn_similarity"] > s["random"]["mean_nn_similarity"]
    assert s["pool"] == {"rows": 300, "clusters": 10} and s["n_random"] == 10
    assert set(s["random_std"]) == {"vendi", "mean_nn_similarity", "cluster_coverage", "clusters"}
    one = diversity_summary(X, mask, clusters, seed=1, n_random=1)
    assert "random_std" not in one and one["subset"] == s["subset"]
    assert json.loads(json.dumps(s)) == s  # storable in the manifest as is
    assert diversity_summary(X, mask, clusters, seed=1) == s  # seeded
    with pytest.raises(ValueError, match="selected_mask"):
        diversity_summary(X, mask[:10], clusters)


# ----------------------------------------------------------------------------------- fixture run


def _write_inputs(folder: Path) -> list[str]:
    """Slices of three bundled sample files, plus what real dumps hold: exact duplicates (one differing only in
    case and spacing), a broken line, an empty answer, a placeholder answer and a hostile instruction."""
    def lines(name: str, n: int) -> list[str]:
        return (SAMPLE / name).read_text().splitlines()[:n]

    code = lines("gpteacher_codegen.jsonl", 160)
    first = json.loads(code[0])
    shouty = json.dumps(first | {"instruction": first["instruction"].upper().replace(" ", "  ")})
    broken = ['{"instruction": "Name a colour", "response": ', json.dumps({"instruction": "Say hi", "response": ""}),
              json.dumps({"instruction": "Summarise the attached report.", "input": "", "response": "<nooutput>"}),
              json.dumps({"instruction": HOSTILE, "input": "", "response": "I will not run </script> for you."})]
    a = folder / "codegen_slice.jsonl"
    a.write_text("\n".join(code + code[:10] + [shouty] + broken) + "\n")
    g = folder / "gsm8k_slice.jsonl"
    gsm = lines("gsm8k_train.jsonl", 200)
    g.write_text("\n".join(gsm + gsm[:5]) + "\n")
    t = folder / "toolformer_slice.jsonl"
    t.write_text("\n".join(lines("gpteacher_toolformer.jsonl", 120)) + "\n")
    return [str(a), str(g), str(t)]


def _heuristic_scores(records: pl.DataFrame) -> pl.DataFrame:
    """The heuristics scorer's own flags (heur_<flag> booleans + heur_flags) and two continuous text scores."""
    from scorers.heuristics import FLAGS, HeuristicParams, flag_conversation

    p = HeuristicParams()
    flags = [flag_conversation(m, p) for m in records["messages"].to_list()]
    resp = records["response"].to_list()
    words = [re.findall(r"\w+", r.lower()) for r in resp]
    cols = {f"heur_{f}": [row[f] for row in flags] for f in FLAGS}
    return pl.DataFrame({
        "lexical_diversity": [len(set(w)) / len(w) if w else 0.0 for w in words],
        "log_response_chars": np.log1p(records["response_chars"].to_numpy()),
        **cols,
        "heur_flags": [sum(row.values()) for row in flags],
    })


def build_run(folder: Path, *, budget: int = 120, k: int = 12) -> Path:
    """A complete run folder (manifest, records, decisions, selected, map2d) from real rows."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA, TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer

    run = Run(folder / "run")
    run.set("config", {"select": {"strategy": "kmq", "budget": budget, "seed": 0},
                       "embed": {"model": "tfidf-svd-64 (test fixture)"}, "cluster": {"k": k}})
    ingest(run, _write_inputs(folder))
    dedup(run)
    rec = pl.read_parquet(run.file("records.parquet"))
    n = rec.height

    t0 = time.perf_counter()
    text = [f"{a}\n{b}" for a, b in zip(rec["instruction"], rec["response"], strict=True)]
    X = TruncatedSVD(64, random_state=0).fit_transform(TfidfVectorizer(min_df=2).fit_transform(text))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    run.stage("embed", rows_in=n, rows_out=n, seconds=time.perf_counter() - t0)
    t0 = time.perf_counter()
    clusters = KMeans(k, n_init=3, random_state=0).fit_predict(X)
    run.stage("cluster", rows_in=n, rows_out=n, seconds=time.perf_counter() - t0, k=k)
    scores = _heuristic_scores(rec)
    run.stage("score", rows_in=n, rows_out=n, seconds=0.01)

    # semantic dedup: a later row with cosine >= 0.95 to an earlier kept row (duplicate_of = that row)
    S = X @ X.T
    sem = np.zeros(n, bool)
    sem_of = np.full(n, -1)
    for i in range(n):
        if not sem[i]:
            later = np.flatnonzero(S[i, i + 1:] >= 0.95) + i + 1
            later = later[~sem[later]]
            sem[later], sem_of[later] = True, i
    run.stage("semantic_dedup", rows_in=n, rows_out=int((~sem).sum()),
              dropped={"semantic_duplicate": int(sem.sum())}, seconds=0.01)

    # selection: cluster quotas proportional to size, filled by lexical diversity; flags >= 2 are filtered
    status = np.where(sem, "semantic_duplicate", "not_selected").astype(object)
    reason = np.where(sem, "semantic_duplicate", "outranked").astype(object)
    below = (~sem) & (scores["heur_flags"].to_numpy() >= 2)
    status[below], reason[below] = "not_selected", "below_threshold"
    eligible = ~sem & ~below
    rank = np.full(n, None, dtype=object)
    quality = scores["lexical_diversity"].to_numpy()
    sizes = np.bincount(clusters[eligible], minlength=k)
    quota = np.floor(budget * sizes / sizes.sum()).astype(int)
    quota[np.argsort(-(budget * sizes / sizes.sum() - quota))[: budget - quota.sum()]] += 1
    for c in range(k):
        members = np.flatnonzero(eligible & (clusters == c))
        order = members[np.argsort(-quality[members], kind="stable")]
        for r, i in enumerate(order):
            rank[i] = r + 1
            status[i], reason[i] = ("selected", "selected") if r < quota[c] else ("not_selected", "cluster_quota_full")
    sel = status == "selected"
    run.stage("select", rows_in=n, rows_out=int(sel.sum()), dropped={"not_selected": int((~sel).sum())},
              seconds=0.02, strategy="kmq")

    ids = rec["id"].to_list()
    pool_dec = pl.DataFrame({
        "source": rec["source"], "row": rec["row"], "id": rec["id"],
        "status": status.tolist(), "reason": reason.tolist(),
        "duplicate_of": [ids[j] if j >= 0 else None for j in sem_of],
        "similarity": pl.Series([float(S[i, j]) if j >= 0 else None for i, j in enumerate(sem_of)],
                                dtype=pl.Float32),
        "cluster": pl.Series(clusters.tolist(), dtype=pl.Int64),
        "rank_in_cluster": pl.Series(rank.tolist(), dtype=pl.Int64),
    }).hstack(scores)
    rej = pl.read_parquet(run.file("rejects.parquet")).select(
        "source", "row", pl.lit(None, pl.String).alias("id"), pl.lit("rejected").alias("status"),
        ("rejected:" + pl.col("reason")).alias("reason"))
    dup = pl.read_parquet(run.file("duplicates.parquet")).select(
        "source", "row", "id", pl.lit("duplicate").alias("status"), pl.lit("duplicate").alias("reason"),
        "duplicate_of")
    decisions = pl.concat([pool_dec, rej, dup], how="diagonal").sort("source", "row")
    decisions.write_parquet(run.file("decisions.parquet"))
    pl.DataFrame({"id": rec["id"]}).hstack(scores).write_parquet(run.file("scores.parquet"))
    rec.hstack(scores).with_columns(pl.Series("cluster", clusters.tolist())).filter(
        pl.Series(sel)).write_parquet(run.file("selected.parquet"))
    xy = PCA(2, random_state=0).fit_transform(X)
    pl.DataFrame({"id": rec["id"], "x": xy[:, 0], "y": xy[:, 1]}).write_parquet(run.file("map2d.parquet"))
    run.set("diversity", diversity_summary(X, sel, clusters, seed=0))
    (run.path / "eval.json").write_text(json.dumps(EVAL))
    return run.path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return build_run(tmp_path_factory.mktemp("report"))


# ---------------------------------------------------------------------------------- headless check


def chromium_check(pages: list[Path], expression: str, timeout: float = 20.0) -> list[dict]:
    """Open each page in headless Chromium over the DevTools protocol.

    Returns, per page, {"errors": [...console errors, uncaught exceptions, error log entries],
    "result": value of `expression` evaluated after the load event}.
    """
    from websockets.sync.client import connect

    profile = tempfile.mkdtemp(prefix="curate-chromium-")
    proc = subprocess.Popen(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--remote-debugging-port=0",
         "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        browser_ws, deadline = None, time.monotonic() + timeout
        while browser_ws is None:  # Chromium prints its DevTools address on stderr once it listens
            line = proc.stderr.readline()
            if not line and (proc.poll() is not None or time.monotonic() > deadline):
                raise RuntimeError("Chromium exited or never opened its DevTools port")
            m = re.search(r"DevTools listening on (ws://\S+)", line)
            browser_ws = m.group(1) if m else None
        out = []
        with connect(browser_ws, max_size=None, open_timeout=timeout) as ws:
            counter = iter(range(1, 1_000_000))

            def call(method: str, session: str | None = None, **params) -> dict:
                msg_id = next(counter)
                msg = {"id": msg_id, "method": method, "params": params}
                if session:
                    msg["sessionId"] = session
                ws.send(json.dumps(msg))
                while True:
                    reply = json.loads(ws.recv(timeout=timeout))
                    events.append(reply)
                    if reply.get("id") == msg_id:
                        if "error" in reply:
                            raise RuntimeError(f"{method}: {reply['error']}")
                        return reply["result"]

            for page in pages:
                events: list[dict] = []
                target = call("Target.createTarget", url="about:blank")["targetId"]
                session = call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
                for domain in ("Runtime", "Log", "Page"):
                    call(f"{domain}.enable", session)
                call("Page.navigate", session, url=page.resolve().as_uri())
                end = time.monotonic() + timeout
                while not any(e.get("method") == "Page.loadEventFired" for e in events):
                    if time.monotonic() > end:
                        raise TimeoutError(f"{page} did not finish loading")
                    events.append(json.loads(ws.recv(timeout=timeout)))
                result = call("Runtime.evaluate", session, expression=expression, returnByValue=True)
                time.sleep(0.2)
                call("Runtime.evaluate", session, expression="1")  # drain events that arrived meanwhile
                errors = []
                for e in events:
                    if e.get("sessionId") not in (None, session):
                        continue
                    p, meth = e.get("params", {}), e.get("method")
                    if meth == "Runtime.consoleAPICalled" and p["type"] in ("error", "assert"):
                        errors.append(" ".join(str(a.get("value", a.get("description"))) for a in p["args"]))
                    elif meth == "Runtime.exceptionThrown":
                        errors.append(p["exceptionDetails"].get("exception", {}).get("description")
                                      or p["exceptionDetails"]["text"])
                    elif meth == "Log.entryAdded" and p["entry"]["level"] == "error":
                        errors.append(p["entry"]["text"])
                if "exceptionDetails" in result:
                    errors.append(f"evaluate: {result['exceptionDetails']['text']}")
                out.append({"errors": errors, "result": result.get("result", {}).get("value")})
                call("Target.closeTarget", targetId=target)
        return out
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)


needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="/usr/bin/chromium is absent (Debian: apt-get install -y chromium)")

PROBE = """(() => {
  const plots = [...document.querySelectorAll("svg.plot")];
  const sec = id => document.getElementById(id);
  const th = document.querySelector("#sources table.sortable th:nth-child(2)");
  const first = () => document.querySelector("#sources table.sortable tbody td").textContent;
  const before = first(); th.click(); const afterAsc = first(); th.click(); const afterDesc = first();
  return {
    title: document.title,
    plots: plots.length,
    drawn: plots.filter(s => { const b = s.getBoundingClientRect(); return b.width > 50 && b.height > 20; }).length,
    rects: document.querySelectorAll("svg.plot rect").length,
    paths: document.querySelectorAll("svg.plot path").length,
    per: Object.fromEntries(["funnel", "reasons", "sources", "clusters", "scores", "map", "diversity"]
      .map(id => [id, sec(id) ? sec(id).querySelectorAll("svg.plot").length : -1])),
    mapDots: (sec("map").querySelector("svg path.sel")?.getAttribute("d").match(/M/g) || []).length,
    missing: document.querySelectorAll(".missing").length,
    sorted: [before, afterAsc, afterDesc],
    bodyText: document.body.innerText.length,
  };
})()"""

DEGRADED_PROBE = """(() => ({
  plots: document.querySelectorAll("svg.plot").length,
  missing: [...document.querySelectorAll(".missing")].map(e => e.textContent),
  sections: document.querySelectorAll("section").length,
}))()"""


def test_report_structure(run_dir):
    path = write_report(run_dir)
    assert path == run_dir / "report.html"
    page = path.read_text()
    assert page.startswith("<!DOCTYPE html>") and "</html>" in page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # nothing fetched from anywhere
    assert path.stat().st_size < 1_000_000
    assert 'class="k">pool rows<' in page and 'class="k">selected rows<' in page
    # every score column (+ length) gets a pool-vs-subset histogram
    assert page.count('aria-label="histogram of') == 4
    for name in ("lexical_diversity", "log_response_chars", "heur_flags", "n_tokens", "Vendi"):
        assert name in page
    rejects = page.split('id="reasons"')[1].split("Rejected rows by reason")[1].split("</section>")[0]
    assert ">malformed_json</text>" in rejects and ">empty_response</text>" in rejects  # prefix stripped


def test_write_report_errors(tmp_path):
    with pytest.raises(ReportError, match="does not exist"):
        write_report(tmp_path / "nope")
    with pytest.raises(ReportError, match="holds no"):
        write_report(tmp_path)


def test_map_is_downsampled(run_dir, tmp_path):
    out = write_report(run_dir, tmp_path / "small.html", max_points=50)
    page = out.read_text()
    assert re.search(r"<p>50 of [\d,]+ points shown", page)
    dots = sum(m.count("h0") for m in re.findall(r'<path d="([^"]*)" stroke=', page.split('id="map"')[1]))
    assert dots == 50


def test_cluster_chart_scales():
    few = cluster_columns([50, 40, 30], [5, 4, 3], [7, 8, 9])
    assert few.count("<rect") == 6 and "cluster 7: pool 50, subset 5 (10.0%)" in few and "log" not in few
    sizes = sorted((np.random.default_rng(0).zipf(1.5, 800) * 3).tolist(), reverse=True)
    many = cluster_columns(sizes, [s // 10 for s in sizes], list(range(800)))
    assert "<rect" not in many and many.count("<path") == 2 and "(log scale)" in many


def test_tick_labels_differ_in_narrow_ranges():
    from curate.report.charts import histogram, nice_ticks

    ticks = nice_ticks(1.0012, 1.0041)
    labels = [tick_formatter(ticks)(t) for t in ticks]
    assert len(set(labels)) == len(labels) >= 3 and "1" not in labels, labels
    assert [tick_formatter([0, 10_000, 20_000])(t) for t in (0, 10_000, 20_000)] == ["0", "10k", "20k"]
    assert [tick_formatter([0, 1, 2])(t) for t in (0, 1, 2)] == ["0", "1", "2"]
    assert [tick_formatter([0, 0.5, 1])(t) for t in (0, 0.5, 1)] == ["0.0", "0.5", "1.0"]
    tiny = [tick_formatter([1e-9, 2e-9])(t) for t in (1e-9, 2e-9)]
    assert tiny[0] != tiny[1]
    # a score that spans 1.0001..1.0009 (a perplexity ratio, say): every x tick of its histogram differs
    v = np.linspace(1.0001, 1.0009, 500)
    svg = histogram(v, v[::5], "ratio")
    xt = re.findall(r'text-anchor="middle">([^<]+)</text>', svg)[:-1]  # the last one is the axis title
    assert len(xt) >= 3 and len(set(xt)) == len(xt), xt
    # small integers (a flag count): one bin per value, ticks on the values only
    svg = histogram(np.array([0, 0, 0, 1, 1, 2.0]), np.array([0, 1.0]), "flags")
    assert re.findall(r'text-anchor="middle">([^<]+)</text>', svg)[:-1] == ["0", "1", "2"]


def test_diversity_verdict():
    from curate.diversity import diversity_verdict, random_range

    # 10 draws with sd 0.6: a random draw falls within +-1.50 of their mean 95% of the time
    assert random_range(0.6, 10) == pytest.approx(1.50, abs=0.01)
    readme = {"subset": {"vendi": 31.0, "cluster_coverage": 1.0}, "random": {"vendi": 33.3, "cluster_coverage": 1.0},
              "random_std": {"vendi": 0.6, "cluster_coverage": 0.0}, "n_random": 10}
    kind, text = diversity_verdict(readme)
    assert kind == "less" and "less diverse than random" in text and "31 vs 33.3 ± 0.6" in text
    kind, text = diversity_verdict(readme | {"subset": {"vendi": 35.0, "cluster_coverage": 0.9}})
    assert kind == "more" and "more diverse than random" in text and "but it covers fewer clusters" in text
    kind, text = diversity_verdict(readme | {"subset": {"vendi": 32.3, "cluster_coverage": 1.0}})
    assert kind == "similar" and "no more diverse than random (slightly below" in text  # beyond 1 sd, not 95%
    kind, text = diversity_verdict(readme | {"subset": {"vendi": 33.5, "cluster_coverage": 1.0}})
    assert kind == "similar" and "about as diverse as random" in text
    assert diversity_verdict(readme | {"n_random": 3})[0] == "similar"  # 3 draws: a 2.3 shortfall is within reach
    one_draw = {"subset": {"vendi": 33.0}, "random": {"vendi": 33.1}, "n_random": 1}
    assert diversity_verdict(one_draw)[0] == "less"  # no spread known: any shortfall counts
    kind, text = diversity_verdict({"subset": {"cluster_coverage": 0.5}, "random": {"cluster_coverage": 0.9},
                                    "random_std": {"cluster_coverage": 0.01}, "n_random": 3})
    assert kind == "less" and "fewer clusters (50% vs 90% ± 1.0%" in text
    assert diversity_verdict({"subset": {"rows": 3}})[0] == "unknown"
    assert diversity_verdict({"subset": {"rows": 3}, "random": {"rows": 3}})[0] == "unknown"


def test_a_random_subset_is_mostly_called_as_diverse_as_random():
    """The verdict on subsets that ARE random: "further than one sd of 3 draws" called about half of them less or
    more diverse than random; the 95% range of a random draw calls nearly all of them similar."""
    from curate.diversity import diversity_summary, diversity_verdict

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(12, 24))
    clusters = rng.integers(0, 12, 1500)
    X = centers[clusters] + 0.8 * rng.normal(size=(1500, 24))
    kinds = []
    for seed in range(20):
        mask = np.zeros(1500, bool)
        mask[np.random.default_rng(100 + seed).choice(1500, 150, replace=False)] = True
        kinds.append(diversity_verdict(diversity_summary(X, mask, clusters, seed=seed, sample=150))[0])
    assert kinds.count("similar") >= 17, kinds


def test_cluster_terms_name_clusters():
    from curate.report.text import cluster_terms, example

    docs = {0: ["Solve the equation 3x + 2 = 11 for x.", "Solve this equation: x squared equals 49.",
                "What is the derivative of x squared?"],
            1: ["Write a poem about the sea.", "Write a short poem about autumn leaves.", "A haiku about rain."],
            2: ["The the and of"]}  # stop words only: no label, no error
    terms = cluster_terms(docs)
    assert terms[0][0] in ("equation", "solve", "squared") and terms[1][0] == "poem" and terms[2] == []
    assert "write" not in terms[0] and cluster_terms({}) == {}
    html = example({"instruction": HOSTILE, "response": "x" * 5000})
    assert "<script>" not in html and "&lt;script&gt;" in html and "…" in html and len(html) < 6000


def test_example_markers_are_filled_once_and_cannot_be_forged():
    from curate.report.text import example_ref, fill_examples

    asked = []

    def lookup(ids):
        asked.append(set(ids))
        return {i: {"instruction": HOSTILE, "response": "r"} for i in ids}

    forged = esc("<!--ex:forged:10-->")  # what a row's text becomes on the page: it is not a marker any more
    odd = 'a:"b<'
    page = f"<p>{forged}</p>" + example_ref(odd, 50) + example_ref("c1", 80) + example_ref("c1", 80)
    out = fill_examples(page, lookup)
    assert asked == [{odd, "c1"}]  # one lookup for every marker, with the ids as they were
    assert "<!--ex:" not in out and "&lt;!--ex:forged:10--&gt;" in out
    assert out.count("&lt;script&gt;") == 6 and "<script" not in out  # tooltip and text of each
    assert 'onmouseover="alert' not in out


def test_report_content(run_dir):
    page = write_report(run_dir).read_text()
    sec = {m.group(1): m.group(2) for m in re.finditer(r'<section id="([^"]+)">(.*?)</section>', page, re.S)}
    dec = pl.read_parquet(run_dir / "decisions.parquet")
    pool = dec.filter(~pl.col("status").is_in(["rejected", "duplicate"]))
    # the diversity verdict is stated in the summary, in words
    assert re.search(r'class="verdict (less|more|similar)"><b>Diversity:</b> The subset is '
                     r'(less|more|about as) diverse', sec["summary"])
    # clusters: a label per cluster, example rows of the largest ones
    assert "Example rows of the 8 largest clusters" in sec["clusters"] and "top terms" in sec["clusters"]
    assert sec["clusters"].count('class="ex"') >= 16
    assert sec["map"].count('class="maplab"') == 10 and 'class="sel"' in sec["map"]
    # extremes: the best lexical_diversity row's text is shown (escaped, as the page shows it)
    top = pool.sort(["lexical_diversity", "id"], descending=[True, False]).row(0, named=True)
    rec = pl.read_parquet(run_dir / "records.parquet", columns=["id", "instruction"])
    ins = rec.filter(pl.col("id") == top["id"])["instruction"].item()
    from curate.report.text import clip
    assert esc(clip(ins, 220, tail=220 // 3)) in sec["extremes"]
    assert sec["extremes"].count("<details") == 3  # lexical_diversity, log_response_chars, n_tokens (not heur_flags)
    # flags: per-flag counts equal the decisions', with examples
    for f in ("length_ratio", "placeholder_response", "empty_response"):
        n = int(pool[f"heur_{f}"].sum())
        assert re.search(rf"<td>{f}</td><td class=\"n\" data-v=\"{float(n)}\">{n:,}</td>", sec["flags"]), f
    assert int(pool["heur_placeholder_response"].sum()) >= 1  # the injected "<nooutput>" answer
    # duplicates: counts and pairs (exact ones name the kept row; semantic ones carry their similarity)
    n_dup = dec.filter(pl.col("status") == "duplicate").height
    n_sem = dec.filter(pl.col("status") == "semantic_duplicate").height
    assert n_dup == 16 and n_sem > 0
    assert f"Exact duplicates: {n_dup:,} rows" in sec["duplicates"]
    assert f"Semantic duplicates: {n_sem:,} rows" in sec["duplicates"]
    low = dec.filter(pl.col("status") == "semantic_duplicate")["similarity"].min()
    assert f"min {low:.4f}" in sec["duplicates"] and "codegen_slice.jsonl:" in sec["duplicates"]
    # the eval section renders the hand-written eval.json: a whisker plot per metric and the verdict
    assert 'aria-label="means with confidence intervals"' in sec["eval"] and esc(EVAL["verdict"]) in sec["summary"]
    # nothing from the data runs as script or breaks out of an attribute
    assert page.count("<script") == 1 and "<script>alert" not in page and 'onmouseover="alert' not in page


@pytest.mark.parametrize("ev, n_rows", [
    ({"metric": "lima_loss", "higher_is_better": False, "verdict": "subset beats random on LIMA loss",
      "arms": {"subset": {"mean": 2.31, "ci": [2.25, 2.37]}, "random": {"mean": 2.40, "ci": [2.33, 2.46]}}}, 2),
    ({"arms": [{"name": "subset", "mean": 0.61, "ci_low": 0.58, "ci_high": 0.64},
               {"name": "random", "mean": 0.6, "ci_low": None, "ci_high": None}], "verdict": ["no difference"]}, 2),
    ({"arms": {"subset": {"lima": {"mean": 2.3, "ci": {"lo": 2.2, "hi": 2.4}}, "alpaca": {"mean": 1.9}},
               "random": {"lima": {"mean": 2.4, "ci95": [2.3, 2.5]}, "alpaca": {"value": 2.0}}}}, 4),
    ({"metrics": {"lima": {"arms": {"subset": 2.3, "random": 2.4}, "verdict": "x"}}, "verdict": {"text": "ok"}}, 2),
    ({"arms": {'<img src=x onerror="alert(1)">': {"mean": 1.0, "ci": [0.5, 1.5]}}, "verdict": "<b>bold</b>"}, 1),
    ({"arms": "not a mapping", "notes": [1, 2]}, 0),
])
def test_eval_section_is_tolerant(run_dir, tmp_path, ev, n_rows):
    from curate.report.sections import eval_metrics

    shutil.copy(run_dir / "decisions.parquet", tmp_path / "decisions.parquet")
    (tmp_path / "eval.json").write_text(json.dumps(ev))
    page = write_report(tmp_path).read_text()
    section = page.split('<section id="eval">')[1].split("</section>")[0]
    metrics = eval_metrics(ev)
    assert sum(len(r) for r in metrics.values()) == n_rows
    assert section.count('aria-label="means with confidence intervals"') == len(metrics)
    assert "<img" not in page and "<b>bold</b>" not in page  # arm names and verdicts are escaped
    if not metrics:
        assert "holds no arms with a mean" in section
    elif isinstance(ev.get("verdict"), str):
        assert "Evaluation:</b> " + esc(ev["verdict"]) in page  # the verdict is in the summary too


#: the shape `curate eval` writes today (helper "eval"): per reference set, loss per arm and paired differences
EVAL_REFS = {
    "verdict": "no different",
    "verdict_line": "selected vs random at equal tokens: no different — no different on lima (loss -0.0110 "
                    "[-0.0300, +0.0080])",
    "student": "smollm2-135m",
    "references": {
        "lima": {"rows": 50, "tokens": 9000, "source": "data/lima.jsonl",
                 "loss": {"selected": {"mean": 2.301, "ci": [2.28, 2.32], "seeds": [2.3, 2.302]},
                          "random_tokens": {"mean": 2.312, "ci": [2.29, 2.33], "seeds": [2.31, 2.314]},
                          "base": {"mean": 2.9, "ci": [2.85, 2.95], "seeds": [2.9]}},
                 "diff": {"selected - random_tokens": {"mean": -0.011, "ci": [-0.03, 0.008],
                                                       "verdict": "no different"}}},
        "gsm8k": {"rows": 40, "tokens": 5000, "source": "data/gsm8k.jsonl",
                  "loss": {"selected": {"mean": 1.5, "ci": [1.4, 1.6]},
                           "random_tokens": {"mean": 1.7, "ci": [1.6, 1.8]}},
                  "diff": {"selected - random_tokens": {"mean": -0.2, "ci": [-0.3, -0.1], "verdict": "better"}},
                  "accuracy": {"rows": 40, "arms": {"selected": {"mean": 0.1, "ci": [0.05, 0.15]},
                                                   "random_tokens": {"mean": 0.075, "ci": [0.03, 0.12]}},
                               "diff": {}}},
    },
    "arms": {"selected-seed0": {"seconds": 12.5, "train_tokens": 30000}, "base-seed0": {"seconds": 3.0}},
}


def test_eval_section_reads_curate_eval_output(run_dir, tmp_path):
    from curate.report.sections import eval_diffs, eval_metrics

    shutil.copy(run_dir / "decisions.parquet", tmp_path / "decisions.parquet")
    (tmp_path / "eval.json").write_text(json.dumps(EVAL_REFS))
    metrics = eval_metrics(EVAL_REFS)
    assert list(metrics) == ["lima loss", "gsm8k loss", "gsm8k accuracy"]  # per-unit bookkeeping is not a metric
    assert metrics["lima loss"][0] == ("selected", 2.301, 2.28, 2.32)
    assert [r[-1] for r in eval_diffs(EVAL_REFS)] == ["no different", "better"]
    page = write_report(tmp_path).read_text()
    section = page.split('<section id="eval">')[1].split("</section>")[0]
    assert section.count('aria-label="means with confidence intervals"') == 3
    assert "lima loss (lower is better)" in section and "gsm8k accuracy (higher is better)" in section
    assert "Paired differences" in section and "<td>better</td>" in section
    # the line, not the word, after a plain sentence in a red box
    assert ('class="verdict less"><b>Evaluation:</b> The subset is no better than random subsets of equal tokens. '
            "selected vs random at equal tokens: no different") in page
    assert "Fitted to" not in section
    (tmp_path / "eval.json").write_text(json.dumps({**EVAL_REFS, "fitted": {
        "minutes": 100, "left_out": ["random_rows", "random_length", "seeds 3 -> 1"], "seconds": 5375.0}}))
    section = write_report(tmp_path).read_text().split('<section id="eval">')[1].split("</section>")[0]
    assert "Fitted to 100 min" in section and "left out random_rows, random_length, seeds 3 -&gt; 1" in section


def test_a_stale_eval_is_called_out_of_date(run_dir, tmp_path):
    """`curate select` re-run into the folder with another budget left eval.json in place, and the report headed
    the new subset with the old subset's verdict. Its selected arm's rows, or selected.parquet being newer, say
    the evaluation is of an earlier selection."""
    import os

    for name in ("decisions.parquet", "records.parquet", "selected.parquet"):
        shutil.copy(run_dir / name, tmp_path / name)
    n_sel = pl.read_parquet(run_dir / "selected.parquet").height
    ev = tmp_path / "eval.json"

    def summary(rows: int, *, selected_newer: bool = False) -> str:
        ev.write_text(json.dumps({**EVAL_REFS, "arms": {"selected-seed0": {"arm": "selected", "seed": 0, "rows": rows},
                                                        "random_tokens-seed0": {"rows": rows + 7}}}))
        t = ev.stat().st_mtime
        os.utime(tmp_path / "selected.parquet", (t + 60, t + 60) if selected_newer else (t - 60, t - 60))
        page = write_report(tmp_path).read_text()
        return page.split('<section id="summary">')[1].split("</section>")[0]

    assert "out of date" not in summary(n_sel)
    stale = summary(n_sel * 2)
    assert (f"Evaluation out of date:</b> eval.json evaluated a subset of {n_sel * 2:,} rows, but this run&#x27;s "
            f"subset has {n_sel:,}") in stale
    assert "selected.parquet was written after eval.json" in summary(n_sel, selected_newer=True)
    section = write_report(tmp_path).read_text().split('<section id="eval">')[1].split("</section>")[0]
    assert "Out of date: selected.parquet was written after eval.json" in section


def test_an_empty_subset_is_said_plainly(run_dir, tmp_path):
    """Thresholds that reject every row leave no subset; the summary said it was "about as diverse as random
    (Vendi score 0 vs 0)". It says no row was selected, and why."""
    d = pl.read_parquet(run_dir / "decisions.parquet")
    d = d.with_columns(
        status=pl.when(pl.col("status") == "selected").then(pl.lit("not_selected")).otherwise(pl.col("status")),
        reason=pl.when(pl.col("status") == "selected").then(pl.lit("below_threshold")).otherwise(pl.col("reason")))
    d.write_parquet(tmp_path / "decisions.parquet")
    shutil.copy(run_dir / "records.parquet", tmp_path / "records.parquet")
    page = write_report(tmp_path).read_text()
    summary = page.split('<section id="summary">')[1].split("</section>")[0]
    assert "<b>No row was selected.</b> The final reasons of the" in summary and "below_threshold: " in summary
    assert "Diversity:" not in summary
    assert "No row was selected: there is no subset to compare" in page.split('<section id="diversity">')[1]
    assert "No row was selected" not in write_report(run_dir, tmp_path / "full.html").read_text()


def test_eval_json_broken(run_dir, tmp_path):
    shutil.copy(run_dir / "decisions.parquet", tmp_path / "decisions.parquet")
    (tmp_path / "eval.json").write_text("{not json")
    page = write_report(tmp_path).read_text()
    assert "eval.json is not valid JSON" in page and "No eval.json in the run folder" in page


@pytest.mark.parametrize("keep", [
    ("selected.parquet",),  # only the subset
    ("decisions.parquet",),  # no manifest, records or map
    ("manifest.json", "map2d.parquet", "selected.parquet"),  # map and subset, no pool
    ("decisions-bare", "manifest.json"),  # decisions without scores or clusters
])
def test_report_degrades(run_dir, tmp_path, keep):
    for name in keep:
        if name == "decisions-bare":
            pl.read_parquet(run_dir / "decisions.parquet").select(
                "source", "row", "id", "status", "reason").write_parquet(tmp_path / "decisions.parquet")
        else:
            shutil.copy(run_dir / name, tmp_path / name)
    page = write_report(tmp_path).read_text()
    assert page.count("<section") == N_SECTIONS and 'class="missing"' in page
    if keep == ("selected.parquet",):
        assert 'class="k">pool rows<' not in page and "Only selected.parquet is present" in page
    if keep == ("decisions.parquet",):  # no manifest diversity: coverage vs random draws from the decisions
        assert re.search(r"<b>Diversity:</b> The subset is [^<]*covers[^<]*clusters \(\d+% vs \d+%", page)
    if "decisions-bare" in keep:
        assert "the run was not clustered" in page and "the run was not scored" in page
        assert "malformed_json" in page  # rejects still come from the decisions


def _degraded_copy(run_dir: Path, dest: Path) -> Path:
    """The same run with only records + a manifest lacking diversity: no decisions, scores, map or subset."""
    dest.mkdir()
    shutil.copy(run_dir / "records.parquet", dest / "records.parquet")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest.pop("diversity")
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


@needs_chromium
def test_report_in_headless_chromium(run_dir, tmp_path):
    full = write_report(run_dir)
    degraded = write_report(_degraded_copy(run_dir, tmp_path / "degraded"))
    bad = tmp_path / "bad.html"  # the checker itself must be able to fail
    bad.write_text("<html><body><script>console.error('boom'); notDefined();</script></body></html>")
    t0 = time.monotonic()
    res_full, res_bad = chromium_check([full, bad], PROBE)
    (res_deg,) = chromium_check([degraded], DEGRADED_PROBE)
    assert time.monotonic() - t0 < 30

    assert any("boom" in e for e in res_bad["errors"]) and any("notDefined" in e for e in res_bad["errors"])

    assert res_full["errors"] == []
    r = res_full["result"]
    assert r["title"] == "curate report: run"
    assert r["plots"] == r["drawn"] >= 10, r  # every SVG has a real on-screen size
    assert r["per"]["funnel"] >= 1 and r["per"]["reasons"] == 2 and r["per"]["sources"] == 1
    assert r["per"]["clusters"] == 1 and r["per"]["scores"] == 4 and r["per"]["map"] == 1
    assert r["per"]["diversity"] >= 3
    assert r["mapDots"] == 120  # every selected row is on the map (pool < 20k, no downsampling)
    assert r["missing"] == 0
    assert r["sorted"][1] != r["sorted"][2]  # clicking a header re-orders the table
    assert r["rects"] > 50 and r["paths"] >= 10

    assert res_deg["errors"] == []
    deg = res_deg["result"]
    assert deg["sections"] == N_SECTIONS and deg["plots"] >= 3  # funnel, rejects, per source still drawn
    text = " ".join(deg["missing"])
    for what in ("decisions.parquet is missing", "map2d.parquet", "cluster", "not scored"):
        assert what in text, (what, text)
