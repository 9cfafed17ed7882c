"""σ schedules (DAPS `EDMScheduler` semantics) and the PF-ODE solver.

DAPS builds a fresh 2-step EDM schedule from σ_i down to 0.001 at every
annealing step and integrates dz/dσ = −σ·s(z; σ) with Euler over its time
points.  `DiffusionPFODE` does the same with whatever score function it is
given (the sampler hands it the model's score, possibly wrapped by a hook).
"""
from __future__ import annotations

from typing import Callable, List, Union

import numpy as np
import torch


def get_diffusion_scheduler(name: str, **kwargs) -> "EDMScheduler":
    """The named σ schedule (only DAPS' "edm" exists; the name keeps DAPS' call shape)."""
    if name != "edm":
        raise ValueError(f"scheduler {name!r} is unknown; known: ['edm']")
    return EDMScheduler(**kwargs)


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
        pts = [(sigma_max ** (1 / p) + r * (sigma_min ** (1 / p) - sigma_max ** (1 / p))) ** p for r in rs]
        self.time_steps = torch.stack(pts) if isinstance(sigma_max, torch.Tensor) else torch.from_numpy(np.array(pts))
        head = self.time_steps[:-1].float()
        self.sigma_steps = torch.cat([head, torch.zeros_like(head[:1])])


class DiffusionPFODE:
    """Euler solve of the PF-ODE dz/dσ = −σ·s(z; σ) over a scheduler's time points.

    `score_fn(z, σ)` is the model's score, or a wrapped one (repulsion adds λ·r to it,
    guidance-style); the solver holds no other state.
    """

    def __init__(self, score_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], scheduler: EDMScheduler):
        self.score_fn = score_fn
        self.scheduler = scheduler
        self.nonfinite_rows: List[int] = []  # rows of the last `sample` whose score was not finite

    @torch.no_grad()
    def sample(self, z: torch.Tensor) -> torch.Tensor:
        """Integrate from the scheduler's σ_max to its last point.  Guard rail: a row whose score
        (with whatever a hook added, e.g. repulsion) is not finite stops where it is, at its last
        finite state, for the rest of this solve; the rows are listed in `nonfinite_rows` and the
        other rows are untouched (the MCMC contains a non-finite row the same way)."""
        ts = self.scheduler.time_steps
        finite = torch.ones(z.shape[0], dtype=torch.bool, device=z.device)
        for k in range(len(ts) - 1):
            t0 = ts[k].to(z.device)
            dt = (ts[k + 1] - ts[k]).to(device=z.device, dtype=z.dtype)
            sigma = t0.to(z.dtype)
            score = self.score_fn(z, sigma)
            finite &= torch.isfinite(score).flatten(1).all(dim=1)
            z = torch.where(finite.view(-1, *[1] * (z.dim() - 1)), z + dt * (-sigma * score), z)
        self.nonfinite_rows = (~finite).nonzero().flatten().tolist()  # one device sync per solve
        return z
