"""CLEAR's generation prompts too long for their room: cut on the left (before) or in the middle (now).

CLEAR generates k samples from each row's conversation (`max_tokens` 256 new tokens) and, by default, its two
self-reflections from a judge-like prompt (instructions, the question, the answer, the reply template;
`reflection_max_tokens` 256 new tokens), both with SmolLM2's max_length 512: a prompt gets 256 tokens. Until this
change a longer prompt kept its last 256 tokens. This script tokenizes only (no generation): per pool, how many
rows have a prompt over its room, and of the reflection prompts that are, how many still hold their instructions
(the opening line of the data note) and the question's start, cut each way.

    .venv/bin/python bench/bench_generation_cut.py [--rows 1000]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_quality import kto_pool  # noqa: E402

from curate.lm import LMConfig, load_engine  # noqa: E402
from curate.lm.base import clip  # noqa: E402
from curate.lm.models import model_path  # noqa: E402
from curate.lm.proxy import load_conversations  # noqa: E402
from scorers.clear import ClearParams, question_text, reflection_prompt  # noqa: E402

ALPACA = ROOT.parent / "shared" / "data" / "alpaca-52k" / "alpaca_data.jsonl"
OPENING = "The text between a line"  # the data note's first words: the judge's instructions


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1000, help="rows per pool (the first N)")
    args = ap.parse_args()
    p = ClearParams()
    engine = load_engine(LMConfig(model_path("smollm2-135m"), max_length=512))
    enc, tok = engine.encoder, engine.tokenizer
    kto, _, _ = kto_pool()
    pools = {"KTO (kto-mix-test)": kto["messages"].to_list()[: args.rows],
             "Alpaca-52k": load_conversations([json.loads(x) for x in ALPACA.read_text().splitlines()[:args.rows]])}
    lines = ["# CLEAR's generation prompts: cut on the left or in the middle (bench/bench_generation_cut.py)", "",
             f"Command: `.venv/bin/python bench/bench_generation_cut.py --rows {args.rows}` "
             f"({time.strftime('%Y-%m-%d')}). SmolLM2-135M-Instruct's tokenizer, max_length 512, CLEAR's defaults "
             f"(samples: {p.max_tokens} new tokens; reflections: {p.reflection_max_tokens}). Tokenizing only. "
             "\"Kept\": of the reflection prompts over their room, how many still hold the judge's instructions "
             "(the data note's opening) and the question's first 30 characters after the cut.", "",
             "| pool | rows | sample prompts over 256 | reflection prompts over 256 | instructions kept: left / middle "
             "| question kept: left / middle |", "|---|---|---|---|---|---|"]
    for name, convs in pools.items():
        samples = [c[:-1] for c in convs]
        n_samples = sum(len(enc.prompt_ids(s)) > 512 - p.max_tokens for s in samples)
        over, kept = 0, {"left": [0, 0], "middle": [0, 0]}
        for c in convs:
            q = question_text(c)
            msgs = [{"role": "user", "content": reflection_prompt(q, c[-1]["content"] or "", 0)}]
            full = enc.prompt_ids(msgs)
            room = 512 - p.reflection_max_tokens
            if len(full) <= room:
                continue
            over += 1
            for how, ids in (("left", clip(full, room, "left")),
                             ("middle", enc.generation_prompt_ids([msgs], p.reflection_max_tokens)[0])):
                text = tok.decode(ids)
                kept[how][0] += OPENING in text
                kept[how][1] += q.strip()[:30] in text
        lines.append(f"| {name} | {len(convs):,} | {n_samples:,} | {over:,} | {kept['left'][0]} / "
                     f"{kept['middle'][0]} | {kept['left'][1]} / {kept['middle'][1]} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = ROOT / "bench" / "results" / "generation-cut.md"
    old = out.read_text() if out.exists() else ""
    out.write_text(text + (old[old.index("\nReading"):] if "\nReading" in old else ""))


if __name__ == "__main__":
    main()
