"""Does a *strategy* beat random, not one subset? Pool `curate eval` results over several selections.

`curate eval` answers for one run folder: this subset against random draws from its pool. A strategy with a
random part (the iterative strategy's clusters, sample and rounds follow `--seed`) can win for one selection and
not another; the question a user asks is whether the next selection it makes will win. This reads the stored
units of several runs of one strategy (run seeds), each evaluated against its own equal-token random draws on the
same reference rows, and gives, per reference set, the mean over selections of (subset - random) with an interval
of the same shape as `curate eval`'s: the paired bootstrap over reference rows (every selection and seed kept),
widened in quadrature by a t-interval over the selections' own differences (k - 1 degrees of freedom, k runs),
which holds the spread between selections, fine-tunes and random draws. With k = 3 that spread rests on 2 degrees
of freedom and can come out smaller than the seed noise each difference is known to carry (it did: 0.0004 against
0.0013 nats/token on LIMA for the iterative strategy), so the seed part is the larger of that and the Welch
t-interval of the same mean from every selection's per-seed losses. No training: units must be finished.

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

from curate.eval import EvalConfig, _ratio, _verdict, plan_eval, seed_halfwidth, unit_done, widen  # noqa: E402

OUT = ROOT / "bench" / "results" / "eval-strategy.md"
LEGEND = ("Loss in nats/token, negative = the subset better. Reference sets (150 rows each, as in \"eval\"): "
          "lima_train = LIMA answers, run1000-heldout = held-out Alpaca rows no arm trains on, test = GSM8K test. The "
          "student: SmolLM2-135M-Instruct, bf16 on the 2-core CPU.")


def arm_loss(res: dict, arm: str, seeds: int, ref: str, tok: np.ndarray, rows: np.ndarray,
             tok_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An arm's token-weighted loss per seed (their mean is what `curate eval` reports) on one reference set, and
    the mean over seeds per bootstrap replicate (`rows`, with `tok_b` their token counts)."""
    nll = [np.array(res[(arm, s)]["references"][ref]["nll"]) for s in range(seeds)]
    return np.array([_ratio(x, tok) for x in nll]), np.mean([x[rows].sum(1) / tok_b for x in nll], 0)


def seed_part(d_run: list[float], per_seed: list[np.ndarray], alpha: float) -> tuple[float, str]:
    """Half-width of the seed part of the mean over selections' interval, and which estimate gave it: the
    t-interval over the k selections' differences, or, where larger, the Welch t-interval from every selection's
    per-seed losses (`per_seed`: both arms of each selection; the mean over k selections divides it by k)."""
    from scipy.stats import t

    k = len(d_run)
    between = float(t.ppf(1 - alpha / 2, k - 1) * np.std(d_run, ddof=1) / np.sqrt(k)) if k > 1 else 0.0
    within = seed_halfwidth(*per_seed, alpha=alpha) / k
    return (between, "between") if between >= within else (within, "within")


def pooled(runs: list[Path], base: str, seeds: int, refs: list[str], bootstrap: int = 4000,
           alpha: float = 0.05) -> tuple[dict[str, dict], list[dict]]:
    """Per reference: mean over runs of loss(selected) - loss(`base`), its interval and the per-run values."""
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
    for ref in plans[0].references:
        tok = np.array(units[0][("selected", 0)]["references"][ref.name]["tokens"], float)
        n = len(tok)
        rows = rng.integers(0, n, size=(bootstrap, n))
        tok_b = np.maximum(tok[rows].sum(1), 1)
        d_run, d_boot, per_seed = [], [], []
        for i, res in enumerate(units):
            (sa, ba), (sb, bb) = (arm_loss(res, a, seeds, ref.name, tok, rows, tok_b) for a in ("selected", base))
            d_run.append(float(sa.mean() - sb.mean()))
            d_boot.append(ba - bb)
            per_seed += [sa, sb]
            per_run[i][ref.name] = round(d_run[-1], 5)
        mean = float(np.mean(d_run))
        row_boot = np.mean(d_boot, 0)
        res = {}
        for name, a in (("95%", alpha), ("Bonferroni", alpha / len(plans[0].references))):
            lo, hi = np.percentile(row_boot, [50 * a, 100 - 50 * a])
            h, source = seed_part(d_run, per_seed, a)
            ci = widen(mean, float(lo), float(hi), h, 5)
            res[name] = {"ci": ci, "verdict": _verdict(ci, -1), "seed_part": round(h, 5), "from": source}
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
        f"{out[n]['Bonferroni']['verdict']}" for n in names) + " |",
              "| seed part of the 95% interval (±, from) | " + " | ".join(
        f"{out[n]['95%']['seed_part']:.4f} ({out[n]['95%']['from']})" for n in names) + " |", "",
              "Seed part: the t-interval over the selections' differences (between), or where larger the Welch "
              "t-interval from each selection's per-seed losses (within); added in quadrature to the row "
              "bootstrap.", ""]
    text = OUT.read_text() if OUT.exists() else "# eval-strategy\n\n" + " ".join(
        __doc__.split("\n\n")[1].split()) + "\n\n" + LEGEND + "\n"
    secs = text.split("\n## ")
    head, rest = secs[0], [s for s in secs[1:] if not s.startswith(lines[0][3:])]
    OUT.write_text("\n## ".join([head.rstrip("\n") + "\n", *rest]).rstrip("\n") + "\n\n" + "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
