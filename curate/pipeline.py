"""The pipeline: one ordered list of stages, built once from the recipe, run the same way by every executor.

    ingest -> embed[shard] -> cluster -> semdedup -> model -> sample -> score:<name>[shard] -> collect-scores
           -> select -> export -> report            (semdedup moves after collect-scores when `semdedup.keep: score`)

A `Stage` declares what it reads and writes in the run folder (or in a store, as `@name`), the recipe sections
and code modules its output depends on, and whether it runs per shard of the records. Everything an executor
needs follows from that: the order of work, the cache key of each stage (recipe sections + the source of its
code, followed through imports + the keys of the stages it reads from), the output files to check on a cache
hit. `run_stage` is the one place a stage is run or served from the cache; `run_local` (here) and the Prefect
flow (`flows/pipeline.py`) only decide where and when to call it.

Stage results are small JSON documents under cache_dir()/stages (never pickles: a cache file can only hold
data, so a shared cache cannot run code). Each stage records its own manifest entries; the executor merges
them into manifest.json, so there is one writer.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from curate.config import Recipe
from curate.context import RunContext
from curate.decisions import build_decisions
from curate.fingerprint import code_fingerprint
from curate.progress import check_stop
from curate.run import Run, atomic_path, cache_dir, drop_leftovers, run_lock, sha256_file, write_parquet

Shard = tuple[int, int]

#: recipe fields that never change a stage's output (speed, placement): left out of every cache key
NOT_IN_KEY = frozenset({"embed.enabled", "embed.batch_size", "score.batch_size", "score.shards", "score.scorers",
                        "score.params", "score.vllm_urls"})


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline and what it touches; `fn(ctx, shard)` does the work and returns a small dict."""

    name: str
    fn: Callable[..., dict[str, Any]]
    reads: tuple[str, ...] = ()  # run-folder files, or "@store" names written by an earlier stage
    writes: tuple[str, ...] = ()
    sections: tuple[str, ...] = ()  # recipe fields (dotted) the output depends on
    modules: tuple[str, ...] = ()  # project modules it runs (their imports are followed)
    sharded: bool = False  # runs once per shard of records.parquet (work that lands in a store)
    cached: bool = True
    args: tuple[Any, ...] = field(default=())

    def __call__(self, ctx: RunContext, shard: Shard | None = None) -> dict[str, Any]:
        return self.fn(ctx, *self.args, shard=shard) if self.sharded else self.fn(ctx, *self.args)

    def files(self) -> tuple[str, ...]:
        """The run-folder files it writes (checked on a cache hit)."""
        return tuple(w for w in self.writes if not w.startswith("@"))


# ================================================================================================ the stages


def stage_ingest(ctx: RunContext) -> dict[str, Any]:
    """Inputs -> records.parquet (+ rejects, duplicates); per-file counts in the manifest."""
    from curate.ingest import dedup, ingest

    r = ctx.recipe
    counts = ingest(ctx.run, r.inputs, fmt=r.ingest.format, container=r.ingest.container, split=r.ingest.split)
    kept, dups = dedup(ctx.run)
    return {"rows": sum(c.rows for c in counts.values()), "records": kept, "duplicates": dups}


def shard_bounds(n: int, shards: int) -> list[Shard]:
    """Split range(n) into `shards` contiguous, nearly equal (start, stop) pairs."""
    shards = max(1, min(shards, n)) if n else 1
    edges = np.linspace(0, n, shards + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def _slice(df: pl.DataFrame, shard: Shard | None) -> pl.DataFrame:
    return df if shard is None else df.slice(shard[0], shard[1] - shard[0])


def stage_embed(ctx: RunContext, shard: Shard | None = None) -> dict[str, Any]:
    """Embed records (or one shard of them) into the embedding store; only unseen ids are computed."""
    from curate.embed import embed

    cfg = ctx.recipe.embed
    df = _slice(ctx.records(["id", "messages", "instruction", "response"]), shard)
    res = embed(df, model=cfg.model, view=cfg.view, batch_size=cfg.batch_size, max_seq_length=cfg.max_seq_length)
    return {"rows": df.height, "new": res.n_new, "cached": res.n_cached, "seconds": res.seconds,
            "model": res.model_signature}


def stage_cluster(ctx: RunContext) -> dict[str, Any]:
    """k-means over the pool -> clusters.parquet (id, cluster, distance), centroids.npy, map2d.parquet."""
    from sklearn.decomposition import PCA

    from curate.cluster import kmeans

    t0 = time.perf_counter()
    r, run = ctx.recipe, ctx.run
    ids = ctx.records(["id"])["id"]
    X = ctx.vectors()
    res = kmeans(X, r.cluster.k, seed=r.seed, niter=r.cluster.niter)
    write_parquet(pl.DataFrame({"id": ids, "cluster": res.assign, "distance": res.distance}).to_arrow(),
                  run.file("clusters.parquet"))
    with atomic_path(run.file("centroids.npy")) as tmp, open(tmp, "wb") as fh:
        np.save(fh, res.centroids)
    xy = PCA(n_components=2, random_state=r.seed).fit_transform(X) if len(X) > 2 else np.zeros((len(X), 2))
    write_parquet(pl.DataFrame({"id": ids, "x": xy[:, 0], "y": xy[:, 1]}).to_arrow(), run.file("map2d.parquet"))
    run.stage("cluster", rows_in=len(ids), rows_out=len(ids), seconds=time.perf_counter() - t0,
              k=int(res.k), objective=float(res.objective), embed_model=r.embed.model, embed_view=r.embed.view)
    return {"k": int(res.k)}


def stage_semdedup(ctx: RunContext) -> dict[str, Any]:
    """Drop near-duplicates inside each cluster -> semdedup.parquet (id, duplicate_of, similarity)."""
    from curate.cluster import semdedup

    t0 = time.perf_counter()
    cfg = ctx.recipe.semdedup
    ids = ctx.records(["id"])["id"]
    empty = pl.DataFrame(schema={"id": pl.String, "duplicate_of": pl.String, "similarity": pl.Float32})
    if not cfg.enabled:
        dropped = empty
    else:
        # near-duplicates are judged on instruction + response: rows that only share a question are not copies
        X = ctx.vectors(cfg.view)
        cl = pl.read_parquet(ctx.run.file("clusters.parquet"))
        scores = _score_column(ctx.run, cfg.keep_score, ids) if cfg.keep == "score" else None
        res = semdedup(X, cl["cluster"].to_numpy(), cl["distance"].to_numpy(), eps=cfg.eps, keep=cfg.keep,
                       scores=scores, seed=ctx.recipe.seed)
        idx, dup = res["index"].to_numpy(), res["duplicate_of"].to_numpy()
        dropped = pl.DataFrame({"id": ids.gather(idx), "duplicate_of": ids.gather(dup),
                                "similarity": res["similarity"].cast(pl.Float32)}) if len(idx) else empty
    write_parquet(dropped.to_arrow(), ctx.run.file("semdedup.parquet"))
    ctx.run.stage("semdedup", rows_in=len(ids), rows_out=len(ids) - dropped.height,
                  dropped={"semantic_duplicate": dropped.height}, seconds=time.perf_counter() - t0,
                  eps=cfg.eps, keep=cfg.keep, view=cfg.view, enabled=cfg.enabled)
    return {"dropped": dropped.height}


def _score_column(run: Run, column: str | None, ids: pl.Series) -> np.ndarray:
    if not column:
        raise ValueError("semdedup.keep = 'score' needs semdedup.keep_score (a score column)")
    path = run.file("scores.parquet")
    if not path.exists():
        raise ValueError(f"semdedup.keep_score {column!r}: no scores were computed (add a scorer that writes it)")
    sc = pl.read_parquet(path)
    if column not in sc.columns:
        raise ValueError(f"semdedup.keep_score {column!r} is not a score column ({', '.join(sc.columns[1:])})")
    return pl.DataFrame({"id": ids}).join(sc, on="id", how="left")[column].to_numpy()


def stage_model(ctx: RunContext) -> dict[str, Any]:
    """Resolve `score.model` once, before the scoring shards fan out ("proxy" trains a small LM, pinned)."""
    model = ctx.model()
    return {"model": model, "fingerprint": model}


def stage_sample(ctx: RunContext, timed: tuple[str, ...] = ()) -> dict[str, Any]:
    """Which rows the LM scores: the whole pool, or (score.sample / score.minutes on a large pool) a sample
    stratified by cluster -> score_sample.parquet. The rest is predicted after scoring (curate.distill).

    When `score.minutes` decides (no score.sample, no GPU, a pool over the whole-pool threshold), the rows that
    fit are minutes x the rate MEASURED here: the `timed` scorers run through the run's engine on a fixed
    calibration batch of pool rows (`CALIBRATION_ROWS`, chosen by the seed). With the assumed rate (curate.plan,
    measured once on an idle machine) the README's main command took 25 min instead of ~10 on a loaded CPU
    (issue #15). The rate, its calibration and
    the assumed rate it replaced go to the manifest; the stage result is cached, so a re-run of the folder
    reuses them. Only when the timing itself fails is the assumed rate used, and the manifest says why."""
    from curate.distill import SMALL_POOL, choose_sample, sample_size
    from curate.plan import gpu_available, lm_rows_per_second

    cfg, run = ctx.recipe.score, ctx.run
    recs = ctx.records(["id"])
    clusters = None
    if run.file("clusters.parquet").exists():
        clusters = recs.join(pl.read_parquet(run.file("clusters.parquet")), on="id", how="left")["cluster"]
        clusters = clusters.fill_null(-1).to_numpy()
    gpu = gpu_available()
    rate: dict[str, Any] | None = None
    if cfg.minutes and cfg.sample is None and not gpu and recs.height > SMALL_POOL:
        rate = _lm_rate(ctx, recs["id"], list(timed), lm_rows_per_second(ctx.recipe))
    n = sample_size(recs.height, sample=cfg.sample, minutes=cfg.minutes, engine_is_gpu=gpu,
                    rows_per_second=rate["rows_per_second"] if rate else None)
    ids = recs["id"].to_list() if n >= recs.height else choose_sample(recs["id"], clusters, n, ctx.recipe.seed)
    write_parquet(pl.DataFrame({"id": ids}, schema={"id": pl.String}).to_arrow(), run.file("score_sample.parquet"))
    run.set("score_sample", {"pool": recs.height, "sample": len(ids), "sample_option": cfg.sample,
                             "minutes": cfg.minutes, "stratified_by": "cluster" if clusters is not None else None,
                             "rate": rate})
    return {"sample": len(ids), "pool": recs.height}


#: pool rows timed to measure the LM scoring rate (after a warm-up on the first WARMUP_ROWS of them)
CALIBRATION_ROWS = 32
WARMUP_ROWS = 4


def calibration_rows(ids: pl.Series, seed: int) -> np.ndarray:
    """Positions of the CALIBRATION_ROWS rows timed for the LM rate: lowest seeded hash rank, in pool order."""
    from curate.distill import hash_rank

    return np.sort(np.argsort(hash_rank(ids.to_list(), seed), kind="stable")[:CALIBRATION_ROWS])


def _lm_rate(ctx: RunContext, ids: pl.Series, timed: list[str], assumed: float | None) -> dict[str, Any]:
    """Rows/s of the timed scorers together, measured on CALIBRATION_ROWS pool rows (lowest seeded hash rank,
    so the same rows for the same pool and seed), or the assumed rate with the reason it was not measured.
    The engine is loaded outside the timing: a model that cannot load fails the run here, as scoring would."""
    from curate.scoring.recipe import measure_rate

    calib = ids.gather(calibration_rows(ids, ctx.recipe.seed))
    info: dict[str, Any] = {"source": "measured", "scorers": timed, "assumed_rows_per_second": assumed,
                            "assumed_from": f"curate.plan PASS_RATES[{ctx.recipe.score.model!r}] / passes per row"}
    if timed:
        ctx.engine()  # load errors are the user's to see, not a reason to assume a rate
    try:
        if not timed:
            raise ValueError("no scorer to time")
        info.update(measure_rate(ctx, calib, timed, warmup=WARMUP_ROWS))
        info["rows_per_second"] = round(info["rows_per_second"], 4)
    except Exception as e:  # noqa: BLE001 - any failure of the timing falls back to the assumed rate, said so
        if not assumed:
            raise
        info.update(source="assumed", rows_per_second=assumed, error=f"{type(e).__name__}: {e}")
    return info


def stage_score(ctx: RunContext, scorer_name: str, shard: Shard | None = None) -> dict[str, Any]:
    """Score records (or one shard) with one scorer into the score store; only unscored ids are computed.

    An LM scorer with a sample scores the sample's share of the shard (shard bounds are over records)."""
    from curate.scoring.recipe import score_records, scored_rows

    recs = ctx.records()
    rows = scored_rows(ctx, scorer_name, recs)
    if shard is not None and rows.height != recs.height:
        m, n = rows.height, max(recs.height, 1)
        shard = (shard[0] * m // n, shard[1] * m // n)
    return score_records(ctx, scorer_name, _slice(rows, shard))


def stage_collect_scores(ctx: RunContext) -> dict[str, Any]:
    """Gather every scorer's columns from the store into scores.parquet (id + one column per score)."""
    from curate.scoring.recipe import collect_scores

    t0 = time.perf_counter()
    ids = ctx.records(["id"])
    table = collect_scores(ctx, ids)
    write_parquet(table.to_arrow(), ctx.run.file("scores.parquet"))
    ctx.run.stage("score", rows_in=ids.height, rows_out=ids.height, seconds=time.perf_counter() - t0,
                  scorers=ctx.recipe.score.scorers, columns=table.columns[1:])
    return {"columns": table.columns[1:]}


def stage_select(ctx: RunContext) -> dict[str, Any]:
    """Choose the subset -> selected.parquet + decisions.parquet (one row per input row)."""
    from curate.select.recipe import select_pool

    t0 = time.perf_counter()
    run, recipe = ctx.run, ctx.recipe
    candidates = ctx.pool()
    pool_decisions, info = select_pool(ctx, candidates)
    decisions = build_decisions(run, pool_decisions)
    write_parquet(decisions.to_arrow(), run.file("decisions.parquet"))
    chosen = pool_decisions.filter(pl.col("selected")).select("id", "rank_in_cluster")
    full = ctx.records().join(chosen, on="id", how="inner")
    for name in ("clusters.parquet", "scores.parquet"):
        if run.file(name).exists():
            full = full.join(pl.read_parquet(run.file(name)), on="id", how="left")
    full = full.sort("source", "row")
    write_parquet(full.to_arrow(), run.file("selected.parquet"))
    reasons = dict(decisions.group_by("reason").len().sort("reason").iter_rows())
    run.stage("select", rows_in=candidates.height, rows_out=full.height,
              dropped={"not_selected": candidates.height - full.height}, seconds=time.perf_counter() - t0,
              strategy=recipe.select.strategy, reasons=reasons, **info)
    run.set("totals", {"input_rows": decisions.height, "selected": full.height, "reasons": reasons})
    return {"selected": full.height}


def stage_export(ctx: RunContext) -> dict[str, Any]:
    """The trainer hand-off next to selected.parquet: Alpaca / ShareGPT JSONL if asked, and always a
    LLaMA-Factory dataset_info.json and a dataset card (README.md) that name the files written."""
    from curate.io.writers import EXPORT_FORMATS, export, write_handoff

    run = ctx.run
    # an export made earlier by `curate export` still holds the previous subset, and the card and dataset_info.json
    # would list it as this one: it is written again from the new selected.parquet
    earlier = [f for f in EXPORT_FORMATS if f not in ctx.recipe.export and run.file(f"selected.{f}.jsonl").exists()]
    exports = {fmt: export(run.file("selected.parquet"), fmt, run.file(f"selected.{fmt}.jsonl"), handoff=False)
               for fmt in (*ctx.recipe.export, *earlier)}
    written, notes = write_handoff(run.file("selected.parquet"), run.path, exports=exports)
    notes += [f"{exports[f]}: an earlier export, rewritten for this subset" for f in earlier]
    return {"files": [str(p) for p in [*exports.values(), *written]], "notes": notes}


def stage_report(ctx: RunContext) -> dict[str, Any]:
    from curate.report import write_report

    return {"report": str(write_report(ctx.run.path))}


# ================================================================================================ the list


def build_pipeline(recipe: Recipe) -> list[Stage]:
    """The stages this recipe runs, in order. Every executor runs exactly this list."""
    from curate.scoring.recipe import make_scorer, ordered, sampled, uses_engine

    S = Stage
    stages = [S("ingest", stage_ingest, reads=("@inputs",),
                writes=("records_all.parquet", "records.parquet", "rejects.parquet", "duplicates.parquet"),
                sections=("ingest",), modules=("curate.ingest",))]
    embedded = recipe.embed.enabled
    if embedded:
        stages += [
            S("embed", stage_embed, reads=("records.parquet",), writes=("@embeddings",), sections=("embed",),
              modules=("curate.embed",), sharded=True),
            S("cluster", stage_cluster, reads=("records.parquet", "@embeddings"),
              writes=("clusters.parquet", "centroids.npy", "map2d.parquet"), sections=("embed", "cluster", "seed"),
              modules=("curate.cluster", "curate.context")),
        ]
    semdedup = S("semdedup", stage_semdedup, reads=("records.parquet", "clusters.parquet", "@embeddings"),
                 writes=("semdedup.parquet",), sections=("embed", "semdedup", "seed"),
                 modules=("curate.cluster", "curate.context"))
    late_semdedup = embedded and recipe.semdedup.enabled and recipe.semdedup.keep == "score"
    if embedded and not late_semdedup:
        stages.append(semdedup)
    names = ordered(recipe, recipe.score.scorers)
    lm = sampled(recipe)
    if names and uses_engine(recipe):
        stages.append(S("model", stage_model, reads=("records.parquet",), writes=("@model",),
                        sections=("score.model", "seed"), modules=("curate.context",), cached=False))
    if lm:
        stages.append(sample_stage(recipe))
    for name in names:
        scorer = make_scorer(recipe, name)
        reads = ["records.parquet"] + ["@model"] * bool(scorer.needs.engine) + ["score_sample.parquet"] * (name in lm)
        reads += ["@embeddings"] * bool(scorer.needs.embeddings) + [f"@scores:{d}" for d in scorer.needs.scores]
        stages.append(S(f"score:{name}", stage_score, reads=tuple(reads), writes=(f"@scores:{name}",),
                        sections=("score", f"score.params.{name}") + ("embed",) * bool(scorer.needs.embeddings),
                        modules=(type(scorer).__module__, "curate.scoring.recipe"), sharded=True, args=(name,)))
    if names:
        stages.append(S("collect-scores", stage_collect_scores,
                        reads=("records.parquet", "score_sample.parquet", *(f"@scores:{n}" for n in names)),
                        writes=("scores.parquet",), sections=("score", "embed", "seed")
                        + tuple(f"score.params.{n}" for n in names), modules=("curate.scoring.recipe",)))
    if late_semdedup:
        stages.append(S("semdedup", stage_semdedup, reads=semdedup.reads + ("scores.parquet",),
                        writes=semdedup.writes, sections=semdedup.sections, modules=semdedup.modules))
    pool_files = ("records.parquet", "rejects.parquet", "duplicates.parquet", "semdedup.parquet",
                  "clusters.parquet", "scores.parquet", "@embeddings")
    iterative = recipe.select.strategy == "iterative"
    reads = pool_files + ("@model",) * iterative
    # iterative: its feedback fine-tunes and measures the scoring LM in the scoring dtype, so that dtype is in its key
    stages.append(S("select", stage_select, reads=reads, writes=("selected.parquet", "decisions.parquet"),
                    sections=("select", "seed", "embed", "score.max_length") + ("score.dtype",) * iterative,
                    modules=("curate.select.recipe", "curate.select", "curate.context", "curate.diversity")))
    stages.append(S("export", stage_export, reads=("selected.parquet",),
                    writes=(*(f"selected.{f}.jsonl" for f in recipe.export), "dataset_info.json"),
                    sections=("export",), modules=("curate.io.writers",)))
    if recipe.report:
        stages.append(S("report", stage_report, reads=("selected.parquet", "decisions.parquet", *pool_files),
                        writes=("report.html",), modules=("curate.report",)))
    return stages


def sample_stage(recipe: Recipe) -> Stage:
    """The sample stage. With `score.minutes` deciding (no `score.sample`) it times the LM scorers on the
    run's model, so it reads the model (and the embeddings a timed scorer needs) and its key follows what
    changes the rate: the scorers timed (its args), their params, engine kind, dtype and max_length."""
    from curate.scoring.recipe import make_scorer, timed_scorers

    sections: tuple[str, ...] = ("score.sample", "score.minutes", "score.model", "seed")
    reads: tuple[str, ...] = ("records.parquet", "clusters.parquet")
    modules: tuple[str, ...] = ("curate.distill", "curate.plan")
    timed: tuple[str, ...] = ()
    if recipe.score.minutes is not None and recipe.score.sample is None:
        timed = tuple(timed_scorers(recipe))
        scorers = [make_scorer(recipe, n) for n in timed]
        sections += ("score.engine", "score.dtype", "score.max_length", *(f"score.params.{n}" for n in timed))
        reads += ("@model",) + ("@embeddings",) * any(s.needs.embeddings for s in scorers)
        modules += ("curate.scoring.recipe", "curate.context", *sorted({type(s).__module__ for s in scorers}))
    return Stage("sample", stage_sample, reads=reads, writes=("score_sample.parquet",), sections=sections,
                 modules=modules, args=(timed,) if timed else ())


def dependencies(stages: list[Stage]) -> dict[str, list[str]]:
    """For each stage, the earlier stages that write what it reads (the latest writer of each name)."""
    out: dict[str, list[str]] = {}
    writer: dict[str, str] = {}
    for st in stages:
        out[st.name] = sorted({writer[r] for r in st.reads if r in writer})
        for w in st.writes:
            writer[w] = st.name
    return out


# ================================================================================================ cache keys


def _section(rj: dict[str, Any], dotted: str) -> Any:
    value: Any = rj
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if isinstance(value, dict):
        value = {k: v for k, v in value.items() if f"{dotted}.{k}" not in NOT_IN_KEY}
    return value


def input_fingerprints(inputs: list[str]) -> dict[str, str]:
    """sha256 per input file/folder (a hub name that is not a local path stands for itself)."""
    return {src: sha256_file(Path(src)) if Path(src).exists() else f"name:{src}" for src in inputs}


def stage_key(stage: Stage, recipe_json: dict[str, Any], run_dir: str, upstream: dict[str, str],
              roots: dict[str, Path] | None = None) -> str:
    """sha256 of what decides a stage's output: its recipe sections, its code, its inputs (the keys of the
    stages it reads from, or the input files' content for ingest) and the run folder it writes to."""
    doc = {
        "stage": stage.name, "args": list(stage.args), "run": run_dir,
        "sections": {s: _section(recipe_json, s) for s in stage.sections},
        "code": code_fingerprint(stage.modules, inspect.getsource(stage.fn), roots),
        "upstream": upstream,
    }
    if "@inputs" in stage.reads:
        doc["inputs"] = input_fingerprints(recipe_json["inputs"])
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:32]


def shard_key(key: str, shard: Shard | None) -> str:
    return key if shard is None else f"{key}-{shard[0]}-{shard[1]}"


# ================================================================================================ running a stage


def _results_dir() -> Path:
    d = cache_dir() / "stages"
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    return d


def load_result(key: str) -> dict[str, Any] | None:
    """A stored stage result (plain JSON: data only), or None when absent or unreadable."""
    path = _results_dir() / f"{key}.json"
    try:
        res = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return res if isinstance(res, dict) and res.get("key") == key else None


def _save_result(key: str, res: dict[str, Any]) -> None:
    path = _results_dir() / f"{key}.json"
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(res, default=str))
        os.chmod(tmp, 0o600)


def _intact(run_dir: Path, outputs: dict[str, str]) -> bool:
    """Are the files a stored result says its stage wrote still there, unchanged?"""
    return all((run_dir / n).exists() and sha256_file(run_dir / n) == sha for n, sha in outputs.items())


def run_stage(stage: Stage, run_dir: str, recipe: Recipe, key: str, shard: Shard | None = None,
              refresh: bool = False) -> dict[str, Any]:
    """Run one stage (or one shard of it), or serve it from the stage cache when its key and outputs match.

    Returns {key, stage, shard, cached, info, outputs, manifest, seconds}: `manifest` holds the entries the
    stage recorded, for the executor to merge.
    """
    check_stop()  # Ctrl-C: a queued stage or shard does not start
    k = shard_key(key, shard)
    if stage.cached and not refresh:
        res = load_result(k)
        if res is not None and _intact(Path(run_dir), res.get("outputs", {})):
            return {**res, "cached": True}
    t0 = time.perf_counter()
    run = Run(run_dir, autosave=False)
    try:
        info = stage(RunContext(run, recipe), shard) or {}
    except BaseException:
        if run.updates:  # what the stage recorded before it failed (counts that did not add up, totals) is kept
            on_disk = Run(run_dir, autosave=False)
            on_disk.merge(run.updates)
            on_disk.save()
        raise
    outputs = {n: sha256_file(run.file(n)) for n in stage.files() if run.file(n).exists()}
    res = {"key": k, "stage": stage.name, "shard": list(shard) if shard else None, "info": info,
           "outputs": outputs, "manifest": run.updates, "seconds": round(time.perf_counter() - t0, 3)}
    if stage.cached:
        _save_result(k, res)
    return {**res, "cached": False}


def refresh_requested() -> bool:
    return os.environ.get("CURATE_REFRESH", os.environ.get("PREFECT_TASKS_REFRESH_CACHE", "")).lower() in (
        "1", "true", "yes")


# ================================================================================================ executors


def open_run(recipe: Recipe) -> Run:
    run = Run(recipe.out, autosave=False)
    run.manifest["config"] = recipe.model_dump(mode="json")
    run.save()
    return run


class Plan:
    """The stage list of a recipe with its dependencies and keys, computed as stages finish."""

    def __init__(self, recipe: Recipe, run_dir: str, roots: dict[str, Path] | None = None):
        self.recipe = recipe
        self.roots = roots  # another source tree for the code fingerprints (tests)
        self.rj = recipe.model_dump(mode="json")
        self.run_dir = run_dir
        self.stages = build_pipeline(recipe)
        self.deps = dependencies(self.stages)
        self.keys: dict[str, str] = {}  # stage -> key (what later stages chain on)

    def key(self, stage: Stage) -> str:
        k = stage_key(stage, self.rj, self.run_dir, {d: self.keys[d] for d in self.deps[stage.name]}, self.roots)
        self.keys[stage.name] = k
        return k

    def done(self, stage: Stage, result: dict[str, Any]) -> None:
        """An uncached stage chains on what it produced (e.g. the resolved model), not on its key."""
        fp = result.get("info", {}).get("fingerprint")
        if fp is not None:
            self.keys[stage.name] = hashlib.sha256(f"{self.keys[stage.name]}|{fp}".encode()).hexdigest()[:32]

    def shards(self, n_records: int) -> list[Shard]:
        return shard_bounds(n_records, self.recipe.score.shards)


def summarise(run: Run, results: dict[str, dict[str, Any]], seconds: float) -> dict[str, Any]:
    """The executor's record of what ran: per task computed/cached and its seconds."""
    states = {name: "Cached" if r["cached"] else "Completed" for name, r in results.items()}
    return {"tasks": states, "computed": sum(s != "Cached" for s in states.values()),
            "cached": sum(s == "Cached" for s in states.values()), "seconds": round(seconds, 3),
            "task_seconds": {n: r["seconds"] for n, r in results.items() if not r["cached"]}}


def task_name(stage: Stage, shard: Shard | None) -> str:
    return stage.name if shard is None else f"{stage.name}-{shard[0]}-{shard[1]}"


def run_local(recipe: Recipe) -> Run:
    """Every stage in order, in this process, without Prefect; same stages, keys and cache as the flow (which
    holds the same run-folder lock and drops the same leftovers: `flows/pipeline.py: curate_flow`)."""
    with run_lock(recipe.out):
        return _run_local(recipe)


def start_run(recipe: Recipe) -> tuple[Run, Plan]:
    """The run folder opened for `recipe` and its plan, less the files an earlier recipe left there that this one
    would read as its own (`curate.run.drop_leftovers`): what every executor does first, under `run_lock`."""
    run = open_run(recipe)
    plan = Plan(recipe, str(run.path.resolve()))
    if drop_leftovers(run, plan.stages):
        run.save()
    return run, plan


def _run_local(recipe: Recipe) -> Run:
    t0 = time.perf_counter()
    run, plan = start_run(recipe)
    run_dir = plan.run_dir
    refresh = refresh_requested()
    results: dict[str, dict[str, Any]] = {}
    n_records = 0
    for st in plan.stages:
        key = plan.key(st)
        for shard in plan.shards(n_records) if st.sharded else [None]:
            res = run_stage(st, run_dir, recipe, key, shard, refresh=refresh)
            results[task_name(st, shard)] = res
            run.merge(res["manifest"])
            run.save()
        plan.done(st, res)
        if st.name == "ingest":
            n_records = int(res["info"]["records"])
    run.set("executor", {"kind": "local", **summarise(run, results, time.perf_counter() - t0)})
    run.save()
    return run


run_direct = run_local  # the name the tests and benchmarks have used
