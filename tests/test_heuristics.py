"""Heuristic flags on real rows (the bundled sample; Alpaca-52k ids when the shared data is present) and on
rows written here.

Each flag is checked on rows that have the defect and on look-alike rows that do not (apologies that are
the requested content, titles containing "Cannot", numeric one-word answers, lists ending without a full
stop), so a regex that is too loose or too strict fails here. The Alpaca rows (CC BY-NC, not in the
repository) are checked by id from the shared data; the same defects, reworded, are checked without it.
"""

from __future__ import annotations

import json

import orjson
import polars as pl
import pytest
from conftest import SAMPLE

from curate.io.formats import to_messages
from curate.scoring import get_scorer
from scorers.heuristics import (
    FLAGS,
    flag_counts,
    is_empty,
    is_placeholder_input,
    is_refusal,
    is_truncated,
    repeat_fraction,
)

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


@pytest.fixture
def alpaca_rows(shared_data) -> dict[int, list[dict]]:
    wanted = set(POSITIVE) | set(NEGATIVE)
    rows: dict[int, list[dict]] = {}
    with open(shared_data / "alpaca-52k" / "alpaca_data.jsonl", "rb") as fh:
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


def _row(instruction: str, inp: str, output: str) -> list[dict]:
    return to_messages({"instruction": instruction, "input": inp, "output": output})[1]


# The Alpaca defects and look-alikes above, reworded here (same shape, our own text): flags they must raise
REWORDED_POSITIVE = [
    ({"empty_response"}, _row("In which year did the first Moon landing happen?", "", "")),
    ({"empty_response"}, _row("Hide the name in the input behind three black boxes.", "Ana lives here.", "......")),
    ({"placeholder_response"}, _row("Draw a logo for a bakery", "", "<nooutput>")),
    ({"placeholder_response", "placeholder_input"}, _row("Plan a code review checklist.", "N/A", "N/A")),
    ({"placeholder_input"}, _row("Name a scientist who shaped modern chemistry.", "No Input",
                                 "Antoine Lavoisier, who named oxygen and hydrogen and stated the law of the "
                                 "conservation of mass.")),
    ({"placeholder_input"}, _row("Suggest two ways to save on groceries.", "<no input>",
                                 "1. Plan meals for the week before shopping\n2. Buy store brands")),
    ({"refusal"}, _row("Draw a map of the London Underground.", "",
                       "This task cannot be performed by a GPT model as it requires drawing a map.")),
    ({"refusal"}, _row("Sing Happy Birthday for my sister.", "", "Sorry, I can't sing Happy Birthday for you.")),
    ({"refusal"}, _row("Set an alarm for 7am tomorrow.", "",
                       "This instruction cannot be completed by a GPT language model.")),
    ({"merged_instruction"}, _row("Name the largest ocean.", "",
                                  "The Pacific Ocean is the largest.\n7. Instruction: Define the word 'harbour'.")),
    ({"merged_instruction"}, _row("Is it wise to rent a flat?", "",
                                  "It depends on how long you plan to stay.\n##\n9. Instruction: Find the verb "
                                  "in the sentence:\n9. Input:\nThe dog ran home.\n9. Output:\nran")),
    ({"merged_instruction"}, _row("Describe a good friend in one sentence.", "",
                                  "A good friend listens.\n4. Instruction: Explain how to stay focused.\n"
                                  "4. Input: \n<noinput>\n4. Output:\nRemove distractions and take breaks.")),
    ({"url_only_input"}, _row("Summarize the following article", "https://www.example.org/2019/03/news.html",
                              "The article describes how cheap phones changed banking in rural areas.")),
    ({"url_only_input"}, _row("Critique the following website design.", "https://example.com",
                              "The layout is clean and the navigation bar is easy to find.")),
    ({"truncated"}, _row("Forecast the next value.", "Year: 2020, 2021, 2022\nVisitors: 5, 7, 9",
                         "Visitors grow by two a year. Extending the line, we expect that visitors in 2023 will be")),
    ({"truncated"}, _row("Work out 3(4+1).", "", "The value of the expression is")),
]
# reworded look-alikes that must raise none of the flags
REWORDED_NEGATIVE = [
    ("three tips, clean", _row("List three habits for good sleep.", "",
                               "1. Go to bed at the same time every night.\n2. Keep the bedroom dark and cool.\n"
                               "3. Avoid screens for an hour before sleep.")),
    ("one-digit answer", _row("Label the message as spam (1) or not spam (0).", "Lunch at noon?", "0")),
    ("the requested customer reply", _row(
        "A customer is upset that their order arrived broken. Write a reply that calms the situation.", "",
        "I'm sorry that your order arrived damaged. We will send a replacement today at no cost, and I have "
        "added a 10% discount to your account. Is there anything else I can do to help?")),
    ("an apology that was asked for", _row("How would you apologise to a colleague?", "",
                                           "I'm sorry I missed our meeting. It won't happen again.")),
    ("a book title with 'Cannot'", _row("Name three novels about the Second World War.", "",
                                        "1. All the Light We Cannot See by Anthony Doerr\n2. Catch-22 by "
                                        "Joseph Heller\n3. Slaughterhouse-Five by Kurt Vonnegut")),
    ("rewriting a refusal the prompt contains", _row(
        "Make the reply more polite.", "- Clerk: I'm sorry, we can't do that.\n- Guest: Fine.",
        "- Clerk: I'm sorry, but we are unable to do that today.\n- Guest: Alright, thank you.")),
    ("a numbered list whose last item has no full stop", _row(
        "List 4 things to pack for a hike", "", "1. Water\n2. A map\n3. Sunscreen\n4. A rain jacket")),
    ("code followed by 'Output: [...]'", _row(
        "Write a program that reverses a list", "[1, 2, 3]",
        "def reverse(xs):\n    return xs[::-1]\n\nprint(reverse([1, 2, 3]))\n\nOutput: [3, 2, 1]")),
]


def test_reworded_defects_flagged():
    out = _score([conv for _, conv in REWORDED_POSITIVE])
    for (want, conv), row in zip(REWORDED_POSITIVE, out.iter_rows(named=True), strict=True):
        raised = {f for f in FLAGS if row[f"heur_{f}"]}
        assert want <= raised, (conv, raised)
        assert row["heur_flags"] == len(raised)


def test_reworded_lookalikes_not_flagged():
    out = _score([conv for _, conv in REWORDED_NEGATIVE])
    for (why, _), row in zip(REWORDED_NEGATIVE, out.iter_rows(named=True), strict=True):
        assert [f for f in FLAGS if row[f"heur_{f}"]] == [], why


def _sample(name: str) -> list[list[dict]]:
    with open(SAMPLE / f"{name}.jsonl", encoding="utf-8") as fh:
        return [to_messages(json.loads(line))[1] for line in fh]


def test_bundled_sample_clean_rows_not_flagged():
    """Real, clean data: 1,500 GSM8K rows (answers end in '#### 72', no full stop) raise nothing, and 1,000
    code answers (ending in '}' or ')') are never called truncated, empty, placeholder, refusal or merged."""
    gsm = _score(_sample("gsm8k_train"))
    assert gsm.height == 1500 and gsm["heur_flags"].sum() == 0
    code = _score(_sample("gpteacher_codegen"))
    for flag in ("empty_response", "placeholder_response", "placeholder_input", "refusal", "merged_instruction",
                 "truncated"):
        assert code[f"heur_{flag}"].sum() == 0, (flag, code.filter(pl.col(f"heur_{flag}")).height)


def test_bundled_sample_real_refusal_flagged():
    """Self-Instruct's seed tasks hold one real refusal (a request for a person's SSN): it is found, alone."""
    convs = _sample("self_instruct_seed")
    out = _score(convs)
    hits = [convs[i][-1]["content"] for i in out.with_row_index().filter(pl.col("heur_refusal"))["index"]]
    assert len(hits) == 1 and "we cannot complete this task" in hits[0], hits


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


def test_swapped_length_ratio_band_is_refused():
    """ratio_low above ratio_high would flag every row (and the default threshold would then drop the pool)."""
    conv = [_conv("Name a colour.", "Red is a colour.")]
    assert not _score(conv, ratio_low=0.5, ratio_high=5.0)["heur_length_ratio"][0]
    with pytest.raises(ValueError, match=r"^invalid parameters for scorer 'heuristics': ratio_low \(50.0\) must"):
        get_scorer("heuristics", ratio_low=50.0, ratio_high=1.0)


def test_flag_counts():
    convs = [_conv("Draw.", "<nooutput>"), _conv("Hi.", ""), _conv("Name a fruit.", "Apple.")]
    scored = _score(convs)
    counts = flag_counts(scored)
    got = dict(zip(counts["flag"], counts["count"], strict=True))
    assert got["placeholder_response"] == 1 and got["empty_response"] == 1 and got["any"] == 2
    assert set(got) == set(FLAGS) | {"any"}
    with pytest.raises(ValueError, match="heur"):
        flag_counts(pl.DataFrame({"x": [1]}))
