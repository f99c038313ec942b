"""This CPU's arithmetic limit against SmolLM2's raw float32 training step (the ceiling for `curate eval` here).

Float32 GEMM (2048^3, torch's BLAS) on 1 and 2 threads, then one raw training step of SmolLM2-135M (AdamW, random
tokens, no padding, no trainer) for a few batch shapes; prints JSON lines.

    python bench/bench_cpu_peak.py
"""

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_finetune_speed's timed step

import torch  # noqa: E402


def gemm(threads: int, n: int = 2048, reps: int = 10) -> float:
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def raw_steps() -> None:
    from bench_finetune_speed import timed_steps
    from transformers import AutoModelForCausalLM

    import curate.eval as E

    torch.set_num_threads(2)
    m = AutoModelForCausalLM.from_pretrained(E.resolve_student("smollm2-135m"), dtype=torch.float32)
    for bs, t in [(8, 128), (2, 128), (2, 256)]:  # the last of three steps is reported
        print(json.dumps({"batch": bs, "tokens": t, **timed_steps(m, torch.randint(0, 40000, (bs, t)), 3)}),
              flush=True)


if __name__ == "__main__":
    for th in (1, 2):
        print(json.dumps({"gemm_threads": th, "gflops": round(gemm(th), 1)}), flush=True)
    raw_steps()
