"""Is the fast path equivalent to the exact one on your checkpoints?  A paired verdict on two runs that
differ only in the speed preset (commands_gpu/validate_speed.sh makes them: exp0 on images 0-9).

    python eval/validate_speed.py EXACT_RUN FAST_RUN [--margin-db 0.2]

Prints, on the images both runs hold:
  - the mean difference of best PSNR (fast − exact) with its 95 % t interval;
  - the correct-orientation rates of both and the exact McNemar test of their difference;
  - an equivalence test (two one-sided t-tests at ±margin, α = 0.05): "equivalent within ±M dB" when the
    90 % interval of the mean difference lies inside ±M, else "not shown equivalent".
A run pair that differs in more than the preset (seed, images, batching, determinism, device, GPU) gets one
warning line naming those keys.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from eval.markdown import fmt  # noqa: E402
from eval.parse_metrics import find_run_dirs, load_runs, paired_comparison  # noqa: E402
from eval.study import (differences_text, equivalence_tost, mean_ci, orientation_pair,  # noqa: E402
                        protocol_differences)

DEFAULT_MARGIN_DB = 0.2
# what the two runs are meant to differ in: the preset and the precision it sets
SPEED_KEYS = {"preset", "precision"}


def verdict(exact, fast, margin_db: float = DEFAULT_MARGIN_DB) -> Dict:
    """The paired numbers of fast vs exact (loaded runs, see eval/parse_metrics.py)."""
    comp = paired_comparison(exact, fast)
    diffs = [r["diff"] for r in comp["rows"]]
    orient = orientation_pair(exact, fast)["correct_orientation_found"]
    other = [d for d in protocol_differences(exact, fast) if d[0] not in SPEED_KEYS]
    return {"exact": exact.label, "fast": fast.label, "n": comp["n"], "delta_best_psnr": mean_ci(diffs),
            "orientation": orient, "tost": equivalence_tost(diffs, margin_db), "margin_db": float(margin_db),
            "other_differences": other}


def verdict_lines(v: Dict) -> str:
    d, o, t, m = v["delta_best_psnr"], v["orientation"], v["tost"], v["margin_db"]
    lines = [f"fast vs exact on {v['n']} paired images: {v['fast']} vs {v['exact']}"]
    if v["other_differences"]:
        lines.insert(0, "warning: the runs differ in more than the speed preset: "
                     + differences_text(v["other_differences"]))
    ci = (f"[{fmt(d['low'], '{:+.2f}')}, {fmt(d['high'], '{:+.2f}')}]" if d["low"] is not None else "n/a")
    lines.append(f"Δ best PSNR (fast − exact): mean {fmt(d['mean'], '{:+.3f}')} dB, 95% CI {ci} (n={d['n']})")
    delta_rate = (o["b_rate"] - o["a_rate"]) if o["n"] else None
    lines.append(f"Δ correct-orientation rate: {fmt(o['a_rate'], '{:.0%}')} → {fmt(o['b_rate'], '{:.0%}')} "
                 f"({fmt(None if delta_rate is None else 100 * delta_rate, '{:+.0f}')} points; only exact "
                 f"{o['a_only']}, only fast {o['b_only']}), McNemar exact p = {o['p_value']:.3g}")
    if t["p_value"] is None:
        lines.append(f"equivalence (TOST at ±{m:g} dB): not shown equivalent ({t['note']})")
    else:
        word = f"equivalent within ±{m:g} dB" if t["equivalent"] else "not shown equivalent"
        lines.append(f"equivalence (TOST, α = {t['alpha']:g}): 90% CI [{t['low']:+.3f}, {t['high']:+.3f}] dB, "
                     f"p = {t['p_value']:.3g} → {word}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("exact", help="run folder of the exact path")
    ap.add_argument("fast", help="run folder of the fast path")
    ap.add_argument("--margin-db", type=float, default=DEFAULT_MARGIN_DB,
                    help=f"equivalence margin on the mean Δ best PSNR (dB; default {DEFAULT_MARGIN_DB})")
    args = ap.parse_args(argv)
    if not args.margin_db > 0:
        print(f"error: --margin-db must be > 0 (got {args.margin_db})", file=sys.stderr)
        return 2
    dirs = [find_run_dirs([p]) for p in (args.exact, args.fast)]
    for p, found in zip((args.exact, args.fast), dirs):
        if len(found) != 1:
            print(f"error: {p}: expected one run folder with a metrics.json, found {len(found)}", file=sys.stderr)
            return 2
    exact, fast = load_runs([dirs[0][0], dirs[1][0]], merge=False)
    print(verdict_lines(verdict(exact, fast, args.margin_db)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
