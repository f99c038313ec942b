"""Cheap rule-based flags for defects that public instruction pools really contain.

Why: Alpaca-52k alone has empty outputs, "<nooutput>" placeholders, refusals ("Sorry, this task involves
visual output"), merged follow-on instructions ("18. Instruction: ..."), hallucinated answers to URL-only
inputs, and "<noinput>"-style markers (AlpacaDataCleaned lists them). They cost nothing to find with rules,
and a model-based scorer can miss them. Every flag is a boolean column `heur_<flag>`; `heur_flags` counts
the flags a row raised. A flag on any turn flags the conversation (response flags look at every assistant
turn, input flags at every user turn, the length ratio at every user->assistant pair).

Flags (all regexes are module constants, so they can be read and tested):
- empty_response: an assistant turn that is blank or one punctuation mark repeated ("", "...").
- placeholder_response: an assistant turn that is (or starts with) a placeholder: "<nooutput>", "N/A".
- placeholder_input: a user turn, or its last paragraph (Alpaca's `input`), that is a "no input" marker.
- refusal: refusal boilerplate in an answer's first two sentences ("As an AI language model", "I cannot
  ...", "this task cannot be completed by a GPT model"); apologies as the requested content ("I'm sorry
  for being late") do not match, nor does a refusal the prompt itself contains (a rewrite task).
- merged_instruction: an answer containing a follow-on prompt ("6. Instruction:", "### Input", "N. Output:").
- url_only_input: a user turn whose input paragraph is only a URL, unless the instruction is about the URL
  itself (url/link/domain): the model cannot have read the page, so the answer is invented.
- repeated_ngrams: >= `repeat_threshold` of an answer's word 4-grams belong to 4-grams seen more than once.
- length_ratio: answer/prompt word ratio outside [`ratio_low`, `ratio_high`] (low precision; for review).
- truncated: an answer that stops mid-sentence (ends on a word that cannot end a sentence, or on a bare
  word after prose that otherwise ends its sentences).
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from typing import Any, ClassVar

import polars as pl
from pydantic import Field, model_validator

from curate.scoring.contract import ScoreContext, Scorer, ScorerParams

FLAGS = (
    "empty_response",
    "placeholder_response",
    "placeholder_input",
    "refusal",
    "merged_instruction",
    "url_only_input",
    "repeated_ngrams",
    "length_ratio",
    "truncated",
)

_WORD = re.compile(r"\w+", re.UNICODE)

PLACEHOLDER_RESPONSE = re.compile(
    r"""^[\s"'`(\[]*(?:<\s*no[\s_-]*(?:output|response|answer|input)\s*>|\(?\s*no\s+output\s*\)?[.]?\s*$"""
    r"""|n/?a\.?\s*$|<\s*(?:none|empty|blank)\s*>)""",
    re.IGNORECASE,
)

PLACEHOLDER_INPUT = re.compile(
    r"""^[\s"'`(\[<]*(?:no[\s_-]*input(?:\s+(?:required|needed|provided|given|necessary))?"""
    r"""|n/?a|none|null|nil|empty|blank|no\s+context)[\s"'`)\]>.]*$""",
    re.IGNORECASE,
)

REFUSAL = re.compile(
    r"""(?:\bas\s+an?\s+(?:ai|artificial\s+intelligence|(?:ai\s+)?language\s+model|text-based|gpt)\b(?!-)"""
    r"""|\bi\s*(?:'m|\s+am)\s+(?:just\s+|only\s+)?an?\s+(?:ai|language\s+model|computer\s+program)\b"""
    r"""|\b(?:i|we)\s+(?-i:cannot|can\s*not|can't|can’t|am\s+unable\s+to|'m\s+unable\s+to|are\s+unable\s+to"""
    r"""|am\s+not\s+able\s+to|'m\s+not\s+able\s+to|won't\s+be\s+able\s+to)\s+(?:complete|fulfil+|perform"""
    r"""|generate|create|produce|provide|draw|design|play|access|browse|open|view|see|watch|listen|hear"""
    r"""|physically|comply|help\s+with\s+that|assist\s+with\s+that|do\s+(?:that|this)|carry\s+out)\b"""
    r"""|\b(?:this|the)\s+(?:task|instruction|request|question)\s+(?:cannot|can\s*not|can't|is\s+not\s+possible"""
    r"""|is\s+impossible|requires\s+(?:visual|physical|audio)|involves\s+(?:visual|creating\s+visual|physical))"""
    r"""|\bcannot\s+be\s+(?:completed|fulfil+ed|done|performed|generated)\s+by\s+(?:an?\s+|the\s+)?"""
    r"""(?:gpt|ai|language|model|computer)"""
    r"""|\bsorry,?\s+(?:but\s+)?(?:i|this|the\s+task|we)\s+(?:cannot|can't|am\s+unable|involves|requires"""
    r"""|is\s+not\s+possible))""",
    re.IGNORECASE,
)

MERGED_INSTRUCTION = re.compile(
    r"""^[ \t]*(?:#{1,4}[ \t]*)?(?:\d+[ \t]*[.)][ \t]*)?instruction[ \t]*:"""
    r"""|^[ \t]*#{2,4}[ \t]*(?:instruction|input|response|output)\b"""
    r"""|^[ \t]*\d+[ \t]*[.)][ \t]*(?:input|output)[ \t]*:""",
    re.IGNORECASE | re.MULTILINE,
)

URL_ONLY = re.compile(r"""^[\s<"'(]*(?:https?://|www\.)\S+?[\s>"')]*$""", re.IGNORECASE)
ABOUT_URL = re.compile(r"\b(?:url|urls|link|links|hyperlink|domain|web\s+address|http)\b", re.IGNORECASE)

# words that cannot end an English sentence: an answer ending on one was cut off
_DANGLING = frozenset(
    "the a an of and or but nor which whose is are was were will would should could shall than their its "
    "our your my these those such because whereas although though".split()
)
_TERMINAL = re.compile(r"""[.!?…]["'”’)\]*_]*$""")
_LIST_ITEM = re.compile(r"^(?:[-*•+>#|–—]|\(?\d+[.):]|\(?[A-Za-z][.)]\s|[IVXivx]+\.\s)")
_CODE_LINE = re.compile(r"[{};=<>]|//|^\s*(?:def|for|if|return|import|class)\b")
_INNER_END = re.compile(r"\w\w[.!?]\s+[A-Z\"“]")
_BARE_WORD = re.compile(r"[a-z][a-z'’-]*,?")


def is_empty(text: str) -> bool:
    """Nothing, or one punctuation mark repeated ("...", "-"); emoji, ":-)" and Morse code are content."""
    chars = {ch for ch in text if not ch.isspace()}
    return len(chars) <= 1 and all(unicodedata.category(ch)[0] in "PZC" for ch in chars)


def is_placeholder_response(text: str) -> bool:
    return PLACEHOLDER_RESPONSE.match(text) is not None


def input_paragraph(user: str) -> str:
    """The input part of a user turn: its last paragraph when it has several (Alpaca puts `input` there)."""
    parts = [p for p in re.split(r"\n\s*\n", user.strip()) if p.strip()]
    return parts[-1].strip() if parts else ""


def is_placeholder_input(user: str) -> bool:
    return any(PLACEHOLDER_INPUT.match(t) for t in {user.strip(), input_paragraph(user)} if t)


_SENTENCE_END = re.compile(r"[.!?](?:\s|$)|\n")


def opening(text: str, sentences: int = 2, head_chars: int = 300) -> str:
    """The first `sentences` sentences (at most `head_chars` characters): where refusals live."""
    head = text.strip()[:head_chars]
    end = 0
    for _ in range(sentences):
        m = _SENTENCE_END.search(head, end)
        if m is None:
            return head
        end = m.end()
    return head[:end]


def is_refusal(text: str, head_chars: int = 300) -> bool:
    """Refusal boilerplate in the opening sentences (a refusal quoted deep inside content does not count)."""
    return REFUSAL.search(opening(text, 2, head_chars)) is not None


def has_merged_instruction(text: str) -> bool:
    return MERGED_INSTRUCTION.search(text) is not None


def is_url_only_input(user: str) -> bool:
    para = input_paragraph(user)
    if not URL_ONLY.match(para):
        return False
    rest = user.strip()[: -len(para)] if para and user.strip() != para else ""
    return not ABOUT_URL.search(rest)


def repeat_fraction(text: str, n: int = 4, min_ngrams: int = 20) -> float:
    """Share of word n-grams that belong to an n-gram occurring more than once (0 for short texts)."""
    words = [w.lower() for w in _WORD.findall(text)]
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if len(grams) < min_ngrams:
        return 0.0
    counts = Counter(grams)
    return sum(c for c in counts.values() if c > 1) / len(grams)


def length_ratio(prompt: str, response: str) -> float:
    """(answer words + 1) / (prompt words + 1)."""
    return (len(_WORD.findall(response)) + 1) / (len(_WORD.findall(prompt)) + 1)


def is_truncated(text: str) -> bool:
    """Stops mid-sentence: see the module docstring. Lists, code, hashtags and verse are not flagged."""
    lines = [ln.strip() for ln in text.strip().split("\n") if ln.strip()]
    if not lines:
        return False
    last = lines[-1]
    toks = last.split()
    if len(toks) < 4 or _CODE_LINE.search(last):
        return False
    word = toks[-1]
    if not _BARE_WORD.fullmatch(word) or sum(t.endswith(",") for t in toks) * 2 >= len(toks):
        return False  # not a bare word, or a comma-separated list of words
    if word in _DANGLING:
        return True
    if _LIST_ITEM.match(last):
        return False
    if _INNER_END.search(last):
        return True
    prev = [ln for ln in lines[:-1] if len(ln.split()) >= 4 and not _LIST_ITEM.match(ln)]
    return bool(prev) and sum(bool(_TERMINAL.search(ln)) for ln in prev) / len(prev) >= 0.5


class HeuristicParams(ScorerParams):
    repeat_n: int = Field(4, ge=2, le=10)
    repeat_threshold: float = Field(0.7, gt=0.0, le=1.0)
    repeat_min_ngrams: int = Field(20, ge=1)
    ratio_low: float = Field(0.03, gt=0.0)
    ratio_high: float = Field(40.0, gt=0.0)
    refusal_head_chars: int = Field(300, ge=20)

    @model_validator(mode="after")
    def _ratio_band(self) -> HeuristicParams:
        """A swapped band (low above high) would flag every row: refuse it instead of emptying the subset."""
        if self.ratio_low >= self.ratio_high:
            raise ValueError(f"ratio_low ({self.ratio_low}) must be below ratio_high ({self.ratio_high})")
        return self


def flag_conversation(messages: list[dict[str, Any]], p: HeuristicParams) -> dict[str, bool]:
    """Every flag for one conversation (a flag on any turn flags it)."""
    f = dict.fromkeys(FLAGS, False)
    prompt = ""
    for m in messages:
        role, text = m["role"], m["content"] or ""
        if role == "user":
            prompt = text
            f["placeholder_input"] |= is_placeholder_input(text)
            f["url_only_input"] |= is_url_only_input(text)
        elif role == "assistant":
            f["empty_response"] |= is_empty(text)
            f["placeholder_response"] |= is_placeholder_response(text)
            # a refusal that the prompt itself contains is probably requested content (rewrite this reply)
            f["refusal"] |= is_refusal(text, p.refusal_head_chars) and not REFUSAL.search(prompt)
            f["merged_instruction"] |= has_merged_instruction(text)
            f["repeated_ngrams"] |= repeat_fraction(text, p.repeat_n, p.repeat_min_ngrams) >= p.repeat_threshold
            r = length_ratio(prompt, text)
            f["length_ratio"] |= not (p.ratio_low <= r <= p.ratio_high)
            f["truncated"] |= is_truncated(text)
    return f


class Heuristics(Scorer):
    """Named rule flags per row; no model."""

    name = "heuristics"
    prefix = "heur"  # columns are heur_*
    version = "1"
    reads = ("messages",)
    writes = tuple(f"heur_{f}" for f in FLAGS) + ("heur_flags",)
    multi_turn: ClassVar[str] = (
        "every turn is checked: response flags on each assistant turn, input flags on each user turn, the "
        "length ratio on each user->assistant pair; any flagged turn flags the row"
    )
    higher_is_better: ClassVar[dict[str, bool]] = {c: False for c in writes}
    Params = HeuristicParams

    def score(self, batch: pl.DataFrame, ctx: ScoreContext) -> pl.DataFrame:
        rows = [flag_conversation(msgs or [], self.params) for msgs in batch["messages"].to_list()]
        cols: dict[str, pl.Series] = {
            f"heur_{f}": pl.Series(f"heur_{f}", [r[f] for r in rows], dtype=pl.Boolean) for f in FLAGS
        }
        cols["heur_flags"] = pl.Series("heur_flags", [sum(r.values()) for r in rows], dtype=pl.Int32)
        return pl.DataFrame(cols)


def flag_counts(df: pl.DataFrame) -> pl.DataFrame:
    """Count each `heur_*` flag over a scored pool: columns flag, count, fraction (sorted by count)."""
    cols = [c for c in df.columns if c.startswith("heur_") and c != "heur_flags" and df[c].dtype == pl.Boolean]
    if not cols:
        raise ValueError("no heur_<flag> columns in the frame; score it with the 'heuristics' scorer first")
    n = max(df.height, 1)
    out = pl.DataFrame(
        {
            "flag": [c.removeprefix("heur_") for c in cols] + ["any"],
            "count": [int(df[c].sum()) for c in cols] + [int(df.select(pl.any_horizontal(cols)).to_series().sum())],
        }
    )
    return out.with_columns(fraction=pl.col("count") / n).sort("count", descending=True)
