"""Hard data consistency: per-particle AdamW, termination, accept-if-improve, hook outputs."""
import json
import math

import pytest
import torch

from cores.data import ImageFolder
from cores.mcmc import MCMCConfig
from cores.models import build_model
from cores.operators import get_operator
from cores.optimization import OptimizationConfig, OptimizationHook, optimize_latents, per_particle_mse, summarize
from cores.pipeline import measure_images
from cores.run_folder import RunFolder
from sampler import DAPSConfig, initial_batch, latent_daps

ROOTS = ["dataset/demo-ffhq", "dataset/demo-imagenet"]


@pytest.fixture(scope="module")
def toy():
    from conftest import ROOT

    model = build_model({"name": "toy", "prior_images": [str(ROOT / r) for r in ROOTS], "std": 0.05})
    op = get_operator("phase_retrieval", oversample=2.0, resolution=64, sigma=0.05)
    ds = ImageFolder(ROOT / ROOTS[0], 64, 0, 4)
    z_true = model.encode(torch.stack([ds[i] for i in range(len(ds))]))
    return model, op, z_true


def _mixed_batch(model, op, z_true):
    """4 rows that end differently: near the truth (converges), far (runs on), NaN, far with other image."""
    g = torch.Generator().manual_seed(0)
    y = op(model.decode(z_true))  # noise-free, so a loss < eps² is reachable
    z = torch.stack([z_true[0] + 0.04 * torch.randn(z_true[0].shape, generator=g),
                     z_true[1] + 0.3 * torch.randn(z_true[1].shape, generator=g),
                     torch.full_like(z_true[2], math.nan),
                     z_true[3] + 0.3 * torch.randn(z_true[3].shape, generator=g)])
    return z, y


def test_particle_alone_equals_particle_in_batch(toy):
    """Every row's path (iterations, losses, latent) is bit-identical to optimising it alone."""
    model, op, z_true = toy
    z, y = _mixed_batch(model, op, z_true)
    cfg = OptimizationConfig(lr=5e-3, eps=2e-3, max_iters=30)
    full = optimize_latents(model, op, z, y, cfg)
    assert len(set(full.reasons)) >= 3  # rows stopped at different times for different reasons
    for r in range(4):
        alone = optimize_latents(model, op, z[r:r + 1], y[r:r + 1], cfg)
        assert alone.final_iters == [full.final_iters[r]]
        assert alone.reasons == [full.reasons[r]]
        assert alone.init_losses == [full.init_losses[r]]
        assert alone.final_losses == [full.final_losses[r]]
        assert alone.accepted == [full.accepted[r]]
        assert torch.equal(alone.z[0].nan_to_num(7.0), full.z[r].nan_to_num(7.0))


def test_termination_reasons(toy):
    model, op, z_true = toy
    z, y = _mixed_batch(model, op, z_true)
    res = optimize_latents(model, op, z, y, OptimizationConfig(lr=5e-3, eps=2e-3, max_iters=30))
    assert res.reasons[0] == "converged" and 0 < res.final_iters[0] < 30
    assert res.final_losses[0] < 2e-3 ** 2
    assert res.reasons[1] == "max_iters" and res.final_iters[1] == 30
    assert res.reasons[2] == "nan" and res.final_iters[2] == 0 and res.final_losses[2] is None
    assert res.accepted == [True, True, False, True]
    assert torch.isnan(res.z[2]).all()  # NaN row rejected → its original latent, untouched
    # plateau: a far too large step makes the loss 5 iterations later higher than before
    plat = optimize_latents(model, op, z[1:2], y[1:2],
                            OptimizationConfig(lr=5.0, eps=1e-3, max_iters=100, plateau_window=5))
    assert plat.reasons == ["plateau"] and 5 <= plat.final_iters[0] < 100


def test_accept_if_improve_keeps_original_when_worse(toy):
    model, op, z_true = toy
    y = op(model.decode(z_true[:2]))
    z = z_true[:2] + 0.01 * torch.randn(z_true[:2].shape, generator=torch.Generator().manual_seed(1))
    bad = optimize_latents(model, op, z, y, OptimizationConfig(lr=50.0, max_iters=3))
    assert all(f > i for f, i in zip(bad.final_losses, bad.init_losses))
    assert bad.accepted == [False, False]
    assert torch.equal(bad.z, z)
    good = optimize_latents(model, op, z, y, OptimizationConfig(lr=5e-3, max_iters=20))
    assert good.accepted == [True, True] and not torch.equal(good.z, z)
    # returned losses are the losses of the returned latents
    assert torch.allclose(per_particle_mse(model, op, good.z, y).double(),
                          torch.tensor(good.final_losses, dtype=torch.float64), rtol=1e-6)


def test_weight_decay_does_not_move_stopped_rows(toy):
    """A row that converged at iteration 0 keeps its exact latent while the others keep stepping."""
    model, op, z_true = toy
    y = op(model.decode(z_true[:2]))
    z = torch.stack([z_true[0], z_true[1] + 0.3])
    res = optimize_latents(model, op, z, y, OptimizationConfig(lr=5e-3, eps=1e-3, max_iters=30, weight_decay=0.5))
    assert res.reasons[0] == "converged" and res.final_iters[0] == 0
    assert res.final_iters[1] == 30
    assert torch.equal(res.z[0], z[0])


def test_hook_writes_jsonl_and_summary(toy, tmp_path):
    model, op, z_true = toy
    gt = model.decode(z_true)
    ids = [0, 1]
    y = measure_images(op, gt[ids], ids, 42)
    batch = initial_batch(model, y, ids, 3, 42, 10.0, torch.device("cpu"))
    hook = OptimizationHook(OptimizationConfig(enabled=True, max_iters=15))
    seen = {}
    latent_daps(model, op, batch, DAPSConfig.with_steps(4, mcmc=MCMCConfig(num_steps=2)), hooks=[hook],
                callback=lambda info: info["stage"] == "step" and seen.__setitem__("zt", info["batch"].zt.clone()))
    records = [{"image_idx": i, "particle_ids": [0, 1, 2]} for i in ids]
    outs = [hook.image_output(i, rec) for i, rec in zip(ids, records)]
    for out in outs:
        RunFolder(tmp_path).write_logs_and_trajectories(0, out.jsonl, {})
    lines = [json.loads(s) for s in (tmp_path / "optimization.jsonl").read_text().splitlines()]
    assert [ln["image_idx"] for ln in lines] == ids
    assert set(lines[0]) == {"image_idx", "init_losses", "final_losses", "final_iters", "termination_reasons",
                             "accepted_mask", "num_accepted", "num_rejected", "total_time_seconds", "lr", "eps",
                             "max_iters"}
    assert all(len(ln["final_iters"]) == 3 and ln["num_accepted"] + ln["num_rejected"] == 3 for ln in lines)
    res = hook.last_result
    expect = torch.where(torch.tensor(res.accepted).view(-1, 1, 1, 1), res.z, seen["zt"])
    assert torch.equal(batch.zt, expect)
    assert torch.allclose(batch.x, model.decode(res.z))
    for rec, out in zip(records, outs):
        rec.update(out.record)
    s = summarize(records)
    assert s["num_particles"] == 6 and s["total_iters"] == sum(res.final_iters)
    assert s["num_accepted"] == sum(res.accepted)
    assert outs[1].record["optimization"]["particle_ids"] == [0, 1, 2]
    # the PSNR before the optimisation is scored from the decode the optimisation started from
    torch.testing.assert_close(outs[0].scored_images["before_optimization"], model.decode(seen["zt"][:3]))
