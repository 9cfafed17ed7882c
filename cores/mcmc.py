"""MCMC on p(z0 | z_t, y) with DAPS semantics (DAPS, step 2 of the loop in `sampler.py`).

    log p(z0 | z_t, y) = −L(D_vae(z0), y) / (2τ²) − ||z0 − z0hat||² / (2σ²) + const

DAPS' gradient of the data term is `clamp(∇_z L, −1, 1) / τ²` (the factor 2 of
the Gaussian is absorbed into τ exactly as in DAPS), the prior term is
`(z_t − z)/σ² + (z0hat − z_t)/σ²` (DAPS' 'gaussian' prior solver, kept in that
form so the floats match).  The step size decays linearly with annealing
progress: η = lr·(1 + ratio·(lr_min_ratio − 1)).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Tuple

import torch

from .rng import ParticleStreams


@dataclass
class MCMCConfig:
    algo: str = "langevin"  # "langevin" | "hmc"
    num_steps: int = 100
    lr: float = 5e-5
    tau: float = 0.01
    lr_min_ratio: float = 0.01
    momentum: float = 0.41  # HMC only
    grad_clamp: float = 1.0

    def __post_init__(self) -> None:
        from cores.errors import ConfigError

        if self.algo not in ("langevin", "hmc"):
            raise ConfigError(f"sampler.mcmc.algo={self.algo}: expected langevin or hmc")
        if self.num_steps < 0:
            raise ConfigError(f"sampler.mcmc.num_steps={self.num_steps} must be >= 0")

    def lr_at(self, ratio: float) -> float:
        return self.lr * (1.0 + ratio * (self.lr_min_ratio - 1.0))


@dataclass
class MCMCResult:
    z: torch.Tensor
    nan_rows: List[int] = field(default_factory=list)  # rows reset to z0hat this call


def data_gradient(model, operator, z: torch.Tensor, y: torch.Tensor,
                  clamp: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """(clamp(∇_z L(D_vae(z), y), ±clamp), L) — one decoder forward + backward."""
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        loss = operator.loss(model.decode(z), y)
        (grad,) = torch.autograd.grad(loss.sum(), z)
    return grad.clamp(-clamp, clamp), loss.detach()


def _finite_rows(x: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(x).flatten(1).all(dim=1)


def run_mcmc(model, operator, y: torch.Tensor, zt: torch.Tensor, z0hat: torch.Tensor,
             sigma: torch.Tensor, ratio: float, streams: ParticleStreams, cfg: MCMCConfig) -> MCMCResult:
    """Sample z0y starting at z0hat.  A particle whose state turns non-finite is reset
    to its z0hat and frozen for the rest of this call; the other rows go on untouched."""
    lr = cfg.lr_at(ratio)
    z0hat = z0hat.detach()
    prior_score = (z0hat - zt) / sigma ** 2
    z = z0hat.clone()
    velocity = streams.randn_like(z) if cfg.algo == "hmc" else None
    alive = torch.ones(z.shape[0], dtype=torch.bool, device=z.device)
    # step at which each row turned non-finite (−1: never); kept on the device and read once after
    # the loop, so the loop never waits for the GPU (no host synchronisation per step)
    reset_at = torch.full((z.shape[0],), -1, dtype=torch.long, device=z.device)
    for k in range(cfg.num_steps):
        grad, _ = data_gradient(model, operator, z, y, cfg.grad_clamp)
        score = -grad / cfg.tau ** 2 + (zt - z) / sigma ** 2 + prior_score
        eps = streams.randn_like(z)
        if velocity is None:
            z_new = z + lr * score + math.sqrt(2 * lr) * eps
        else:
            step = math.sqrt(lr)
            velocity = cfg.momentum * velocity + step * score + math.sqrt(2 * (1 - cfg.momentum)) * eps
            z_new = z + velocity * step
        bad = alive & ~_finite_rows(z_new)
        reset_at = torch.where(bad, k, reset_at)
        alive &= ~bad
        z = torch.where(bad.view(-1, 1, 1, 1), z0hat, z)
        z = torch.where(alive.view(-1, 1, 1, 1), z_new, z)
    when = reset_at.tolist() if cfg.num_steps else []
    nan_rows = sorted((r for r, k in enumerate(when) if k >= 0), key=lambda r: (when[r], r))
    return MCMCResult(z.detach(), nan_rows)
