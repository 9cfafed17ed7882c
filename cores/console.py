"""The summary table printed at the end of a run."""
from __future__ import annotations

from pathlib import Path
from typing import Dict


def format_summary(metrics: Dict, root: Path) -> str:
    s = metrics["summary"]

    def f(v, fmt="{:.2f}"):
        return "n/a" if v is None else fmt.format(v)

    bp = s["best_psnr"]
    lines = [
        f"\nResults in {root}",
        "| images | best PSNR | mean-of-means PSNR | selected PSNR | best SSIM | best LPIPS | success | both orient. | s/image |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {s['num_images']} | {f(bp['mean'])} ± {f(bp['std'])} | {f(s['mean_of_mean_psnr'])} | "
        f"{f(s['selected_psnr_mean'])} | {f(s['best_ssim_mean'], '{:.3f}')} | {f(s['best_lpips_mean'], '{:.3f}')} | "
        f"{f(s['success_rate'], '{:.0%}')} | {f(s['both_orientations_rate'], '{:.0%}')} | "
        f"{f(s['time_per_image_sec'], '{:.1f}')} |",
    ]
    num = metrics.get("numerics") or {}
    if num.get("nan_events") or num.get("non_finite_particles"):
        lines.append(f"warning: {num['nan_events']} NaN/inf MCMC reset(s) in image(s) {num['images_with_nan_events']}, "
                     f"{num['non_finite_particles']} non-finite final particle(s) (metrics.json: numerics)")
    return "\n".join(lines)
