"""σ schedules (DAPS `EDMScheduler` semantics) and the PF-ODE solver.

DAPS builds a fresh 2-step EDM schedule from σ_i down to 0.001 at every
annealing step and integrates dz/dσ = −σ·s(z; σ) with Euler over its time
points.  `DiffusionPFODE` does the same, and is the one place where the
repulsion term enters the drift (score' = score + λ·r, SPEC §4.1).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Union

import numpy as np
import torch

SCHEDULERS: Dict[str, Callable[..., "EDMScheduler"]] = {}


def register_scheduler(name: str):
    def deco(cls):
        SCHEDULERS[name] = cls
        return cls

    return deco


def get_diffusion_scheduler(name: str, **kwargs) -> "EDMScheduler":
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler {name!r} is unknown; registered: {sorted(SCHEDULERS)}")
    return SCHEDULERS[name](**kwargs)


@register_scheduler("edm")
class EDMScheduler:
    """Poly-p EDM time steps on r ∈ linspace(0, 1, num_steps + 1).

    Like DAPS: `num_steps` stores the number of time points (steps + 1),
    `time_steps` are the points, `sigma_steps` the first `num_steps` points
    followed by a trailing 0.  A float σ_max is computed in float64 (numpy);
    a tensor σ_max (as DAPS passes σ_i inside the loop) in its own dtype.
    """

    def __init__(self, num_steps: int, sigma_max: Union[float, torch.Tensor] = 100,
                 sigma_min: float = 1e-2, timestep: str = "poly-7"):
        self.num_steps = int(num_steps) + 1
        self.sigma_max, self.sigma_min = sigma_max, sigma_min
        p = int(timestep.split("-")[1])
        rs = np.linspace(0, 1, self.num_steps)
        if isinstance(sigma_max, torch.Tensor):
            pts = [(sigma_max ** (1 / p) + r * (sigma_min ** (1 / p) - sigma_max ** (1 / p))) ** p for r in rs]
            self.time_steps = torch.stack(pts)
        else:
            pts = [(sigma_max ** (1 / p) + r * (sigma_min ** (1 / p) - sigma_max ** (1 / p))) ** p for r in rs]
            self.time_steps = torch.from_numpy(np.array(pts))
        head = self.time_steps[:-1].float()
        self.sigma_steps = torch.cat([head, torch.zeros_like(head[:1])])

    def get_prior_sigma(self) -> float:
        return float(self.sigma_max)


RepulsionWarn = Callable[[torch.Tensor], None]


class DiffusionPFODE:
    """Euler solve of the PF-ODE dz/dσ = −σ·(s(z; σ) + λ·r) over a scheduler's time points.

    `set_repulsion(r, scale)` installs the repulsion direction r (a tensor of
    z's shape, computed once per annealing step by the sampler) and its scale
    λ; `set_repulsion(None, 0.0)` clears it.  Without repulsion the drift is
    exactly DAPS' `−σ·score`.
    """

    def __init__(self, model, scheduler: EDMScheduler):
        self.model = model
        self.scheduler = scheduler
        self.repulsion: Optional[torch.Tensor] = None
        self.repulsion_scale: float = 0.0
        self.last_score_norm: Optional[torch.Tensor] = None
        self.on_ratio: Optional[RepulsionWarn] = None
        # per-row ||score|| of the first Euler evaluation (the step's σ_i); recorded only when
        # asked for (track_score_norm) or repulsion is set, so plain DAPS does no extra work
        self.track_score_norm: bool = False
        self.first_score_norm: Optional[torch.Tensor] = None

    def set_repulsion(self, repulsion: Optional[torch.Tensor], scale: float) -> None:
        if repulsion is None:
            if scale != 0:
                raise AssertionError(f"repulsion cleared but scale={scale} != 0")
        else:
            if not scale > 0:
                raise AssertionError(f"repulsion set with scale={scale}; it must be > 0")
            if not torch.isfinite(repulsion).all():
                raise AssertionError("repulsion direction is not finite")
        self.repulsion, self.repulsion_scale = repulsion, float(scale)

    def derivative(self, z: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        score = self.model.score(z, sigma)
        if self.first_score_norm is None and (self.track_score_norm or self.repulsion is not None):
            self.first_score_norm = score.flatten(1).norm(dim=1)
        if self.repulsion is None:
            return -sigma * score
        if self.repulsion.shape != score.shape:
            raise AssertionError(f"repulsion shape {tuple(self.repulsion.shape)} != score {tuple(score.shape)}")
        push = self.repulsion_scale * self.repulsion
        if self.on_ratio is not None:
            ratio = push.flatten(1).norm(dim=1) / score.flatten(1).norm(dim=1).clamp_min(1e-12)
            self.on_ratio(ratio)
        self.last_score_norm = score.flatten(1).norm(dim=1)
        return -sigma * (score + push)

    @torch.no_grad()
    def sample(self, z: torch.Tensor) -> torch.Tensor:
        ts = self.scheduler.time_steps
        for k in range(len(ts) - 1):
            t0 = ts[k].to(z.device)
            dt = (ts[k + 1] - ts[k]).to(device=z.device, dtype=z.dtype)
            z = z + dt * self.derivative(z, t0.to(z.dtype))
        return z
