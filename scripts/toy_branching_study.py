"""Branching after pruning at (about) equal compute, on the toy prior with twins.

The toy prior with twins (`include_twins`) has two exactly symmetric posterior modes per image
(the image and its rot180 twin), so which orientation each particle found is known.  Every demo
image (20: demo-ffhq + demo-imagenet) is solved with several seeds (cases = images × seeds), in
each of these settings:

* `indep4`: 4 independent particles;
* `rep4`: 4 particles with repulsion (RLSD normaliser, pixel features, constant, σ ≥ σ_break);
* `prune4-2 <criterion>`: 4 particles, pruned to 2 at the step nearest σ = `--prune-sigma`;
* `branch4-2-4 <criterion>`: the same prune, then the 2 survivors cloned back to 4
  (`pruning_refill`: each clone draws from its own stream from the next step on);
* `rep4-2(-4) diversity`: repulsion before the prune (the Exp2/Exp5 shape), with and without refill.

Per case (`cores.evaluation.image_record` on the final particles): best PSNR, correct
orientation found / both orientations at any PSNR (1 dB margin), the same at ≥ 20 dB, and
selection: the lowest-loss particle is the best by PSNR, is in the ground-truth orientation,
and the dB it loses to the best.  Rates carry Wilson 95 %
intervals, mean best PSNR a bootstrap 95 % interval; compute is counted as particle-steps (rows
entering the MCMC of each annealing step; each = 2 ODE evaluations + the Langevin steps) and CPU
seconds.  Against `indep4` the table gives the discordant pairs (cases gained / lost) of the
correct-orientation rate.

    python scripts/toy_branching_study.py --seeds 3 --threads 1          # 20 images × 3 seeds
    python scripts/toy_branching_study.py --seeds 1 --mcmc-steps 2       # smoke
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cores.config import PruningConfig, RepulsionConfig  # noqa: E402
from cores.data import ImageFolder  # noqa: E402
from cores.evaluation import image_record, wilson_ci  # noqa: E402
from cores.mcmc import MCMCConfig  # noqa: E402
from cores.models import build_model  # noqa: E402
from cores.operators import get_operator  # noqa: E402
from cores.pipeline import measure_images  # noqa: E402
from cores.pruning import PruningHook  # noqa: E402
from cores.scheduler import EDMScheduler  # noqa: E402
from repulsion import RepulsionHook  # noqa: E402
from sampler import DAPSConfig, SamplerHook, initial_batch, latent_daps  # noqa: E402

ROOTS = {"dataset/demo-ffhq": 0, "dataset/demo-imagenet": 100}  # image-id offset per folder
# name -> (repulsion on, pruning criterion or None, refill)
SETTINGS: Dict[str, Tuple[bool, Optional[str], bool]] = {
    "indep4": (False, None, False),
    "rep4": (True, None, False),
    "prune4-2 loss": (False, "loss", False),
    "prune4-2 diversity": (False, "diversity", False),
    "branch4-2-4 loss": (False, "loss", True),
    "branch4-2-4 diversity": (False, "diversity", True),
    "rep4-2 diversity": (True, "diversity", False),
    "rep4-2-4 diversity": (True, "diversity", True),
}


class RowSteps(SamplerHook):
    """Counts particle-steps: rows that went through each annealing step's ODE + MCMC."""

    def __init__(self) -> None:
        self.count = 0

    def on_step(self, batch, ctx) -> None:  # called after MCMC, before any pruning hook listed later
        self.count += len(batch)


def run_setting(name: str, model, operator, gt, ids: List[int], seeds: List[int], args, prune_step: int) -> Dict:
    rep_on, criterion, refill = SETTINGS[name]
    daps = DAPSConfig.with_steps(args.steps, mcmc=MCMCConfig(num_steps=args.mcmc_steps))
    cases: List[Dict] = []
    steps = 0
    t0, c0 = time.perf_counter(), time.process_time()
    for seed in seeds:
        y = measure_images(operator, gt, ids, seed)
        batch = initial_batch(model, y, ids, 4, seed, daps.annealing.sigma_max, gt.device)
        counter = RowSteps()
        hooks: List[SamplerHook] = [counter]
        if rep_on:
            hooks.insert(0, RepulsionHook(RepulsionConfig(scale=args.scale, multiplier="linear", sigma_break=args.sigma_break,
                                                          sigma_max=daps.annealing.sigma_max, feature="pixel",
                                                          target_ratio=args.target_ratio), model))
        prune = None
        if criterion is not None:  # as the pipeline: the σ_break transition triggers only while repulsion is on
            prune = PruningHook(PruningConfig(step=prune_step, keep=2, criterion=criterion, refill=refill,
                                              sigma_break=args.sigma_break if rep_on else None))
            hooks.append(prune)
        latent_daps(model, operator, batch, daps, hooks=hooks)
        steps += counter.count
        with torch.no_grad():
            losses = operator.loss(batch.x, batch.y)
        for k, idx in enumerate(ids):
            rows = batch.rows_of_image(idx)
            rec = image_record(idx, batch.x[rows], gt[k], losses[rows], batch.particle_ids[rows].tolist(), 20.0,
                               use_lpips=False)
            case = {"image_idx": idx, "seed": seed, **{key: rec[key] for key in (
                "particle_ids", "psnr", "psnr_twin", "orientation", "best_idx", "selected_idx", "success",
                "both_orientations", "correct_orientation_found", "both_orientations_any")}}
            if prune is not None:
                line = prune.lines[idx]
                case["prune"] = {key: line.get(key) for key in ("prune_step", "trigger", "kept_indices",
                                                                "pruned_indices", "parents")}
            cases.append(case)
    return {"name": name, "cases": cases, "particle_steps": steps, "wall_sec": time.perf_counter() - t0,
            "cpu_sec": time.process_time() - c0}


def bootstrap_mean_ci(v: List[float], reps: int = 2000) -> Tuple[float, float, float]:
    rng = random.Random(0)
    means = sorted(sum(rng.choices(v, k=len(v))) / len(v) for _ in range(reps))
    return sum(v) / len(v), means[int(0.025 * reps)], means[int(0.975 * reps) - 1]


def summarize(res: Dict, base: Optional[Dict]) -> Dict:
    cs = res["cases"]
    n = len(cs)

    def rate(key: str) -> Dict:
        k = sum(bool(c[key]) for c in cs)
        return {"k": k, "n": n, "rate": k / n, "ci95": wilson_ci(k, n)}

    best = [c["psnr"][c["best_idx"]] for c in cs if c["best_idx"] is not None]
    sel = sum(c["selected_idx"] == c["best_idx"] for c in cs)
    sel_gt = sum(c["orientation"][c["selected_idx"]] == "gt" for c in cs)
    out = {"name": res["name"], "cases": n, "particle_steps_per_case": res["particle_steps"] / n,
           "cpu_sec": res["cpu_sec"], "wall_sec": res["wall_sec"], "best_psnr": bootstrap_mean_ci(best),
           "selected_psnr": sum(c["psnr"][c["selected_idx"]] for c in cs) / n,
           "correct_any": rate("correct_orientation_found"), "both_any": rate("both_orientations_any"),
           "success20": rate("success"), "both20": rate("both_orientations"),
           "selection": {"k": sel, "n": n, "rate": sel / n, "ci95": wilson_ci(sel, n)},
           "selected_gt": {"k": sel_gt, "n": n, "rate": sel_gt / n, "ci95": wilson_ci(sel_gt, n)},
           "selection_db_lost": sum(c["psnr"][c["best_idx"]] - c["psnr"][c["selected_idx"]] for c in cs) / n,
           "prune_steps": sorted({c["prune"]["prune_step"] for c in cs if "prune" in c})}
    if base is not None:
        b = {(c["image_idx"], c["seed"]): c for c in base["cases"]}
        key = "correct_orientation_found"
        out["vs_indep4_correct_gained_lost"] = (
            sum(c[key] and not b[(c["image_idx"], c["seed"])][key] for c in cs),
            sum(not c[key] and b[(c["image_idx"], c["seed"])][key] for c in cs))
    return out


def table(rows: List[Dict]) -> str:
    def r(v: Dict) -> str:
        return f"{v['rate']:.0%} [{v['ci95'][0]:.0%}, {v['ci95'][1]:.0%}]"

    lines = ["| setting | particle-steps / case | CPU s | best PSNR dB [95 % CI] | correct orient. (any PSNR) | "
             "both orient. (any PSNR) | ≥ 1 correct ≥ 20 dB | both ≥ 20 dB | selected = best | selected is gt | "
             "selected PSNR dB (lost to best) | correct gained / lost vs indep4 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in rows:
        m, lo, hi = s["best_psnr"]
        gl = s.get("vs_indep4_correct_gained_lost")
        lines.append(f"| {s['name']} | {s['particle_steps_per_case']:.0f} | {s['cpu_sec']:.0f} | {m:.2f} [{lo:.2f}, "
                     f"{hi:.2f}] | {r(s['correct_any'])} | {r(s['both_any'])} | {r(s['success20'])} | "
                     f"{r(s['both20'])} | {r(s['selection'])} | {r(s['selected_gt'])} | "
                     f"{s['selected_psnr']:.2f} ({s['selection_db_lost']:.2f}) | "
                     f"{'—' if gl is None else f'{gl[0]} / {gl[1]}'} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3, help="seeds per image (cases = 20 images × seeds)")
    ap.add_argument("--steps", type=int, default=10, help="annealing steps")
    ap.add_argument("--mcmc-steps", type=int, default=10, help="Langevin steps per annealing step")
    ap.add_argument("--scale", type=float, default=430.0, help="repulsion scale (430: step-0 ratio ≈ 1 on the toy)")
    ap.add_argument("--target-ratio", type=float, default=None,
                    help="repulsion_target_ratio ρ instead of the fixed scale (λ set per step: ||λr|| / ||score|| = ρ)")
    ap.add_argument("--sigma-break", type=float, default=1.0)
    ap.add_argument("--prune-sigma", type=float, default=1.0, help="prune at the annealing step nearest this σ")
    ap.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated subset of: " + ", ".join(SETTINGS))
    ap.add_argument("--out", default="results/toy_branching_study")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(__file__).resolve().parents[1]
    model = build_model({"name": "toy", "prior_images": [str(root / r) for r in ROOTS], "include_twins": True,
                         "std": 0.05}, "cpu")
    operator = get_operator("phase_retrieval", oversample=2.0, resolution=64, sigma=0.05)
    xs, ids = [], []
    for r, off in ROOTS.items():
        ds = ImageFolder(root / r, 64, 0, None)
        xs += [ds[i] for i in range(len(ds))]
        ids += [off + i for i in ds.indices]
    with torch.no_grad():
        gt = model.reference_image(torch.stack(xs))
    sig = EDMScheduler(args.steps, 10.0, 0.1, "poly-7").sigma_steps[:args.steps]
    prune_step = int(torch.argmin((sig - args.prune_sigma).abs()))
    seeds = [42 + s for s in range(args.seeds)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"# toy branching study: {len(ids)} images x {len(seeds)} seeds, {args.steps} x {args.mcmc_steps} steps, "
          f"prune 4 -> 2 at step {prune_step} (sigma {float(sig[prune_step]):.3f}; sigmas "
          f"{[round(float(s), 3) for s in sig]}), repulsion """
          f"{f'target ratio {args.target_ratio:g}' if args.target_ratio else f'scale {args.scale:g}'} "
          f"(sigma >= {args.sigma_break})",
          flush=True)
    results, rows = {}, []
    for name in args.settings.split(","):
        res = run_setting(name, model, operator, gt, ids, seeds, args, prune_step)
        results[name] = res
        rows.append(summarize(res, results.get("indep4") if name != "indep4" else None))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
        (out / "study.json").write_text(json.dumps({"args": vars(args), "prune_step": prune_step,
                                                    "sigmas": sig.tolist(), "rows": rows,
                                                    "cases": {k: v["cases"] for k, v in results.items()}}))
    (out / "summary.md").write_text(table(rows) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
