"""The stage list: its order, its declarations, and cache keys that follow the code a stage runs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from curate.config import load_recipe
from curate.pipeline import Plan, build_pipeline, dependencies

ROOT = Path(__file__).resolve().parent.parent


def _names(**over):
    return [s.name for s in build_pipeline(load_recipe(None, over))]


def test_order_follows_the_recipe():
    assert _names(**{"score.scorers": ["heuristics"]}) == [
        "ingest", "embed", "cluster", "semdedup", "score:heuristics", "collect-scores", "select", "export", "report"]
    late = _names(**{"score.scorers": ["heuristics"], "semdedup.keep": "score", "semdedup.keep_score": "heur_flags"})
    assert late.index("semdedup") == late.index("collect-scores") + 1
    assert _names(**{"embed.enabled": False, "score.scorers": [], "report": False, "export": ["alpaca"]}) == [
        "ingest", "select", "export"]


def test_scorer_needs_come_from_the_configured_instance():
    """InstructMining without UniEval, reward or perplexity inputs needs no LM: no model stage is planned."""
    off = {"score.scorers": ["instructmining"],
           "score.params": {"instructmining": {"unieval": "off", "reward_scorer": None, "ppl_scorer": None}}}
    assert "model" not in _names(**off)
    assert "model" in _names(**{"score.scorers": ["instructmining"]})  # the default judges with the LM
    assert "model" in _names(**{"score.scorers": ["ifd"]})


def test_dependencies_follow_reads_and_writes():
    stages = build_pipeline(load_recipe(None, {"score.scorers": ["heuristics", "ifd"],
                                               "select.strategy": "iterative"}))
    deps = dependencies(stages)
    assert deps["score:heuristics"] == ["ingest"]  # runs beside the embedding shards
    assert deps["score:ifd"] == ["ingest", "model", "sample"]
    assert deps["sample"] == ["cluster", "ingest", "model"]  # score.minutes: it times the LM scorers
    assert set(deps["select"]) >= {"ingest", "embed", "cluster", "semdedup", "collect-scores", "model"}
    assert deps["cluster"] == ["embed", "ingest"]
    # a sample size given in rows needs no timing, so no model
    fixed = dependencies(build_pipeline(load_recipe(None, {"score.scorers": ["ifd"], "score.sample": 500})))
    assert fixed["sample"] == ["cluster", "ingest"]


def test_unknown_scorer_is_named_as_typed():
    with pytest.raises(ValueError, match="'heur'"):
        build_pipeline(load_recipe(None, {"score.scorers": ["heur"]}))


def _keys(tree: Path, data: Path, monkeypatch) -> dict[str, str]:
    monkeypatch.delenv("CURATE_CODE_VERSION", raising=False)
    recipe = load_recipe(None, {"inputs": [str(data)], "score.scorers": ["heuristics"], "export": ["alpaca"]})
    plan = Plan(recipe, "/runs/x", roots={p: tree / p for p in ("curate", "scorers", "flows")})
    return {s.name: plan.key(s) for s in plan.stages}


@pytest.mark.parametrize("edit, first", [
    ("curate/cluster.py", "cluster"),  # a module the cluster stage declares
    ("curate/select/kmq.py", "select"),  # imported by a declared module's package
    ("scorers/heuristics.py", "score:heuristics"),  # a scorer's own file
    ("curate/io/formats.py", "ingest"),  # imported by ingest, two levels down
])
def test_editing_code_invalidates_that_stage_and_what_follows_it(tmp_path, monkeypatch, edit, first):
    """A copy of the source tree, keys before and after appending a comment to one module: exactly the stage
    that runs the module and the stages downstream of it get new keys."""
    tree = tmp_path / "tree"
    for pkg in ("curate", "scorers", "flows"):
        shutil.copytree(ROOT / pkg, tree / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    data = tmp_path / "a.jsonl"
    data.write_text('{"instruction": "Say hi.", "output": "Hi."}\n')
    before = _keys(tree, data, monkeypatch)
    with open(tree / edit, "a") as fh:
        fh.write("\n# an edit\n")
    after = _keys(tree, data, monkeypatch)
    changed = {s for s in before if before[s] != after[s]}
    stages = build_pipeline(load_recipe(None, {"inputs": [str(data)], "score.scorers": ["heuristics"],
                                               "export": ["alpaca"]}))
    deps = dependencies(stages)
    downstream = {first}
    for st in stages:  # in order: a stage is downstream when it reads from one that is
        if set(deps[st.name]) & downstream:
            downstream.add(st.name)
    assert changed == downstream, (edit, sorted(changed), sorted(downstream))
    assert "ingest" not in changed or first == "ingest"
    assert "score:heuristics" not in changed or first in ("ingest", "score:heuristics")


def test_a_tampered_stage_result_is_never_executed_and_is_recomputed(tmp_path, monkeypatch):
    """Stage results are JSON data: a cache file replaced by a pickle that would run code, or by JSON naming
    classes to build, is never executed; an unreadable or inconsistent result makes the stage run again."""
    import pickle

    import polars as pl

    from curate.pipeline import run_local

    monkeypatch.setenv("CURATE_CACHE_DIR", str(tmp_path / "cache"))
    data = tmp_path / "a.jsonl"
    data.write_text("".join(f'{{"instruction": "Add {i} and {i}.", "output": "{2 * i}"}}\n' for i in range(40)))
    recipe = load_recipe(None, {"inputs": [str(data)], "out": str(tmp_path / "run"), "embed.enabled": False,
                                "score.scorers": ["heuristics"], "select.budget": 10, "report": False})
    first = run_local(recipe)
    ref = pl.read_parquet(first.file("decisions.parquet"))
    results = sorted((tmp_path / "cache" / "stages").glob("*.json"))
    assert results and all(p.stat().st_mode & 0o077 == 0 for p in results)  # private to the user
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    by_stage = {json.loads(p.read_text())["stage"]: p for p in results}
    by_stage["ingest"].write_bytes(pickle.dumps(Payload()))
    by_stage["select"].write_text(json.dumps({"__class__": "os.system", "data": f"touch {marker}"}))
    again = run_local(recipe)
    tasks = again.manifest["executor"]["tasks"]
    assert not marker.exists()
    assert tasks["ingest"] == "Completed" and tasks["select"] == "Completed"  # recomputed, not trusted
    assert tasks["collect-scores"] == "Cached"
    assert pl.read_parquet(again.file("decisions.parquet")).equals(ref)
