"""`curate plan`: counts rows without parsing, lists every stage the recipe will run, costs iterative feedback."""

import pytest
from conftest import ROOT
from typer.testing import CliRunner

from curate.cli import app
from curate.config import load_recipe
from curate.plan import plan

SAMPLE = ROOT / "data" / "sample"


def test_plan_counts_rows_and_lists_stages():
    rows = sum(len(p.read_text().splitlines()) for p in SAMPLE.glob("*.jsonl"))
    # the proxy scores ~150 rows/s: the default 5 minutes of LM scoring cover the whole sample (no distillation)
    stages = {s.stage: s for s in plan(load_recipe(None, {"inputs": [str(SAMPLE)], "score.model": "proxy"}))}
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
    # a budget that takes the whole pool asks no feedback (IterativeRefinement.feedback_moot): none is priced
    everything = recipe.model_copy(update={"select": recipe.select.model_copy(update={"budget": 10**6})})
    assert "select:feedback" not in {s.stage for s in plan(everything)}


def test_plan_prices_smollm2_feedback_at_the_models_rates(tmp_path):
    """Alpaca-like rows (415 bytes), budget 300, 3 rounds, 228 clusters x 8 = a 1,824-row probe: SmolLM2's feedback
    took ~600 s a round in float32 (curate.plan's comment); the toy proxy's rates priced it at 30 s in all."""
    import json

    from curate.plan import PASS_RATES, feedback_seconds

    line = json.dumps({"instruction": "Explain " + "why " * 30, "input": "", "output": "Because " + "it is so " * 25})
    assert len(line) <= 414
    (tmp_path / "alpaca.jsonl").write_text((line + " " * (414 - len(line)) + "\n") * 5000)  # 415 bytes a row

    def feedback(**over):
        recipe = load_recipe(None, {"inputs": [str(tmp_path / "alpaca.jsonl")], "select.strategy": "iterative",
                                    "select.rounds": 3, "select.budget": 300, "cluster.k": 228,
                                    "score.model": "smollm2-135m", "score.dtype": "float32", **over})
        return {s.stage: s for s in plan(recipe)}["select:feedback"]

    fp32 = feedback()
    assert fp32.rows == 100 + 200 and fp32.calls == 2 * 1824
    assert 450 < fp32.seconds / 2 < 750  # measured: 591.8 and 609.6 s
    bf16 = feedback(**{"score.dtype": "auto"})  # priced as bf16, what auto picks on a CPU with fast bf16
    assert 120 < bf16.seconds / 2 < fp32.seconds / 2  # still minutes a round
    # the probe at the model's pass rate (bf16): 8 more rows per cluster add 2 rounds x 1,824 passes
    more_probe = feedback(**{"score.dtype": "auto", "select.probe_per_cluster": 16})
    assert more_probe.calls == 2 * 2 * 1824
    assert more_probe.seconds - bf16.seconds == pytest.approx(2 * 1824 / PASS_RATES["smollm2-135m"], rel=0.01)
    # more rounds: more set-ups, fine-tunes and probe passes
    five = feedback(**{"select.rounds": 5})
    assert five.calls == 4 * 1824 and five.seconds > 1.8 * fp32.seconds
    proxy = feedback(**{"score.model": "proxy"})
    assert proxy.seconds < fp32.seconds / 10
    recipe = load_recipe(None, {"inputs": [str(tmp_path / "alpaca.jsonl")], "select.strategy": "iterative",
                                "score.model": "smollm2-135m", "score.dtype": "float32"})
    assert feedback_seconds(recipe, 0, 0) > 0  # the per-round set-up alone


def test_plan_cli_prints_a_table():
    res = CliRunner().invoke(app, ["plan", str(SAMPLE), "--strategy", "iterative", "--budget", "500"])
    assert res.exit_code == 0, res.output
    assert "select:feedback" in res.output and "total: about" in res.output
    assert "priced cold" in res.output  # a rerun reads stored work back; the plan does not pretend to know which
    assert "LM scoring rate assumed, not measured" in res.output  # the run measures it (issue #15)


def test_plan_says_what_the_budget_selects_and_takes_selects_budget_options(tmp_path):
    """`curate plan` refused `--fraction` and `--budget-tokens` (`curate select` takes them), never said how big the
    subset would be, and priced the iterative feedback at 10% of the pool whatever the token budget said."""
    rows = sum(len(p.read_text().splitlines()) for p in SAMPLE.glob("*.jsonl"))
    base = {"inputs": [str(SAMPLE)], "score.model": "proxy", "cluster.k": 10}

    def stages(**over):
        return {s.stage: s for s in plan(load_recipe(None, {**base, **over}))}

    tokens = stages()["(tokens, estimated)"].rows
    assert stages()["(subset rows, at most)"].rows == round(rows * 0.1)  # the default fraction
    assert stages(**{"select.budget": 10**6})["(subset rows, at most)"].rows == rows
    assert stages(**{"select.fraction": 1e-6})["(subset rows, at most)"].rows == 1  # as Budget.resolve
    small = stages(**{"select.budget_tokens": 20_000, "select.strategy": "iterative", "select.rounds": 2})
    per_row = tokens / rows
    assert small["(subset tokens, estimated)"].rows == 20_000
    assert small["(subset rows, at most)"].rows == pytest.approx(20_000 / per_row, abs=1)
    assert small["select:feedback"].rows == small["(subset rows, at most)"].rows // 2  # not 10% of the pool
    res = CliRunner().invoke(app, ["plan", str(SAMPLE), "--fraction", "0.05", "--model", "proxy"])
    assert res.exit_code == 0, res.output
    assert f"{round(rows * 0.05):,}" in next(ln for ln in res.output.splitlines() if "(subset rows" in ln)
    res = CliRunner().invoke(app, ["plan", str(SAMPLE), "--budget-tokens", "5000", "--model", "proxy"])
    assert res.exit_code == 0 and "5,000" in next(ln for ln in res.output.splitlines() if "(subset tokens" in ln)


def test_plan_counts_a_dict_of_splits_json_file(tmp_path):
    """A JSON file shaped {"train": [...], "test": [...]} becomes one source per split (`data.json#train`); the plan
    took that name for a path that does not exist and counted each split as 1 row of 0 bytes: 2 rows for 100."""
    import json

    from curate.plan import count_rows

    rows = [json.loads(line) for line in (SAMPLE / "gsm8k_train.jsonl").read_text().splitlines()[:100]]
    (tmp_path / "one.json").write_text(json.dumps(rows))
    (tmp_path / "splits.json").write_text(json.dumps({"train": rows[:50], "test": rows[50:]}))
    whole = {s.stage: s for s in plan(load_recipe(None, {"inputs": [str(tmp_path / "one.json")]}))}
    split = {s.stage: s for s in plan(load_recipe(None, {"inputs": [str(tmp_path / "splits.json")]}))}
    assert split["ingest+dedup"].rows == pytest.approx(whole["ingest+dedup"].rows, abs=2)
    assert 50 <= split["ingest+dedup"].rows <= 200
    assert split["(tokens, estimated)"].rows == pytest.approx(whole["(tokens, estimated)"].rows, rel=0.01)
    n, size = count_rows(f"{tmp_path / 'splits.json'}#train")
    assert size == (tmp_path / "splits.json").stat().st_size // 2 and n > 1


def test_plan_prices_one_off_work_and_the_sample_then_distill_split(tmp_path, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    base = {"inputs": [str(SAMPLE)], "out": str(tmp_path / "run"), "score.scorers": ["heuristics", "ifd"],
            "score.model": "proxy"}
    stages = {s.stage: s for s in plan(load_recipe(None, base))}
    assert {"one-off: start-up (imports)", "one-off: Prefect server start", "one-off: train the proxy LM"} <= set(
        stages)
    assert "one-off: Prefect server start" not in {s.stage for s in plan(load_recipe(None, base), prefect=False)}
    rows = stages["ingest+dedup"].rows
    assert stages["one-off: train the proxy LM"].calls == max(150, rows // 10)  # training steps
    # a sample: the LM scores 2,500 rows, the rule scorer every row, distillation predicts the rest
    sampled = {s.stage: s for s in plan(load_recipe(None, {**base, "score.sample": 2500}))}
    assert sampled["score:ifd"].rows == 2500 and sampled["score:ifd"].calls == 5000
    assert sampled["score:heuristics"].rows == rows
    assert sampled["distill (predict the rest)"].rows == rows - 2500
    assert sampled["score:ifd"].seconds < stages["score:ifd"].seconds
    # a time budget: the LM part fits in it
    timed = {s.stage: s for s in plan(load_recipe(None, {**base, "score.minutes": 0.2}))}
    assert timed["score:ifd"].seconds <= 0.2 * 60 * 1.01 or timed["score:ifd"].rows == 200  # MIN_SAMPLE floor
    assert "distill (predict the rest)" in timed
    # small pools are scored whole whatever was asked
    small = {s.stage: s for s in plan(load_recipe(None, {**base, "inputs": [str(SAMPLE / "gsm8k_train.jsonl")],
                                                          "score.sample": 100}))}
    assert small["score:ifd"].rows == 1500 and "distill (predict the rest)" not in small


@pytest.mark.slow
def test_plan_is_within_a_stated_factor_of_a_real_small_run(tmp_path, monkeypatch):
    """Issue #13: a 200-row run planned at 6 s took 5 min, because one-off work was not priced. Plan a small
    run that trains its proxy (a fresh model cache, as on a new machine), run it, compare."""
    import json
    import os
    import time
    import warnings

    from curate.embed import load_embedder
    from curate.pipeline import run_direct
    from curate.run import cache_dir

    static = load_embedder("minilm-static").spec.path  # the session's shared copy (distilled once if absent)
    cache = tmp_path / "cache"
    (cache / "models").mkdir(parents=True)
    (cache / "models" / os.path.basename(static)).symlink_to(static, target_is_directory=True)
    monkeypatch.setenv("CURATE_CACHE_DIR", str(cache))
    assert cache_dir() == cache
    pool = tmp_path / "pool"
    pool.mkdir()
    for name, n in (("gsm8k_train.jsonl", 200), ("gpteacher_codegen.jsonl", 100)):
        (pool / name).write_text("\n".join((SAMPLE / name).read_text().splitlines()[:n]) + "\n")
    recipe = load_recipe(None, {"inputs": [str(pool)], "out": str(tmp_path / "run"), "seed": 0,
                                "score.scorers": ["heuristics", "perplexity"], "embed.model": "minilm-static",
                                "score.model": "proxy", "select.budget": 50, "report": False})
    stages = {s.stage: s for s in plan(recipe, prefect=False)}
    assert "one-off: train the proxy LM" in stages and "one-off: distil the static embedder" not in stages
    planned = sum(s.seconds for name, s in stages.items() if name != "one-off: start-up (imports)")  # in process
    load_before = os.getloadavg()[1]
    t0 = time.perf_counter()
    run = run_direct(recipe)
    took = time.perf_counter() - t0
    proxy = json.loads((open(os.path.join(run.manifest["proxy_model"], "curate_proxy.json"))).read())
    trained = proxy["train_seconds"]
    planned_train = stages["one-off: train the proxy LM"].seconds
    # stated factor: 3, on 2 idle cores. The plan is for an idle machine; on an oversubscribed one wall times
    # say nothing about it (2-thread torch under load 20 ran the 150 training steps 70x slower), so the timing
    # comparison is made only when the machine was not oversubscribed during the run.
    factor = 3.0
    busy = max(load_before, os.getloadavg()[1]) / (os.cpu_count() or 1)
    if busy <= 1.5:
        assert planned / factor <= took <= planned * factor, (planned, took)
        assert planned_train / factor <= trained <= planned_train * factor, (planned_train, trained)
    else:
        warnings.warn(f"machine oversubscribed (load/cores {busy:.1f}): timing not compared "
                      f"(planned {planned:.0f} s, took {took:.0f} s)", stacklevel=1)
    # the run folder now pins its proxy: planning it again prices no training
    assert "one-off: train the proxy LM" not in {s.stage for s in plan(recipe, prefect=False)}


def test_plan_prices_an_eval_with_the_dry_run_formula():
    """`curate plan --eval`: one row per arm (calls = units), priced by `curate eval --dry-run`'s formula at the
    assumed SmolLM2 rates; the trained arms grow with the budget, the untuned student does not."""
    from curate.eval import EvalConfig, unit_cost
    from curate.plan import EVAL_BYTES_PER_TOKEN, EVAL_RATES, count_rows, eval_plan

    def priced(budget: int) -> dict:
        recipe = load_recipe(None, {"inputs": [str(SAMPLE)], "select.budget": budget})
        return {s.stage.split(" ")[0]: s for s in eval_plan(recipe) if s.stage.startswith("eval:")}

    small, large = priced(300), priced(600)
    assert list(small) == ["eval:selected", "eval:random_rows", "eval:random_tokens", "eval:random_length",
                           "eval:base"]
    assert sum(s.calls for s in small.values()) == 13 and small["eval:base"].calls == 1
    assert small["eval:selected"].rows == 300 and small["eval:base"].rows == 0
    rows = nbytes = 0
    for f in sorted(SAMPLE.glob("*.jsonl")):
        r, b = count_rows(str(f))
        rows, nbytes = rows + r, nbytes + b
    per_row = nbytes / rows / EVAL_BYTES_PER_TOKEN
    _, one = unit_cost(EvalConfig(), "selected", 300, 300 * per_row, 200 * per_row, 0.0, EVAL_RATES["smollm2-135m"])
    assert small["eval:selected"].seconds == pytest.approx(3 * one)
    grew = large["eval:selected"].seconds - small["eval:selected"].seconds
    assert grew == pytest.approx(3 * 300 * per_row / EVAL_RATES["smollm2-135m"]["train_tps"])
    assert large["eval:base"].seconds == small["eval:base"].seconds
    res = CliRunner().invoke(app, ["plan", str(SAMPLE), "--budget", "300", "--eval"])
    assert res.exit_code == 0, res.output
    assert "eval:random_tokens" in res.output and "eval: about" in res.output


def test_plan_measure_times_the_lm_on_pool_rows_and_prices_with_it(tmp_path):
    """`curate plan --measure`: the scoring LM (a tiny LLaMA here; SmolLM2 by default) is timed on the pool rows a
    run's sample stage times, and the LM stages are priced at that rate. On an AVX2-only CPU the assumed rate was
    6-8.5x the real one (BENCHMARKS.md, "Another CPU of the same machine kind")."""
    from curate.lm.tiny import make_tiny_model
    from curate.measure import FEEDBACK_CALIBRATION_STEPS, measure_lm_rate
    from curate.pipeline import CALIBRATION_ROWS
    from curate.plan import EVAL_BYTES_PER_TOKEN, REF_BYTES_PER_ROW, eval_plan, feedback_seconds

    lm = str(make_tiny_model(tmp_path / "lm"))
    over = {"inputs": [str(SAMPLE / "gsm8k_train.jsonl")], "score.scorers": ["heuristics", "ifd"],
            "score.model": lm, "embed.model": "minilm-static", "select.strategy": "iterative",
            "select.budget": 100, "cluster.k": 10}
    recipe = load_recipe(None, over)
    m = measure_lm_rate(recipe)
    assert m["source"] == "measured" and m["scorers"] == ["ifd"] and m["calibration_rows"] == CALIBRATION_ROWS
    assert m["rows_per_second"] > 0 and m["passes_per_second"] == pytest.approx(2 * m["rows_per_second"])
    assert m["dtype"] in ("float32", "bfloat16")
    stages = {s.stage: s for s in plan(recipe, measured=m)}
    ifd = stages["score:ifd"]
    assert ifd.calls == 2 * ifd.rows and ifd.seconds == pytest.approx(ifd.calls / m["passes_per_second"])
    assumed = {s.stage: s for s in plan(recipe)}["score:ifd"]
    assert assumed.seconds != pytest.approx(ifd.seconds)  # the measurement is what priced it
    # the iterative probe at the measured pass rate
    probe = feedback_seconds(recipe, 0, 1000, measured=m) - feedback_seconds(recipe, 0, 0, measured=m)
    assert probe == pytest.approx(1000 / m["passes_per_second"])
    assert stages["select:feedback"].seconds == pytest.approx(
        feedback_seconds(recipe, stages["select:feedback"].rows, stages["select:feedback"].calls,
                         (SAMPLE / "gsm8k_train.jsonl").stat().st_size / ifd.rows, measured=m))
    # the feedback fine-tune timed too (2 optimizer steps of its settings), and priced at that rate
    assert m["train_tps"] > 0 and m["train_calibration"]["steps"] == FEEDBACK_CALIBRATION_STEPS
    train = feedback_seconds(recipe, 300, 0, measured=m) - feedback_seconds(recipe, 0, 0, measured=m)
    assert train == pytest.approx(300 * min(512, REF_BYTES_PER_ROW / EVAL_BYTES_PER_TOKEN) / m["train_tps"])
    # --eval: a student that is the scoring model gets its unit rates measured on the same rows, and is priced so
    from curate.eval import EvalConfig, unit_cost

    kmq = load_recipe(None, {**over, "select.strategy": "kmq"})
    assert "train_tps" not in measure_lm_rate(kmq) and "eval_rates" not in measure_lm_rate(kmq, EvalConfig())
    cfg = EvalConfig(student=lm, seeds=1)
    me = measure_lm_rate(kmq, cfg)
    rates = me["eval_rates"]
    assert rates["train_tps"] > 0 and rates["forward_tps"] > 0 and rates["setup_seconds"] >= 0
    evals = {s.stage.split(" ")[0]: s for s in eval_plan(kmq, cfg, measured=me)}
    unit = evals["eval:selected"]
    tokens = 100 * (SAMPLE / "gsm8k_train.jsonl").stat().st_size / ifd.rows / EVAL_BYTES_PER_TOKEN
    held = min(cfg.heldout_rows, (ifd.rows - 100) // 4) * tokens / 100
    assert unit.seconds == pytest.approx(unit_cost(cfg, "selected", 100, tokens, held, 0.0, rates)[1], rel=1e-6)
    assert unit.seconds != pytest.approx({s.stage.split(" ")[0]: s for s in eval_plan(kmq, cfg)}[
        "eval:selected"].seconds)
    assert measure_lm_rate(load_recipe(None, {**over, "score.scorers": ["heuristics"]})) is None  # no LM to time

    cfg = tmp_path / "recipe.yaml"
    cfg.write_text(f"score:\n  model: {lm}\n  scorers: [heuristics, ifd]\n")
    res = CliRunner().invoke(app, ["plan", str(SAMPLE / "gsm8k_train.jsonl"), "--config", str(cfg), "--measure"])
    assert res.exit_code == 0, res.output
    assert "LM scoring rate measured:" in res.output and f"{CALIBRATION_ROWS} pool rows" in res.output
    assert "feedback fine-tune" not in res.output  # kmq: nothing is fine-tuned
    (tmp_path / "broken.jsonl").write_text('{"instruction": "hi"\n')  # every row rejected: one clear line, exit 2
    res = CliRunner().invoke(app, ["plan", str(tmp_path / "broken.jsonl"), "--config", str(cfg), "--measure"])
    assert res.exit_code == 2 and "were rejected (malformed_json 1)" in res.output, res.output
    assert "curate-plan-" not in res.output and "curate ingest" in res.output  # not the deleted throwaway folder
