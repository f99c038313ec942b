"""Does a *strategy* beat random, not one subset? Pool `curate eval` results over several selections.

`curate eval` answers for one run folder: this subset against random draws from its pool. A strategy with a
random part (the iterative strategy's clusters, sample and rounds follow `--seed`) can win for one selection and
not another; the question a user asks is whether the next selection it makes will win. This reads the stored
units of several runs of one strategy (run seeds), each evaluated against its own equal-token random draws on the
same reference rows, and gives, per reference set, the mean over selections of (subset - random) with an interval
of the same shape as `curate eval`'s: the paired bootstrap over reference rows (every selection and seed kept),
widened in quadrature by a t-interval over the selections' own differences (k - 1 degrees of freedom, k runs),
which holds the spread between selections, fine-tunes and random draws. No training: units must be finished.

    CURATE_CACHE_DIR=/work/bench52k/cache python bench/eval_strategy.py --title "iterative, budget 1,000" \\
        --runs /work/bench52k/run1000-iter /work/bench52k/run1000-iter-s1 --seeds 3
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench_eval as B  # noqa: E402

from curate.eval import EvalConfig, _ratio, _verdict, plan_eval, unit_done, widen  # noqa: E402

OUT = ROOT / "bench" / "results" / "eval-strategy.md"
LEGEND = ("Loss in nats/token, negative = the subset better. Reference sets (150 rows each, as in \"eval\"): "
          "lima_train = LIMA answers, run1000-heldout = held-out Alpaca rows no arm trains on, test = GSM8K test. The "
          "student: SmolLM2-135M-Instruct, bf16 on the 2-core CPU.")


def arm_loss(res: dict, arm: str, seeds: int, ref: str, tok: np.ndarray, rows: np.ndarray,
             tok_b: np.ndarray) -> tuple[float, np.ndarray]:
    """An arm's token-weighted loss (mean over seeds, as `curate eval` reports it) on one reference set, and the
    same per bootstrap replicate (`rows`, with `tok_b` their token counts)."""
    nll = [np.array(res[(arm, s)]["references"][ref]["nll"]) for s in range(seeds)]
    return float(np.mean([_ratio(x, tok) for x in nll])), np.mean([x[rows].sum(1) / tok_b for x in nll], 0)


def pooled(runs: list[Path], base: str, seeds: int, refs: list[str], bootstrap: int = 4000,
           alpha: float = 0.05) -> tuple[dict[str, dict], list[dict]]:
    """Per reference: mean over runs of loss(selected) - loss(`base`), its interval and the per-run values."""
    from scipy.stats import t

    cfg = EvalConfig(student="smollm2-135m", seeds=seeds, arms=("selected", base), max_length=512,
                     reference_rows=150, accuracy_rows=16, gen_tokens=192)
    plans = [plan_eval(r, cfg, refs) for r in runs]
    ids = [[r.ids for r in p.references] for p in plans]
    assert all(x == ids[0] for x in ids), "the runs were measured on different reference rows"
    units = []
    for p in plans:
        res = {u: unit_done(p, *u) for u in p.units()}
        missing = [f"{a}-seed{s}" for (a, s), r in res.items() if r is None]
        if missing:
            raise SystemExit(f"{p.run_dir}: unfinished units {missing}; run its eval first")
        units.append(res)
    rng = np.random.default_rng(0)
    out, per_run = {}, [{"run": str(r)} for r in runs]
    k = len(runs)
    for ref in plans[0].references:
        tok = np.array(units[0][("selected", 0)]["references"][ref.name]["tokens"], float)
        n = len(tok)
        rows = rng.integers(0, n, size=(bootstrap, n))
        tok_b = np.maximum(tok[rows].sum(1), 1)
        d_run, d_boot = [], []
        for i, res in enumerate(units):
            (sa, ba), (sb, bb) = (arm_loss(res, a, seeds, ref.name, tok, rows, tok_b) for a in ("selected", base))
            d_run.append(sa - sb)
            d_boot.append(ba - bb)
            per_run[i][ref.name] = round(sa - sb, 5)
        d = np.array(d_run)
        mean = float(d.mean())
        row_boot = np.mean(d_boot, 0)
        se = float(d.std(ddof=1) / np.sqrt(k)) if k > 1 else 0.0  # between selections
        res = {}
        for name, a in (("95%", alpha), ("Bonferroni", alpha / len(plans[0].references))):
            lo, hi = np.percentile(row_boot, [50 * a, 100 - 50 * a])
            ci = widen(mean, float(lo), float(hi), float(t.ppf(1 - a / 2, k - 1)) * se if k > 1 else 0.0, 5)
            res[name] = {"ci": ci, "verdict": _verdict(ci, -1)}
        out[ref.name] = {"mean": round(mean, 5), **res}
    return out, per_run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", nargs="+", required=True)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--base", default="random_tokens")
    ap.add_argument("--title", required=True)
    args = ap.parse_args()
    refs = [str(B.LIMA), "/work/bench52k/run1000-heldout.jsonl", str(B.GSM8K)]
    runs = [Path(r) for r in args.runs]
    out, per_run = pooled(runs, args.base, args.seeds, refs)
    names = list(out)
    lines = [f"## {args.title}: {len(runs)} selections, {args.seeds} seeds each, selected − {args.base}", "",
             f"`CURATE_CACHE_DIR=/work/bench52k/cache python bench/eval_strategy.py --title \"{args.title}\" --runs "
             f"{' '.join(args.runs)} --seeds {args.seeds}" + (f" --base {args.base}" if args.base != "random_tokens"
                                                              else "") + "`", "",
             "| run | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines += [f"| `{Path(p['run']).name}` | " + " | ".join(f"{p[n]:+.4f}" for n in names) + " |" for p in per_run]
    lines += ["| **mean over selections** | " + " | ".join(
        f"**{out[n]['mean']:+.4f}** [{out[n]['95%']['ci'][0]:+.4f}, {out[n]['95%']['ci'][1]:+.4f}] "
        f"{out[n]['95%']['verdict']}" for n in names) + " |",
              "| Bonferroni (3 sets) | " + " | ".join(
        f"[{out[n]['Bonferroni']['ci'][0]:+.4f}, {out[n]['Bonferroni']['ci'][1]:+.4f}] "
        f"{out[n]['Bonferroni']['verdict']}" for n in names) + " |", ""]
    text = OUT.read_text() if OUT.exists() else "# eval-strategy\n\n" + " ".join(
        __doc__.split("\n\n")[1].split()) + "\n\n" + LEGEND + "\n"
    secs = text.split("\n## ")
    head, rest = secs[0], [s for s in secs[1:] if not s.startswith(lines[0][3:])]
    OUT.write_text("\n## ".join([head.rstrip("\n") + "\n", *rest]).rstrip("\n") + "\n\n" + "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
