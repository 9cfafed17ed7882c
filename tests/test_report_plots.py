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
    legend_box, axes_box = drawn_boxes(fig, [ax.get_legend(), ax])
    assert not legend_box.overlaps(axes_box)
    plt.close(fig)


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
