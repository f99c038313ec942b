"""Ingest that loses nothing: multi-turn fields become turns, the user's own columns pass through, paths stay
as the user gave them, and curate's own exports read back to the same records."""

import json
import os

import polars as pl
import pytest
from conftest import CORPUS

from curate.config import load_recipe
from curate.ingest import dedup, ingest
from curate.io.writers import export
from curate.pipeline import run_direct
from curate.run import Run


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _ingest(tmp_path, *inputs, fmt="auto"):
    run = Run(tmp_path / "run")
    ingest(run, [str(p) for p in inputs], fmt=fmt)
    dedup(run)
    return run


def _records(run, name="records.parquet"):
    return pl.read_parquet(run.file(name)).sort("source", "row")


def _rejects(run):
    return {r["row"]: (r["reason"], r["detail"]) for r in pl.read_parquet(run.file("rejects.parquet")).to_dicts()}


# ---------------------------------------------------------------- multi-turn fields


def test_alpaca_history_becomes_earlier_turns(tmp_path):
    f = _write(tmp_path / "a.jsonl", [
        {"instruction": "And in Python?", "input": "", "output": "print(1)", "system": "Be brief.",
         "history": [["How do I print in C?", "printf(\"1\");"], ["And in Go?", "fmt.Println(1)"]]},
        {"instruction": "Single", "input": "ctx", "output": "ok", "history": []},
        {"instruction": "Null history", "input": "", "output": "ok", "history": None},
    ])
    recs = _records(_ingest(tmp_path, f))
    multi = recs.row(0, named=True)
    assert [m["role"] for m in multi["messages"]] == ["system", "user", "assistant", "user", "assistant",
                                                    "user", "assistant"]
    assert [m["content"] for m in multi["messages"][1:]] == [
        "How do I print in C?", 'printf("1");', "And in Go?", "fmt.Println(1)", "And in Python?", "print(1)"]
    assert multi["n_turns"] == 3 and multi["system"] == "Be brief." and multi["instruction"] == "And in Python?"
    assert recs["n_turns"].to_list() == [3, 1, 1]
    assert recs.row(1, named=True)["messages"][0]["content"] == "Single\n\nctx"


def test_multi_turn_corpus_rows_become_turns_or_rejects_with_reasons(tmp_path):
    run = _ingest(tmp_path, CORPUS / "multi_turn_fields.jsonl")
    rej = _rejects(run)
    assert {k: v[0] for k, v in rej.items()} == {2: "wrong_type", 3: "wrong_type", 4: "wrong_type",
                                                  5: "empty_instruction", 7: "wrong_type"}
    assert "history" in rej[2][1] and "history" in rej[3][1] and "image_url" in rej[7][1]
    recs = _records(run)
    assert recs["n_turns"].to_list() == [2, 1] and recs["meta"].struct.field("id").to_list() == ["h-ok", "parts"]
    # a rejected row keeps its own id too, so decisions can name it
    assert pl.read_parquet(run.file("rejects.parquet"))["meta"].struct.field("id").to_list() == [
        "h-short", "h-text", "h-num", "h-empty-user", "image"]


def test_alpaca_history_in_csv_cells(tmp_path):
    import csv

    f = tmp_path / "a.csv"
    with open(f, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["instruction", "input", "output", "history"])
        w.writerow(["q2", "", "a2", json.dumps([["q1", "a1"]])])
        w.writerow(["q", "", "a", ""])
        w.writerow(["q", "", "a", "[not json"])
    run = _ingest(tmp_path, f)
    assert _records(run)["n_turns"].to_list() == [2, 1]
    assert _rejects(run)[4][0] == "wrong_type"


def test_sharegpt_system_field_and_openai_content_parts(tmp_path):
    f = _write(tmp_path / "c.jsonl", [
        {"system": "You are terse.", "conversations": [
            {"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"},
            {"from": "human", "value": "bye"}, {"from": "gpt", "value": "ciao"}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "Describe"},
                                                   {"type": "text", "text": "this."}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]},
                      {"role": "assistant", "content": "A cat."}]},
    ])
    run = _ingest(tmp_path, f)
    recs = _records(run)
    assert recs["n_turns"].to_list() == [2, 1]
    assert recs.row(0, named=True)["system"] == "You are terse."
    assert recs.row(1, named=True)["messages"][0]["content"] == "Describe\nthis."
    assert _rejects(run)[3][0] == "wrong_type" and "image_url" in _rejects(run)[3][1]


def test_system_field_of_messages_rows_becomes_a_turn_and_is_never_dropped(tmp_path):
    """LLaMA-Factory's `messages` + `system` rows: the system prompt was left in meta, so no export and no trainer
    saw it; and a ShareGPT `system` field beside a system turn vanished without a trace."""
    f = _write(tmp_path / "s.jsonl", [
        {"system": "Answer in French.", "messages": [{"role": "user", "content": "Hi"},
                                                     {"role": "assistant", "content": "Salut"}]},
        {"system": "field prompt", "conversations": [{"from": "system", "value": "turn prompt"},
                                                     {"from": "human", "value": "h"}, {"from": "gpt", "value": "g"}]},
        {"system": "field prompt", "messages": [{"role": "system", "content": "turn prompt"},
                                                {"role": "user", "content": "u"},
                                                {"role": "assistant", "content": "a"}]},
    ])
    recs = _records(_ingest(tmp_path, f))
    assert recs["system"].to_list() == ["Answer in French.", "turn prompt", "turn prompt"]
    assert recs.row(0, named=True)["messages"][0] == {"role": "system", "content": "Answer in French."}
    assert recs["meta"].to_list() == [None, {"system": "field prompt"}, {"system": "field prompt"}]


def test_numeric_turn_content_is_text_as_in_alpaca(tmp_path):
    """`{"from": "gpt", "value": 42}` was rejected (wrong_type) although Alpaca's `"output": 42` is kept as "42"."""
    f = _write(tmp_path / "n.jsonl", [
        {"conversations": [{"from": "human", "value": "6 x 7?"}, {"from": "gpt", "value": 42}]},
        {"messages": [{"role": "user", "content": "Half of 5?"}, {"role": "assistant", "content": 2.5}]},
        {"instruction": "6 x 7, again?", "output": 42},
        {"conversations": [{"from": "human", "value": "True?"}, {"from": "gpt", "value": True}]},
        {"messages": [{"role": "user", "content": "list?"}, {"role": "assistant", "content": {"a": 1}}]},
    ])
    run = _ingest(tmp_path, f)
    assert [m[1]["content"] for m in _records(run)["messages"].to_list()] == ["42", "2.5", "42"]
    assert {k: v[0] for k, v in _rejects(run).items()} == {4: "wrong_type", 5: "wrong_type"}


def test_an_unanswered_question_is_missing_its_response_not_its_instruction(tmp_path):
    """A conversation of user turns only was rejected as `missing_instruction: conversation has no user turn`."""
    f = _write(tmp_path / "q.jsonl", [
        {"conversations": [{"from": "human", "value": "Anyone there?"}]},
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "u1"},
                      {"role": "user", "content": "u2"}]},
        {"messages": [{"role": "assistant", "content": "Answer to nothing."}]},
        {"instruction": "Answered?", "output": "Yes."},
    ])
    rej = _rejects(_ingest(tmp_path, f))
    assert rej == {1: ("missing_response", "conversation has no assistant turn"),
                   2: ("missing_response", "conversation has no assistant turn"),
                   3: ("missing_instruction", "conversation has no user turn")}


def test_turns_that_do_not_alternate_are_rejected_with_a_reason(tmp_path):
    """LLaMA-Factory skips ("Invalid role tag") a conversation that does not alternate user/assistant from a user
    turn, and the Alpaca export would merge its turns: such a row was selected, then never trained on as it was."""
    f = _write(tmp_path / "t.jsonl", [
        {"id": "ok", "conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "h1"},
                                       {"from": "gpt", "value": "g1"}, {"from": "human", "value": "h2"},
                                       {"from": "gpt", "value": "g2"}, {"from": "human", "value": "unanswered"}]},
        {"id": "gpt-first", "conversations": [{"from": "gpt", "value": "I speak first."},
                                              {"from": "human", "value": "ok?"}, {"from": "gpt", "value": "yes"}]},
        {"id": "two-users", "messages": [{"role": "user", "content": "u1"}, {"role": "user", "content": "u2"},
                                         {"role": "assistant", "content": "a"}]},
        {"id": "two-answers", "messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "u"},
                                           {"role": "assistant", "content": "a1"},
                                           {"role": "assistant", "content": "a2"}]},
    ])
    run = _ingest(tmp_path, f)
    assert _records(run)["meta"].struct.field("id").to_list() == ["ok"]
    assert _records(run)["n_turns"].to_list() == [2]
    rej = _rejects(run)
    assert {k: v[0] for k, v in rej.items()} == {2: "roles_not_alternating", 3: "roles_not_alternating",
                                                  4: "roles_not_alternating"}
    assert rej[2][1].startswith("message 0 (assistant) comes first")
    assert rej[3][1].startswith("message 1 (user) follows another user turn")
    assert rej[4][1].startswith("message 3 (assistant) follows another assistant turn")


def test_self_instruct_keeps_every_instance(tmp_path):
    f = _write(tmp_path / "s.jsonl", [{"id": "seed_task_0", "instruction": "Add.", "instances": [
        {"input": "1+1", "output": "2"}, {"input": "2+2", "output": "4"}]}])
    rec = _records(_ingest(tmp_path, f)).row(0, named=True)
    assert rec["messages"][0]["content"] == "Add.\n\n1+1"
    assert rec["meta"]["id"] == "seed_task_0"
    assert rec["meta"]["instances"] == [{"input": "1+1", "output": "2"}, {"input": "2+2", "output": "4"}]


def test_lima_multi_turn_rows_ingest_intact(tmp_path, shared_data):
    lima = shared_data / "lima" / "lima_train.jsonl"
    rows = [json.loads(line) for line in lima.read_text().splitlines()]
    want = {i + 1: len(r["history"]) + 1 for i, r in enumerate(rows) if r.get("history")}
    assert len(want) == 29
    run = _ingest(tmp_path, lima)
    recs = pl.read_parquet(run.file("records_all.parquet"))
    got = dict(recs.filter(pl.col("n_turns") > 1).select("row", "n_turns").iter_rows())
    assert got == want
    assert recs.height + pl.read_parquet(run.file("rejects.parquet")).height == 1029


# ---------------------------------------------------------------- the user's own columns


def test_user_columns_pass_through_under_meta(tmp_path):
    a = _write(tmp_path / "a.jsonl", [
        {"id": 17, "instruction": "q1", "output": "a1", "category": "math", "tags": ["x", "y"]},
        {"id": 18, "instruction": "q1", "output": "a1", "category": "math"},  # an exact duplicate of row 1
        {"id": 19, "instruction": "q2", "output": ""},  # rejected: empty response
    ])
    b = _write(tmp_path / "b.jsonl", [
        {"id": "b-1", "conversations": [{"from": "human", "value": "q3"}, {"from": "gpt", "value": "a3"}],
         "source": "forum", "row": 99, "extra": {"lang": "en"}},
        {"conversations": [{"from": "human", "value": "q4"}, {"from": "gpt", "value": "a4"}]},
    ])
    run = _ingest(tmp_path, a, b)
    recs = _records(run)
    meta = {(s.rsplit("/", 1)[-1], r): m for s, r, m in recs.select("source", "row", "meta").iter_rows()}
    # ids of mixed types across files are kept as text, exactly as written
    assert meta[("a.jsonl", 1)] == {"id": "17", "category": "math", "tags": ["x", "y"], "source": None,
                                    "row": None, "extra": None}
    assert meta[("b.jsonl", 1)]["id"] == "b-1"
    # a user column named like one of curate's lives under meta, never over curate's column
    assert meta[("b.jsonl", 1)]["source"] == "forum" and meta[("b.jsonl", 1)]["row"] == 99
    assert meta[("b.jsonl", 1)]["extra"] == {"lang": "en"}
    assert meta[("b.jsonl", 2)] is None
    assert recs.filter(pl.col("row") == 1)["source"].to_list() == [str(a), str(b)]
    dups = pl.read_parquet(run.file("duplicates.parquet"))
    assert dups["meta"].struct.field("id").to_list() == ["18"]
    rej = pl.read_parquet(run.file("rejects.parquet"))
    assert rej["meta"].struct.field("id").to_list() == ["19"]


def test_per_turn_fields_are_kept(tmp_path):
    f = _write(tmp_path / "t.jsonl", [
        {"conversations": [{"from": "human", "value": "q", "weight": 0},
                           {"from": "gpt", "value": "a", "weight": 1}]},
        {"messages": [{"role": "user", "content": "q2", "name": "ann"}, {"role": "assistant", "content": "a2"}]},
        {"messages": [{"role": "user", "content": "q3"}, {"role": "assistant", "content": "a3"}]},
    ])
    meta = _records(_ingest(tmp_path, f))["meta"].to_list()
    assert meta[0]["turn_fields"] == [{"weight": 0, "name": None}, {"weight": 1, "name": None}]
    assert meta[1]["turn_fields"] == [{"weight": None, "name": "ann"}, None]
    assert meta[2] is None


def test_parts_of_a_killed_ingest_are_cleaned_up(tmp_path):
    stale = tmp_path / "run" / ".records_all.parquet.parts.abc123"
    stale.mkdir(parents=True)
    (stale / "000000.parquet").write_bytes(b"half a file")
    run = _ingest(tmp_path, CORPUS / "good.csv")
    assert not stale.exists()
    assert not [p for p in run.path.iterdir() if ".parts." in p.name]


def test_no_user_columns_means_no_meta_column(tmp_path):
    run = _ingest(tmp_path, CORPUS / "good.csv")
    assert "meta" not in pl.read_parquet(run.file("records.parquet")).columns


def test_source_is_the_path_as_given(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    _write(tmp_path / "data" / "x.jsonl", [{"instruction": "q", "output": "a"}])
    monkeypatch.chdir(tmp_path)
    run = Run(tmp_path / "run")
    ingest(run, ["data/x.jsonl", "data"])
    dedup(run)
    assert _records(run, "records_all.parquet")["source"].to_list() == ["data/x.jsonl"]
    assert list(run.manifest["inputs"]) == ["data/x.jsonl"]


def test_user_id_survives_into_selected_and_decisions(tmp_path):
    rows = [{"id": f"u{i}", "instruction": f"Question number {i}?", "output": f"Answer {i}.", "split": "train"}
            for i in range(30)]
    rows.append({"id": "u-dup", "instruction": "Question number 0?", "output": "Answer 0."})
    rows.append({"id": "u-bad", "instruction": "Question?", "output": ""})
    f = _write(tmp_path / "mine.jsonl", rows)
    recipe = load_recipe(None, {"inputs": [str(f)], "out": str(tmp_path / "run"), "embed.enabled": False,
                                "score.scorers": ["heuristics"], "select.strategy": "random",
                                "select.budget": 10, "report": False, "export": ["alpaca"]})
    run = run_direct(recipe)
    sel = pl.read_parquet(run.file("selected.parquet"))
    assert sel.height == 10 and sel["meta"].struct.field("id").str.starts_with("u").all()
    dec = pl.read_parquet(run.file("decisions.parquet"))
    by_user = dict(dec.select(pl.col("meta").struct.field("id"), "status").iter_rows())
    assert len(by_user) == 32
    assert by_user["u-dup"] == "duplicate" and by_user["u-bad"] == "rejected"
    assert dec.filter(pl.col("status") == "selected")["meta"].struct.field("split").to_list() == ["train"] * 10


# ---------------------------------------------------------------- round trips through curate's own exports


@pytest.mark.parametrize("fmt", ["alpaca", "sharegpt"])
def test_export_then_ingest_gives_the_same_ids(tmp_path, fmt):
    src = _write(tmp_path / "src.jsonl", [
        {"instruction": "Q3", "output": "A3", "system": "Sys.", "history": [["Q1", "A1"], ["Q2", "A2"]]},
        {"instruction": "Plain", "input": "with input", "output": "answer"},
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "u"},
                      {"role": "assistant", "content": "a"}]},
    ])
    first = _ingest(tmp_path / "one", src)
    recs = first.file("records.parquet")
    out = export(recs, fmt, tmp_path / f"x.{fmt}.jsonl")
    again = _ingest(tmp_path / "two", out)
    a, b = _records(first), _records(again)
    assert b["format"].unique().to_list() == [fmt]
    assert b["id"].to_list() == a["id"].to_list()
    assert b["messages"].to_list() == a["messages"].to_list()
    # curate's id in the export comes back as the row's own id, under meta
    assert b["meta"].struct.field("id").to_list() == a["id"].to_list()


def test_relative_source_in_run_direct(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "in.jsonl", [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(5)])
    recipe = load_recipe(None, {"inputs": ["in.jsonl"], "out": "run", "embed.enabled": False,
                                "score.scorers": [], "select.strategy": "random", "select.budget": 2,
                                "report": False})
    run = run_direct(recipe)
    assert set(pl.read_parquet(run.file("decisions.parquet"))["source"]) == {"in.jsonl"}
    assert not os.path.isabs(pl.read_parquet(run.file("selected.parquet"))["source"][0])


def test_rejects_keep_their_own_meta_fields_typed_like_records(tmp_path):
    f = _write(tmp_path / "m.jsonl", [
        {"id": 1, "instruction": "q", "output": "a", "lang": "en"},
        {"id": "x-2", "turns": ["an eval prompt"], "category": "writing"},  # no format fits: rejected
    ])
    run = _ingest(tmp_path, f)
    rec_meta = pl.read_parquet(run.file("records.parquet")).schema["meta"]
    rej_meta = pl.read_parquet(run.file("rejects.parquet")).schema["meta"]
    assert [f.name for f in rec_meta.fields] == ["id", "lang"]
    assert [f.name for f in rej_meta.fields] == ["id", "turns", "category"]
    assert rec_meta.fields[0].dtype == rej_meta.fields[0].dtype == pl.String
