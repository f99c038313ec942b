"""The proxy LM: trained from scratch on real rows of the bundled sample, fine-tuned, evaluated, cached.

The proxy learns from the sample's code, tool-use and general-task rows (2,175 of them); its GSM8K maths rows
stay out, so the loss-feedback test has a second domain the proxy never saw.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import ROOT, sample_rows

from curate.lm import LMConfig
from curate.lm.base import Encoder, load_tokenizer
from curate.lm.evaluate import eval_proxy, proxy_quality
from curate.lm.proxy import ensure_default_proxy, finetune_proxy, load_conversations, sft_examples, train_proxy

NOT_MATHS = ("gpteacher_codegen", "gpteacher_toolformer", "self_instruct_seed")


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return sample_rows(1800, sources=NOT_MATHS)


@pytest.fixture(scope="module")
def proxy(rows, tmp_path_factory) -> str:
    return train_proxy(rows[:1500], tmp_path_factory.mktemp("proxy") / "p", steps=250, seq_len=128, lr=6e-3,
                       batch_size=8, seed=0)


def test_trained_proxy_beats_unigram(proxy, rows):
    meta = json.loads((Path(proxy) / "curate_proxy.json").read_text())
    assert meta["params"] < 600_000 and (Path(proxy) / "model.safetensors").exists()
    q = proxy_quality(proxy, rows[:1500], rows[1500:1650])
    assert q["rows"] == 150
    assert q["heldout_loss"] < q["unigram_loss"] - 0.5, q  # learned more than token frequencies
    assert 0.0 <= q["auroc_pmi"] <= 1.0


def test_finetune_lowers_loss_on_its_data(proxy, rows):
    subset = rows[1650:1750]
    before = eval_proxy(proxy, subset)
    tuned = finetune_proxy(proxy, subset, Path(proxy).parent / "ft", epochs=2, batch_size=8, lr=2e-3)
    after = eval_proxy(tuned, subset)
    assert after < before - 0.05, (before, after)


def test_sft_masks_prompt_per_assistant_turn(proxy):
    enc = Encoder(load_tokenizer(LMConfig(proxy)), LMConfig(proxy))
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye."}]
    ex = sft_examples(enc, [conv])
    assert len(ex) == 2
    ids, n_prompt = ex[1]
    assert enc.tok.decode(ids[n_prompt:]) == "Goodbye.<|im_end|>"
    assert "Hello." in enc.tok.decode(ids[:n_prompt])


def test_load_conversations_from_files(tmp_path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    jl = tmp_path / "a.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows[:5]) + "\n")
    convs = load_conversations(jl)
    assert len(convs) == 5 and convs[0][-1] == {"role": "assistant", "content": rows[0]["output"]}
    pq.write_table(pa.Table.from_pylist([{"messages": c} for c in convs]), tmp_path / "r.parquet")
    assert load_conversations(tmp_path / "r.parquet") == convs


def test_ensure_default_proxy_caches(rows, tmp_path, monkeypatch):
    monkeypatch.setenv("CURATE_CACHE_DIR", str(tmp_path / "cache"))
    a = ensure_default_proxy(rows[:200], steps=3, seq_len=64, batch_size=2)
    stamp = (Path(a) / "model.safetensors").stat().st_mtime_ns
    assert ensure_default_proxy(rows[:200], steps=3, seq_len=64, batch_size=2) == a
    assert (Path(a) / "model.safetensors").stat().st_mtime_ns == stamp  # cached: not retrained
    assert Path(a).parent == tmp_path / "cache" / "models"
    b = ensure_default_proxy(rows[:150], steps=3, seq_len=64, batch_size=2)
    assert b != a
    assert not [p for p in Path(a).parent.iterdir() if p.name.startswith(".tmp")]


def test_loss_feedback_drops_for_the_cluster_trained_on(proxy, rows):
    """D&C feedback from a proxy fine-tune: a cluster the model was just trained on reads as needing less data."""
    import polars as pl

    from curate.select.iterative import loss_feedback

    gsm = [json.loads(x) for x in (ROOT / "data" / "sample" / "gsm8k_train.jsonl").read_text().splitlines()[:130]]
    convs = load_conversations(rows[1650:1780]) + load_conversations(gsm)
    pool = pl.DataFrame({"id": [f"r{i}" for i in range(len(convs))], "cluster": [0] * 130 + [1] * 130,
                         "messages": convs})
    fn = loss_feedback(proxy, pool, probe_per_cluster=130, seed=0, epochs=2, lr=3e-3,
                       batch_size=8)  # the probe is every row; rows trained on leave it
    on_general = dict(fn([f"r{i}" for i in range(100)]).iter_rows())
    on_gsm = dict(fn([f"r{i}" for i in range(130, 230)]).iter_rows())
    assert set(on_general) == set(on_gsm) == {0, 1}
    assert on_general[0] < on_gsm[0] - 0.05 and on_gsm[1] < on_general[1] - 0.05, (on_general, on_gsm)
    assert [(h["trained_rows"], h["probe_rows"]) for h in fn.history] == [(100, 160), (100, 160)]
