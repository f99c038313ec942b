"""End to end without Prefect: the same stage functions the flow runs, on real rows, with a real tiny LM."""

import json

import datasets
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
    from curate.lm.testing import make_tiny_model

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
                                                                 "select.budget_tokens": 5000}))
    sel = pl.read_parquet(r.file("selected.parquet"))
    assert 0 < sel["n_tokens"].sum() <= 5000
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
