"""Embedding stage vs bare SentenceTransformer.encode, and the static fast path vs MiniLM (speed + agreement).

    .venv/bin/python bench/bench_embed.py [--rows 1000] [--agree-rows 3000] [--out bench/out/embed.md]

1. Overhead: the same Alpaca rows (instruction_response view, max_seq_length 128) through `embed()` with a
   fresh store (view building, length sort, chunking, float16 store write + read back) vs a bare
   `SentenceTransformer.encode(texts, batch_size=64, normalize_embeddings=True)`; interleaved, best of 2.
2. Speed-up: `minilm-static` vs `minilm` on the same rows, and static throughput on all of Alpaca.
3. Agreement on `--agree-rows` rows (user view, what clustering uses): k-means with the same k on both
   models' vectors (adjusted Rand, NMI), 10-NN overlap, and near-duplicate pairs (cos > 1 - eps) of the
   static model scored against MiniLM's pairs as the reference (precision / recall).

Helpers here (`alpaca_records`, `static_pool`) are reused by bench_kmeans.py and bench_semdedup.py.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("CURATE_PROGRESS", "0")

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

from curate.cluster import default_k, kmeans  # noqa: E402
from curate.embed import EmbeddingStore, embed, load_embedder, view_texts  # noqa: E402
from curate.ingest import dedup, ingest  # noqa: E402
from curate.run import Run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ALPACA = ROOT.parent / "shared" / "data" / "alpaca-52k" / "alpaca_data.jsonl"


def alpaca_records() -> pl.DataFrame:
    """All of Alpaca through the real ingest + exact dedup (51,974 records)."""
    run = Run(tempfile.mkdtemp(prefix="bench-alpaca-"))
    ingest(run, [str(ALPACA)])
    dedup(run)
    return pl.read_parquet(run.file("records.parquet"))


def static_pool(n: int, seed: int = 0) -> tuple[np.ndarray, str]:
    """n x 384 real-ish vectors: minilm-static embeddings of Alpaca's user and instruction+response views
    (104k real rows, cached in the embedding store); beyond that, perturbed copies (cos ~0.9 to a real row)."""
    df = alpaca_records()
    real = np.vstack([embed(df, model="minilm-static", view=v, max_seq_length=256).vectors
                      for v in ("user", "instruction_response")])
    if n <= len(real):
        return np.ascontiguousarray(real[:n]), f"{n:,} real minilm-static vectors (Alpaca, 2 views)"
    rng = np.random.default_rng(seed)
    extra = real[rng.integers(0, len(real), n - len(real))]
    extra = extra + rng.normal(0, 0.025, extra.shape).astype(np.float32)
    out = np.vstack([real, extra / np.linalg.norm(extra, axis=1, keepdims=True)]).astype(np.float32)
    return out, f"{len(real):,} real minilm-static vectors + {n - len(real):,} perturbed copies (cos ~0.9)"


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; load avg {os.getloadavg()}"


def _overhead(df: pl.DataFrame, model, view: str) -> dict[str, float]:
    texts = view_texts(df, view)
    bare_t, stage_t = [], []
    for _ in range(2):
        t = time.perf_counter()
        bare = model.model.encode(texts, batch_size=64, normalize_embeddings=True, show_progress_bar=False)
        bare_t.append(time.perf_counter() - t)
        with tempfile.TemporaryDirectory() as d:
            t = time.perf_counter()
            r = embed(df, model=model, view=view, batch_size=64, store=EmbeddingStore(d))
            stage_t.append(time.perf_counter() - t)
    cos = float((r.vectors * bare).sum(axis=1).min())
    return {"bare": min(bare_t), "stage": min(stage_t), "min_cos": cos, "bare_all": bare_t, "stage_all": stage_t}


def _pairs(X: np.ndarray, thr: float) -> set[tuple[int, int]]:
    S = X @ X.T
    i, j = np.nonzero(np.triu(S, 1) > thr)
    return set(zip(i.tolist(), j.tolist(), strict=True))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--agree-rows", type=int, default=3000)
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "embed.md"))
    a = ap.parse_args()
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    lines = [f"machine: {machine()}", f"command: .venv/bin/python bench/bench_embed.py {' '.join(sys.argv[1:])}"]
    df = alpaca_records()
    sample = df.sample(n=a.rows, seed=0)
    view = "instruction_response"
    t = time.perf_counter()
    minilm = load_embedder("minilm", max_seq_length=128)
    lines.append(f"minilm load: {time.perf_counter() - t:.1f} s")
    with tempfile.TemporaryDirectory() as d:  # a fresh models folder times the one-off distillation
        os.environ["CURATE_CACHE_DIR"], old = d, os.environ.get("CURATE_CACHE_DIR")
        t = time.perf_counter()
        load_embedder("minilm-static", max_seq_length=128)
        lines.append(f"minilm-static first use (distillation from the packaged MiniLM): "
                     f"{time.perf_counter() - t:.1f} s")
        if old is None:
            del os.environ["CURATE_CACHE_DIR"]
        else:
            os.environ["CURATE_CACHE_DIR"] = old
    static = load_embedder("minilm-static", max_seq_length=128)

    o = _overhead(sample, minilm, view)
    n_tok = int(sample["n_tokens"].sum())
    lines += ["", f"## 1. Stage overhead ({a.rows} Alpaca rows, {view}, max_seq_length 128, CPU float32)", "",
              "| path | seconds (best of 2) | rows/s | all runs |", "|---|---|---|---|",
              f"| bare SentenceTransformer.encode | {o['bare']:.1f} | {a.rows / o['bare']:.1f} | "
              f"{', '.join(f'{x:.1f}' for x in o['bare_all'])} |",
              f"| curate embed() (fresh store) | {o['stage']:.1f} | {a.rows / o['stage']:.1f} | "
              f"{', '.join(f'{x:.1f}' for x in o['stage_all'])} |", "",
              f"stage overhead: {100 * (o['stage'] / o['bare'] - 1):+.1f}% (target within 10%); "
              f"min cosine stage vs bare: {o['min_cos']:.5f} (float16 storage); "
              f"~{n_tok / o['stage']:.0f} word-piece-estimate tokens/s"]

    o2 = _overhead(sample, static, view)
    t = time.perf_counter()
    full = embed(df, model=static, view=view, store=False)
    t_full = time.perf_counter() - t
    n_full = full.vectors.shape[0]
    lines += ["", "## 2. Static fast path", "",
              "| model | rows | seconds | rows/s | speed-up vs minilm |", "|---|---|---|---|---|",
              f"| minilm (embed stage) | {a.rows} | {o['stage']:.1f} | {a.rows / o['stage']:.1f} | 1x |",
              f"| minilm-static (embed stage) | {a.rows} | {o2['stage']:.2f} | {a.rows / o2['stage']:.0f} | "
              f"{o['stage'] / o2['stage']:.0f}x |",
              f"| minilm-static, all of Alpaca | {n_full} | {t_full:.1f} | {n_full / t_full:.0f} | "
              f"{(n_full / t_full) / (a.rows / o['stage']):.0f}x |"]

    agree = df.sample(n=a.agree_rows, seed=1)
    Xm = embed(agree, model=minilm, view="user").vectors  # cached in the store after the first run
    Xs = embed(agree, model=static, view="user").vectors
    k = default_k(len(agree))
    km_m, km_s = kmeans(Xm, k, seed=0), kmeans(Xs, k, seed=0)
    km_m2 = kmeans(Xm, k, seed=1)
    ari, nmi = adjusted_rand_score(km_m.assign, km_s.assign), normalized_mutual_info_score(km_m.assign, km_s.assign)
    ari_self = adjusted_rand_score(km_m.assign, km_m2.assign)
    nmi_self = normalized_mutual_info_score(km_m.assign, km_m2.assign)
    nn_m = np.argsort(-(Xm @ Xm.T), axis=1)[:, 1:11]
    nn_s = np.argsort(-(Xs @ Xs.T), axis=1)[:, 1:11]
    nn = float(np.mean([len(set(x) & set(y)) / 10 for x, y in zip(nn_m, nn_s, strict=True)]))
    rng = np.random.default_rng(0)
    ia, ib = rng.integers(0, len(agree), 5000), rng.integers(0, len(agree), 5000)
    med_m, med_s = np.median((Xm[ia] * Xm[ib]).sum(1)), np.median((Xs[ia] * Xs[ib]).sum(1))
    lines += ["", f"## 3. Agreement, {a.agree_rows} Alpaca rows, user view", "",
              f"k-means k={k}, seed 0: adjusted Rand {ari:.3f}, NMI {nmi:.3f} between the two models' clusters "
              f"(MiniLM vs itself with seed 1: adjusted Rand {ari_self:.3f}, NMI {nmi_self:.3f}); "
              f"10-NN overlap {nn:.3f}; "
              f"median cosine of random pairs: minilm {med_m:.3f}, static {med_s:.3f}", "",
              "| near-dup threshold (cos >) | minilm pairs | static pairs | both | static precision | static recall |",
              "|---|---|---|---|---|---|"]
    for thr in (0.95, 0.9, 0.85):
        pm, ps = _pairs(Xm, thr), _pairs(Xs, thr)
        both = len(pm & ps)
        lines.append(f"| {thr} | {len(pm)} | {len(ps)} | {both} | {both / max(len(ps), 1):.2f} | "
                     f"{both / max(len(pm), 1):.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
