"""ReSample (Song et al., ICLR 2024) as a baseline sampler, on the project's models and particles.

A port of `DDIMSampler.resample_sampling` in ReSample's code (soominkwon/resample,
`ldm/models/diffusion/ddim.py`), reproducing it number for number by default.  With T DDIM
steps (index = T−1−i counts down, ᾱ_t = ᾱ[τ_index], ᾱ_prev = ᾱ[τ_index−1], ᾱ[0] for the last):

    z_T ~ N(0, I)                                             (VP latent; one draw per particle)
    for i = 0 … T−1:
        ε = ε_θ(z, τ_index)                                   (no gradient through the UNet)
        z' = DDIM(z, ε)   (+ σ_t·noise, drawn even at η = 0)
        ẑ0 = (z − (1−ᾱ_t)·ε)/√ᾱ_t                             (their pseudo_x0: (1−ᾱ), not √(1−ᾱ))
        z = z' − (ᾱ_t/2)·∇_z ‖y − A(D(ẑ0))‖                   (plain norm, gradient via the decoder only)
        if 0 < index ≤ T − T//3 and index % 10 == 0:          (time travel)
            look ahead ≤ 5 DDIM steps from z (UNet timestep one index later than the ᾱ used) → ẑ0
            index ≥ T//3: x = argmin ‖y − A(x)‖² from D(ẑ0) (pixels), ẑ0 = E(x)   ("pixel stage")
            index < T//3: ẑ0 = argmin ‖y − A(D(ẑ0))‖² (latent)
            z = stochastic resample(ẑ0, z before the look-ahead, ᾱ_prev, γ = 40·(1−ᾱ_prev)/(1−ᾱ_t)·(1−ᾱ_t/ᾱ_prev))
    z = argmin ‖y − A(D(z))‖² from z (latent);  x = D(z)

Both optimisers are AdamW (weight decay 0.01, torch's default) on the mean squared error; the
stop test reads the loss computed before the step, so one more update follows it.  Every
constant their code hard-codes is a `ResampleConfig` value (configs/sampler/resample.yaml).

Particles are independent chains: their guidance norm and optimiser losses span the whole
batch; here every norm and loss is per row (summed only to get each row's own gradient), each
row stops its optimisation on its own, and every random draw comes from the row's stream.  A
particle's result therefore equals their code run on that particle alone.

The denoiser: on a CompVis LDM the UNet gets their integer DDIM timestep (as their
`apply_model`); a model without a discrete-time UNet (the toy prior) is called through the
project's denoiser at that timestep's noise level: with z_VP = √ᾱ·(z0 + σ·ε), σ = √((1−ᾱ)/ᾱ),
ε(z_VP, t) = (z − D(z; σ))/σ with z = z_VP/√ᾱ.  ᾱ is the LDM's own schedule (the toy uses the
CompVis one from the config).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

from cores.compute import counted_call
from cores.config import ResampleConfig, ddim_step_count
from sampler import Callback, ImageOutput, ParticleBatch, SamplerHook, StepContext, _observer

__all__ = ["ResampleConfig", "resample", "resample_plan", "ddim_schedule", "training_alphas_cumprod", "ResampleLog",
           "ddim_step", "guidance_step", "stochastic_resample", "pixel_optimization", "latent_optimization"]


# ----------------------------------------------------------------------------- schedule
def training_alphas_cumprod(model, cfg: ResampleConfig) -> torch.Tensor:
    """ᾱ_t (float32, as CompVis keeps `alphas_cumprod`) of the model's own DDPM schedule; a model
    without one (the toy prior) uses the config's (CompVis ffhq-ldm-vq-4 values)."""
    spec = getattr(model, "spec", None)
    if spec is not None and hasattr(spec, "alphas_cumprod"):
        return spec.alphas_cumprod().to(torch.float32)
    s = cfg.train_schedule
    betas = torch.linspace(s.linear_start ** 0.5, s.linear_end ** 0.5, s.num_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).to(torch.float32)


@dataclass
class DDIMSchedule:
    timesteps: List[int]        # τ_0 < … < τ_{T−1}, with CompVis' +1 offset
    alphas: torch.Tensor        # ᾱ[τ_k], float32 (T,)
    alphas_prev: torch.Tensor   # ᾱ[τ_{k−1}], ᾱ[0] for k = 0 (not 1), float32 (T,)
    sigmas: torch.Tensor        # η·√((1−ᾱ_prev)/(1−ᾱ)·(1−ᾱ/ᾱ_prev)), float32 (T,)

    def __len__(self) -> int:
        return len(self.timesteps)


def ddim_schedule(alphas_cumprod: torch.Tensor, num_steps: int, eta: float) -> DDIMSchedule:
    """CompVis `make_ddim_timesteps` ("uniform") and `make_ddim_sampling_parameters`."""
    c = len(alphas_cumprod) // num_steps
    ts = [k + 1 for k in range(0, len(alphas_cumprod), c)]  # their +1 ("to get the final alpha values right")
    a = alphas_cumprod[ts]
    a_prev = torch.cat([alphas_cumprod[:1], alphas_cumprod[ts[:-1]]])
    a64, p64 = a.double(), a_prev.double()
    # their `(1 - alphas_prev) / (1 - alphas) * (…)` divides a float64 array by a float32 tensor: torch
    # forms (1 − ᾱ) and its reciprocal in float32 (Tensor.__rtruediv__), then multiplies in float64
    recip = (1 - a).reciprocal().double()
    sig = (eta * ((1 - p64) * recip * (1 - a64 / p64)).sqrt()).to(torch.float32)
    return DDIMSchedule(ts, a, a_prev, sig)


# ----------------------------------------------------------------------------- the pieces
EpsFn = Callable[[torch.Tensor, int], torch.Tensor]


def eps_function(model, alphas_cumprod: torch.Tensor) -> EpsFn:
    """ε_θ(z_VP, t) at integer DDPM timestep t, without gradient (their `apply_model` is no_grad).

    This is where ReSample calls the diffusion network (one row through it = one UNet evaluation)."""
    if callable(getattr(model, "eps_model", None)):
        def exact(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # the FLOP probe's eager path
            return type(model).eps_model(model, x, t)

        def eps(x: torch.Tensor, t: int) -> torch.Tensor:
            with torch.no_grad():
                return counted_call("unet", model.eps_model, x, torch.full((x.shape[0],), float(t), device=x.device),
                                    exact=exact)
        return eps

    def eps_via_denoiser(x: torch.Tensor, t: int) -> torch.Tensor:
        a = alphas_cumprod[t].double()
        sigma = float(((1 - a) / a).sqrt())
        with torch.no_grad():
            z = x / float(a.sqrt())
            return (z - model.tweedie(z, sigma)) / sigma
    return eps_via_denoiser


def _scalar(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A schedule value as a float32 0-d tensor on `like`'s device (their torch.full((b,1,1,1), v))."""
    return v.to(device=like.device, dtype=torch.float32).reshape(())


def _coefficients(sch: "DDIMSchedule", index: int, like: torch.Tensor):
    """(ᾱ_t, ᾱ_prev, σ_t) of DDIM index `index`, each as `_scalar`."""
    return tuple(_scalar(v[index], like) for v in (sch.alphas, sch.alphas_prev, sch.sigmas))


def ddim_step(x: torch.Tensor, e_t: torch.Tensor, a_t: torch.Tensor, a_prev: torch.Tensor, sigma_t: torch.Tensor,
              noise: torch.Tensor):
    """Their `p_sample_ddim` after the UNet: (x_prev, pred_x0, pseudo_x0); `noise` ~ N(0, I) is
    drawn by the caller at every step, even when σ_t = 0 (their `noise_like`)."""
    sqrt_one_minus_at = (1.0 - a_t).sqrt()
    pred_x0 = (x - sqrt_one_minus_at * e_t) / a_t.sqrt()
    dir_xt = (1.0 - a_prev - sigma_t ** 2).sqrt() * e_t
    x_prev = a_prev.sqrt() * pred_x0 + dir_xt + sigma_t * noise * 1.0
    pseudo_x0 = (x - sqrt_one_minus_at ** 2 * e_t) / a_t.sqrt()  # their Tweedie: (1−ᾱ), not √(1−ᾱ)
    return x_prev, pred_x0, pseudo_x0


def guidance_step(model, operator, x: torch.Tensor, e_t: torch.Tensor, x_prev: torch.Tensor, y: torch.Tensor,
                  a_t: torch.Tensor, scale_factor: float) -> torch.Tensor:
    """Their `measurement_cond_fn` (DPS, `ps`): x_prev − (ᾱ_t·scale_factor)·∇_x ‖y − A(D(ẑ0(x)))‖, the
    plain norm of each row (their norm spans the batch), ε held fixed (gradient via the decoder)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        pseudo_x0 = (x - (1.0 - a_t).sqrt() ** 2 * e_t.detach()) / a_t.sqrt()
        norms = (y - operator(model.decode(pseudo_x0))).flatten(1).norm(dim=1)
        grad = torch.autograd.grad(norms.sum(), x)[0]
    return (x_prev - grad * (a_t * scale_factor)).detach()


def stochastic_resample(pseudo_x0: torch.Tensor, x_t: torch.Tensor, a_t: torch.Tensor, gamma: torch.Tensor,
                        noise: torch.Tensor) -> torch.Tensor:
    """Their `stochastic_resample`: N((γ√ᾱ·ẑ0 + (1−ᾱ)·x_t)/(γ + 1 − ᾱ), 1/(1/γ + 1/(1−ᾱ)))."""
    mean = (gamma * a_t.sqrt() * pseudo_x0 + (1 - a_t) * x_t) / (gamma + 1 - a_t)
    return mean + noise * torch.sqrt(1 / (1 / gamma + 1 / (1 - a_t)))


def _rowwise_adamw(var0: torch.Tensor, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], lr: float,
                   weight_decay: float, max_iters: int, threshold: float, patience: Optional[int]):
    """AdamW on every row as if alone: their loop `loss; backward; step; stop?` per row.

    `loss_fn(v, rows)` gives the per-row mean squared errors of the variable rows `v` (rows =
    their indices in the batch).  Stop (after the step that used it) when the loss < threshold, or, with
    `patience` p, from iteration p on when the loss p iterations earlier is lower.  Stopped rows
    are frozen exactly (AdamW's weight decay and moments would move them); only active rows go
    through the networks.  Returns (variable, per-row iterations)."""
    var = var0.detach().clone().requires_grad_(True)
    opt = torch.optim.AdamW([var], lr=lr, weight_decay=weight_decay)
    B = var.shape[0]
    active = list(range(B))
    iters = [0] * B
    history: List[List[float]] = [[] for _ in range(B)]
    frozen = var.detach().clone()
    for itr in range(max_iters):
        opt.zero_grad()
        rows = torch.as_tensor(active, device=var.device)
        losses = loss_fn(var[rows], rows)
        losses.sum().backward()   # sum of per-row means: each row's gradient is its own
        opt.step()
        values = losses.detach().cpu().tolist()   # float32 values, compared as their numpy float32
        stopped = []
        for r, cur in zip(active, values):
            iters[r] += 1
            h = history[r]
            h.append(cur)
            if patience is not None and itr >= patience:
                if h[0] < cur:
                    stopped.append(r)
                    continue
                h.pop(0)
            if cur < threshold:
                stopped.append(r)
        with torch.no_grad():
            keep = torch.zeros(B, dtype=torch.bool, device=var.device)
            keep[torch.as_tensor(active, device=var.device)] = True
            var.copy_(torch.where(keep.view(-1, *[1] * (var.dim() - 1)), var, frozen))
            if stopped:
                idx = torch.as_tensor(stopped, device=var.device)
                frozen[idx] = var.detach()[idx]
        active = [r for r in active if r not in set(stopped)]
        if not active:
            break
    return var.detach(), iters


def pixel_optimization(operator, x_prime: torch.Tensor, y: torch.Tensor, cfg: ResampleConfig):
    """Their `pixel_optimization`: argmin_x mean((y − A(x))²) from x', per row."""
    o = cfg.pixel_optimization
    threshold = float(torch.tensor(o.eps ** 2, dtype=torch.float32))  # their test: float32 tensor < eps² (as float32)
    return _rowwise_adamw(x_prime, lambda v, rows: (y[rows] - operator(v)).pow(2).flatten(1).mean(1), o.lr,
                          cfg.weight_decay, o.max_iters, threshold, None)


def latent_optimization(model, operator, z_init: torch.Tensor, y: torch.Tensor, cfg: ResampleConfig):
    """Their `latent_optimization`: argmin_z mean((y − A(D(z)))²) from z, per row, with their
    window stop (loss `patience` iterations earlier lower than now)."""
    o = cfg.latent_optimization
    # their test `cur_loss < eps**2` compares a numpy float32 with a Python float, i.e. in float32 (NumPy ≥ 2,
    # NEP 50): eps² rounded to float32 is the threshold (a loss equal to float32(eps²) does not stop)
    threshold = float(torch.tensor(o.eps ** 2, dtype=torch.float32))
    return _rowwise_adamw(z_init, lambda v, rows: (y[rows] - operator(model.decode(v))).pow(2).flatten(1).mean(1),
                          o.lr, cfg.weight_decay, o.max_iters, threshold, o.patience)


def travels_at(index: int, T: int, cfg: ResampleConfig) -> bool:
    """Time travel after the DDIM step at `index`: in the last (1 − 1/splits) of the steps, at every
    `travel_every`-th index (their `index % 10 == 0`), never at index 0."""
    return 0 < index <= T - T // cfg.splits and index % cfg.travel_every == 0


def lookahead_steps(i: int, T: int, cfg: ResampleConfig) -> range:
    """The loop positions k of the look-ahead from step i: at most `inter_timesteps`, never the last."""
    return range(i, min(i + cfg.inter_timesteps, T - 1))


def pixel_stage_at(index: int, T: int, cfg: ResampleConfig) -> bool:
    """The middle stage optimises in pixel space (with `pixel_stage`); the last third in latent space."""
    return index >= T // cfg.splits and cfg.pixel_stage


def resample_plan(cfg: ResampleConfig, num_train_timesteps: int) -> Dict[str, int]:
    """What a full run does per particle, from the schedule alone: DDIM steps, look-ahead steps,
    pixel and latent stages (optimiser iterations depend on the stops; `max_iters` bounds them)."""
    T = ddim_step_count(num_train_timesteps, cfg.ddim_steps)
    plan = {"ddim_steps": T, "lookahead_steps": 0, "pixel_stages": 0, "latent_stages": 0}
    for i in range(T):
        index = T - 1 - i
        if travels_at(index, T, cfg):
            plan["lookahead_steps"] += len(lookahead_steps(i, T, cfg))
            plan["pixel_stages" if pixel_stage_at(index, T, cfg) else "latent_stages"] += 1
    return plan


# ----------------------------------------------------------------------------- the loop
@dataclass
class ResampleStats:
    """Per row of the batch: what the sampler did (optimiser iterations, look-ahead steps, stages)."""

    rows: int
    ddim_steps: int = 0
    lookahead_steps: int = 0
    pixel_stages: int = 0
    latent_stages: int = 0
    pixel_iters: List[int] = field(default_factory=list)
    latent_iters: List[int] = field(default_factory=list)
    final_iters: List[int] = field(default_factory=list)
    stage_time_sec: Dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.pixel_iters = self.pixel_iters or [0] * self.rows
        self.latent_iters = self.latent_iters or [0] * self.rows
        self.final_iters = self.final_iters or [0] * self.rows


@dataclass
class ResampleContext(StepContext):
    """StepContext of the end of a ReSample run, with what it did (for `ResampleLog`)."""

    stats: Optional[ResampleStats] = None


def resample(model, operator, batch: ParticleBatch, cfg: ResampleConfig, hooks: Sequence[SamplerHook] = (),
             callback: Optional[Callback] = None) -> None:
    """Run ReSample in place on `batch` (`batch.zt` = z_T ~ N(0, I)); `batch.x` holds the decoded
    result.  Same callback stages as `latent_daps` ("begin", each "step", "end"; σ reported is
    the VP-equivalent σ = √((1−ᾱ_t)/ᾱ_t)); hooks get `on_end` (a `ResampleContext`)."""
    acp = training_alphas_cumprod(model, cfg)
    sch = ddim_schedule(acp, cfg.ddim_steps, cfg.ddim_eta)
    eps = eps_function(model, acp)
    T = len(sch)
    z, y = batch.zt, batch.y
    sig_of = lambda k: float(((1 - sch.alphas[k].double()) / sch.alphas[k].double()).sqrt())  # noqa: E731
    observe = _observer(callback, batch, sig_of(T - 1))
    stats = ResampleStats(len(batch))
    ctx = StepContext(0, sig_of(T - 1), None, sig_of(T - 1), T, model, operator)
    steps = T if cfg.max_steps is None else min(cfg.max_steps, T)
    for i in range(steps):
        index = T - 1 - i
        a_t, a_prev, s_t = _coefficients(sch, index, z)
        ctx = StepContext(i, sig_of(index), sig_of(index + 1) if i else None, sig_of(index - 1) if index else 0.0,
                          T, model, operator)
        # 1. DDIM step and the DPS-style measurement-gradient step (scale ᾱ_t/2)
        e_t = eps(z, sch.timesteps[index])
        z_prev, pred_x0, pseudo_x0 = ddim_step(z, e_t, a_t, a_prev, s_t, batch.streams.randn_like(z))
        z = guidance_step(model, operator, z, e_t, z_prev, y, a_t, cfg.guidance_scale)
        stats.ddim_steps += 1
        # 2. time travel in the last (1 − 1/splits) of the steps, every `travel_every`-th index
        if travels_at(index, T, cfg):
            t0 = time.perf_counter()
            x_t = z.clone()
            for k in lookahead_steps(i, T, cfg):
                idx = T - 1 - k
                e_k = eps(z, sch.timesteps[idx - 1])   # their UNet timestep: one index later than ᾱ
                z, pred_x0, pseudo_x0 = ddim_step(z, e_k, *_coefficients(sch, idx, z), batch.streams.randn_like(z))
                stats.lookahead_steps += 1
            gamma = cfg.resample_sigma_scale * (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
            if pixel_stage_at(index, T, cfg):
                with torch.no_grad():
                    x_prime = model.decode(pseudo_x0)
                x_opt, it = pixel_optimization(operator, x_prime, y, cfg)
                with torch.no_grad():
                    z0 = model.encode(x_opt)
                stats.pixel_stages += 1
                stats.pixel_iters = [a + b for a, b in zip(stats.pixel_iters, it)]
                stage = "pixel"
            else:
                z0, it = latent_optimization(model, operator, pseudo_x0, y, cfg)
                stats.latent_stages += 1
                stats.latent_iters = [a + b for a, b in zip(stats.latent_iters, it)]
                stage = "latent"
            z = stochastic_resample(z0, x_t, a_prev, gamma, batch.streams.randn_like(z0)).detach()
            stats.stage_time_sec[stage] = stats.stage_time_sec.get(stage, 0.0) + time.perf_counter() - t0
        batch.zt, batch.z0hat = z, pseudo_x0.detach()
        if cfg.record_trajectory:
            batch.trajectory.append(pseudo_x0.detach().cpu())
        observe("step", ctx)
    # 3. the final latent optimisation
    t0 = time.perf_counter()
    z, stats.final_iters = latent_optimization(model, operator, z, y, cfg)
    stats.stage_time_sec["final"] = time.perf_counter() - t0
    batch.zt = batch.z0y = z
    end = ResampleContext(**ctx.__dict__, stats=stats)
    for hook in hooks:
        hook.on_end(batch, end)
    with torch.no_grad():
        batch.x = model.decode(z)
    observe("end", ctx)


class ResampleLog(SamplerHook):
    """Per image: what ReSample did per particle (record field `resample`, `resample.jsonl`)."""

    def __init__(self, cfg: ResampleConfig):
        self.cfg = cfg
        self._images: Dict[int, Dict] = {}

    def on_end(self, batch: ParticleBatch, ctx: StepContext) -> None:
        stats = getattr(ctx, "stats", None)
        if stats is None:
            return
        images = list(dict.fromkeys(batch.image_ids.tolist()))
        for img in images:
            rows = batch.rows_by_particle(img)
            self._images[img] = {
                "image_idx": img, "particle_ids": [int(batch.particle_ids[r]) for r in rows],
                "ddim_steps": stats.ddim_steps, "lookahead_steps": stats.lookahead_steps,
                "pixel_stages": stats.pixel_stages, "latent_stages": stats.latent_stages,
                "pixel_iters": [stats.pixel_iters[r] for r in rows],
                "latent_iters": [stats.latent_iters[r] for r in rows],
                "final_iters": [stats.final_iters[r] for r in rows],
                "stage_time_sec": {k: v / len(images) for k, v in stats.stage_time_sec.items()},
                "pixel_stage": self.cfg.pixel_stage,
            }

    def image_output(self, image_idx: int, record: Dict) -> ImageOutput:
        line = self._images.pop(int(image_idx), None)
        if line is None:
            return ImageOutput()
        return ImageOutput(record={"resample": line}, jsonl={"resample": [line]})
