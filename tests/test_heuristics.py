"""Heuristic flags on real Alpaca-52k rows (ids = the `id` field of alpaca_data.jsonl) and synthetic rows.

Each flag is checked on rows that have the defect and on look-alike rows that do not (apologies that are
the requested content, titles containing "Cannot", numeric one-word answers, lists ending without a full
stop), so a regex that is too loose or too strict fails here.
"""

from __future__ import annotations

from pathlib import Path

import orjson
import polars as pl
import pytest

from curate.io.formats import to_messages
from scorers import get_scorer
from scorers.heuristics import (
    FLAGS,
    flag_counts,
    is_empty,
    is_placeholder_input,
    is_refusal,
    is_truncated,
    repeat_fraction,
)

ALPACA = Path("/work/shared/data/alpaca-52k/alpaca_data.jsonl")

# row id -> the flags it must raise (and no others among those listed in CHECKED for that id)
POSITIVE = {
    45538: {"empty_response"},  # output ""
    43829: {"empty_response"},  # output "........................."
    5555: {"placeholder_response"},  # "<nooutput>"
    2827: {"placeholder_response", "placeholder_input"},  # input "N/A", output "N/A"
    42850: {"placeholder_input"},  # input "No Input"
    50839: {"placeholder_input"},  # input "<no input>"
    44509: {"refusal"},  # "This task cannot be performed by a GPT model ..."
    10486: {"refusal"},  # "Sorry, I can't play the song Despacito on the keyboard."
    14662: {"refusal"},  # "This instruction cannot be completed by a GPT language model."
    1982: {"merged_instruction"},  # "...\n11. Instruction: Give me the definition of 'supercomputer'."
    4537: {"merged_instruction"},  # "...\n##\n18. Instruction: Identify the noun ..."
    14157: {"merged_instruction"},  # "...\n14. Instruction: Provide a statement ..."
    165: {"url_only_input"},  # "Summarize the following article" + a nytimes URL
    1604: {"url_only_input"},  # "Appraise the following website design." + https://example.com
    37278: {"truncated"},  # "... predict that sales in 2015 will be"
    9371: {"truncated"},  # "The numerical value of the equation is"
}
# look-alikes that must raise none of the flags
NEGATIVE = {
    0: "three tips, clean",
    81: "one-digit answer '1'",
    79: "'I'm sorry that you're not happy...' is the requested customer reply",
    7651: "an apology that was asked for",
    49541: "a book title 'All the Light We Cannot See'",
    50994: "rewriting a refusal the prompt itself contains",
    19673: "a numbered list whose last item has no full stop",
    4591: "code followed by 'Output: [...]' (an example run, not a merged row)",
}


@pytest.fixture(scope="module")
def alpaca_rows() -> dict[int, list[dict]]:
    wanted = set(POSITIVE) | set(NEGATIVE)
    rows: dict[int, list[dict]] = {}
    with open(ALPACA, "rb") as fh:
        for line in fh:
            r = orjson.loads(line)
            if r["id"] in wanted:
                rows[r["id"]] = to_messages(r)[1]
    assert set(rows) == wanted
    return rows


def _score(conversations: list[list[dict]], **params) -> pl.DataFrame:
    scorer = get_scorer("heuristics", **params)
    out = scorer.score(pl.DataFrame({"messages": conversations}), None)
    assert out.columns == list(scorer.writes) and out.height == len(conversations)
    return out


def test_real_alpaca_defects_flagged(alpaca_rows):
    ids = list(POSITIVE)
    out = _score([alpaca_rows[i] for i in ids])
    for i, row in zip(ids, out.iter_rows(named=True), strict=True):
        raised = {f for f in FLAGS if row[f"heur_{f}"]}
        assert POSITIVE[i] <= raised, (i, raised)
        assert row["heur_flags"] == len(raised)


def test_real_alpaca_lookalikes_not_flagged(alpaca_rows):
    ids = list(NEGATIVE)
    out = _score([alpaca_rows[i] for i in ids])
    for i, row in zip(ids, out.iter_rows(named=True), strict=True):
        raised = [f for f in FLAGS if row[f"heur_{f}"]]
        assert raised == [], (i, NEGATIVE[i], raised)


def _conv(user: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def test_synthetic_flags():
    base = (
        "Photosynthesis is the process by which green plants use sunlight, water and carbon dioxide to make "
        "glucose and oxygen. It takes place in the chloroplasts of leaf cells."
    )
    cases = {
        "empty_response": _conv("Explain photosynthesis.", "   "),
        "placeholder_response": _conv("Draw a cat.", "<No Output>"),
        "placeholder_input": _conv("Name a fruit.\n\n<noinput>", "Apple."),
        "refusal": _conv("Write a poem about rain.", "As an AI language model, I cannot write poems."),
        "merged_instruction": _conv("Explain photosynthesis.", base + "\n### Instruction:\nName a planet."),
        "url_only_input": _conv("Summarize this article.\n\nhttps://example.org/news/123", "It says things."),
        "repeated_ngrams": _conv("Explain photosynthesis.", base + " " + base + " " + base),
        "length_ratio": _conv("Hi", " ".join(f"word{i}" for i in range(200)) + "."),
        "truncated": _conv("Explain photosynthesis.", base + " The light reactions happen in the"),
    }
    out = _score(list(cases.values()))
    for flag, row in zip(cases, out.iter_rows(named=True), strict=True):
        raised = {f for f in FLAGS if row[f"heur_{f}"]}
        assert raised == {flag}, (flag, raised)


def test_multi_turn_any_turn_flags():
    conv = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "<nooutput>"},  # defect in the FIRST turn
        {"role": "user", "content": "Another one?"},
        {"role": "assistant", "content": "Blue."},
    ]
    row = _score([conv]).row(0, named=True)
    assert row["heur_placeholder_response"] and row["heur_flags"] == 1


def test_helpers_edge_cases():
    assert is_empty("") and is_empty(" ... ") and not is_empty("18") and not is_empty(":-)")
    assert not is_empty("😀")
    assert is_placeholder_input("Describe a cat.\n\nNo input required.")
    assert not is_placeholder_input("Describe a cat.\n\nNo inputs were harmed in this sentence, honestly.")
    assert not is_refusal("I'm sorry for being late; it won't happen again.")
    assert is_refusal("I'm sorry, but I cannot access the internet to read that page.")
    assert not is_truncated("1. Water\n2. Flashlights\n3. Batteries")
    assert not is_truncated("edit, here, the, this, a")
    assert repeat_fraction("a b c d") == 0.0  # too short to judge
    assert repeat_fraction(" ".join(["one two three four five"] * 10)) > 0.9


def test_params_change_thresholds():
    text = " ".join(["alpha beta gamma delta"] * 4) + " " + " ".join(f"w{i}" for i in range(40))
    conv = [_conv("Say something.", text)]
    frac = repeat_fraction(text)
    assert 0.2 < frac < 0.7
    assert not _score(conv)["heur_repeated_ngrams"][0]
    assert _score(conv, repeat_threshold=0.2)["heur_repeated_ngrams"][0]
    with pytest.raises(ValueError, match="repeat_threshold"):
        get_scorer("heuristics", repeat_threshold=2.0)


def test_flag_counts():
    convs = [_conv("Draw.", "<nooutput>"), _conv("Hi.", ""), _conv("Name a fruit.", "Apple.")]
    scored = _score(convs)
    counts = flag_counts(scored)
    got = dict(zip(counts["flag"], counts["count"], strict=True))
    assert got["placeholder_response"] == 1 and got["empty_response"] == 1 and got["any"] == 2
    assert set(got) == set(FLAGS) | {"any"}
    with pytest.raises(ValueError, match="heur"):
        flag_counts(pl.DataFrame({"x": [1]}))
