"""Pruning regret of the `loss` vs `diversity` criteria on the exact toy prior with twins.

Cases = (image, seed) pairs; each case runs 4 independent LatentDAPS particles
on the two-mode toy posterior (the image and its rot180 twin).  Pruning is
evaluated in shadow mode (flagged particles run on; this mode was called masking
before masking came to freeze them): both criteria look at the same step-`step`
state and flag 2 of 4 particles; since the particles are independent chains (no
repulsion), a flagged particle's final result is exactly what slicing would
have discarded.  Regret = the best final particle (by PSNR to the ground truth)
was flagged; orientation regret = some particle found the correct orientation
(PSNR ≥ 20 dB and ≥ twin PSNR) but no kept one did.  Time saved: the same
batches re-run with slicing (4 → 2) against the masking run (= no pruning,
plus one decode at the pruning step).

    python scripts/toy_pruning_study.py                # 10 images × 5 seeds = 50 cases
    python scripts/toy_pruning_study.py --seeds 2 --images 4 --mcmc-steps 3   # smoke
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cores.data import ImageFolder  # noqa: E402
from cores.evaluation import psnr, wilson_ci  # noqa: E402
from cores.mcmc import MCMCConfig  # noqa: E402
from cores.models import build_model  # noqa: E402
from cores.operators import get_operator  # noqa: E402
from cores.pipeline import measure_images  # noqa: E402
from cores.pruning import PruningConfig, PruningHook, pruning_regret  # noqa: E402
from sampler import DAPSConfig, initial_batch, latent_daps  # noqa: E402

SUCCESS_DB = 20.0


def run_seed(model, op, gt, ids: List[int], seed: int, daps: DAPSConfig, args, mode: str) -> Dict:
    y = measure_images(op, gt, ids, seed)
    batch = initial_batch(model, y, ids, args.particles, seed, daps.annealing.sigma_max, torch.device("cpu"))
    hooks = [PruningHook(PruningConfig(step=args.step, keep=args.keep, mode=mode, criterion=c,
                                       diversity_tol=args.tol, sigma_break=args.sigma_break))
             for c in (("loss", "diversity") if mode == "shadow" else ("loss",))]
    t0, c0 = time.perf_counter(), time.process_time()
    stamps: List[float] = []
    latent_daps(model, op, batch, daps, hooks=hooks,
                callback=lambda info: stamps.append(info["time"]) if info["stage"] in ("begin", "step") else None)
    return {"batch": batch, "hooks": hooks, "time": time.perf_counter() - t0, "cpu": time.process_time() - c0,
            "per_step": [b - a for a, b in zip(stamps, stamps[1:])]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=10)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--particles", type=int, default=4)
    ap.add_argument("--keep", type=int, default=2)
    ap.add_argument("--step", type=int, default=29)
    ap.add_argument("--sigma-break", type=float, default=1.0)
    ap.add_argument("--tol", type=float, default=0.5, help="diversity: candidates within (1+tol)·best loss")
    ap.add_argument("--mcmc-steps", type=int, default=5)
    ap.add_argument("--timing-seeds", type=int, default=2, help="seeds re-run with slicing for the time saved")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="results/toy_pruning_study")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model = build_model({"name": "toy", "prior_images": [str(ROOT / "dataset/demo-ffhq"),
                                                          str(ROOT / "dataset/demo-imagenet")],
                         "std": 0.05, "include_twins": True})
    op = get_operator("phase_retrieval", oversample=2.0, resolution=64, sigma=0.05)
    ds = ImageFolder(ROOT / "dataset/demo-ffhq", 64, 0, args.images)
    ids = list(range(len(ds)))
    gt = model.reference_image(torch.stack([ds[i] for i in ids]))
    daps = DAPSConfig.with_steps(50, mcmc=MCMCConfig(num_steps=args.mcmc_steps))

    cases, timing = [], []
    for seed in range(args.seeds):
        res = run_seed(model, op, gt, ids, seed, daps, args, "shadow")
        b = res["batch"]
        for k, img in enumerate(ids):
            rows = b.rows_of_image(img)
            pids = b.particle_ids[rows].tolist()
            p = psnr(b.x[rows], gt[k:k + 1]).tolist()
            pt = psnr(b.x[rows], gt[k:k + 1].flip(-2, -1)).tolist()
            correct = {pid for pid, a, t in zip(pids, p, pt) if a >= SUCCESS_DB and a >= t}
            case = {"image_idx": img, "seed": seed, "psnr": p, "psnr_twin": pt, "particle_ids": pids,
                    "correct_found": bool(correct)}
            for hook in res["hooks"]:
                rec = hook.lines[img]
                r = pruning_regret(p, pids, rec["pruned_indices"])
                kept = set(rec["kept_indices"])
                case[hook.cfg.criterion] = {**r, "kept": rec["kept_indices"], "prune_step": rec["prune_step"],
                                            "trigger": rec["trigger"],
                                            "orientation_regret": bool(correct) and not (correct & kept)}
            cases.append(case)
        line = {"seed": seed, "masking_sec": res["time"], "masking_cpu_sec": res["cpu"]}
        if seed < args.timing_seeds:
            sl = run_seed(model, op, gt, ids, seed, daps, args, "slicing")
            line.update(slicing_sec=sl["time"], slicing_cpu_sec=sl["cpu"], steps_after_masking=sum(res["per_step"][args.step + 1:]),
                        steps_after_slicing=sum(sl["per_step"][args.step + 1:]))
            # slicing keeps exactly the loss-kept particles and ends where masking's do
            kb, mb = sl["batch"], res["batch"]
            for r in range(len(kb)):
                m = ((mb.image_ids == kb.image_ids[r]) & (mb.particle_ids == kb.particle_ids[r])).nonzero().item()
                line.setdefault("max_abs_diff_slicing_vs_masking", 0.0)
                line["max_abs_diff_slicing_vs_masking"] = max(line["max_abs_diff_slicing_vs_masking"],
                                                              float((kb.x[r] - mb.x[m]).abs().max()))
        timing.append(line)
        print(json.dumps(line), file=sys.stderr)

    n = len(cases)
    summary = {"cases": n, "settings": vars(args)}
    for crit in ("loss", "diversity"):
        k = sum(c[crit]["pruning_regret"] for c in cases)
        nf = sum(c["correct_found"] for c in cases)
        ko = sum(c[crit]["orientation_regret"] for c in cases)
        gaps = [c[crit]["pruning_regret_db"] for c in cases if c[crit]["pruning_regret"]]
        summary[crit] = {"regret": k, "regret_rate": k / n, "regret_ci95": wilson_ci(k, n),
                         "mean_regret_db_when_regret": sum(gaps) / len(gaps) if gaps else 0.0,
                         "cases_correct_found": nf, "orientation_regret": ko,
                         "orientation_regret_rate": ko / nf if nf else None,
                         "orientation_regret_ci95": wilson_ci(ko, nf)}
    t = [x for x in timing if "slicing_sec" in x]
    if t:
        m, s = sum(x["masking_sec"] for x in t), sum(x["slicing_sec"] for x in t)
        mc, sc = sum(x["masking_cpu_sec"] for x in t), sum(x["slicing_cpu_sec"] for x in t)
        summary["time"] = {"seeds": len(t), "no_pruning_sec": m, "slicing_sec": s, "saved_frac": 1 - s / m,
                           "no_pruning_cpu_sec": mc, "slicing_cpu_sec": sc, "saved_cpu_frac": 1 - sc / mc,
                           "post_prune_steps_saved_frac": 1 - sum(x["steps_after_slicing"] for x in t)
                           / sum(x["steps_after_masking"] for x in t),
                           "max_abs_diff_slicing_vs_masking": max(x["max_abs_diff_slicing_vs_masking"] for x in t)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cases.json").write_text(json.dumps({"summary": summary, "timing": timing, "cases": cases}, indent=1))
    print(table(summary))
    (out / "summary.md").write_text(table(summary) + "\n")


def table(s: Dict) -> str:
    def ci(v):
        return f"[{v[0]:.2f}, {v[1]:.2f}]" if v[0] is not None else "n/a"

    lines = [f"Toy prior with twins, {s['cases']} cases, prune at step {s['settings']['step']} "
             f"({s['settings']['particles']} → {s['settings']['keep']}), diversity tol {s['settings']['tol']}",
             "", "| criterion | regret (best particle pruned) | 95% CI | mean dB lost when regret | "
             "orientation regret | 95% CI |", "|---|---|---|---|---|---|"]
    for c in ("loss", "diversity"):
        r = s[c]
        orr = "n/a" if r["orientation_regret_rate"] is None else \
            f"{r['orientation_regret']}/{r['cases_correct_found']} ({r['orientation_regret_rate']:.0%})"
        lines.append(f"| {c} | {r['regret']}/{s['cases']} ({r['regret_rate']:.0%}) | {ci(r['regret_ci95'])} | "
                     f"{r['mean_regret_db_when_regret']:.2f} | {orr} | {ci(r['orientation_regret_ci95'])} |")
    if "time" in s:
        t = s["time"]
        lines += ["", f"Time ({t['seeds']} seed batches): no pruning {t['no_pruning_sec']:.1f} s, slicing "
                      f"{t['slicing_sec']:.1f} s → saved {t['saved_frac']:.0%} wall; process CPU time "
                      f"{t['no_pruning_cpu_sec']:.1f} → {t['slicing_cpu_sec']:.1f} s → saved {t['saved_cpu_frac']:.0%}; "
                      f"{t['post_prune_steps_saved_frac']:.0%} of the post-prune steps; "
                      f"max |x_slicing − x_masking| of kept particles {t['max_abs_diff_slicing_vs_masking']:.1e}"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
