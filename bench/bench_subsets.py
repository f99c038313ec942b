"""Do curate's subsets train a better model than a random subset of the same size? (issue #7)

Real pool, real pipeline, a proxy fine-tune per subset, loss on reference answers nobody selected from:

1. Alpaca-52k is split once (seeded): 20,000 rows pre-train the fine-tuning base model, 1,000 rows are an
   in-distribution held-out set, and the remaining 31,002 rows are the pool.
2. The pool goes through `curate.pipeline.run_direct` with the default recipe (ingest, exact dedup,
   minilm-static embeddings, FAISS k-means, SemDeDup, heuristics + IFD from the pool-trained proxy), exactly as
   `curate select pool.jsonl --no-prefect` runs it.
3. Each arm picks `--budget` rows from that run's candidates (after SemDeDup), through the product's own
   `curate.selection.select_pool` (recipe -> strategy, default thresholds `heur_flags < 1`, `ifd < 1`):
   - random:           uniform over the candidates, no filters (what a user does without curate)
   - random+filters:   uniform over the rows that pass the default thresholds
   - top-IFD:          the highest IFD rows that pass the thresholds (score only, no diversity)
   - kMQ:              Diversify-and-Conquer's kMQ (clusters by size, IFD-weighted draws inside each)
   - deita:            score-first (IFD) greedy with the cosine-0.9 redundancy filter
   - iterative:        D&C iterative (3 rounds) with proxy fine-tune loss feedback (`--strategy iterative`)
4. Per subset: cluster coverage, Vendi score (cosine kernel, 2,000-row sample), mean nearest-neighbour
   similarity (minilm-static embeddings of the user turn: the view the pipeline clusters and runs deita on);
   then the base model is fine-tuned on it
   (`curate.lm.proxy.finetune_proxy`, 1 epoch, the `curate proxy finetune` defaults) and its mean response
   loss (nats/token) is measured on LIMA's 1,000 training answers (reference set) and on the Alpaca held-out
   rows. Seeds change the subset draw (where the arm is random) and the fine-tune's data order.

    .venv/bin/python bench/bench_subsets.py [--budget 3000] [--seeds 3] [--out bench/out/subsets]

Writes bench/results/subsets.md and bench/out/subsets/results.json. The pool run, the base model and each
fine-tune's numbers are cached in --out, so a re-run only computes what is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("CURATE_PROGRESS", "0")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

from curate.config import load_recipe  # noqa: E402
from curate.diversity import cluster_coverage, mean_nn_similarity, vendi_score  # noqa: E402
from curate.lm.proxy import eval_proxy, finetune_proxy, train_proxy  # noqa: E402
from curate.pipeline import pool, pool_vectors, records, run_direct  # noqa: E402
from curate.run import Run  # noqa: E402
from curate.select import Budget, RandomSubset, select  # noqa: E402
from curate.selection import select_pool  # noqa: E402

SHARED = Path(os.environ.get("CURATE_SHARED_DATA", ROOT.parent / "shared" / "data"))
ALPACA = SHARED / "alpaca-52k" / "alpaca_data.jsonl"
LIMA = SHARED / "lima" / "lima_train.jsonl"

ARMS = {  # name -> recipe overrides for select_pool (None: plain random over all candidates)
    "random": None,
    "random+filters": {"select.strategy": "random"},
    "top-IFD": {"select.strategy": "fusion", "select.fusion": {"ifd": 1.0}},
    "kMQ": {"select.strategy": "kmq"},
    "deita": {"select.strategy": "deita"},
    "iterative": {"select.strategy": "iterative", "select.rounds": 3},
}
DETERMINISTIC = {"top-IFD", "deita"}  # the subset does not depend on the seed (only the fine-tune does)


def split(out: Path, seed: int = 0, pool_rows: int | None = None) -> dict[str, Path]:
    paths = {k: out / f"{k}.jsonl" for k in ("base", "heldout", "pool")}
    if all(p.exists() for p in paths.values()):
        return paths
    lines = ALPACA.read_text().splitlines()
    order = np.random.default_rng(seed).permutation(len(lines))
    parts = {"base": order[:20000], "heldout": order[20000:21000], "pool": order[21000:][:pool_rows]}
    for k, idx in parts.items():
        paths[k].write_text("\n".join(lines[i] for i in sorted(idx)) + "\n")
    return paths


def pool_run(out: Path, pool_file: Path, budget: int) -> tuple[Run, dict]:
    run_dir = out / "pool-run"
    overrides = {"inputs": [str(pool_file)], "out": str(run_dir), "seed": 0, "select.budget": budget,
                 "report": False}
    recipe = load_recipe(None, overrides)
    if not (run_dir / "decisions.parquet").exists():
        t0 = time.perf_counter()
        run_direct(recipe)
        (out / "pool-run-seconds.txt").write_text(f"{time.perf_counter() - t0:.1f}\n")
    return Run(run_dir), overrides


def subset_ids(run: Run, base: dict, arm: str, budget: int, seed: int, candidates: pl.DataFrame) -> tuple[list, dict]:
    t0 = time.perf_counter()
    if ARMS[arm] is None:
        dec = select(candidates, RandomSubset(), Budget(rows=budget), seed=seed)
        info: dict = {}
    else:
        recipe = load_recipe(None, {**base, **ARMS[arm], "seed": seed})
        dec, info = select_pool(run, recipe, candidates)
    ids = dec.filter(pl.col("selected"))["id"].to_list()
    return ids, {"select_seconds": round(time.perf_counter() - t0, 1), **{
        k: v for k, v in info.items() if k in ("thresholds", "rounds")}}


def measure(ids: list[str], candidates: pl.DataFrame, X: np.ndarray, seed: int) -> dict:
    mask = candidates["id"].is_in(ids).to_numpy()
    rows = np.flatnonzero(mask)
    sub = candidates.filter(pl.Series(mask))
    return {
        "rows": int(rows.size),
        "cluster_coverage": cluster_coverage(candidates["cluster"].to_numpy()[rows], candidates["cluster"].to_numpy()),
        "vendi": vendi_score(X[rows], sample=2000, seed=seed),
        "nn_similarity": mean_nn_similarity(X[rows], sample=2000, seed=seed),
        "mean_ifd": float(sub["ifd"].mean()) if "ifd" in sub.columns else None,
        "mean_tokens": float(sub["n_tokens"].mean()),
    }


def finetune_eval(base_model: str, convs: list[dict], seed: int, refs: dict[str, Path]) -> dict:
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="curate-bench-ft-") as tmp:
        tuned = finetune_proxy(base_model, convs, Path(tmp) / "ft", seed=seed)
        out = {f"loss_{k}": eval_proxy(tuned, str(p)) for k, p in refs.items()}
    out["finetune_eval_seconds"] = round(time.perf_counter() - t0, 1)
    return out


def fmt(vals: list[float], digits: int = 3) -> str:
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{statistics.mean(vals):.{digits}f} ± {statistics.stdev(vals):.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=int, default=3000)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--pool-rows", type=int, default=None, help="smaller pool, for a quick check of the script")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "subsets")
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "subsets.md")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("CURATE_CACHE_DIR", str(args.out / "cache"))
    started = time.strftime("%Y-%m-%d %H:%M")
    load0 = os.getloadavg()[0]

    files = split(args.out, pool_rows=args.pool_rows)
    refs = {"lima": LIMA, "alpaca_heldout": files["heldout"]}
    run, base_overrides = pool_run(args.out, files["pool"], args.budget)
    base_dir = args.out / "base-model"
    if not (base_dir / "curate_proxy.json").exists():
        train_proxy(str(files["base"]), base_dir, seed=0, steps=None if args.pool_rows is None else 30)
    base_meta = json.loads((base_dir / "curate_proxy.json").read_text())

    candidates = pool(run)
    pos = candidates.select("id").join(records(run, ["id"]).with_row_index("_p"), on="id", how="left",
                                       maintain_order="left")["_p"].to_numpy()
    X = pool_vectors(run, load_recipe(None, base_overrides))[pos].astype(np.float32)
    messages = dict(zip(candidates["id"].to_list(), candidates["messages"].to_list(), strict=True))

    cache_file = args.out / "results.json"
    cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    key_base = f"budget={args.budget}"
    if "base" not in cache:
        cache["base"] = {f"loss_{k}": eval_proxy(str(base_dir), str(p)) for k, p in refs.items()}
    for arm in args.arms.split(","):
        for seed in range(args.seeds):
            key = f"{key_base}|{arm}|{seed}"
            if key in cache:
                continue
            print(f"[{time.strftime('%H:%M:%S')}] {arm} seed {seed}", flush=True)
            ids, info = subset_ids(run, base_overrides, arm, args.budget, seed, candidates)
            res = {"arm": arm, "seed": seed, **measure(ids, candidates, X, seed), **info}
            res.update(finetune_eval(str(base_dir), [{"messages": messages[i]} for i in ids], seed, refs))
            cache[key] = res
            cache_file.write_text(json.dumps(cache, indent=1, default=str) + "\n")
            print(json.dumps({k: v for k, v in res.items() if k != "rounds"}, default=str), flush=True)
    cache_file.write_text(json.dumps(cache, indent=1, default=str) + "\n")
    write_md(args, run, cache, key_base, base_meta, started, load0)


def write_md(args, run: Run, cache: dict, key_base: str, base_meta: dict, started: str, load0: float) -> None:
    m = run.manifest
    st = m["stages"]
    pool_secs = (args.out / "pool-run-seconds.txt").read_text().strip() if (
        args.out / "pool-run-seconds.txt").exists() else "?"
    by_arm: dict[str, list[dict]] = {}
    for k, v in cache.items():
        if k.startswith(key_base + "|"):
            by_arm.setdefault(v["arm"], []).append(v)
    rnd = by_arm.get("random", [])
    lines = [
        "# Subsets vs random: diversity and proxy fine-tune loss on a real pool (`bench/bench_subsets.py`)",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, no GPU. Run started {started} "
        f"(load average {load0:.2f}); finished {time.strftime('%Y-%m-%d %H:%M')} "
        f"(load average {os.getloadavg()[0]:.2f}). Command:",
        "",
        f"    .venv/bin/python bench/bench_subsets.py --budget {args.budget} --seeds {args.seeds}",
        "",
        "Setup (see the script's docstring): Alpaca-52k split once into 20,000 rows that pre-train the base "
        f"model, 1,000 held-out rows and a {st['ingest']['rows_in']:,}-row pool. The pool went through the "
        "default pipeline "
        f"(`run_direct`, {pool_secs} s on this machine): {st['ingest']['rows_out']} records after exact dedup, "
        f"{st['semdedup']['rows_out'] if 'semdedup' in st else '?'} after SemDeDup, "
        f"{st['cluster'].get('k', '?')} clusters, heuristics + IFD from the pool-trained proxy. "
        f"Every arm picks {args.budget} rows from those candidates. Base model for the fine-tunes: a "
        f"{base_meta['params']:,}-parameter LLaMA proxy trained {base_meta['train']['steps']} steps on the "
        f"20,000 base rows; fine-tune: 1 epoch, lr 1e-3, batch 16, max length 512 (the `curate proxy finetune` "
        f"defaults). Loss = mean response loss in nats/token (lower is better) on LIMA's 1,000 training "
        f"answers and on the 1,000 Alpaca held-out rows. Base model before any fine-tune: LIMA "
        f"{cache['base']['loss_lima']:.3f}, Alpaca held-out {cache['base']['loss_alpaca_heldout']:.3f}.",
        "",
        f"Seeds: {args.seeds} per arm (mean ± sample std). top-IFD and deita choose the same rows for every seed, "
        "so their spread is the fine-tune's own noise; random, kMQ and iterative also redraw the subset.",
        "",
        "| arm | cluster coverage | Vendi | mean NN cos | mean IFD | mean tokens | LIMA loss | Δ vs random | "
        "Alpaca held-out loss | Δ vs random |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for arm in ARMS:
        rs = by_arm.get(arm)
        if not rs:
            continue

        def col(name: str, d: int = 3, rs=rs) -> str:
            vals = [r[name] for r in rs if r.get(name) is not None]
            return fmt(vals, d) if vals else ""

        def delta(name: str, rs=rs, arm=arm) -> str:
            if not rnd or arm == "random":
                return ""
            return f"{statistics.mean(r[name] for r in rs) - statistics.mean(r[name] for r in rnd):+.3f}"

        lines.append(f"| {arm} | {col('cluster_coverage')} | {col('vendi', 1)} | {col('nn_similarity')} | "
                     f"{col('mean_ifd')} | {col('mean_tokens', 0)} | {col('loss_lima')} | {delta('loss_lima')} | "
                     f"{col('loss_alpaca_heldout')} | {delta('loss_alpaca_heldout')} |")
    it = by_arm.get("iterative")
    if it and it[0].get("rounds"):
        lines += ["", "Iterative rounds (seed 0): rows added per round and the seconds each feedback took "
                  "(fine-tune on the rows so far + loss on the per-cluster probe):", ""]
        for r in it[0]["rounds"]:
            fb = r.get("feedback") or {}
            lines.append(f"- round {r['round']}: {r['rows']} rows"
                         + (f"; feedback from {fb['trained_rows']} rows, {fb['probe_rows']} probe rows, "
                            f"{fb['seconds']} s, cluster loss {min(fb['loss'].values()):.2f}–"
                            f"{max(fb['loss'].values()):.2f} nats" if fb else ""))
    lines += ["", "Timings per arm and seed (select, fine-tune + 2 evals) are in bench/out/subsets/results.json.", ""]
    args.results.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
