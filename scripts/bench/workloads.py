"""The benchmark's workloads: what one image costs, and which kinds of annealing step it is made of.

W  — 1 image 256², FFHQ-LDM architecture (random weights), 4 particles, 50 annealing steps ×
     (2 PF-ODE + 100 Langevin, lr 5e-5): DAPS' own LDM Langevin setting; every step is alike.
W′ — the original study's exp1 workload: 50 × (2 PF-ODE + 50 Langevin, lr 4e-6; SPEC §2) with DINO
     ViT-S/16 repulsion (random weights, scale 10) on while σ ≥ σ_break = 1.0, i.e. steps 0–29.
     Three kinds of step: repulsion on (decode + DINO forward and backward at the particle count,
     before the PF-ODE); repulsion off on a logged step (30, 35, 40, 45: the feature distances are
     still logged, a no-grad decode + DINO forward); repulsion off otherwise (16 steps), which is
     a W step with fewer Langevin steps.  Speed does not depend on the scale's value (the original's
     injected multiplier is scale² = 100).

The exact path stands in for the official code at both workloads: on one H100 the two agreed within
1 % at W (300.0–300.9 s vs 296.5–297.9 s per image, 2026-12-05) and within 3 % at W′ (157.2 vs
153.2 s).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional

import torch

from scripts.bench.common import NUM_ANNEAL, ODE_STEPS

SIGMA_MAX, SIGMA_MIN, TIMESTEP = 10.0, 0.1, "poly-7"  # configs/sampler/latent_daps.yaml annealing


@dataclass(frozen=True)
class Workload:
    name: str
    langevin_steps: int
    langevin_lr: float
    repulsion_scale: float = 0.0          # 0: no repulsion hook
    repulsion_sigma_break: float = 1.0
    repulsion_feature: str = "dino"
    dino_weights: str = "random:vit_small_patch16"
    note: str = ""

    @property
    def repulsion(self) -> bool:
        return self.repulsion_scale > 0

    def step_counts(self) -> Dict[str, int]:
        """Annealing steps of each kind in a whole run (the sampler's σ schedule and the hook's log steps)."""
        from repulsion import logged_step

        sig = sigmas()
        if not self.repulsion:
            return {"plain": NUM_ANNEAL}
        on = [i for i in range(NUM_ANNEAL) if float(sig[i]) >= self.repulsion_sigma_break]
        off = [i for i in range(NUM_ANNEAL) if i not in on]
        logged = [i for i in off if logged_step(i)]
        return {"repulsion": len(on), "no_repulsion_logged": len(logged), "no_repulsion": len(off) - len(logged)}

    def definition(self, particles: int = 4) -> Dict[str, Any]:
        """What a --matrix JSON records about the workload."""
        d = asdict(self)
        if not self.repulsion:  # no hook: its settings would only mislead
            d = {k: v for k, v in d.items() if not k.startswith(("repulsion_", "dino_"))}
        d.update(anneal_steps=NUM_ANNEAL, ode_steps=ODE_STEPS, particles=particles,
                 sigma_schedule={"sigma_max": SIGMA_MAX, "sigma_min": SIGMA_MIN, "timestep": TIMESTEP},
                 step_counts=self.step_counts())
        if self.repulsion:
            on = self.step_counts()["repulsion"]
            d["repulsion_steps"] = f"0–{on - 1} (σ ≥ {self.repulsion_sigma_break})"
        return d

    def repulsion_hook(self, model, device: torch.device, sigma_break: Optional[float] = None):
        """The pipeline's RepulsionHook with this workload's settings (`sigma_break` overrides where the
        timed run switches repulsion off)."""
        from cores.config import DinoConfig, RepulsionConfig
        from repulsion import RepulsionHook

        cfg = RepulsionConfig(scale=self.repulsion_scale, feature=self.repulsion_feature,
                              sigma_break=self.repulsion_sigma_break if sigma_break is None else sigma_break,
                              sigma_max=SIGMA_MAX, dino=DinoConfig(weights_path=self.dino_weights))
        return RepulsionHook.from_config(cfg, model, device)


def sigmas() -> torch.Tensor:
    """σ_0 … σ_50 of the annealing (σ_i is the level step i starts from)."""
    from cores.scheduler import EDMScheduler

    return EDMScheduler(NUM_ANNEAL, SIGMA_MAX, SIGMA_MIN, TIMESTEP).sigma_steps


WORKLOADS = {
    "W": Workload("W", 100, 5e-5, note="DAPS' LDM Langevin setting; exact path = official DAPS within 1 % (H100)"),
    "Wprime": Workload("Wprime", 50, 4e-6, repulsion_scale=10.0,
                       note="the original study's exp1: Langevin 50, lr 4e-6, DINO repulsion (random weights, "
                            "scale 10) on steps 0–29; exact path stands in for official DAPS / the original code"),
}
