"""A proxy LM curate trains itself: the offline default model for likelihood scorers, and an SFT feedback loop.

Why: Superfiltering shows a small model's IFD ranks data nearly as well as a large one's, and nothing may be
fetched from a hub here. `train_proxy` trains a small LLaMA-architecture LM (and a byte-level BPE tokenizer)
from scratch on a dataset's conversations, rendered exactly as the engines render them for scoring (ChatML
with BOS). `finetune_proxy` (the one fine-tune path, `curate.lm.finetune`) + `eval_proxy` give later stages a
cheap "train on the subset, measure loss on a reference set" signal.

Sizes (params include the tied embedding): "tiny" is sized so both IFD passes over Alpaca-52k take about
10 minutes on a 2-core CPU (see bench/results/engines.md); "small"/"base" are for GPUs.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from curate.lm.base import LMError, Message
from curate.lm.tiny import llama_config, save_model, train_tokenizer
from curate.progress import progress

PROXY_MARKER = "curate_proxy.json"  # written beside every proxy curate trains (its training record)


def is_proxy(model_dir: str | Path) -> bool:
    """A model curate trained (or tuned) as its toy proxy: the folder holds PROXY_MARKER."""
    return (Path(model_dir) / PROXY_MARKER).exists()


PROXY_VERSION = 1  # bump when training changes, so cached proxies are retrained


@dataclass(frozen=True)
class ProxySize:
    vocab_size: int
    hidden_size: int
    layers: int
    intermediate_size: int
    head_dim: int = 64


SIZES: dict[str, ProxySize] = {
    "tiny": ProxySize(vocab_size=4096, hidden_size=64, layers=2, intermediate_size=256),  # ~0.4M params
    "small": ProxySize(vocab_size=4096, hidden_size=128, layers=2, intermediate_size=384),  # ~1M
    "base": ProxySize(vocab_size=8192, hidden_size=256, layers=4, intermediate_size=768),  # ~5M
    "large": ProxySize(vocab_size=16384, hidden_size=512, layers=8, intermediate_size=1536),  # ~34M, GPU
}


@dataclass(frozen=True)
class TrainConfig:
    size: str = "tiny"
    steps: int = 1000  # 4.1M tokens: 169 s on an idle 2-core CPU (bench/results/engines.md)
    seq_len: int = 256
    batch_size: int = 16
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.01
    seed: int = 0
    max_docs: int = 60000  # documents sampled for training
    tokenizer_docs: int = 20000  # documents the tokenizer is trained on


# -- data -----------------------------------------------------------------------------------------------------
def load_conversations(source: str | Path | Sequence[Any]) -> list[list[Message]]:
    """Conversations from a data file (any format ingest reads, incl. records.parquet) or from a list of
    records/rows (dicts with `messages`, or raw alpaca/sharegpt/... rows)."""
    from curate.io.formats import to_messages
    from curate.io.readers import InputError, iter_rows
    from curate.schema import RowError

    rows: Iterable[Any]
    if isinstance(source, str | Path):
        if not Path(source).exists():
            raise LMError(f"{source}: no such data file")
        rows = (r.value for r in iter_rows(str(source)))
    else:
        rows = source
    out = []
    try:
        for row in rows:
            if isinstance(row, RowError):
                continue
            if isinstance(row, dict) and isinstance(row.get("messages"), list | np.ndarray):
                msgs = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
            else:
                try:
                    msgs = to_messages(row)[1]
                except RowError:
                    continue
            if any(m["role"] == "assistant" for m in msgs):
                out.append(msgs)
    except InputError as e:
        raise LMError(str(e)) from None
    if not out:
        where = source if isinstance(source, str | Path) else "the given rows"
        raise LMError(f"no conversations with an assistant turn found in {where}")
    return out


def _documents(source: str | Path | Sequence[Any]) -> list[list[Message]] | list[str]:
    if isinstance(source, Sequence) and not isinstance(source, str) and source and isinstance(source[0], str):
        return list(source)
    return load_conversations(source)


def _doc_text(doc: list[Message] | str, tokenizer: Any) -> str:
    if isinstance(doc, str):
        return f"{tokenizer.bos_token}{doc}{tokenizer.eos_token}"
    return tokenizer.apply_chat_template(doc, tokenize=False)


# -- training -------------------------------------------------------------------------------------------------
def _lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress_ = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress_))))


def _set_threads() -> None:
    if not torch.cuda.is_available():
        torch.set_num_threads(int(os.environ.get("CURATE_TORCH_THREADS", 0)) or len(os.sched_getaffinity(0)))


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def train_proxy(
    source: str | Path | Sequence[Any],
    out_dir: str | Path,
    *,
    size: str = "tiny",
    steps: int | None = None,
    seq_len: int = 256,
    batch_size: int = 16,
    lr: float | None = None,
    seed: int = 0,
    max_docs: int = 60000,
) -> str:
    """Train a LLaMA-architecture proxy + BPE tokenizer from scratch on `source`; save HF format to out_dir.

    Documents (conversations rendered with the ChatML template, or plain texts) are packed into
    `seq_len` blocks; AdamW with warm-up + cosine decay. Returns the model folder.
    """
    if size not in SIZES:
        raise ValueError(f"proxy size must be one of {sorted(SIZES)}, got {size!r}")
    n_steps = steps or TrainConfig.steps
    cfg = TrainConfig(size=size, steps=n_steps, seq_len=seq_len, batch_size=batch_size,
                      lr=lr or (3e-3 if size == "tiny" else 1e-3), warmup=min(50, max(1, n_steps // 10)),
                      seed=seed, max_docs=max_docs)
    spec = SIZES[size]
    _set_threads()
    rng = random.Random(seed)
    docs = _documents(source)
    if len(docs) > cfg.max_docs:
        docs = rng.sample(docs, cfg.max_docs)
    # tokenizer: trained on raw message text (special tokens are added by the template)
    tok_docs = docs if len(docs) <= cfg.tokenizer_docs else rng.sample(docs, cfg.tokenizer_docs)
    raw = [d if isinstance(d, str) else "\n".join(m["content"] for m in d) for d in tok_docs]
    tokenizer = train_tokenizer(raw, spec.vocab_size)
    texts = [_doc_text(d, tokenizer) for d in docs]
    stream = np.fromiter(
        (i for ids in tokenizer(texts, add_special_tokens=False)["input_ids"] for i in ids), dtype=np.int64
    )
    n_blocks = len(stream) // (cfg.seq_len + 1)
    if n_blocks < 2:
        raise LMError(f"too little text to train a proxy: {len(stream)} tokens")
    blocks = torch.from_numpy(stream[: n_blocks * (cfg.seq_len + 1)].reshape(n_blocks, cfg.seq_len + 1))

    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    config = llama_config(tokenizer, hidden_size=spec.hidden_size, head_dim=spec.head_dim, layers=spec.layers,
                          intermediate_size=spec.intermediate_size, max_positions=4096, tie=True)
    device = _device()
    model = LlamaForCausalLM(config).to(device).train()
    t0 = time.perf_counter()
    losses = _fit(model, cfg, lambda g: _block_batch(blocks, cfg.batch_size, g), desc=f"train proxy ({size})")
    out = save_model(model.cpu().eval(), tokenizer, out_dir)
    meta = {"train": asdict(cfg), "tokens": int(len(stream)), "docs": len(docs),
            "params": sum(p.numel() for p in model.parameters()), "version": PROXY_VERSION,
            "train_seconds": round(time.perf_counter() - t0, 1),
            "final_train_loss": round(float(np.mean(losses[-20:])), 4)}
    (Path(out) / PROXY_MARKER).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def _block_batch(blocks: torch.Tensor, batch_size: int, gen: torch.Generator):
    idx = torch.randint(0, len(blocks), (batch_size,), generator=gen)
    b = blocks[idx]
    return b[:, :-1], b[:, 1:], None


def _fit(model: Any, cfg: TrainConfig, next_batch, desc: str) -> list[float]:
    """AdamW loop; next_batch(gen) -> (inputs, labels(-100 = ignore), attention_mask | None)."""
    device = next(model.parameters()).device
    decay = [p for n, p in model.named_parameters() if p.dim() > 1]
    no_decay = [p for n, p in model.named_parameters() if p.dim() <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(cfg.seed)
    losses = []
    with progress() as bar:
        task = bar.add_task(desc, total=cfg.steps)
        for step in range(cfg.steps):
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, cfg.steps, cfg.lr, cfg.warmup)
            x, y, mask = next_batch(gen)
            x, y = x.to(device), y.to(device)
            logits = model(input_ids=x, attention_mask=None if mask is None else mask.to(device)).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-100)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
            bar.advance(task)
    return losses


def finetune_proxy(
    base_dir: str | Path,
    records: str | Path | Sequence[Any],
    out_dir: str | Path,
    *,
    epochs: float = 1.0,
    lr: float = 1e-3,
    batch_size: int = 16,
    max_length: int = 512,
    seed: int = 0,
    dtype: str = "float32",
) -> str:
    """SFT of a proxy (or any small HF causal LM) on `records` through the one fine-tune path
    (`curate.lm.finetune`: TRL's SFTTrainer, loss on every assistant turn's tokens); saves to out_dir.

    float32 by default: the proxy is tiny, and bf16 sums change with the torch thread count."""
    from transformers import AutoTokenizer

    from curate.lm.finetune import FinetuneConfig, finetune, save_finetuned

    convs = load_conversations(records)
    # one forward pass per batch: the proxy is tiny, so per-call overhead dominates and micro-batches only cost
    cfg = FinetuneConfig(epochs=epochs, lr=lr, batch_size=batch_size, micro_batch=batch_size, max_length=max_length,
                         dtype=dtype, threads=None)
    model, tok, stats = finetune(str(base_dir), convs, cfg, seed)
    own = AutoTokenizer.from_pretrained(str(base_dir)).chat_template
    out = save_finetuned(model.cpu(), tok, out_dir, chat_template=own)
    meta = {"finetune": {"base": str(base_dir), "seed": seed, **asdict(cfg), **stats}}
    (Path(out) / PROXY_MARKER).write_text(json.dumps(meta, indent=2) + "\n")
    return out


# -- cached default -------------------------------------------------------------------------------------------
def _source_hash(source: str | Path | Sequence[Any]) -> str:
    if isinstance(source, str | Path):
        from curate.run import sha256_file

        return sha256_file(source)
    h = hashlib.sha256()
    for item in source:
        h.update(json.dumps(item, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()


def ensure_default_proxy(source: str | Path | Sequence[Any], *, size: str = "tiny", **train_kw: Any) -> str:
    """The proxy for `source`, trained on first use and cached under cache_dir()/models/ (keyed by data hash
    + training config + PROXY_VERSION). Concurrent callers wait on a file lock instead of training twice."""
    from curate.run import cache_dir

    key_data = {"data": _source_hash(source), "size": size, "train": train_kw, "version": PROXY_VERSION}
    key = hashlib.sha256(json.dumps(key_data, sort_keys=True).encode()).hexdigest()[:16]
    root = cache_dir() / "models"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"proxy-{size}-{key}"
    with open(root / f".proxy-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / PROXY_MARKER).exists():
            return str(final)
        tmp = root / f".tmp-proxy-{key}-{os.getpid()}-{int(time.time())}"
        try:
            train_proxy(source, tmp, size=size, **train_kw)
            (tmp / "curate_key.json").write_text(json.dumps(key_data, indent=2) + "\n")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
    return str(final)
