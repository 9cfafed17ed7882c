"""Hard data consistency with the noise-aware stop: MSE ≤ τ·σ_y² (discrepancy principle)."""
from __future__ import annotations

import pytest
import torch

from conftest import TINY, compose
from cores.config import build_run_config
from cores.data import ImageFolder
from cores.errors import ConfigError
from cores.models import build_model
from cores.operators import get_operator
from cores.optimization import OptimizationConfig, OptimizationHook, optimize_latents, per_particle_mse
from cores.validation import validate_config
from sampler import ParticleBatch, StepContext

SIGMA = 0.05


@pytest.fixture(scope="module")
def noisy(one_thread):
    """Latents near the truth and a noisy measurement: the eps rule would fit the noise."""
    from conftest import ROOT

    model = build_model({"name": "toy", "prior_images": [str(ROOT / "dataset/demo-ffhq")], "std": 0.05})
    op = get_operator("phase_retrieval", oversample=2.0, resolution=64, sigma=SIGMA)
    ds = ImageFolder(ROOT / "dataset/demo-ffhq", 64, 0, 3)
    z_true = model.encode(torch.stack([ds[i] for i in range(len(ds))]))
    y = op.measure(model.decode(z_true), torch.Generator().manual_seed(0))
    z = z_true + 0.3 * torch.randn(z_true.shape, generator=torch.Generator().manual_seed(1))
    return model, op, z, y


def test_noise_stop_halts_at_the_first_iteration_below_tau_sigma2(noisy):
    model, op, z, y = noisy
    for tau in (1.0, 1.5):
        thr = tau * SIGMA ** 2
        res = optimize_latents(model, op, z, y, OptimizationConfig(stop="noise", noise_tau=tau, sigma_y=SIGMA,
                                                                   max_iters=300))
        assert res.reasons == ["noise"] * 3
        for r in range(3):
            k = res.final_iters[r]
            assert res.init_losses[r] > thr and 0 < k < 300 and res.final_losses[r] <= thr
            # one step earlier the same path (eps 0 never stops) is still above the threshold
            before = optimize_latents(model, op, z[r:r + 1], y[r:r + 1],
                                      OptimizationConfig(eps=0.0, max_iters=k - 1))
            assert before.reasons == ["max_iters"] and before.final_losses[0] > thr
        # the returned latent is the one that reached the threshold, and its per-element MSE is the loss
        torch.testing.assert_close(per_particle_mse(model, op, res.z, y).double(),
                                   torch.tensor(res.final_losses, dtype=torch.float64), rtol=1e-6, atol=0)
    # it stops earlier than the eps rule, which runs on below the noise level
    eps = optimize_latents(model, op, z, y, OptimizationConfig(max_iters=300))
    assert all(e > n for e, n in zip(eps.final_iters, res.final_iters))
    assert min(eps.final_losses) < SIGMA ** 2


def test_eps_ignores_the_noise_settings(noisy):
    model, op, z, y = noisy
    a = optimize_latents(model, op, z, y, OptimizationConfig(max_iters=40, eps=0.04))
    b = optimize_latents(model, op, z, y, OptimizationConfig(max_iters=40, eps=0.04, noise_tau=3.0, sigma_y=SIGMA))
    assert torch.equal(a.z, b.z) and a.final_iters == b.final_iters and a.reasons == b.reasons
    assert a.final_losses == b.final_losses


def test_hook_line_and_config(noisy, tmp_path):
    model, op, z, y = noisy
    cfg = OptimizationConfig(enabled=True, stop="noise", sigma_y=SIGMA, max_iters=300)
    batch = ParticleBatch(zt=z, y=y, image_ids=torch.tensor([0, 0, 1]), particle_ids=torch.tensor([0, 1, 0]),
                          streams=None)
    hook = OptimizationHook(cfg)
    hook.on_end(batch, StepContext(0, 0.1, None, 0.0, 1, model, op))
    line = hook.image_output(0, {"particle_ids": [0, 1]}).jsonl["optimization"][0]
    assert line["termination_reasons"] == ["noise", "noise"]
    assert line["noise_threshold"] == pytest.approx(SIGMA ** 2) and line["stop"] == "noise"
    # σ_y comes from task.sigma; the rule needs it > 0
    base = TINY + [f"save_dir={tmp_path}", "hard_data_consistency=1", "optimization_stop=noise"]
    rc = build_run_config(compose(base + ["optimization_noise_tau=1.5"]))
    assert rc.optimization.sigma_y == 0.05 and rc.optimization.noise_threshold == pytest.approx(1.5 * 0.05 ** 2)
    with pytest.raises(ConfigError, match="task.sigma"):
        validate_config(build_run_config(compose(base + ["task.sigma=0"])))
    with pytest.raises(ConfigError, match="optimization_stop"):
        build_run_config(compose(TINY + ["optimization_stop=loss"]))
    assert build_run_config(compose(TINY)).optimization.stop == "eps"
