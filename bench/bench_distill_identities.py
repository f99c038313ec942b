"""Predicted IFD columns: derived from the predicted ifd and L(A) (curate.distill.DERIVED) vs each predicted alone.

On a finished run folder (scores.parquet, records.parquet, the run's embedding store under $CURATE_CACHE_DIR):
the LM-computed rows are split (seeded) into a training part and a held-out part; `curate.distill.distill` is
fitted on the training part and predicts the held-out part twice, once as curate does now (ifd_cond_loss and
ifd_ppl derived from the predicted ifd and ifd_uncond_loss) and once with every numeric IFD column predicted on
its own (the code before). Per column: Spearman against the computed values; and how many held-out rows break
ifd > 1 <=> ifd_ppl > 1 (every computed row obeys it). Then the same fit with every core (`threads=None`, what a
process's first distill got before the libraries were loaded ahead of `threadpool_limits`) against one thread:
how far the predicted ifd moves. Writes bench/results/distill-identities.md.

    CURATE_CACHE_DIR=CACHE .venv/bin/python bench/bench_distill_identities.py --run RUN [--holdout 0.2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("CURATE_PROGRESS", "0")

import curate.distill as D  # noqa: E402

COLUMNS = ("ifd", "ifd_ppl", "ifd_cond_loss", "ifd_uncond_loss")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--holdout", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    run = Path(a.run)
    scores = pl.read_parquet(run / "scores.parquet")
    records = pl.read_parquet(run / "records.parquet")
    manifest = json.loads((run / "manifest.json").read_text())
    emb = manifest["config"]["embed"]
    comp = scores.filter(~pl.col("score_predicted")).select("id", "ifd", "ifd_ppl", "ifd_gt1", "ifd_cond_loss",
                                                            "ifd_uncond_loss").drop_nulls("ifd")
    own = scores.filter(pl.col("score_predicted")).drop_nulls("ifd")  # as the run's own code predicted them
    own_disagree = int(((own["ifd"] > 1) != (own["ifd_ppl"] > 1)).sum())
    rng = np.random.default_rng(a.seed)
    held = rng.random(comp.height) < a.holdout
    train, test = comp.filter(pl.Series(~held)), comp.filter(pl.Series(held))
    ids = records.join(comp, on="id", how="semi")
    feats = D.features(ids, model=emb["model"], batch_size=emb["batch_size"], max_seq_length=emb["max_seq_length"],
                       flags=scores.join(comp, on="id", how="semi").select(
                           "id", *[c for c in scores.columns if c.startswith("heur_")]))
    alone = {"ifd_gt1": D.DERIVED["ifd_gt1"]}
    results = {}
    t0 = time.strftime("%Y-%m-%d %H:%M")
    load0 = os.getloadavg()
    for name, derived in (("derived (now)", D.DERIVED), ("each alone (before)", alone)):
        with mock.patch.dict(D.DERIVED, derived, clear=True):
            out, _ = D.distill(feats, train, all_ids=ids["id"], seed=a.seed)
        pred = out.filter(pl.col("score_predicted")).join(test, on="id", suffix="_true")
        results[name] = {
            "rows": pred.height,
            **{f"spearman {c}": round(D.spearman(pred[f"{c}_true"].to_numpy(), pred[c].to_numpy()), 4)
               for c in COLUMNS},
            "ifd>1 xor ifd_ppl>1": int(((pred["ifd"] > 1) != (pred["ifd_ppl"] > 1)).sum()),
            "ifd>1 (predicted / computed)": f"{int((pred['ifd'] > 1).sum())} / {int((pred['ifd_true'] > 1).sum())}",
        }
        print(json.dumps({"variant": name, **results[name]}), flush=True)
    one, _ = D.distill(feats, train, all_ids=ids["id"], seed=a.seed, threads=1)
    every, _ = D.distill(feats, train, all_ids=ids["id"], seed=a.seed, threads=None)
    pred = one.filter(pl.col("score_predicted")).join(every, on="id", suffix="_all")
    moved = (pred["ifd"] - pred["ifd_all"]).abs()
    cut = pred["ifd"].quantile(0.9)
    flips = int(((pred["ifd"] >= cut) != (pred["ifd_all"] >= cut)).sum())
    keys = list(next(iter(results.values())))
    lines = [
        "# Predicted IFD columns: derived from ifd and L(A), or each predicted alone "
        "(bench/bench_distill_identities.py)", "",
        f"Command: `CURATE_CACHE_DIR={os.environ.get('CURATE_CACHE_DIR', '.curate')} .venv/bin/python "
        f"bench/bench_distill_identities.py {' '.join(sys.argv[1:])}` ({t0} UTC; load average "
        f"{load0[0]:.1f} before, {os.getloadavg()[0]:.1f} after; {os.cpu_count()} cores).", "",
        f"Run `{run}` (`curate select` on {manifest['config']['inputs'][0].rsplit('/', 1)[-1]}, default "
        f"recipe): its {comp.height:,} LM-computed rows with an IFD, {train.height:,} to train the predictors and "
        f"{test.height:,} held out (seed {a.seed}). Spearman of the predicted against the computed value on the "
        "held-out rows; the last two columns count held-out rows where the predicted ifd and ifd_ppl disagree "
        "about > 1 (no computed row does) and rows predicted / computed above 1.", "",
        "| variant | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    lines += [f"| {name} | " + " | ".join(str(r[k]) for k in keys) + " |" for name, r in results.items()]
    lines += ["", f"Threads: the same fit on every core (threads=None, {os.cpu_count()} here) against one "
              f"(curate's setting): predicted ifd moves by up to {moved.max():.4f} (mean {moved.mean():.4f}) on "
              f"the {pred.height:,} held-out rows; {flips} of them cross the top-10% line of the one-thread "
              "prediction. Before the fix a process's first distill ran on every core.", "",
              f"The run's own `scores.parquet` (predicted by the code the run was made with): {own_disagree:,} of "
              f"its {own.height:,} predicted rows have ifd and ifd_ppl on opposite sides of 1."]
    text = "\n".join(lines) + "\n"
    print(text)
    out = ROOT / "bench" / "results" / "distill-identities.md"
    old = out.read_text() if out.exists() else ""
    reading = old[old.index("\nReading"):] if "\nReading" in old else ""
    out.write_text(text + reading)


if __name__ == "__main__":
    main()
