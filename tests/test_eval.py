"""`curate eval` on the tiny real LLaMA: arm sizes, assistant-only loss, determinism, resume, a planted signal,
the dry-run estimate against the real time, and the CLI."""

from __future__ import annotations

import json
import re
import time
from dataclasses import replace

import numpy as np
import polars as pl
import pytest
from conftest import ROOT
from typer.testing import CliRunner

from curate.config import load_recipe
from curate.eval import (
    EvalConfig,
    PoolLengths,
    calibrate,
    draw_length_matched,
    draw_random_tokens,
    estimate,
    final_answer,
    fit_to_minutes,
    length_bin_edges,
    plan_eval,
    predicted_answer,
    run_eval,
    run_unit,
    token_lengths,
    training_chat_template,
)
from curate.pipeline import run_direct

SAMPLE = ROOT / "data" / "sample"
# threads=1: on a loaded 2-core machine one thread is several times faster for a model this small
TINY = dict(seeds=2, lr=3e-3, batch_size=8, max_length=128, threads=1, dtype="float32", heldout_rows=24,
            accuracy_rows=0, gen_tokens=16, bootstrap=400)


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from curate.lm.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("lm") / "tiny")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A real run: 200 GSM8K + 100 code rows (and one near-copy for SemDeDup), 24 selected by `random`."""
    d = tmp_path_factory.mktemp("pool")
    gsm = (SAMPLE / "gsm8k_train.jsonl").read_text().splitlines()[:200]
    near = json.loads(gsm[3])
    near["answer"] = near["answer"].replace(".", " .", 1)
    (d / "gsm.jsonl").write_text("\n".join([*gsm, json.dumps(near)]) + "\n")
    (d / "code.jsonl").write_text("\n".join((SAMPLE / "gpteacher_codegen.jsonl").read_text().splitlines()[:100]) + "\n")
    out = tmp_path_factory.mktemp("runs") / "a"
    run_direct(load_recipe(None, {"inputs": [str(d)], "out": str(out), "seed": 0, "score.scorers": ["heuristics"],
                                  "embed.model": "minilm-static", "select.strategy": "random",
                                  "select.budget": 24, "report": False}))
    return out


@pytest.fixture(scope="module")
def cfg(tiny_lm):
    return EvalConfig(student=tiny_lm, **TINY)


@pytest.fixture(scope="module")
def plan(run_dir, cfg):
    return plan_eval(run_dir, cfg)


@pytest.fixture(scope="module")
def evaluated(run_dir, plan):
    """The whole default eval (5 arms x 2 seeds) after a calibration; wall time and estimate recorded."""
    est = estimate(plan, calibrate(plan))
    t0 = time.perf_counter()
    doc = run_eval(run_dir, plan=plan)
    return doc, est, time.perf_counter() - t0


def test_pool_is_records_minus_semantic_duplicates_and_heldout(run_dir, plan):
    recs = pl.read_parquet(run_dir / "records.parquet", columns=["id"])
    sem = pl.read_parquet(run_dir / "semdedup.parquet", columns=["id"])
    assert sem.height >= 1  # the near-copy
    held = set(plan.references[0].ids)
    assert plan.references[0].name == "heldout" and len(held) == 24
    expected = set(recs["id"]) - set(sem["id"]) - held
    assert set(plan.pool["id"]) == expected
    assert not held & set(plan.selected["id"])  # the held-out slice is outside the subset
    for (arm, _), ids in plan.arms.items():
        assert not held & set(ids), arm  # and no arm trains on it


def test_auto_dtype_is_the_scoring_engines_choice(run_dir, cfg):
    """`--dtype auto` trains in what `score.dtype: auto` scores in on this machine (one decider,
    `curate.lm.hf.dtype_choice`), and the plan records that concrete dtype."""
    from curate.lm.hf import dtype_choice

    assert plan_eval(run_dir, replace(cfg, dtype="auto")).dtype == dtype_choice("auto")["dtype"]


def test_arms_have_the_promised_sizes(plan):
    sel = plan.selected
    target = int(sel["tokens"].sum())
    tokens = dict(zip(plan.pool["id"], plan.pool["tokens"], strict=True))
    for seed in range(2):
        assert len(plan.arms[("random_rows", seed)]) == sel.height  # equal rows: exact
        ids = plan.arms[("random_tokens", seed)]
        total = sum(tokens[i] for i in ids)
        assert abs(total - target) <= max(tokens[i] for i in ids), (total, target)  # within one row's tokens
        lm = plan.arms[("random_length", seed)]
        edges = length_bin_edges(sel["tokens"].to_list(), 10)
        hist = np.bincount(np.searchsorted(edges, [tokens[i] for i in lm], side="right"), minlength=len(edges) + 1)
        want = np.bincount(np.searchsorted(edges, sel["tokens"].to_list(), side="right"), minlength=len(edges) + 1)
        assert hist.tolist() == want.tolist()  # the same token-length histogram
        assert plan.arm_info[("random_length", seed)]["moved_rows"] == 0
    assert plan.arms[("random_rows", 0)] != plan.arms[("random_rows", 1)]  # seeds draw differently
    assert plan.arms[("base", 0)] == [] and ("base", 1) not in plan.arms


def test_random_tokens_prefix_is_closest_to_target():
    ids = [str(i) for i in range(200)]
    toks = np.random.default_rng(0).integers(5, 400, size=200).tolist()
    for target in (1, 399, 5000, 20000):
        chosen = draw_random_tokens(ids, toks, target, seed=3)
        total = sum(toks[int(i)] for i in chosen)
        assert abs(total - target) <= max(toks[int(i)] for i in chosen)
    with pytest.raises(ValueError, match="pool has"):
        draw_random_tokens(ids, toks, sum(toks) + 1, seed=0)


def test_draws_tokenize_only_the_rows_they_visit(tiny_lm):
    """The planner tokenizes the pool as the draws reach its rows (`PoolLengths`): the same random_tokens draw as
    the whole pool's lengths give, the same length histogram, and a fraction of a 3,000-row pool tokenized (a
    1M-row pool is never tokenized whole)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm)
    rng = np.random.default_rng(0)
    words = "the a cat sat on mat and ran far away with its friend today".split()
    convs = [[{"role": "user", "content": " ".join(rng.choice(words, rng.integers(2, 12)))},
              {"role": "assistant", "content": " ".join(rng.choice(words, rng.integers(1, 60)))}] for _ in range(3000)]
    messages = pl.Series("messages", convs)
    ids = [f"r{i:05d}" for i in range(3000)]
    full = token_lengths(tok, convs, 128)
    subset = full[:800]  # an 800-row "subset" (its prefix spans two chunks): its token total and length histogram
    pos = {i: k for k, i in enumerate(ids)}
    for seed in range(3):
        lazy = PoolLengths(tok, messages, 128)
        got = draw_random_tokens(ids, lazy, sum(subset), seed)
        assert got == draw_random_tokens(ids, full, sum(subset), seed)
        assert abs(sum(full[pos[i]] for i in got) - sum(subset)) <= max(full)  # within one row's tokens
        assert lazy.tokenized in (1024, 1536), lazy.tokenized  # the chunks its prefix reached, not the pool
    lazy = PoolLengths(tok, messages, 128)
    got, info = draw_length_matched(ids, lazy, subset, 10, 0)
    edges = np.asarray(info["bin_edges"])
    hist = np.bincount(np.searchsorted(edges, [full[pos[i]] for i in got], side="right"), minlength=len(edges) + 1)
    assert hist.tolist() == info["subset_histogram"] and info["moved_rows"] == 0
    assert lazy.tokenized <= 2048, lazy.tokenized
    known = np.flatnonzero(lazy.known >= 0)
    assert lazy.known[known].tolist() == [full[i] for i in known]  # what it tokenized, it tokenized right
    with pytest.raises(ValueError, match="pool has"):
        draw_random_tokens(ids, PoolLengths(tok, messages, 128), sum(full) + 1, 0)


def test_plans_are_deterministic(run_dir, cfg, plan):
    again = plan_eval(run_dir, cfg)
    assert again.arms == plan.arms
    assert [r.ids for r in again.references] == [r.ids for r in plan.references]


def test_prompt_tokens_get_no_loss(tiny_lm, run_dir, cfg):
    """The batches SFTTrainer trains on have labels exactly on assistant content + <|im_end|>."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(tiny_lm)
    tok.chat_template = training_chat_template(tok)
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "2 + 2 = 4."}, {"role": "user", "content": "And 3 + 3?"},
            {"role": "assistant", "content": "It is 6."}]
    args = SFTConfig(output_dir=str(run_dir / "tmp-sft"), assistant_only_loss=True, max_length=128, report_to=[],
                     use_cpu=True, per_device_train_batch_size=1)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_lm), args=args, processing_class=tok,
                         train_dataset=datasets.Dataset.from_list([{"messages": conv}]))
    batch = next(iter(trainer.get_train_dataloader()))
    labels = batch["labels"][0]
    trained = tok.decode(labels[labels != -100])
    assert trained == "2 + 2 = 4.<|im_end|>It is 6.<|im_end|>"
    # and the template renders exactly what the model's own template renders
    own = type(tok).from_pretrained(tiny_lm)
    assert tok.apply_chat_template(conv, tokenize=False) == own.apply_chat_template(conv, tokenize=False)


def test_smollm2_template_gets_generation_markers():
    from transformers import AutoTokenizer

    from curate.eval import resolve_student

    try:
        path = resolve_student("smollm2-135m")
    except ValueError as e:
        pytest.skip(f"packaged SmolLM2 not installed: {e}")
    tok = AutoTokenizer.from_pretrained(path)
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    t = training_chat_template(tok)
    out = tok.apply_chat_template(conv, chat_template=t, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    ids = [i for i, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert tok.decode(ids) == "Hello!<|im_end|>"
    assert "You are a helpful AI assistant named SmolLM" in tok.apply_chat_template(conv, tokenize=False,
                                                                                      chat_template=t)


def test_eval_reports_every_arm_with_intervals(evaluated, plan):
    doc, _, _ = evaluated
    e = doc["references"]["heldout"]
    assert set(e["loss"]) == {"selected", "random_rows", "random_tokens", "random_length", "base"}
    for arm, v in e["loss"].items():
        assert v["ci"][0] <= v["mean"] <= v["ci"][1], arm
        assert len(v["seeds"]) == (1 if arm == "base" else 2)
    for a in ("selected", "random_rows", "random_tokens", "random_length"):  # every fine-tune learned something
        assert max(e["loss"][a]["seeds"]) < e["loss"]["base"]["mean"], (a, e["loss"][a], e["loss"]["base"])
        d = e["diff"][f"{a} - base"]  # (with 2 seeds the Welch part of its interval has 1 degree of freedom)
        assert d["ci"][0] <= d["mean"] < 0 and d["verdict"] != "worse", d
    assert {"selected - random_rows", "selected - random_tokens", "selected - random_length"} <= set(e["diff"])
    assert doc["verdict"] in ("better", "no different", "worse", "mixed")
    assert doc["verdict_line"].startswith("selected vs random at equal tokens: ")
    assert json.loads((plan.run_dir / "eval.json").read_text())["references"] == doc["references"]
    assert doc["executor"]["kind"] == "local" and len(doc["executor"]["units"]) == 9


def test_resumed_eval_is_identical_and_skips_finished_units(evaluated, run_dir, plan):
    doc, _, _ = evaluated
    victim = plan.unit_path("random_tokens", 1)
    keep = plan.unit_path("selected", 0)
    mtime = keep.stat().st_mtime_ns
    before = json.loads(victim.read_text())
    victim.unlink()  # as if the eval was killed in this unit
    again = run_eval(run_dir, plan=plan)
    assert keep.stat().st_mtime_ns == mtime  # finished units are not redone
    assert [k for k, v in again["executor"]["units"].items() if v != "Cached"] == ["random_tokens-seed1"]
    after = json.loads(victim.read_text())
    assert after["references"] == before["references"]  # the re-trained unit: same numbers, bit for bit
    assert again["references"] == doc["references"]


def test_dry_run_prices_only_the_units_left(evaluated, run_dir, plan, tiny_lm):
    """A resumed eval is priced at its remaining units: finished ones are read back (the dry run says so), and a
    unit file written with other settings is run again, not trusted."""
    from curate.cli import app

    est = estimate(plan, calibrate(plan))
    assert {u["state"] for u in est["units"].values()} == {"done"} and est["seconds"] == 0 < est["seconds_all"]
    victim, stale = plan.unit_path("random_rows", 1), plan.unit_path("base", 0)
    saved = {p: p.read_text() for p in (victim, stale)}
    try:
        victim.unlink()
        stale.write_text(json.dumps({**json.loads(saved[stale]), "key": "written-with-other-settings"}))
        est = estimate(plan, calibrate(plan))
        states = {k: u["state"] for k, u in est["units"].items()}
        assert states.pop("random_rows-seed1") == "todo" and states.pop("base-seed0") == "stale"
        assert set(states.values()) == {"done"}
        left = est["units"]["random_rows-seed1"]["seconds"] + est["units"]["base-seed0"]["seconds"]
        assert est["seconds"] == pytest.approx(left, abs=0.11)
        res = CliRunner().invoke(app, ["eval", str(run_dir), "--student", tiny_lm, "--dry-run", "--seeds", "2",
                                       "--lr", "0.003", "--batch-size", "8", "--max-length", "128", "--threads", "1",
                                       "--dtype", "float32", "--heldout", "24", "--accuracy-rows", "0",
                                       "--gen-tokens", "16"])
        text = " ".join(res.output.split())
        assert res.exit_code == 0, res.output
        assert "for 2 of 9 units (7 finished units are read back)" in text, text
        assert "other settings: run again" in text
    finally:
        for p, text in saved.items():
            p.write_text(text)


def test_finished_units_correct_a_calibration_taken_on_a_busy_machine(evaluated, plan):
    """A calibration is cached: one measured while the machine was busy (rates 10x too slow here) would price
    every later unit 10x high. Once units have finished, their real times set the price of the rest."""
    calib = calibrate(plan)
    busy = {**calib, "setup_seconds": calib["setup_seconds"] * 10, "train_tps": calib["train_tps"] / 10,
            "forward_tps": calib["forward_tps"] / 10, "generate_tps": calib["generate_tps"] / 10}
    victim = plan.unit_path("random_tokens", 1)
    saved = victim.read_text()
    real = json.loads(saved)["seconds"]
    try:
        victim.unlink()
        est = estimate(plan, busy)
        unit = est["units"]["random_tokens-seed1"]
        assert est["scale"]["from_units"] == 8 and est["scale"]["factor"] < 1
        assert unit["calibrated_seconds"] > 2 * unit["seconds"]  # the busy calibration alone: far too high
        assert 0.25 <= real / unit["seconds"] <= 4.0, (real, unit)  # the stated factor of the dry-run test
        assert est["seconds"] == unit["seconds"]
    finally:
        victim.write_text(saved)
    fresh = estimate(replace(plan, run_dir=plan.run_dir.parent / "no-such-run"), busy)
    assert fresh["scale"] == {"factor": 1.0, "from_units": 0}  # nothing finished: the calibration as it is


def test_minutes_leave_out_the_least_telling_units_first(evaluated, plan, run_dir, tiny_lm, tmp_path):
    """`--minutes`: random_rows goes first, then seeds, then random_length, then base; selected and random_tokens
    stay, and when one seed of them does not fit it stops before any work. Finished units cost nothing."""
    from curate.cli import app
    from curate.eval import unit_done, write_eval

    doc, _, _ = evaluated
    est = estimate(plan, calibrate(plan))
    for name, u in est["units"].items():  # every unit left to run, trained ones 100 s, the untuned one 10 s
        u.update(state="todo", seconds=10.0 if name.startswith("base") else 100.0)
    for minutes, arms, seeds, left in [
        (13.5, ("selected", "random_rows", "random_tokens", "random_length", "base"), 2, []),  # 810 s: all of it
        (11, ("selected", "random_tokens", "random_length", "base"), 2, ["random_rows"]),  # 610 s
        (6, ("selected", "random_tokens", "random_length", "base"), 1, ["random_rows", "seeds 2 -> 1"]),  # 310 s
        (3.55, ("selected", "random_tokens", "base"), 1, ["random_rows", "random_length", "seeds 2 -> 1"]),
        (3.4, ("selected", "random_tokens"), 1, ["random_rows", "random_length", "base", "seeds 2 -> 1"]),  # 200 s
    ]:
        fit = fit_to_minutes(plan, est, minutes)
        assert (fit.config.arms, fit.config.seeds, fit.fitted["left_out"]) == (arms, seeds, left), minutes
        assert sorted(fit.arms) == sorted(fit.config.units()) and set(fit.arm_info) == set(fit.arms)
        assert all(fit.arms[k] == plan.arms[k] and fit.unit_key(*k) == plan.unit_key(*k) for k in fit.arms)
        assert fit.fitted["seconds"] <= minutes * 60
    with pytest.raises(ValueError, match=r"--minutes 3: the smallest eval .*selected, random_tokens.* about 3 min"):
        fit_to_minutes(plan, est, 3)
    est["units"]["selected-seed0"]["state"] = "done"  # read back: free, so the same 3 minutes now buy more
    assert fit_to_minutes(plan, est, 3).config.arms == ("selected", "random_tokens", "base")

    # a one-seed eval says what its intervals leave out (written to a copy: the module's eval.json stays)
    one = fit_to_minutes(plan, est, 6)
    results = {k: unit_done(one, *k) for k in one.units()}
    one_doc = write_eval(replace(one, run_dir=tmp_path), results, 0.0)
    assert one_doc["fitted"]["left_out"] == ["random_rows", "seeds 2 -> 1"] and one_doc["config"]["seeds"] == 1
    assert "One seed per arm" in one_doc["verdict_line"] and "One seed" not in doc["verdict_line"]
    # ... and a two-seed one (the module's eval) that its seed part is very wide
    assert "Two seeds per arm" in doc["verdict_line"] and "Two seeds" not in one_doc["verdict_line"]

    base = ["eval", str(run_dir), "--student", tiny_lm, "--dry-run", "--seeds", "2", "--lr", "0.003", "--batch-size",
            "8", "--max-length", "128", "--threads", "1", "--dtype", "float32", "--heldout", "24",
            "--accuracy-rows", "0", "--gen-tokens", "16"]
    res = CliRunner().invoke(app, [*base, "--minutes", "1"])  # every unit finished: all of it fits
    assert res.exit_code == 0 and "--minutes 1: left out nothing" in " ".join(res.output.split()), res.output
    res = CliRunner().invoke(app, [*base, "--minutes", "0"])
    assert res.exit_code == 2 and "--minutes must be > 0" in res.output
    other = [a if a != "128" else "96" for a in base]  # another max length: nothing finished, nothing fits
    res = CliRunner().invoke(app, [*other, "--minutes", "0.001"])
    assert res.exit_code == 2 and "the smallest eval that gives a verdict" in " ".join(res.output.split())
    assert "Traceback" not in res.output


def test_fine_tune_is_deterministic_per_seed(plan):
    a = run_unit(plan, "random_rows", 0, force=True)
    b = json.loads(plan.unit_path("random_rows", 0).read_text())
    assert a["references"] == b["references"]
    c = run_unit(plan, "random_rows", 1)
    assert c["references"]["heldout"]["nll"] != a["references"]["heldout"]["nll"]  # another seed, another model


def test_dry_run_estimate_is_within_a_factor_of_the_real_time(evaluated):
    """The estimate comes from a short calibration fine-tune; stated factor: 4x either way (the CI machine is
    shared, so the rates measured in the calibration drift while the eval runs)."""
    doc, est, wall = evaluated
    ratio = wall / est["seconds"]
    assert 0.25 <= ratio <= 4.0, (wall, est["seconds"])
    assert len(est["units"]) == len(doc["arms"]) == 9


def test_planted_reference_is_seen(run_dir, tiny_lm, tmp_path):
    """The subset IS the reference set: training on it must beat random at equal tokens, clearly."""
    sel = pl.read_parquet(run_dir / "selected.parquet", columns=["messages"])
    ref = tmp_path / "planted.jsonl"
    ref.write_text("".join(json.dumps({"messages": m}) + "\n" for m in sel["messages"].to_list()))
    out = tmp_path / "run"
    out.mkdir()
    for name in ("records.parquet", "semdedup.parquet", "selected.parquet"):
        (out / name).write_bytes((run_dir / name).read_bytes())
    # 3 seeds, the default: with 2 the Welch part of the interval has ~1 degree of freedom (t = 12.7)
    cfg = EvalConfig(student=tiny_lm, **{**TINY, "arms": ("selected", "random_tokens"), "epochs": 12.0,
                                               "lr": 5e-3, "seeds": 3})
    doc = run_eval(out, cfg, [str(ref)])
    e = doc["references"]["planted"]
    assert e["rows"] == sel.height
    d = e["diff"]["selected - random_tokens"]
    # the interval excludes zero and the mean gain is large (random arms differ by ~0): the eval sees it
    assert d["verdict"] == "better" and d["ci"][1] < 0 and d["mean"] < -0.1, (d, e["loss"])
    assert doc["verdict"] == "better"
    # the reference rows are in the subset: the eval says so
    assert doc["arms"]["selected-seed0"]["reference_overlap"] == sel.height


def test_reference_rows_that_are_not_conversations_are_counted_not_lost(tmp_path):
    """A malformed line or a row without an answer is skipped with its reason and place (eval.json and the CLI
    show it), as ingest rejects it; a file with nothing usable is an error naming the first bad row."""
    from curate.eval import load_reference

    good = json.dumps({"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]})
    f = tmp_path / "ref.jsonl"
    f.write_text("\n".join([good, "{not json", json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
                             good.replace("4", "four")]) + "\n")
    ref = load_reference(str(f))
    assert len(ref.convs) == 2 and sum(ref.skipped.values()) == 2, ref.skipped
    assert ref.skipped["malformed_json"] == 1 and ref.skipped_example.startswith("ref.jsonl:2: invalid JSON")
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="bad.jsonl:1: invalid JSON"):
        load_reference(str(tmp_path / "bad.jsonl"))


def test_exact_match_answers():
    assert final_answer("so 48+24 = 72 clips.\n#### 72") == "72"
    assert final_answer("#### 1,200") == "1200"
    assert final_answer("no answer marker") is None
    assert predicted_answer("The answer is $1,200.") == "1200"
    assert predicted_answer("... #### 7.0") == "7"
    assert predicted_answer("nothing") is None


def test_accuracy_on_a_qa_reference(run_dir, tiny_lm, tmp_path):
    gsm = tmp_path / "gsm_test.jsonl"
    gsm.write_text("\n".join((SAMPLE / "gsm8k_train.jsonl").read_text().splitlines()[-12:]) + "\n")
    cfg = EvalConfig(student=tiny_lm, **{**TINY, "arms": ("base",), "accuracy_rows": 4})
    out = tmp_path / "run"
    out.mkdir()
    for name in ("records.parquet", "semdedup.parquet", "selected.parquet"):
        (out / name).write_bytes((run_dir / name).read_bytes())
    doc = run_eval(out, cfg, [str(gsm)])
    acc = doc["references"]["gsm_test"]["accuracy"]
    assert acc["rows"] == 4 and 0.0 <= acc["arms"]["base"]["mean"] <= 1.0


def test_cli_dry_run_and_errors(run_dir, tiny_lm, tmp_path):
    from curate.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["eval", str(run_dir), "--student", tiny_lm, "--dry-run", "--threads", "1",
                              "--max-length", "128", "--accuracy-rows", "0", "--seeds", "2"])
    assert res.exit_code == 0, res.output
    assert "estimated time" in res.output and "random_tokens seed 1" in res.output
    ref = tmp_path / "ref.jsonl"
    ref.write_text("\n".join((SAMPLE / "gsm8k_train.jsonl").read_text().splitlines()[-30:] + ["{oops"]) + "\n")
    res = runner.invoke(app, ["eval", str(run_dir), "--student", tiny_lm, "--dry-run", "--threads", "1",
                              "--max-length", "128", "--accuracy-rows", "0", "--seeds", "2", "-r", str(ref)])
    assert res.exit_code == 0, res.output
    assert "ref: 1 row skipped (malformed_json: 1), e.g. ref.jsonl:31: invalid JSON" in " ".join(res.output.split())
    res = runner.invoke(app, ["eval", str(tmp_path), "--student", tiny_lm, "--dry-run"])
    assert res.exit_code == 2 and "records.parquet: missing" in " ".join(res.output.split())
    res = runner.invoke(app, ["eval", str(run_dir), "--student", tiny_lm, "--arms", "selected,bogus"])
    assert res.exit_code == 2 and "unknown arm" in " ".join(res.output.split())


def test_config_is_checked():
    with pytest.raises(ValueError, match="seeds"):
        EvalConfig(seeds=0)
    with pytest.raises(ValueError, match="gen_tokens"):
        replace(EvalConfig(), max_length=64, gen_tokens=64)
    with pytest.raises(ValueError, match="micro-batch"):
        EvalConfig(micro_batch=0)


def test_lora_fine_tune_merges_and_learns(plan, tiny_lm):
    from curate.eval import _engine, finetune
    from curate.lm.evaluate import response_losses

    convs = plan.references[0].convs[:8]
    cfg = replace(plan.config, lora=True, lora_r=8, epochs=6.0, lr=2e-2)
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, tok, stats = finetune(tiny_lm, convs, cfg, 0, dtype="float32")
    # curate's trainer arguments use current names (the old one warned on every fine-tune; peft's own
    # `is_gradient_checkpointing` warning on the LoRA path is not curate's to fix)
    assert not [w for w in caught if str(w.message).startswith("`gradient_checkpointing`")], caught
    assert not any("lora" in n for n, _ in model.named_parameters())  # merged back into a plain model
    tuned = response_losses(_engine(tiny_lm, model, tok, cfg, "float32"), convs)
    base = response_losses(_engine(tiny_lm, None, None, cfg, "float32"), convs)
    assert tuned[0].sum() / tuned[1].sum() < base[0].sum() / base[1].sum() - 0.05
    assert stats["steps"] == 6


def test_micro_batches_and_both_losses_train_the_same_model(plan, tiny_lm):
    """Micro-batches (what a CPU fine-tune uses for speed) accumulate to the same optimizer steps as one batch:
    same rows per step, loss normalised over the step's tokens. Fails if each micro-batch were averaged on its
    own (rows of unequal length would then weigh differently). The model's own loss (a CPU's default, faster)
    and TRL's fused LM head (a GPU's) train the same model too."""
    import torch
    from transformers import AutoModelForCausalLM

    from curate.eval import finetune
    from curate.lm.finetune import FinetuneConfig, loss_kind, micro_batch

    assert micro_batch(FinetuneConfig(batch_size=8)) == 2  # the CPU default
    assert micro_batch(FinetuneConfig(batch_size=6, micro_batch=4)) == 3  # a divisor of the batch
    assert micro_batch(FinetuneConfig(batch_size=1)) == 1
    assert loss_kind(FinetuneConfig()) == ("trl" if torch.cuda.is_available() else "model")
    with pytest.raises(ValueError, match="loss must be"):
        EvalConfig(loss="fused")
    convs = plan.references[0].convs[:16]
    lengths = {sum(len(m["content"]) for m in c) for c in convs}
    assert len(lengths) > 4  # rows of unequal length, or the test could not fail
    out = {}
    for loss in ("trl", "model"):
        for micro in (8, 2):
            cfg = replace(plan.config, epochs=1.0, lr=1e-2, batch_size=8, micro_batch=micro, loss=loss)
            model, _, stats = finetune(tiny_lm, convs, cfg, 0, dtype="float32")
            assert stats["steps"] == 2 and stats["micro_batch"] == micro and stats["loss"] == loss
            out[loss, micro] = (stats["train_loss"], torch.cat([p.detach().flatten() for p in model.parameters()]))
    base = torch.cat([p.detach().flatten() for p in AutoModelForCausalLM.from_pretrained(tiny_lm).parameters()])
    ref_loss, ref = out["trl", 8]
    moved = (ref - base).abs().max()
    assert moved > 1e-3  # the steps changed the model
    for key, (train_loss, params) in out.items():
        assert train_loss == pytest.approx(ref_loss, abs=1e-4), key
        assert (params - ref).abs().max() < 1e-3 * moved, key


def test_overall_verdict_is_corrected_for_several_comparisons():
    """One reference set whose 95% interval just excludes zero, among several that do not, is not 'better'
    overall: the overall verdict uses Bonferroni-widened intervals from the same bootstrap."""
    import numpy as np

    from curate.eval import _ci, _verdict, verdict_line

    rng = np.random.default_rng(0)
    boot = rng.normal(-0.006, 0.0027, 20000)  # 95% CI about [-0.0113, -0.0007]: 'better' on its own
    ci95, ci_fam = _ci(boot), _ci(boot, alpha=0.05 / 4)
    assert ci95[1] < 0 < ci_fam[1] and ci_fam[0] < ci95[0]

    def entry(b: np.ndarray, m: int) -> dict:
        ci = _ci(b)
        fam = _ci(b, alpha=0.05 / m)
        return {"diff": {"selected - random_tokens": {"mean": float(b.mean()), "ci": ci, "verdict": _verdict(ci, -1),
                                                       "family": {"ci": fam, "verdict": _verdict(fam, -1)}}}}

    flat = [rng.normal(0.0, 0.003, 20000) for _ in range(3)]
    summary = {"a": entry(boot, 4), **{f"r{i}": entry(b, 4) for i, b in enumerate(flat)}}
    assert summary["a"]["diff"]["selected - random_tokens"]["verdict"] == "better"
    overall, line = verdict_line(summary)
    assert overall == "no different", line
    assert "over 4 comparisons, Bonferroni" in line
    assert "better on a at 95% only, no different after the correction (loss" in line, line
    assert "no different on r0" in line and "after the correction on r0" not in line, line
    # a difference far beyond every interval stays 'better' after the correction
    strong = rng.normal(-0.05, 0.003, 20000)
    overall, line = verdict_line({"a": entry(strong, 4), **{f"r{i}": entry(b, 4) for i, b in enumerate(flat)}})
    assert overall == "better" and "same lengths" not in line
    # ... and the line says when length-matched random does as well: the gain is length, not the selection
    for length_diff, named in ((flat[0], True), (strong, False)):
        a = entry(strong, 4)
        a["diff"]["selected - random_length"] = {"mean": float(length_diff.mean()), "ci": _ci(length_diff),
                                                 "verdict": _verdict(_ci(length_diff), -1)}
        overall, line = verdict_line({"a": a, **{f"r{i}": entry(b, 4) for i, b in enumerate(flat)}})
        assert overall == "better"
        assert ("no better than random rows with the same lengths on a " in line) is named, line


def test_difference_interval_covers_the_spread_between_random_draws():
    """Three random draws that happen to agree must not make a 'better' that the next draws could undo: the
    difference's interval adds the arms' seed spread as a Welch t-interval, where resampling three seeds never
    went past the extreme ones. The same gain against tightly agreeing draws, or a large one, stays 'better'."""
    from pathlib import Path

    import numpy as np
    import polars as pl

    from curate.eval import EvalConfig, EvalPlan, Reference, summarize, verdict_line

    rng = np.random.default_rng(0)
    n = 300
    tok = rng.integers(20, 200, n).astype(float)
    row_loss = rng.normal(2.0, 0.3, n)  # per-token loss of each reference row, shared by every arm

    def run(gain: float, random_spread: float) -> dict:
        offsets = {"selected": [-gain - 0.0005, -gain, -gain + 0.0005],
                   "random_tokens": [random_spread, 0.0, -random_spread], "base": [0.3]}
        results = {(a, k): {"references": {"ref": {"nll": ((row_loss + o) * tok).tolist(), "tokens": tok.tolist()}}}
                   for a, offs in offsets.items() for k, o in enumerate(offs)}
        ref = Reference(name="ref", convs=[[]] * n, ids=[str(i) for i in range(n)])
        plan = EvalPlan(run_dir=Path("."), config=EvalConfig(student="none"), student="none", pool=pl.DataFrame(),
                        selected=pl.DataFrame(), references=[ref], arms={}, arm_info={}, dtype="float32")
        return summarize(plan, results)["ref"]["diff"]

    # the old interval (rows and 3 seeds resampled) was about [-0.009, -0.001] here: 'better'
    d = run(gain=0.005, random_spread=0.004)["selected - random_tokens"]
    assert abs(d["mean"] + 0.005) < 1e-5
    assert d["verdict"] == "no different" and d["ci"][0] < -0.012 and d["ci"][1] > 0.003, d
    assert run(gain=0.005, random_spread=0.0005)["selected - random_tokens"]["verdict"] == "better"
    assert run(gain=0.05, random_spread=0.004)["selected - random_tokens"]["verdict"] == "better"
    # base is one deterministic unit: its difference widens only by the other arm's spread
    b = run(gain=0.005, random_spread=0.004)["random_tokens - base"]
    assert b["verdict"] == "better" and b["ci"][1] - b["ci"][0] < 0.03, b
    # the verdict line: a gain that holds against length-matched random but with a wide interval is not 'length'
    e = {"diff": {"selected - random_tokens": {"mean": -0.0067, "ci": [-0.0102, -0.0032], "verdict": "better"},
                  "selected - random_length": {"mean": -0.0085, "ci": [-0.0180, 0.0009], "verdict": "no different"}}}
    _, line = verdict_line({"lima": e})
    assert "the gain is the rows' length" not in line and "not yet shown not to be length" in line, line


def test_killed_prefect_eval_resumes_at_its_unit(evaluated, run_dir, tiny_lm, tmp_path):
    """The default executor (`curate eval`: each unit a Prefect task), SIGKILLed while it trains its second unit,
    resumes there: the finished unit is read back ("Cached"), the rest run, and every unit's numbers are the
    in-process eval's (`evaluated`, same settings), bit for bit."""
    import signal
    import subprocess
    import sys

    from test_flows import _clean_env, _seed_home

    out = tmp_path / "run"
    out.mkdir()
    for name in ("records.parquet", "semdedup.parquet", "selected.parquet"):
        (out / name).write_bytes((run_dir / name).read_bytes())
    cache = tmp_path / "cache"
    _seed_home(cache)  # offline ephemeral Prefect, as a user's second run finds it (minus the DB migration)
    # the server's start-up limit raised from curate's 120 s: on a shared 2-core machine at nice 19 it once took longer
    env = _clean_env(CURATE_CACHE_DIR=str(cache), PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="600",
                     CURATE_PROGRESS_EVERY="0")
    env["CURATE_PROGRESS"] = "1"  # progress on (_clean_env turns it off): the lines are checked below
    cmd = [sys.executable, "-m", "curate.cli", "eval", str(out), "--student", tiny_lm,
           "--arms", "selected,random_tokens", "--seeds", "2", "--lr", "3e-3", "--batch-size", "8",
           "--max-length", "128", "--threads", "1", "--dtype", "float32", "--heldout", "24",
           "--accuracy-rows", "0", "--gen-tokens", "16"]  # TINY's settings: the same unit keys
    first = out / "eval" / "selected-seed0.json"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 900
    while not first.exists():  # written atomically: it exists once complete
        assert proc.poll() is None, f"eval ended before the kill: {proc.stdout.read().decode()[-3000:]}"
        assert time.monotonic() < deadline, "the first unit never finished"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert sorted(p.name for p in (out / "eval").glob("*-seed*.json")) == ["selected-seed0.json"]
    stamp = first.stat().st_mtime_ns

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    doc = json.loads((out / "eval.json").read_text())
    assert doc["executor"] == {"kind": "prefect", "units": {
        "selected-seed0": "Cached", "selected-seed1": "Completed", "random_tokens-seed0": "Completed",
        "random_tokens-seed1": "Completed"}}
    assert first.stat().st_mtime_ns == stamp  # the finished unit was not redone
    for name in doc["executor"]["units"]:
        a = json.loads((out / "eval" / f"{name}.json").read_text())
        b = json.loads((run_dir / "eval" / f"{name}.json").read_text())
        assert a["key"] == b["key"] and a["references"] == b["references"], name
    assert "selected vs random at equal tokens" in done.stdout
    # a CI log shows each fine-tune alive, by name, in plain step lines; a unit read back trains nothing
    lines = done.stderr.splitlines()
    for name, state in doc["executor"]["units"].items():
        arm, seed = name.rsplit("-seed", 1)
        ran = [line for line in lines if line.startswith(f"fine-tune {arm} seed {seed}: ")]
        assert bool(ran) == (state == "Completed"), (name, done.stderr[-3000:])
        if ran:
            assert re.match(rf"fine-tune {arm} seed {seed}: (\d+)/\1 \(100%\), ", ran[-1]), ran


def _copy_run(run_dir, dest):
    dest.mkdir()
    for name in ("records.parquet", "semdedup.parquet", "selected.parquet"):
        (dest / name).write_bytes((run_dir / name).read_bytes())
    return dest


@pytest.mark.parametrize("bad, message", [
    (dict(arms=()), "--arms is empty"),  # ran an eval of no unit: IndexError in the summary
    (dict(epochs=0.0), "--epochs must be > 0"),  # trained nothing and reported it as the subset's model
    (dict(max_steps=0), "--max-steps must be >= 1"),  # read as no cap
    (dict(lr=-1.0), "--lr must be > 0"),  # failed inside the calibration's optimizer
    (dict(threads=0), "--threads must be >= 1"),
    (dict(heldout_rows=0), "--heldout must be >= 1"),  # blamed the pool ("no rows outside the subset")
    (dict(reference_rows=-5), "--reference-rows must be >= 1"),
    (dict(accuracy_rows=-1), "--accuracy-rows must be >= 0"),  # qa_rows[:-1]: all but the last Q/A row
    (dict(accuracy_rows=4, gen_tokens=0), "--gen-tokens must be >= 1"),  # empty answers, or a fail after training
])
def test_settings_that_failed_late_or_meant_something_else_are_refused_first(bad, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        EvalConfig(**bad)


def test_cli_checks_arms_and_student_before_reading_the_run(tmp_path):
    """Refused before the run folder is read (tmp_path is no run): an empty --arms, and a student path that does not
    exist (the hub's "Repo id must be in the form ..." before); "selected, base" (a space) names two arms."""
    from curate.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["eval", str(tmp_path), "--arms", ",", "--dry-run"])
    assert res.exit_code == 2 and "--arms is empty" in res.output, res.output
    res = runner.invoke(app, ["eval", str(tmp_path), "--arms", "selected, base", "--student",
                              str(tmp_path / "no-model"), "--dry-run"])
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and "no-model': no such folder" in text and "unknown arm" not in text, res.output


def test_gsm8k_answer_is_the_first_marker_line():
    """A student that goes on after its answer line still answers it; a degenerate answer is wrong, not a crash
    (int(float("nan")) raised after every fine-tune had run)."""
    assert predicted_answer("48+24 = 72\n#### 72\n\nQuestion: Tom has 5 apples. #### 5") == "72"
    assert predicted_answer("#### 72 clips") == predicted_answer("#### 72<|im_end|>") == "72"
    assert final_answer("so 72.\n#### $1,200.") == "1200" and final_answer("#### 3/4") == "3/4"
    assert predicted_answer("#### nan") == "nan" and predicted_answer("#### inf") == "inf"
    assert predicted_answer("9" * 400) == "9" * 400  # float() is inf: int() raised OverflowError
    assert final_answer("####") is None
    assert final_answer("#### Step 1: add them") == "Step 1: add them"  # a markdown heading is not an answer of 1


def test_reference_sets_with_one_file_stem_keep_their_own_numbers(run_dir, tiny_lm, tmp_path):
    """`-r lima/test.jsonl -r gsm8k/test.jsonl`: both were named "test", the second's numbers replaced the
    first's and the eval reported one set of two. Each now gets its own name, in the units, eval.json and CLI."""
    from curate.cli import app
    from curate.eval import reference_names

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    lines = (SAMPLE / "gsm8k_train.jsonl").read_text().splitlines()
    (a / "test.jsonl").write_text("\n".join(lines[-12:]) + "\n")
    (b / "test.jsonl").write_text("\n".join(lines[-20:-12]) + "\n")
    refs = [str(a / "test.jsonl"), str(b / "test.jsonl")]
    assert reference_names(refs) == ["a/test", "b/test"]
    assert reference_names(["x/ref.jsonl", "x/ref.parquet", "x/gsm.jsonl"]) == ["ref.jsonl", "ref.parquet", "gsm"]
    out = _copy_run(run_dir, tmp_path / "run")
    cfg = EvalConfig(student=tiny_lm, **{**TINY, "arms": ("base",)})
    doc = run_eval(out, cfg, refs)
    assert {k: v["rows"] for k, v in doc["references"].items()} == {"a/test": 12, "b/test": 8}
    res = CliRunner().invoke(app, ["eval", str(out), "--student", tiny_lm, "--dry-run", "--arms", "base",
                                   "--seeds", "2", "--lr", "0.003", "--batch-size", "8", "--max-length", "128",
                                   "--threads", "1", "--dtype", "float32", "--heldout", "24", "--accuracy-rows", "0",
                                   "--gen-tokens", "16", "-r", refs[0], "-r", refs[1]])
    text = " ".join(res.output.split())
    assert res.exit_code == 0, res.output
    assert "reference sets: a/test (12 rows), b/test (8 rows)" in text, text
    assert "priced from 1 finished unit's real times" in text, text  # was "1 finished unit' real times"


def test_minutes_never_cut_to_an_eval_of_no_arm(run_dir, cfg):
    """`--arms random_rows,base --minutes N` too short for the untuned student: the last cut kept no arm, which
    "fit", and the eval of nothing ended in an IndexError; now it is refused before any work."""
    plan = plan_eval(run_dir, replace(cfg, arms=("random_rows", "base")))
    est = {"units": {f"{a}-seed{s}": {"seconds": 100.0, "state": "todo"} for a, s in plan.arms}}
    with pytest.raises(ValueError, match=r"smallest eval of these arms \(base, one seed\)"):
        fit_to_minutes(plan, est, 1)
    assert fit_to_minutes(plan, est, 2).config.arms == ("base",)


def test_calibration_file_cut_short_is_measured_again(run_dir, cfg, tmp_path):
    """A calibration.json a kill cut short made every later `curate eval` of the run fail on its JSON."""
    plan = plan_eval(_copy_run(run_dir, tmp_path / "run"), cfg)
    path = plan.run_dir / "eval" / "calibration.json"
    path.parent.mkdir()
    path.write_text('{"key": "')
    c = calibrate(plan)
    assert c["train_tps"] > 0 and json.loads(path.read_text()) == c


def test_a_subset_holding_reference_rows_is_warned(run_dir, tiny_lm, tmp_path):
    """Reference rows inside the subset: the selected arm trains on them, the random arms never do (the pool
    leaves them out), so its "better" there is memorisation. The verdict line says so (before: only a number in
    eval.json's arms)."""
    from curate.eval import overlap_note

    sel = pl.read_parquet(run_dir / "selected.parquet", columns=["messages"])
    ref = tmp_path / "leak.jsonl"
    ref.write_text("".join(json.dumps({"messages": m}) + "\n" for m in sel["messages"].to_list()[:5]))
    out = _copy_run(run_dir, tmp_path / "run")
    cfg = EvalConfig(student=tiny_lm, **{**TINY, "arms": ("selected",), "seeds": 1})
    plan = plan_eval(out, cfg, [str(ref)])
    assert overlap_note(plan).startswith(f"Warning: 5 of the subset's {sel.height} rows are reference rows")
    doc = run_eval(out, plan=plan)
    assert "Warning: 5 of the subset's" in doc["verdict_line"]
    assert overlap_note(plan_eval(out, cfg)) == ""  # the held-out slice is never in the subset


def test_rows_with_long_prompts_train_on_their_answers_and_are_counted(plan, tmp_path):
    """TRL keeps a row's first max_length tokens and drops a row left with no response token: such rows trained
    nothing yet counted in their arm's rows and tokens, silently. The fine-tune now cuts the prompt's start (as the
    loss measurement does), so every row trains on its answer; the plan counts those rows and the dry run says so."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from curate.eval import _plain, long_prompt_note
    from curate.lm.finetune import FinetuneConfig, keep_responses, sft_trainer

    info = plan.arm_info[("selected", 0)]
    assert info.get("long_prompt_rows", 0) > 0, info  # GSM8K prompts fill 128 tiny-tokenizer tokens
    tok = AutoTokenizer.from_pretrained(plan.student)
    tok.chat_template = training_chat_template(tok)
    convs = [_plain(m) for m in plan.rows("selected", 0)["messages"].to_list()]
    trainer = sft_trainer(AutoModelForCausalLM.from_pretrained(plan.student), tok, convs,
                          FinetuneConfig.of(plan.config), 0, tmp_path, "float32")
    labels = trainer.train_dataset["labels"]  # -100: a token that trains nothing
    assert len(labels) == info["rows"] and all(sum(x != -100 for x in row) >= 8 for row in labels)
    cut = keep_responses(tok, convs, plan.config.max_length)
    changed = [(a, b) for a, b in zip(convs, cut, strict=True) if a != b]
    assert len(changed) == info["long_prompt_rows"]
    for a, b in changed:  # only the prompt's start goes: the answer and the end of the question stay
        assert [m["role"] for m in a] == [m["role"] for m in b] and a[-1] == b[-1]
        assert a[-2]["content"].endswith(b[-2]["content"].strip()[-20:])
    note = long_prompt_note(plan)
    assert f"selected {info['long_prompt_rows']} of {info['rows']}" in note and "--max-length (128)" in note
    assert long_prompt_note(plan_eval(plan.run_dir, replace(plan.config, max_length=1024))) == ""


def test_a_reference_with_several_splits_is_refused(tmp_path):
    """A DatasetDict folder or a JSON dict of splits given as one reference set was read as every split together
    (GSM8K's train rows inside its test set); it is refused with the split to give, and that split reads."""
    import datasets

    from curate.eval import load_reference

    rows = [json.loads(line) for line in (SAMPLE / "gsm8k_train.jsonl").read_text().splitlines()[-12:]]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:8]),
                          "test": datasets.Dataset.from_list(rows[8:])}).save_to_disk(str(tmp_path / "gsm8k"))
    (tmp_path / "splits.json").write_text(json.dumps({"train": rows[:8], "test": rows[8:]}))
    with pytest.raises(ValueError, match=r"holds the splits train, test; .* give e.g. .*gsm8k/test"):
        load_reference(str(tmp_path / "gsm8k"))
    with pytest.raises(ValueError, match=r"holds the splits train, test; .* give e.g. .*splits.json#test"):
        load_reference(str(tmp_path / "splits.json"))
    assert len(load_reference(str(tmp_path / "gsm8k" / "test")).convs) == 4
    assert len(load_reference(str(tmp_path / "splits.json#test")).convs) == 4


def test_exact_match_difference_interval_stays_within_one():
    """With 2 seeds the Welch part (t ~12.7) pushed an exact-match difference's interval to [-1.468, +1.733] in the
    verdict line; a difference of two accuracies lies in [-1, 1], and so does its interval now."""
    from pathlib import Path

    from curate.eval import EvalPlan, Reference, summarize, verdict_line

    n = 8
    correct = {("selected", 0): [1] * 6 + [0] * 2, ("selected", 1): [0] * 7 + [1],
               ("random_tokens", 0): [0] * n, ("random_tokens", 1): [0] * 7 + [1]}
    results = {k: {"references": {"gsm": {"nll": [2.0] * n, "tokens": [10] * n, "qa_rows": list(range(n)),
                                          "correct": c}}} for k, c in correct.items()}
    ref = Reference(name="gsm", convs=[[]] * n, ids=[str(i) for i in range(n)], answers=["1"] * n)
    plan = EvalPlan(run_dir=Path("."), config=EvalConfig(student="none", seeds=2), student="none",
                    pool=pl.DataFrame(), selected=pl.DataFrame(), references=[ref], arms={}, arm_info={},
                    dtype="float32")
    d = summarize(plan, results)["gsm"]["accuracy"]["diff"]["selected - random_tokens"]
    assert d["mean"] == pytest.approx(0.375) and d["verdict"] == "no different"
    assert d["ci"] == [-1.0, 1.0] and d["family"]["ci"] == [-1.0, 1.0], d
    assert "exact match (+0.375 [-1.000, +1.000])" in verdict_line({"gsm": {"diff": {}, "accuracy": {"diff": {
        "selected - random_tokens": d}}}})[1]


def test_a_student_without_a_chat_template_is_evaluated(run_dir, tiny_lm, tmp_path):
    """A base model (no chat template) is fine-tuned and scored on curate's plain rendering, but planning called
    `apply_chat_template` on its bare tokenizer and every such eval failed ("tokenizer.chat_template is not set").
    Its tokens are now counted on the plain training text, and the eval runs."""
    import shutil

    from transformers import AutoTokenizer

    from curate.eval import _plain
    from curate.lm.finetune import PLAIN_TRAINING_TEMPLATE

    student = tmp_path / "base-model"
    shutil.copytree(tiny_lm, student)
    (student / "chat_template.jinja").unlink()
    assert AutoTokenizer.from_pretrained(student).chat_template is None
    out = _copy_run(run_dir, tmp_path / "run")
    cfg = EvalConfig(student=str(student), **{**TINY, "arms": ("selected", "base"), "seeds": 1})
    plan = plan_eval(out, cfg)
    tok = AutoTokenizer.from_pretrained(student)
    tok.chat_template = PLAIN_TRAINING_TEMPLATE
    convs = [_plain(m) for m in plan.selected["messages"].to_list()]
    assert plan.selected["tokens"].to_list() == token_lengths(tok, convs, cfg.max_length)
    doc = run_eval(out, plan=plan)
    assert set(doc["references"]["heldout"]["loss"]) == {"selected", "base"}


def test_units_whose_qa_prompts_are_cut_for_generation_run_again(run_dir, cfg):
    """Generation prompts longer than max_length - gen_tokens now lose their middle (they were cut on the
    truncation side): a finished unit that generated from such prompts is not read back as if nothing changed;
    one whose prompts fit keeps its key."""
    roomy = plan_eval(run_dir, replace(cfg, accuracy_rows=4, max_length=512, gen_tokens=16))
    tight = plan_eval(run_dir, replace(cfg, accuracy_rows=4, max_length=64, gen_tokens=32))
    assert roomy.long_qa_prompts == 0 and tight.long_qa_prompts == 4  # GSM8K questions are over 32 tokens
    assert tight.unit_key("base", 0) != replace(tight, long_qa_prompts=0).unit_key("base", 0)
    assert roomy.unit_key("base", 0) == replace(roomy, long_qa_prompts=0).unit_key("base", 0)
    assert plan_eval(run_dir, replace(cfg, max_length=64, gen_tokens=32)).long_qa_prompts == 0  # no Q/A scored
