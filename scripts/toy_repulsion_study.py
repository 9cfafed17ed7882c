"""Does repulsion make a particle set cover both orientations more often?  Measured on the toy prior.

The toy prior with twins (`model.include_twins=true`) has two exactly symmetric posterior
modes per image (the image and its rot180 twin), so the answer is known.  For every
(particle count, repulsion scale) setting, every demo image (20: demo-ffhq + demo-imagenet)
is solved with several seeds; a case counts

* "both orientations" when one particle recovers the image (PSNR ≥ 20 dB and closer to it
  than to the twin) and another recovers the twin (`cores.evaluation.image_record`);
* "≥ 1 correct" when at least one particle recovers the image;

and rates come with 95 % Wilson intervals.  The ratio ||λ·r|| / ||score|| at step 0 and its
maximum over the ON phase are reported too: the toy score's magnitude differs from the LDM's,
so a scale is only comparable through that ratio.  On every ON step the other normaliser is
evaluated on the same latents (no effect on the run), which gives the per-particle factor
||r_rlsd|| / ||r_density|| along real trajectories; `--random-factor` measures the same factor
on Gaussian random features instead and exits.

    python scripts/toy_repulsion_study.py --seeds 3 --out results/toy_repulsion_study
    python scripts/toy_repulsion_study.py --random-factor
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cores.evaluation import image_record, wilson_ci  # noqa: E402
from cores.mcmc import MCMCConfig  # noqa: E402
from cores.pipeline import measure_images  # noqa: E402
from cores.config import RepulsionConfig  # noqa: E402
from repulsion import NORMALIZERS, RepulsionHook, compute_repulsion_gradient  # noqa: E402
from sampler import DAPSConfig, initial_batch, latent_daps  # noqa: E402
from scripts.toy_problem import toy_twins_problem  # noqa: E402



class RatioProbe(RepulsionHook):
    """RepulsionHook that also keeps the per-particle ratio ||λ·r|| / ||score|| (first Euler evaluation)
    of every ON step and the factor ||r_rlsd|| / ||r_density|| of the two normalisers on the same latents."""

    def __init__(self, cfg: RepulsionConfig, model):
        super().__init__(cfg, model)
        self.ratios: Dict[int, List[float]] = {}
        self.factors: Dict[int, List[float]] = {}
        self._probe: Optional[Tuple[int, torch.Tensor, List[torch.Tensor]]] = None

    def wrap_score(self, score_fn, batch, ctx):
        lam = self.factor(ctx.sigma)
        if lam <= 0 or len(batch) == 0:
            return super().wrap_score(score_fn, batch, ctx)
        first: List[torch.Tensor] = []

        def probe(z, sigma):
            out = score_fn(z, sigma)
            if not first:
                first.append(out.flatten(1).norm(dim=1))
            return out

        wrapped = super().wrap_score(probe, batch, ctx)
        groups = batch.image_ids.detach().cpu()
        u, _ = self._feature_latent(batch.zt, ctx.sigma)
        r1, _ = compute_repulsion_gradient(u, self.features, groups, normalizer=self.cfg.normalizer)
        other = "density" if self.cfg.normalizer == "rlsd" else "rlsd"
        r2, _ = compute_repulsion_gradient(u, self.features, groups, normalizer=other)
        n1, n2 = r1.flatten(1).norm(dim=1), r2.flatten(1).norm(dim=1)
        f = (n1 / n2) if self.cfg.normalizer == "rlsd" else (n2 / n1)
        self.factors.setdefault(ctx.step, []).extend(f[torch.isfinite(f)].tolist())
        self._probe = (ctx.step, lam * n1, first)
        return wrapped

    def on_step(self, batch, ctx):
        if self._probe is not None and self._probe[2]:
            step, lam_r, first = self._probe
            self.ratios.setdefault(step, []).extend((lam_r / first[0]).tolist())
        self._probe = None
        super().on_step(batch, ctx)


def run_setting(model, operator, images, gt, ids, seeds, particles, scale, args) -> Dict:
    daps = DAPSConfig.with_steps(args.steps, mcmc=MCMCConfig(num_steps=args.mcmc_steps))
    both = correct = 0
    n = 0
    both2 = correct2 = 0  # particles {0, 1} of an independent (scale 0) run = the 2-particle run, exactly
    ratios: Dict[int, List[float]] = {}
    factors: Dict[int, List[float]] = {}
    t0 = time.perf_counter()
    for seed in seeds:
        y = measure_images(operator, gt, ids, seed)
        batch = initial_batch(model, y, ids, particles, seed, daps.annealing.sigma_max, gt.device)
        rep = None
        if scale > 0:
            rep = RatioProbe(RepulsionConfig(scale=scale, multiplier="linear", sigma_break=args.sigma_break,
                                             sigma_max=daps.annealing.sigma_max, feature=args.feature,
                                             normalizer=args.normalizer), model)
        latent_daps(model, operator, batch, daps, hooks=[rep] if rep is not None else [])
        losses = operator.loss(batch.x, batch.y)
        for k, idx in enumerate(ids):
            rows = batch.rows_of_image(idx)
            rec = image_record(idx, batch.x[rows], gt[k], losses[rows], batch.particle_ids[rows].tolist(),
                               20.0, use_lpips=False)
            both += rec["both_orientations"]
            correct += rec["success"]
            n += 1
            if scale == 0 and particles > 2:
                sub = rows[batch.particle_ids[rows] < 2]
                rec2 = image_record(idx, batch.x[sub], gt[k], losses[sub], [0, 1], 20.0, use_lpips=False)
                both2 += rec2["both_orientations"]
                correct2 += rec2["success"]
        if rep is not None:
            for s, v in rep.ratios.items():
                ratios.setdefault(s, []).extend(v)
            for s, v in rep.factors.items():
                factors.setdefault(s, []).extend(v)
    on = sorted(ratios)
    sub2 = None
    if scale == 0 and particles > 2:
        sub2 = {"particles": 2, "scale": 0.0, "feature": args.feature, "cases": n, "both": both2,
                "both_rate": both2 / n, "both_ci95": wilson_ci(both2, n), "correct": correct2,
                "correct_rate": correct2 / n, "correct_ci95": wilson_ci(correct2, n), "ratio_step0": 0.0,
                "ratio_max_on": 0.0, "on_steps": 0, "time_sec": 0.0, "note": "particles 0-1 of the 4-particle run",
                "normalizer": args.normalizer, "factor_step0": None, "factor_on": None}
    return sub2, {"particles": particles, "scale": scale, "feature": args.feature, "cases": n,
            "both": both, "both_rate": both / n, "both_ci95": wilson_ci(both, n),
            "correct": correct, "correct_rate": correct / n, "correct_ci95": wilson_ci(correct, n),
            "ratio_step0": (sum(ratios[0]) / len(ratios[0])) if 0 in ratios else 0.0,
            "ratio_max_on": max((max(ratios[s]) for s in on), default=0.0),
            "on_steps": len(on), "time_sec": time.perf_counter() - t0, "normalizer": args.normalizer,
            "factor_step0": _mean_sd(factors.get(0, [])), "factor_on": _mean_sd(sum(factors.values(), []))}


def _mean_sd(v: List[float]) -> Optional[Tuple[float, float, float, float]]:
    """(mean, sd, min, max) of a list, None if empty."""
    if not v:
        return None
    t = torch.tensor(v, dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(v) > 1 else 0.0, float(t.min()), float(t.max())


def random_factor(threads: int) -> None:
    """||r_rlsd|| / ||r_density|| per particle on N(0, I) features (identity feature map), by N and D."""
    g = torch.Generator().manual_seed(0)
    print("| N | D | factor rlsd/density: mean ± sd [min, max] | median | density/rlsd (mean) |")
    print("|---|---|---|---|---|")
    for d in (3, 384):
        for n in (2, 3, 4, 8):
            out = []
            for _ in range(1000):
                f = torch.randn(n, d, generator=g, dtype=torch.float64)
                r1, _ = compute_repulsion_gradient(f, lambda v: v, normalizer="rlsd")
                r2, _ = compute_repulsion_gradient(f, lambda v: v, normalizer="density")
                out += (r1.norm(dim=1) / r2.norm(dim=1)).tolist()
            m, sd, lo, hi = _mean_sd(out)
            t = torch.tensor(out, dtype=torch.float64)
            print(f"| {n} | {d} | {m:.3f} ± {sd:.3f} [{lo:.3f}, {hi:.3f}] | {float(t.median()):.3f} | "
                  f"{float((1.0 / t).mean()):.3f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3, help="seeds per image (cases = 20 images × seeds)")
    ap.add_argument("--steps", type=int, default=10, help="annealing steps (the sampler default is 50)")
    ap.add_argument("--mcmc-steps", type=int, default=10, help="Langevin steps per annealing step")
    ap.add_argument("--feature", default="pixel", choices=["pixel", "latent"])
    ap.add_argument("--scales", default="0,10,1000,100", help="comma-separated repulsion scales (4 particles)")
    ap.add_argument("--scales2", default="1000", help="scales > 0 also run with 2 particles (2 @ scale 0 = particles 0-1 of the 4-particle scale-0 run, identical by the per-particle streams)")
    ap.add_argument("--sigma-break", type=float, default=1.0)
    ap.add_argument("--out", default="results/toy_repulsion_study")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--normalizer", default="rlsd", choices=list(NORMALIZERS), help="repulsion_normalizer")
    ap.add_argument("--random-factor", action="store_true",
                    help="only print ||r_rlsd|| / ||r_density|| on Gaussian random features and exit")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.random_factor:
        random_factor(args.threads)
        return
    model, operator, gt, ids = toy_twins_problem()
    seeds = [42 + s for s in range(args.seeds)]
    settings = [(4, float(s)) for s in args.scales.split(",")] + [(2, float(s)) for s in args.scales2.split(",") if s]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    print(f"# toy repulsion study: {len(ids)} images x {len(seeds)} seeds, {args.steps} annealing steps, "
          f"{args.mcmc_steps} Langevin steps, feature={args.feature}, sigma_break={args.sigma_break}, "
          f"normalizer={args.normalizer}", flush=True)
    print("| particles | scale | ratio@step0 | max ratio (ON) | both orientations [95% CI] | >=1 correct [95% CI] | "
          "rlsd/density step 0 | rlsd/density ON | s |")
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    for particles, scale in settings:
        sub2, r = run_setting(model, operator, None, gt, ids, seeds, particles, scale, args)
        for r in ([r] + ([sub2] if sub2 else [])):
            rows.append(r)
            print(f"| {r['particles']} | {r['scale']:g} | {r['ratio_step0']:.3g} | {r['ratio_max_on']:.3g} | "
                  f"{r['both']}/{r['cases']} = {r['both_rate']:.0%} [{r['both_ci95'][0]:.0%}, {r['both_ci95'][1]:.0%}] | "
                  f"{r['correct']}/{r['cases']} = {r['correct_rate']:.0%} [{r['correct_ci95'][0]:.0%}, "
                  f"{r['correct_ci95'][1]:.0%}] | {_fmt(r['factor_step0'])} | {_fmt(r['factor_on'])} | "
                  f"{r['time_sec']:.0f} |", flush=True)
        (out / "study.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


def _fmt(v: Optional[Tuple[float, float, float, float]]) -> str:
    return "—" if v is None else f"{v[0]:.3f} ± {v[1]:.3f} [{v[2]:.3f}, {v[3]:.3f}]"


if __name__ == "__main__":
    main()
