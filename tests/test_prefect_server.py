"""The default `curate select` (Prefect flow, embedded server) run the way users run it: real subprocesses,
a fresh cache, two runs at once, cached re-runs. Nothing Prefect logs as an error may reach the terminal.

Kept cheap: the bundled sample through the flow with no embeddings and only the heuristics scorer, so what is
measured is Prefect's start, migration and shutdown, not the models.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from conftest import ROOT, SAMPLE

#: every stage of the flow that needs no model; many score shards, so a run ends with a burst of task events
CHEAP = {"embed": {"enabled": False}, "semdedup": {"enabled": False},
         "score": {"scorers": ["heuristics"], "shards": 48}, "select": {"strategy": "random", "budget": 20},
         "report": False}
#: what must never reach the terminal from Prefect or its server
NOISE = ("Traceback", "Error flushing", "| ERROR", "OperationalError", "alembic", "Application startup failed")


def _env(cache: Path) -> dict[str, str]:
    """A user's environment: no Prefect settings from this test session, a cache of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(CURATE_CACHE_DIR=str(cache), CURATE_PROGRESS="0", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    return env


def _select_cmd(recipe: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "curate.cli", "select", str(SAMPLE), "--config", str(recipe), "--out", str(out)]


def _clean(output: str) -> None:
    for word in NOISE:
        assert word not in output, f"{word!r} in the output:\n{output[-4000:]}"


def _n_input_rows() -> int:
    return sum(1 for f in SAMPLE.glob("*.jsonl") for line in f.read_text().splitlines() if line.strip())


@pytest.fixture(scope="module")
def first_runs(tmp_path_factory):
    """Two `curate select` started at the same moment on one fresh cache (its Prefect DB does not exist yet)."""
    tmp = tmp_path_factory.mktemp("concurrent")
    recipe = tmp / "recipe.json"  # JSON is YAML
    recipe.write_text(json.dumps(CHEAP))
    cache = tmp / "cache"
    procs = [subprocess.Popen(_select_cmd(recipe, tmp / f"run{i}"), env=_env(cache), cwd=tmp, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in (1, 2)]
    try:
        outputs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:  # a run that hangs must not outlive the test (its own atexit stops its server)
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(60)
    return {"tmp": tmp, "recipe": recipe, "cache": cache, "codes": [p.returncode for p in procs],
            "outputs": outputs}


def test_concurrent_first_runs_on_one_fresh_cache(first_runs):
    """Both runs create/migrate Prefect's database at once: one waits for the other, neither prints an error."""
    n = _n_input_rows()
    for i, (code, output) in enumerate(zip(first_runs["codes"], first_runs["outputs"], strict=True), 1):
        assert code == 0, output[-4000:]
        _clean(output)
        dec = pl.read_parquet(first_runs["tmp"] / f"run{i}" / "decisions.parquet")
        assert dec.height == n and (dec["status"] == "selected").sum() == 20
    home = first_runs["cache"] / "prefect" / "home"
    assert (home / "prefect.db").exists()


def test_cached_rerun_prints_no_error_flushing_events(first_runs):
    """A fully cached re-run ends right after a burst of task events: the server must not be stopped while its
    task-run recorder is still writing them ("Error flushing N events" with a CancelledError traceback)."""
    tmp, env = first_runs["tmp"], _env(first_runs["cache"])
    for _ in range(2):  # the race needs the recorder to lag: two tries make a regression very likely to show
        p = subprocess.run(_select_cmd(first_runs["recipe"], tmp / "run1"), env=env, cwd=tmp, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
        assert p.returncode == 0, p.stdout[-4000:]
        _clean(p.stdout)
        m = json.loads((tmp / "run1" / "manifest.json").read_text())
        assert m["executor"]["computed"] == 0 and m["executor"]["cached"] > 48, m["executor"]


@pytest.mark.parametrize("recipe, fragment", [
    ({"score": {"scorers": ["heuristics", "no_such_scorer"]}}, "unknown scorer 'no_such_scorer'"),
    ({"score": {"scorers": ["heuristics"]}, "select": {"thresholds": ["ifd < 1"]}}, "column 'ifd'"),
    # a good recipe, but PREFECT_API_URL does not answer: said as `curate select` says it (was "internal error", 1)
    ({"score": {"scorers": ["heuristics"]}}, "PREFECT_API_URL=http://127.0.0.1:9/api does not answer"),
])
def test_serve_rejects_a_bad_recipe_before_any_prefect_work(tmp_path, recipe, fragment):
    """`curate serve` checks the recipe as `curate select` does: one line, exit 2, no server, no deployment.

    PREFECT_API_URL points at a closed port, so a check that came too late fails here quickly (Prefect cannot
    register the deployment) instead of starting a server or waiting for the schedule."""
    (tmp_path / "watch").mkdir()
    (tmp_path / "bad.yaml").write_text(json.dumps(recipe))
    env = {**_env(tmp_path / "cache"), "PREFECT_API_URL": "http://127.0.0.1:9/api"}
    cmd = [sys.executable, "-m", "curate.cli", "serve", "--watch", str(tmp_path / "watch"),
           "--out", str(tmp_path / "run"), "--config", str(tmp_path / "bad.yaml")]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        output = proc.communicate(timeout=600)[0]  # seconds when idle; a loaded 2-core box is far slower
    except subprocess.TimeoutExpired:  # serving: stop it the way a user does (it stops what it started)
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=60)[0]
        pytest.fail(f"curate serve started serving a bad recipe:\n{output[-3000:]}")
    assert proc.returncode == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    lines = [x for x in output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], output[-3000:]
