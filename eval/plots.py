"""The parser's PNG plots: best PSNR per image, repulsion curves, quality against compute."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from cores.evaluation import best_psnr_any_orientation
from eval.study import cost_summary, device_kind, feature_of, is_baseline, mean_ci, repulsion_by_step

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


# --- readable figures: one style per run, legends beside the data, labels that do not collide ------
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
DODGE_MAX_IMAGES = 20   # up to this many images, runs are spread sideways around each image index


def run_style(k: int) -> Dict[str, object]:
    """Colour and marker of the k-th run, the same in every plot."""
    return {"color": f"C{k % 10}", "marker": MARKERS[k % len(MARKERS)]}


def legend_below(ax, count: int):
    """A legend under the axes, so it never covers data; the figure is saved with a tight box."""
    return ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=1 if count > 4 else min(count, 2),
                     fontsize=7, frameon=False)


def dodge_offsets(count: int, images: int) -> List[float]:
    """Sideways shift of each run's markers (image-index units): runs with equal values stay visible."""
    if count < 2 or images > DODGE_MAX_IMAGES:
        return [0.0] * count
    width = min(0.5, 0.12 * (count - 1))
    return [float(v) for v in np.linspace(-width / 2, width / 2, count)]


PSNR_MIN_SPAN_DB = 10.0  # a PSNR axis spans at least this much: a 0.1 dB difference must not fill the plot


def _any_orientation(rec) -> float:
    v = best_psnr_any_orientation(rec)
    return float(v) if v is not None else np.nan


def span_at_least(ax, values: Sequence[float], span: float, floor: Optional[float] = None) -> None:
    """y-limits around the finite `values`, at least `span` wide (centred), not below `floor`."""
    v = [float(x) for x in values if x is not None and np.isfinite(x)]
    if not v:
        return
    lo, hi = min(v), max(v)
    pad = max(0.08 * (hi - lo), (span - (hi - lo)) / 2, 0.0)
    lo, hi = lo - pad, hi + pad
    if floor is not None and lo < floor:
        lo, hi = floor, max(hi, floor + span)
    ax.set_ylim(lo, hi)


def best_psnr_figure(runs: Sequence):
    """Best-particle PSNR per image (top) and best PSNR in either orientation (bottom: a particle on the
    180° twin is a valid solution, and would otherwise look like a failure): integer image ticks, one
    marker per run, runs shifted sideways around each image so equal values do not hide each other,
    both panels on one y-axis at least 10 dB tall, legend under the axes."""
    from matplotlib.ticker import MaxNLocator

    plt = _plt()
    n_img = len({int(rec["image_idx"]) for r in runs for rec in r.images})
    fig, axes = plt.subplots(2, 1, figsize=(max(6.0, min(0.12 * n_img + 4, 16.0)), 6.4), sharex=True, sharey=True)
    offsets = dodge_offsets(len(runs), n_img)
    values = []
    for ax, value, title in ((axes[0], _best, "Best-particle PSNR per image"),
                             (axes[1], _any_orientation, "Best PSNR in either orientation (max of PSNR and "
                                                         "PSNR to the 180° twin)")):
        panel: List[float] = []
        for k, (r, dx) in enumerate(zip(runs, offsets)):
            ys = [value(rec) for rec in r.images]
            panel += ys
            ax.plot([int(rec["image_idx"]) + dx for rec in r.images], ys, ms=5, lw=1,
                    label=r.label, markerfacecolor="none" if k % 2 else None, **run_style(k))
        values += panel
        if not np.isfinite(panel).any():
            ax.text(0.5, 0.5, "not recorded (no twin PSNR in these runs)", transform=ax.transAxes,
                    ha="center", va="center", fontsize=8, color="0.4")
        ax.set_ylabel("PSNR (dB)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    ax = axes[0]
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    idx = [int(rec["image_idx"]) for r in runs for rec in r.images]
    if idx:
        ax.set_xlim(min(idx) - 0.6, max(idx) + 0.6)
    span_at_least(ax, values, PSNR_MIN_SPAN_DB)
    axes[1].set_xlabel("image index" + (" (runs shifted sideways to stay visible)" if any(offsets) else ""))
    if runs:
        legend_below(axes[1], len(runs))
    fig.tight_layout()
    return fig


def best_psnr_plot(runs: Sequence, path: Path) -> Path:
    return _save(best_psnr_figure(runs), path)


def _save(fig, path: Path) -> Path:
    """Save with a tight box (legends below the axes stay in) and close."""
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    _plt().close(fig)
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


LINESTYLES = ("-", (0, (6, 3)), (0, (1, 2)), (0, (5, 2, 1, 2)), (0, (3, 1)), (0, (8, 2, 2, 2)))


def coinciding(curves: Sequence[Tuple[str, List[int], List[float], bool]], rtol: float = 1e-6) -> List[List[int]]:
    """Groups (indices into `curves`, two or more) of curves with the same steps and values."""
    groups: List[List[int]] = []
    for k, (_, xs, ys, _) in enumerate(curves):
        for g in groups:
            _, xg, yg, _ = curves[g[0]]
            if xs == xg and np.allclose(ys, yg, rtol=rtol, atol=0.0):
                g.append(k)
                break
        else:
            groups.append([k])
    return [g for g in groups if len(g) > 1]


#: y-axis names of the two ratios (`eval.study.RATIO_NAMES`), short enough for an axis
RATIO_AXES = {"ratio": "‖λ·r‖ / ‖score‖ (last drift evaluation)", "ratio_at_sigma": "‖λ·r_i‖ / ‖score_i‖ at σ_i"}


def repulsion_plots(runs: Sequence, outdir: Path) -> List[Path]:
    """repulsion_distance.png (a scale-0 baseline dashed grey), repulsion_ratio.png (the original's ratio at
    the ODE's last drift evaluation) and repulsion_ratio_at_sigma.png (the per-particle ratio at σ_i), the
    ratios for runs with ON steps.

    Both y-axes start at 0 (a distance and a ratio have a natural zero: a few % wobble must not fill
    the plot) unless the values span decades (ratio: log axis).  Curves that lie on each other are
    drawn thick under thin, each with its own dash pattern and marker phase, and named under the
    plot as identical."""
    from matplotlib.ticker import MaxNLocator

    plt = _plt()
    written: List[Path] = []
    for key, fname, ylabel, logy in (("dist", "repulsion_distance.png", "mean pairwise feature distance", False),
                                     ("ratio", "repulsion_ratio.png", RATIO_AXES["ratio"], True),
                                     ("ratio_at_sigma", "repulsion_ratio_at_sigma.png", RATIO_AXES["ratio_at_sigma"],
                                      True)):
        fig, ax = plt.subplots(figsize=(7, 4))
        curves = repulsion_curves(runs, key)
        n = len(curves)
        for k, (label, xs, ys, base) in enumerate(curves):
            style = run_style(k)
            every = max(1, len(xs) // 12)
            ax.plot(xs, ys, ms=4, label=label, marker=style["marker"], markevery=(k % every, every),
                    ls=(0, (4, 3)) if base else LINESTYLES[k % len(LINESTYLES)], lw=1.2 + 1.6 * (n - 1 - k) / max(n - 1, 1),
                    color="0.4" if base else style["color"], zorder=2 + k)
        positive = [v for c in curves for v in c[2] if v > 0]
        if logy and positive and max(positive) > 10 * min(positive):  # log only where values span decades
            ax.set_yscale("log")
        elif curves:
            ax.set_ylim(0, 1.12 * max(max(c[2]) for c in curves) or 1.0)
        same = coinciding(curves)
        if same:
            text = "; ".join(" = ".join(curves[i][0].split(" [")[0].split("/")[0] for i in g) for g in same)
            ax.text(0.0, 1.01, f"identical curves: {text}", transform=ax.transAxes, fontsize=7, va="bottom",
                    color="0.3")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.set_xlabel("annealing step")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{ylabel} per step (mean over images)", pad=14 if same else 6)
        ax.grid(alpha=0.3)
        if curves:
            legend_below(ax, len(curves))
        written.append(_save(fig, outdir / fname))
    return written


# --- quality against compute -----------------------------------------------------------------------
def compute_axis_label(runs: Sequence) -> str:
    """What the cost axis measures: GPU-seconds only when every run used a GPU."""
    kinds = {device_kind(r) for r in runs}
    if kinds == {"cpu"}:
        return "seconds per image (CPU; wall time × processes)"
    if kinds == {"gpu"}:
        return "GPU-seconds per image (wall time × processes)"
    if kinds == {"cpu", "gpu"}:
        return "seconds per image on each run's device (CPU and GPU runs; wall time × processes)"
    return "seconds per image (wall time × processes; device not recorded)"


def quality_points(runs: Sequence, value=None) -> List[Tuple[str, float, dict]]:
    """(label, device-seconds per image (wall time × processes), mean of `value` per image (default best
    PSNR) with 95 % t interval) per run with both known."""
    value = value or _best
    out = []
    for r in runs:
        x = cost_summary(r)["gpu_sec_per_image"]
        c = mean_ci(value(rec) for rec in r.images)
        if x is not None and c["mean"] is not None:
            out.append((r.label, x, c))
    return out


def point_labels(labels: Sequence[str]) -> List[str]:
    """The run name (last path part), or the whole label where names repeat across experiments."""
    short = [label.split("/")[-1] for label in labels]
    return [s if short.count(s) == 1 else label for s, label in zip(short, labels)]


def _candidate_offsets() -> List[Tuple[float, float]]:
    """Offsets (points) around a marker to try for its label: near ones first, right before left."""
    out = []
    for radius in (7, 14, 24, 36, 50, 66, 84):
        for deg in (20, -20, 60, -60, 90, -90, 160, -160, 120, -120, 0, 180):
            a = np.deg2rad(deg)
            out.append((radius * float(np.cos(a)), radius * float(np.sin(a))))
    return out


def place_labels(ax, xy: Sequence[Tuple[float, float]], texts: Sequence[str], fontsize: float = 8,
                 bars: Sequence[Tuple[float, float, float]] = ()) -> List:
    """Annotate each point with its text at the first nearby spot inside the axes that overlaps no
    other label, marker or error bar (`bars`: (x, low, high) in data units); a leader line joins
    far labels.

    Greedy: labels are placed in order and never moved; when no spot is free the axes limits grow
    and the placement starts again (up to three times), then the least-overlapping spot is taken."""
    from matplotlib.transforms import Bbox

    fig = ax.figure
    anns: List = []
    for attempt in range(4):
        for a in anns:  # a new attempt starts from scratch (other texts of the axes stay)
            a.remove()
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        inner = ax.get_window_extent(renderer).padded(-2)
        to_px = fig.dpi / 72.0
        pts = ax.transData.transform(np.asarray(xy, dtype=float).reshape(-1, 2))
        r = 4.5 * to_px
        blocked = [Bbox.from_extents(px - r, py - r, px + r, py + r) for px, py in pts]
        for bx, blo, bhi in bars:
            (x0, y0), (_, y1) = ax.transData.transform([(bx, blo), (bx, bhi)])
            blocked.append(Bbox.from_extents(x0 - r, y0 - 1, x0 + r, y1 + 1))
        placed: List = []
        anns, clash = [], False
        for (x, y), text in zip(xy, texts):
            ann = ax.annotate(text, (x, y), xytext=(0, 0), textcoords="offset points", fontsize=fontsize)
            best, best_cost = None, None
            for dx, dy in _candidate_offsets():
                ann.set_ha("left" if dx > 1 else "right" if dx < -1 else "center")
                ann.set_va("bottom" if dy > 1 else "top" if dy < -1 else "center")
                ann.xyann = (dx, dy)
                box = ann.get_window_extent(renderer).padded(1)
                inside = inner.contains(box.x0, box.y0) and inner.contains(box.x1, box.y1)
                cost = sum(box.overlaps(b) for b in placed) * 10 + sum(box.overlaps(b) for b in blocked)
                cost += 0 if inside else 100
                if best_cost is None or cost < best_cost:
                    best, best_cost = (dx, dy, ann.get_ha(), ann.get_va(), box), cost
                if cost == 0:
                    break
            dx, dy, ha, va, box = best
            ann.remove()
            far = np.hypot(dx, dy) > 10
            ann = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=fontsize,
                              ha=ha, va=va, arrowprops=({"arrowstyle": "-", "color": "0.5", "lw": 0.6,
                                                         "shrinkA": 0, "shrinkB": 4} if far else None))
            anns.append(ann)
            placed.append(box)
            clash = clash or best_cost > 0
        if not clash or attempt == 3:
            return anns
        for get, set_ in ((ax.get_xlim, ax.set_xlim), (ax.get_ylim, ax.set_ylim)):
            lo, hi = get()
            pad = 0.15 * (hi - lo)
            set_(lo - pad, hi + pad)
    return anns


def quality_vs_compute_figure(runs: Sequence):
    """Best PSNR (left) and best PSNR in either orientation (right), mean with its 95 % t interval where
    a run has two images or more, against seconds per image; both panels share one x-axis from 0 and
    one y-axis; one colour, marker and non-overlapping label per run; the cost axis names the device."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 5), sharex=True, sharey=True)
    styles = {r.label: run_style(k) for k, r in enumerate(runs)}
    panels = [(axes[0], quality_points(runs), "best PSNR"),
              (axes[1], quality_points(runs, _any_orientation), "best PSNR in either orientation")]
    xs = [x for _, pts, _ in panels for _, x, _ in pts]
    ys = [v for _, pts, _ in panels for _, _, c in pts for v in (c["low"], c["mean"], c["high"]) if v is not None]
    if xs:
        axes[0].set_xlim(0.0, 1.3 * max(xs) or 1.0)
    span_at_least(axes[0], ys, PSNR_MIN_SPAN_DB)
    for ax, points, what in panels:
        for label, x, c in points:
            err = [[c["mean"] - c["low"]], [c["high"] - c["mean"]]] if c["low"] is not None else None
            ax.errorbar([x], [c["mean"]], yerr=err, fmt=styles[label]["marker"], color=styles[label]["color"],
                        capsize=4, ms=6)
        with_ci = [c for _, _, c in points if c["low"] is not None]
        unit = "mean ± 95% CI" if len(with_ci) == len(points) and points else \
            "mean" + (" (± 95% CI where n ≥ 2)" if with_ci else "; no CI at n = 1")
        ax.set_ylabel(f"{what} (dB), {unit}", fontsize=9)
        ax.set_xlabel(compute_axis_label(runs), fontsize=9)
        ax.yaxis.set_tick_params(labelleft=True)
        ax.set_title(f"{what[0].upper()}{what[1:]} against compute", fontsize=10)
        ax.grid(alpha=0.3)
        if not points:
            ax.text(0.5, 0.5, "not recorded", transform=ax.transAxes, ha="center", color="0.4")
    fig.tight_layout()
    for ax, points, _ in panels:
        place_labels(ax, [(x, c["mean"]) for _, x, c in points], point_labels([p[0] for p in points]),
                     bars=[(x, c["low"], c["high"]) for _, x, c in points if c["low"] is not None])
    return fig


def quality_vs_compute_plot(runs: Sequence, path: Path) -> Path:
    return _save(quality_vs_compute_figure(runs), path)


def write_plots(runs: Sequence, outdir: Path) -> List[Path]:
    """best_psnr_per_image.png and quality_vs_compute.png; with repulsion.jsonl also
    repulsion_distance.png, repulsion_ratio.png and repulsion_ratio_at_sigma.png."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    written = [best_psnr_plot(runs, outdir / "best_psnr_per_image.png"),
               quality_vs_compute_plot(runs, outdir / "quality_vs_compute.png")]
    if any(r.repulsion for r in runs):
        written += repulsion_plots(runs, outdir)
    return written


__all__ = ["write_plots", "best_psnr_plot", "best_psnr_figure", "repulsion_curves", "repulsion_plots",
           "quality_points", "quality_vs_compute_plot", "quality_vs_compute_figure", "place_labels",
           "compute_axis_label", "device_kind", "dodge_offsets"]
