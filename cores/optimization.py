"""ReSample-style hard data consistency on the final latents (Exp4).

After the last annealing step every particle's latent z is optimised with
AdamW on its own loss `mean((A(D_vae(z)) − y)²)`.  Iteration t evaluates the
loss of the current latent (after t optimiser steps), then for that particle:
- loss non-finite                      → stop, reason "nan" (never accepted)
- loss < eps²                          → stop, reason "converged"   (`stop: eps`, the default)
- loss ≤ τ·σ_y²                        → stop, reason "noise"       (`stop: noise`, instead of eps:
  the discrepancy principle — at the true image the expected per-element MSE is σ_y², so fitting
  below it fits the measurement noise)
- t ≥ 200 and loss(t − 200) < loss(t)  → stop, reason "plateau"
- otherwise one AdamW step; after `max_iters` steps the loss of the final
  latent is evaluated once more → reason "max_iters".
`final_iters` = optimiser steps taken; `final_losses` are the losses of the
latents returned.  Accept-if-improve: a particle keeps its optimised latent only
if its final loss is below its initial loss, otherwise its original latent.

Independence (ReSample's official code averages the loss over the batch and
stops everyone together): the batch loss is the *sum* of per-particle losses,
so each row's gradient is its own; AdamW is elementwise and all rows start
together, so an active row has taken exactly as many steps as it would alone
(same bias correction).  A stopped row is frozen exactly: after every step its
latent is restored (AdamW's weight decay and momentum would otherwise keep
moving it).  Weight decay is torch's AdamW default, 0.01, as ReSample uses
`torch.optim.AdamW` with defaults apart from lr.
"""
from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from cores.config import OptimizationConfig
from cores.evaluation import finite_or_none
from cores.vram import VramMeter
from sampler import ImageOutput, ParticleBatch, SamplerHook, StepContext

__all__ = ["OptimizationConfig", "OptimizationHook", "optimize_latents", "per_particle_mse", "summarize",
           "run_totals"]


@dataclass
class OptimizationResult:
    z: torch.Tensor                 # accepted latents (original where rejected)
    init_losses: List[Optional[float]]
    final_losses: List[Optional[float]]
    final_iters: List[int]
    reasons: List[str]
    accepted: List[bool]
    time_sec: float
    x_init: Optional[torch.Tensor] = None   # decoded starting latents (CPU), the first loss evaluation's decode


def per_particle_mse(model, operator, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """mean((A(D_vae(z)) − y)²) over the non-batch dims, one value per row."""
    return _mse(operator, model.decode(z), y)


def _mse(operator, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (operator(x) - y).pow(2).flatten(1).mean(-1)


def optimize_latents(model, operator, z0: torch.Tensor, y: torch.Tensor,
                     cfg: OptimizationConfig) -> OptimizationResult:
    """Per-particle AdamW with per-particle termination and accept-if-improve (see module doc)."""
    t0 = time.perf_counter()
    B = z0.shape[0]
    z0 = z0.detach()
    z = z0.clone().requires_grad_(True)
    opt = torch.optim.AdamW([z], lr=cfg.lr, weight_decay=cfg.weight_decay)
    active = torch.ones(B, dtype=torch.bool)
    history: List[torch.Tensor] = []          # losses (CPU, float64) per iteration, all rows
    init = torch.full((B,), math.nan, dtype=torch.float64)
    final = torch.full((B,), math.nan, dtype=torch.float64)
    iters = [0] * B
    reasons = [""] * B
    frozen = z0.clone()                        # rows' values at the moment they stopped
    x_init: Optional[torch.Tensor] = None
    eps2 = cfg.eps ** 2
    noise_thr = cfg.noise_threshold   # None unless stop == "noise"

    def stop(rows: torch.Tensor, why: str, losses: torch.Tensor) -> None:
        for r in rows.nonzero().flatten().tolist():
            reasons[r] = why
            final[r] = losses[r]
        with torch.no_grad():
            frozen[rows.to(z.device)] = z.detach()[rows.to(z.device)]
        active.logical_and_(~rows)

    for t in range(cfg.max_iters + 1):
        opt.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(t < cfg.max_iters):  # the last evaluation only measures
            x = model.decode(z)
            if t == 0:
                x_init = x.detach().float().cpu()
            losses_dev = _mse(operator, x, y)
            if t < cfg.max_iters:
                # sum, not mean: each row's gradient is its own; non-finite rows contribute nothing
                finite_dev = torch.isfinite(losses_dev)
                torch.where(finite_dev, losses_dev, torch.zeros_like(losses_dev)).sum().backward()
        losses = losses_dev.detach().double().cpu()
        history.append(losses)
        if t == 0:
            init = losses.clone()
        finite = torch.isfinite(losses)
        stop(active & ~finite, "nan", losses)
        if noise_thr is None:
            stop(active & (losses < eps2), "converged", losses)
        else:
            stop(active & (losses <= noise_thr), "noise", losses)
        if t >= cfg.plateau_window:
            stop(active & (history[t - cfg.plateau_window] < losses), "plateau", losses)
        if t == cfg.max_iters:
            stop(active.clone(), "max_iters", losses)
        if not active.any():
            break
        opt.step()
        with torch.no_grad():
            still = active.to(z.device)
            z.copy_(torch.where(still.view(-1, *[1] * (z.dim() - 1)), z, frozen))
        for r in active.nonzero().flatten().tolist():
            iters[r] += 1
    accepted = torch.isfinite(final) & torch.isfinite(init) & (final < init)
    with torch.no_grad():
        z_out = torch.where(accepted.to(z.device).view(-1, *[1] * (z.dim() - 1)), frozen, z0)
    return OptimizationResult(z_out.detach(), [finite_or_none(float(v)) for v in init], [finite_or_none(float(v)) for v in final], iters, reasons,
                              accepted.tolist(), time.perf_counter() - t0, x_init)


class OptimizationHook(SamplerHook):
    """on_end: optimise every particle's final latent; logs `optimization.jsonl` and the PSNR before."""

    def __init__(self, cfg: OptimizationConfig, vram: Optional[VramMeter] = None):
        self.cfg = cfg
        self.vram = vram or VramMeter(torch.device("cpu"))
        self._images: Dict[int, Dict] = {}   # image_idx -> optimization.jsonl line + particle ids + x_init
        self.last_result: Optional[OptimizationResult] = None

    @classmethod
    def from_config(cls, cfg: OptimizationConfig, vram: Optional[VramMeter] = None) -> Optional["OptimizationHook"]:
        return cls(cfg, vram) if cfg.enabled else None

    def on_end(self, batch: ParticleBatch, ctx: StepContext) -> None:
        self.vram.mark()  # the sampling phase's peak goes to the run peak; the segment starts here
        res = optimize_latents(ctx.model, ctx.operator, batch.zt, batch.y, self.cfg)
        batch.zt = res.z
        self.last_result = res
        self.vram.mark("optimization")
        images = list(dict.fromkeys(batch.image_ids.tolist()))
        for img in images:
            rows = batch.rows_by_particle(img)
            acc = [res.accepted[r] for r in rows]
            line = {
                "image_idx": img,
                "init_losses": [res.init_losses[r] for r in rows],
                "final_losses": [res.final_losses[r] for r in rows],
                "final_iters": [res.final_iters[r] for r in rows],
                "termination_reasons": [res.reasons[r] for r in rows],
                "accepted_mask": acc,
                "num_accepted": sum(acc),
                "num_rejected": len(acc) - sum(acc),
                "total_time_seconds": res.time_sec / len(images),  # images of a batch share its time
                "lr": self.cfg.lr, "eps": self.cfg.eps, "max_iters": self.cfg.max_iters,
            }
            if self.cfg.stop != "eps":  # eps runs keep today's line exactly
                line.update({"stop": self.cfg.stop, "noise_tau": self.cfg.noise_tau, "sigma_y": self.cfg.sigma_y,
                             "noise_threshold": self.cfg.noise_threshold})
            self._images[img] = {"line": line, "particle_ids": [int(batch.particle_ids[r]) for r in rows],
                                 "x_init": res.x_init[rows] if res.x_init is not None else None}

    def image_output(self, image_idx: int, record: Dict) -> ImageOutput:
        s = self._images.pop(int(image_idx), None)
        if s is None:
            return ImageOutput()
        keys = ("init_losses", "final_losses", "final_iters", "termination_reasons", "accepted_mask",
                "total_time_seconds")
        summary = {"particle_ids": s["particle_ids"], **{k: s["line"][k] for k in keys}}
        # scored against the ground truth by the pipeline, in the order of the record's particles; a
        # particle frozen by masking-mode pruning was not optimised: a NaN image, scored as null
        before = {}
        if s["x_init"] is not None:
            x, ids = s["x_init"], s["particle_ids"]
            gone = torch.full_like(x[0], float("nan"))
            before["before_optimization"] = torch.stack([x[ids.index(p)] if p in ids else gone
                                                         for p in record["particle_ids"]])
        return ImageOutput(record={"optimization": summary}, jsonl={"optimization": [s["line"]]},
                           scored_images=before)


def summarize(records: List[Dict]) -> Dict:
    """Run totals of the optimisation from the image records."""
    opt = [r["optimization"] for r in records if isinstance(r.get("optimization"), dict)]
    iters = [i for o in opt for i in o["final_iters"]]
    accepted = sum(bool(a) for o in opt for a in o["accepted_mask"])
    return {"num_images": len(opt), "num_particles": len(iters), "total_iters": sum(iters),
            "mean_iters": sum(iters) / max(1, len(iters)), "num_accepted": accepted,
            "accepted_rate": accepted / len(iters) if iters else None,
            "total_time_sec": float(sum(o["total_time_seconds"] for o in opt)),
            "termination_counts": dict(Counter(w for o in opt for w in o["termination_reasons"]))}


def run_totals(c: OptimizationConfig, records: List[Dict]) -> Dict:
    """metrics.json `metadata.optimization`: the settings and `summarize(records)`."""
    return {"lr": c.lr, "eps": c.eps, "max_iters": c.max_iters,
            "weight_decay": c.weight_decay, "stop": c.stop, "noise_tau": c.noise_tau,
            **summarize(records)}