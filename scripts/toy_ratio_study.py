"""Does one target ratio ρ = ||λr|| / ||score|| transfer across particle counts where one λ does not?

Toy prior with twins (two exactly symmetric posterior modes per image, so the answer is known),
20 demo images × seeds per setting.  Settings: N ∈ {2, 4} particles × ρ (`repulsion_target_ratio`),
plus fixed-λ controls: the mean λ that a chosen ρ amounted to at one N, run at the other N.
Per setting: both-orientations and ≥ 1-correct rates with Wilson 95 % intervals, the logged ratio
at step 0 and over the logged ON steps, and the λ used (`repulsion_scale_used`: per image and ON
step; mean over all ON steps from the image records, step 0 from the log).

ρ = 0 at N = 2 is particles 0–1 of the N = 4, ρ = 0 run (per-particle streams make them the
same run, exactly).

    python scripts/toy_ratio_study.py --seeds 3 --threads 1 --out results/toy_ratio_study
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cores.config import RepulsionConfig  # noqa: E402
from cores.evaluation import image_record, wilson_ci  # noqa: E402
from cores.mcmc import MCMCConfig  # noqa: E402
from cores.pipeline import measure_images  # noqa: E402
from repulsion import RepulsionHook  # noqa: E402
from sampler import DAPSConfig, initial_batch, latent_daps  # noqa: E402
from scripts.toy_problem import toy_twins_problem  # noqa: E402



def _mean(v: List[float]) -> Optional[float]:
    return sum(v) / len(v) if v else None


def run_setting(model, operator, gt, ids, seeds, particles: int, rho: Optional[float], scale: float,
                args) -> List[Dict]:
    """One setting over all seeds; with ρ = 0 and N > 2 also the 2-particle subset row."""
    daps = DAPSConfig.with_steps(args.steps, mcmc=MCMCConfig(num_steps=args.mcmc_steps))
    counts = {"both": 0, "correct": 0, "both2": 0, "correct2": 0, "n": 0}
    lines: List[Dict] = []
    lam_mean: List[float] = []
    t0 = time.perf_counter()
    for seed in seeds:
        y = measure_images(operator, gt, ids, seed)
        batch = initial_batch(model, y, ids, particles, seed, daps.annealing.sigma_max, gt.device)
        hook = None
        if (rho or 0) > 0 or scale > 0:
            hook = RepulsionHook(RepulsionConfig(scale=scale, multiplier="linear", target_ratio=rho if (rho or 0) > 0 else None,
                                                 sigma_break=args.sigma_break, sigma_max=daps.annealing.sigma_max,
                                                 feature="pixel"), model)
        latent_daps(model, operator, batch, daps, hooks=[hook] if hook else [])
        losses = operator.loss(batch.x, batch.y)
        for k, idx in enumerate(ids):
            rows = batch.rows_of_image(idx)
            rec = image_record(idx, batch.x[rows], gt[k], losses[rows], batch.particle_ids[rows].tolist(),
                               20.0, use_lpips=False)
            counts["both"] += rec["both_orientations"]
            counts["correct"] += rec["success"]
            counts["n"] += 1
            if hook is None and particles > 2:
                sub = rows[batch.particle_ids[rows] < 2]
                rec2 = image_record(idx, batch.x[sub], gt[k], losses[sub], [0, 1], 20.0, use_lpips=False)
                counts["both2"] += rec2["both_orientations"]
                counts["correct2"] += rec2["success"]
            if hook is not None:
                out = hook.image_output(idx, {})
                lines += out.jsonl["repulsion"]
                if out.record["repulsion"].get("scale_used_mean") is not None:
                    lam_mean.append(out.record["repulsion"]["scale_used_mean"])
    on = [l for l in lines if l["repulsion_on"]]
    s0 = [l for l in on if l["step"] == 0]
    n = counts["n"]
    row = {"particles": particles, "rho": rho, "scale": scale, "cases": n, "time_sec": time.perf_counter() - t0,
           "both": counts["both"], "both_ci95": wilson_ci(counts["both"], n),
           "correct": counts["correct"], "correct_ci95": wilson_ci(counts["correct"], n),
           "ratio_step0": _mean([l["ratio_per_particle_at_sigma"] for l in s0]),
           "ratio_on_mean": _mean([l["ratio_per_particle_at_sigma"] for l in on]),
           "ratio_on_range": [min((l["ratio_per_particle_at_sigma"] for l in on), default=None),
                              max((l["ratio_per_particle_at_sigma"] for l in on), default=None)],
           "lambda_step0": _mean([l["repulsion_scale_used"] for l in s0]),
           "lambda_step0_range": [min((l["repulsion_scale_used"] for l in s0), default=None),
                                  max((l["repulsion_scale_used"] for l in s0), default=None)],
           "lambda_on_mean": _mean(lam_mean) if lam_mean else (scale if scale > 0 else None),
           "lambda_on_range": [min((l["repulsion_scale_used"] for l in on), default=None),
                               max((l["repulsion_scale_used"] for l in on), default=None)]}
    rows_out = [row]
    if hook is None and particles > 2:
        rows_out.append({**row, "particles": 2, "both": counts["both2"], "both_ci95": wilson_ci(counts["both2"], n),
                         "correct": counts["correct2"], "correct_ci95": wilson_ci(counts["correct2"], n),
                         "note": f"particles 0-1 of the {particles}-particle run", "time_sec": 0.0})
    return rows_out


def _pct(k: int, n: int, ci) -> str:
    return f"{k}/{n} = {k / n:.0%} [{ci[0]:.0%}, {ci[1]:.0%}]"


def _g(v: Optional[float]) -> str:
    return "—" if v is None else f"{v:.3g}"


def print_row(r: Dict) -> None:
    what = (f"ρ = {r['rho']:g}" if r["rho"] is not None else
            f"λ = {r['scale']:.4g} (ρ = {r['lambda_from']:g} at N = {r['lambda_from_n']})" if r["scale"] > 0 else
            "ρ = 0 (off)")
    lam = (f"{_g(r['lambda_on_mean'])} [{_g(r['lambda_on_range'][0])}, {_g(r['lambda_on_range'][1])}]"
           if r["lambda_on_range"][0] is not None else "—")
    print(f"| {r['particles']} | {what} | {_g(r['ratio_step0'])} | {_g(r['ratio_on_mean'])} | "
          f"{_g(r['lambda_step0'])} | {lam} | {_pct(r['both'], r['cases'], r['both_ci95'])} | "
          f"{_pct(r['correct'], r['cases'], r['correct_ci95'])} | {r['time_sec']:.0f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3, help="seeds per image (cases = 20 images × seeds)")
    ap.add_argument("--steps", type=int, default=10, help="annealing steps (the sampler default is 50)")
    ap.add_argument("--mcmc-steps", type=int, default=10, help="Langevin steps per annealing step")
    ap.add_argument("--rhos", default="0,0.1,0.3,1,3", help="comma-separated target ratios (0 = no repulsion)")
    ap.add_argument("--particles", default="4,2", help="comma-separated particle counts")
    ap.add_argument("--lambda-from", type=float, default=1.0,
                    help="fixed-λ control: the mean λ this ρ used at each N, run at the other N (0 = none)")
    ap.add_argument("--sigma-break", type=float, default=1.0)
    ap.add_argument("--out", default="results/toy_ratio_study")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, operator, gt, ids = toy_twins_problem()
    seeds = [42 + s for s in range(args.seeds)]
    rhos = [float(v) for v in args.rhos.split(",")]
    counts = sorted((int(v) for v in args.particles.split(",")), reverse=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"# toy target-ratio study: {len(ids)} images x {len(seeds)} seeds, {args.steps} annealing x "
          f"{args.mcmc_steps} Langevin steps, pixel features, sigma_break={args.sigma_break}", flush=True)
    print("| N | setting | ratio step 0 | ratio ON (mean) | λ step 0 | λ ON: mean [min, max] | both orientations "
          "[95% CI] | >=1 correct [95% CI] | s |")
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    rows: List[Dict] = []
    done = set()
    for n in counts:
        for rho in rhos:
            if (n, rho) in done:
                continue
            for r in run_setting(model, operator, gt, ids, seeds, n, rho if rho > 0 else None, 0.0, args):
                done.add((r["particles"], rho))
                rows.append(r)
                print_row(r)
            (out / "study.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    for m in counts if args.lambda_from > 0 else []:  # one λ at every other particle count
        ref = [r for r in rows if r["particles"] == m and r["rho"] == args.lambda_from and r["lambda_on_mean"]]
        if not ref:
            continue
        lam = float(f"{ref[0]['lambda_on_mean']:.3g}")
        for n in counts:
            if n == m:
                continue
            for r in run_setting(model, operator, gt, ids, seeds, n, None, lam, args):
                r.update(lambda_from=args.lambda_from, lambda_from_n=m)
                rows.append(r)
                print_row(r)
            (out / "study.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
