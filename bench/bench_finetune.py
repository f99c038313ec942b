"""Rows/s of one proxy fine-tune epoch through the one fine-tune path: `curate plan`'s FINETUNE_RATE.

`curate plan` prices the iterative strategy's feedback as rows fine-tuned / FINETUNE_RATE. This times
`curate.lm.proxy.finetune_proxy` (its defaults: 1 epoch, lr 1e-3, batch 16, max_length 512, float32) on n and 2n
rows of the bundled sample (maths, code, tool use, general tasks; seeded shuffle) with a tiny proxy trained for a
few steps (speed does not depend on how well it is trained), and reports the slope, so the fixed set-up per call
(model load, trainer set-up) drops out. Run it on an idle machine; under load, compare two trees side by side
(`PYTHONPATH=<tree>`) instead of trusting the absolute number.

    nice -n 19 .venv/bin/python bench/bench_finetune.py [--rows 1000]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from curate.lm.proxy import finetune_proxy, load_conversations, train_proxy  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1000)
    args = ap.parse_args()
    convs = [c for f in sorted((ROOT / "data" / "sample").glob("*.jsonl")) for c in load_conversations(str(f))]
    random.Random(0).shuffle(convs)
    rows = [{"messages": c} for c in convs]
    if len(rows) < 2 * args.rows:
        raise SystemExit(f"the sample has {len(rows)} rows; --rows must be at most {len(rows) // 2}")
    with tempfile.TemporaryDirectory(prefix="bench-ft-") as d:
        proxy = train_proxy(rows, Path(d) / "proxy", size="tiny", steps=30, seed=0)
        secs = {}
        for n in (args.rows, 2 * args.rows):
            t0 = time.perf_counter()
            finetune_proxy(proxy, rows[:n], Path(d) / f"ft{n}")
            secs[n] = round(time.perf_counter() - t0, 2)
    slope = args.rows / max(secs[2 * args.rows] - secs[args.rows], 1e-6)
    print(json.dumps({"seconds": secs, "rows_per_second_slope": round(slope, 1),
                      "rows_per_second_2n": round(2 * args.rows / secs[2 * args.rows], 1)}))


if __name__ == "__main__":
    main()
