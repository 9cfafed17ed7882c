"""LatentDAPS (Zhang et al., CVPR 2025) with hook points for the research additions.

The loop below is the whole algorithm (SPEC §2); read it next to the paper:

    z_T ~ N(0, σ_max² I)                                    (one draw per particle)
    for i = 0 … N−1, σ = σ_i:
        1. z0hat = PF-ODE(z_t; σ → 0.001), 2 Euler steps   (+ λ·r repulsion, SPEC §4.1)
        2. z0y   = MCMC on p(z0 | z_t, y) started at z0hat
        3. z_t   = z0y + σ_{i+1}·ε                          (no noise after the last step)
    x = D_vae(z_t)

Rows of the batch are (image, particle) pairs; every row owns its random
stream (`cores.rng`), so a particle's path is independent of batching.
Hooks observe or change the batch after each MCMC step (pruning may shrink
it) and once at the end (latent optimisation); `callback` only observes.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

from cores.mcmc import MCMCConfig, run_mcmc
from cores.rng import ParticleStreams
from cores.scheduler import DiffusionPFODE, EDMScheduler


@dataclass
class ParticleBatch:
    """Everything with one row per particle.  `keep(rows)` cuts all of it at once."""

    zt: torch.Tensor                 # (B, C, h, w) current latent
    y: torch.Tensor                  # (B, ...) measurement of the row's image
    image_ids: torch.Tensor          # (B,) dataset index of the row's image
    particle_ids: torch.Tensor       # (B,) particle index within its image (stable under pruning)
    streams: ParticleStreams
    z0hat: Optional[torch.Tensor] = None
    z0y: Optional[torch.Tensor] = None
    x: Optional[torch.Tensor] = None  # final decoded images
    trajectory: List[torch.Tensor] = field(default_factory=list)  # z0y per step (CPU) when recorded
    nan_events: List[Dict] = field(default_factory=list)

    def __len__(self) -> int:
        return self.zt.shape[0]

    def rows_of_image(self, image_id: int) -> torch.Tensor:
        return (self.image_ids == image_id).nonzero().flatten()

    def keep(self, rows: Sequence[int]) -> "ParticleBatch":
        """Keep `rows` (in this order); returns the dropped rows as their own batch."""
        rows_t = torch.as_tensor(list(rows), dtype=torch.long, device=self.zt.device)
        dropped = [r for r in range(len(self)) if r not in set(rows_t.tolist())]
        gone = self._select(dropped)
        kept = self._select(rows_t.tolist())
        self.__dict__.update({k: v for k, v in kept.__dict__.items() if k != "nan_events"})
        return gone

    def _select(self, rows: List[int]) -> "ParticleBatch":
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.zt.device)
        cut = lambda t: None if t is None else t[idx.to(t.device)]  # noqa: E731
        return ParticleBatch(
            zt=self.zt[idx], y=self.y[idx], image_ids=self.image_ids[idx.to(self.image_ids.device)],
            particle_ids=self.particle_ids[idx.to(self.particle_ids.device)],
            streams=self.streams.select(rows), z0hat=cut(self.z0hat), z0y=cut(self.z0y), x=cut(self.x),
            trajectory=[cut(t) for t in self.trajectory], nan_events=[],
        )


@dataclass
class StepContext:
    """What a hook may want to know about the current annealing step."""

    step: int
    sigma: float
    prev_sigma: Optional[float]
    next_sigma: float
    num_steps: int
    model: object
    operator: object


class SamplerHook:
    """Base hook: override what you need.  Hooks run in the order given."""

    def on_step(self, batch: ParticleBatch, ctx: StepContext) -> None:  # after MCMC, before re-noising
        pass

    def on_end(self, batch: ParticleBatch, ctx: StepContext) -> None:  # after the last step, before decoding
        pass


@dataclass
class DAPSConfig:
    num_steps: int = 50
    sigma_max: float = 10.0
    sigma_min: float = 0.1
    ode_steps: int = 2
    ode_sigma_min: float = 1e-3
    timestep: str = "poly-7"
    mcmc: MCMCConfig = field(default_factory=MCMCConfig)
    record_trajectory: bool = False


def latent_daps(model, operator, batch: ParticleBatch, cfg: DAPSConfig, repulsion=None,
                hooks: Sequence[SamplerHook] = (), callback: Optional[Callable] = None,
                progress: Optional[Callable[[int], None]] = None) -> Dict:
    """Run LatentDAPS in place on `batch`; returns timing records.  `batch.x` holds the result."""
    anneal = EDMScheduler(cfg.num_steps, cfg.sigma_max, cfg.sigma_min, cfg.timestep)
    sigmas = anneal.sigma_steps
    sync = torch.cuda.synchronize if batch.zt.is_cuda else (lambda: None)
    per_step_sec: List[float] = []
    for i in range(cfg.num_steps):
        t0 = time.perf_counter()
        sigma = sigmas[i].to(batch.zt.device)
        ctx = StepContext(i, float(sigmas[i]), float(sigmas[i - 1]) if i else None, float(sigmas[i + 1]),
                          cfg.num_steps, model, operator)
        # 1. reverse diffusion: z0hat from the PF-ODE (repulsion, when on, enters its drift)
        pfode = DiffusionPFODE(model, EDMScheduler(cfg.ode_steps, sigmas[i], cfg.ode_sigma_min, cfg.timestep))
        if repulsion is not None:
            repulsion.update(pfode, batch, ctx)
        batch.z0hat = pfode.sample(batch.zt)
        if repulsion is not None and hasattr(repulsion, "after_ode"):
            repulsion.after_ode(pfode, batch, ctx)  # logs with the score norm of this solve
        # 2. MCMC on p(z0 | z_t, y), started at z0hat (DAPS: ratio = i / number of time points)
        result = run_mcmc(model, operator, batch.y, batch.zt, batch.z0hat, sigma, i / anneal.num_steps,
                          batch.streams, cfg.mcmc)
        batch.z0y = result.z
        batch.nan_events += [{"step": i, "image_idx": int(batch.image_ids[r]),
                              "particle": int(batch.particle_ids[r]), "stage": "mcmc"} for r in result.nan_rows]
        if cfg.record_trajectory:
            batch.trajectory.append(batch.z0y.detach().cpu())
        for hook in hooks:
            hook.on_step(batch, ctx)
        # 3. forward diffusion to the next noise level
        if i < cfg.num_steps - 1:
            batch.zt = batch.z0y + sigmas[i + 1].to(batch.zt.device) * batch.streams.randn_like(batch.z0y)
        else:
            batch.zt = batch.z0y
        sync()
        per_step_sec.append(time.perf_counter() - t0)
        if callback is not None:
            callback(batch, ctx)
        if progress is not None:
            progress(1)
    for hook in hooks:
        hook.on_end(batch, ctx)
    with torch.no_grad():
        batch.x = model.decode(batch.zt)
    return {"per_step_sec": per_step_sec}


def initial_batch(model, y_per_image: torch.Tensor, image_ids: Sequence[int], num_particles: int,
                  seed: int, sigma_max: float, device: torch.device) -> ParticleBatch:
    """Rows = images × particles; z_T ~ N(0, σ_max²) from each row's own stream."""
    img = torch.as_tensor(list(image_ids), dtype=torch.long).repeat_interleave(num_particles)
    part = torch.arange(num_particles).repeat(len(image_ids))
    streams = ParticleStreams.for_particles(seed, img.tolist(), part.tolist(), device)
    zt = streams.randn(model.get_in_shape()) * sigma_max
    y = y_per_image.repeat_interleave(num_particles, dim=0)
    return ParticleBatch(zt=zt, y=y, image_ids=img.to(device), particle_ids=part.to(device), streams=streams)
