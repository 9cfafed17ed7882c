"""sampler=resample on the toy prior: particles are independent chains (a particle's result does
not depend on the batch), the run's counts match the schedule, the pipeline writes its record,
and additions that act inside the DAPS loop are refused in one line."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import compose
from cores.config import ResampleConfig, ResampleOptimizerConfig, build_run_config
from cores.errors import ConfigError
from cores.resample import ResampleLog, resample, resample_plan
from cores.validation import validate_config
from sampler import initial_batch

SMALL = dict(ddim_steps=40, pixel_optimization=ResampleOptimizerConfig(lr=1e-2, eps=1e-3, max_iters=15),
             latent_optimization=ResampleOptimizerConfig(lr=5e-3, eps=1e-3, max_iters=12, patience=5))


def run(model, op, gt, image_ids, particles, cfg):
    y = torch.cat([op.measure(gt[i:i + 1], torch.Generator().manual_seed(i)) for i in image_ids])
    batch = initial_batch(model, y, image_ids, particles, 42, cfg.initial_sigma, torch.device("cpu"))
    log = ResampleLog(cfg)
    resample(model, op, batch, cfg, hooks=[log])
    return batch, log


@pytest.mark.parametrize("pixel_stage", [True, False])
def test_particle_result_independent_of_batch(toy_twins_ffhq4, one_thread, pixel_stage):
    model, op, gt = toy_twins_ffhq4
    cfg = ResampleConfig(pixel_stage=pixel_stage, **SMALL)
    together, log = run(model, op, gt, [0, 1], 2, cfg)
    alone, _ = run(model, op, gt, [1], 2, cfg)
    rows = together.rows_of_image(1)
    assert torch.equal(together.x[rows], alone.x)
    assert not torch.equal(together.x[0], together.x[1])   # two particles, two chains
    line = log.image_output(0, {}).record["resample"]
    plan = resample_plan(cfg, 1000)
    assert {k: line[k] for k in plan} == plan
    assert (line["pixel_stages"] > 0) == pixel_stage and line["latent_stages"] > 0
    assert all(0 < i <= cfg.latent_optimization.max_iters for i in line["final_iters"])


def test_patience_stops_rows_on_their_own(toy_twins_ffhq4, one_thread):
    model, op, gt = toy_twins_ffhq4
    cfg = ResampleConfig(**{**SMALL, "latent_optimization": ResampleOptimizerConfig(lr=0.5, eps=1e-3, max_iters=60,
                                                                                     patience=3)})
    _, log = run(model, op, gt, [0], 4, cfg)
    iters = log.image_output(0, {}).record["resample"]["final_iters"]
    assert min(iters) < 60   # a large lr overshoots: the window stop ends some rows early


@pytest.mark.parametrize("extra", ["pruning_step=3", "repulsion_scale=1.0", "hard_data_consistency=1"])
def test_additions_refused(extra):
    cfg = build_run_config(compose(["model=toy", "sampler=resample", extra]))
    with pytest.raises(ConfigError, match="sampler=resample cannot be combined"):
        validate_config(cfg)


def test_run_name_checked_for_resample_too():
    """The checks every run gets (run name inside save_dir) apply to sampler=resample as to DAPS."""
    cfg = build_run_config(compose(["model=toy", "sampler=resample", "name=../outside"]))
    with pytest.raises(ConfigError, match="must be a relative path inside save_dir"):
        validate_config(cfg)


def test_pipeline_run_writes_resample_record(tmp_path, one_thread):
    from cores.pipeline import run as pipeline_run

    cfg = compose(["model=toy", "sampler=resample", "data.end_id=1", "num_samples=2", "eval.lpips=false",
                   "sampler.ddim_steps=25", "sampler.pixel_optimization.max_iters=5",
                   "sampler.latent_optimization.max_iters=5", f"save_dir={tmp_path}", "name=r"])
    metrics = pipeline_run(cfg)
    rec = metrics["images"][0]
    assert len(rec["psnr"]) == 2 and rec["resample"]["ddim_steps"] == 25
    assert len(rec["timing"]["per_step_sec"]) == 25
    assert (tmp_path / "r" / "resample.jsonl").is_file() and (tmp_path / "r" / "grid_results.png").is_file()
    assert json.loads((tmp_path / "r" / "records" / "00000.json").read_text())["resample"]["pixel_stage"] is True


def test_pipeline_run_saves_resample_trajectory(tmp_path, one_thread):
    """save_traj=true with ReSample writes its per-particle strips (DDIM pseudo-x0 frames, no σ label)."""
    from cores.pipeline import run as pipeline_run

    cfg = compose(["model=toy", "sampler=resample", "data.end_id=1", "num_samples=2", "eval.lpips=false",
                   "sampler.ddim_steps=10", "sampler.pixel_optimization.max_iters=2",
                   "sampler.latent_optimization.max_iters=2", "save_traj=true", f"save_dir={tmp_path}", "name=r"])
    pipeline_run(cfg)
    strips = sorted((tmp_path / "r" / "trajectory").glob("*.png"))
    assert len(strips) == 2, strips
