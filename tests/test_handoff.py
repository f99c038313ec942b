"""Hand-off: what `curate export` writes is read as is by the tools people train with.

LLaMA-Factory is checked against its documented `dataset_info.json` schema (hiyouga/LLaMA-Factory data/README.md:
columns, tags, formatting; alpaca's user turn is `instruction\\ninput`, `history` is [[user, assistant], ...]),
and against its own loader when `llamafactory` is importable. TRL's SFTTrainer trains one step on
selected.parquet as is.
"""

import json
import os
import subprocess
import sys

import datasets
import polars as pl
import pytest
from conftest import ROOT

from curate.config import load_recipe
from curate.pipeline import run_direct

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "CURATE_PROGRESS": "0"}

#: LLaMA-Factory data/README.md: the keys a dataset_info.json entry may have.
LF_KEYS = {"hf_hub_url", "ms_hub_url", "script_url", "file_name", "file_sha1", "subset", "folder", "ranking",
           "formatting", "split", "num_samples", "columns", "tags"}
LF_COLUMNS = {"prompt", "query", "response", "history", "messages", "system", "tools", "images", "videos",
              "audios", "chosen", "rejected", "kto_tag"}
LF_TAGS = {"role_tag", "content_tag", "user_tag", "assistant_tag", "observation_tag", "function_tag", "system_tag"}
LF_COLUMN_DEFAULTS = {"prompt": "instruction", "query": "input", "response": "output", "messages": "conversations"}
LF_TAG_DEFAULTS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                   "system_tag": "system", "observation_tag": "observation", "function_tag": "function_call"}


def _rows():
    rows = [{"id": f"mine-{i}", "instruction": f"Explain item {i} in one line.", "input": "" if i % 3 else "ctx",
             "output": f"Item {i} is explained here.", "origin": "forum"} for i in range(12)]
    rows += [{"id": "mine-sys", "system": "You answer in French.", "instruction": "Say hello.", "output": "Bonjour."},
             {"id": "mine-hist", "instruction": "And twice?", "output": "4", "system": "Be terse.",
              "history": [["What is 1+1?", "2"], ["And 2+2?", "4"]]},
             {"id": "mine-sg", "conversations": [{"from": "human", "value": "Hi there"},
                                                 {"from": "gpt", "value": "Hello!"},
                                                 {"from": "human", "value": "Bye now"},
                                                 {"from": "gpt", "value": "Goodbye!"}]}]
    return rows


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("handoff")
    src = d / "mine.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    recipe = load_recipe(None, {"inputs": [str(src)], "out": str(d / "run"), "embed.enabled": False,
                                "score.scorers": ["heuristics"], "select.strategy": "random",
                                "select.budget": 15, "select.thresholds": [], "report": False})
    run = run_direct(recipe)
    for fmt in ("alpaca", "sharegpt"):
        cmd = [sys.executable, "-m", "curate.cli", "export", str(run.path), "--format", fmt,
               "--license", "cc-by-nc-4.0", "--license-note", "Derived from my own forum data."]
        res = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=120)
        assert res.returncode == 0, res.stderr
    return run.path


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _lf_conversation(entry, row):
    """The conversation LLaMA-Factory builds from `row` under `entry`, per its data/README.md."""
    cols = {**LF_COLUMN_DEFAULTS, **entry.get("columns", {})}
    system = row.get(cols["system"], "") if "system" in cols else ""
    if entry.get("formatting", "alpaca") == "alpaca":
        msgs = []
        for user, answer in (row.get(cols["history"]) or []) if "history" in cols else []:
            msgs += [("user", user), ("assistant", answer)]
        user = "\n".join(x for x in (row.get(cols["prompt"]), row.get(cols["query"])) if x)
        msgs += [("user", user), ("assistant", row[cols["response"]])]
    else:
        tags = {**LF_TAG_DEFAULTS, **entry.get("tags", {})}
        role = {tags["user_tag"]: "user", tags["assistant_tag"]: "assistant", tags["system_tag"]: "system"}
        turns = row[cols["messages"]]
        if turns and turns[0][tags["role_tag"]] == tags["system_tag"]:
            system, turns = turns[0][tags["content_tag"]], turns[1:]
        msgs = [(role[t[tags["role_tag"]]], t[tags["content_tag"]]) for t in turns]
    return ([("system", system)] if system else []) + msgs


def _load(run_dir, entry):
    path = run_dir / entry["file_name"]
    kind = "parquet" if path.suffix == ".parquet" else "json"
    return datasets.load_dataset(kind, data_files=str(path), split="train").to_list()


def test_dataset_info_follows_llamafactory_schema(run_dir):
    info = json.loads((run_dir / "dataset_info.json").read_text())
    assert set(info) == {"selected", "selected_alpaca", "selected_sharegpt"}
    for name, entry in info.items():
        assert set(entry) <= LF_KEYS, name
        assert entry.get("formatting", "alpaca") in {"alpaca", "sharegpt"}
        assert set(entry.get("columns", {})) <= LF_COLUMNS and set(entry.get("tags", {})) <= LF_TAGS
        assert (run_dir / entry["file_name"]).exists()
        rows = _load(run_dir, entry)
        for col in entry.get("columns", {}).values():
            assert col in rows[0], (name, col)
    assert info["selected_alpaca"]["columns"]["history"] == "history"
    assert info["selected_alpaca"]["columns"]["system"] == "system"
    assert info["selected"]["columns"] == {"messages": "messages"}


def test_every_export_gives_llamafactory_the_same_conversations(run_dir):
    """Under its dataset_info entry, each file yields exactly selected.parquet's conversations, row for row."""
    info = json.loads((run_dir / "dataset_info.json").read_text())
    sel = pl.read_parquet(run_dir / "selected.parquet")
    want = [[(m["role"], m["content"]) for m in msgs] for msgs in sel["messages"].to_list()]
    assert any(len(w) > 3 for w in want) and any(w[0][0] == "system" for w in want)
    for name, entry in info.items():
        got = [_lf_conversation(entry, row) for row in _load(run_dir, entry)]
        assert got == want, name


def test_llamafactory_default_columns_would_lose_history(run_dir):
    """Why the entry matters: LLaMA-Factory's defaults (no system, no history) drop turns of the Alpaca export."""
    rows = _jsonl(run_dir / "selected.alpaca.jsonl")
    info = json.loads((run_dir / "dataset_info.json").read_text())
    full = [_lf_conversation(info["selected_alpaca"], r) for r in rows]
    bare = [_lf_conversation({"file_name": "x"}, r) for r in rows]
    assert sum(a != b for a, b in zip(full, bare, strict=True)) == 3  # system row, history row, 2-turn ShareGPT


def test_exports_keep_the_users_ids(run_dir):
    for fmt in ("alpaca", "sharegpt"):
        rows = _jsonl(run_dir / f"selected.{fmt}.jsonl")
        assert all(r["meta"]["id"].startswith("mine-") for r in rows)
        assert all(len(r["id"]) == 32 for r in rows)  # curate's content hash, the join key to the run


def test_dataset_card(run_dir):
    card = (run_dir / "README.md").read_text()
    head = card.split("---")[1]
    assert "license: cc-by-nc-4.0" in head
    assert "path: selected.parquet" in head and "selected.alpaca.jsonl" in card.split("---", 2)[2]
    assert "Derived from my own forum data." in card
    assert "mine.jsonl" in card  # the source file
    assert "random" in card  # the strategy from the recipe
    assert "| 15 |" in card and "| 15 " in card  # input rows and selected
    # the card's own data_files config loads with `datasets` as the hub would
    ds = datasets.load_dataset(str(run_dir), split="train")
    assert ds.num_rows == 15 and "messages" in ds.column_names


def test_every_config_the_card_declares_loads(run_dir):
    """`datasets` picks one builder for all of a card's configs (from the first one's files): a JSONL export
    declared as a config beside the Parquet failed with "Parquet magic bytes not found" (the Hub viewer too)."""
    import yaml

    head = yaml.safe_load((run_dir / "README.md").read_text().split("---")[1])
    names = [c["config_name"] for c in head["configs"]]
    assert names[0] == "default"
    for name in names:
        ds = datasets.load_dataset(str(run_dir), name, split="train")
        assert ds.num_rows == 15 and "messages" in ds.column_names, name


def test_export_names_a_json_file_it_cannot_read(run_dir, tmp_path):
    """An existing dataset_info.json, or the run's manifest, that is not a JSON object: one line naming it, exit 2
    (was a bare parser message without the file, or "internal error ... This is a bug")."""
    import shutil

    for i, text in enumerate(["{oops", "[1, 2]"]):
        dest = tmp_path / f"d{i}"
        dest.mkdir()
        (dest / "dataset_info.json").write_text(text)
        run = tmp_path / f"run{i}"
        shutil.copytree(run_dir, run)
        (run / "manifest.json").write_text(text)
        for args, bad in (([str(run_dir), "--dest", str(dest)], dest / "dataset_info.json"),
                          ([str(run)], run / "manifest.json")):
            cmd = [sys.executable, "-m", "curate.cli", "export", *args, "--format", "alpaca"]
            res = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=120)
            assert res.returncode == 2, res.stderr
            assert f"{bad}: " in res.stderr and "Traceback" not in res.stderr
            assert len(res.stderr.strip().splitlines()) == 1 and bad.read_text() == text


def test_card_never_overwrites_a_readme_it_did_not_write(tmp_path, run_dir):
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(run_dir, d)
    (d / "README.md").write_text("# my own notes\n")
    cmd = [sys.executable, "-m", "curate.cli", "export", str(d), "--format", "sharegpt"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=120)
    assert res.returncode == 0, res.stderr
    assert (d / "README.md").read_text() == "# my own notes\n"
    assert "README.md" in res.stdout + res.stderr  # says why it did not write the card


def test_trl_sft_trainer_trains_on_selected_parquet_as_is(run_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from curate.lm.tiny import make_tiny_model

    model_dir = make_tiny_model(tmp_path / "tiny")
    ds = datasets.load_dataset("parquet", data_files=str(run_dir / "selected.parquet"), split="train")
    cfg = SFTConfig(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=2,
                    report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, max_length=128)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), args=cfg, train_dataset=ds,
                         processing_class=AutoTokenizer.from_pretrained(model_dir))
    out = trainer.train()
    assert out.global_step == 1 and out.training_loss > 0


def test_llamafactory_own_loader_reads_every_entry(run_dir):
    """Runs where LLaMA-Factory is importable (it is not a dependency of curate)."""
    lf = pytest.importorskip("llamafactory.data.parser", reason="llamafactory not installed")
    from llamafactory.data.converter import get_dataset_converter

    info = json.loads((run_dir / "dataset_info.json").read_text())
    sel = pl.read_parquet(run_dir / "selected.parquet")
    want = [[(m["role"], m["content"]) for m in msgs] for msgs in sel["messages"].to_list()]
    attrs = lf.get_dataset_list(list(info), str(run_dir))
    for attr in attrs:
        convert = get_dataset_converter(attr.formatting, attr, data_args=None)
        got = []
        for row in _load(run_dir, info[attr.dataset_name] if attr.dataset_name in info else
                         next(e for e in info.values() if e["file_name"] == attr.dataset_name)):
            ex = convert(row)
            msgs = [(m["role"], m["content"]) for m in ex["_prompt"] + ex["_response"]]
            got.append(([("system", ex["_system"])] if ex["_system"] else []) + msgs)
        assert got == want, attr.dataset_name


def test_export_to_another_folder_points_back_to_the_parquet(run_dir, tmp_path):
    dest = tmp_path / "elsewhere" / "train.jsonl"
    dest.parent.mkdir()
    cmd = [sys.executable, "-m", "curate.cli", "export", str(run_dir), "--format", "alpaca", "--dest", str(dest)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=120)
    assert res.returncode == 0, res.stderr
    info = json.loads((dest.parent / "dataset_info.json").read_text())
    assert (dest.parent / info["selected"]["file_name"]).resolve() == (run_dir / "selected.parquet").resolve()
    assert info["selected"]["file_name"].startswith("..")
    assert info["selected_alpaca"]["file_name"] == "train.jsonl"
    assert (dest.parent / "README.md").exists()


def test_a_new_selection_rewrites_an_earlier_export(tmp_path):
    """`curate export` then a re-select with another budget: the JSONL held the old subset while the card and
    dataset_info.json listed it as the new one."""
    src = tmp_path / "mine.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in _rows()))

    def select(budget):
        return run_direct(load_recipe(None, {"inputs": [str(src)], "out": str(tmp_path / "run"), "embed.enabled": False,
                                             "score.scorers": ["heuristics"], "select.strategy": "random",
                                             "select.budget": budget, "select.thresholds": [], "report": False}))

    run = select(8)
    res = subprocess.run([sys.executable, "-m", "curate.cli", "export", str(run.path), "--format", "alpaca"],
                         capture_output=True, text=True, env=ENV, timeout=120)
    assert res.returncode == 0, res.stderr
    assert len(_jsonl(run.path / "selected.alpaca.jsonl")) == 8
    run = select(12)
    ids = set(pl.read_parquet(run.path / "selected.parquet")["id"])
    assert len(ids) == 12
    assert {r["id"] for r in _jsonl(run.path / "selected.alpaca.jsonl")} == ids
    assert json.loads((run.path / "dataset_info.json").read_text())["selected_alpaca"]["file_name"] == \
        "selected.alpaca.jsonl"


def test_export_of_an_empty_subset_is_refused(tmp_path):
    """A selection left empty (a strict threshold) exported an empty JSONL that no loader reads (`datasets` stops
    with StopIteration) and pointed LLaMA-Factory at it."""
    src = tmp_path / "mine.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    recipe = load_recipe(None, {"inputs": [str(src)], "out": str(tmp_path / "run"), "embed.enabled": False,
                                "score.scorers": ["heuristics"], "select.strategy": "threshold",
                                "select.thresholds": ["heur_flags < 0"], "report": False})
    run = run_direct(recipe)
    assert pl.read_parquet(run.file("selected.parquet")).height == 0
    cmd = [sys.executable, "-m", "curate.cli", "export", str(run.path), "--format", "alpaca"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=120)
    assert res.returncode == 2 and "no row was selected" in res.stderr and "Traceback" not in res.stderr
    assert not (run.path / "selected.alpaca.jsonl").exists()
