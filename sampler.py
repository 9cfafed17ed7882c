"""LatentDAPS (Zhang et al., CVPR 2025) with hook points for the research additions.

The loop in `latent_daps` is the whole algorithm; read it next to the paper:

    z_T ~ N(0, σ_max² I)                                    (one draw per particle)
    for i = 0 … N−1, σ = σ_i:
        1. z0hat = PF-ODE(z_t; σ → 0.001), 2 Euler steps   (hooks may add to the score: repulsion)
        2. z0y   = MCMC on p(z0 | z_t, y) started at z0hat
        3. z_t   = z0y + σ_{i+1}·ε                          (no noise after the last step)
    x = D_vae(z_t)

Rows of the batch are (image, particle) pairs; every row owns its random
stream (`cores.rng`), so a particle's path is independent of batching.
Hooks (`SamplerHook`) wrap the score, act after each MCMC step (pruning may
shrink the batch or freeze rows) and once at the end (latent optimisation);
`callback` only observes (timing, progress).  Guard rail: a row whose score
entering the PF-ODE, or whose MCMC state, turns non-finite is held at its last
finite state and listed in `nan_events` (stage "score" / "mcmc"); the other
rows go on untouched.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

from cores.config import DAPSConfig
from cores.mcmc import run_mcmc
from cores.rng import ParticleStreams
from cores.scheduler import DiffusionPFODE, EDMScheduler


@dataclass
class ParticleBatch:
    """Everything with one row per particle.  `keep(rows)` cuts all of it at once; `refill` adds clones."""

    zt: torch.Tensor                 # (B, C, h, w) current latent
    y: torch.Tensor                  # (B, ...) measurement of the row's image
    image_ids: torch.Tensor          # (B,) dataset index of the row's image
    particle_ids: torch.Tensor       # (B,) particle index within its image (stable under pruning)
    streams: ParticleStreams
    z0hat: Optional[torch.Tensor] = None
    z0y: Optional[torch.Tensor] = None
    x: Optional[torch.Tensor] = None  # final decoded images
    pruned: Optional[torch.Tensor] = None  # (B,) bool: removed by pruning (masking: frozen; shadow: running on)
    trajectory: List[torch.Tensor] = field(default_factory=list)  # z0y per step (CPU) when recorded
    nan_events: List[Dict] = field(default_factory=list)
    frozen: Optional["ParticleBatch"] = None  # masking: rows set aside at their z0y until `thaw`

    def __post_init__(self) -> None:
        if self.pruned is None:
            self.pruned = torch.zeros(self.zt.shape[0], dtype=torch.bool, device=self.image_ids.device)

    def __len__(self) -> int:
        return self.zt.shape[0]

    def rows_of_image(self, image_id: int) -> torch.Tensor:
        return (self.image_ids == image_id).nonzero().flatten()

    def rows_by_particle(self, image_id: int) -> List[int]:
        """The image's rows in particle-id order (how logs list per-particle values)."""
        return sorted(self.rows_of_image(image_id).tolist(), key=lambda r: int(self.particle_ids[r]))

    def record_nonfinite(self, rows: Sequence[int], step: int, stage: str) -> None:
        """Name each contained non-finite row (step, image, particle, stage) in `nan_events`."""
        self.nan_events += [{"step": step, "image_idx": int(self.image_ids[r]), "particle": int(self.particle_ids[r]),
                             "stage": stage} for r in rows]

    def record_step(self, mcmc, step: int, keep_trajectory: bool) -> None:
        """Take the MCMC result as z0y; remember its non-finite resets and, when asked, the latent."""
        self.z0y = mcmc.z
        self.record_nonfinite(mcmc.nan_rows, step, "mcmc")
        if keep_trajectory:
            self.trajectory.append(self.z0y.detach().cpu())

    def keep(self, rows: Sequence[int]) -> "ParticleBatch":
        """Keep `rows` (in this order); returns the dropped rows as their own batch."""
        rows_t = torch.as_tensor(list(rows), dtype=torch.long, device=self.zt.device)
        dropped = [r for r in range(len(self)) if r not in set(rows_t.tolist())]
        gone = self._select(dropped)
        kept = self._select(rows_t.tolist())
        self.__dict__.update({k: v for k, v in kept.__dict__.items() if k not in ("nan_events", "frozen")})
        return gone

    def freeze(self, rows: Sequence[int]) -> None:
        """Masking: set `rows` aside, flagged pruned, with z_t = their current z0y.  They skip every
        later step (no ODE, MCMC or gradient) and rejoin the batch at `thaw`, before the final decode."""
        rows = set(int(r) for r in rows)
        if not rows:
            return
        gone = self.keep([r for r in range(len(self)) if r not in rows])
        gone.zt, gone.pruned = gone.z0y, torch.ones_like(gone.pruned)
        if self.frozen is None:
            self.frozen = gone
        else:
            self.frozen._extend(gone)

    def thaw(self) -> None:
        """Bring the frozen rows back (their trajectory held at the frozen z0y for the later steps)."""
        gone, self.frozen = self.frozen, None
        if gone is None:
            return
        if gone.trajectory:
            gone.trajectory += [gone.z0y.detach().cpu()] * (len(self.trajectory) - len(gone.trajectory))
        self._extend(gone)

    def refill(self, parents: Sequence[int], particle_ids: Sequence[int]) -> None:
        """Add one clone of row `parents[k]` with id `particle_ids[k]` each (branching after pruning).

        A clone copies every per-row tensor and the recorded trajectory of its parent, but draws from
        a fresh stream of (seed, image, new id), so it diverges from the next noise draw on and does
        not depend on batching.  Rows are then ordered by image (first appearance) and particle id.
        """
        if len(parents) != len(particle_ids):
            raise ValueError(f"refill: {len(parents)} parents but {len(particle_ids)} new particle ids")
        if not len(parents):
            return
        clones = self._select(list(parents))
        clones.particle_ids = torch.as_tensor(list(particle_ids), dtype=self.particle_ids.dtype,
                                              device=self.particle_ids.device)
        clones.streams = self.streams.for_clones(clones.image_ids.tolist(), list(particle_ids))
        self._extend(clones)

    def _extend(self, other: "ParticleBatch") -> None:
        """Append `other`'s rows, then order rows by image (first appearance) and particle id."""
        cat = lambda a, b: None if a is None else torch.cat([a, b.to(a.device)])  # noqa: E731
        self.zt, self.y = cat(self.zt, other.zt), cat(self.y, other.y)
        self.image_ids, self.particle_ids = cat(self.image_ids, other.image_ids), cat(self.particle_ids,
                                                                                      other.particle_ids)
        self.z0hat, self.z0y, self.x = cat(self.z0hat, other.z0hat), cat(self.z0y, other.z0y), cat(self.x, other.x)
        self.pruned = cat(self.pruned, other.pruned)
        self.trajectory = [cat(a, b) for a, b in zip(self.trajectory, other.trajectory)]
        self.streams = self.streams.concat(other.streams)
        first = {img: k for k, img in reversed(list(enumerate(self.image_ids.tolist())))}
        pids = self.particle_ids.tolist()
        self.keep(sorted(range(len(self)), key=lambda r: (first[int(self.image_ids[r])], pids[r])))

    def _select(self, rows: List[int]) -> "ParticleBatch":
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.zt.device)
        cut = lambda t: None if t is None else t[idx.to(t.device)]  # noqa: E731
        return ParticleBatch(
            zt=self.zt[idx], y=self.y[idx], image_ids=self.image_ids[idx.to(self.image_ids.device)],
            particle_ids=self.particle_ids[idx.to(self.particle_ids.device)],
            streams=self.streams.select(rows), z0hat=cut(self.z0hat), z0y=cut(self.z0y), x=cut(self.x),
            pruned=cut(self.pruned), trajectory=[cut(t) for t in self.trajectory], nan_events=[],
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


ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class ImageOutput:
    """What a hook hands over for one finished image; the run folder writes it."""

    record: Dict = field(default_factory=dict)                      # fields added to records/<idx>.json
    jsonl: Dict[str, List[Dict]] = field(default_factory=dict)      # log name -> lines
    trajectories: Dict[str, Dict[int, List[torch.Tensor]]] = field(default_factory=dict)  # folder -> particle -> z0y
    scored_images: Dict[str, torch.Tensor] = field(default_factory=dict)  # name -> images scored as `psnr_<name>`


class SamplerHook:
    """The one interface of the research additions; every method has a no-op default.

    The sampler calls `wrap_score` before each PF-ODE solve (guidance-style: return a new
    score function), `on_step` after MCMC (the hook may shrink the batch with
    `batch.keep`), and `on_end` before the final decode.  The pipeline then asks
    `image_output` once per finished image (run totals: each feature module's `run_totals`).
    """

    def wrap_score(self, score_fn: ScoreFn, batch: ParticleBatch, ctx: StepContext) -> ScoreFn:
        return score_fn

    def on_step(self, batch: ParticleBatch, ctx: StepContext) -> None:
        pass

    def on_end(self, batch: ParticleBatch, ctx: StepContext) -> None:
        pass

    def image_output(self, image_idx: int, record: Dict) -> ImageOutput:
        """Record fields, log lines and trajectories of a finished image (`record` holds its metrics)."""
        return ImageOutput()

    def warm_up(self, model, z: torch.Tensor) -> None:
        """Run the hook's own networks once at z's row count, before the run's VRAM meter starts
        (`cores.warmup`: cuDNN benchmark's trials stay out of the run's peak)."""


Callback = Callable[[Dict], None]


def latent_daps(model, operator, batch: ParticleBatch, cfg: DAPSConfig, hooks: Sequence[SamplerHook] = (),
                callback: Optional[Callback] = None) -> None:
    """Run LatentDAPS in place on `batch`; `batch.x` holds the decoded result.  `callback` observes:
    {"stage", "step", "sigma", "time", "batch"} at "begin", after "ode", "mcmc", each "step", after the
    end hooks ("end_hooks") and at "end"."""
    a = cfg.annealing
    sigmas = EDMScheduler(a.num_steps, a.sigma_max, a.sigma_min, a.timestep).sigma_steps
    observe = _observer(callback, batch, float(sigmas[0]))  # reports "begin" now
    for i in range(a.num_steps if cfg.max_steps is None else min(cfg.max_steps, a.num_steps)):
        ctx = StepContext(i, float(sigmas[i]), float(sigmas[i - 1]) if i else None, float(sigmas[i + 1]),
                          a.num_steps, model, operator)
        # 1. reverse diffusion: z0hat = PF-ODE(z_t; σ_i → σ_min^ode); hooks may add to the score (repulsion)
        score = model.score
        for hook in hooks:
            score = hook.wrap_score(score, batch, ctx)
        ode = DiffusionPFODE(score, EDMScheduler(cfg.ode.num_steps, sigmas[i], cfg.ode.sigma_min, a.timestep))
        batch.z0hat = ode.sample(batch.zt)  # a row with a non-finite score stops at its last finite state
        batch.record_nonfinite(ode.nonfinite_rows, i, "score")
        observe("ode", ctx)
        # 2. MCMC on p(z0 | z_t, y) started at z0hat (DAPS: lr ratio = i / number of time points)
        mcmc = run_mcmc(model, operator, batch.y, batch.zt, batch.z0hat, sigmas[i].to(batch.zt.device),
                        i / (a.num_steps + 1), batch.streams, cfg.mcmc)
        batch.record_step(mcmc, i, keep_trajectory=cfg.record_trajectory)
        observe("mcmc", ctx)
        for hook in hooks:
            hook.on_step(batch, ctx)
        # 3. forward diffusion to the next noise level (no noise after the last step)
        last = i == a.num_steps - 1
        batch.zt = (batch.z0y if last else
                    batch.z0y + sigmas[i + 1].to(batch.zt.device) * batch.streams.randn_like(batch.z0y))
        observe("step", ctx)
    for hook in hooks:
        hook.on_end(batch, ctx)
    observe("end_hooks", ctx)
    batch.thaw()  # masking: the frozen particles are decoded with the others
    with torch.no_grad():
        batch.x = model.decode(batch.zt)
    observe("end", ctx)


def _observer(callback: Optional[Callback], batch: ParticleBatch,
              sigma_max: float) -> Callable[[str, StepContext], None]:
    """Calls `callback` with a timestamp taken after the GPU finished the stage (no-op without one);
    reports the "begin" of the loop at once."""
    if callback is None:
        return lambda stage, ctx: None
    sync = torch.cuda.synchronize if batch.zt.is_cuda else (lambda: None)

    def report(stage: str, step: int, sigma: float) -> None:
        sync()
        callback({"stage": stage, "step": step, "sigma": sigma, "time": time.perf_counter(), "batch": batch})

    report("begin", 0, sigma_max)
    return lambda stage, ctx: report(stage, ctx.step, ctx.sigma)


def initial_batch(model, y_per_image: torch.Tensor, image_ids: Sequence[int], num_particles: int,
                  seed: int, sigma_max: float, device: torch.device) -> ParticleBatch:
    """Rows = images × particles; z_T ~ N(0, σ_max²) from each row's own stream."""
    img = torch.as_tensor(list(image_ids), dtype=torch.long).repeat_interleave(num_particles)
    part = torch.arange(num_particles).repeat(len(image_ids))
    streams = ParticleStreams.for_particles(seed, img.tolist(), part.tolist(), device)
    zt = streams.randn(model.get_in_shape()) * sigma_max
    y = y_per_image.repeat_interleave(num_particles, dim=0)
    return ParticleBatch(zt=zt, y=y, image_ids=img.to(device), particle_ids=part.to(device), streams=streams)
