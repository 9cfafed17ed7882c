"""The injected repulsion term of exp1's composed settings against the original study's formulas, on the tiny
fixture LDM (class-conditional, as ImageNet) and the tiny DINO ViT.

The reference below is written from reading the original code (yuzzznh/diffusion_phase_retrieval, DAPS/ at
b967b2b), not copied: `DinoFeatureExtractor.preprocess` (repulsion.py 171-183: (x+1)/2 when the batch minimum is
negative, clamp [0, 1], bilinear resize to 224, ImageNet mean/std), `compute_repulsion_gradient` (repulsion.py
239-298: off-diagonal differences, lower median over j ≠ i, h = median² / max(log N, 1e-8) clamped at 1e-8,
w = exp(−d²/h), Σ_j 2·w·(f_i − f_j)/h, one VJP, divided by Σ_{j≠i} w), `get_repulsion_scale` (repulsion.py
342-359: 0 unless σ > σ_break) and the double application of the scale (repulsion.py 451, sampler.py 541,
cores/scheduler.py 484): injected = w·(w·∇), w = scale·schedule(σ)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import FIXTURES, compose
from cores.config import build_run_config
from cores.dino import DinoFeatureExtractor
from cores.models import build_model
from cores.scheduler import EDMScheduler
from repulsion import RepulsionHook
from sampler import ParticleBatch, StepContext
from cores.rng import ParticleStreams

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def original_injected_term(z, decode, dino_net, sigma, scale=10.0, sigma_break=1.0):
    """The original's λ·r for one image's particles z (B, C, h, w) at σ, constant schedule."""
    w = scale if sigma > sigma_break else 0.0
    zz = z.clone().requires_grad_(True)
    img = decode(zz)
    if img.min() < 0:
        img = (img + 1) / 2
    img = img.clamp(0, 1)
    if img.shape[-2:] != (224, 224):
        img = F.interpolate(img, size=(224, 224), mode="bilinear", align_corners=False)
    feats = dino_net((img - MEAN) / STD)
    B = z.shape[0]
    off = ~torch.eye(B, dtype=torch.bool)
    diff = (feats.unsqueeze(1) - feats.unsqueeze(0))[off].view(B, B - 1, -1)
    dist = diff.norm(dim=-1, keepdim=True)
    h = (dist.median(dim=1, keepdim=True)[0] ** 2 / max(math.log(B), 1e-8)).clamp(min=1e-8)
    weights = torch.exp(-dist ** 2 / h)
    phi = (2 * weights * diff / h).sum(dim=1)
    (grad,) = torch.autograd.grad((feats * phi.detach()).sum(), zz)
    grad = grad / weights.sum(dim=1).view(B, 1, 1, 1).clamp(min=1e-8)
    handed = w * grad        # the repulsion module's output
    return w * handed        # the PF-ODE multiplies it by w again


@pytest.fixture(scope="module")
def setup():
    model = build_model({"name": "ldm", "ldm_config": yaml.safe_load(open(FIXTURES / "ldm_tiny_cin.yaml")),
                         "diffusion_path": str(FIXTURES / "ldm_tiny_cin.pt"), "class_label": 1000}, "cpu")
    cfg = build_run_config(compose(["+experiment=exp1_repulsion", "model=imagenet256ldm", "data=test-imagenet",
                                    f"dino.weights_path={FIXTURES / 'dino_tiny_vits16.pth'}"]))
    return model, cfg


@pytest.mark.filterwarnings("ignore:repulsion. image")
@pytest.mark.parametrize("step", [0, 15, 29])
def test_exp1_injected_term_matches_the_original(setup, step):
    model, cfg = setup
    rep = cfg.repulsion
    assert (rep.scale, rep.multiplier, rep.sigma_break, rep.schedule, rep.feature, rep.dino.preprocess) == \
        (10.0, "squared", 1.0, "constant", "dino", "original")
    hook = RepulsionHook.from_config(rep, model, "cpu")
    sig = EDMScheduler(cfg.sampler.annealing.num_steps, cfg.sampler.annealing.sigma_max,
                       cfg.sampler.annealing.sigma_min).sigma_steps
    sigma = float(sig[step])
    g = torch.Generator().manual_seed(step)
    n = cfg.num_samples
    z = torch.randn(n, *model.get_in_shape(), generator=g) * max(sigma, 1.0)
    batch = ParticleBatch(zt=z, y=torch.zeros(n, 1), image_ids=torch.zeros(n, dtype=torch.long),
                          particle_ids=torch.arange(n), streams=ParticleStreams.for_particles(0, [0] * n, list(range(n)),
                                                                                               torch.device("cpu")))
    ctx = StepContext(step, sigma, float(sig[step - 1]) if step else None, float(sig[step + 1]), 50, model, None)
    s = torch.tensor(sigma)
    wrapped = hook.wrap_score(model.score, batch, ctx)
    got = wrapped(z, s) - model.score(z, s)
    ext = DinoFeatureExtractor(FIXTURES / "dino_tiny_vits16.pth")
    want = original_injected_term(z, model.decode, ext.features, sigma).detach()
    assert float(want.norm()) > 0
    rel = float((got - want).norm() / want.norm())
    print(f"step {step}: sigma {sigma:.4f}, relative error {rel:.2e}")
    assert rel <= 1e-5, rel
