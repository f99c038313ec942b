"""Exports of a selected subset for trainers that do not read Parquet with `messages`.

Alpaca JSONL: instruction/input/output (+ system) — single-turn only; a multi-turn row keeps its last turn and
folds earlier turns into `history` (LLaMA-Factory's alpaca `history` field: [[user, assistant], ...]).
ShareGPT JSONL: conversations [{from: human|gpt|system, value}], any number of turns.
"""

from __future__ import annotations

from pathlib import Path

import orjson
import polars as pl

from curate.run import atomic_path

EXPORT_FORMATS = ("alpaca", "sharegpt")
_SHAREGPT_FROM = {"user": "human", "assistant": "gpt", "system": "system"}


def _alpaca(messages: list[dict[str, str]]) -> dict:
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else ""
    turns = [m for m in messages if m["role"] != "system"]
    pairs = [(turns[i]["content"], turns[i + 1]["content"]) for i in range(0, len(turns) - 1, 2)]
    last_user, last_answer = pairs[-1]
    row = {"instruction": last_user, "input": "", "output": last_answer}
    if system:
        row["system"] = system
    if len(pairs) > 1:
        row["history"] = [list(p) for p in pairs[:-1]]
    return row


def _sharegpt(messages: list[dict[str, str]]) -> dict:
    return {"conversations": [{"from": _SHAREGPT_FROM[m["role"]], "value": m["content"]} for m in messages]}


def export(parquet: str | Path, fmt: str, out: str | Path) -> Path:
    """Write `parquet`'s `messages` (plus `id`) as `fmt` JSONL to `out`, atomically."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose from {EXPORT_FORMATS}")
    convert = _alpaca if fmt == "alpaca" else _sharegpt
    out = Path(out)
    df = pl.read_parquet(parquet, columns=["id", "messages"])
    with atomic_path(out) as tmp, open(tmp, "wb") as fh:
        for rid, messages in df.iter_rows():
            fh.write(orjson.dumps({"id": rid, **convert(messages)}) + b"\n")
    return out
