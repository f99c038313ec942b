"""Ingest, validation and exact dedup on real datasets and a corpus of broken inputs."""

import json
import subprocess
import sys

import polars as pl
import pytest
from conftest import CORPUS, ROOT, SAMPLE

from curate.ingest import EmptyPoolError, dedup, ingest
from curate.io.readers import InputError
from curate.run import Run
from curate.schema import make_record


def _ingest(tmp_path, *inputs, fmt="auto"):
    run = Run(tmp_path / "run")
    counts = ingest(run, [str(p) for p in inputs], fmt=fmt)
    dedup(run)
    return run, counts


def _rejects(run) -> dict[int, str]:
    return dict(pl.read_parquet(run.file("rejects.parquet")).select("row", "reason").iter_rows())


def _conserved(run):
    m = run.manifest
    rows = sum(e["rows"] for e in m["inputs"].values())
    rej = pl.read_parquet(run.file("rejects.parquet")).height
    dup = pl.read_parquet(run.file("duplicates.parquet")).height
    kept = pl.read_parquet(run.file("records.parquet")).height
    assert rows == kept + rej + dup, (rows, kept, rej, dup)
    return rows, kept, rej, dup


def test_bundled_sample_ingests_and_conserves(tmp_path):
    """The repository's own real data: a folder of three native formats, every row a record, none lost."""
    run, counts = _ingest(tmp_path, SAMPLE)
    assert _conserved(run) == (3675, 3675, 0, 0)
    got = {p.rsplit("/", 1)[-1]: (c.rows, c.records, dict(c.formats)) for p, c in counts.items()}
    assert got == {
        "gsm8k_train.jsonl": (1500, 1500, {"question_answer": 1500}),
        "gpteacher_codegen.jsonl": (1000, 1000, {"alpaca": 1000}),
        "gpteacher_toolformer.jsonl": (1000, 1000, {"alpaca": 1000}),
        "self_instruct_seed.jsonl": (175, 175, {"self_instruct": 175}),
    }
    recs = pl.read_parquet(run.file("records.parquet"))
    assert recs["id"].n_unique() == recs.height
    assert (recs["n_turns"] == 1).all() and (recs["response_chars"] > 0).all()
    first = json.loads((SAMPLE / "self_instruct_seed.jsonl").read_text().splitlines()[1])  # has an input
    si = recs.filter(pl.col("source").str.ends_with("self_instruct_seed.jsonl") & (pl.col("row") == 2)).row(
        0, named=True)
    assert first["instances"][0]["input"] in si["instruction"] and first["instruction"] in si["instruction"]
    assert si["response"] == first["instances"][0]["output"]


def test_every_shared_dataset_ingests_and_conserves(tmp_path, shared_data):
    run, counts = _ingest(tmp_path, shared_data)
    rows, kept, rej, dup = _conserved(run)
    assert len(counts) >= 25
    alpaca = next(c for p, c in counts.items() if p.endswith("alpaca_data.jsonl"))
    assert alpaca.rows == 52002 and alpaca.formats["alpaca"] > 51900
    assert alpaca.rejected["empty_response"] > 0  # Alpaca really has empty outputs
    gsm = next(c for p, c in counts.items() if p.endswith("gsm8k/train.jsonl"))
    assert gsm.records == 7473 and gsm.formats["question_answer"] == 7473
    st = run.manifest["stages"]
    assert st["ingest"]["rows_in"] == rows and st["dedup"]["rows_out"] == kept
    recs = pl.read_parquet(run.file("records.parquet"))
    assert recs["id"].n_unique() == recs.height
    assert (recs["n_turns"] >= 1).all() and (recs["response_chars"] > 0).all()


def test_broken_corpus_rejects_with_reasons(tmp_path):
    files = ["truncated.jsonl", "binary_garbage.jsonl", "wrong_types.jsonl", "empty.jsonl",
             "blank_lines.jsonl", "mixed_formats.jsonl", "bom_crlf.jsonl", "array.json", "good.csv"]
    run, counts = _ingest(tmp_path, *(CORPUS / f for f in files))
    _conserved(run)
    rej = pl.read_parquet(run.file("rejects.parquet"))
    by = {(r["source"].rsplit("/", 1)[-1], r["row"]): r["reason"] for r in rej.iter_rows(named=True)}
    assert by[("truncated.jsonl", 2)] == "malformed_json"
    assert by[("binary_garbage.jsonl", 2)] == "undecodable_bytes"
    assert by[("binary_garbage.jsonl", 3)] == "undecodable_bytes"
    wt = {row: reason for (f, row), reason in by.items() if f == "wrong_types.jsonl"}
    assert wt == {2: "wrong_type", 3: "wrong_type", 4: "wrong_type", 5: "wrong_type", 6: "wrong_type",
                  7: "unknown_role", 8: "empty_response", 9: "unknown_role", 10: "unknown_format"}
    assert by[("array.json", 1)] == "missing_response"
    assert by[("good.csv", 5)] == "empty_response"  # CSV rows are numbered by their first line (header = 1)
    assert all(len(r) <= 500 for r in rej["raw"])
    c = {p.rsplit("/", 1)[-1]: v for p, v in counts.items()}
    assert c["empty.jsonl"].rows == 0 and c["blank_lines.jsonl"].records == 1
    assert dict(c["mixed_formats.jsonl"].formats) == {
        "alpaca": 1, "sharegpt": 1, "openai": 1, "dolly": 1, "prompt_completion": 1, "question_answer": 1}
    recs = pl.read_parquet(run.file("records_all.parquet"))  # before dedup: the BOM row repeats row 1
    bom = recs.filter(pl.col("source").str.ends_with("bom_crlf.jsonl")).sort("row")
    assert bom["instruction"].to_list() == ["Name a primary colour.", "Second\nline"]
    assert bom["response"].to_list()[1] == "ok"  # CR LF and trailing spaces normalised
    sg = recs.filter(pl.col("format") == "sharegpt").row(0, named=True)
    assert sg["n_turns"] == 2 and sg["instruction"] == "Bye" and sg["response"] == "Goodbye."
    oa = recs.filter(pl.col("format") == "openai").row(0, named=True)
    assert oa["system"] == "Be brief." and [m["role"] for m in oa["messages"]] == ["system", "user", "assistant"]


def test_huge_single_line_is_rejected_not_parsed(tmp_path):
    big = tmp_path / "huge.jsonl"
    with open(big, "w") as fh:
        fh.write('{"instruction": "x", "output": "' + "a" * (50 * 1024 * 1024) + '"}\n')
        fh.write('{"instruction": "small", "output": "fine"}\n')
    run, counts = _ingest(tmp_path, big)
    assert _rejects(run) == {1: "too_large"}
    assert counts[str(big)].records == 1


@pytest.mark.parametrize("name, fragment", [
    ("not_json.json", "not valid JSON"),
    ("corrupt.parquet", "not a readable Parquet file"),
    ("unknown.xyz", "unknown file type"),
    ("bad.csv", "malformed CSV"),
    ("does_not_exist.jsonl", "no such file"),
])
def test_unreadable_file_is_one_clear_error(tmp_path, name, fragment):
    with pytest.raises(InputError, match=fragment) as e:
        _ingest(tmp_path, CORPUS / name)
    assert name in str(e.value)


def test_cli_error_is_one_line_no_traceback(tmp_path):
    p = subprocess.run([sys.executable, "-m", "curate.cli", "ingest", str(CORPUS / "not_json.json"),
                        "--out", str(tmp_path / "r")], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2
    assert "Traceback" not in p.stderr and "not_json.json" in p.stderr and "not valid JSON" in p.stderr


def test_exact_dedup_rules(tmp_path):
    rows = [
        {"instruction": "Say hi", "input": "", "output": "Hi there."},
        {"instruction": "say   HI", "input": "", "output": "hi there."},  # case + spacing -> duplicate
        {"instruction": "Say hi", "input": "", "output": "Hi there!"},  # punctuation differs -> kept
        {"conversations": [{"from": "human", "value": "Say hi"}, {"from": "gpt", "value": "Hi there."}]},
    ]
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    run, _ = _ingest(tmp_path, p)
    dups = pl.read_parquet(run.file("duplicates.parquet"))
    assert dups["row"].to_list() == [2, 4]  # the same conversation in another format is a duplicate too
    first = pl.read_parquet(run.file("records.parquet")).filter(pl.col("row") == 1)["id"].item()
    assert dups["duplicate_of"].to_list() == [first, first]
    assert dups["duplicate_of_row"].to_list() == [1, 1]


def test_record_id_is_stable_content_hash():
    a = make_record([{"role": "user", "content": "Hi \r\n"}, {"role": "assistant", "content": "Yo"}],
                    source="a", row=1, fmt="openai")
    b = make_record([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
                    source="b", row=9, fmt="alpaca")
    assert a["id"] == b["id"] and len(a["id"]) == 32
    c = make_record([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Yo"}],
                    source="b", row=9, fmt="alpaca")
    assert c["id"] != a["id"] and c["dedup_key"] == a["dedup_key"]


def test_parquet_hf_disk_and_explicit_format(tmp_path):
    import datasets

    rows = [{"prompt": f"Q{i}", "response": f"A{i}"} for i in range(5)] + [{"prompt": "Q", "response": ""}]
    pl.DataFrame(rows).write_parquet(tmp_path / "p.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"))
    run, counts = _ingest(tmp_path, tmp_path / "p.parquet", tmp_path / "hf")
    rows_, kept, rej, dup = _conserved(run)
    assert (rows_, kept, rej, dup) == (12, 5, 2, 5)
    run2 = Run(tmp_path / "x" / "run")  # explicit wrong format: every row rejected as missing_field
    ingest(run2, [str(tmp_path / "p.parquet")], fmt="alpaca")
    with pytest.raises(EmptyPoolError, match=r"all 6 rows read from .*p\.parquet were rejected"):
        dedup(run2)
    assert set(_rejects(run2).values()) == {"missing_field"}
    assert pl.read_parquet(run2.file("decisions.parquet"))["status"].to_list() == ["rejected"] * 6
