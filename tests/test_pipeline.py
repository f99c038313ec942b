"""End to end without Prefect: the same stage functions the flow runs, on real rows, with a real tiny LM."""

import json

import datasets
import numpy as np
import polars as pl
import pytest
from conftest import CORPUS, ROOT

from curate.config import load_recipe
from curate.pipeline import run_direct

SAMPLE = ROOT / "data" / "sample"


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory):
    """~400 real rows from two sample files, plus exact duplicates, near-duplicates and broken lines."""
    d = tmp_path_factory.mktemp("pool")
    gsm = (SAMPLE / "gsm8k_train.jsonl").read_text().splitlines()[:250]
    code = (SAMPLE / "gpteacher_codegen.jsonl").read_text().splitlines()[:150]
    near = json.loads(gsm[3])
    near["answer"] = near["answer"].replace(".", " .", 1)  # a one-character edit
    lines = gsm + [gsm[0], gsm[1], json.dumps(near)]
    (d / "gsm.jsonl").write_text("\n".join(lines) + "\n")
    (d / "code.jsonl").write_text("\n".join(code) + "\n" + (CORPUS / "truncated.jsonl").read_text())
    return d


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from curate.lm.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("lm") / "tiny")


def _recipe(pool_dir, out, tiny_lm, **over):
    base = {"inputs": [str(pool_dir)], "out": str(out), "seed": 0, "score.model": tiny_lm,
            "score.scorers": ["heuristics", "perplexity"], "embed.model": "minilm-static",
            "select.budget": 100, "export": ["alpaca", "sharegpt"], "report": False}
    return load_recipe(None, {**base, **over})


@pytest.fixture(scope="module")
def run(pool_dir, tiny_lm, tmp_path_factory):
    return run_direct(_recipe(pool_dir, tmp_path_factory.mktemp("runs") / "a", tiny_lm))


def test_every_input_row_has_exactly_one_decision(run):
    d = pl.read_parquet(run.file("decisions.parquet"))
    n_in = sum(e["rows"] for e in run.manifest["inputs"].values())
    assert d.height == n_in == 253 + 152
    assert d.select(pl.struct("source", "row").is_duplicated().any()).item() is False
    counts = dict(d.group_by("status").len().iter_rows())
    assert counts["selected"] == 100
    assert counts["duplicate"] == 2 and counts["rejected"] == 1
    assert counts.get("semantic_duplicate", 0) >= 1  # the one-character edit
    assert sum(counts.values()) == n_in
    assert set(d.filter(pl.col("status") == "not_selected")["reason"]) <= {
        "outranked", "cluster_quota_full", "below_threshold", "source_quota_full"}
    st = run.manifest["stages"]
    assert st["ingest"]["rows_in"] == n_in and st["select"]["rows_out"] == 100


def test_output_loads_in_datasets_and_trl(run, tiny_lm):
    from transformers import AutoTokenizer
    from trl.data_utils import is_conversational, maybe_apply_chat_template

    ds = datasets.load_dataset("parquet", data_files=str(run.file("selected.parquet")), split="train")
    assert len(ds) == 100 and {"messages", "id", "source", "cluster", "perplexity", "heur_flags"} <= set(
        ds.column_names)
    row = ds[0]
    assert is_conversational(row)
    tok = AutoTokenizer.from_pretrained(tiny_lm)
    text = maybe_apply_chat_template({"messages": row["messages"]}, tok)["text"]
    assert row["messages"][-1]["content"] in text


def test_exports_and_selection_is_deterministic(run, pool_dir, tiny_lm, tmp_path):
    alpaca = [json.loads(x) for x in run.file("selected.alpaca.jsonl").read_text().splitlines()]
    share = [json.loads(x) for x in run.file("selected.sharegpt.jsonl").read_text().splitlines()]
    assert len(alpaca) == len(share) == 100 and alpaca[0]["output"] and share[0]["conversations"][0]["from"]
    again = run_direct(_recipe(pool_dir, tmp_path / "b", tiny_lm))
    a = pl.read_parquet(run.file("selected.parquet"))["id"].sort()
    b = pl.read_parquet(again.file("selected.parquet"))["id"].sort()
    assert a.equals(b)
    sc = again.manifest["scoring"]["scorers"]
    assert sc["perplexity"]["computed"] == 0 and sc["heuristics"]["computed"] == 0  # served from the store


def test_token_budget_and_strategies(pool_dir, tiny_lm, tmp_path):
    r = run_direct(_recipe(pool_dir, tmp_path / "t", tiny_lm, **{"select.budget": None,
                                                                 "select.budget_tokens": 5000,
                                                                 "select.score": "perplexity_loss"}))
    sel = pl.read_parquet(r.file("selected.parquet"))
    assert 0 < sel["n_tokens"].sum() <= 5000
    tilt = r.manifest["stages"]["select"]["score_tilt"]  # how many rows the score decided, for the report
    assert tilt["score"] == "perplexity_loss" and tilt["selected"] == sel.height
    assert 0 <= tilt["shared_with_stratified_random"] <= sel.height
    r2 = run_direct(_recipe(pool_dir, tmp_path / "d", tiny_lm, **{
        "select.strategy": "deita", "select.score": "perplexity_loss", "select.budget": 50}))
    assert pl.read_parquet(r2.file("selected.parquet")).height == 50
    assert "vendi" in json.dumps(r2.manifest["diversity"])


def test_iterative_strategy_rounds_with_proxy_feedback(pool_dir, tiny_lm, tmp_path):
    """`select.strategy: iterative` runs D&C rounds whose feedback is the scoring LM fine-tuned on each round."""
    r = run_direct(_recipe(pool_dir, tmp_path / "it", tiny_lm, **{
        "select.strategy": "iterative", "select.rounds": 2, "select.probe_per_cluster": 3}))
    assert pl.read_parquet(r.file("selected.parquet")).height == 100
    d = pl.read_parquet(r.file("decisions.parquet"))
    assert d.height == 253 + 152 and (d["status"] == "selected").sum() == 100
    rounds = r.manifest["stages"]["select"]["rounds"]
    assert [x["round"] for x in rounds] == [0, 1] and sum(x["rows"] for x in rounds) == 100
    assert rounds[0]["feedback"] is None
    fb = rounds[1]["feedback"]
    assert fb["trained_rows"] == rounds[0]["rows"] and fb["probe_rows"] > 0
    clusters = set(pl.read_parquet(r.file("clusters.parquet"))["cluster"].to_list())
    assert {int(c) for c in fb["loss"]} <= clusters and all(v > 0 for v in fb["loss"].values())
    assert abs(sum(rounds[1]["weights"].values()) - 1) < 1e-4  # softmax over clusters of the feedback
    # the feedback ran in the scoring engine's dtype, at FinetuneConfig's lr and batch (the test model is no proxy)
    assert fb["dtype"] == r.manifest["score_model"]["dtype"]["dtype"]
    assert (fb["lr"], fb["batch_size"]) == (1e-4, 8) and fb["steps"] == -(-fb["trained_rows"] // 8)
    # the select stage runs again (a setting that only weighs the feedback changed); round 0 draws the same rows,
    # so its feedback round is read back from the cache folder instead of fine-tuning again
    r2 = run_direct(_recipe(pool_dir, tmp_path / "it2", tiny_lm, **{
        "select.strategy": "iterative", "select.rounds": 2, "select.probe_per_cluster": 3,
        "select.feedback_temperature": 0.5}))
    fb2 = r2.manifest["stages"]["select"]["rounds"][1]["feedback"]
    assert fb2["cached"] is True and fb2["loss"] == fb["loss"] and "cached" not in fb


def test_iterative_budget_covering_the_pool_fine_tunes_nothing(pool_dir, tiny_lm, tmp_path):
    """Every eligible row selected whatever the feedback says: the manifest says the round's feedback was skipped
    (it fine-tuned the scoring LM for nothing) and the rows still add up."""
    r = run_direct(_recipe(pool_dir, tmp_path / "all", tiny_lm, **{
        "select.strategy": "iterative", "select.rounds": 2, "select.budget": 10**6}))
    rounds = r.manifest["stages"]["select"]["rounds"]
    assert rounds[0]["feedback"] is None and rounds[1]["feedback"].startswith("skipped")
    d = pl.read_parquet(r.file("decisions.parquet"))
    assert "not_selected" not in set(d["reason"])  # every row the strategy could take is taken
    assert pl.read_parquet(r.file("selected.parquet")).height == (d["status"] == "selected").sum() == sum(
        x["rows"] for x in rounds) > 0


def test_iterative_select_key_follows_the_scoring_dtype(pool_dir, tiny_lm, tmp_path):
    """The iterative feedback runs in score.dtype, so that setting is in the select stage's key; other strategies'
    selections do not depend on it and keep their cached results."""
    from curate.pipeline import build_pipeline

    def sections(**over):
        stages = build_pipeline(_recipe(pool_dir, tmp_path, tiny_lm, **over))
        return next(s for s in stages if s.name == "select").sections

    assert "score.dtype" in sections(**{"select.strategy": "iterative"})
    assert "score.dtype" not in sections()


def test_small_pools_are_scored_whole(run):
    """The module's pool (~400 rows) is below the sampling threshold: every row computed, none predicted."""
    sc = pl.read_parquet(run.file("scores.parquet"))
    assert pl.read_parquet(run.file("score_sample.parquet")).height == sc.height
    assert sc["score_predicted"].sum() == 0 and sc["perplexity_loss"].null_count() == 0
    assert "distill" not in run.manifest


@pytest.fixture(scope="module")
def sampled_run(tiny_lm, tmp_path_factory):
    """The whole bundled sample (3,675 rows) with the LM scoring a 300-row sample, the rest predicted."""
    out = tmp_path_factory.mktemp("runs") / "sampled"
    recipe = load_recipe(None, {"inputs": [str(SAMPLE)], "out": str(out), "seed": 0, "score.model": tiny_lm,
                                "score.scorers": ["heuristics", "ifd"], "score.sample": 300,
                                "embed.model": "minilm-static", "select.budget": 200, "report": False})
    return run_direct(recipe), recipe


def test_sample_then_distill_conserves_marks_and_keeps_computed_values(sampled_run, tiny_lm):
    from curate.scoring import get_scorer
    from curate.scoring.runner import score_pool

    run, _ = sampled_run
    sc = pl.read_parquet(run.file("scores.parquet"))
    recs = pl.read_parquet(run.file("records.parquet"), columns=["id", "messages"])
    sample = pl.read_parquet(run.file("score_sample.parquet"))["id"]
    assert sc.height == recs.height and sc["id"].sort().equals(recs["id"].sort())
    assert 300 <= sample.len() < recs.height
    # every row has a value and a mark; exactly the sampled rows are computed
    assert sc["score_predicted"].null_count() == 0
    assert sc.filter(~pl.col("score_predicted"))["id"].sort().equals(sample.sort())
    assert sc.filter(pl.col("score_predicted"))["ifd"].null_count() == 0
    assert sc["heur_flags"].null_count() == 0  # the rule scorer is not sampled: every row computed
    # computed values are the LM's own (the store's), untouched by the predictor
    from curate.lm import LMConfig, load_engine

    got = sc.filter(~pl.col("score_predicted")).sort("id").head(20)
    dtype = run.manifest["score_model"]["dtype"]["dtype"]  # score.dtype auto: what this machine ran
    ref = score_pool(recs.join(got.select("id"), on="id", how="semi"), get_scorer("ifd"),
                     engine=load_engine(LMConfig(tiny_lm, max_length=512, dtype=dtype)), store=None).df.sort("id")
    np.testing.assert_allclose(got["ifd"].to_numpy(), ref["ifd"].to_numpy(), rtol=1e-5)
    # the agreement measured on held-out sampled rows is in the manifest
    rep = run.manifest["distill"]
    assert rep and json.dumps(rep)  # JSON-ready
    clusters = pl.read_parquet(run.file("clusters.parquet")).join(pl.DataFrame({"id": sample}), on="id",
                                                                  how="semi")
    assert clusters["cluster"].n_unique() >= min(run.manifest["stages"]["cluster"]["k"], 300) * 0.9


def test_sample_then_distill_is_deterministic_and_resumes_from_the_store(sampled_run, tmp_path):
    run, recipe = sampled_run
    again = run_direct(recipe.model_copy(update={"out": str(tmp_path / "again")}))
    a = pl.read_parquet(run.file("scores.parquet")).sort("id")
    b = pl.read_parquet(again.file("scores.parquet")).sort("id")
    assert a.equals(b)
    assert again.manifest["scoring"]["scorers"]["ifd"]["computed"] == 0  # the LM part came from the store
    assert pl.read_parquet(run.file("selected.parquet"))["id"].sort().equals(
        pl.read_parquet(again.file("selected.parquet"))["id"].sort())


@pytest.fixture(scope="module")
def timed_run(tiny_lm, tmp_path_factory):
    """The whole bundled sample (3,675 rows, over the whole-pool threshold) with `score.minutes` deciding the
    sample: the run measures the LM rate itself."""
    out = tmp_path_factory.mktemp("runs") / "timed"
    recipe = load_recipe(None, {"inputs": [str(SAMPLE)], "out": str(out), "seed": 0, "score.model": tiny_lm,
                                "score.scorers": ["heuristics", "ifd"], "score.minutes": 0.25,
                                "embed.model": "minilm-static", "select.budget": 200, "report": False})
    return run_direct(recipe), recipe


def test_score_minutes_uses_the_rate_measured_in_the_run(timed_run):
    """Issue #15: `score.minutes` is turned into rows with a rate timed on the run's engine (not the assumed
    one), recorded in the manifest; the sample is exactly what that rate buys, within sample_size's clamps."""
    from curate.distill import MIN_SAMPLE, SMALL_POOL
    from curate.pipeline import CALIBRATION_ROWS
    from curate.plan import lm_rows_per_second

    run, recipe = timed_run
    info = run.manifest["score_sample"]
    rate = info["rate"]
    assert info["pool"] > SMALL_POOL
    assert rate["source"] == "measured" and "error" not in rate
    assert rate["rows_per_second"] > 0 and rate["calibration_rows"] == CALIBRATION_ROWS
    assert rate["calibration_seconds"] > 0 and rate["scorers"] == ["ifd"]
    assert rate["assumed_rows_per_second"] == lm_rows_per_second(recipe)  # what it replaced
    assert abs(rate["rows_per_second"] - CALIBRATION_ROWS / rate["calibration_seconds"]) < 0.01 * rate[
        "rows_per_second"] + 0.01
    want = min(info["pool"], max(MIN_SAMPLE, int(0.25 * 60 * rate["rows_per_second"])))
    sample = pl.read_parquet(run.file("score_sample.parquet"))
    assert info["sample"] == sample.height == want
    sc = pl.read_parquet(run.file("scores.parquet"))
    assert sc.filter(~pl.col("score_predicted")).height == want  # exactly the sample was computed


def test_a_rerun_reuses_the_measured_rate(timed_run):
    """The measurement is the sample stage's cached result: a re-run of the folder does not time again and
    gives the same sample, scores and selection."""
    run, recipe = timed_run
    before = {n: run.file(n).read_bytes() for n in ("score_sample.parquet", "scores.parquet", "selected.parquet")}
    rate = run.manifest["score_sample"]
    again = run_direct(recipe)
    assert again.manifest["executor"]["tasks"]["sample"] == "Cached"
    assert again.manifest["score_sample"] == rate
    for name, data in before.items():
        assert again.file(name).read_bytes() == data, name


def test_measure_rate_runs_scorers_as_scored_and_never_touches_the_store(run, pool_dir, tiny_lm):
    """The rate measurement runs each scorer through the score stage's own batch code (`score_batch`,
    `finalize_pool`): one that reads other scores, an embedding view and has pool columns (InstructMining),
    and one with pool columns over hidden states (DONOD). The score store is neither read nor written."""
    from curate.context import RunContext
    from curate.run import cache_dir
    from curate.scoring.recipe import measure_rate

    ctx = RunContext(run, _recipe(pool_dir, run.path, tiny_lm))
    ids = ctx.records(["id"])["id"].head(6)
    store = cache_dir() / "scores"

    def listing() -> list[str]:
        return sorted(str(p.relative_to(store)) for p in store.rglob("*")) if store.exists() else []

    before = listing()
    got = measure_rate(ctx, ids, ["instructmining", "donod"], warmup=2)
    assert listing() == before
    assert got["calibration_rows"] == 6 and set(got["scorer_seconds"]) == {"instructmining", "donod"}
    assert got["rows_per_second"] > 0 and got["warmup_seconds"] > 0
    assert got["calibration_seconds"] == pytest.approx(sum(got["scorer_seconds"].values()), abs=0.01)


def test_local_executor_holds_the_run_folder_and_drops_an_earlier_recipes_leftovers(pool_dir, tmp_path):
    """`--no-prefect` as the flow (tests/test_flows.py): a second run into a busy folder stops before any stage, and
    a re-run with embeddings off reads nothing the embeddings-on run left (its semantic duplicates and clusters
    were read as the new run's), deciding exactly as the same recipe in a new folder."""
    from curate.run import run_lock

    base = {"inputs": [str(pool_dir)], "seed": 0, "score.scorers": ["heuristics"], "select.budget": 50,
            "report": False}
    on = load_recipe(None, {**base, "out": str(tmp_path / "run"), "embed.model": "minilm-static",
                            "semdedup.eps": 0.3})
    with run_lock(tmp_path / "run"):
        with pytest.raises(ValueError, match="another curate run is writing this run folder"):
            run_direct(on)
    assert not (tmp_path / "run" / "records.parquet").exists()
    assert pl.read_parquet(run_direct(on).file("semdedup.parquet")).height > 0
    off = {**base, "embed.enabled": False}
    again = run_direct(load_recipe(None, {**off, "out": str(tmp_path / "run")}))
    fresh = run_direct(load_recipe(None, {**off, "out": str(tmp_path / "fresh")}))
    cols = ["source", "row", "status", "reason"]
    assert pl.read_parquet(again.file("decisions.parquet"), columns=cols).equals(
        pl.read_parquet(fresh.file("decisions.parquet"), columns=cols))
    assert not again.file("semdedup.parquet").exists() and "semdedup" not in again.manifest["stages"]
