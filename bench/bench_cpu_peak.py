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
    from transformers import AutoModelForCausalLM

    import curate.eval as E

    torch.set_num_threads(2)
    m = AutoModelForCausalLM.from_pretrained(E.resolve_student("smollm2-135m"), dtype=torch.float32)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-5)
    for bs, t in [(8, 128), (2, 128), (2, 256)]:
        x = torch.randint(0, 40000, (bs, t))
        for _ in range(3):  # the last of three is reported
            t0 = time.perf_counter()
            out = m(input_ids=x, labels=x)
            t1 = time.perf_counter()
            out.loss.backward()
            t2 = time.perf_counter()
            opt.step()
            opt.zero_grad()
            t3 = time.perf_counter()
        print(json.dumps({"batch": bs, "tokens": t, "forward_s": round(t1 - t0, 2), "backward_s": round(t2 - t1, 2),
                          "optimizer_s": round(t3 - t2, 2), "tokens_per_s": round(bs * t / (t3 - t0), 1)}), flush=True)


if __name__ == "__main__":
    for th in (1, 2):
        print(json.dumps({"gemm_threads": th, "gflops": round(gemm(th), 1)}), flush=True)
    raw_steps()
