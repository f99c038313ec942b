"""The canonical record: one place that says what every stage reads and writes.

A record is one training conversation. `messages` is OpenAI-style (`role` in system/user/assistant),
multi-turn first class; everything else is derived from it so later stages never re-parse inputs.

Identity and dedup rules (stated once, used everywhere):
- `id`: sha256 (first 32 hex chars) of the conversation after *content normalisation*:
  Unicode NFC, CRLF -> LF, trailing whitespace stripped from every line, leading/trailing blank
  space of each message stripped. Case and inner spacing are kept, so `id` names the exact text.
- `dedup_key`: the same hash after *dedup normalisation*: additionally lower-cased and every run of
  whitespace collapsed to one space. Two rows with equal `dedup_key` are exact duplicates; the first
  one read (inputs in the order given, rows in file order) is kept.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Any

import orjson
import pyarrow as pa

ROLES = ("system", "user", "assistant")

MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])

#: The records table (`records.parquet`) written by ingest and read by every later stage.
RECORD_SCHEMA = pa.schema(
    [
        ("id", pa.string()),  # content hash of the normalised conversation
        ("dedup_key", pa.string()),  # hash after case/whitespace folding (exact dedup)
        ("messages", pa.list_(MESSAGE_TYPE)),  # OpenAI-style conversation
        ("source", pa.string()),  # input file (or dataset name) the row came from
        ("row", pa.int64()),  # 1-based line (JSONL/CSV) or 0-based row index (JSON array, Parquet, HF)
        ("format", pa.string()),  # detected input format (alpaca, sharegpt, openai, ...)
        ("system", pa.string()),  # system prompt, "" when none
        ("instruction", pa.string()),  # last user turn
        ("response", pa.string()),  # last assistant turn
        ("n_turns", pa.int32()),  # number of assistant turns
        ("n_chars", pa.int64()),  # characters over all messages
        ("instruction_chars", pa.int64()),
        ("response_chars", pa.int64()),
        ("n_tokens", pa.int64()),  # word-piece estimate (words + punctuation) over all messages
    ]
)

#: The user's own columns (an input row's fields that are not part of the conversation: its original `id`,
#: metadata) live in one struct column under their own names, so they never clash with curate's columns. It is
#: added after RECORD_SCHEMA / REJECT_SCHEMA only when some input row has such fields (`curate.io.writers`).
META = "meta"

#: Rows that could not be normalised (`rejects.parquet`).
REJECT_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("row", pa.int64()),
        ("reason", pa.string()),  # short code: malformed_json, missing_field, empty_response, ...
        ("detail", pa.string()),  # a human sentence
        ("raw", pa.string()),  # the raw row, truncated to RAW_PREVIEW chars
    ]
)

RAW_PREVIEW = 500

_TOKEN_RE = re.compile(r"\w+|[^\w\s]", re.UNICODE)
_WS_RE = re.compile(r"\s+")
_TRAILING_WS_RE = re.compile(r"[ \t]+\n")


class RowError(ValueError):
    """A row that cannot become a record; `reason` is the short code stored in rejects."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def normalise_text(text: str) -> str:
    """Content normalisation used for `id` and stored messages (see module docstring)."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    return _TRAILING_WS_RE.sub("\n", text).strip()


def _fold(text: str) -> str:
    return _WS_RE.sub(" ", text).lower().strip()


def _hash(payload: list[tuple[str, str]]) -> str:
    return hashlib.sha256(orjson.dumps(payload)).hexdigest()[:32]


def count_tokens(text: str) -> int:
    """Cheap, tokenizer-free length estimate (words + punctuation marks).

    Exact token counts for a named model are computed where a budget needs them (selection).
    """
    return len(_TOKEN_RE.findall(text))


def make_record(
    messages: list[dict[str, Any]], *, source: str, row: int, fmt: str, meta: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Validate and normalise a conversation into a record dict (raises RowError).

    `meta`: the row's own other fields (its original id, metadata), kept as they are under `meta`.
    """
    clean: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise RowError("unknown_role", f"message {i} has role {role!r}; expected one of {ROLES}")
        if content is None:
            content = ""
        if isinstance(content, int | float) and not isinstance(content, bool):
            content = str(content)  # a numeric answer in a turn is text, as Alpaca's numeric `output` is
        if not isinstance(content, str):
            raise RowError("wrong_type", f"message {i} content is {type(content).__name__}, not text")
        clean.append({"role": role, "content": normalise_text(content)})
    # a conversation may end on an unanswered user turn (common in ShareGPT dumps): trim it
    asked = any(m["role"] == "user" for m in clean)
    while clean and clean[-1]["role"] != "assistant":
        if clean[-1]["role"] == "system":
            break
        clean.pop()
    if not any(m["role"] == "user" for m in clean):  # a lone question has no answer (it was trimmed above)
        if asked:
            raise RowError("missing_response", "conversation has no assistant turn")
        raise RowError("missing_instruction", "conversation has no user turn")
    if not clean or clean[-1]["role"] != "assistant":
        raise RowError("missing_response", "conversation has no assistant turn")
    if any(m["role"] == "system" for m in clean[1:]):
        raise RowError("misplaced_system", "a system message may only come first")
    # LLaMA-Factory skips a conversation whose turns do not alternate from a user turn, and many chat templates
    # refuse one, so such a row would be selected and then never trained on: it is rejected here instead
    first = 1 if clean[0]["role"] == "system" else 0
    for i in range(first, len(clean)):
        want = "user" if (i - first) % 2 == 0 else "assistant"
        if clean[i]["role"] != want:
            where = "comes first" if i == first else f"follows another {clean[i]['role']} turn"
            raise RowError("roles_not_alternating", f"message {i} ({clean[i]['role']}) {where}; turns must "
                           "alternate user, assistant, ... from a user turn")
    for i, m in enumerate(clean):
        if m["role"] != "system" and not m["content"]:
            what = "empty_response" if m["role"] == "assistant" else "empty_instruction"
            raise RowError(what, f"message {i} ({m['role']}) is empty")
    system = clean[0]["content"] if clean[0]["role"] == "system" else ""
    users = [m["content"] for m in clean if m["role"] == "user"]
    answers = [m["content"] for m in clean if m["role"] == "assistant"]
    pairs = [(m["role"], m["content"]) for m in clean]
    rec = {
        "id": _hash(pairs),
        "dedup_key": _hash([(r, _fold(c)) for r, c in pairs]),
        "messages": clean,
        "source": source,
        "row": row,
        "format": fmt,
        "system": system,
        "instruction": users[-1],
        "response": answers[-1],
        "n_turns": len(answers),
        "n_chars": sum(len(c) for _, c in pairs),
        "instruction_chars": len(users[-1]),
        "response_chars": len(answers[-1]),
        "n_tokens": sum(count_tokens(c) for _, c in pairs),
    }
    if meta:
        rec[META] = meta
    return rec


def user_text(messages: list[dict[str, str]]) -> str:
    """System + user turns only (the Diversify-and-Conquer `tulu_user_only` view)."""
    return "\n".join(m["content"] for m in messages if m["role"] in ("system", "user"))


def conversation_text(messages: list[dict[str, str]]) -> str:
    """The whole conversation as plain text, one turn per paragraph."""
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)
