"""SmolLM2-135M fine-tune throughput through curate's fine-tune path, with TRL's defaults vs curate's settings.

Same rows (the first N of a run's selected.parquet), same process, bf16 autocast, 2 threads. The variants change
only SFTConfig arguments (`trl.SFTConfig` is wrapped to add them; the model, data and trainer are real):
- "default(gc on)": TRL 1.16's defaults (activation checkpointing on, random sampler);
- "gc off": no activation checkpointing;
- "gc off + group_by_length": batches of similar length (what curate's fine-tune now uses on a CPU).
Then the arithmetic reference: one raw torch step (8 x 128 tokens, no padding) in fp32, bf16 autocast and bf16
weights, forward + backward + AdamW.

    python bench/bench_finetune_speed.py RUN_DIR [ROWS]
"""

import json
import sys
import time
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import polars as pl  # noqa: E402
import torch  # noqa: E402
import trl  # noqa: E402

import curate.eval as E  # noqa: E402

VARIANTS = {
    "default(gc on)": {"gradient_checkpointing": True, "train_sampling_strategy": "random"},
    "gc off": {"gradient_checkpointing": False, "train_sampling_strategy": "random"},
    "gc off + group_by_length": {"gradient_checkpointing": False, "train_sampling_strategy": "group_by_length"},
}


def trl_variants(run_dir: str, rows: int) -> None:
    student = E.resolve_student("smollm2-135m")
    sel = pl.read_parquet(Path(run_dir) / "selected.parquet", columns=["messages"]).head(rows)
    convs = [E._plain(m) for m in sel["messages"].to_list()]
    cfg = E.EvalConfig(student=student, accuracy_rows=0, threads=2)
    orig = trl.SFTConfig
    for name, kw in VARIANTS.items():
        def make(*a, _kw=kw, **k):
            k.update(_kw)
            return orig(*a, **k)

        with mock.patch("trl.SFTConfig", make):
            _, _, st = E.finetune(student, convs, cfg, 0, dtype="bfloat16")
        print(json.dumps({"variant": name, **st}), flush=True)


def raw_steps() -> None:
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    path = E.resolve_student("smollm2-135m")
    x = torch.randint(0, 40000, (8, 128))
    for mode in ("fp32", "autocast-bf16", "bf16-weights"):
        dtype = torch.bfloat16 if mode == "bf16-weights" else torch.float32
        m = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-5)
        for _ in range(4):
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast-bf16"):
                out = m(input_ids=x, labels=x)
            t1 = time.perf_counter()
            out.loss.backward()
            t2 = time.perf_counter()
            opt.step()
            opt.zero_grad()
            t3 = time.perf_counter()
        print(json.dumps({"raw": mode, "forward_s": round(t1 - t0, 2), "backward_s": round(t2 - t1, 2),
                          "optimizer_s": round(t3 - t2, 2), "tokens_per_s": round(1024 / (t3 - t0))}), flush=True)


if __name__ == "__main__":
    trl_variants(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 96)
    raw_steps()
