"""ReSample-style hard data consistency on the final latents (SPEC §4.3, Exp4).

After the last annealing step every particle's latent z is optimised with
AdamW on its own loss `mean((A(D_vae(z)) − y)²)`.  Iteration t evaluates the
loss of the current latent (after t optimiser steps), then for that particle:
- loss non-finite                      → stop, reason "nan" (never accepted)
- loss < eps²                          → stop, reason "converged"
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

from cores.outputs import append_jsonl
from sampler import ParticleBatch, SamplerHook, StepContext

PLATEAU_WINDOW = 200


@dataclass
class OptimizationConfig:
    lr: float = 5e-3
    eps: float = 1e-3
    max_iters: int = 500
    weight_decay: float = 0.01
    plateau_window: int = PLATEAU_WINDOW


@dataclass
class OptimizationResult:
    z: torch.Tensor                 # accepted latents (original where rejected)
    init_losses: List[Optional[float]]
    final_losses: List[Optional[float]]
    final_iters: List[int]
    reasons: List[str]
    accepted: List[bool]
    time_sec: float


def per_particle_mse(model, operator, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """mean((A(D_vae(z)) − y)²) over the non-batch dims, one value per row."""
    return (operator(model.decode(z)) - y).pow(2).flatten(1).mean(-1)


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
    eps2 = cfg.eps ** 2

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
            losses_dev = per_particle_mse(model, operator, z, y)
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
        stop(active & (losses < eps2), "converged", losses)
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
    num = lambda v: float(v) if math.isfinite(float(v)) else None  # noqa: E731
    return OptimizationResult(z_out.detach(), [num(v) for v in init], [num(v) for v in final], iters, reasons,
                              accepted.tolist(), time.perf_counter() - t0)


class OptimizationHook(SamplerHook):
    """on_end: optimise every particle's final latent; logs `optimization.jsonl` and a run summary."""

    def __init__(self, cfg: OptimizationConfig, folder=None):
        self.cfg = cfg
        self.folder = folder
        self.records: Dict[int, Dict] = {}
        self.vram_segments: Dict[str, float] = {}
        self._totals = {"images": 0, "particles": 0, "iters": 0, "accepted": 0, "time": 0.0}
        self._reasons: Counter = Counter()
        self.last_result: Optional[OptimizationResult] = None

    @classmethod
    def from_config(cls, cfg, folder=None) -> "OptimizationHook":
        return cls(OptimizationConfig(lr=float(cfg.optimization_lr), eps=float(cfg.optimization_eps),
                                      max_iters=int(cfg.optimization_max_iters),
                                      weight_decay=float(cfg.get("optimization_weight_decay", 0.01))), folder)

    def on_end(self, batch: ParticleBatch, ctx: StepContext) -> None:
        dev = batch.zt.device
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        res = optimize_latents(ctx.model, ctx.operator, batch.zt, batch.y, self.cfg)
        batch.zt = res.z
        self.last_result = res
        if dev.type == "cuda":
            mb = torch.cuda.max_memory_allocated(dev) / 2 ** 20
            self.vram_segments["optimization"] = max(mb, self.vram_segments.get("optimization", 0.0))
        images: List[int] = []
        for v in batch.image_ids.tolist():
            if int(v) not in images:
                images.append(int(v))
        for img in images:
            rows = sorted(batch.rows_of_image(img).tolist(), key=lambda r: int(batch.particle_ids[r]))
            acc = [res.accepted[r] for r in rows]
            rec = {
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
            self.records[img] = {**rec, "particle_ids": [int(batch.particle_ids[r]) for r in rows]}
            if self.folder is not None:
                append_jsonl(self.folder.jsonl("optimization"), rec)
            self._totals["images"] += 1
        self._totals["particles"] += len(batch)
        self._totals["iters"] += sum(res.final_iters)
        self._totals["accepted"] += sum(res.accepted)
        self._totals["time"] += res.time_sec
        self._reasons.update(res.reasons)

    def image_summary(self, image_idx: int) -> Dict:
        r = self.records.get(int(image_idx))
        if r is None:
            return {}
        keys = ("particle_ids", "init_losses", "final_losses", "final_iters", "termination_reasons",
                "accepted_mask", "total_time_seconds")
        return {"optimization": {k: r[k] for k in keys}}

    def run_summary(self) -> Dict:
        t = self._totals
        n = max(1, t["particles"])
        return {"optimization": {
            "lr": self.cfg.lr, "eps": self.cfg.eps, "max_iters": self.cfg.max_iters,
            "weight_decay": self.cfg.weight_decay, "num_images": t["images"], "num_particles": t["particles"],
            "total_iters": t["iters"], "mean_iters": t["iters"] / n, "num_accepted": t["accepted"],
            "accepted_rate": t["accepted"] / n if t["particles"] else None,
            "total_time_sec": t["time"], "termination_counts": dict(self._reasons),
        }}
