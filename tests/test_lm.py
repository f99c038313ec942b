"""The LM interface and the transformers engine on a tiny real model (random weights, trained BPE)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import sample_rows

from curate.lm import LMConfig, LMError, load_engine
from curate.lm.base import ELISION, clip_middle, truncate
from curate.lm.hf import length_batches
from curate.lm.tiny import make_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return make_tiny_model(tmp_path_factory.mktemp("lm") / "tiny", seed=1)


@pytest.fixture(scope="module")
def engine(tiny):
    return load_engine(LMConfig(tiny))


def _pairs(n: int = 12):
    rows = sample_rows(n)
    prompts = [[{"role": "user", "content": (r["instruction"] + "\n" + r["input"]).strip()}] for r in rows]
    prompts.append([
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": "Another one?"},
    ])
    prompts.append([])  # unconditioned
    return prompts, [r["output"] for r in rows] + ["Blue.", rows[0]["output"]]


def _reference(engine, messages, response) -> np.ndarray:
    """One sequence, no padding, full logits: what response_logprobs must reproduce."""
    enc = engine.encode(messages, response)
    ids = torch.tensor([enc.ids])
    with torch.no_grad():
        logp = engine.model(ids).logits[0].float().log_softmax(-1)
    p = len(enc.prompt_ids)
    return logp[p - 1:-1].gather(1, ids[0, p:, None])[:, 0].numpy()


def test_tiny_model_files(tmp_path):
    path = Path(make_tiny_model(tmp_path / "m", vocab_size=300, texts=["hello world " * 50, "foo bar baz"]))
    names = {p.name for p in path.iterdir()}
    assert "model.safetensors" in names and not any(n.endswith(".bin") for n in names)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["head_dim"] == 64 and cfg["model_type"] == "llama"


def test_logprobs_match_unbatched_reference(tiny):
    prompts, responses = _pairs()
    # a small batch_tokens forces several padded batches; results must not depend on batching
    small = load_engine(LMConfig(tiny, batch_tokens=300))
    got = small.response_logprobs(prompts, responses)
    for p, r, lp in zip(prompts, responses, got, strict=True):
        ref = _reference(small, p, r)
        assert lp.dtype == np.float32 and lp.shape == ref.shape
        np.testing.assert_allclose(lp, ref, atol=1e-4)
        assert np.all(lp <= 0)


def test_span_is_exact_and_includes_end_token(engine):
    tok = engine.tokenizer
    messages = [{"role": "user", "content": "Give three tips for staying healthy."}]
    response = "Eat a balanced diet."
    enc = engine.encode(messages, response)
    assert enc.n_end == 1 and enc.response_ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.decode(enc.response_ids[:-1]) == response
    assert tok.decode(enc.prompt_ids).endswith("<|im_start|>assistant\n")
    assert len(engine.response_logprobs([messages], [response])[0]) == len(enc.response_ids)


def test_boundary_merge_cannot_shift_span(tmp_path):
    """Plain template ends with 'Assistant:'; a response starting with ':' merges with it if joined ('::')."""
    texts = ["a::b c::d ::) e:: f" * 20, "Assistant: User: Smile sure"]
    eng = load_engine(LMConfig(make_tiny_model(tmp_path / "m", vocab_size=300, texts=texts), template="plain"))
    tok = eng.tokenizer
    messages = [{"role": "user", "content": "Smile"}]
    response = ":) sure"
    enc = eng.encode(messages, response)
    joint = tok(eng.encoder.render_prompt(messages) + response, add_special_tokens=False)["input_ids"]
    assert joint != enc.prompt_ids[1:] + enc.response_ids[:-1]  # joined tokenisation really does merge
    assert tok.decode(enc.response_ids[:-enc.n_end]) == response
    assert enc.response_ids[-1] == tok.eos_token_id
    np.testing.assert_allclose(eng.response_logprobs([messages], [response])[0],
                               _reference(eng, messages, response), atol=1e-4)


def test_unconditioned_prefix(engine, tiny):
    tok = engine.tokenizer
    prefix = engine.encode([], "x").prompt_ids
    assert tok.convert_ids_to_tokens(prefix[:2]) == ["<s>", "<|im_start|>"]
    assert tok.decode(prefix[1:]) == "<|im_start|>assistant\n"
    bos_only = load_engine(LMConfig(tiny, unconditioned_prefix="bos"))
    assert bos_only.encode([], "x").prompt_ids == [tok.bos_token_id]
    assert bos_only.signature() != engine.signature()
    alpaca = load_engine(LMConfig(tiny, template="alpaca"))
    assert tok.decode(alpaca.encode([], "x").prompt_ids) == "<s>### Response:"
    text = alpaca.encoder.render_prompt([{"role": "user", "content": "Add 2 and 3."}])
    assert text.startswith("Below is an instruction") and text.endswith("### Instruction:\nAdd 2 and 3.\n\n"
                                                                          "### Response:")
    # conditioned and unconditioned runs score the same response tokens
    msgs = [{"role": "user", "content": "Say hi."}]
    a, b = engine.response_logprobs([msgs, []], ["Hello there.", "Hello there."])
    assert a.shape == b.shape and not np.allclose(a, b)


def test_truncation_rules(tiny):
    assert truncate([1, 2, 3, 4], [5, 6], 1, 5, "left").prompt_ids == [2, 3, 4]
    assert truncate([1, 2, 3, 4], [5, 6], 1, 5, "right").prompt_ids == [1, 2, 3]
    t = truncate([1, 2], [5, 6, 7, 8, 9], 1, 4, "left")
    assert t.response_ids == [5, 6, 7] and t.prompt_ids == [2] and t.n_end == 0 and t.truncated
    eng = load_engine(LMConfig(tiny, max_length=32))
    long_prompt = [{"role": "user", "content": "word " * 200}]
    lp = eng.response_logprobs([long_prompt, []], ["short answer", "very long answer " * 40])
    assert len(lp[0]) == len(eng.encode(long_prompt, "short answer").response_ids)
    assert len(lp[1]) == 31  # response cut to max_length - 1, one prefix token kept
    enc = eng.encode(long_prompt, "short answer")
    assert len(enc.ids) == 32 and enc.truncated
    assert eng.tokenizer.decode(enc.prompt_ids).endswith("<|im_start|>assistant\n")  # left side cut
    assert eng.signature() != load_engine(LMConfig(tiny, max_length=32, truncation_side="right")).signature()
    # generation: a prompt too long for max_tokens new tokens loses its middle, whatever truncation_side says
    full = eng.encoder.prompt_ids(long_prompt)
    (cut,) = eng.encoder.generation_prompt_ids([long_prompt], 12)
    assert cut == clip_middle(full, 20, eng.encoder._text_ids(ELISION)) and len(cut) == 20
    assert cut[:3] == full[:3] and eng.tokenizer.decode(cut).endswith("<|im_start|>assistant\n")
    right = load_engine(LMConfig(tiny, max_length=32, truncation_side="right"))
    assert right.encoder.generation_prompt_ids([long_prompt], 12) == [cut]
    assert eng.encoder.generation_prompt_ids([[{"role": "user", "content": "hi"}]], 12) == [
        eng.encoder.prompt_ids([{"role": "user", "content": "hi"}])]  # one that fits is not touched
    assert len(eng.generate([long_prompt], max_tokens=12, temperature=0)[0]) == 1
    with pytest.raises(ValueError, match="leaves no room for a prompt"):
        eng.generate([long_prompt], max_tokens=32)


def test_choice_probs(engine):
    prompts = ["You are a helpful assistant. ##Complexity: ", "Rate it: 1"]
    opts = ["1", "2", "3", "4", "5", "6"]
    probs = engine.choice_probs(prompts, opts)
    assert probs.shape == (2, 6)
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    ids = [engine.encoder.option_id(o) for o in opts]
    for row, p in enumerate(prompts):
        x = torch.tensor([engine.tokenizer(p)["input_ids"]])
        with torch.no_grad():
            logits = engine.model(x).logits[0, -1, ids]
        np.testing.assert_allclose(probs[row], torch.softmax(logits, -1).numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="not a single token"):
        engine.choice_probs(prompts, ["1", "three hundred and twelve"])


def test_a_judge_prompt_too_long_loses_its_middle(tiny):
    """deita's quality prompt for a long answer, cut to max_length: it kept its last tokens, so the judge read the
    tail of the answer with neither its instructions nor the question. Now the start (BOS, instructions, the
    question's start) and the end (the answer's end, the slot) stay, with a marker where the middle was."""
    from scorers.deita import quality_prompt

    eng = load_engine(LMConfig(tiny, max_length=64))
    prompt = quality_prompt("What is 2+2?", "It is four. " * 100, delimit=True)
    full = eng.encoder.tok(prompt)["input_ids"]
    ids = eng.encoder.raw_prompt_ids(prompt)
    assert len(full) > 64 and len(ids) == 64
    text = eng.tokenizer.decode(ids)
    assert text.startswith(eng.tokenizer.decode(full[:20])) and text.endswith("##Quality: ")
    assert "[...]" in text and ids[-20:] == full[-20:]
    # what choice_probs scores is exactly these ids
    opts = ["1", "2", "3"]
    with torch.no_grad():
        logits = eng.model(torch.tensor([ids])).logits[0, -1, [eng.encoder.option_id(o) for o in opts]]
    np.testing.assert_allclose(eng.choice_probs([prompt], opts)[0], torch.softmax(logits, -1).numpy(), atol=1e-5)
    short = "Rate it: 1"
    assert eng.encoder.raw_prompt_ids(short) == eng.encoder.tok(short)["input_ids"]


def test_clears_reflection_prompt_keeps_its_instructions_when_cut(tiny):
    """CLEAR generates its self-reflection from a judge-like prompt (instructions, the question, the answer, the
    reply template) with 256 of 512 tokens left for it by default; cut on the left, a long answer's prompt kept
    only the answer's tail and the template. Now it keeps its start and its end."""
    from scorers.clear import reflection_prompt

    eng = load_engine(LMConfig(tiny, max_length=160))
    text = reflection_prompt("What is the capital of France?", "Paris is the capital. " * 60, 0)
    (ids,) = eng.encoder.generation_prompt_ids([[{"role": "user", "content": text}]], 64)
    got = eng.tokenizer.decode(ids)
    assert len(ids) == 96 and "[...]" in got
    assert "<|im_start|>user\nThe text between a line" in got  # the instructions open it
    assert got.endswith("<|im_start|>assistant\n") and "from among choices A through C]" in got


def test_hidden_and_logits_consistent(engine):
    prompts, responses = _pairs(4)
    hl = engine.hidden_and_logits(prompts, responses)
    lps = engine.response_logprobs(prompts, responses)
    w = engine.output_weight().detach().numpy()
    assert w.shape == (len(engine.tokenizer), engine.model.config.hidden_size)
    for h, lp in zip(hl, lps, strict=True):
        assert h.hidden.shape == (len(lp), w.shape[1]) and h.logits.shape == (len(lp), w.shape[0])
        np.testing.assert_allclose(h.logits, h.hidden @ w.T, atol=1e-4)
        ls = torch.log_softmax(torch.from_numpy(h.logits), -1).numpy()
        np.testing.assert_allclose(ls[np.arange(len(lp)), h.targets], lp, atol=1e-4)


def test_generate_reproducible(engine):
    prompts, _ = _pairs(3)
    a = engine.generate(prompts, n=2, max_tokens=12, seed=3)
    assert len(a) == len(prompts) and all(len(x) == 2 and all(isinstance(s, str) for s in x) for x in a)
    assert a == engine.generate(prompts, n=2, max_tokens=12, seed=3)
    assert a != engine.generate(prompts, n=2, max_tokens=12, seed=4)
    g = engine.generate(prompts, n=2, max_tokens=12, temperature=0)
    assert all(x[0] == x[1] for x in g)  # greedy: both samples equal


def test_on_batch_and_oom_backoff(tiny):
    eng = load_engine(LMConfig(tiny, batch_tokens=4096))
    prompts, responses = _pairs(8)
    seen: list[int] = []
    full = eng.response_logprobs(prompts, responses, on_batch=lambda idx, arrs: seen.extend(idx))
    assert sorted(seen) == list(range(len(prompts)))
    calls: list[int] = []

    def flaky(batch):  # a real engine function that fails like CUDA does on batches above 2 rows
        calls.append(len(batch))
        if len(batch) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [len(b) for b in [batch]] * len(batch)

    out = eng._run_batches([10] * 8, flaky, "t")
    assert out == [2] * 8 and calls[0] == 8 and max(calls[1:]) <= 4
    assert len(full) == len(prompts)


def test_length_batches():
    b = length_batches([5, 100, 7, 90, 6], batch_tokens=200)
    assert b[0] == [1, 3] and sorted(i for x in b for i in x) == list(range(5))
    assert all(max([5, 100, 7, 90, 6][i] for i in x) * len(x) <= 200 for x in b)


def test_errors(tmp_path, engine):
    with pytest.raises(LMError, match="cannot load"):
        load_engine(LMConfig(str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="prompts but"):
        engine.response_logprobs([[]], ["a", "b"])
    with pytest.raises(ValueError, match="template"):
        LMConfig("x", template="vicuna")
    with pytest.raises(ValueError, match="kind"):
        load_engine(LMConfig("x"), kind="tgi")


def test_broken_model_folders_say_what_is_wrong(tmp_path, tiny):
    """A mistyped path, an empty folder, a folder without tokenizer files and a pickle-only checkpoint each get
    one line naming the problem, not transformers' multi-line text ("Repo id must be in the form ...")."""
    from safetensors.torch import load_file

    def copy(name: str, drop: tuple[str, ...]) -> str:
        folder = tmp_path / name
        folder.mkdir()
        for f in Path(tiny).iterdir():
            if not any(f.match(d) for d in drop):
                (folder / f.name).write_bytes(f.read_bytes())
        return str(folder)

    notok = copy("notok", ("tokenizer*",))
    pickle = copy("pickle", ("*.safetensors",))
    torch.save(load_file(str(Path(tiny) / "model.safetensors")), Path(pickle) / "pytorch_model.bin")
    (tmp_path / "empty").mkdir()
    cases = {str(tmp_path / "missing"): "no such folder", str(tmp_path / "empty"): "no config.json",
             notok: "no tokenizer files", pickle: "only pickle weights"}
    for folder, why in cases.items():
        with pytest.raises(LMError, match=why) as err:
            load_engine(LMConfig(folder))
        assert "\n" not in str(err.value) and str(err.value).startswith("cannot load model")


def test_max_length_beyond_the_models_positions_is_refused(tmp_path):
    """A GPT-2-style model (learned positions) with fewer positions than max_length: an IndexError deep in the
    forward pass before; now one line at load time naming the limit."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(make_tiny_model(tmp_path / "tiny"))
    cfg = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=64, n_layer=1, n_head=1,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2", safe_serialization=True)
    tok.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(LMError, match=r"max_length 1024 exceeds the 64 positions .*score.max_length <= 64"):
        load_engine(LMConfig(str(tmp_path / "gpt2")))
    eng = load_engine(LMConfig(str(tmp_path / "gpt2"), max_length=64))
    (lp,) = eng.response_logprobs([[{"role": "user", "content": "Write"}]], ["word " * 100])
    assert len(lp) == 63 and np.isfinite(lp).all()
