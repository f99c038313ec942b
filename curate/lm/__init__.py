"""Causal-LM engines for model-based scorers: one interface (`Engine`), transformers and vLLM behind it."""

from curate.lm.base import (
    Encoded,
    Encoder,
    Engine,
    HiddenLogits,
    LMConfig,
    LMError,
    Message,
    load_engine,
)

__all__ = ["Encoded", "Encoder", "Engine", "HiddenLogits", "LMConfig", "LMError", "Message", "load_engine"]
