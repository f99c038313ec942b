"""The vLLM engine against a real vLLM server (from .venv-vllm) on a tiny model the tests build.

One server for the whole module (start-up is ~1 min on CPU); the test that kills it runs last.
Parity tolerance vs transformers: 1e-4 nats per token (float32 on both sides; observed ~1e-6).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from conftest import sample_rows

from curate.lm import LMConfig, LMError, load_engine
from curate.lm.tiny import make_tiny_model, sample_texts
from curate.lm.vllm import VLLMBatchError, VLLMEngine, VLLMServer, default_vllm_python

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not Path(default_vllm_python()).exists(),
                       reason="no .venv-vllm (build it with curate/lm/setup_vllm_env.sh)"),
]

TOL = 1e-4
MAX_LEN = 511


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    texts = [*sample_texts(), "a::b c::d ::) e:: f " * 20]  # guarantees a '::' merge for the boundary test
    return make_tiny_model(tmp_path_factory.mktemp("vllm") / "tiny", seed=2, texts=texts)


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    srv = VLLMServer(model, max_model_len=MAX_LEN + 1, enforce_eager=True, max_logprobs=20,
                     log_path=tmp_path_factory.mktemp("vllm-log") / "server.log")
    srv.start()
    yield srv
    srv.stop()


def _engines(model, server, **cfg):
    config = LMConfig(model, max_length=MAX_LEN, **cfg)
    return load_engine(config), load_engine(config, "vllm", urls=[server.url], request_size=4)


def _pairs(n: int = 10):
    rows = sample_rows(n)
    prompts = [[{"role": "user", "content": (r["instruction"] + "\n" + r["input"]).strip()}] for r in rows]
    responses = [r["output"] for r in rows]
    prompts += [
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."},
         {"role": "assistant", "content": "Red."}, {"role": "user", "content": "Another one?"}],
        [],  # unconditioned (IFD's s(A))
        [{"role": "user", "content": "word " * 600}],  # truncated on the left
    ]
    responses += ["Blue, or green.", rows[0]["output"], "Done."]
    return prompts, responses


def test_response_logprobs_parity(model, server):
    hf, vl = _engines(model, server)
    prompts, responses = _pairs()
    a = hf.response_logprobs(prompts, responses)
    b = vl.response_logprobs(prompts, responses)
    assert hf.signature() == vl.signature()
    for x, y in zip(a, b, strict=True):
        assert x.shape == y.shape and y.dtype == np.float32
        np.testing.assert_allclose(x, y, atol=TOL)


def test_boundary_merge_parity(model, server):
    """Plain template ends 'Assistant:'; ':)...' would merge into '::' if tokenised together."""
    hf, vl = _engines(model, server, template="plain")
    msgs = [{"role": "user", "content": "Smile"}]
    resp = ":: ) :) fine"
    enc = vl.encode(msgs, resp)
    joint = vl.tokenizer(vl.encoder.render_prompt(msgs) + resp, add_special_tokens=False)["input_ids"]
    assert joint != enc.prompt_ids[1:] + enc.response_ids[:-1]
    assert vl.tokenizer.decode(enc.response_ids[:-enc.n_end]) == resp
    np.testing.assert_allclose(hf.response_logprobs([msgs], [resp])[0], vl.response_logprobs([msgs], [resp])[0],
                               atol=TOL)


def test_choice_probs_parity(model, server):
    hf, vl = _engines(model, server)
    prompts = ["You are a helpful assistant. Please identify the complexity score. \n##Complexity: ", "1 2 3"]
    opts = ["1", "2", "3", "4", "5", "6"]
    p = vl.choice_probs(prompts, opts)
    np.testing.assert_allclose(p, hf.choice_probs(prompts, opts), atol=TOL)
    np.testing.assert_allclose(p.sum(1), 1, atol=1e-5)
    with pytest.raises(ValueError, match="not a single token"):
        vl.choice_probs(prompts, ["1", "one hundred"])


def test_generate(model, server):
    hf, vl = _engines(model, server)
    prompts = _pairs(3)[0][:3]
    greedy_v = vl.generate(prompts, max_tokens=8, temperature=0)
    greedy_h = hf.generate(prompts, max_tokens=8, temperature=0)
    for v, h in zip(greedy_v, greedy_h, strict=True):  # vLLM holds back a trailing partial UTF-8 byte
        assert h[0].rstrip("\ufffd") == v[0].rstrip("\ufffd")
    s = vl.generate(prompts, n=3, max_tokens=8, seed=5)
    assert [len(x) for x in s] == [3, 3, 3] and s == vl.generate(prompts, n=3, max_tokens=8, seed=5)
    assert len({t for x in s for t in x}) > 3  # samples differ across prompts and draws


def test_deita_and_clear_through_vllm(model, server):
    """deita matches the transformers engine through the real vLLM server; CLEAR and correct() run on it.
    (Here rather than in test_scorers_judge.py so that the module's one server start serves it too.)"""
    from test_scorers_judge import MULTI

    from curate.scoring import get_scorer
    from curate.scoring.contract import ScoreContext
    from scorers.clear import correct

    hf, vl = _engines(model, server)
    df = pl.DataFrame({"messages": [MULTI[:2], MULTI]})
    d_vllm = get_scorer("deita").score(df, ScoreContext(engine=vl))
    d_hf = get_scorer("deita").score(df, ScoreContext(engine=hf))
    for c in ("deita_complexity", "deita_quality", "deita_score"):
        np.testing.assert_allclose(d_vllm[c].to_numpy(), d_hf[c].to_numpy(), rtol=2e-3)
    clear = get_scorer("clear", k=2, max_tokens=8, reflection="probs")
    out = clear.score(df, ScoreContext(engine=vl))
    assert out["clear_confidence"].null_count() == 0
    gen = get_scorer("clear", k=2, max_tokens=8, reflection_max_tokens=12)
    g = gen.score(df, ScoreContext(engine=vl))
    assert g["clear_parse_error"].null_count() == 0  # the random model is off template: recorded
    fixed = correct(df, vl, max_tokens=8)
    assert fixed.height == 2 and fixed["clear_original_response"].to_list() == ["Red.", MULTI[-1]["content"]]


def test_limits_and_errors(model, server):
    _, vl = _engines(model, server)
    with pytest.raises(NotImplementedError, match="transformers engine"):
        vl.hidden_and_logits([[]], ["x"])
    with pytest.raises(LMError, match="max_model_len"):
        VLLMEngine(LMConfig(model, max_length=4096), urls=[server.url])
    with pytest.raises(LMError, match="setup_vllm_env"):
        VLLMServer(model, python="/nonexistent/python")


def test_hung_server_keeps_finished_results(model, server):
    hf = load_engine(LMConfig(model, max_length=MAX_LEN))
    vl = VLLMEngine(LMConfig(model, max_length=MAX_LEN), urls=[server.url], request_size=3, concurrency=1,
                    timeout=5)
    prompts, responses = _pairs(12)
    got: dict[int, np.ndarray] = {}

    def freeze_after_first(idx, arrays):
        got.update(zip(idx, arrays, strict=True))
        os.killpg(server.proc.pid, signal.SIGSTOP)

    try:
        with pytest.raises(VLLMBatchError, match="did not answer") as err:
            vl.response_logprobs(prompts, responses, on_batch=freeze_after_first)
    finally:
        os.killpg(server.proc.pid, signal.SIGCONT)
    assert len(got) == 3 and set(err.value.partial) == set(got)
    ref = hf.response_logprobs([prompts[i] for i in got], [responses[i] for i in got])
    for i, r in zip(got, ref, strict=True):
        np.testing.assert_allclose(err.value.partial[i], r, atol=TOL)


def test_killed_server_mid_batch(model, server):
    """Runs last: kills the module's server after the second batch."""
    vl = VLLMEngine(LMConfig(model, max_length=MAX_LEN), urls=[server.url], request_size=4, concurrency=1,
                    timeout=30)
    prompts, responses = _pairs(30)
    got: list[int] = []

    def kill_after_two(idx, arrays):
        got.extend(idx)
        if len(got) >= 8 and server.alive():
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait(30)

    with pytest.raises(VLLMBatchError, match="unreachable") as err:
        vl.response_logprobs(prompts, responses, on_batch=kill_after_two)
    assert len(got) == 8 and sorted(err.value.partial) == sorted(got)
    assert "exited" in str(err.value) or "unreachable" in str(err.value)
