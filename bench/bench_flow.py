"""Prefect's cost: the same recipe on the same data through `run_direct` (no Prefect) and `run_flow`.

    .venv/bin/python bench/bench_flow.py overhead [--rows N] [--recipe light|default]
    .venv/bin/python bench/bench_flow.py e2e [--rows N]          # `curate select` (the flow), default recipe

overhead: each path runs in a fresh process with its own empty stores (so both do all the work), after one
warm-up run that builds the shared models (static embedder, proxy LM) which both then reuse; then the flow is
run again over its finished run to time a fully cached re-run. Reported: wall time per path (imports
excluded), Prefect's fixed start-up (ephemeral API server with a migrated DB), per-task overhead.
e2e: `curate select ALPACA` with the default recipe in a fresh cache, as a user would first run it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ALPACA = ROOT.parent / "shared" / "data" / "alpaca-52k" / "alpaca_data.jsonl"

RECIPES = {
    # everything but the LM: what Prefect's overhead should be compared with when scoring is cheap
    "light": {"score": {"scorers": ["heuristics"]}},
    "default": {},
}


def _child(mode: str, recipe_path: str) -> None:
    """Run one path in this (fresh) process and print its timings as JSON."""
    t_import = time.perf_counter()
    from curate.config import Recipe

    recipe = Recipe.model_validate_json(Path(recipe_path).read_text())
    out: dict = {}
    if mode == "direct":
        from curate.pipeline import run_direct

        t0 = time.perf_counter()
        run = run_direct(recipe)
        out["seconds"] = time.perf_counter() - t0
    else:
        from flows import pipeline as fp

        out["import_s"] = time.perf_counter() - t_import
        t0 = time.perf_counter()
        fp.ensure_api()
        out["server_s"] = time.perf_counter() - t0
        run = fp.run_flow(recipe)
        out["seconds"] = time.perf_counter() - t0
        out["flow"] = run.manifest.get("executor", {})
    out["stages"] = {k: v.get("seconds") for k, v in run.manifest.get("stages", {}).items()}
    out["selected"] = run.manifest.get("totals", {}).get("selected")
    print("RESULT " + json.dumps(out))


def _spawn(mode: str, recipe: dict, cache: Path, models: Path | None) -> dict:
    cache.mkdir(parents=True, exist_ok=True)
    if models is not None and models.exists() and not (cache / "models").exists():
        (cache / "models").symlink_to(models)
    home = cache / "prefect" / "home"
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "prefect.db").exists():  # a migrated DB, as on every run after a user's first
        shutil.copy(_template_db(), home / "prefect.db")
    rp = cache / "recipe.json"
    rp.write_text(json.dumps(recipe))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(CURATE_CACHE_DIR=str(cache), CURATE_PROGRESS="0", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, __file__, "_child", mode, str(rp)], env=env, capture_output=True,
                       text=True)
    wall = time.perf_counter() - t0
    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
    if p.returncode or line is None:
        raise SystemExit(f"{mode} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return {**json.loads(line[7:]), "process_s": wall}


def _template_db() -> Path:
    """A migrated Prefect DB (the tests build the same one); migrating costs ~20 s once per PREFECT_HOME."""
    from importlib import metadata

    home = Path(tempfile.gettempdir()) / f"curate-prefect-template-{metadata.version('prefect')}"
    if not (home / "prefect.db").exists():
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
        home.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"], env=env,
                       check=True, capture_output=True)
    return home / "prefect.db"


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def overhead(args: argparse.Namespace) -> None:
    base = Path(args.workdir)
    data = _slice(base, args.rows)
    recipe = {"inputs": [str(data)], **RECIPES[args.recipe], "report": True}
    models = base / "models"
    print(f"load before: {_uptime()}")
    warm = base / "warm"
    if not models.exists():  # build the shared models once (static embedder distillation, proxy training)
        shutil.rmtree(warm, ignore_errors=True)
        r = _spawn("direct", {**recipe, "out": str(warm / "run")}, warm, None)
        print(f"warm-up (builds models): {r['seconds']:.1f} s")
        os.replace(warm / "models", models)
    res = {}
    for mode in ("direct", "flow"):
        d = base / mode
        shutil.rmtree(d, ignore_errors=True)
        res[mode] = _spawn(mode, {**recipe, "out": str(d / "run")}, d, models)
        print(f"{mode}: {res[mode]['seconds']:.1f} s")
    res["cached"] = _spawn("flow", {**recipe, "out": str(base / "flow" / "run")}, base / "flow", models)
    print(f"load after: {_uptime()}")
    _report_overhead(res, args)


def _report_overhead(res: dict, args: argparse.Namespace) -> None:
    d, f, c = res["direct"], res["flow"], res["cached"]
    n_tasks = len(f["flow"].get("tasks", {}))
    fixed = f["server_s"]
    print(f"\nrows: {args.rows or 'all'}; recipe: {args.recipe}; tasks per run: {n_tasks}\n")
    print("| path | seconds (imports excluded) | process wall s |\n|---|---|---|")
    print(f"| run_direct (no Prefect) | {d['seconds']:.1f} | {d['process_s']:.1f} |")
    runner = os.environ.get("CURATE_TASK_RUNNER", "thread")
    print(f"| run_flow, {runner} runner (incl. API server start {fixed:.1f} s) | {f['seconds']:.1f} | "
          f"{f['process_s']:.1f} |")
    print(f"| run_flow re-run, every task cached (incl. server {c['server_s']:.1f} s) | {c['seconds']:.1f} | "
          f"{c['process_s']:.1f} |")
    over = f["seconds"] - d["seconds"]
    print(f"\nPrefect overhead: {over:+.1f} s = {100 * over / f['seconds']:.1f}% of the flow's time; "
          f"fixed start-up {fixed:.1f} s; cached re-run {(c['seconds'] - c['server_s']) / max(n_tasks, 1):.2f} "
          "s per task (cache lookup + output sha256 check)")
    print(f"selected: direct {d['selected']}, flow {f['selected']}")
    print("\nstage seconds (direct | flow):")
    for k in d["stages"]:
        print(f"  {k}: {d['stages'].get(k)} | {f['stages'].get(k)}")
    print("flow task seconds (stages here: wall in the flow; shards: their own compute):")
    for k, v in f["flow"].get("task_seconds", {}).items():
        print(f"  {k}: {v}")


def e2e(args: argparse.Namespace) -> None:
    base = Path(args.workdir) / "e2e"
    shutil.rmtree(base, ignore_errors=True)
    data = _slice(Path(args.workdir), args.rows)
    cache = base / "cache"
    (cache / "prefect" / "home").mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(CURATE_CACHE_DIR=str(cache), CURATE_PROGRESS="0", HF_HUB_OFFLINE="1")
    cmd = [str(Path(sys.executable).with_name("curate")), "select", str(data), "--out", str(base / "run")]
    print(f"load before: {_uptime()}\n$ CURATE_CACHE_DIR={cache} {' '.join(cmd)}")
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=base)
    wall = time.perf_counter() - t0
    print(p.stdout[-4000:])
    if p.returncode:
        print(p.stderr[-4000:])
    print(f"exit {p.returncode}; wall {wall:.1f} s ({wall / 60:.1f} min)\nload after: {_uptime()}")


def _slice(base: Path, rows: int | None) -> Path:
    if not ALPACA.exists():
        raise SystemExit(f"{ALPACA} not found")
    if not rows:
        return ALPACA
    base.mkdir(parents=True, exist_ok=True)
    out = base / f"alpaca-{rows}.jsonl"
    if not out.exists():
        with open(ALPACA) as src, open(out, "w") as dst:
            for i, line in enumerate(src):
                if i >= rows:
                    break
                dst.write(line)
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        return _child(sys.argv[2], sys.argv[3])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["overhead", "e2e"])
    ap.add_argument("--rows", type=int, default=None, help="first N Alpaca rows (default: all 52,002)")
    ap.add_argument("--recipe", choices=list(RECIPES), default="light")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "curate-bench-flow"))
    args = ap.parse_args()
    overhead(args) if args.what == "overhead" else e2e(args)


if __name__ == "__main__":
    main()
