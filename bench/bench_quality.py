"""Quality benchmark: which scorer flags which defect, on a real pool with injected defects and on KTO labels.

1. Pool: Alpaca-52k rows [40000, 40000 + N) (held out from the proxy's training rows [0, 40000)). Six
   defect kinds are injected into disjoint random sets of `--per-kind` rows each; the rest stay as they are
   (real, so they keep Alpaca's own natural defects: the benchmark is conservative):
   - swapped:    the response is another row's response
   - truncated:  the response is cut at a word boundary 30-70% of the way in (no closing punctuation)
   - emptied:    the response is "" (ingest would reject it; it is injected after ingest)
   - duplicated: the response text is repeated twice (a generation loop; exact duplicate ROWS are removed
                 by the dedup stage and are not a per-row scorer's job)
   - refusal:    the response is replaced by one of 8 refusal texts (2 of them outside heuristics' regex)
   - merged:     a follow-on Alpaca-style prompt + answer from another row is appended to the response
                 (3 formats: "N. Instruction:", "### Instruction:", and a plain "Next, ..." that no rule
                 targets)
   AUROC per defect kind = P(defective row scores worse than a clean row), in each column's declared
   direction (`higher_is_better`); booleans count as 0/1; a null score counts as the worst (a row a scorer
   cannot score is suspicious) and null counts are reported.
2. KTO: /work/shared/data/kto-mix-test (546 desirable / 546 undesirable responses, prompts shared):
   AUROC of each column at ranking desirable above undesirable.

Model: the tiny proxy LM (curate.lm.proxy, trained once on Alpaca rows [0, 40000), cached; the same proxy
bench_scorers.py uses) for every likelihood and judge scorer. A ~1M-parameter proxy cannot follow the
deita/BSDetector/UniEval instructions, so judge scores here are close to meaningless: this measures the
machinery and the cheap rules, not what a 7B judge would do. Embeddings: MiniLM (curate.embed).

Usage: python bench/bench_quality.py [--rows 1200] [--per-kind 60] [--k 5] [--model PATH] [--out FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("CURATE_PROGRESS", "0")

import numpy as np  # noqa: E402
import orjson  # noqa: E402
import polars as pl  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from curate.embed import load_embedder, view_texts  # noqa: E402
from curate.io.formats import to_messages  # noqa: E402
from curate.lm import LMConfig, load_engine  # noqa: E402
from curate.lm.proxy import ensure_default_proxy  # noqa: E402
from curate.schema import RowError, make_record  # noqa: E402
from curate.scoring import get_scorer, scorer_class  # noqa: E402
from curate.scoring.runner import score_pool  # noqa: E402
from curate.scoring.store import ScoreStore  # noqa: E402
from scorers.heuristics import FLAGS  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
ALPACA = DATA / "alpaca-52k" / "alpaca_data.jsonl"
KTO = DATA / "kto-mix-test" / "kto_mix_test.jsonl"
MAX_LENGTH = 512
KINDS = ("swapped", "truncated", "emptied", "duplicated", "refusal", "merged")
REFUSALS = (
    "I'm sorry, but as an AI language model I cannot help with that request.",
    "As an AI, I am unable to complete this task.",
    "Sorry, I can't provide that information.",
    "I cannot fulfill this request because it requires capabilities I do not have.",
    "This task cannot be completed by a GPT language model.",
    "I apologize, but I am not able to generate that content.",
    "Unfortunately, that is not something I can do.",  # outside the regex
    "I'd rather not answer that question.",  # outside the regex
)


def read_alpaca(lo: int, hi: int) -> list[list[dict]]:
    out = []
    with open(ALPACA, "rb") as fh:
        for i, line in enumerate(fh):
            if i >= hi:
                break
            if i >= lo:
                out.append(to_messages(orjson.loads(line))[1])
    return out


def _record(msgs: list[dict], source: str, row: int) -> dict:
    try:
        return make_record(msgs, source=source, row=row, fmt="alpaca")
    except RowError:  # an emptied response: build the record by hand (ingest would have rejected it)
        rec = make_record([*msgs[:-1], {"role": "assistant", "content": "x"}], source=source, row=row, fmt="alpaca")
        rec["messages"] = msgs
        rec["response"], rec["response_chars"] = "", 0
        rec["id"] = hashlib.sha256(orjson.dumps([(m["role"], m["content"]) for m in msgs])).hexdigest()[:32]
        return rec


def truncate(text: str, rng: random.Random) -> str | None:
    words = text.split(" ")
    if len(words) < 8:
        return None
    cut = " ".join(words[: int(len(words) * rng.uniform(0.3, 0.7))]).rstrip(" ,.;:!?\n")
    return cut if cut and cut != text else None


def merged(text: str, other: list[dict], rng: random.Random) -> str:
    q, a = other[0]["content"], other[-1]["content"]
    n = rng.randint(2, 19)
    fmt = rng.randrange(3)
    if fmt == 0:
        return f"{text}\n{n}. Instruction: {q}\n{n}. Input:\n<noinput>\n{n}. Output:\n{a}"
    if fmt == 1:
        return f"{text}\n\n### Instruction:\n{q}\n\n### Response:\n{a}"
    return f"{text}\n\nNext, {q[0].lower() + q[1:]}\n{a}"


def defect_pool(n: int, per_kind: int, seed: int = 0) -> tuple[pl.DataFrame, np.ndarray]:
    """Alpaca rows with injected defects; kinds[i] = "clean" or the defect kind of row i."""
    rng = random.Random(seed)
    convs = read_alpaca(40_000, 40_000 + n)
    order = list(range(n))
    rng.shuffle(order)
    kinds = np.array(["clean"] * n, dtype=object)
    pos = 0
    for kind in KINDS:
        taken = 0
        while taken < per_kind:
            i = order[pos]
            pos += 1
            msgs = [dict(m) for m in convs[i]]
            text = msgs[-1]["content"]
            other = convs[order[-(pos % (n // 4)) - 1]]  # a donor row from the far end of the permutation
            if kind == "swapped":
                new = other[-1]["content"]
            elif kind == "truncated":
                new = truncate(text, rng)
            elif kind == "emptied":
                new = ""
            elif kind == "duplicated":
                new = f"{text}\n\n{text}" if len(text.split()) >= 8 else None
            elif kind == "refusal":
                new = rng.choice(REFUSALS)
            else:
                new = merged(text, other, rng)
            if new is None or new == text:
                continue
            msgs[-1]["content"] = new
            convs[i] = msgs
            kinds[i] = kind
            taken += 1
    recs = [_record(m, "alpaca-defects", 40_000 + i) for i, m in enumerate(convs)]
    return _unique(pl.DataFrame(recs), kinds)


def _unique(df: pl.DataFrame, labels: np.ndarray) -> tuple[pl.DataFrame, np.ndarray]:
    """Drop exact duplicate records (same id), as the dedup stage would; labels follow."""
    first = df.with_row_index("_i").unique(subset="id", keep="first", maintain_order=True)["_i"].to_numpy()
    return df[first], labels[first]


def kto_pool() -> tuple[pl.DataFrame, np.ndarray, int]:
    recs, labels, skipped = [], [], 0
    with open(KTO, "rb") as fh:
        for i, line in enumerate(fh):
            row = orjson.loads(line)
            try:
                fmt, msgs = to_messages({"instruction": row["instruction"], "output": row["output"]})
                recs.append(make_record(msgs, source="kto", row=i, fmt=fmt))
                labels.append(bool(row["tag"]))
            except RowError:
                skipped += 1
    df, lab = _unique(pl.DataFrame(recs), np.array(labels))
    return df, lab, skipped + len(recs) - df.height


SCORERS: list[tuple[str, str, dict]] = [  # (label, scorer name, params)
    ("heuristics", "heuristics", {}),
    ("perplexity", "perplexity", {}),
    ("ifd", "ifd", {}),
    ("grape", "grape", {}),
    ("deita", "deita", {}),
    ("instructmining", "instructmining", {}),
    ("donod", "donod", {}),
    ("clear", "clear", {"reflection": "probs", "agreement": "judge"}),
    ("clear[emb]", "clear", {"reflection": "probs", "agreement": "embedding"}),
]
#: scorers too slow on this CPU for the whole pool: run on a stratified subsample (k generations per row)
SUBSAMPLED = ("donod", "clear", "clear[emb]")


def score_all(df: pl.DataFrame, sub: pl.DataFrame, engine, emb: np.ndarray, store: ScoreStore, k: int,
              max_tokens: int, timings: dict, tag: str) -> pl.DataFrame:
    """Every scorer's columns for df (subsampled scorers: only the rows of `sub`, null elsewhere)."""
    out = df.select("id")
    done: dict[str, pl.DataFrame] = {}
    for label, name, params in SCORERS:
        rows = sub if label in SUBSAMPLED else df
        if name == "clear":
            params = {**params, "k": k, "max_tokens": max_tokens}
        scorer = get_scorer(name, **params)
        kw: dict = {"store": store, "batch_size": 256}
        if scorer.needs.engine:
            kw["engine"] = engine
        if scorer.needs.embeddings:
            pos = df.select("id").with_row_index("_p").join(rows.select("id"), on="id", maintain_order="right")
            kw["embeddings"] = emb[pos["_p"].to_numpy()]
            kw["pool_embeddings"] = emb
        if scorer.needs.scores:
            other = rows.select("id")
            for dep in scorer.needs.scores:
                other = other.join(done[dep], on="id", how="left")
            kw["other_scores"] = other
        t0 = time.perf_counter()
        res = score_pool(rows, scorer, **kw)
        timings[(tag, label)] = time.perf_counter() - t0
        print(f"  {tag} {label}: {rows.height} rows, {timings[(tag, label)]:.1f} s", file=sys.stderr, flush=True)
        cols = res.df
        if label != name:
            cols = cols.rename({c: c.replace(name, label, 1) for c in cols.columns if c != "id"})
        done[label] = res.df
        out = out.join(cols, on="id", how="left", maintain_order="left")
    return out


def stratified(n_by_group: dict[str, int], groups: np.ndarray, seed: int = 0) -> np.ndarray:
    """Row indices: n rows (or all, if fewer) of each group, in pool order."""
    rng = np.random.default_rng(seed)
    keep = []
    for g, n in n_by_group.items():
        idx = np.flatnonzero(groups == g)
        keep.extend(rng.choice(idx, size=min(n, idx.size), replace=False).tolist())
    return np.sort(np.array(keep, dtype=np.int64))


def directions() -> dict[str, bool]:
    """column -> higher_is_better, for every scored column that declares one (labels included)."""
    d: dict[str, bool] = {}
    for label, name, _ in SCORERS:
        for col, hib in scorer_class(name).higher_is_better.items():
            d[col.replace(name, label, 1)] = hib
    d.pop("instructmining_fit", None)
    return d


def auroc(bad_score: np.ndarray, positive: np.ndarray) -> float:
    """AUROC of `bad_score` (higher = more suspicious) at finding the positive rows."""
    if positive.all() or not positive.any():
        return float("nan")
    return float(roc_auc_score(positive, bad_score))


def suspicion(values: pl.Series, higher_is_better: bool) -> tuple[np.ndarray, int]:
    x = values.cast(pl.Float64).to_numpy().astype(np.float64)
    nulls = int(np.isnan(x).sum())
    x = x if not higher_is_better else -x
    finite = x[np.isfinite(x)]
    x[~np.isfinite(x)] = (finite.max() + 1.0) if finite.size else 0.0  # unscorable = most suspicious
    return x, nulls


def fmt(v: float) -> str:
    return "–" if np.isnan(v) else f"{v:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1200)
    ap.add_argument("--per-kind", type=int, default=60)
    ap.add_argument("--k", type=int, default=5, help="CLEAR samples per row")
    ap.add_argument("--max-tokens", type=int, default=24, help="CLEAR sample length")
    ap.add_argument("--kto", type=int, default=0, help="KTO rows to use (0 = all 1092)")
    ap.add_argument("--sub-per-kind", type=int, default=12, help=f"subsample for {SUBSAMPLED}: rows per kind")
    ap.add_argument("--sub-clean", type=int, default=60, help="subsample: clean rows")
    ap.add_argument("--sub-kto", type=int, default=40, help="subsample: KTO rows per label")
    ap.add_argument("--model", default=None, help="judge/likelihood model (name or path); default: the proxy")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "quality.md"))
    args = ap.parse_args()
    load_before = os.getloadavg()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    t_all = time.perf_counter()

    t0 = time.perf_counter()
    # the same source (and so the same cached proxy) as bench/bench_scorers.py
    proxy = args.model or ensure_default_proxy([{"messages": m} for m in read_alpaca(0, 40_000)], size="tiny")
    proxy_s = time.perf_counter() - t0
    dtype = "float32"
    if args.model == "smollm2-135m":  # the packaged default scoring model, bf16 where this CPU runs it natively
        from curate.lm.hf import resolve_dtype
        from curate.lm.models import model_path

        proxy, dtype = model_path("smollm2-135m"), resolve_dtype("auto")
    engine = load_engine(LMConfig(proxy, max_length=MAX_LENGTH, dtype=dtype))
    n_params = sum(p.numel() for p in engine.model.parameters())
    embedder = load_embedder("minilm")

    pool, kinds = defect_pool(args.rows, args.per_kind)
    kto, kto_labels, kto_skipped = kto_pool()
    if args.kto:
        kto, kto_labels = kto.head(args.kto), kto_labels[: args.kto]
    sub_idx = stratified({"clean": args.sub_clean, **dict.fromkeys(KINDS, args.sub_per_kind)}, kinds)
    sub_kto_idx = stratified({True: args.sub_kto, False: args.sub_kto}, kto_labels)
    sub_pool, sub_kto = pool[sub_idx], kto[sub_kto_idx]
    timings: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = ScoreStore(Path(tmp) / "scores")
        t0 = time.perf_counter()
        emb_pool = embedder.encode(view_texts(pool, "instruction_response"))
        emb_kto = embedder.encode(view_texts(kto, "instruction_response"))
        embed_s = time.perf_counter() - t0
        s_pool = score_all(pool, sub_pool, engine, emb_pool, store, args.k, args.max_tokens, timings, "defects")
        s_kto = score_all(kto, sub_kto, engine, emb_kto, store, args.k, args.max_tokens, timings, "kto")
        # the paper's reflection mode on a few rows: how often does the proxy answer on template?
        few = pool.head(40)
        gen = score_pool(few, get_scorer("clear", k=2, max_tokens=16, reflection="generate",
                                         reflection_max_tokens=48), engine=engine, store=store).df
        parsed = int(gen["clear_reflection"].is_not_null().sum())

    dirs = directions()
    in_sub = np.zeros(pool.height, bool)
    in_sub[sub_idx] = True
    in_sub_kto = np.zeros(kto.height, bool)
    in_sub_kto[sub_kto_idx] = True
    rows = []
    for c in [c for c in dirs if c in s_pool.columns]:
        sub = any(c.startswith(lbl + "_") or c == lbl for lbl in SUBSAMPLED)
        m_pool = in_sub if sub else np.ones(pool.height, bool)
        m_kto = in_sub_kto if sub else np.ones(kto.height, bool)
        if s_pool[c].filter(pl.Series(m_pool)).null_count() == int(m_pool.sum()):
            continue  # a column this configuration does not fill (e.g. perplexity_uncond)
        bad, nulls = suspicion(s_pool[c].filter(pl.Series(m_pool)), dirs[c])
        k_sub = kinds[m_pool]
        per = {kind: auroc(bad[(k_sub == "clean") | (k_sub == kind)],
                           (k_sub == kind)[(k_sub == "clean") | (k_sub == kind)]) for kind in KINDS}
        kbad, knull = suspicion(s_kto[c].filter(pl.Series(m_kto)), dirs[c])
        kto_auc = auroc(-kbad, kto_labels[m_kto])  # desirable = positive, ranked by quality
        rows.append((c, per, kto_auc, nulls, knull, int(m_pool.sum()), int(m_kto.sum())))

    load_after = os.getloadavg()
    lines = [
        "# Quality benchmark: defect detection and KTO desirability (bench/bench_quality.py)",
        "",
        f"Command: `.venv/bin/python bench/bench_quality.py --rows {args.rows} --per-kind {args.per_kind} "
        f"--k {args.k} --max-tokens {args.max_tokens}{f' --kto {args.kto}' if args.kto else ''}"
        f"{f' --model {args.model}' if args.model else ''}`",
        "",
        f"Machine: {platform.machine()} CPU, {len(os.sched_getaffinity(0))} cores "
        f"(load average before {load_before[0]:.1f}, after {load_after[0]:.1f}: other jobs shared the cores), "
        f"torch {torch.__version__}. Total wall time {time.perf_counter() - t_all:.0f} s.",
        "",
        (f"Model for every likelihood/judge scorer: `{proxy}` ({n_params / 1e6:.2f}M parameters), "
         if args.model else
         f"Model for every likelihood/judge scorer: the tiny proxy `{Path(proxy).name}` "
         f"({n_params / 1e6:.2f}M parameters, trained on Alpaca rows [0, 40000), {proxy_s:.0f} s to "
         "train or load), ")
        + f"max_length {MAX_LENGTH}, transformers engine, {engine.config.dtype}. Embeddings: MiniLM "
        f"(all-MiniLM-L6-v2, instruction_response view; {embed_s:.0f} s for both pools).",
        "",
        "**Read the judge rows with care.** A ~1M-parameter proxy trained for minutes cannot follow the "
        "deita, BSDetector or UniEval instructions: deita/CLEAR/InstructMining-v3 numbers here measure the "
        "machinery on a model that is far too weak to judge, not the methods. With the released deita "
        "scorers or a 7B+ judge (any name or path via LMConfig) these columns mean what the papers say. "
        f"CLEAR runs with `reflection=\"probs\"` here: in `\"generate\"` mode (the paper's) the proxy answered "
        f"on template for {parsed} of {few.height * 2} reflection prompts ({few.height} rows) and the others "
        "are recorded as parse errors with a null confidence, by design.",
        "",
        f"Defect pool: Alpaca rows [40000, {40000 + args.rows}), {args.per_kind} rows per defect kind, "
        f"{int((kinds == 'clean').sum())} clean (real Alpaca, natural defects included). "
        f"KTO: {kto.height} rows ({int(kto_labels.sum())} desirable; {kto_skipped} rows skipped: an empty "
        "field or an exact duplicate). Cell = AUROC (1.0 = every defective row scores worse than every "
        "clean row; 0.5 = chance; below 0.5 = the scorer prefers the defect). Direction = the scorer's "
        "declared `higher_is_better`; "
        "null scores count as the most suspicious.",
        "",
        f"{', '.join(SUBSAMPLED)} are too slow on this CPU for every row (CLEAR generates k samples per row) and "
        f"run on a stratified subsample: {args.sub_per_kind} rows per defect kind + {args.sub_clean} clean, "
        f"and {args.sub_kto} + {args.sub_kto} KTO rows (column 'rows').",
        "",
        "| column | " + " | ".join(KINDS) + " | KTO desirable | rows (pool/KTO) | nulls (pool/KTO) |",
        "|---|" + "---|" * (len(KINDS) + 3),
    ]
    for c, per, kto_auc, nulls, knull, n_pool, n_kto in rows:
        lines.append(f"| {c} | " + " | ".join(fmt(per[k]) for k in KINDS)
                     + f" | {fmt(kto_auc)} | {n_pool}/{n_kto} | {nulls}/{knull} |")
    lines += ["", "Seconds per scorer (fresh score store; scorer order as listed; instructmining reads the "
              "deita and perplexity columns already computed):", "",
              "| scorer | defect pool s (rows) | KTO s (rows) |", "|---|---|---|"]
    for label, _, _ in SCORERS:
        n_p = sub_pool.height if label in SUBSAMPLED else pool.height
        n_k = sub_kto.height if label in SUBSAMPLED else kto.height
        lines.append(f"| {label} | {timings[('defects', label)]:.1f} ({n_p}) | {timings[('kto', label)]:.1f} ({n_k}) |")
    flags_line = ", ".join(f"{f}={int(s_pool[f'heur_{f}'].sum())}" for f in FLAGS)
    lines += ["", f"Heuristic flag counts on the defect pool: {flags_line}.", ""]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
