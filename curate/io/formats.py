"""Instruction-data formats: one small adapter each, from a raw row (dict) to OpenAI-style messages.

Detection is per row under `auto`: the first adapter whose required keys the row has wins, so a file that
mixes formats still ingests and each record says which format it came in. With an explicit format, a row
that lacks that format's keys is rejected with `missing_field`.

Nothing is dropped silently: every field a format defines for the conversation becomes turns (Alpaca's
`history`, ShareGPT's `system`, OpenAI content parts) or a reject with a reason, and every other field of the
row is returned by `extra_fields` so ingest can keep it (the record's `meta`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from curate.schema import RowError

Messages = list[dict[str, Any]]

_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "system": "system",
}


def _text(row: dict[str, Any], key: str, *, required: bool = True) -> str:
    value = row.get(key)
    if value is None:
        if required:
            raise RowError("missing_field", f"field {key!r} is missing or null")
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # numeric answers (e.g. "42") are legitimate text
    if not isinstance(value, str):
        raise RowError("wrong_type", f"field {key!r} is {type(value).__name__}, expected text")
    return value


def _instruction_input(instruction: str, extra: str) -> str:
    # Alpaca convention: the optional input follows the instruction after a blank line
    return f"{instruction}\n\n{extra}" if extra.strip() else instruction


def _history(row: dict[str, Any]) -> Messages:
    """Alpaca `history` (LLaMA-Factory, LIMA): [[user, assistant], ...] turns that come before the row's own."""
    hist = row.get("history")
    if isinstance(hist, str):  # CSV/TSV cells hold text: empty means none, else the list as JSON
        if not hist.strip():
            return []
        try:
            hist = orjson.loads(hist)
        except orjson.JSONDecodeError:
            raise RowError("wrong_type", "'history' is text that is not a JSON list of [user, assistant]") from None
    if hist is None:
        return []
    if not isinstance(hist, list):
        raise RowError("wrong_type", f"'history' is {type(hist).__name__}, expected a list of [user, assistant]")
    msgs: Messages = []
    for i, pair in enumerate(hist):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(isinstance(t, str) for t in pair):
            raise RowError("wrong_type", f"'history' item {i} is {str(pair)[:60]!r}, expected [user, assistant] text")
        msgs += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return msgs


def _alpaca(row: dict[str, Any]) -> Messages:
    user = _instruction_input(_text(row, "instruction"), _text(row, "input", required=False))
    out_key = "output" if "output" in row else "response"
    msgs: Messages = []
    if row.get("system"):
        msgs.append({"role": "system", "content": _text(row, "system")})
    msgs += _history(row)
    return msgs + [{"role": "user", "content": user}, {"role": "assistant", "content": _text(row, out_key)}]


def _dolly(row: dict[str, Any]) -> Messages:
    user = _instruction_input(_text(row, "instruction"), _text(row, "context", required=False))
    return [{"role": "user", "content": user}, {"role": "assistant", "content": _text(row, "response")}]


def _sharegpt(row: dict[str, Any]) -> Messages:
    conv = row.get("conversations")
    if not isinstance(conv, list):
        raise RowError("wrong_type", f"'conversations' is {type(conv).__name__}, expected a list")
    msgs: Messages = []
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict):
            raise RowError("wrong_type", f"turn {i} is {type(turn).__name__}, expected an object")
        who = turn.get("from", turn.get("role"))
        role = _SHAREGPT_ROLES.get(str(who).lower()) if who is not None else None
        if role is None:
            raise RowError("unknown_role", f"turn {i} is from {who!r}")
        msgs.append({"role": role, "content": turn.get("value", turn.get("content"))})
    return _with_system(row, msgs)


def _with_system(row: dict[str, Any], msgs: Messages) -> Messages:
    """A row's `system` field (ShareGPT, and LLaMA-Factory's `messages` + `system`) as the first turn; when the
    conversation opens with its own system turn, the field stays with the user's columns (`_system_field_kept`)."""
    if row.get("system") and not (msgs and msgs[0]["role"] == "system"):
        msgs.insert(0, {"role": "system", "content": _text(row, "system")})
    return msgs


def _system_field_kept(row: dict[str, Any], f: Format) -> bool:
    """Whether a ShareGPT/OpenAI row's `system` field did not become a turn (its conversation has a system turn),
    so it must be kept in `meta` instead of vanishing."""
    if "system" not in f.uses or f.name not in _TURN_KEYS or not row.get("system"):
        return False
    turns = row.get(_TURN_KEYS[f.name][0])
    first = turns[0] if isinstance(turns, list) and turns and isinstance(turns[0], dict) else {}
    who = first.get("from", first.get("role"))
    return who is not None and _SHAREGPT_ROLES.get(str(who).lower()) == "system"


def _openai(row: dict[str, Any]) -> Messages:
    msgs = row.get("messages")
    if not isinstance(msgs, list):
        raise RowError("wrong_type", f"'messages' is {type(msgs).__name__}, expected a list")
    out: Messages = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise RowError("wrong_type", f"message {i} is {type(m).__name__}, expected an object")
        out.append({"role": m.get("role"), "content": _content_parts(m.get("content"), i)})
    return _with_system(row, out)


def _content_parts(content: Any, i: int) -> Any:
    """OpenAI content given as parts: text parts joined by newlines; any other part cannot be kept as text."""
    if not isinstance(content, list):
        return content
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind != "text" or not isinstance(part.get("text"), str):
            raise RowError("wrong_type", f"message {i} has a {kind!r} content part; only text parts are supported")
        texts.append(part["text"])
    return "\n".join(texts)


def _pair(prompt_key: str, answer_key: str) -> Callable[[dict[str, Any]], Messages]:
    def adapt(row: dict[str, Any]) -> Messages:
        return [
            {"role": "user", "content": _text(row, prompt_key)},
            {"role": "assistant", "content": _text(row, answer_key)},
        ]

    return adapt


def _self_instruct(row: dict[str, Any]) -> Messages:
    # Self-Instruct seed tasks: one instruction with a list of {input, output} instances; the first is used
    # (a task with more than one instance keeps them all in the record's meta: see extra_fields)
    inst = row.get("instances")
    if not isinstance(inst, list) or not inst or not isinstance(inst[0], dict):
        raise RowError("wrong_type", "'instances' must be a non-empty list of {input, output} objects")
    first = inst[0]
    user = _instruction_input(_text(row, "instruction"), _text(first, "input", required=False))
    return [{"role": "user", "content": user}, {"role": "assistant", "content": _text(first, "output")}]


@dataclass(frozen=True)
class Format:
    name: str
    keys: tuple[str, ...]  # keys a row must have for auto-detection
    adapt: Callable[[dict[str, Any]], Messages]
    uses: tuple[str, ...] = ()  # further keys the adapter turns into messages (not kept in meta)


#: Order matters for auto-detection: more specific signatures first.
FORMATS: tuple[Format, ...] = (
    Format("openai", ("messages",), _openai, ("system",)),
    Format("sharegpt", ("conversations",), _sharegpt, ("system",)),
    Format("self_instruct", ("instruction", "instances"), _self_instruct),
    Format("dolly", ("instruction", "context", "response"), _dolly),
    Format("alpaca", ("instruction", "output"), _alpaca, ("input", "system", "history")),
    Format("alpaca", ("instruction", "response"), _alpaca, ("input", "system", "history")),  # GPTeacher's
    Format("prompt_response", ("prompt", "response"), _pair("prompt", "response")),
    Format("prompt_completion", ("prompt", "completion"), _pair("prompt", "completion")),
    Format("question_answer", ("question", "answer"), _pair("question", "answer")),
)

FORMAT_NAMES = tuple(dict.fromkeys(f.name for f in FORMATS))


def _detect(row: dict[str, Any], fmt: str) -> Format | None:
    for f in FORMATS:
        if (fmt == "auto" or f.name == fmt) and all(k in row for k in f.keys):
            return f
    return None


def extra_fields(row: Any, fmt: str = "auto") -> dict[str, Any] | None:
    """The row's own fields that are not part of the conversation (ids, metadata); None when there are none.

    For a row no format fits (a reject), every field except the known conversation fields is kept, so a
    rejected row can still be joined back to the user's ids.
    """
    if not isinstance(row, dict):
        return None
    f = _detect(row, fmt)
    if f is None:
        used = {k for g in FORMATS for k in (*g.keys, *g.uses)}
    else:
        used = {*f.keys, *f.uses}
        if f.name == "self_instruct" and isinstance(row.get("instances"), list) and len(row["instances"]) > 1:
            used.discard("instances")  # only the first instance becomes the conversation: keep them all
        if _system_field_kept(row, f):
            used.discard("system")
    extra = {str(k): v for k, v in row.items() if k not in used}
    turns = _turn_fields(row, f)
    if turns is not None:
        extra.setdefault("turn_fields", turns)
    return extra or None


_TURN_KEYS = {"openai": ("messages", {"role", "content"}),
              "sharegpt": ("conversations", {"from", "value", "role", "content"})}


def _turn_fields(row: dict[str, Any], f: Format | None) -> list[dict[str, Any] | None] | None:
    """Per input turn, the keys a message has besides role and content (e.g. `weight`, `name`); None if none."""
    if f is None or f.name not in _TURN_KEYS:
        return None
    key, known = _TURN_KEYS[f.name]
    turns = row.get(key)
    if not isinstance(turns, list):
        return None
    out = [({k: v for k, v in t.items() if k not in known} or None) if isinstance(t, dict) else None for t in turns]
    return out if any(out) else None


def to_messages(row: Any, fmt: str = "auto") -> tuple[str, Messages]:
    """Turn one raw row into (format name, messages); raises RowError with a reason code."""
    if not isinstance(row, dict):
        raise RowError("wrong_type", f"row is a JSON {type(row).__name__}, expected an object")
    f = _detect(row, fmt)
    if f is not None:
        return f.name, f.adapt(row)
    if fmt != "auto":
        wanted = " or ".join(str(list(f.keys)) for f in FORMATS if f.name == fmt)
        raise RowError("missing_field", f"row lacks the {fmt} fields {wanted}; has {sorted(row)[:8]}")
    prompt_keys = [k for k in ("instruction", "prompt", "question", "text", "turns", "Instruction") if k in row]
    if prompt_keys:
        raise RowError("missing_response", f"row has a prompt ({prompt_keys[0]!r}) but no response field")
    raise RowError("unknown_format", f"no known format has keys {sorted(row)[:8]}")
