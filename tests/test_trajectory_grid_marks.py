"""Trajectory strips say the step and σ of every frame; the grid marks pruned particles (masking: a red
frame and 'pruned' under the tile; slicing: 'pruned: p…' under the ground truth)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cores.outputs import GRID_BACKGROUND, MARK_COLOURS, frame_with_label, trajectory_label
from cores.pipeline import step_sigmas, trajectory_steps
from cores.run_folder import particle_caption, pruned_particle_ids, removed_caption

FEW = ["sampler.annealing.num_steps=6", "sampler.mcmc.num_steps=2", "data.end_id=1", "num_samples=3",
       "eval.lpips=false", "save_traj=true", "traj_every=2"]


def test_trajectory_steps_every_kth_and_the_last():
    assert trajectory_steps(6, 2) == [0, 2, 4, 5]
    assert trajectory_steps(10, 5) == [0, 5, 9]
    assert trajectory_steps(3, 1) == [0, 1, 2]
    assert trajectory_steps(1, 4) == [0]


def test_step_sigmas_are_the_sampler_schedule():
    from cores.config import AnnealingConfig
    from cores.scheduler import EDMScheduler

    a = AnnealingConfig(num_steps=6, sigma_max=10.0, sigma_min=0.1)
    want = EDMScheduler(6, 10.0, 0.1, "poly-7").sigma_steps.tolist()
    assert step_sigmas(a) == pytest.approx(want) and step_sigmas(a)[0] == pytest.approx(10.0)
    assert trajectory_label(4, 0.012345) == ["step 4", "σ 0.0123"]


def test_frame_label_band_holds_text():
    img = np.full((64, 64, 3), 128, np.uint8)
    a, b = frame_with_label(img, ["step 0", "σ 10"]), frame_with_label(img, ["step 5", "σ 0.1"])
    assert a.shape[1] == 64 and a.shape[0] > 64 + 16 and np.array_equal(a[:64], img)
    band = a[64:]
    assert (band.min(axis=-1) < 100).any() and (band == GRID_BACKGROUND).all(axis=-1).mean() > 0.5
    assert not np.array_equal(a[64:], b[64:])


def test_run_writes_labelled_strips_and_marks_pruned_particles(tmp_path):
    from conftest import compose
    from cores.pipeline import run

    run(compose(FEW + [f"save_dir={tmp_path}", "name=m", "pruning_step=2", "pruning_keep=2",
                       "pruning_mode=masking"]))
    root = tmp_path / "m"
    rec = json.loads((root / "records" / "00000.json").read_text())
    strip = np.asarray(Image.open(root / "trajectory" / "00000_sample00.png").convert("RGB"))
    size = np.asarray(Image.open(root / "gt" / "00000.png")).shape[0]
    from cores.config import build_run_config

    sigmas = step_sigmas(build_run_config(compose(FEW)).sampler.annealing)
    steps = trajectory_steps(6, 2)
    assert strip.shape[1] == len(steps) * size and strip.shape[0] > size
    for k, s in enumerate(steps):  # each frame's band is exactly the label of its step and σ
        want = frame_with_label(np.zeros((size, size, 3), np.uint8), trajectory_label(s, sigmas[s]))[size:]
        assert np.array_equal(strip[size:, k * size:(k + 1) * size], want), s
    # masking keeps the pruned particle in the record and the grid: framed red, captioned 'pruned'
    (gone,) = rec["pruning"]["pruned_indices"]
    assert pruned_particle_ids(rec) == [gone]
    assert "pruned" in particle_caption(rec, gone)[1]
    grid = np.asarray(Image.open(root / "grid_results.png").convert("RGB"))
    assert MARK_COLOURS["pruned"] in {tuple(c) for c in grid.reshape(-1, 3)}


def test_slicing_names_removed_particles_under_the_ground_truth():
    base = {"image_idx": 0, "particle_ids": [0, 2], "psnr": [20.0, 21.0], "psnr_twin": [5.0, 5.0],
            "best_idx": 1, "selected_idx": 0}
    sliced = {**base, "pruning": {"did_prune": True, "mode": "slicing", "prune_step": 3, "pruned_indices": [1, 3]}}
    assert pruned_particle_ids(sliced) == [1, 3] and removed_caption(sliced) == ["pruned: p1, p3 (step 3)"]
    assert "pruned" not in particle_caption(sliced, 0)[1]
    # per-particle `pruned` flags (aligned with particle_ids) mark particles still in the record ...
    flagged = {**base, "pruned": [False, True]}
    assert pruned_particle_ids(flagged) == [2] and particle_caption(flagged, 2)[1] == ["best", "pruned"]
    assert removed_caption(flagged) == []
    # ... as do flags inside per-particle entries; the pruning block adds the ones slicing dropped
    entries = {**base, "particles": [{"id": 0, "pruned": True}, {"id": 2, "pruned": False}]}
    assert pruned_particle_ids(entries) == [0]
    both = {**sliced, "pruned": [False, False]}
    assert pruned_particle_ids(both) == [1, 3] and removed_caption(both) == ["pruned: p1, p3 (step 3)"]
    assert pruned_particle_ids({**base, "pruning": {"did_prune": False, "pruned_indices": []}}) == []
