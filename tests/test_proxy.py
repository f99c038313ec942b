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
from curate.lm.base import load_tokenizer
from curate.lm.evaluate import eval_proxy, proxy_quality
from curate.lm.proxy import ensure_default_proxy, finetune_proxy, load_conversations, train_proxy

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


def _trained_text(model_dir: str, conv: list[dict], *, chat_template: str | None = "own") -> tuple[str, str]:
    """(rendered conversation, decoded label tokens) of the batch the one fine-tune path trains on."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from curate.lm.finetune import FinetuneConfig, sft_trainer, training_chat_template

    tok = AutoTokenizer.from_pretrained(model_dir)
    if chat_template != "own":
        tok.chat_template = chat_template
    tok.chat_template = training_chat_template(tok)
    trainer = sft_trainer(AutoModelForCausalLM.from_pretrained(model_dir), tok, [conv], FinetuneConfig(batch_size=1),
                          0, Path(model_dir).parent / "sft-work", "float32")
    labels = next(iter(trainer.get_train_dataloader()))["labels"][0]
    return tok.apply_chat_template(conv, tokenize=False), tok.decode(labels[labels != -100])


CONV = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye."}]


def test_sft_trains_on_every_assistant_turn_only(proxy):
    """The proxy's ChatML template gets generation markers: loss on each answer and its end-of-turn token."""
    text, trained = _trained_text(proxy, CONV)
    assert trained == "Hello.<|im_end|>Goodbye.<|im_end|>"
    assert text == load_tokenizer(LMConfig(proxy)).apply_chat_template(CONV, tokenize=False)  # unchanged text


def test_sft_without_a_chat_template_uses_the_plain_rendering(proxy):
    """A model without a chat template trains on curate's plain rendering, each answer ending with EOS."""
    text, trained = _trained_text(proxy, CONV, chat_template=None)
    assert text == "<s>User: Hi\n\nAssistant: Hello.</s>\n\nUser: Bye\n\nAssistant: Goodbye.</s>\n\n"
    assert trained == " Hello.</s> Goodbye.</s>"  # byte-level BPE: the first answer token carries its space


def test_proxy_finetune_cli_saves_a_loadable_model(proxy, rows, tmp_path):
    """`curate proxy finetune` through the one path: a model folder with the proxy's own chat template."""
    from typer.testing import CliRunner

    from curate.cli import app

    data = tmp_path / "subset.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows[1750:1766]))
    res = CliRunner().invoke(app, ["proxy", "finetune", proxy, str(data), "--out", str(tmp_path / "ft")])
    assert res.exit_code == 0, res.output
    meta = json.loads((tmp_path / "ft" / "curate_proxy.json").read_text())["finetune"]
    assert meta["rows"] == 16 and meta["steps"] == 1 and meta["base"] == proxy
    saved = load_tokenizer(LMConfig(str(tmp_path / "ft")))
    assert saved.chat_template == load_tokenizer(LMConfig(proxy)).chat_template  # not the training template
    assert eval_proxy(tmp_path / "ft", rows[1750:1766]) > 0


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


def test_loss_feedback_rounds_are_kept_and_read_back(proxy, rows, tmp_path):
    """A killed iterative select starts its stage again; with a store, the rounds it finished are read back
    (identical values, no fine-tune) and any change to what a round depends on computes it anew."""
    import polars as pl

    from curate.select.iterative import loss_feedback

    convs = load_conversations(rows[1650:1690])
    pool = pl.DataFrame({"id": [f"r{i}" for i in range(40)], "cluster": [0, 1] * 20, "messages": convs})
    chosen, other = [f"r{i}" for i in range(16)], [f"r{i}" for i in range(8, 24)]
    store = tmp_path / "feedback"

    def fn(data=pool, **kw):
        return loss_feedback(proxy, data, probe_per_cluster=6, seed=0, dtype="float32", store=store, **kw)

    first = fn()
    a = first(chosen)
    assert "cached" not in first.history[0]
    (path_a,) = store.glob("*.json")
    again = fn()
    b = again(chosen)
    assert b.equals(a) and b.schema == a.schema  # exact: a resumed select draws the same rows
    h = again.history[0]
    assert h["cached"] is True and h["train_loss"] == first.history[0]["train_loss"]
    again(other)
    assert "cached" not in again.history[1]  # other rows trained on: another round
    slower = fn(lr=3e-4)
    slower(chosen)
    assert "cached" not in slower.history[0]  # other settings: another round
    # the same ids with other text to train on (selected rows never enter the probe): another round
    edited = pool.with_columns(messages=pl.Series(load_conversations(rows[1700:1716]) + convs[16:]))
    retrained = fn(edited)
    retrained(chosen)
    assert "cached" not in retrained.history[0]
    assert len(list(store.glob("*.json"))) == 4
    # a file that is not the round's own (garbage, another round's, values of the wrong type) is computed again
    good = path_a.read_text()
    another = next(p for p in store.glob("*.json") if p != path_a).read_text()
    for bad in ("{not json", another, json.dumps({**json.loads(good), "feedback": ["0.1"] * 2})):
        path_a.write_text(bad)
        f = fn()
        assert f(chosen).equals(a) and "cached" not in f.history[0]
        assert fn()(chosen).equals(a) and path_a.read_text() != bad  # and written back whole


def test_loss_feedback_keeps_the_proxy_settings_and_records_the_dtype(proxy, rows):
    """The toy proxy keeps its feedback fine-tune (lr 1e-3, batch 16); each round records the dtype it ran in, and
    the dtype is really used: bf16 feedback differs from float32's on the same rows and seed."""
    import polars as pl

    from curate.lm.hf import resolve_dtype
    from curate.select.iterative import PROXY_FEEDBACK, feedback_settings, loss_feedback

    convs = load_conversations(rows[1650:1690])
    pool = pl.DataFrame({"id": [f"r{i}" for i in range(40)], "cluster": [0, 1] * 20, "messages": convs})
    chosen = [f"r{i}" for i in range(16)]
    assert feedback_settings(proxy) == PROXY_FEEDBACK == {"lr": 1e-3, "batch_size": 16, "micro_batch": 16}
    runs = {}
    for dtype in ("auto", "float32", "bfloat16"):
        fn = loss_feedback(proxy, pool, probe_per_cluster=6, seed=0, dtype=dtype)
        runs[dtype] = dict(fn(chosen).iter_rows())
        h = fn.history[0]
        assert (h["lr"], h["batch_size"], h["micro_batch"], h["steps"]) == (1e-3, 16, 16, 1)
        assert h["dtype"] == (resolve_dtype("auto") if dtype == "auto" else dtype)
        assert h["train_tokens"] > 0 and 0 <= h["probe_seconds"] <= h["seconds"]
    assert runs["float32"] != runs["bfloat16"], runs
    assert all(abs(runs["float32"][c] - runs["bfloat16"][c]) < 0.1 for c in (0, 1)), runs  # rounding, not a bug
