"""SmolLM2-135M fine-tune throughput through curate's fine-tune path, with TRL's defaults vs curate's settings.

Same rows (the first N of a run's selected.parquet), same process, bf16 autocast, 2 threads. The variants change
only SFTConfig arguments (`trl.SFTConfig` is subclassed to override them; the model, data and trainer are real).
`gc` (the first speed-up, batch 8 in one forward pass):
- "default(gc on)": TRL 1.16's defaults (activation checkpointing on, random sampler);
- "gc off": no activation checkpointing;
- "gc off + group_by_length": batches of similar length.
`micro` (the second): the same optimizer batch of 8 run as micro-batches of 8, 4, 2 or 1 rows with gradient
accumulation (`MICRO` names the order, repeats interleave so load drifts hit every variant), batches grouped by
length (micro-batch 1: random order, nothing to pad). `lora`: curate's default fine-tune (full, micro-batches of 2)
against `--lora` (peft, r 16, all linear layers, same lr), in the order given. `loss`: TRL's fused LM head
("trl", a float32 LM head on a CPU) against the model's own loss ("model", curate's CPU default), in the order
given. Then (not for `lora` or `loss`) the arithmetic reference: one raw torch step
(8 x 128 tokens, no padding) in fp32, bf16 autocast and bf16 weights, forward + backward + AdamW.

    python bench/bench_finetune_speed.py RUN_DIR [ROWS] [gc | micro MICRO... | lora full|lora... | loss trl|model...]
    e.g.  ... RUN 192 micro 8 2 8 2      ... RUN 192 lora full lora full lora      ... RUN 96 loss trl model trl model
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
from curate.lm.finetune import _checkpointing_arg  # noqa: E402

GC = _checkpointing_arg(trl.SFTConfig)  # the name the installed transformers uses
_ONE_PASS = {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 1}
VARIANTS = {
    "default(gc on)": {GC: True, "train_sampling_strategy": "random", **_ONE_PASS},
    "gc off": {GC: False, "train_sampling_strategy": "random", **_ONE_PASS},
    "gc off + group_by_length": {GC: False, "train_sampling_strategy": "group_by_length",
                                 **_ONE_PASS},
}


def micro_variants(micros: list[int]) -> list[tuple[str, dict]]:
    return [(f"micro-batch {m} x {8 // m}", {"per_device_train_batch_size": m, "gradient_accumulation_steps": 8 // m,
                                             "train_sampling_strategy": "random" if m == 1 else "group_by_length"})
            for m in micros]


def trl_variants(run_dir: str, rows: int, variants: list[tuple[str, dict]]) -> None:
    student = E.resolve_student("smollm2-135m")
    sel = pl.read_parquet(Path(run_dir) / "selected.parquet", columns=["messages"]).head(rows)
    convs = [E._plain(m) for m in sel["messages"].to_list()]
    cfg = E.EvalConfig(student=student, accuracy_rows=0, threads=2)
    orig = trl.SFTConfig
    for name, kw in variants:
        class Make(orig):  # a subclass keeps dataclass fields (curate reads them) and overrides the arguments
            def __init__(self, *a, _kw=kw, **k):
                k.update(_kw)
                super().__init__(*a, **k)

        with mock.patch("trl.SFTConfig", Make):
            _, _, st = E.finetune(student, convs, cfg, 0, dtype="bfloat16")
        print(json.dumps({"variant": name, **st}), flush=True)


def path_variants(run_dir: str, rows: int, order: list[str], settings: dict[str, dict]) -> None:
    """Variants through curate's own path (no SFTConfig overrides), each an `EvalConfig` setting: full vs LoRA
    (trainable parameters, so the backward pass and the optimizer step, differ), TRL's fused LM head vs the
    model's own loss."""
    student = E.resolve_student("smollm2-135m")
    sel = pl.read_parquet(Path(run_dir) / "selected.parquet", columns=["messages"]).head(rows)
    convs = [E._plain(m) for m in sel["messages"].to_list()]
    for name in order:
        cfg = E.EvalConfig(student=student, accuracy_rows=0, threads=2, **settings[name])
        _, _, st = E.finetune(student, convs, cfg, 0, dtype="bfloat16")
        print(json.dumps({"variant": name, **st}), flush=True)


PATH_VARIANTS = {"lora": {"full": {"lora": False}, "lora": {"lora": True}},
                 "loss": {"trl": {"loss": "trl"}, "model": {"loss": "model"}}}


def timed_steps(m: torch.nn.Module, x: torch.Tensor, reps: int, autocast: bool = False) -> dict:
    """`reps` raw training steps (forward with labels, backward, AdamW) on the token batch `x`; the last one's
    forward / backward / optimizer seconds and tokens/s (the earlier ones warm up)."""
    opt = torch.optim.AdamW(m.parameters(), lr=1e-5)
    for _ in range(reps):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = m(input_ids=x, labels=x)
        t1 = time.perf_counter()
        out.loss.backward()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad()
        t3 = time.perf_counter()
    return {"forward_s": round(t1 - t0, 2), "backward_s": round(t2 - t1, 2), "optimizer_s": round(t3 - t2, 2),
            "tokens_per_s": round(x.numel() / (t3 - t0), 1)}


def raw_steps() -> None:
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    path = E.resolve_student("smollm2-135m")
    x = torch.randint(0, 40000, (8, 128))
    for mode in ("fp32", "autocast-bf16", "bf16-weights"):
        dtype = torch.bfloat16 if mode == "bf16-weights" else torch.float32
        m = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        print(json.dumps({"raw": mode, **timed_steps(m, x, 4, autocast=mode == "autocast-bf16")}), flush=True)


if __name__ == "__main__":
    rows = int(sys.argv[2]) if len(sys.argv) > 2 else 96
    kind = sys.argv[3] if len(sys.argv) > 3 else "gc"
    if kind in PATH_VARIANTS:
        names = list(PATH_VARIANTS[kind])
        path_variants(sys.argv[1], rows, sys.argv[4:] or names + names, PATH_VARIANTS[kind])
    else:
        chosen = list(VARIANTS.items()) if kind == "gc" else micro_variants([int(m) for m in sys.argv[4:]] or [8, 2])
        trl_variants(sys.argv[1], rows, chosen)
        raw_steps()
