"""Causal-LM engines for model-based scorers: one interface (`Engine`, in base.py), transformers (hf.py) and
vLLM (vllm.py) behind it, and `load_engine` to pick one. The engines import base; base imports neither."""

from typing import Any

from curate.lm.base import Encoded, Encoder, Engine, HiddenLogits, LMConfig, LMError, Message

__all__ = ["Encoded", "Encoder", "Engine", "HiddenLogits", "LMConfig", "LMError", "Message", "load_engine"]


def load_engine(config: LMConfig, kind: str = "hf", **kw: Any) -> Engine:
    """An engine for `config`: kind "hf" (transformers, in process) or "vllm" (OpenAI server over HTTP).

    vllm kw: `urls=[...]` of running servers, or `python=` the vLLM environment's interpreter to start one
    (plus VLLMServer options).
    """
    if kind == "hf":
        from curate.lm.hf import HFEngine

        return HFEngine(config, **kw)
    if kind == "vllm":
        from curate.lm.vllm import VLLMEngine

        return VLLMEngine(config, **kw)
    raise ValueError(f"engine kind must be 'hf' or 'vllm', got {kind!r}")
