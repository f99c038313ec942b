"""`curate plan`: counts rows without parsing, lists every stage the recipe will run, costs iterative feedback."""

from conftest import ROOT
from typer.testing import CliRunner

from curate.cli import app
from curate.config import load_recipe
from curate.plan import plan

SAMPLE = ROOT / "data" / "sample"


def test_plan_counts_rows_and_lists_stages():
    rows = sum(len(p.read_text().splitlines()) for p in SAMPLE.glob("*.jsonl"))
    stages = {s.stage: s for s in plan(load_recipe(None, {"inputs": [str(SAMPLE)]}))}
    assert stages["ingest+dedup"].rows == rows
    assert {"embed", "cluster", "semdedup", "score:heuristics", "score:ifd", "select"} <= set(stages)
    assert stages["score:ifd"].calls == 2 * rows  # IFD: conditioned + unconditioned pass
    assert "select:feedback" not in stages


def test_plan_costs_iterative_feedback():
    recipe = load_recipe(None, {"inputs": [str(SAMPLE)], "select.strategy": "iterative", "select.rounds": 3,
                                "select.budget": 900, "cluster.k": 10, "select.probe_per_cluster": 4})
    fb = {s.stage: s for s in plan(recipe)}["select:feedback"]
    assert fb.rows == 300 + 600  # fine-tuned on the rows chosen after rounds 0 and 1
    assert fb.calls == 2 * 10 * 4 and fb.seconds > 0


def test_plan_cli_prints_a_table():
    res = CliRunner().invoke(app, ["plan", str(SAMPLE), "--strategy", "iterative", "--budget", "500"])
    assert res.exit_code == 0, res.output
    assert "select:feedback" in res.output and "total: about" in res.output
