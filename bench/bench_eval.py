"""`curate eval` on a real pool with the SmolLM2-135M-Instruct student, on this CPU (issue #16).

1. speed: SmolLM2 fine-tune tokens/s through `curate.eval.finetune` (TRL SFTTrainer, assistant-only loss) in
   float32 and bf16 autocast, and forward (response-loss) tokens/s, on the same Alpaca rows.
2. eval: a run folder from `curate select --no-prefect --model proxy` on an Alpaca slice with a row budget,
   then `curate.eval.run_eval` with reference sets LIMA (answers), held-out Alpaca rows (not in the slice) and
   GSM8K test (exact match on a few rows), every arm with its interval. Sizes are flags; the defaults are what
   fits a CPU session here, and bench/results/eval.md says what was cut relative to the issue's 1,000-row eval.

    nice -n 15 .venv/bin/python bench/bench_eval.py speed
    nice -n 15 .venv/bin/python bench/bench_eval.py eval [--slice 4000 --budget 200 --seeds 2 ...]
    nice -n 5 .venv/bin/python bench/bench_eval.py plan --run RUN [--scale 1 4 20]

Writes bench/results/eval.md (each stage rewrites its own section) and bench/out/eval/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("CURATE_PROGRESS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from curate.eval import EvalConfig, _engine, finetune, plan_eval, resolve_student, run_eval  # noqa: E402
from curate.lm.evaluate import response_losses  # noqa: E402
from curate.lm.proxy import load_conversations  # noqa: E402

SHARED = Path(os.environ.get("CURATE_SHARED_DATA", ROOT.parent / "shared" / "data"))
if not SHARED.exists():
    SHARED = Path("/work/shared/data")
ALPACA = SHARED / "alpaca-52k" / "alpaca_data.jsonl"
LIMA = SHARED / "lima" / "lima_train.jsonl"
GSM8K = SHARED / "gsm8k" / "test.jsonl"
OUT = ROOT / "bench" / "out" / "eval"
RESULTS = ROOT / "bench" / "results" / "eval.md"


def student(name: str) -> str:
    """The packaged SmolLM2 through curate (issue #15), or a folder given with --student."""
    return resolve_student(name)


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def write_section(title: str, body: str) -> None:
    """Replace (or append) one `## title` section of bench/results/eval.md."""
    text = RESULTS.read_text() if RESULTS.exists() else "# curate eval on a real pool (bench/bench_eval.py)\n"
    head = f"## {title}\n"
    parts = text.split("\n## ")
    kept = [parts[0]] + [p for p in parts[1:] if not p.startswith(title + "\n")]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n## ".join(kept).rstrip() + "\n\n" + head + body.rstrip() + "\n")


def speed(args: argparse.Namespace) -> None:
    path = student(args.student)
    lines = ALPACA.read_text().splitlines()[:args.rows]
    convs = load_conversations([json.loads(x) for x in lines])
    rows = []
    for dtype in ("float32", "bfloat16"):
        cfg = EvalConfig(student=path, max_steps=args.steps, batch_size=args.batch_size, max_length=args.max_length,
                         dtype=dtype, threads=args.threads, lr=1e-4, accuracy_rows=0)
        t0 = time.perf_counter()
        model, tok, st = finetune(path, convs, cfg, 0, dtype=dtype)
        engine = _engine(path, model, tok, cfg, dtype)
        t1 = time.perf_counter()
        nll, toks = response_losses(engine, convs[:args.eval_rows])
        fwd = time.perf_counter() - t1
        # forward throughput counts every token of the scored sequences (prompt + response)
        seq_tokens = sum(len(engine.encoder.encode(c[:-1], c[-1]["content"]).ids) for c in convs[:args.eval_rows])
        tokens_trained = st["steps"] * args.batch_size * st["epoch_tokens"] / max(1, st["rows"])
        rows.append({"dtype": dtype, "steps": st["steps"], "train_seconds": st["train_seconds"],
                     "train_tps": round(tokens_trained / st["train_seconds"], 1),
                     "forward_tps": round(seq_tokens / fwd, 1), "loss_after": round(float(nll.sum() / toks.sum()), 4),
                     "total_seconds": round(time.perf_counter() - t0, 1)})
        print(rows[-1], flush=True)
    (OUT / "speed.json").parent.mkdir(parents=True, exist_ok=True)
    (OUT / "speed.json").write_text(json.dumps(rows, indent=2) + "\n")
    body = [f"`nice -n 15 .venv/bin/python bench/bench_eval.py speed --rows {args.rows} --steps {args.steps} "
            f"--batch-size {args.batch_size} --max-length {args.max_length} --threads {args.threads}`",
            "", f"Machine: {os.cpu_count()} cores; load at the end: `{uptime()}` (other agents share the CPU).",
            f"Student: SmolLM2-135M-Instruct ({path}); {args.steps} SFTTrainer steps of {args.batch_size} Alpaca rows "
            f"(assistant-only loss, max_length {args.max_length}), then response loss on {args.eval_rows} rows.", "",
            "| dtype | fine-tune tokens/s | forward tokens/s | loss after | fine-tune seconds |",
            "|---|---|---|---|---|"]
    for r in rows:
        body.append(f"| {r['dtype']} | {r['train_tps']} | {r['forward_tps']} | {r['loss_after']} | "
                    f"{r['train_seconds']} |")
    body.append("")
    body.append("bf16 = autocast on CPU with float32 master weights (HF Trainer `bf16=True`); the model is evaluated "
                "in bf16. `--dtype auto` picks what `score.dtype: auto` picks (`curate.lm.hf.dtype_choice`: bf16 "
                "when a timed bf16 matmul takes < 0.8x float32's).")
    write_section("1. Fine-tune speed (SmolLM2-135M, this CPU)", "\n".join(body))


def make_run(args: argparse.Namespace) -> Path:
    """An Alpaca slice (seeded), the rest of Alpaca kept for a held-out reference; `curate select` on it."""
    OUT.mkdir(parents=True, exist_ok=True)
    lines = ALPACA.read_text().splitlines()
    order = np.random.default_rng(0).permutation(len(lines))
    pool_file, held_file = OUT / f"alpaca-slice{args.slice}.jsonl", OUT / "alpaca-heldout.jsonl"
    if not pool_file.exists():
        pool_file.write_text("\n".join(lines[i] for i in sorted(order[:args.slice])) + "\n")
        held_file.write_text("\n".join(lines[i] for i in sorted(order[args.slice:args.slice + 2000])) + "\n")
    run_dir = OUT / f"run-slice{args.slice}-b{args.budget}"
    if not (run_dir / "selected.parquet").exists():
        t0 = time.perf_counter()
        subprocess.run([str(ROOT / ".venv" / "bin" / "curate"), "select", str(pool_file), "--out", str(run_dir),
                        "--no-prefect", "--model", "proxy", "--budget", str(args.budget), "--seed", "0"],
                       check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        (run_dir / "select-seconds.txt").write_text(f"{time.perf_counter() - t0:.1f}\n")
    return run_dir


def heldout_from_run(run_dir: Path, rows: int = 2000) -> Path:
    """Alpaca rows the run did not select (its candidates, seeded): the held-out reference when the run's pool is
    all of Alpaca. Reference ids are removed from every random arm's pool, so no arm trains on them."""
    import polars as pl

    held = run_dir.parent / f"{run_dir.name}-heldout.jsonl"
    if not held.exists():
        recs = pl.read_parquet(run_dir / "records.parquet", columns=["id", "messages"])
        sel = pl.read_parquet(run_dir / "selected.parquet", columns=["id"])
        rest = recs.join(sel, on="id", how="anti").sort("id").sample(rows, seed=0, shuffle=True)
        with held.open("w") as fh:
            for m in rest["messages"].to_list():
                fh.write(json.dumps({"messages": [{"role": x["role"], "content": x["content"]} for x in m]}) + "\n")
    return held


def evaluate(args: argparse.Namespace) -> None:
    if args.run:
        run_dir = Path(args.run)
        OUT.mkdir(parents=True, exist_ok=True)
        held = Path(args.heldout) if args.heldout else heldout_from_run(run_dir)
        refs = [str(LIMA), str(held), str(GSM8K)]
    else:
        run_dir = make_run(args)
        refs = [str(LIMA), str(OUT / "alpaca-heldout.jsonl"), str(GSM8K)]
    arms = {"arms": tuple(args.arms.split(","))} if args.arms else {}
    cfg = EvalConfig(student=args.student, seeds=args.seeds, epochs=args.epochs, max_steps=args.max_steps, **arms,
                     lr=args.lr, batch_size=args.batch_size, max_length=args.max_length, threads=args.threads,
                     reference_rows=args.reference_rows, accuracy_rows=args.accuracy_rows,
                     gen_tokens=args.gen_tokens)
    from curate.eval import calibrate, estimate

    t0 = time.perf_counter()
    plan = plan_eval(run_dir, cfg, refs)
    est = estimate(plan, calibrate(plan))
    print(f"estimate {est['seconds'] / 60:.1f} min", flush=True)
    (OUT / "estimate.json").write_text(json.dumps(est, indent=2) + "\n")
    doc = run_eval(run_dir, plan=plan, on_unit=lambda a, s, r: print(a, s, r["seconds"], flush=True))
    wall = time.perf_counter() - t0
    m = json.loads((run_dir / "manifest.json").read_text())
    ran_units = [k for k, state in doc["executor"]["units"].items() if state != "Cached"]
    ran = sum(doc["arms"][k]["seconds"] for k in ran_units)
    reused = len(doc["arms"]) - len(ran_units)
    cmd = " ".join([".venv/bin/python bench/bench_eval.py eval", *sys.argv[2:]])
    if args.run:
        where = (f"Run folder `{run_dir}`: `curate select {Path(m['config']['inputs'][0]).name}` with recipe "
                 f"strategy `{m['config']['select']['strategy']}`, scorers {m['config']['score']['scorers']}, model "
                 f"`{m['config']['score']['model']}`, budget {m['config']['select']['budget']}; held-out reference: "
                 + (f"`{Path(args.heldout).name}` (rows another run did not select, shared so that strategies are "
                    "compared on the same rows; random arms never train on them, the subset's overlap is "
                    f"{doc['arms']['selected-seed0'].get('reference_overlap', '?')} rows)" if args.heldout else
                    "2,000 seeded Alpaca rows the run did not select (no arm trains on them)."))
    else:
        where = (f"Run folder: `curate select {Path(m['config']['inputs'][0]).name} --no-prefect --model proxy "
                 f"--budget {args.budget} --seed 0` on a seeded {args.slice:,}-row Alpaca slice "
                 f"({(run_dir / 'select-seconds.txt').read_text().strip()} s); default recipe otherwise (kMQ).")
    body = [f"`{cmd}`", "", f"Load at the end: `{uptime()}`.", "", where,
            f"Student `{Path(args.student).name}`, {plan.dtype}, {args.threads} threads; {args.seeds} seeds per arm; "
            f"{args.epochs} epoch(s), lr {args.lr}, batch {args.batch_size}, max_length {args.max_length}.",
            f"Reference sets ({args.reference_rows} rows each, seeded sample): LIMA train answers, Alpaca rows outside "
            f"the slice, GSM8K test (greedy exact match on {args.accuracy_rows} rows, {args.gen_tokens} new tokens).",
            "", f"Dry-run estimate {est['seconds'] / 60:.1f} min; real {ran / 60:.1f} min for the "
            f"{len(ran_units)} units that ran (ratio real/estimate {ran / max(est['seconds'], 1):.2f}); wall with "
            f"set-up {wall / 60:.1f} min."
            + (f" {reused} units were read back from an earlier eval of this run (same key)." if reused else ""), "",
            "| reference | arm | rows trained | tokens trained | loss (nats/token), 95% CI | seeds | exact match |",
            "|---|---|---|---|---|---|---|"]
    for name, e in doc["references"].items():
        acc = e.get("accuracy", {}).get("arms", {})
        for arm, v in e["loss"].items():
            info = doc["arms"][f"{arm}-seed0"]
            a = acc.get(arm)
            body.append(f"| {name} | {arm} | {info['rows']} | {info['tokens']:,} | {v['mean']:.4f} "
                        f"[{v['ci'][0]:.4f}, {v['ci'][1]:.4f}] | {', '.join(f'{x:.4f}' for x in v['seeds'])} | "
                        + (f"{a['mean']:.3f} [{a['ci'][0]:.3f}, {a['ci'][1]:.3f}]" if a else "-") + " |")
    body += ["", "Paired differences (arm − baseline, loss; negative = arm better), 95% CI: paired bootstrap over "
             "reference rows, widened by a Welch t-interval over seeds (`curate.eval._diff_ci`):", "",
             "| reference | comparison | Δ loss | 95% CI | verdict |", "|---|---|---|---|---|"]
    for name, e in doc["references"].items():
        for k, d in e["diff"].items():
            if k.startswith("selected") or k.endswith("base"):
                body.append(f"| {name} | {k} | {d['mean']:+.4f} | [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}] | "
                            f"{d['verdict']} |")
    body += ["", f"**Verdict:** {doc['verdict_line']}"]
    title = (f"2. curate eval: {args.title or run_dir.name}" if args.run
             else f"2. curate eval: Alpaca slice {args.slice:,}, budget {args.budget}")
    write_section(title, "\n".join(body))


def dry_run(args: argparse.Namespace) -> None:
    """`curate eval --dry-run` for the issue's full eval: calibrate on this machine, estimate, run nothing."""
    from curate.eval import calibrate, estimate

    run_dir = make_run(args)
    refs = [str(LIMA), str(OUT / "alpaca-heldout.jsonl"), str(GSM8K)]
    cfg = EvalConfig(student=args.student, seeds=args.seeds, max_length=args.max_length, threads=args.threads,
                     reference_rows=args.reference_rows, accuracy_rows=args.accuracy_rows,
                     gen_tokens=args.gen_tokens)
    t0 = time.perf_counter()
    plan = plan_eval(run_dir, cfg, refs)
    if args.from_speed:  # the rates `speed` measured (bf16), instead of another calibration fine-tune
        sp = {r["dtype"]: r for r in json.loads((OUT / "speed.json").read_text())}[plan.dtype]
        calib = {"setup_seconds": 30.0, "train_tps": sp["train_tps"], "forward_tps": sp["forward_tps"],
                 "generate_tps": sp["forward_tps"] / 10}  # assumed: decoding ~10x slower per token than scoring
    else:
        calib = calibrate(plan)
    est = estimate(plan, calib)
    (OUT / f"dry-run-b{args.budget}.json").write_text(json.dumps(est, indent=2) + "\n")
    cmd = " ".join(["nice -n 15 .venv/bin/python bench/bench_eval.py dry-run", *sys.argv[2:]])
    per_arm: dict[str, list[float]] = {}
    for k, u in est["units"].items():
        per_arm.setdefault(k.rsplit("-seed", 1)[0], []).append(u["seconds"])
    body = [f"`{cmd}` (the same as `curate eval RUN --dry-run --reference LIMA HELDOUT GSM8K` with these sizes)", "",
            f"Load at the end: `{uptime()}`; plan + calibration took {time.perf_counter() - t0:.0f} s.", "",
            f"Subset: {plan.selected.height} rows ({int(plan.selected['tokens'].sum()):,} SmolLM2 tokens at "
            f"max_length {args.max_length}); pool {plan.pool.height:,} rows; {args.seeds} seeds; reference sets "
            + ", ".join(f"{r.name} {len(r.convs)} rows" for r in plan.references)
            + f"; exact match on {args.accuracy_rows} GSM8K rows x {args.gen_tokens} new tokens.", "",
            ("Rates from section 1 (setup 30 s/unit and generation = forward/10 assumed)" if args.from_speed
             else "Calibration") + f" ({plan.dtype}, {args.threads} threads, this loaded machine): fine-tune "
            f"{calib['train_tps']} tokens/s, forward {calib['forward_tps']} tokens/s, greedy generation "
            f"{calib['generate_tps']} tokens/s, {calib['setup_seconds']} s fixed per unit.", "",
            "| arm | units | estimated minutes per unit |", "|---|---|---|"]
    for arm, secs in per_arm.items():
        body.append(f"| {arm} | {len(secs)} | {np.mean(secs) / 60:.1f} |")
    body.append(f"\n**Estimated total: {est['seconds'] / 3600:.1f} h** "
                f"({est['reference_tokens']:,} reference tokens scored per unit).")
    write_section(f"3. Dry-run estimate: the issue's eval (budget {args.budget})", "\n".join(body))


def plan_cost(args: argparse.Namespace) -> None:
    """What planning an eval costs as the pool grows: `plan_eval` (the pool tokenized as the draws visit it) against
    tokenizing the whole pool, which the planner did before (what a `--dry-run` paid), on copies of a finished run
    whose pool is repeated `--scale` times (new ids, the same subset)."""
    import resource
    import shutil

    import polars as pl

    from curate.eval import _plain, _tokenizer, token_lengths

    src = Path(args.run)
    rows = []
    for k in args.scale:
        run_dir = OUT / f"plan-x{k}"
        if not (run_dir / "records.parquet").exists():
            run_dir.mkdir(parents=True, exist_ok=True)
            recs = pl.read_parquet(src / "records.parquet", columns=["id", "messages"])
            pl.concat([recs] + [recs.with_columns(id=pl.col("id") + f"-copy{c}") for c in range(1, k)]).write_parquet(
                run_dir / "records.parquet")
            for name in ("selected.parquet", "semdedup.parquet"):
                if (src / name).exists():
                    shutil.copyfile(src / name, run_dir / name)
        cfg = EvalConfig(student=args.student, seeds=3, max_length=512, threads=args.threads)
        t0 = time.perf_counter()
        plan = plan_eval(run_dir, cfg)
        t_plan = time.perf_counter() - t0
        visited = int(plan.pool["tokens"].is_not_null().sum())
        t_whole = None
        if plan.pool.height <= args.whole_max:
            t0 = time.perf_counter()
            token_lengths(_tokenizer(plan.student), [_plain(m) for m in plan.pool["messages"].to_list()], 512)
            t_whole = time.perf_counter() - t0
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        rows.append((k, plan.pool.height, t_plan, visited, t_whole, rss))
        print(rows[-1], flush=True)
    cmd = " ".join(["nice -n 5 .venv/bin/python bench/bench_eval.py plan", *sys.argv[2:]])
    body = [f"`{cmd}` (load: {uptime()}; a niced `curate eval` fine-tune shared the cores)", "",
            "Planning draws every arm's rows and needs student-token lengths for them. Until 2026-12-05 the planner "
            "tokenized the whole pool (chat template + tokenizer, ~0.5 ms a row here) on every `curate eval` and "
            "`--dry-run`; now the draws walk a shuffle of the pool and tokenize only the rows they reach "
            "(`curate.eval.PoolLengths`; the random_tokens draw is the same rows). Default arms, 3 seeds, subset "
            f"{plan.selected.height:,} rows; the pool is the run's candidates repeated.", "",
            "| pool rows | plan_eval (s) | pool rows tokenized | tokenizing the whole pool (s) "
            "| process peak RSS so far (GB) |", "|---|---|---|---|---|"]
    per_row = [tw / n for _, n, _, _, tw, _ in rows if tw]
    for _, n, tp, v, tw, rss in rows:
        guess = f"~{n * per_row[-1]:.0f} (not run: {per_row[-1] * 1e3:.2f} ms a row above)" if per_row else "not run"
        whole = f"{tw:.1f}" if tw is not None else guess
        body.append(f"| {n:,} | {tp:.1f} | {v:,} | {whole} | {rss:.1f} |")
    write_section("9. Planning an eval as the pool grows", "\n".join(body))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("speed")
    sp.add_argument("--student", default="smollm2-135m")
    sp.add_argument("--rows", type=int, default=64)
    sp.add_argument("--steps", type=int, default=4)
    sp.add_argument("--batch-size", type=int, default=8)
    sp.add_argument("--max-length", type=int, default=256)
    sp.add_argument("--eval-rows", type=int, default=32)
    sp.add_argument("--threads", type=int, default=2)
    ev = sub.add_parser("eval")
    ev.add_argument("--student", default="smollm2-135m", help="Packaged name or an HF folder (e.g. a proxy).")
    ev.add_argument("--run", default=None, help="Evaluate this existing run folder (pool = its records).")
    ev.add_argument("--title", default=None, help="Section title for --run.")
    ev.add_argument("--heldout", default=None, help="Held-out reference file for --run (default: drawn from the "
                    "run's unselected rows); give another run's to compare strategies on the same rows.")
    ev.add_argument("--arms", default=None, help="Comma-separated arms (default: all).")
    ev.add_argument("--slice", type=int, default=4000)
    ev.add_argument("--budget", type=int, default=200)
    ev.add_argument("--seeds", type=int, default=2)
    ev.add_argument("--epochs", type=float, default=1.0)
    ev.add_argument("--max-steps", type=int, default=None)
    ev.add_argument("--lr", type=float, default=1e-4)
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--max-length", type=int, default=256)
    ev.add_argument("--threads", type=int, default=2)
    ev.add_argument("--reference-rows", type=int, default=100)
    ev.add_argument("--accuracy-rows", type=int, default=20)
    ev.add_argument("--gen-tokens", type=int, default=160)
    dr = sub.add_parser("dry-run")
    dr.add_argument("--student", default="smollm2-135m")
    dr.add_argument("--slice", type=int, default=4000)
    dr.add_argument("--budget", type=int, default=1000)
    dr.add_argument("--seeds", type=int, default=3)
    dr.add_argument("--max-length", type=int, default=512)
    dr.add_argument("--threads", type=int, default=2)
    dr.add_argument("--reference-rows", type=int, default=500)
    dr.add_argument("--accuracy-rows", type=int, default=50)
    dr.add_argument("--gen-tokens", type=int, default=256)
    dr.add_argument("--from-speed", action="store_true", help="Rates from `speed` (no calibration fine-tune).")
    pc = sub.add_parser("plan")
    pc.add_argument("--run", required=True, help="A finished run folder (its pool is repeated --scale times).")
    pc.add_argument("--scale", type=int, nargs="+", default=[1, 4, 20])
    pc.add_argument("--whole-max", type=int, default=300_000, help="Tokenize the whole pool up to this many rows.")
    pc.add_argument("--student", default="smollm2-135m")
    pc.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    {"speed": speed, "eval": evaluate, "dry-run": dry_run, "plan": plan_cost}[args.cmd](args)


if __name__ == "__main__":
    main()
