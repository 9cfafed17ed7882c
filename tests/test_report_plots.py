"""The report's plots are readable: point labels never overlap and stay inside the axes, image ticks are
integers, runs with equal values stay visible, legends sit outside the data, and the cost axis names
the device (CPU runs are not called GPU-seconds). Checked on the drawn matplotlib objects."""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from eval import parse_metrics as pm
from eval.plots import (best_psnr_figure, compute_axis_label, device_kind, place_labels, quality_vs_compute_figure,
                        write_plots)
from test_report_study import make_run, rec

NAMES = ["s0", "s1000", "prune_masking", "prune_slicing_keep2_long_name", "hdc", "exp5_target_ratio_0.5"]


def runs_of(tmp_path: Path, n_runs: int, n_images: int, device: str = "cpu", spread: float = 0.0):
    """n_runs runs of n_images images; with spread 0 every run has the same PSNR and cost (one dot)."""
    dirs = []
    for k in range(n_runs):
        images = [rec(i, [38.5 + spread * ((k * 7 + i) % 5), 20.0], time_sec=1.0) for i in range(n_images)]
        dirs.append(make_run(tmp_path, f"exp{k % 3}/demo_{n_images}img/{NAMES[k]}", images,
                             metadata={"wall_time_sec": (5.0 + spread * k) * n_images, "device": device}))
    return pm.load_runs(dirs)


def drawn_boxes(fig, artists):
    """Window boxes after a draw; for a label its text alone (not the leader line)."""
    from matplotlib.text import Text

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    return [Text.get_window_extent(a, renderer) if isinstance(a, Text) else a.get_window_extent(renderer)
            for a in artists]


@pytest.mark.parametrize("n_runs,spread", [(2, 0.0), (6, 0.0), (6, 0.05), (6, 1.0)])
def test_quality_labels_do_not_overlap_and_stay_inside(tmp_path, n_runs, spread):
    import matplotlib.pyplot as plt

    fig = quality_vs_compute_figure(runs_of(tmp_path, n_runs, 10, spread=spread))
    ax = fig.axes[0]
    assert len(ax.texts) == n_runs
    boxes = drawn_boxes(fig, ax.texts)
    inner = ax.get_window_extent()
    for a, b in itertools.combinations(boxes, 2):
        assert not a.overlaps(b), (a, b)
    for box in boxes:
        assert inner.contains(box.x0, box.y0) and inner.contains(box.x1, box.y1)
    # every point is inside the x range, away from the edges (nothing runs off the figure)
    lo, hi = ax.get_xlim()
    for line in ax.lines:
        for x in line.get_xdata():
            assert lo < x < hi
    plt.close(fig)


def test_place_labels_separates_coincident_points():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot([1.0], [1.0], "o")
    anns = place_labels(ax, [(1.0, 1.0)] * 5, [f"run number {k}" for k in range(5)])
    boxes = drawn_boxes(fig, anns)
    assert all(not a.overlaps(b) for a, b in itertools.combinations(boxes, 2))
    plt.close(fig)


@pytest.mark.parametrize("n_images", [1, 2, 10])
def test_best_psnr_ticks_are_integers(tmp_path, n_images):
    import matplotlib.pyplot as plt

    fig = best_psnr_figure(runs_of(tmp_path, 2, n_images))
    ax = fig.axes[0]
    fig.canvas.draw()
    lo, hi = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks
    assert set(range(n_images)) <= {int(t) for t in ticks} or n_images > 5
    plt.close(fig)


def test_best_psnr_runs_with_equal_values_stay_visible_and_legend_is_outside(tmp_path):
    import matplotlib.pyplot as plt

    fig = best_psnr_figure(runs_of(tmp_path, 6, 1))
    ax = fig.axes[0]
    xs = [float(line.get_xdata()[0]) for line in ax.lines]
    ys = [float(line.get_ydata()[0]) for line in ax.lines]
    assert len(set(ys)) == 1                      # one value for all six runs ...
    assert len(set(xs)) == 6                      # ... drawn at six places around image 0
    assert all(abs(x) < 0.5 for x in xs)          # closer to image 0 than to any other index
    assert len({line.get_marker() for line in ax.lines}) == 6
    legend_box, top_box, bottom_box = drawn_boxes(fig, [fig.axes[-1].get_legend(), ax, fig.axes[-1]])
    assert not legend_box.overlaps(top_box) and not legend_box.overlaps(bottom_box)
    plt.close(fig)


def test_best_psnr_beside_best_psnr_in_either_orientation(tmp_path):
    """A run that found the 180° twin at 35 dB is 8 dB in the first panel and 35 dB in the second."""
    import matplotlib.pyplot as plt

    twin_run = make_run(tmp_path, "e/demo_1img/twin", [rec(0, [8.0, 7.0], twin=[35.0, 6.0])],
                        metadata={"device": "cpu"})
    fig = best_psnr_figure(pm.load_runs([twin_run]))
    top, bottom = fig.axes
    assert list(top.lines[0].get_ydata()) == [8.0] and list(bottom.lines[0].get_ydata()) == [35.0]
    assert "either orientation" in bottom.get_title()
    lo, hi = top.get_ylim()
    assert (lo, hi) == bottom.get_ylim() and lo < 8.0 and hi > 35.0
    plt.close(fig)


def test_psnr_axis_does_not_zoom_into_noise(tmp_path):
    import matplotlib.pyplot as plt

    runs = runs_of(tmp_path, 2, 3, spread=0.01)  # 0.04 dB apart
    for fig in (best_psnr_figure(runs), quality_vs_compute_figure(runs)):
        lo, hi = fig.axes[0].get_ylim()
        assert hi - lo >= 10.0
        plt.close(fig)


@pytest.mark.parametrize("n_images, with_ci", [(1, False), (10, True)])
def test_ci_bars_where_n_allows_and_a_shared_x_origin(tmp_path, n_images, with_ci):
    import matplotlib.pyplot as plt

    fig = quality_vs_compute_figure(runs_of(tmp_path, 3, n_images, spread=1.0))
    for ax in fig.axes:
        assert ax.get_xlim()[0] == 0.0                       # both panels from 0 s
        assert ("95% CI" in ax.get_ylabel()) == with_ci
        assert ("no CI at n = 1" in ax.get_ylabel()) == (not with_ci)
        caps = [c for c in ax.containers if getattr(c, "has_yerr", False)]
        assert len(caps) == (3 if with_ci else 0)
    assert fig.axes[0].get_xlim() == fig.axes[1].get_xlim() and fig.axes[0].get_ylim() == fig.axes[1].get_ylim()
    plt.close(fig)


def test_identical_repulsion_curves_are_told_apart_and_axes_start_at_zero(tmp_path):
    """exp1, exp2 and exp4 before pruning: the same curve. Each is drawn with its own dash pattern and
    width and named identical; the ratio axis starts at 0, so a ±4 % wobble stays small."""
    from PIL import Image

    from eval.plots import repulsion_plots

    steps = [{"image_idx": 0, "step": s, "repulsion_on": True, "feature": "pixel",
              "ratio_scaled_to_score": 0.0235 * (1 + 0.04 * (-1) ** s),
              "ratio_per_particle_at_sigma": 0.235 * (1 + 0.04 * (-1) ** s), "mean_pairwise_dino_dist": 100.0 - s}
             for s in range(10)]
    dirs = [make_run(tmp_path, f"exp{k}/demo_1img/r{k}", [rec(0, [30.0, 20.0])], config={"repulsion_scale": 10.0},
                     repulsion=steps, metadata={"device": "cpu"}) for k in (1, 2, 4)]
    import matplotlib.pyplot as plt

    real_save = plt.Figure.savefig
    figs = []
    plt.Figure.savefig = lambda self, *a, **k: (figs.append(self), real_save(self, *a, **k))[1]
    try:
        written = repulsion_plots(pm.load_runs(dirs), tmp_path)
    finally:
        plt.Figure.savefig = real_save
    for fig in figs:
        ax = fig.axes[0]
        styles = {(str(line.get_linestyle()), str(line.get_dashes() if hasattr(line, "get_dashes") else ""),
                   line.get_linewidth()) for line in ax.lines}
        assert len(styles) == 3
        assert any("identical curves: exp1 = exp2 = exp4" in t.get_text() for t in ax.texts)
        assert ax.get_ylim()[0] == 0.0
    assert [p.name for p in written] == ["repulsion_distance.png", "repulsion_ratio.png", "repulsion_ratio_at_sigma.png"]
    assert len(figs) == 3
    assert all(Image.open(p).size[0] > 300 for p in written)


def test_cost_axis_names_the_device(tmp_path):
    import matplotlib.pyplot as plt

    cpu = runs_of(tmp_path / "c", 2, 2, device="cpu")
    gpu = runs_of(tmp_path / "g", 2, 2, device="cuda:0")
    assert [device_kind(r) for r in cpu] == ["cpu", "cpu"] and device_kind(gpu[0]) == "gpu"
    assert compute_axis_label(cpu).startswith("seconds per image (CPU")
    assert "GPU" not in compute_axis_label(cpu)
    assert compute_axis_label(gpu).startswith("GPU-seconds per image")
    assert "CPU and GPU" in compute_axis_label([cpu[0], gpu[0]])
    fig = quality_vs_compute_figure(cpu)
    assert "CPU" in fig.axes[0].get_xlabel() and "GPU" not in fig.axes[0].get_xlabel()
    plt.close(fig)


@pytest.mark.parametrize("n_runs,n_images", [(1, 1), (2, 10), (6, 1)])
def test_write_plots_png_files(tmp_path, n_runs, n_images):
    from PIL import Image

    written = write_plots(runs_of(tmp_path / "runs", n_runs, n_images, spread=0.3), tmp_path / "plots")
    assert [p.name for p in written] == ["best_psnr_per_image.png", "quality_vs_compute.png"]
    for p in written:
        w, h = Image.open(p).size
        assert 300 < w < 2000 and 200 < h < 1500
