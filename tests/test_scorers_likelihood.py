"""Likelihood scorers (perplexity, IFD, GRAPE, DONOD) against hand computations on a real tiny model.

Every expected value comes from an independent path: token ids built by hand from the tokenizer and the
chat template, a direct transformers forward pass, an explicit torch SGD step on lm_head.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch
from conftest import sample_rows

from curate.io.formats import to_messages
from curate.lm import load_engine
from curate.lm.base import LMConfig
from curate.lm.tiny import make_tiny_model
from curate.schema import make_record, normalise_text
from curate.scoring import ScorerError, available, get_scorer
from curate.scoring.runner import score_pool
from curate.scoring.store import ScoreStore
from scorers.donod import donod_closeness, donod_update
from scorers.grape import grape_pick

MAX_LEN = 512


def sample_records(n: int, skip: int = 0) -> list[dict]:
    """Rows skip..skip+n of the bundled sample (maths, code, tool use, general tasks) as records."""
    out = []
    for i, row in enumerate(sample_rows(n, start=skip), start=skip):
        fmt, msgs = to_messages(row)
        out.append(make_record(msgs, source="sample", row=i, fmt=fmt))
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "m")


@pytest.fixture(scope="module")
def engine(tiny):
    return load_engine(LMConfig(tiny, max_length=MAX_LEN))


@pytest.fixture(scope="module")
def model64(tiny):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float64).eval()


@pytest.fixture(scope="module")
def pool() -> pl.DataFrame:
    recs = sample_records(6)
    # a real multi-turn conversation: two sample exchanges chained, with a system prompt
    a, b = recs[0]["messages"], recs[1]["messages"]
    convo = [{"role": "system", "content": "You are a helpful assistant."}, *a, *b]
    recs.append(make_record(convo, source="chain", row=0, fmt="openai"))
    return pl.DataFrame(recs)


def hand_ids(tok, prompt: list[dict], response: str) -> tuple[list[int], list[int], int]:
    """Prompt / response ids built directly from the tokenizer (ChatML template of the tiny model)."""
    if prompt:
        text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        p = tok(text, add_special_tokens=False)["input_ids"]
    else:  # unconditioned: BOS + the assistant header
        p = [tok.bos_token_id] + tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    end = tok("<|im_end|>", add_special_tokens=False)["input_ids"]
    return p, tok(response, add_special_tokens=False)["input_ids"] + end, len(end)


def forward_nll(model, prompt_ids: list[int], response_ids: list[int]) -> np.ndarray:
    """Per-token NLL of the response from one plain transformers forward pass (float64)."""
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), -1)
    pos = torch.arange(len(prompt_ids) - 1, len(prompt_ids) + len(response_ids) - 1)
    return -logp[pos, torch.tensor(response_ids)].numpy()


def turns_of(messages: list[dict]) -> list[tuple[list[dict], str]]:
    return [(messages[:i], m["content"]) for i, m in enumerate(messages) if m["role"] == "assistant"]


def test_registry_lists_likelihood_scorers():
    assert {"perplexity", "ifd", "grape", "donod"} <= set(available())
    with pytest.raises(ScorerError, match="unknown scorer"):
        get_scorer("ifdd")
    with pytest.raises(ScorerError, match="turns"):
        get_scorer("perplexity", turns="some")
    with pytest.raises(ScorerError, match="lr"):
        get_scorer("donod", lr=0)


def test_engine_ids_match_hand_built(engine, pool):
    for msgs in pool["messages"].to_list():
        prompt, resp = msgs[:-1], msgs[-1]["content"]
        for pr in (prompt, []):
            enc = engine.encode(pr, resp)
            p, r, _ = hand_ids(engine.tokenizer, pr, resp)
            assert (enc.prompt_ids, enc.response_ids) == (p, r) or enc.truncated


@pytest.mark.parametrize("turns", ["last", "all"])
def test_perplexity_equals_forward_pass(engine, model64, pool, turns, tmp_path):
    run = score_pool(pool, get_scorer("perplexity", turns=turns, unconditioned=True), engine=engine,
                     store=ScoreStore(tmp_path), batch_size=3)
    tok = engine.tokenizer
    for msgs, got in zip(pool["messages"].to_list(), run.df.iter_rows(named=True), strict=True):
        turns_ = turns_of(msgs) if turns == "all" else turns_of(msgs)[-1:]
        cond = np.concatenate([forward_nll(model64, *hand_ids(tok, p, r)[:2]) for p, r in turns_])
        unc = np.concatenate([forward_nll(model64, *hand_ids(tok, [], r)[:2]) for _, r in turns_])
        assert got["perplexity_n_tokens"] == len(cond)
        assert got["perplexity"] == pytest.approx(np.exp(cond.mean()), rel=1e-5)
        assert got["perplexity_loss"] == pytest.approx(cond.mean(), rel=1e-5)
        assert got["perplexity_uncond"] == pytest.approx(np.exp(unc.mean()), rel=1e-5)
    if turns == "all":  # the multi-turn row pools two turns, so it differs from its last turn alone
        last = score_pool(pool, get_scorer("perplexity"), engine=engine, store=ScoreStore(tmp_path)).df
        assert last["perplexity_n_tokens"][-1] < run.df["perplexity_n_tokens"][-1]
        assert last["perplexity_n_tokens"][:-1].to_list() == run.df["perplexity_n_tokens"][:-1].to_list()


def test_ifd_equals_forward_pass(engine, model64, pool, tmp_path):
    run = score_pool(pool, get_scorer("ifd"), engine=engine, store=ScoreStore(tmp_path), batch_size=4)
    tok = engine.tokenizer
    for msgs, got in zip(pool["messages"].to_list(), run.df.iter_rows(named=True), strict=True):
        prompt, resp = msgs[:-1], msgs[-1]["content"]  # last turn, whole history as the instruction
        p, r, n_end = hand_ids(tok, prompt, resp)
        pu, ru, _ = hand_ids(tok, [], resp)
        cond = forward_nll(model64, p, r)[:-n_end].mean()  # answer text only (Cherry)
        unc = forward_nll(model64, pu, ru)[:-n_end].mean()
        assert got["ifd_error"] is None
        assert got["ifd_n_tokens"] == len(r) - n_end
        assert got["ifd_cond_loss"] == pytest.approx(cond, rel=1e-5)
        assert got["ifd_uncond_loss"] == pytest.approx(unc, rel=1e-5)
        assert got["ifd"] == pytest.approx(cond / unc, rel=1e-5)  # Cherry: ratio of mean losses
        assert got["ifd_ppl"] == pytest.approx(np.exp(cond) / np.exp(unc), rel=1e-5)  # Superfiltering
        assert got["ifd_gt1"] == (cond / unc > 1)


def explicit_sgd(model64, prompt_ids, response_ids, lr: float, n_drop: int = 0) -> tuple[float, float]:
    """DON/NOD by brute force: an untied copy of lm_head, autograd, torch.optim.SGD, then the norms."""
    head = torch.nn.Parameter(model64.get_output_embeddings().weight.detach().clone())
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        hidden = model64.get_decoder()(input_ids=ids).last_hidden_state[0]
    p, r = len(prompt_ids), len(response_ids) - n_drop
    labels = ids[0, p:p + r]
    logits = hidden[p - 1:p + r - 1] @ head.T
    loss = torch.nn.functional.cross_entropy(logits, labels)  # SFT loss: mean over response tokens
    opt = torch.optim.SGD([head], lr=lr)
    before = head.detach().clone()
    opt.zero_grad()
    loss.backward()
    opt.step()
    after = head.detach()
    return float(before.norm() - after.norm()), float((before - after).norm())


@pytest.mark.parametrize("lr", [1e-5, 1e-2])
def test_donod_equals_explicit_sgd_step(engine, model64, pool, lr, tmp_path):
    run = score_pool(pool, get_scorer("donod", lr=lr), engine=engine, store=ScoreStore(tmp_path))
    d = engine.output_weight().shape[1]
    tok = engine.tokenizer
    lengths = []
    for msgs, got in zip(pool["messages"].to_list(), run.df.iter_rows(named=True), strict=True):
        p, r, _ = hand_ids(tok, msgs[:-1], msgs[-1]["content"])
        don, nod = explicit_sgd(model64, p, r, lr)
        lengths.append(len(r))
        assert got["donod_n_tokens"] == len(r)
        assert got["donod_nod"] == pytest.approx(nod, rel=1e-5)
        assert got["donod_don"] == pytest.approx(don, rel=1e-4, abs=1e-12)
    assert min(lengths) <= d < max(lengths)  # both closed forms (Gram, materialised G) were exercised
    # and the runner added the pool-relative closeness
    assert run.df["donod"].null_count() == 0 and run.df["donod"].is_between(0, 1).all()


def test_donod_gram_and_materialised_forms_agree():
    rng = np.random.default_rng(0)
    for t in (5, 40):
        h, z = rng.normal(size=(t, 16)), rng.normal(size=(t, 50)) * 3
        y = rng.integers(0, 50, t)
        a = torch.softmax(torch.tensor(z), -1)
        a[torch.arange(t), torch.tensor(y)] -= 1
        g = (a.T @ torch.tensor(h)) / t  # V x d gradient, materialised
        lr, w2 = 0.1, 30.0
        don, nod = donod_update(h, z, y, w2, lr)
        assert nod == pytest.approx(lr * float(g.norm()), rel=1e-10)
        wg = float((a * torch.tensor(z)).sum()) / t
        assert don == pytest.approx(np.sqrt(w2) - np.sqrt(w2 - 2 * lr * wg + lr**2 * float(g.norm()) ** 2),
                                    rel=1e-8)


def test_topsis_hand_worked_example():
    df = pl.DataFrame({"donod_don": [3.0, 1.0, 2.0, None], "donod_nod": [1.0, 2.0, 4.0, 1.0]})
    # vector: ||DON|| = sqrt(14), ||NOD|| = sqrt(21); v = 0.5 * x / norm
    #   v_DON = [.40089, .13363, .26726]  v_NOD = [.10911, .21822, .43644]
    #   A+ = (.40089, .10911)  A- = (.13363, .43644)
    #   row 1: d+ = 0 -> C = 1
    #   row 2: d+ = sqrt(.26726^2 + .10911^2) = .28868, d- = .21822        -> C = .21822/.50690 = .43050
    #   row 3: d+ = sqrt(.13363^2 + .32733^2) = .35355, d- = .13363        -> C = .13363/.48718 = .27429
    got = donod_closeness(df, (0.5, 0.5), "vector")
    assert got.name == "donod" and got[3] is None
    assert got[:3].to_list() == pytest.approx([1.0, 0.43050, 0.27429], abs=1e-4)
    # min-max: r_DON = [1, 0, .5], r_NOD = [0, 1/3, 1]; v = r / 2; A+ = (.5, 0), A- = (0, .5)
    #   row 2: d+ = sqrt(.25 + 1/36) = .52705, d- = 1/3 -> C = .38743
    #   row 3: d+ = sqrt(.0625 + .25) = .55902, d- = .25 -> C = .30902
    got = donod_closeness(df, (0.5, 0.5), "minmax")
    assert got[:3].to_list() == pytest.approx([1.0, 0.38743, 0.30902], abs=1e-4)
    # weights only scale the criteria: all weight on NOD ranks by NOD alone (row 1 and the null row aside)
    got = donod_closeness(df, (0.0, 1.0), "minmax")
    assert got[:3].to_list() == pytest.approx([1.0, 2 / 3, 0.0], abs=1e-9)


def test_donod_topsis_params_rerank_without_recompute(engine, pool, tmp_path):
    store = ScoreStore(tmp_path)
    a = score_pool(pool, get_scorer("donod"), engine=engine, store=store)
    b = score_pool(pool, get_scorer("donod", weights=(0.2, 0.8), normalisation="minmax"), engine=engine,
                   store=store)
    assert b.n_computed == 0 and b.n_cached == pool.height
    assert a.df["donod_don"].to_list() == b.df["donod_don"].to_list()
    assert a.df["donod"].to_list() != b.df["donod"].to_list()
    c = score_pool(pool, get_scorer("donod", lr=1e-3), engine=engine, store=store)
    assert c.n_computed == pool.height  # lr changes the values: a new key


def test_grape_picks_the_models_own_greedy_output(engine, tmp_path):
    recs = sample_records(4, skip=10)
    prompts = [r["messages"][:-1] for r in recs]
    greedy = [g[0] for g in engine.generate(prompts, temperature=0.0, max_tokens=24)]
    rows = []
    for i, (rec, own) in enumerate(zip(recs, greedy, strict=True)):
        other = recs[(i + 1) % len(recs)]["response"]  # an answer to a different instruction
        for resp in (rec["response"], other, own):
            if resp.strip():
                rows.append(make_record([*rec["messages"][:-1], {"role": "assistant", "content": resp}],
                                        source="grape", row=len(rows), fmt="openai"))
    pool = pl.DataFrame(rows)
    # batch size 2 splits every group across batches: the pick must still be made over the whole pool
    run = score_pool(pool, get_scorer("grape"), engine=engine, store=ScoreStore(tmp_path), batch_size=2)
    df = pool.select("id", "response").join(run.df, on="id", maintain_order="left")
    assert df["grape_group"].n_unique() == len(recs)
    best = df.filter(pl.col("grape_best"))
    assert best.height == len(recs)
    for own in greedy:
        if own.strip():
            assert normalise_text(own) in best["response"].to_list()
    assert (df["grape_group_size"] == 3).all()
    assert sorted(df.filter(pl.col("grape_group") == df["grape_group"][0])["grape_rank"]) == [1, 2, 3]


def test_grape_ties_go_to_the_shortest():
    df = pl.DataFrame({
        "id": ["a", "b", "c", "d", "e"],
        "grape_group": ["g", "g", "g", "h", "h"],
        "grape_logp": [-1.0, -1.0, -2.0, None, -3.0],
        "grape_n_tokens": [10, 7, 3, 2, 9],
    })
    out = grape_pick(df)
    assert out["grape_best"].to_list() == [False, True, False, False, True]
    assert out["grape_rank"].to_list() == [2, 1, 3, None, 1]


def test_ifd_marks_rows_whose_response_fills_max_length(tiny, tmp_path):
    """A response longer than max_length leaves the conditioned pass only the assistant header, the same
    context as the unconditioned pass: IFD would be exactly 1.0 whatever the instruction; it is null instead."""
    short = load_engine(LMConfig(tiny, max_length=32))
    df = pl.DataFrame([
        make_record([{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi there friend"}],
                    source="t", row=0, fmt="openai"),
        make_record([{"role": "user", "content": "Write a lot"}, {"role": "assistant", "content": "word " * 100}],
                    source="t", row=1, fmt="openai"),
    ])
    no_prompt = pl.DataFrame({"id": ["x"], "messages": [[{"role": "assistant", "content": "an answer alone"}]]})
    df = pl.concat([df.select("id", "messages"), no_prompt])
    got = score_pool(df, get_scorer("ifd"), engine=short, store=ScoreStore(tmp_path)).df.to_dicts()
    assert got[0]["ifd_error"] is None and got[0]["ifd"] is not None
    assert got[1]["ifd"] is None and got[1]["ifd_gt1"] is None
    assert got[1]["ifd_error"].startswith("instruction cut away")
    assert got[2]["ifd"] is None and got[2]["ifd_error"].startswith("no instruction")



@pytest.mark.parametrize("template", ["chat", "plain"])
def test_ifd_marks_exactly_the_rows_left_without_instruction_text(tiny, tmp_path, template):
    """Responses of growing length push the prompt out of max_length a token at a time: a row is marked iff
    the kept prompt tokens no longer hold any of the instruction's text, i.e. their decoded text is the end of
    the template rendered around an empty instruction (even one kept character, "a" of "zebra", counts)."""
    eng = load_engine(LMConfig(tiny, max_length=40, template=template))
    prompt = [{"role": "user", "content": "Write zebra"}]
    df = pl.DataFrame({"id": [f"r{k}" for k in range(1, 45)],
                       "messages": [[*prompt, {"role": "assistant", "content": "word " * k}] for k in range(1, 45)]})
    got = score_pool(df, get_scorer("ifd"), engine=eng, store=ScoreStore(tmp_path)).df
    marked = got["ifd_error"].str.starts_with("instruction cut away").fill_null(False).to_list()
    kept = [eng.encoder.tok.decode(eng.encode(prompt, m[-1]["content"]).prompt_ids) for m in df["messages"]]
    bare = eng.encoder.tok.bos_token + eng.encoder.render_prompt([{"role": "user", "content": ""}])
    assert marked == [bare.endswith(text) for text in kept]
    assert any(marked) and not all(marked)
    assert got.filter(~pl.Series(marked))["ifd"].null_count() == 0
