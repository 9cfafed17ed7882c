"""One whole run, step by step: per-step seconds, compile seconds, steady state before/after pruning."""
from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any, Dict, Optional

import torch

from cores.pruning import PruningConfig, PruningHook
from cores.speed import SpeedConfig, apply_speed, compile_seconds
from scripts.bench.common import NUM_ANNEAL, S, make_batch, mcmc_config, reset_compiler, sync
from scripts.bench.timing import StageTimes, warm_shapes
from scripts.bench.workloads import WORKLOADS

def series(args, model, operator, image, device, speed: SpeedConfig, algo: Optional[str] = None,
           mcmc_steps: Optional[int] = None) -> Dict[str, Any]:
    """One whole run (50 annealing steps), per-step seconds, compile seconds; each step's time over
    the median of its segment (before / after pruning).  MCMC: `algo` with `mcmc_steps` steps (default
    --mcmc-algo, --time-mcmc-steps); the workload's repulsion hook when it has one (W′: steps 0–29).
    With cuDNN benchmark on, every shape is made before the peak counter restarts, as in a run."""
    import statistics

    from cores.warmup import run_row_counts

    algo = algo or args.mcmc_algo
    mcmc_steps = mcmc_steps or args.time_mcmc_steps
    workload = WORKLOADS[args.workload]
    c0 = compile_seconds()
    t0 = time.perf_counter()
    handle = apply_speed(model, speed)
    try:
        prune = PruningConfig(step=args.prune_step, keep=args.prune_keep)
        hooks = [workload.repulsion_hook(model, device)] if workload.repulsion else []
        hooks += [PruningHook(prune)] if args.prune_step >= 0 else []
        autotune = warm_shapes(model, device, run_row_counts(args.particles, args.images_per_batch,
                                                             args.images_per_batch, prune if args.prune_step >= 0
                                                             else None), hooks)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        batch = make_batch(model, operator, image, args.images_per_batch, args.particles, device)
        lr = workload.langevin_lr if algo == "langevin" else None
        daps = S.DAPSConfig.with_steps(NUM_ANNEAL, mcmc=mcmc_config(algo, mcmc_steps, lr))
        times = StageTimes()
        t1 = time.perf_counter()
        S.latent_daps(model, operator, batch, daps, hooks=hooks, callback=times)
        sync(device)
        sample_sec = time.perf_counter() - t1
    finally:
        handle.restore()
        if speed.compile:
            reset_compiler()
    per = times.step_sec
    cut = args.prune_step if args.prune_step >= 0 else NUM_ANNEAL
    pre, post = per[1:cut], per[cut + 1:]
    med_pre = statistics.median(pre) if pre else None
    med_post = statistics.median(post) if post else med_pre
    ratio = [p / (med_pre if i <= cut else med_post) for i, p in enumerate(per)]
    return {"config": speed.label(), "preset": speed.preset, "speed": asdict(speed), "particles": args.particles,
            "images_per_batch": args.images_per_batch, "mcmc_algo": algo, "workload": workload.name,
            "repulsion": workload.repulsion, "mcmc_steps_per_anneal_step": mcmc_steps, "prune_step": args.prune_step,
            "prune_keep": args.prune_keep, "start_up_sec": t1 - t0, "compile_sec_at_start_up": handle.compile_sec,
            "compile_sec": compile_seconds() - c0, "sampling_sec": sample_sec, "per_step_sec": per,
            "steady_step_sec_before_pruning": med_pre, "steady_step_sec_after_pruning": med_post,
            "step_over_steady": ratio, "max_step_over_steady_excluding_step0": max(ratio[1:]),
            "peak_vram_mb": torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None,
            **({"autotune": autotune} if autotune else {})}
