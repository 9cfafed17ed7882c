"""What each benchmark mode prints (Markdown tables for PROJECT.md); the JSON is `common.write_json`.

Memory: every `*_mb` field is MiB (2**20 bytes); the tables divide by 1024 and say GiB."""
from __future__ import annotations

import json
from typing import Any, Dict, List

from scripts.bench.common import fmt
from scripts.bench.matrix import table

AGREEMENT_KEYS = ("decode_max_rel_err", "decode_grad_path_max_rel_err", "grad_max_rel_err", "grad_min_cosine")


def print_agreement(report: Dict[str, Any], a: Dict[str, Any]) -> None:
    keys = AGREEMENT_KEYS
    print(json.dumps(a, indent=1))
    print(f"\n### Agreement on {report['card']} (torch {report['torch']}, {report['date']}), vs strict fp32\n")
    print("| path | " + " | ".join(keys) + " | final-sample PSNR to exact, min dB |")
    print("|---|" + "---|" * (len(keys) + 1))
    print("| exact (DAPS default TF32) | " + " | ".join(f"{a['exact_vs_strict_fp32'][k]:.3g}" for k in keys)
          + f" | (strict fp32 vs exact = floor) {a['floor_strict_fp32_vs_exact_final_sample_psnr_db_min']:.2f} |")
    print(f"| {a['test']} | " + " | ".join(f"{a['test_vs_strict_fp32'][k]:.3g}" for k in keys)
          + f" | {a['test_vs_exact']['final_sample_psnr_db_min']:.2f} |")
    print("conditions:", a["conditions"])
    if a["draws"] > 1:
        print(f"over {a['draws']} latents, max (exact / {a['test']}): " + ", ".join(
            f"{k} {max(v['exact']):.3g} / {max(v['test']):.3g}" for k, v in a["over_draws"].items()))


def print_agreement_extra(name: str, e: Dict[str, Any]) -> None:
    keys = AGREEMENT_KEYS
    print(f"| {name}: {e['test']} | " + " | ".join(f"{e['test_vs_strict_fp32'][k]:.3g}" for k in keys)
          + f" | {e['test_vs_exact']['final_sample_psnr_db_min']:.2f} | exact in this pass: "
          + " ".join(f"{e['exact_vs_strict_fp32'][k]:.3g}" for k in keys)
          + f" floor {e['floor_strict_fp32_vs_exact_final_sample_psnr_db_min']:.2f}")
    print("conditions:", e["conditions"])


def print_series(rows: List[Dict[str, Any]]) -> None:
    for r in rows:
        print(f"{r['config']} {r['images_per_batch']} image(s)/batch, {r['mcmc_algo']}: {r['s_per_image']:.1f} s/image; start-up {r['start_up_sec']:.1f} s, compile {r['compile_sec']:.1f} s, sampling "
              f"{r['sampling_sec']:.1f} s; steady {r['steady_step_sec_before_pruning']:.3f} / "
              f"{r['steady_step_sec_after_pruning']:.3f} s per step before / after pruning; max step/steady "
              f"(excl. step 0) {r['max_step_over_steady_excluding_step0']:.2f}; per step: "
              + " ".join(f"{v:.2f}" for v in r["per_step_sec"]))


def workload_line(report: Dict[str, Any], args) -> str:
    """One sentence: the workload, what was timed, and what stands in for the official code."""
    w = report["workload"]
    rep = (f", DINO ViT-S/16 repulsion (random weights, scale {w['repulsion_scale']:g}) on steps "
           f"{w['repulsion_steps']}" if w.get("repulsion_steps") else "")
    kinds = (" Each kind of step (" + ", ".join(f"{k}: {n}" for k, n in w["step_counts"].items())
             + " of 50) timed on its own and weighted by its count." if w.get("repulsion_steps") else "")
    return (f"Workload {w['name']}: 1 image {w['resolution']}², {w['architecture']}, {w['particles']} particles, 50 annealing × "
            f"(2 ODE + {args.mcmc_steps} {args.mcmc_algo}, lr {w['langevin_lr']:g}){rep}. Timed: "
            f"{args.steps_to_time} annealing step(s) after {args.warmup} warm-up step(s), {args.time_mcmc_steps} "
            f"MCMC steps run per annealing step and extrapolated linearly to {args.mcmc_steps}.{kinds} "
            f"The exact path stands in for official DAPS (they agree within 1 % at W on an H100). "
            f"Memory in GiB (2^30 bytes).")


def print_matrix(report: Dict[str, Any], args) -> None:
    base = next((r for r in report["results"] if r["name"] == "exact" and r["particles"] == 4
                 and r["images_per_batch"] == 1), None)
    print(f"\n### Speed matrix on {report['card']} (torch {report['torch']}, {report['date']})\n")
    print(workload_line(report, args) + "\n")
    print(table(report["results"], base))
    for key, est in report["derived"].items():
        if key.endswith("estimate") or "_estimate_" in key:
            if est:
                print(f"\n{key} (pruning 4→2 at step 29 + HMC-65, from the 4- and 2-particle rows): "
                      f"{est['s_per_image']:.1f} s/image, {est['images_per_hour']:.1f} images/hour, "
                      f"{fmt(est.get('x_vs_exact_W'), '{:.2f}×')} vs exact W")
    if report["derived"].get("fast_best_batch_within_20GiB"):
        print("fast, best images/hour within 20 GiB:", report["derived"]["fast_best_batch_within_20GiB"])
    for r in report["results"]:
        if r.get("step_kinds"):
            print(f"step kinds {r['name']} ({r['particles']} particles, s per annealing step at the workload): "
                  + ", ".join(f"{k} {v['s_per_anneal_step']:.3f} × {v['steps_in_run']}"
                              for k, v in r["step_kinds"].items()))
        if r.get("autotune"):
            print(f"cuDNN benchmark trials before the timed run ({r['name']}): peak "
                  f"{r['autotune']['autotune_peak_mb'] / 1024:.2f} GiB (not in the row's peak)")
        if r.get("breakdown") and r["particles"] == 4 and not r["breakdown"].get("oom") and r["images_per_batch"] == 1:
            parts = ", ".join(f"{k} {v:.3f}" for k, v in r["breakdown"]["per_anneal_step_sec"].items())
            print(f"breakdown {r['name']} (4 particles, s per annealing step): {parts}")
