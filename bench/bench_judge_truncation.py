"""deita with SmolLM2 on KTO rows, before and after judge prompts lose their middle instead of their start.

Why: 552 of the 1,091 KTO rows (`../shared/data/kto-mix-test`) give a deita quality prompt longer than
max_length 512 with SmolLM2's tokenizer (1 of the 300 Alpaca rows of bench/bench_quality.py). Until cb01805 such a
prompt kept its last 512 tokens: the judge read the tail of the answer, with neither its instructions nor the
question. This script scores the same rows both ways with the real Deita scorer (the "before" arm patches
`Encoder.raw_prompt_ids` back to the old left clip) and reports how well each column ranks KTO desirable answers
above undesirable ones (AUROC, 0.5 = chance), on the rows that were cut and on all rows.

    .venv/bin/python bench/bench_judge_truncation.py --kto 200 --out bench/results/judge-truncation.md
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_quality import MAX_LENGTH, kto_pool  # noqa: E402

from curate.lm import LMConfig, load_engine  # noqa: E402
from curate.lm.base import Encoder, clip  # noqa: E402
from curate.lm.hf import resolve_dtype  # noqa: E402
from curate.lm.models import model_path  # noqa: E402
from curate.scoring.contract import ScoreContext  # noqa: E402
from scorers.deita import Deita, quality_prompt, turn_pairs  # noqa: E402

COLUMNS = ("deita_quality", "deita_complexity", "deita_score")


def left_clip(self: Encoder, prompt: str) -> list[int]:
    """The rule before cb01805: keep the prompt's last max_length tokens."""
    ids = list(self.tok(prompt, add_special_tokens=True)["input_ids"])
    return clip(ids, self.config.max_length, "left")


def auroc(scores: np.ndarray, desirable: np.ndarray) -> float:
    ok = np.isfinite(scores)
    y, s = desirable[ok], scores[ok]
    return float(roc_auc_score(y, s)) if 0 < y.sum() < y.size else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kto", type=int, default=200, help="the first N KTO rows (bench_quality's --kto)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "judge-truncation.md"))
    args = ap.parse_args()
    load_before = os.getloadavg()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    kto, labels, _ = kto_pool()
    kto, labels = kto.head(args.kto), np.asarray(labels[: args.kto], dtype=bool)
    engine = load_engine(LMConfig(model_path("smollm2-135m"), max_length=MAX_LENGTH, dtype=resolve_dtype("auto")))
    tok = engine.encoder.tok
    cut = np.array([any(len(tok(quality_prompt(u, a, delimit=True))["input_ids"]) > MAX_LENGTH
                        for u, a in turn_pairs(m)) for m in kto["messages"].to_list()])
    scorer = Deita()
    results, seconds = {}, {}
    for arm in ("before (left clip)", "after (middle cut)"):
        original = Encoder.raw_prompt_ids
        if arm.startswith("before"):
            Encoder.raw_prompt_ids = left_clip  # type: ignore[method-assign]
        try:
            t0 = time.perf_counter()
            results[arm] = scorer.score(kto, ScoreContext(engine=engine))
            seconds[arm] = time.perf_counter() - t0
        finally:
            Encoder.raw_prompt_ids = original  # type: ignore[method-assign]
    load_after = os.getloadavg()

    lines = [
        "# deita on long prompts: the judge's start kept or cut (bench/bench_judge_truncation.py)",
        "",
        f"Command: `.venv/bin/python bench/bench_judge_truncation.py --kto {args.kto}` "
        f"({time.strftime('%Y-%m-%d')}). 2 cores, load average {load_before[0]:.1f} before, {load_after[0]:.1f} "
        f"after. SmolLM2-135M-Instruct ({engine.config.dtype}), max_length {MAX_LENGTH}, the real Deita scorer "
        "(fenced templates, the default).",
        "",
        f"Rows: the first {args.kto} KTO rows (`kto-mix-test`; {int(labels.sum())} desirable), as "
        f"bench_quality.py's `--kto {args.kto}`. {int(cut.sum())} of them have a deita quality prompt longer than "
        f"{MAX_LENGTH} tokens. \"Before\" is the rule until cb01805 (the prompt kept its last {MAX_LENGTH} tokens: the "
        "answer's tail, no instructions, no question); \"after\" keeps the start and the end with `[...]` between "
        "(`curate.lm.base.clip_middle`). Cell: AUROC of desirable over undesirable answers (0.5 = chance; the "
        "column's direction, higher = better). Seconds: "
        + ", ".join(f"{a} {s:.0f} s" for a, s in seconds.items()) + ".",
        "",
        "| column | arm | rows cut | all rows |",
        "|---|---|---|---|",
    ]
    for col in COLUMNS:
        for arm, df in results.items():
            x = df[col].cast(float).fill_null(float("nan")).to_numpy()
            lines.append(f"| {col} | {arm} | {auroc(x[cut], labels[cut]):.2f} ({int(cut.sum())}) | "
                         f"{auroc(x, labels):.2f} ({len(x)}) |")
    moved = {col: float(np.nanmean(np.abs(results['after (middle cut)'][col].to_numpy()[cut]
                                          - results['before (left clip)'][col].to_numpy()[cut]))) for col in COLUMNS}
    same = {col: bool(np.allclose(results['after (middle cut)'][col].to_numpy()[~cut],
                                  results['before (left clip)'][col].to_numpy()[~cut])) for col in COLUMNS}
    lines += ["", "Mean absolute change on the cut rows: " + ", ".join(f"{c} {v:.3f}" for c, v in moved.items())
              + "; rows not cut unchanged: " + ", ".join(f"{c} {v}" for c, v in same.items()) + "."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
