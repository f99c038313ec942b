"""The CLI read through a pipe, as in a CI log: full short names, plain progress lines, no runaway lines."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

ENV = {k: v for k, v in os.environ.items() if k not in ("CURATE_PROGRESS", "COLUMNS", "TQDM_DISABLE")}
ENV["PYTHONPATH"] = str(ROOT)


def _cli(*args, env=None, cwd=None):
    res = subprocess.run([sys.executable, "-m", "curate.cli", *map(str, args)], capture_output=True, text=True,
                         env={**ENV, **(env or {})}, cwd=cwd, timeout=300)
    return res


@pytest.fixture(scope="module")
def deep_inputs(tmp_path_factory):
    """Four files with long absolute paths that share a long prefix (a truncated column made them identical)."""
    d = tmp_path_factory.mktemp("a_rather_long_folder_name") / "another_long_level" / "datasets_for_tuning"
    d.mkdir(parents=True)
    names = [f"instructions_part_{i}_of_four.jsonl" for i in range(4)]
    for i, n in enumerate(names):
        (d / n).write_text("".join(json.dumps({"instruction": f"q{i}-{j}", "output": f"a{i}-{j}"}) + "\n"
                                   for j in range(3 + i)))
    return d, names


def test_ingest_and_inspect_tables_show_every_input_by_a_short_full_name(deep_inputs, tmp_path):
    d, names = deep_inputs
    res = _cli("ingest", d, "--out", tmp_path / "run")
    assert res.returncode == 0, res.stderr
    for text in (res.stdout, _cli("inspect", tmp_path / "run").stdout):
        assert "…" not in text
        for n in names:
            assert sum(n in line for line in text.splitlines()) == 1, (n, text)
        assert str(d) in text  # the folder they share is said once, in the title


def test_inspect_of_a_dataset_folder_lists_each_file(deep_inputs):
    d, names = deep_inputs
    out = _cli("inspect", d).stdout
    rows = [line for line in out.splitlines() if ".jsonl" in line and "│" in line]
    assert len(rows) == 4 and len(set(rows)) == 4, out


def test_progress_is_plain_lines_when_piped(deep_inputs, tmp_path):
    d, names = deep_inputs
    res = _cli("ingest", d, "--out", tmp_path / "run", env={"CURATE_PROGRESS_EVERY": "0"})
    assert res.returncode == 0, res.stderr
    lines = res.stderr.splitlines()
    assert "\r" not in res.stderr and "\x1b[" not in res.stderr and "━" not in res.stderr
    for i, n in enumerate(names):
        assert any(line.startswith(f"ingest {n}: {3 + i}/{3 + i} (100%)") for line in lines), res.stderr
    assert max(map(len, lines)) < 200


def test_third_party_progress_bars_are_silenced_when_piped():
    """tqdm (model2vec's distillation, datasets) writes one \\r-joined line per bar: silenced off a TTY."""
    code = ("import tqdm, curate.progress\n"  # tqdm imported first, as transformers / datasets do
            "from tqdm import tqdm as bar\n"
            "from tqdm.auto import tqdm as auto\n"
            "for _ in bar(range(20000), mininterval=0): pass\n"
            "for _ in auto(range(20000), mininterval=0): pass\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert res.returncode == 0, res.stderr
    assert len(res.stderr) < 200, res.stderr[:300]


def test_version():
    from importlib.metadata import version

    res = _cli("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"curate {version('curate')}"


def test_help_shows_placeholders_literally():
    assert "RUN/selected.<format>.jsonl" in _cli("export", "--help", env={"COLUMNS": "200"}).stdout
    assert "runs/<name>" in _cli("ingest", "--help", env={"COLUMNS": "200"}).stdout


def test_plain_progress_prints_periodic_lines_and_a_last_one():
    import io

    from rich.console import Console

    from curate.progress import PlainProgress

    buf = io.StringIO()
    with PlainProgress(Console(file=buf, width=100), every=0) as bar:
        t = bar.add_task("embed user", total=5)
        for _ in range(4):
            bar.advance(t)
        open_task = bar.add_task("scan", total=None)
        bar.update(open_task, completed=7)
    lines = buf.getvalue().splitlines()
    # every update (every=0 s), then a last line for each task left open when the bar closes
    assert [line.split(",")[0] for line in lines] == [
        "embed user: 1/5 (20%)", "embed user: 2/5 (40%)", "embed user: 3/5 (60%)", "embed user: 4/5 (80%)",
        "scan: 7 rows", "embed user: 4/5 (80%)", "scan: 7 rows"]


def test_default_sample_is_named_relative_to_the_working_folder(monkeypatch):
    from curate.cli import _recipe

    monkeypatch.chdir(ROOT)
    assert _recipe(None, None, {"out": None}).inputs == ["data/sample"]


def test_a_warning_is_one_line(tmp_path):
    """A damaged score-store part is set aside with a warning; Python printed it as two lines, the second the
    `warnings.warn(...)` source line, which reads like a crash in a CI log."""
    src = tmp_path / "a.jsonl"
    src.write_text("".join(json.dumps({"instruction": f"Name fruit {i}.", "output": f"Fruit {i}."}) + "\n"
                           for i in range(12)))
    (tmp_path / "r.yaml").write_text("embed: {enabled: false}\nreport: false\n")
    env = {"CURATE_CACHE_DIR": str(tmp_path / "cache")}
    args = ("select", src, "--config", tmp_path / "r.yaml", "--scorers", "heuristics", "--budget", "4", "--no-prefect")
    assert _cli(*args, "--out", tmp_path / "one", env=env).returncode == 0
    parts = list((tmp_path / "cache" / "scores").rglob("*.parquet"))
    assert parts
    for p in parts:
        p.write_bytes(p.read_bytes()[:20])
    res = _cli(*args, "--out", tmp_path / "two", env=env)
    assert res.returncode == 0, res.stderr
    warned = [line for line in res.stderr.splitlines() if "damaged" in line]
    assert warned and all(line.startswith("warning: score store:") for line in warned), res.stderr
    assert "warnings.warn" not in res.stderr and "UserWarning" not in res.stderr, res.stderr
