"""ReSample (sampler=resample) timed next to the DAPS row: its parts, combined with a full run's counts."""
from __future__ import annotations

import time
from typing import Any, Dict

import torch

from scripts.bench.common import make_batch

def time_resample(model, operator, image, device, particles: int, reps: int) -> Dict[str, Any]:
    """Seconds per image and peak VRAM of ReSample (see the module doc), from its timed parts."""
    from cores.config import ResampleConfig, ResampleOptimizerConfig
    from cores import resample as R

    cfg = ResampleConfig()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    batch = make_batch(model, operator, image, 1, particles, device)
    z, y = batch.streams.randn_like(batch.zt), batch.y
    acp = R.training_alphas_cumprod(model, cfg)
    sch = R.ddim_schedule(acp, cfg.ddim_steps, cfg.ddim_eta)
    eps = R.eps_function(model, acp)
    k = len(sch) // 2
    a_t, a_prev, s_t = (v[k].to(device).reshape(()) for v in (sch.alphas, sch.alphas_prev, sch.sigmas))

    def timed(fn, n: int) -> float:
        fn()  # warm-up
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        return (time.perf_counter() - t0) / n

    def ddim_and_guidance():
        e = eps(z, sch.timesteps[k])
        x_prev, _, _ = R.ddim_step(z, e, a_t, a_prev, s_t, batch.streams.randn_like(z))
        R.guidance_step(model, operator, z, e, x_prev, y, a_t, cfg.guidance_scale)

    def lookahead():
        R.ddim_step(z, eps(z, sch.timesteps[k - 1]), a_t, a_prev, s_t, batch.streams.randn_like(z))

    def decode_encode():
        with torch.no_grad():
            model.encode(model.decode(z))

    n_it = max(2, reps)
    one = lambda o: ResampleConfig(latent_optimization=ResampleOptimizerConfig(o.lr, 0.0, n_it, o.patience),  # noqa: E731
                                   pixel_optimization=ResampleOptimizerConfig(1e-2, 0.0, n_it))
    with torch.no_grad():
        x0 = model.decode(z)
    parts = {
        "ddim_guidance_step_sec": timed(ddim_and_guidance, reps),
        "lookahead_step_sec": timed(lookahead, reps),
        "decode_encode_sec": timed(decode_encode, reps),
        "latent_iter_sec": timed(lambda: R.latent_optimization(model, operator, z, y, one(cfg.latent_optimization)),
                                 1) / n_it,
        "pixel_iter_sec": timed(lambda: R.pixel_optimization(operator, x0, y, one(cfg.latent_optimization)), 1) / n_it,
    }
    plan = R.resample_plan(cfg, len(acp))
    lat_iters = plan["latent_stages"] * cfg.latent_optimization.max_iters + cfg.latent_optimization.max_iters
    pix_iters = plan["pixel_stages"] * cfg.pixel_optimization.max_iters
    total = (plan["ddim_steps"] * parts["ddim_guidance_step_sec"] + plan["lookahead_steps"] * parts["lookahead_step_sec"]
             + plan["pixel_stages"] * parts["decode_encode_sec"] + lat_iters * parts["latent_iter_sec"]
             + pix_iters * parts["pixel_iter_sec"])
    out = {"name": "resample", "particles": particles, "plan": plan, "latent_iters_max": lat_iters,
           "pixel_iters_max": pix_iters, **parts, "s_per_image_upper_bound": total,
           "peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None,
           "peak_reserved_mb": torch.cuda.max_memory_reserved(device) / 2 ** 20 if device.type == "cuda" else None}
    return out
