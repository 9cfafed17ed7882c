"""DAPS, ReSample (pixel stage on / off) and the Exp5 setting on the toy prior with twins.

Each method is an ordinary run of the pipeline (the configs the experiments use, `MODEL=toy`
overrides): DAPS = exp0, Exp5 = exp5_final (repulsion + pruning 4 → 2), ReSample = exp0 with
`sampler=resample` (toy defaults: configs/model_sampler_defaults/toy_resample.yaml), and
ReSample with `sampler.pixel_stage=false`.  Images: the demo sets (demo-ffhq 0–9 and
demo-imagenet 0–9 = 20 images), 4 particles, seed 42.  Reported per method: both-orientations
rate (a particle ≥ 20 dB against the ground truth and one against its twin) with a Wilson 95 %
interval, best PSNR in any orientation (mean and t 95 % interval over images), seconds per image
and network evaluations per image (the pipeline's `compute` field: row units, counted where
the networks are called).

    python scripts/toy_resample_study.py --per-set 10 --out results/toy_resample_study
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
METHODS = {
    "DAPS (exp0)": ["+experiment=exp0_baseline"],
    "ReSample": ["+experiment=exp0_baseline", "sampler=resample", "repulsion_log_baseline=false"],
    "ReSample latent-stages": ["+experiment=exp0_baseline", "sampler=resample", "repulsion_log_baseline=false",
                                "sampler.pixel_stage=false"],
    "Exp5 (repulsion + pruning 4→2)": ["+experiment=exp5_final"],
}


def compose(overrides: List[str]):
    from hydra import compose as hcompose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return hcompose(config_name="config", overrides=overrides)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-set", type=int, default=10, help="images per demo set (10 = all 20 images)")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "toy_resample_study")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma list of method names")  # names hold no comma
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import numpy as np
    import torch
    from scipy import stats

    from cores.evaluation import wilson_ci
    from cores.pipeline import run as pipeline_run

    torch.set_num_threads(args.threads)
    results = {}
    for method in args.methods.split(","):
        recs, evals = [], []
        for ds in ("ffhq", "imagenet"):
            name = method.split(" (")[0].replace(" ", "_") + f"/{ds}"
            over = METHODS[method] + [f"model=toy", f"data=demo-{ds}", "model.include_twins=true", "speed=exact",
                                      "eval.lpips=false", f"data.end_id={args.per_set}", f"save_dir={args.out}",
                                      f"name={name}", "resume=true"]
            cfg = compose(over)
            m = pipeline_run(cfg)
            for r in m["images"]:
                recs.append(r)
                evals.append(r["compute"])
        n = len(recs)
        both = sum(bool(r["both_orientations"]) for r in recs)
        best_any = np.array([r["best_psnr_any_orientation"] for r in recs], dtype=float)
        half = float(stats.t.ppf(0.975, n - 1) * best_any.std(ddof=1) / n ** 0.5) if n > 1 else float("nan")
        ev = {k: float(np.mean([e[k] for e in evals])) for k in evals[0]}
        results[method] = {"images": n, "both_orientations": both, "both_rate": both / n,
                           "both_ci": wilson_ci(both, n), "best_any_mean": float(best_any.mean()),
                           "best_any_ci": [float(best_any.mean()) - half, float(best_any.mean()) + half],
                           "sec_per_image": float(np.mean([r["time_sec"] for r in recs])),
                           "network_evals_per_image": ev}
        print(method, json.dumps(results[method]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(results, indent=1))
    print("\n| method | images | both orientations [95 % CI] | best PSNR any orientation [95 % CI] | s/image "
          "| UNet / decoder fwd / decoder bwd / encoder per image |")
    print("|---|---|---|---|---|---|")
    for method, r in results.items():
        ev = r["network_evals_per_image"]
        evs = " / ".join(
            f"{ev[k]:.0f}" for k in ("unet", "decoder_forward", "decoder_backward", "encoder"))
        lo, hi = r["both_ci"]
        print(f"| {method} | {r['images']} | {r['both_orientations']}/{r['images']} [{lo:.0%}–{hi:.0%}] | "
              f"{r['best_any_mean']:.2f} [{r['best_any_ci'][0]:.2f}, {r['best_any_ci'][1]:.2f}] | "
              f"{r['sec_per_image']:.1f} | {evs} |")


if __name__ == "__main__":
    main()
