"""How well a causal LM fits instruction data: response loss on reference rows, and the proxy's quality checks.

The evaluation half of the proxy (training is `curate/lm/proxy.py`); `curate eval`, the iterative strategy's
feedback and the engines benchmark measure with these.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from curate.lm.base import Encoder, LMConfig, LMError, Message
from curate.lm.proxy import load_conversations


def eval_proxy(model_dir: str | Path, records: str | Path | Sequence[Any], *, max_length: int = 512,
               engine: Any = None) -> float:
    """Mean response loss (nats per token, token-weighted over every assistant turn) on reference records."""
    from curate.lm.hf import HFEngine

    eng = engine or HFEngine(LMConfig(str(model_dir), max_length=max_length))
    nll, toks = response_losses(eng, load_conversations(records))
    return float(nll.sum()) / max(1.0, float(toks.sum()))


def response_losses(engine: Any, convs: Sequence[list[Message]]) -> tuple[np.ndarray, np.ndarray]:
    """Summed response NLL (nats) and response token count per conversation, over all its assistant turns."""
    prompts, responses, owner = [], [], []
    for i, msgs in enumerate(convs):
        p, r = _turns([msgs])
        prompts += p
        responses += r
        owner += [i] * len(r)
    nll, toks = np.zeros(len(convs)), np.zeros(len(convs))
    for i, lp in zip(owner, engine.response_logprobs(prompts, responses) if prompts else [], strict=True):
        nll[i] += float(-lp.sum())
        toks[i] += len(lp)
    return nll, toks


def _turns(convs: Sequence[list[Message]]) -> tuple[list[list[Message]], list[str]]:
    prompts, responses = [], []
    for msgs in convs:
        for i, m in enumerate(msgs):
            if m["role"] == "assistant":
                prompts.append(msgs[:i])
                responses.append(m["content"])
    return prompts, responses


def unigram_loss(encoder: Encoder, train: Sequence[list[Message]], heldout: Sequence[list[Message]]) -> float:
    """Cross-entropy (nats/token) of held-out response tokens under an add-one unigram of training responses:
    the floor a proxy must clearly beat to be learning anything beyond token frequencies."""
    vocab = len(encoder.tok)
    counts = np.ones(vocab, dtype=np.float64)
    for r in _turns(train)[1]:
        np.add.at(counts, encoder.response_ids(r)[0], 1)
    logp = np.log(counts / counts.sum())
    ids = [i for r in _turns(heldout)[1] for i in encoder.response_ids(r)[0]]
    return float(-logp[ids].mean())


def proxy_quality(model_dir: str | Path, train: str | Path | Sequence[Any], heldout: str | Path | Sequence[Any],
                  *, seed: int = 0, max_length: int = 512, engine: Any = None) -> dict[str, float]:
    """Held-out response loss vs the unigram baseline, and AUROC of real vs shuffled responses.

    Shuffled = each held-out prompt paired with another row's response (a derangement). Two scores:
    `auroc_logp` ranks by mean log p(response | prompt); `auroc_pmi` by that minus the unconditioned mean
    log p(response) (the IFD direction), which cancels how likely a response is on its own.
    """
    from sklearn.metrics import roc_auc_score

    from curate.lm.hf import HFEngine

    eng = engine or HFEngine(LMConfig(str(model_dir), max_length=max_length))
    train_c, held_c = load_conversations(train), load_conversations(heldout)
    prompts, responses = _turns(held_c)
    n = len(prompts)
    if n < 2:
        raise LMError("proxy_quality needs at least 2 held-out rows")
    perm = np.random.default_rng(seed).permutation(n)
    perm = np.roll(perm, 1)[np.argsort(perm)]  # derangement: i -> next element of a random cycle
    shuffled = [responses[j] for j in perm]
    lps = eng.response_logprobs(prompts + prompts + [[]] * n, responses + shuffled + responses)
    cond, shuf, uncond = lps[:n], lps[n:2 * n], lps[2 * n:]
    loss = sum(float(-x.sum()) for x in cond) / sum(len(x) for x in cond)
    mean = np.array([x.mean() for x in cond + shuf])
    base = np.array([x.mean() for x in uncond + [uncond[j] for j in perm]])
    labels = np.r_[np.ones(n), np.zeros(n)]
    return {
        "heldout_loss": loss,
        "unigram_loss": unigram_loss(eng.encoder, train_c, held_c),
        "auroc_logp": float(roc_auc_score(labels, mean)),
        "auroc_pmi": float(roc_auc_score(labels, mean - base)),
        "rows": n,
    }
