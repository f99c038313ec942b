"""What the earlier `curate eval` verdicts in bench/results/eval.md say under the current difference interval.

Until 2026-12-06 a difference's 95% interval came from a bootstrap that resampled the reference rows and each
arm's 2-3 seeds; that never reaches past the extreme seeds, so random draws that happen to agree gave narrow
intervals. The current one (`curate.eval._diff_ci`) widens the paired row bootstrap by a Welch t-interval over
the per-seed values. The units of most earlier evals went with the machines they ran on, so their sections cannot
be re-summarised; this widens each printed interval's half-widths in quadrature by `seed_halfwidth` of the printed
per-seed losses: an over-estimate (the old half-widths already hold some seed spread), so a comparison that stays
"better" here stays so, and one that turns "no different" is at least not shown. Sections already summarised
with the current interval are left out.

    python bench/eval_intervals.py            # writes bench/results/eval-intervals.md
"""

import re
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from curate.eval import _verdict, seed_halfwidth, widen  # noqa: E402

SRC = ROOT / "bench" / "results" / "eval.md"
OUT = ROOT / "bench" / "results" / "eval-intervals.md"
ARM_ROW = re.compile(r"^\| (\S+) \| (\w+) \| \d+ \| [\d,]+ \| [\d.]+ \[[^]]+\] \| ([\d., ]+) \|", re.M)
DIFF_ROW = re.compile(r"^\| (\S+) \| selected - (random_\w+) \| ([-+\d.]+) \| "
                      r"\[([-+\d.]+), ([-+\d.]+)\] \| ([\w ]+) \|", re.M)


def main() -> None:
    rows = ["# eval-intervals", "", "Command: `python bench/eval_intervals.py` (reads `bench/results/eval.md`). " +
            " ".join(__doc__.split("\n\n")[1].split()), "",
            "| eval (section of \"eval\") | reference | comparison | Δ loss | printed 95% CI | word | seeds | "
            "widened CI | word |", "|---|---|---|---|---|---|---|---|---|"]
    changed = []
    for sec in re.split(r"\n(?=## )", SRC.read_text()):
        title = sec.splitlines()[0].removeprefix("## 2. curate eval: ")
        if not sec.startswith("## 2. curate eval: Alpaca-52k") or "widened by a Welch" in sec:
            continue
        seeds = {(m[1], m[2]): np.array([float(x) for x in m[3].split(",")]) for m in ARM_ROW.finditer(sec)}
        for m in DIFF_ROW.finditer(sec):
            ref, base, mean, lo, hi, old = m[1], m[2], float(m[3]), float(m[4]), float(m[5]), m[6].strip()
            xa, xb = seeds.get((ref, "selected")), seeds.get((ref, base))
            if xa is None or xb is None:
                continue
            nlo, nhi = widen(mean, lo, hi, seed_halfwidth(xa, xb), 4)
            new = _verdict([nlo, nhi], -1)
            if old == new == "no different":
                continue  # widening cannot change it
            rows.append(f"| {title} | {ref} | selected − {base} | {mean:+.4f} | [{lo:+.4f}, {hi:+.4f}] | {old} | "
                        f"{len(xa)}, {len(xb)} | [{nlo:+.4f}, {nhi:+.4f}] | {new} |")
            if new != old:
                changed.append(f"{title}: {ref} selected − {base} {old} → {new}")
    rows += ["", "Rows whose printed word was \"no different\" are left out (widening cannot change them). With one "
             "seed per arm nothing widens: the seed spread is unknown there, and those sections say so.", "",
             "Words that change: " + ("; ".join(changed) if changed else "none") + "."]
    OUT.write_text("\n".join(rows) + "\n")
    print("\n".join(changed))


if __name__ == "__main__":
    main()
