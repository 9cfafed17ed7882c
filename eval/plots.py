"""The parser's PNG plots: best PSNR per image, repulsion curves, quality against compute."""
from __future__ import annotations

from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np

from eval.study import cost_summary, feature_of, is_baseline, mean_ci, repulsion_by_step

DPI = 80  # small files: the report is committed next to its plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _best(rec) -> float:
    b = rec.get("best_idx")
    v = rec["psnr"][b] if b is not None else None
    return float(v) if v is not None else np.nan


def best_psnr_plot(runs: Sequence, path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.12 * max((len(r.images) for r in runs), default=1) + 4), 4))
    for r in runs:
        ax.plot([int(rec["image_idx"]) for rec in r.images], [_best(rec) for rec in r.images],
                marker="o", ms=3, lw=1, label=r.label)
    ax.set_xlabel("image index")
    ax.set_ylabel("best PSNR (dB)")
    ax.set_title("Best-particle PSNR per image")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def repulsion_curves(runs: Sequence, key: str) -> List[Tuple[str, List[int], List[float], bool]]:
    """(label, steps, mean over images, is scale-0 baseline) per run with logged values of `key`."""
    out = []
    for r in runs:
        steps = [(s, v[key]) for s, v in repulsion_by_step(r).items() if v[key] is not None]
        if steps:
            base = is_baseline(r)
            label = f"{r.label} [{feature_of(r)}]" + (" (scale-0 baseline)" if base else "")
            out.append((label, [s for s, _ in steps], [v for _, v in steps], base))
    return out


def repulsion_plots(runs: Sequence, outdir: Path) -> List[Path]:
    """repulsion_distance.png (a scale-0 baseline dashed) and repulsion_ratio.png (runs with ON steps)."""
    plt = _plt()
    written: List[Path] = []
    for key, fname, ylabel, logy in (("dist", "repulsion_distance.png", "mean pairwise feature distance", False),
                                     ("ratio", "repulsion_ratio.png", "‖λ·r‖ / ‖score‖", True)):
        fig, ax = plt.subplots(figsize=(7, 4))
        curves = repulsion_curves(runs, key)
        for label, xs, ys, base in curves:
            ax.plot(xs, ys, marker="o", ms=3, label=label, ls="--" if base else "-", color="0.4" if base else None)
        if logy and any(v > 0 for c in curves for v in c[2]):
            ax.set_yscale("log")
        ax.set_xlabel("annealing step")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{ylabel} per step (mean over images)")
        ax.grid(alpha=0.3)
        if curves:
            ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(outdir / fname)
        fig.savefig(written[-1], dpi=DPI)
        plt.close(fig)
    return written


def quality_points(runs: Sequence) -> List[Tuple[str, float, dict]]:
    """(label, GPU-seconds per image, best-PSNR mean with 95 % t interval) per run with both known."""
    out = []
    for r in runs:
        x = cost_summary(r)["gpu_sec_per_image"]
        c = mean_ci(_best(rec) for rec in r.images)
        if x is not None and c["mean"] is not None:
            out.append((r.label, x, c))
    return out


def quality_vs_compute_plot(runs: Sequence, path: Path) -> Path:
    """Best PSNR (mean, 95 % t interval) against GPU-seconds per image; one labelled point per run."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    points = quality_points(runs)
    short = [label.split("/")[-1] for label, _, _ in points]
    for (label, x, c), name in zip(points, short):
        err = [[c["mean"] - c["low"]], [c["high"] - c["mean"]]] if c["low"] is not None else None
        ax.errorbar([x], [c["mean"]], yerr=err, fmt="o", capsize=4)
        text = name if short.count(name) == 1 else label  # run names repeat across experiments
        ax.annotate(text, (x, c["mean"]), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xlim(left=0)
    ax.set_xlabel("GPU-seconds per image (wall time × processes)")
    ax.set_ylabel("best PSNR (dB), mean ± 95% CI")
    ax.set_title("Quality against compute")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def write_plots(runs: Sequence, outdir: Path) -> List[Path]:
    """best_psnr_per_image.png and quality_vs_compute.png; with repulsion.jsonl also
    repulsion_distance.png and repulsion_ratio.png."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    written = [best_psnr_plot(runs, outdir / "best_psnr_per_image.png"),
               quality_vs_compute_plot(runs, outdir / "quality_vs_compute.png")]
    if any(r.repulsion for r in runs):
        written += repulsion_plots(runs, outdir)
    return written


__all__ = ["write_plots", "best_psnr_plot", "repulsion_curves", "repulsion_plots", "quality_points",
           "quality_vs_compute_plot"]
