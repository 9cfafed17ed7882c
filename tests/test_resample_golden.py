"""Golden test: the ReSample port (cores/resample.py) against values computed by ReSample's own
code on the tiny fixture LDM (scripts/resample_reference.py → tests/fixtures/resample_ref.pt).

Their code ran each particle alone (batch 1); the port runs both particles in one batch and is
fed the same random draws, so each case also checks that rows are independent chains."""
from __future__ import annotations

import yaml
import pytest
import torch

from conftest import FIXTURES

from cores.config import ResampleConfig, ResampleOptimizerConfig
from cores.models.ldm import build_ldm
from cores.operators import get_operator
from cores.resample import (ddim_schedule, ddim_step, eps_function, guidance_step, latent_optimization,
                            pixel_optimization, resample, stochastic_resample, training_alphas_cumprod)
from sampler import ParticleBatch

ATOL = 1e-4   # relative to the output scale, as the other golden fixtures (tests/fixtures/README.md)


@pytest.fixture(scope="module")
def setup():
    ref = torch.load(FIXTURES / "resample_ref.pt", map_location="cpu")
    model = build_ldm({"name": "ldm", "ldm_config": yaml.safe_load(open(FIXTURES / "ldm_tiny_ffhq.yaml")),
                       "diffusion_path": str(FIXTURES / "ldm_tiny_ffhq.pt")}, "cpu")
    op = get_operator("phase_retrieval", oversample=2.0, resolution=64, sigma=ref["settings"]["measurement_sigma"])
    return ref, model, op


def close(got: torch.Tensor, want: torch.Tensor, atol: float = ATOL) -> None:
    err = float((got - want).abs().max())
    assert err <= atol * max(1.0, float(want.abs().max())), f"max abs err {err:.3e}"


def config(ref, **kw) -> ResampleConfig:
    s = ref["settings"]
    return ResampleConfig(ddim_steps=s["ddim_steps"], ddim_eta=s["ddim_eta"], **kw)


def scalars(sch, k):
    return [v[k].reshape(()) for v in (sch.alphas, sch.alphas_prev, sch.sigmas)]


class RecordedStreams:
    """Row r's draws in the order they were fed to their code (stands in for ParticleStreams)."""

    def __init__(self, per_row):
        self.per_row, self.k = per_row, [0] * len(per_row)

    def __len__(self):
        return len(self.per_row)

    def randn_like(self, x):
        out = []
        for r in range(len(self.per_row)):
            out.append(self.per_row[r][self.k[r]].reshape(x.shape[1:]))
            self.k[r] += 1
        return torch.stack(out)


def test_metadata_names_their_commit(setup):
    meta = setup[0]["metadata"]
    assert meta["repository"] == "github.com/soominkwon/resample" and len(meta["commit"]) == 40


def test_ddim_step_and_guidance(setup):
    ref, model, op = setup
    r = ref["ddim_step"]
    cfg = config(ref)
    acp = training_alphas_cumprod(model, cfg)
    sch = ddim_schedule(acp, cfg.ddim_steps, cfg.ddim_eta)
    assert sch.timesteps[r["index"]] == r["timestep"]
    a_t, a_prev, s_t = scalars(sch, r["index"])
    e_t = eps_function(model, acp)(r["z"], r["timestep"])
    x_prev, pred_x0, pseudo_x0 = ddim_step(r["z"], e_t, a_t, a_prev, s_t, r["noise"])
    close(x_prev, r["x_prev"])
    close(pred_x0, r["pred_x0"])
    close(pseudo_x0, r["pseudo_x0"])
    guided = guidance_step(model, op, r["z"], e_t, x_prev, ref["y"], a_t, cfg.guidance_scale)
    close(guided, ref["guidance"]["z_next"])
    assert float((guided - x_prev).abs().max()) > 1e-4   # the gradient step did move it


def test_stochastic_resample(setup):
    ref, model, _ = setup
    r = ref["stochastic_resample"]
    cfg = config(ref)
    sch = ddim_schedule(training_alphas_cumprod(model, cfg), cfg.ddim_steps, cfg.ddim_eta)
    a_t, a_prev, _ = scalars(sch, r["index"])
    gamma = cfg.resample_sigma_scale * (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    close(stochastic_resample(r["pseudo_x0"], r["x_t"], a_prev, gamma, r["noise"]), r["out"])


def test_latent_optimization(setup):
    ref, model, op = setup
    s = ref["settings"]
    cfg = config(ref, latent_optimization=ResampleOptimizerConfig(lr=5e-3, eps=s["latent_eps"],
                                                                  max_iters=s["latent_max_iters"], patience=200))
    z, iters = latent_optimization(model, op, ref["latent_optimization"]["z_init"], ref["y"], cfg)
    close(z, ref["latent_optimization"]["out"])


def test_pixel_optimization_rows_stop_on_their_own(setup):
    ref, _, op = setup
    r = ref["pixel_optimization"]
    cfg = config(ref, pixel_optimization=ResampleOptimizerConfig(lr=1e-2, eps=r["eps"],
                                                                 max_iters=ref["settings"]["pixel_max_iters"]))
    x, iters = pixel_optimization(op, r["x_prime"], r["y"], cfg)
    assert iters[0] < iters[1]   # particle 0 met eps first; in their batch-wide loss both would stop together
    close(x, r["out"])


def test_resample_sampling_run(setup):
    ref, model, op = setup
    s = ref["settings"]
    cfg = config(ref, pixel_optimization=ResampleOptimizerConfig(lr=1e-2, eps=1e-3, max_iters=s["run_pixel_max_iters"]),
                 latent_optimization=ResampleOptimizerConfig(lr=5e-3, eps=1e-3, max_iters=s["run_latent_max_iters"],
                                                             patience=200))
    draws = ref["resample_sampling"]["draws"]     # (particles, n_draws, C, h, w)
    streams = RecordedStreams([list(draws[p]) for p in range(draws.shape[0])])
    zt = streams.randn_like(draws[:, 0])
    n = draws.shape[0]
    batch = ParticleBatch(zt=zt, y=ref["y"], image_ids=torch.zeros(n, dtype=torch.long),
                          particle_ids=torch.arange(n), streams=streams)
    resample(model, op, batch, cfg)
    assert streams.k == [draws.shape[1]] * n   # the same number of draws as their code
    close(batch.zt, ref["resample_sampling"]["out"], atol=1e-3)


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_schedule_at_positive_eta_is_bitwise_theirs(setup, eta):
    """σ_t and √(1 − ᾱ_t) at η > 0, as their p_sample_ddim reads them (`ddim_schedule_eta`, made by their own
    make_schedule): σ_t needs (1 − ᾱ) and its reciprocal in float32; √(1 − ᾱ) is their float32 sqrt."""
    ref, model, _ = setup
    want = ref["ddim_schedule_eta"][eta]
    cfg = ResampleConfig(ddim_steps=ref["settings"]["ddim_steps"], ddim_eta=eta)
    sch = ddim_schedule(training_alphas_cumprod(model, cfg), cfg.ddim_steps, eta)
    assert sch.sigmas.dtype == torch.float32 and torch.equal(sch.sigmas, want["sigmas"])
    assert torch.equal(torch.stack([(1.0 - a_t).sqrt() for a_t, _, _ in (scalars(sch, k) for k in range(len(sch)))]),
                       want["sqrt_one_minus_alphas"])
    # the float64 formula misses their bits: the check above can fail
    a64, p64 = sch.alphas.double(), sch.alphas_prev.double()
    plain = (eta * ((1 - p64) / (1 - a64) * (1 - a64 / p64)).sqrt()).float()
    assert not torch.equal(plain, want["sigmas"])


def test_latent_stop_compares_in_float32(setup):
    """Their `cur_loss < eps**2` with cur_loss a numpy float32: NumPy compares in float32, so a loss equal to
    float32(eps²) (just below eps² in float64) does not stop; the next float32 down does."""
    import numpy as np

    ref, model, op = setup
    eps = 1e-3
    at = np.float32(eps ** 2)
    below = np.nextafter(at, np.float32(0))
    assert not bool(np.asarray(at, dtype=np.float32) < eps ** 2) and bool(np.asarray(below) < eps ** 2)
    assert float(at) < eps ** 2  # in float64 the same value would stop
    from cores import resample as rs

    for value, stops in ((float(at), False), (float(below), True)):
        calls = []

        def loss_fn(v, rows, value=value):
            calls.append(1)
            return (v.flatten(1).sum(1) * 0 + value).float()

        z = torch.zeros(1, 3, 4, 4)
        _, iters = rs._rowwise_adamw(z, loss_fn, 5e-3, 0.01, 5, float(torch.tensor(eps ** 2, dtype=torch.float32)),
                                     200)
        assert (iters[0] == 1) == stops
    # and latent_optimization hands that float32 threshold over
    seen = {}
    real = rs._rowwise_adamw
    try:
        def spy(var0, loss_fn, lr, weight_decay, max_iters, threshold, patience):
            seen["threshold"] = threshold
            return var0, [0]

        rs._rowwise_adamw = spy
        cfg = config(ref, latent_optimization=ResampleOptimizerConfig(lr=5e-3, eps=eps, max_iters=1, patience=200))
        rs.latent_optimization(model, op, ref["latent_optimization"]["z_init"], ref["y"], cfg)
    finally:
        rs._rowwise_adamw = real
    assert seen["threshold"] == float(at)
