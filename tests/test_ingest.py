"""Ingest, validation and exact dedup on real datasets and a corpus of broken inputs."""

import gzip
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


def test_data_after_a_json_array_is_an_error_not_dropped(tmp_path):
    """`[...]` then a second array (a batch per line) or stray text: the rows after the first array used to vanish
    with exit 0; now the file is named with the line where the extra data starts."""
    first = json.dumps([{"instruction": f"Q{i} " + "x" * 300, "output": "A"} for i in range(300)], indent=1)
    two = tmp_path / "two.json"
    two.write_text(first + "\n\n" + json.dumps([{"instruction": "lost?", "output": "no"}]) + "\n")
    line = first.count("\n") + 3  # past the 64 KiB read chunk: the line is counted across chunks
    with pytest.raises(InputError, match=rf"two\.json: not valid JSON \(more data .* at line {line};"):
        _ingest(tmp_path, two)
    p = subprocess.run([sys.executable, "-m", "curate.cli", "ingest", str(two), "--out", str(tmp_path / "r")],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2 and "Traceback" not in p.stderr and f"at line {line}" in p.stderr
    stray = tmp_path / "stray.json"
    stray.write_text('[{"instruction": "a", "output": "b"}] {"instruction": "c", "output": "d"}')
    with pytest.raises(InputError, match="stray.json: .* at line 1;"):
        _ingest(tmp_path, stray)


def test_json_array_named_jsonl_is_read_as_its_rows(tmp_path):
    """`datasets.load_dataset("json")` reads a JSON array saved as .jsonl; curate read its 3 rows as 1 rejected row
    (one line) or 17 malformed lines (pretty-printed). An array line followed by more lines stays JSON Lines."""
    rows = [{"id": f"r{i}", "instruction": f"Q{i}", "output": f"A{i}"} for i in range(3)]
    one_line = tmp_path / "one_line.jsonl"
    one_line.write_text(json.dumps(rows) + "\n")
    pretty = tmp_path / "pretty.jsonl.gz"
    with gzip.open(pretty, "wb") as fh:
        fh.write(b"\xef\xbb\xbf" + json.dumps(rows, indent=2).replace("\n", "\r\n").encode())
    run, counts = _ingest(tmp_path, one_line, pretty)
    assert [(c.rows, c.records) for c in counts.values()] == [(3, 3), (3, 3)]
    recs = pl.read_parquet(run.file("records_all.parquet"))
    assert recs["row"].to_list() == [0, 1, 2, 0, 1, 2]  # numbered as a .json array's elements
    assert recs["meta"].struct.field("id").to_list() == ["r0", "r1", "r2"] * 2
    lines = tmp_path / "lines.jsonl"
    lines.write_text("[1, 2]\n" + json.dumps(rows[0]) + "\n")
    run, counts = _ingest(tmp_path / "l", lines)
    assert _rejects(run) == {1: "wrong_type"} and counts[str(lines)].records == 1


def test_gzip_file_without_gz_in_its_name_is_decompressed(tmp_path):
    """A download saved as `data.jsonl` that is really gzip: read as one "row" of undecodable bytes (or "not valid
    JSON" for .json); its rows are read now, and a damaged one is named as a gzip stream."""
    rows = [{"instruction": f"Q{i}", "output": f"A{i}"} for i in range(3)]
    lines = tmp_path / "data.jsonl"
    lines.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    array = tmp_path / "data.json"
    array.write_bytes(gzip.compress(json.dumps(rows).encode()))
    run, counts = _ingest(tmp_path, lines, array)
    assert [(c.rows, c.records) for c in counts.values()] == [(3, 3), (3, 3)]
    assert _conserved(run) == (6, 3, 0, 3)  # the same rows twice: the second file's are duplicates
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(lines.read_bytes()[:20])
    with pytest.raises(InputError, match="bad.jsonl: corrupt or truncated gzip stream"):
        _ingest(tmp_path / "bad", bad)


def test_utf16_file_is_one_clear_error(tmp_path):
    """A UTF-16 file (PowerShell's `>`) was read as 4 "rows" of malformed JSON for 3 rows, and a folder run went on
    with them rejected; it is a file that cannot be read, named with the fix."""
    rows = [{"instruction": f"Q{i}", "output": f"A{i}"} for i in range(3)]
    pool = tmp_path / "pool"
    pool.mkdir()
    (pool / "good.jsonl").write_text(json.dumps(rows[0]) + "\n")
    (pool / "win.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-16")
    (tmp_path / "win.csv").write_text("instruction,output\nq,a\n", encoding="utf-16")
    for bad in (pool, tmp_path / "win.csv"):
        with pytest.raises(InputError, match=r"win\.(jsonl|csv): UTF-16 text .*save it as UTF-8"):
            _ingest(tmp_path / f"run-{bad.name}", bad)


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
