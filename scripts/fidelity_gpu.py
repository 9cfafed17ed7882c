"""GPU check of two study-fidelity facts on the full-size FFHQ-LDM architecture (random weights):

1. whole-run VRAM: with the Exp4 settings (hard data consistency resets the peak counter for its own
   segment), metrics.json's `vram.peak_memory_mb` is ≥ every segment and ≥ the sampling phase;
2. the cost of baseline logging: Exp0 with and without `repulsion_log_baseline` (DINO features of the
   decoded particles at the 16 logged steps, no_grad), same samples, time per image.

    python scripts/fidelity_gpu.py --json docs/benchmarks/fidelity_h200.json [--mcmc-steps 5]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BASE = ["model=ffhq256ldm", "model.name=ldm_random", "data=demo-ffhq", "data.end_id=1",
        "dino.weights_path=random:vit_small_patch16", "eval.lpips=false", "save_samples=true"]


def run(name: str, args, save_dir: Path) -> dict:
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "posterior_sample.py", *BASE, *args, f"save_dir={save_dir}", f"name={name}"],
                         cwd=ROOT, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{name} failed:\n{res.stderr[-3000:]}")
    m = json.loads((save_dir / name / "metrics.json").read_text())
    return {"name": name, "args": args, "process_sec": time.perf_counter() - t0,
            "time_per_image_sec": m["summary"]["time_per_image_sec"], "vram": m["vram"],
            "psnr": m["images"][0]["psnr"], "gpu": m["metadata"]["gpu_name"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--mcmc-steps", type=int, default=5)
    ap.add_argument("--opt-iters", type=int, default=200)
    ap.add_argument("--save-dir", default="/tmp/fidelity_gpu")
    args = ap.parse_args()
    save = Path(args.save_dir)
    steps = f"sampler.mcmc.num_steps={args.mcmc_steps}"
    rows = {
        "exp4": run("exp4", ["+experiment=exp4_optimization", steps, f"optimization_max_iters={args.opt_iters}"], save),
        "exp4_no_hdc": run("exp4_no_hdc", ["+experiment=exp4_optimization", steps, "hard_data_consistency=-1"], save),
        "exp0_baseline_log": run("exp0_log", ["+experiment=exp0_baseline", steps, "deterministic=true"], save),
        "exp0_no_log": run("exp0_nolog", ["+experiment=exp0_baseline", steps, "deterministic=true",
                                             "repulsion_log_baseline=false"], save),
    }
    v = rows["exp4"]["vram"]
    checks = {
        "peak_ge_every_segment": all(v["peak_memory_mb"] >= s for s in v["segments"].values()),
        "peak_ge_sampling_phase": v["peak_memory_mb"] >= rows["exp4_no_hdc"]["vram"]["peak_memory_mb"] - 1.0,
        "baseline_log_same_psnr": rows["exp0_baseline_log"]["psnr"] == rows["exp0_no_log"]["psnr"],
        "baseline_log_added_sec_per_image": rows["exp0_baseline_log"]["time_per_image_sec"]
        - rows["exp0_no_log"]["time_per_image_sec"],
    }
    out = {"date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "mcmc_steps": args.mcmc_steps, "optimization_max_iters": args.opt_iters, "checks": checks, "runs": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(json.dumps({"checks": checks, **{k: {"t": r["time_per_image_sec"], "vram": r["vram"]} for k, r in rows.items()}},
                     indent=1))


if __name__ == "__main__":
    main()
