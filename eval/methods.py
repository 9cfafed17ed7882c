"""Method comparison (Exp5 with baselines): DAPS, ReSample and the project's method side by side.

One table per dataset: method, best PSNR, best PSNR in any orientation (max(psnr, psnr_twin) per
particle), SSIM, LPIPS, seconds per image, peak VRAM (allocated / reserved), network evaluations
and TFLOP per image (the per-image `compute` / `tflop` record fields; n/a where a run does not
have them), then pairwise paired tests of the best PSNR (Wilcoxon signed-rank on common images).
Kept apart from the other tables of `parse_metrics.py` so both can change independently.
"""
from __future__ import annotations

import itertools
import math
from typing import Dict, List, Optional, Sequence

import numpy as np

from eval.markdown import fmt as _f, table as _md


def dataset_of(run) -> str:
    """`<dataset>` of a `<experiment>/<dataset>_<N>img/<run>` label (the whole label otherwise)."""
    parts = run.label.split("/")
    return parts[-2].rsplit("_", 1)[0] if len(parts) >= 2 and parts[-2].endswith("img") else run.label


def method_of(run) -> str:
    """ReSample, DAPS (no addition on) or the run's own name (the project's method)."""
    c = run.config if isinstance(run.config, dict) else {}
    if (c.get("sampler") or {}).get("name") == "resample":
        pix = (c.get("sampler") or {}).get("pixel_stage", True)
        return "ReSample" if pix else "ReSample (latent stages)"
    plain = (float(c.get("repulsion_scale") or 0) == 0 and c.get("repulsion_target_ratio") is None
             and int(c.get("pruning_step", -1) or -1) < 0 and int(c.get("hard_data_consistency", -1) or -1) != 1)
    name = "DAPS" if c and plain else run.label.split("/")[-1]
    return f"{name} (original)" if getattr(run, "origin", "project") != "project" and "(original)" not in name \
        else name


def _mean(xs: List[Optional[float]]) -> Optional[float]:
    v = [float(x) for x in xs if x is not None and math.isfinite(float(x))]
    return float(np.mean(v)) if v else None


def method_row(run) -> List[str]:
    """The run's row: quality and time from its summary (the numbers of the summary table), network
    evaluations and TFLOP per image from the records."""
    recs, s = run.images, run.summary
    best, anyo = s["best_psnr"]["mean"], s["best_psnr_any_orientation"]["mean"]
    ssim, lpips, sec = s["best_ssim_mean"], s["best_lpips_mean"], s["time_per_image_sec"]
    evals = [sum(r["compute"].values()) for r in recs if isinstance(r.get("compute"), dict)]
    tflop = [r.get("tflop") for r in recs]
    vram = run.vram or {}
    mb = lambda k: "n/a" if vram.get(k) is None else f"{vram[k] / 1024:.2f}"  # noqa: E731
    return [method_of(run), str(len(recs)), _f(best), _f(anyo), _f(ssim, "{:.3f}"), _f(lpips, "{:.3f}"), _f(sec, "{:.1f}"),
            f"{mb('peak_memory_mb')} / {mb('peak_reserved_mb')}",
            _f(float(np.mean(evals)), "{:.0f}") if evals and len(evals) == len(recs) else "n/a",
            _f(_mean(tflop), "{:.2f}") if all(t is not None for t in tflop) and tflop else "n/a"]


def method_tables(runs: Sequence, paired_comparison) -> str:
    """Markdown: per dataset, the method table and the pairwise paired tests of best PSNR."""
    out = []
    datasets: Dict[str, List] = {}
    for r in runs:
        datasets.setdefault(dataset_of(r), []).append(r)
    head = ["method", "images", "best PSNR", "best PSNR any orient.", "best SSIM", "best LPIPS", "s/image",
            "peak VRAM GiB alloc / reserved", "network evals/image", "TFLOP/image"]
    for ds, rs in datasets.items():
        out.append(f"### Methods — {ds}\n")
        out.append(_md(head, [method_row(r) for r in rs]))
        pairs = []
        for a, b in itertools.combinations(rs, 2):
            c = paired_comparison(a, b)
            pairs.append([f"{method_of(b)} − {method_of(a)}", str(c["n"]), _f(c["mean_diff"]),
                          f"{c['wins']}/{c['losses']}/{c['ties']}",
                          _f(c["p_value"], "{:.4f}") if c["p_value"] is not None else (c["test_note"] or "n/a")])
        if pairs:
            out.append("\nPaired best-PSNR differences (Wilcoxon signed-rank on common images):\n")
            out.append(_md(["pair", "n", "mean diff dB", "wins/losses/ties", "p"], pairs))
        out.append("")
    return "\n".join(out)
