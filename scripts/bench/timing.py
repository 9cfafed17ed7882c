"""The real sampler timed per annealing step, and isolated micro-benchmarks of its parts."""
from __future__ import annotations

from dataclasses import asdict
from typing import Any, Dict, List, Optional

import torch

from cores.mcmc import data_gradient
from cores.speed import SpeedConfig, apply_speed
from scripts.bench.common import NUM_ANNEAL, ODE_STEPS, S, make_batch, mcmc_config, random_dino, reset_compiler, timeit
from scripts.bench.workloads import WORKLOADS, Workload, sigmas


class StageTimes:
    """Sampler callback: seconds per annealing step and per MCMC stage (the loop reports stage ends)."""

    def __init__(self) -> None:
        self.step_sec: List[float] = []
        self.mcmc_sec: List[float] = []
        self._last = self._ode = 0.0

    def __call__(self, info: Dict[str, Any]) -> None:
        stage, t = info["stage"], info["time"]
        if stage == "begin":
            self._last = t
        elif stage == "ode":
            self._ode = t
        elif stage == "mcmc":
            self.mcmc_sec.append(t - self._ode)
        elif stage == "step":
            self.step_sec.append(t - self._last)
            self._last = t


def warm_shapes(model, device: torch.device, rows: List[int], hooks=()) -> Optional[Dict[str, Any]]:
    """What a run does before its VRAM meter starts (`cores.warmup`): with cuDNN benchmark on, every shape
    at `rows` is made once; returns the trials' peaks (MiB), None when nothing was benchmarked."""
    from cores.vram import VramMeter
    from cores.warmup import warm_up_run

    meter = VramMeter(device)
    if warm_up_run(model, hooks, rows, device, meter) is None:
        return None
    return dict(meter.autotune)


def _per_step(times: "StageTimes", steps: List[int], steps_workload: int, steps_run: int) -> Dict[str, float]:
    """Mean seconds of `steps` as run, and per annealing step at the workload's MCMC count."""
    step_t = sum(times.step_sec[i] for i in steps) / len(steps)
    mc_t = sum(times.mcmc_sec[i] for i in steps) / len(steps)
    return {"measured_step_sec": step_t, "measured_mcmc_sec": mc_t, "non_mcmc_sec": step_t - mc_t,
            "s_per_anneal_step": (step_t - mc_t) + mc_t * steps_workload / max(1, steps_run)}


def time_sampler(model, operator, image, device, speed: SpeedConfig, particles: int, images: int,
                 algo: str, steps_workload: int, steps_run: int, warmup: int, steps_to_time: int,
                 workload: Workload = WORKLOADS["W"]) -> Dict[str, Any]:
    """Run `warmup + steps_to_time` annealing steps of `latent_daps` on a model that already has the
    switches `speed` installed; per-step and per-MCMC times from the sampler's callback.

    A workload with repulsion (W′) has three kinds of step (`Workload.step_counts`); the run then has
    the pipeline's RepulsionHook on for the warm-up and timed steps and off for three more steps (a
    logged one and plain ones, whichever of them fall there), each kind timed on its own and weighted
    by its count in a whole run."""
    times = StageTimes()
    out: Dict[str, Any] = {"config": speed.label(), "speed": asdict(speed), "particles": particles,
                           "images_per_batch": images, "mcmc_algo": algo, "mcmc_steps_workload": steps_workload,
                           "mcmc_steps_run": steps_run, "warmup_steps": warmup, "timed_steps": steps_to_time,
                           "workload": workload.name}
    try:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        on_steps = warmup + steps_to_time
        hooks = []
        if workload.repulsion:  # on for steps 0 … on_steps−1, off for the three after
            hooks = [workload.repulsion_hook(model, device, sigma_break=float(sigmas()[on_steps - 1]))]
        autotune = warm_shapes(model, device, [particles * images], hooks)
        if autotune:
            out["autotune"] = autotune
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        batch = make_batch(model, operator, image, images, particles, device)
        lr = workload.langevin_lr if algo == "langevin" else None
        daps = S.DAPSConfig.with_steps(NUM_ANNEAL, mcmc=mcmc_config(algo, steps_run, lr),
                                       max_steps=on_steps + (3 if hooks else 0))
        S.latent_daps(model, operator, batch, daps, hooks=hooks, callback=times)
        steps = times.step_sec
        timed = list(range(warmup, on_steps))
        main = _per_step(times, timed, steps_workload, steps_run)
        out.update({"warmup_sec": sum(steps[:warmup]), "measured_step_sec": main["measured_step_sec"],
                    "measured_mcmc_sec": main["measured_mcmc_sec"]})
        if hooks:
            from repulsion import logged_step

            counts = workload.step_counts()
            off = list(range(on_steps, on_steps + 3))
            kinds = {"repulsion": timed, "no_repulsion_logged": [i for i in off if logged_step(i)],
                     "no_repulsion": [i for i in off if not logged_step(i)]}
            fallback = kinds["no_repulsion"] or kinds["no_repulsion_logged"]
            per_kind = {k: {"steps_in_run": counts[k], "timed_steps": v or fallback,
                            **_per_step(times, v or fallback, steps_workload, steps_run)} for k, v in kinds.items()}
            total = sum(d["steps_in_run"] * d["s_per_anneal_step"] for d in per_kind.values())
            step_w = total / NUM_ANNEAL
            non_mcmc = sum(d["steps_in_run"] * d["non_mcmc_sec"] for d in per_kind.values()) / NUM_ANNEAL
            all_timed = timed + off
            mc_t = sum(times.mcmc_sec[i] for i in all_timed) / len(all_timed)
            out["step_kinds"] = per_kind
        else:
            step_w, non_mcmc, mc_t = main["s_per_anneal_step"], main["non_mcmc_sec"], main["measured_mcmc_sec"]
        s_img = step_w * NUM_ANNEAL / images
        out.update({
            "s_per_anneal_step": step_w, "mcmc_step_sec": mc_t / max(1, steps_run),
            "non_mcmc_sec_per_anneal_step": non_mcmc,
            "s_per_image": s_img, "images_per_hour": 3600.0 / s_img,
        })
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) / 2 ** 20
            out.update({"peak_vram_mb": peak, "peak_vram_mb_per_image": peak / images})
    except torch.OutOfMemoryError as err:
        out.update({"oom": True, "error": str(err).split("\n")[0][:160]})
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def breakdown(model, operator, image, device, speed: SpeedConfig, rows: int, steps_workload: int,
              step_sec: Optional[float], reps: int, repulsion: bool, images: int = 1) -> Dict[str, Any]:
    """Per-annealing-step cost of each part, from isolated micro-benchmarks (seconds); the model
    already has the switches `speed` installed."""
    try:
        g = torch.Generator(device=device).manual_seed(1)
        z = torch.randn((rows, *model.get_in_shape()), generator=g, device=device)
        v = torch.randn((rows, 3, model.image_resolution, model.image_resolution), generator=g, device=device)
        y = operator(image).expand(rows, -1, -1, -1)
        sigma = torch.tensor(1.0, device=device)

        def dec():
            with torch.enable_grad():
                zz = z.detach().requires_grad_(True)
                torch.autograd.grad(model.decode(zz), zz, v)

        def op():
            with torch.enable_grad():
                xx = v.detach().requires_grad_(True)
                torch.autograd.grad(operator.loss(xx, y).sum(), xx)

        def unet():
            with torch.no_grad():
                model.tweedie(z, sigma)

        def full_grad():
            data_gradient(model, operator, z, y)

        out = {"decoder_fwd_bwd_sec": timeit(dec, device, reps),
               "operator_fwd_bwd_sec": timeit(op, device, reps),
               "unet_fwd_sec": timeit(unet, device, reps),
               "data_gradient_sec": timeit(full_grad, device, reps)}
        per_step = {"decoder_fwd_bwd": steps_workload * out["decoder_fwd_bwd_sec"],
                    "operator_fft": steps_workload * out["operator_fwd_bwd_sec"],
                    "unet": ODE_STEPS * out["unet_fwd_sec"]}
        if step_sec is not None:
            per_step["other"] = max(0.0, step_sec - sum(per_step.values()))
            per_step["total (s/anneal step)"] = step_sec
        if repulsion:  # not in the timed sampler run (repulsion_scale 0): an added cost
            from repulsion import compute_repulsion_gradient

            vit = random_dino(device, model.image_resolution)
            groups = torch.arange(images, device=device).repeat_interleave(max(1, rows // images))[:rows]

            def rep():
                compute_repulsion_gradient(z, lambda zz: vit(model.decode(zz)), groups=groups.cpu())

            out["repulsion_sec"] = timeit(rep, device, max(1, reps // 2))
            # on only while σ ≥ σ_break = 1.0: steps 0…29 of 50
            per_step["repulsion (avg, on 30/50 steps)"] = out["repulsion_sec"] * 30 / NUM_ANNEAL
            if step_sec is not None:
                per_step["total with repulsion"] = step_sec + per_step["repulsion (avg, on 30/50 steps)"]
        out["per_anneal_step_sec"] = per_step
        return out
    except torch.OutOfMemoryError as err:
        return {"oom": True, "error": str(err).split("\n")[0][:160]}


def run_config(args, model, operator, image, device, speed: SpeedConfig, particles: int, images: int,
               with_breakdown: bool) -> Dict[str, Any]:
    """Install `speed`, time the sampler (and the micro-benchmarks), restore the exact path."""
    handle = apply_speed(model, speed)
    try:
        r = time_sampler(model, operator, image, device, speed, particles, images, args.mcmc_algo,
                         args.mcmc_steps, args.time_mcmc_steps, args.warmup, args.steps_to_time,
                         WORKLOADS[args.workload])
        if with_breakdown and not r.get("oom"):
            r["breakdown"] = breakdown(model, operator, image, device, speed, particles * images, args.mcmc_steps,
                                       r["s_per_anneal_step"], args.reps, args.repulsion, images)
        r["compile_sec"] = handle.compile_sec
        return r
    finally:
        handle.restore()
        if speed.compile:
            reset_compiler()
        if device.type == "cuda":
            torch.cuda.empty_cache()
