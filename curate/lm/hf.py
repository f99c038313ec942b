"""The transformers engine: in-process, length-bucketed batches, CUDA when present, OOM back-off.

Why in process: it is the engine that can return hidden states and full logits (DONOD), and on a small
CPU-only machine a tiny proxy scored here has no server start-up cost. Scores use the same token ids as the
vLLM engine (`curate.lm.base.Encoder`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from curate.lm.base import (
    Encoded,
    Engine,
    HiddenLogits,
    LMConfig,
    LMError,
    Message,
    _check_pairs,
    load_tokenizer,
)
from curate.progress import progress

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPES = ("auto", *_DTYPES)
_LOGIT_ROWS = 1 << 26  # cap on rows x vocab floats materialised at once (256 MiB fp32)
_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile")  # x86 flags of native bf16 dot products (a hint only)


def _cpu_info() -> tuple[str, list[str]]:
    """CPU model name and the bf16-related flags from /proc/cpuinfo (empty where there is none)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                elif key.strip() in ("flags", "Features"):
                    flags |= set(value.split())
    except OSError:
        pass
    return name, sorted(f for f in flags if f in _BF16_FLAGS or f in ("bf16", "sve"))


def _time_matmul(dtype: torch.dtype, reps: int) -> float:
    """Best of `reps` times of a (128 x 576) @ (576 x 1536) matmul (SmolLM2-135M's MLP shape)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(128, 576, generator=g).to(dtype)
    b = torch.randn(576, 1536, generator=g).to(dtype)
    torch.matmul(a, b)  # warm-up: oneDNN builds its kernel on the first call
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t0)
    return best


@functools.lru_cache(maxsize=4)
def _cpu_bf16_check(threads: int) -> dict[str, Any]:
    """Does this CPU run bf16 matmuls faster than float32? Measured (best of interleaved runs), not assumed.

    The verdict is kept in the model cache per (CPU, flags, torch, threads), so every run on a machine makes
    the same choice: a flip would change the score-store key and rescore the pool.
    """
    from curate.run import cache_dir, write_json

    name, flags = _cpu_info()
    key = hashlib.sha256(f"{name}|{flags}|{torch.__version__}|{threads}".encode()).hexdigest()[:12]
    path = cache_dir() / "models" / f"dtype-check-{key}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    fp32, bf16 = float("inf"), float("inf")
    for _ in range(3):  # interleaved, so a burst of load elsewhere hits both
        fp32 = min(fp32, _time_matmul(torch.float32, 3))
        bf16 = min(bf16, _time_matmul(torch.bfloat16, 3))
    ratio = bf16 / fp32
    verdict = {
        "dtype": "bfloat16" if ratio < 0.8 else "float32", "device": "cpu", "cpu": name, "cpu_flags": flags,
        "threads": threads, "fp32_ms": round(fp32 * 1e3, 3), "bf16_ms": round(bf16 * 1e3, 3),
        "bf16_time_over_fp32": round(ratio, 3), "rule": "bfloat16 when a bf16 matmul takes < 0.8x float32's",
        "torch": torch.__version__,
    }
    write_json(verdict, path)
    return verdict


def default_threads() -> int:
    """CPU threads an engine uses: $CURATE_TORCH_THREADS, else the cores this process may run on."""
    return int(os.environ.get("CURATE_TORCH_THREADS", 0)) or len(os.sched_getaffinity(0))


def dtype_choice(dtype: str = "auto", device: str | None = None, threads: int | None = None) -> dict[str, Any]:
    """The dtype to run in and why (for the manifest). `auto`: bf16 on CUDA when supported, and on a CPU
    whose measured bf16 matmul (at the engine's thread count) is clearly faster than float32's; else float32."""
    if dtype not in DTYPES:
        raise ValueError(f"score dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype != "auto":
        return {"requested": dtype, "dtype": dtype}
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return {"requested": "auto", "dtype": "bfloat16" if ok else "float32", "device": "cuda",
                "gpu": torch.cuda.get_device_name(dev), "bf16_supported": ok}
    if dev.type != "cpu":
        return {"requested": "auto", "dtype": "float32", "device": dev.type}
    n = max(1, threads or default_threads())
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return {"requested": "auto", **_cpu_bf16_check(n)}
    finally:
        torch.set_num_threads(before)


def resolve_dtype(dtype: str = "auto", device: str | None = None) -> str:
    """`dtype_choice(...)["dtype"]`: a concrete dtype name."""
    return dtype_choice(dtype, device)["dtype"]


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def length_batches(lengths: Sequence[int], batch_tokens: int, shrink: float = 0.75) -> list[list[int]]:
    """Indices grouped into batches of similar length: longest first, padded size <= batch_tokens.

    A batch that already holds batch_tokens / 8 padded tokens (big enough to keep matmuls efficient) also
    ends before a member shorter than `shrink` x its width: otherwise a small or varied pool lands in one
    batch padded to its longest row (32 Alpaca-like sequences: 2.2x the real tokens, now 1.2x), and on a
    CPU every padded token costs as much as a real one.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        width = lengths[cur[0]] if cur else lengths[i]  # longest member (sorted descending)
        full = width * (len(cur) + 1) > batch_tokens
        ragged = lengths[i] < shrink * width and width * len(cur) >= batch_tokens // 8
        if cur and (full or ragged):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


class HFEngine(Engine):
    """transformers causal LM (safetensors only; trust_remote_code only when the config says so)."""

    kind = "hf"

    def __init__(self, config: LMConfig, *, model: Any = None, tokenizer: Any = None, threads: int | None = None):
        from transformers import AutoModelForCausalLM

        if config.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {config.dtype!r}")
        self.device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, threads or default_threads()))
        self.dtype_choice = dtype_choice(config.dtype, str(self.device), torch.get_num_threads())
        if config.dtype == "auto":  # the signature (score-store key) names the dtype actually used
            config = dataclasses.replace(config, dtype=self.dtype_choice["dtype"])
        self.config = config
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config)
        if model is None:
            try:
                model = AutoModelForCausalLM.from_pretrained(
                    config.model, revision=config.revision, dtype=_DTYPES[config.dtype],
                    use_safetensors=True, trust_remote_code=config.trust_remote_code,
                )
            except (OSError, ValueError) as e:
                raise LMError(f"cannot load model {config.model!r} (safetensors only): {e}") from None
        limit = getattr(model.config, "max_position_embeddings", None)  # GPT-2's n_positions too (attribute map)
        if isinstance(limit, int) and config.max_length > limit:
            # past it, learned position tables (GPT-2, OPT) index out of range and RoPE models score text they were
            # never trained on; vLLM refuses such a max_model_len as well
            raise LMError(f"max_length {config.max_length} exceeds the {limit} positions {config.model!r} was built "
                          f"for (max_position_embeddings); set score.max_length <= {limit}")
        self.model = model.to(self.device).eval()
        from curate.lm.base import Encoder

        self.encoder = Encoder(self.tokenizer, config)
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0

    # -- helpers ----------------------------------------------------------------------------------------------
    def output_weight(self) -> torch.Tensor:
        """The lm_head weight (V x d), for DONOD's analytic output-layer update."""
        return self.model.get_output_embeddings().weight

    def _project(self, hidden: torch.Tensor) -> torch.Tensor:
        """lm_head on selected hidden states, with the model's logit scaling/soft-capping when it has one."""
        logits = self.model.get_output_embeddings()(hidden).float()
        cfg = self.model.config
        scale = getattr(cfg, "logit_scale", None)
        if scale:
            logits = logits * scale
        cap = getattr(cfg, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _hidden(self, seqs: list[list[int]]) -> torch.Tensor:
        """Final hidden states (B, L, d) of right-padded sequences (no logits: those are taken only where needed)."""
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, :len(s)] = torch.tensor(s)
            mask[row, :len(s)] = 1
        out = self.model.get_decoder()(input_ids=ids.to(self.device), attention_mask=mask.to(self.device))
        return out.last_hidden_state

    def _run_batches(
        self,
        lengths: Sequence[int],
        fn: Callable[[list[int]], list[Any]],
        desc: str,
        on_batch: Callable[[list[int], list[Any]], None] | None = None,
        batch_tokens: int | None = None,
    ) -> list[Any]:
        """Run fn over length-bucketed batches, halving a batch on out-of-memory; results in input order."""
        results: list[Any] = [None] * len(lengths)
        batches = length_batches(lengths, batch_tokens or self.config.batch_tokens)
        with progress() as bar:
            task = bar.add_task(desc, total=len(lengths))
            for batch in batches:
                for idx, res in self._with_backoff(batch, fn):
                    for i, r in zip(idx, res, strict=True):
                        results[i] = r
                    if on_batch is not None:
                        on_batch(idx, res)
                    bar.advance(task, len(idx))
        return results

    def _with_backoff(self, batch: list[int], fn: Callable[[list[int]], list[Any]]) -> Iterator[tuple]:
        try:
            with torch.inference_mode():
                res = fn(batch)
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not _is_oom(e):
                raise
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(batch) == 1:
                raise LMError(
                    f"out of memory on a single sequence on {self.device}; lower max_length "
                    f"({self.config.max_length}) or use a bigger device"
                ) from None
            half = len(batch) // 2
            yield from self._with_backoff(batch[:half], fn)
            yield from self._with_backoff(batch[half:], fn)
            return
        yield batch, res

    def _encode_all(self, prompts: Sequence[Sequence[Message]], responses: Sequence[str]) -> list[Encoded]:
        _check_pairs(prompts, responses)
        return [self.encoder.encode(p, r) for p, r in zip(prompts, responses, strict=True)]

    def _span_hidden(self, encs: list[Encoded]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Hidden states at the positions predicting each response token, and the target ids."""
        hidden = self._hidden([e.ids for e in encs])
        hs, targets = [], []
        for row, e in enumerate(encs):
            p, r = len(e.prompt_ids), len(e.response_ids)
            hs.append(hidden[row, p - 1:p + r - 1])
            targets.append(torch.tensor(e.response_ids, device=self.device))
        return hs, targets

    # -- interface --------------------------------------------------------------------------------------------
    def response_logprobs(
        self,
        prompts: Sequence[Sequence[Message]],
        responses: Sequence[str],
        *,
        on_batch: Callable[[list[int], list[np.ndarray]], None] | None = None,
    ) -> list[np.ndarray]:
        encs = self._encode_all(prompts, responses)

        def fn(batch: list[int]) -> list[np.ndarray]:
            hs, targets = self._span_hidden([encs[i] for i in batch])
            flat_h, flat_t = torch.cat(hs), torch.cat(targets)
            vocab = self.model.get_output_embeddings().weight.shape[0]
            step = max(1, _LOGIT_ROWS // vocab)
            lp = torch.empty(len(flat_t), dtype=torch.float32, device=self.device)
            for s in range(0, len(flat_t), step):
                logits = self._project(flat_h[s:s + step])
                lp[s:s + step] = torch.log_softmax(logits, -1).gather(1, flat_t[s:s + step, None])[:, 0]
            out = lp.cpu().numpy()
            return list(np.split(out, np.cumsum([len(t) for t in targets])[:-1]))

        return self._run_batches([len(e.ids) for e in encs], fn, "logprobs", on_batch)

    def hidden_and_logits(
        self, prompts: Sequence[Sequence[Message]], responses: Sequence[str]
    ) -> list[HiddenLogits]:
        """Final hidden states (T, d), logits (T, V) and targets at response positions, per pair."""
        encs = self._encode_all(prompts, responses)

        def fn(batch: list[int]) -> list[HiddenLogits]:
            hs, targets = self._span_hidden([encs[i] for i in batch])
            return [
                HiddenLogits(h.float().cpu().numpy(), self._project(h).cpu().numpy(), t.cpu().numpy())
                for h, t in zip(hs, targets, strict=True)
            ]

        return self._run_batches([len(e.ids) for e in encs], fn, "hidden states")

    def choice_probs(self, prompts: Sequence[str], options: Sequence[str]) -> np.ndarray:
        if not options:
            raise ValueError("choice_probs needs at least one option")
        opt_ids = torch.tensor([self.encoder.option_id(o) for o in options], device=self.device)
        seqs = [self.encoder.raw_prompt_ids(p) for p in prompts]
        if any(len(s) == 0 for s in seqs):
            raise ValueError("choice_probs got an empty prompt")

        def fn(batch: list[int]) -> list[np.ndarray]:
            hidden = self._hidden([seqs[i] for i in batch])
            last = torch.stack([hidden[row, len(seqs[i]) - 1] for row, i in enumerate(batch)])
            logits = self._project(last)[:, opt_ids]
            return list(torch.softmax(logits, -1).cpu().numpy())

        rows = self._run_batches([len(s) for s in seqs], fn, "choice probs")
        return np.stack(rows).astype(np.float32) if rows else np.zeros((0, len(options)), np.float32)

    def generate(
        self,
        prompts: Sequence[Sequence[Message]],
        *,
        n: int = 1,
        temperature: float = 1.0,
        max_tokens: int = 256,
        seed: int = 0,
    ) -> list[list[str]]:
        """Sampled continuations; reproducible for a given seed and input list (batches are seeded in order)."""
        seqs = self.encoder.generation_prompt_ids(prompts, max_tokens)
        stop = self.encoder.end_token_ids()
        gen = torch.Generator().manual_seed(seed)

        def fn(batch: list[int]) -> list[list[str]]:
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            width = max(len(seqs[i]) for i in batch)
            ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, i in enumerate(batch):
                s = seqs[i]
                ids[row, width - len(s):] = torch.tensor(s)
                mask[row, width - len(s):] = 1
            sample = temperature > 0
            k = n if sample else 1  # greedy: one decode, repeated n times
            sampling = {"temperature": temperature, "top_p": 1.0, "top_k": 0} if sample else {}
            out = self.model.generate(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device), do_sample=sample,
                num_return_sequences=k, max_new_tokens=max_tokens, eos_token_id=stop or None,
                pad_token_id=self.pad_id, **sampling,
            )
            texts = self.tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
            return [texts[row * k:(row + 1) * k] * (n // k) for row in range(len(batch))]

        per_batch = max(self.config.batch_tokens // max(1, n), 1)  # n sequences per prompt
        return self._run_batches([len(s) + max_tokens for s in seqs], fn, "generate", batch_tokens=per_batch)
