"""Peak memory of one curate fine-tune (`curate.lm.finetune`, the path `curate eval` and the iterative strategy's
feedback use), at a given micro-batch: what a user's RAM must hold for the default CPU settings.

    .venv/bin/python bench/probe_finetune_memory.py RUN/selected.parquet --rows 200 --micro-batch 2

Run each micro-batch in its own process: ru_maxrss is the process's lifetime peak.
"""
from __future__ import annotations

import argparse
import resource
import threading
import time

import polars as pl
import psutil

from curate.eval import _plain
from curate.lm.finetune import FinetuneConfig, finetune
from curate.lm.models import model_path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("parquet", help="A Parquet file with a `messages` column (e.g. a run's selected.parquet).")
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--student", default="smollm2-135m")
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    sel = pl.read_parquet(args.parquet, columns=["messages"]).head(args.rows)
    convs = [_plain(m) for m in sel["messages"].to_list()]
    path = model_path(args.student)
    proc = psutil.Process()
    before, peak = proc.memory_info().rss, [0]

    def sample() -> None:  # RSS every 50 ms, beside ru_maxrss
        while True:
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.05)

    threading.Thread(target=sample, daemon=True).start()
    t0 = time.perf_counter()
    cfg = FinetuneConfig(batch_size=args.batch_size, micro_batch=args.micro_batch, threads=2)
    _, _, stats = finetune(path, convs, cfg, 0, dtype=args.dtype)
    print(f"micro_batch {args.micro_batch}: rss before {before / 2**30:.2f} GiB, peak during {peak[0] / 2**30:.2f} "
          f"GiB, ru_maxrss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB, "
          f"{time.perf_counter() - t0:.0f} s, loss {stats['train_loss']}, tokens {stats['epoch_tokens']}", flush=True)


if __name__ == "__main__":
    main()
