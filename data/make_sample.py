"""Rebuild the bundled sample from ../shared/data (seeded, so the same rows come out every time).

Only permissively licensed sets are used (see ATTRIBUTION.md). Each file keeps its native format, so the
sample also exercises format detection: GSM8K (question/answer), GPTeacher (instruction/input/response),
Self-Instruct seed tasks (instruction + instances).
"""

import random
import sys
from pathlib import Path

SHARED = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data")
OUT = Path(__file__).parent / "sample"
PLAN = [  # (source file, output name, rows)
    ("gsm8k/train.jsonl", "gsm8k_train.jsonl", 1500),
    ("gpteacher-toolformer/toolformer.jsonl", "gpteacher_toolformer.jsonl", 1000),
    ("gpteacher-toolformer/codegen_instruct.jsonl", "gpteacher_codegen.jsonl", 1000),
    ("self-instruct/seed_tasks.jsonl", "self_instruct_seed.jsonl", 175),
]

for src, name, n in PLAN:
    lines = (SHARED / src).read_text(encoding="utf-8").splitlines(keepends=True)
    rng = random.Random(0)
    idx = sorted(rng.sample(range(len(lines)), min(n, len(lines))))
    (OUT / name).write_text("".join(lines[i] for i in idx), encoding="utf-8")
    print(f"{name}: {len(idx)} rows from {src}")
