"""Speed benchmark of the LatentDAPS sampler on the full-size FFHQ-LDM architecture.

Workload W (issue "speed"): 1 image 256², FFHQ-LDM architecture with random weights (speed does
not depend on weight values), 4 particles, 50 annealing steps × (2 PF-ODE + 100 Langevin).
The real sampler (`sampler.latent_daps`) runs a few annealing steps after warm-up; the MCMC part
of each step is timed on its own, so a step run with fewer Langevin steps than the workload is
extrapolated linearly in the number of Langevin steps (every step does the same work: one
decoder forward+backward plus elementwise updates):

    s/step(W) = (s/step − s/MCMC) + s/MCMC · steps_W / steps_run

Modes::

    python scripts/benchmark.py                     # one config (switches from the flags), JSON with --json
    python scripts/benchmark.py --matrix            # exact vs each switch vs all vs fast, 4/2 particles, images/batch
    python scripts/benchmark.py --series --preset fast  # whole run, per-step seconds, pruning 4→2 at step 29
    python scripts/benchmark.py --agreement --preset faithful  # faithful and exact vs strict fp32: errors, final PSNR
    python scripts/benchmark.py --sample-hash --preset faithful  # sha256 of a short run's samples (same bits?)
    python scripts/benchmark.py --matrix --matrix-switches exact,faithful,faithful-cuda_graphs,faithful+tf32
                                                    # rows: a switch set, a preset, or <preset>±<switch>
    python scripts/benchmark.py --tiny --device cpu # smoke run on the tiny fixture LDM (64 px)
    python scripts/benchmark.py --resample          # also ReSample (sampler=resample) next to the exact DAPS row

ReSample (`--resample`, configs/sampler/resample.yaml values): its parts are timed on the same
model, particles and measurement right after the DAPS row (one DDIM + measurement-gradient step, one
look-ahead step, one latent and one pixel AdamW iteration, the pixel stage's decode + encode) and
combined with the counts of a full run (`cores.resample.resample_plan`), every optimisation taken
to `max_iters` (an upper bound: the measurement noise keeps the loss above eps², only the latent
window stop can end one earlier).  Peak VRAM is that of these parts (the latent optimisation).

The exact path (the baseline) is fp32 with PyTorch's default backend flags (as DAPS), one image
(4 particles) per batch.  Needs PyYAML, diffusers, timm (for --repulsion); no Hydra/OmegaConf.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import sampler as S  # noqa: E402
from cores.mcmc import MCMCConfig, data_gradient  # noqa: E402
from cores.operators import get_operator  # noqa: E402
from cores.pruning import PruningConfig, PruningHook  # noqa: E402
from cores.speed import SpeedConfig, apply_speed, compile_seconds, speed_config  # noqa: E402

NUM_ANNEAL = 50
ODE_STEPS = 2
TINY_CFG = ROOT / "tests" / "fixtures" / "ldm_tiny_ffhq.yaml"
TINY_CKPT = ROOT / "tests" / "fixtures" / "ldm_tiny_ffhq.pt"
MCMC_DEFAULTS = {"langevin": dict(num_steps=100, lr=5e-5, lr_min_ratio=0.01),
                 "hmc": dict(num_steps=65, lr=2.1e-5, lr_min_ratio=0.12, momentum=0.41)}


# ---------------------------------------------------------------------- setup
def build(tiny: bool, device: torch.device):
    """(model, operator, clean image (1,3,R,R)) for the full-size architecture or the tiny fixture."""
    import yaml

    from cores.models.ldm import build_ldm, build_random_ldm

    if tiny:
        cfg = {"name": "ldm", "ldm_config": yaml.safe_load(TINY_CFG.read_text()), "diffusion_path": str(TINY_CKPT)}
        model = build_ldm(cfg, device)
    else:
        cfg = yaml.safe_load((ROOT / "configs" / "model" / "ffhq256ldm.yaml").read_text())
        model = build_random_ldm(cfg, device, seed=0)
    res = model.image_resolution
    operator = get_operator("phase_retrieval", oversample=2.0, resolution=res, sigma=0.05)
    image = None
    demo = sorted((ROOT / "dataset" / "demo-ffhq").glob("*.png"))
    if demo:
        from cores.data import load_image

        image = load_image(demo[0], res)[None].to(device)
    if image is None:
        g = torch.Generator().manual_seed(0)
        image = torch.nn.functional.interpolate(torch.rand(1, 3, res // 8, res // 8, generator=g) * 2 - 1,
                                                size=(res, res), mode="bilinear").to(device)
    return model, operator, image


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mcmc_config(algo: str, steps: int) -> MCMCConfig:
    d = dict(MCMC_DEFAULTS[algo])
    d["num_steps"] = steps
    return MCMCConfig(algo=algo, **d)


def make_batch(model, operator, image, images: int, particles: int, device, seed: int = 42):
    from cores.rng import make_generator, stream_seed

    ys = [operator.measure(image, make_generator(stream_seed(seed, i, 0, "measurement"), device))
          for i in range(images)]
    return S.initial_batch(model, torch.cat(ys), list(range(images)), particles, seed, 10.0, device)


def load_preset(name: str) -> SpeedConfig:
    """SpeedConfig of configs/speed/<name>.yaml (its `defaults` list resolved: exact first)."""
    import yaml

    d = yaml.safe_load((ROOT / "configs" / "speed" / f"{name}.yaml").read_text()) or {}
    vals: Dict[str, Any] = {}
    for base in d.pop("defaults", []) or []:
        if isinstance(base, str) and base != "_self_":
            vals.update(asdict(load_preset(base)))
    vals.update(d)
    return speed_config(vals)


def reset_compiler() -> None:
    compile_seconds()  # book dynamo's compile time before reset() clears its counters
    try:
        torch._dynamo.reset()
    except Exception:  # pragma: no cover - no dynamo
        pass


# ---------------------------------------------------------------------- ReSample next to DAPS
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


# ---------------------------------------------------------------------- timing of the real sampler
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


def time_sampler(model, operator, image, device, speed: SpeedConfig, particles: int, images: int,
                 algo: str, steps_workload: int, steps_run: int, warmup: int, steps_to_time: int) -> Dict[str, Any]:
    """Run `warmup + steps_to_time` annealing steps of `latent_daps` on a model that already has the
    switches `speed` installed; per-step and per-MCMC times from the sampler's callback."""
    times = StageTimes()
    out: Dict[str, Any] = {"config": speed.label(), "speed": asdict(speed), "particles": particles,
                           "images_per_batch": images, "mcmc_algo": algo, "mcmc_steps_workload": steps_workload,
                           "mcmc_steps_run": steps_run, "warmup_steps": warmup, "timed_steps": steps_to_time}
    try:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        batch = make_batch(model, operator, image, images, particles, device)
        daps = S.DAPSConfig.with_steps(NUM_ANNEAL, mcmc=mcmc_config(algo, steps_run),
                                       max_steps=warmup + steps_to_time)
        S.latent_daps(model, operator, batch, daps, callback=times)
        steps = times.step_sec
        step_t = sum(steps[warmup:]) / steps_to_time
        mc_t = sum(times.mcmc_sec[warmup:warmup + steps_to_time]) / steps_to_time
        step_w = (step_t - mc_t) + mc_t * steps_workload / max(1, steps_run)
        s_img = step_w * NUM_ANNEAL / images
        out.update({
            "warmup_sec": sum(steps[:warmup]),
            "measured_step_sec": step_t, "measured_mcmc_sec": mc_t,
            "s_per_anneal_step": step_w, "mcmc_step_sec": mc_t / max(1, steps_run),
            "non_mcmc_sec_per_anneal_step": step_t - mc_t,
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


# ---------------------------------------------------------------------- isolated micro-benchmarks
def timeit(fn: Callable[[], Any], device: torch.device, reps: int, warm: int = 2) -> float:
    """Mean seconds per call (CUDA events on GPU, perf_counter on CPU), after `warm` calls."""
    for _ in range(warm):
        fn()
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1000.0 / reps
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def random_dino(device: torch.device, res: int = 256):
    """DINO ViT-S/16 architecture (timm) with random weights, at res² input (256² for W)."""
    import functools

    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(img_size=res, patch_size=16, embed_dim=384, depth=12, num_heads=6, num_classes=0,
                            norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6))
    return vit.to(device).eval().requires_grad_(False)


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
                         args.mcmc_steps, args.time_mcmc_steps, args.warmup, args.steps_to_time)
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


# ---------------------------------------------------------------------- agreement
def psnr(a: torch.Tensor, b: torch.Tensor) -> List[float]:
    """Per-row PSNR in dB between images in [-1, 1] (peak-to-peak 2)."""
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1)
    return [float("inf") if m == 0 else 10 * math.log10(4.0 / m) for m in mse.tolist()]


STRICT_FP32 = SpeedConfig(tf32=False)  # no TF32 anywhere: the reference both other paths are measured against


def probe(model, operator, z: torch.Tensor, y: torch.Tensor) -> Dict[str, torch.Tensor]:
    """What the sampler takes from the decoder at one latent: a decode without gradient (final
    image, pruning: eager under compile_grad_only), the decode inside a gradient step, the raw and
    the clamped data gradient (copies: a CUDA-graph replay reuses its output buffers)."""
    with torch.no_grad():
        x = model.decode(z).clone()
    with torch.enable_grad():
        zz = z.detach().requires_grad_(True)
        xg = model.decode(zz)
        (g,) = torch.autograd.grad(operator.loss(xg, y).sum(), zz)
        xg, g = xg.detach().clone(), g.clone()  # before the next replay
    gcl, _ = data_gradient(model, operator, z, y)
    return {"x": x, "x_grad_path": xg, "g": g, "g_clamped": gcl.clone()}


def compare(test: Dict[str, torch.Tensor], ref: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """Max errors relative to the reference's max magnitude, gradient cosine, clamped-gradient sign flips."""
    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))

    cos = torch.nn.functional.cosine_similarity(test["g"].flatten(1), ref["g"].flatten(1)).min()
    c1, c0 = test["g_clamped"], ref["g_clamped"]
    return {"decode_max_rel_err": rel(test["x"], ref["x"]),
            "decode_grad_path_max_rel_err": rel(test["x_grad_path"], ref["x_grad_path"]),
            "grad_max_rel_err": rel(test["g"], ref["g"]), "grad_min_cosine": float(cos),
            "clamped_grad_max_abs_err": float((c1 - c0).abs().max()),
            "clamped_grad_sign_flip_frac": float(((c1 > 0) != (c0 > 0)).float().mean())}


def _same(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def _sha256(t: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(t.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()


def agreement(model, operator, image, device, test: SpeedConfig, particles: int, anneal_steps: int,
              mcmc_steps: int, algo: str = "langevin", draws: int = 1) -> Dict[str, Any]:
    """`test` and the exact path (DAPS' default numerics: TF32 convolutions) each against strict fp32
    (TF32 off), from the same latents and random streams: decoder output and gradient errors, and
    the final samples of a short complete run (`anneal_steps` annealing steps).  The floor for the
    final samples is how far strict fp32 lands from the exact path; `test` meets it when its own
    samples land at least as close to the exact ones.  Each of exact and `test` runs twice in this
    process (same bits?); the sha256 of the final samples compares processes and machines.

    One latent's max error is one draw of the rounding: it moves between draws about as much as two
    TF32 paths differ.  With `draws` > 1 the decoder errors are also measured at that many latents
    (`over_draws`): per draw, exact's and `test`'s error, and the condition that `test`'s largest
    error over the draws is no larger than exact's largest."""
    g = torch.Generator(device=device).manual_seed(3)
    zs = [torch.randn((particles, *model.get_in_shape()), generator=g, device=device) for _ in range(draws)]
    z = zs[0]
    y = operator.measure(image, torch.Generator(device=device).manual_seed(4)).expand(particles, -1, -1, -1)

    def run():
        batch = make_batch(model, operator, image, 1, particles, device)
        S.latent_daps(model, operator, batch, S.DAPSConfig.with_steps(anneal_steps, mcmc=mcmc_config(algo, mcmc_steps)))
        return batch.x.clone()

    def measure(cfg: SpeedConfig, twice: bool):
        h = apply_speed(model, cfg)
        try:
            first = (probe(model, operator, z, y), run())
            first[0]["more"] = [probe(model, operator, zk, y) for zk in zs[1:]]
            second = (probe(model, operator, z, y), run()) if twice else None
        finally:
            h.restore()
            if cfg.compile:
                reset_compiler()
        return first, second

    (strict_p, strict_s), _ = measure(STRICT_FP32, twice=False)
    (exact_p, exact_s), exact_again = measure(SpeedConfig(), twice=True)
    (test_p, test_s), test_again = measure(test, twice=True)
    drawn = list(zip([exact_p] + exact_p.pop("more"), [test_p] + test_p.pop("more"),
                     [strict_p] + strict_p.pop("more")))  # (exact, test, strict) probes per latent
    exact_vs_strict, test_vs_strict = compare(exact_p, strict_p), compare(test_p, strict_p)
    floor = psnr(strict_s, exact_s)
    to_exact = psnr(test_s, exact_s)
    err_keys = ("decode_max_rel_err", "decode_grad_path_max_rel_err", "grad_max_rel_err")
    test_twice = _same(test_p, test_again[0]) and torch.equal(test_s, test_again[1])
    per_draw = [(compare(e, s), compare(t, s)) for e, t, s in drawn]
    over_draws = {k: {"exact": [ce[k] for ce, _ in per_draw], "test": [ct[k] for _, ct in per_draw]}
                  for k in err_keys}
    return {
        "test": test.label(), "preset": test.preset, "particles": particles, "anneal_steps": anneal_steps,
        "mcmc_steps": mcmc_steps, "reference": "strict fp32 (tf32 off)",
        "exact_vs_strict_fp32": exact_vs_strict, "test_vs_strict_fp32": test_vs_strict,
        "test_vs_exact": {**compare(test_p, exact_p), "final_sample_psnr_db": to_exact,
                          "final_sample_psnr_db_min": min(to_exact)},
        "floor_strict_fp32_vs_exact_final_sample_psnr_db": floor,
        "floor_strict_fp32_vs_exact_final_sample_psnr_db_min": min(floor),
        "test_vs_strict_fp32_final_sample_psnr_db_min": min(psnr(test_s, strict_s)),
        "exact_bit_identical_twice": _same(exact_p, exact_again[0]) and torch.equal(exact_s, exact_again[1]),
        "test_bit_identical_twice": test_twice,
        "exact_final_sample_sha256": _sha256(exact_s), "test_final_sample_sha256": _sha256(test_s),
        "draws": len(drawn), "over_draws": over_draws,
        "conditions": {
            **{f"{k}_le_daps_tf32": test_vs_strict[k] <= exact_vs_strict[k] for k in err_keys},
            **({f"{k}_max_over_draws_le_daps_tf32": max(v["test"]) <= max(v["exact"])
                for k, v in over_draws.items()} if len(drawn) > 1 else {}),
            "final_sample_psnr_to_exact_ge_floor": min(to_exact) >= min(floor),
            "bit_identical_twice": test_twice,
        },
    }


# ---------------------------------------------------------------------- matrix
_ALL = dict(precision="bf16", compile=True, cudnn_benchmark=True, tf32=True, attention="math")
SWITCHES = {
    "exact": SpeedConfig(),
    "bf16": SpeedConfig(precision="bf16"),
    "compile": SpeedConfig(compile=True),
    "cudnn_benchmark": SpeedConfig(cudnn_benchmark=True),
    "tf32": SpeedConfig(tf32=True),
    "attn_math": SpeedConfig(attention="math"),
    "channels_last": SpeedConfig(channels_last=True),
    "fast_upsample": SpeedConfig(fast_upsample=True),
    "all": SpeedConfig(**_ALL),
    "all+static": SpeedConfig(**_ALL, compile_dynamic=False),
    "all+channels_last": SpeedConfig(**_ALL, channels_last=True),
    "all+fast_upsample": SpeedConfig(**_ALL, fast_upsample=True),
    "all+channels_last+fast_upsample": SpeedConfig(**_ALL, channels_last=True, fast_upsample=True),
    "all+cuda_graphs": SpeedConfig(**_ALL, compile_mode="reduce-overhead"),
    "all+tuning": SpeedConfig(**_ALL, compile_tuning=True),
    "deterministic": SpeedConfig(deterministic=True),
    "attn_split_tf32": SpeedConfig(attention="split_tf32"),
    "fast": None,  # configs/speed/fast.yaml, read when used
    "faithful": None,  # configs/speed/faithful.yaml
}
# a preset with one switch taken off (-) or put on (+): "faithful-cuda_graphs", "faithful+cudnn_benchmark"
SWITCH_OFF = {"compile": dict(compile=False, compile_mode="default"), "cuda_graphs": dict(compile_mode="default"),
              "channels_last": dict(channels_last=False), "fast_upsample": dict(fast_upsample=False),
              "attn_math": dict(attention="default"), "deterministic": dict(deterministic=False),
              "cudnn_benchmark": dict(cudnn_benchmark=False), "bf16": dict(precision="fp32"),
              "attn_split_tf32": dict(attention="math"), "nhwc_group_norm": dict(nhwc_group_norm=False),
              "nhwc_conv_layout": dict(nhwc_conv_layout=False)}
SWITCH_ON = {"cudnn_benchmark": dict(cudnn_benchmark=True, deterministic=False), "tf32": dict(tf32=True),
             "cuda_graphs": dict(compile_mode="reduce-overhead"), "compile_unet": dict(compile_unet=True),
             "bf16": dict(precision="bf16"), "deterministic": dict(deterministic=True, cudnn_benchmark=False),
             "channels_last": dict(channels_last=True), "attn_split_tf32": dict(attention="split_tf32"),
             "nhwc_group_norm": dict(nhwc_group_norm=True), "attn_math": dict(attention="math"),
             "nhwc_conv_layout": dict(nhwc_conv_layout=True)}


def switch(name: str) -> SpeedConfig:
    """SpeedConfig of a matrix row name: a SWITCHES entry, or `<preset>(±<switch>)*`."""
    import re

    if name in SWITCHES:
        return SWITCHES[name] if SWITCHES[name] is not None else load_preset(name)
    base, *mods = re.split(r"(?=[+-])", name)
    known = f"known: {', '.join(SWITCHES)}, or <preset>±<switch> with switches {', '.join(sorted(set(SWITCH_OFF) | set(SWITCH_ON)))}"
    if base not in SWITCHES or not mods:
        raise SystemExit(f"unknown switch set {name!r}; {known}")
    vals = asdict(switch(base))
    for m in mods:
        table_ = SWITCH_ON if m[0] == "+" else SWITCH_OFF
        if m[1:] not in table_:
            raise SystemExit(f"unknown switch {m!r} in {name!r}; {known}")
        vals.update(table_[m[1:]])
    vals["preset"] = name
    return speed_config(vals)


def fmt(v: Optional[float], f: str = "{:.2f}") -> str:
    return "n/a" if v is None else f.format(v)


def table(results: List[Dict[str, Any]], base: Optional[Dict[str, Any]]) -> str:
    lines = ["| config | particles | images/batch | s/anneal step | s/image | images/hour | × vs exact W | "
             "peak VRAM GB | GB/image | compile s |", "|---|---|---|---|---|---|---|---|---|---|"]
    b = base.get("images_per_hour") if base and not base.get("skipped") else None
    for r in results:
        if r.get("oom") or r.get("skipped") or r.get("error"):
            what = "OOM" if r.get("oom") else "skipped (time budget)" if r.get("skipped") else "error"
            lines.append(f"| {r['name']} | {r['particles']} | {r['images_per_batch']} | {what} | | | | | | |")
            continue
        x = r["images_per_hour"] / b if b else None
        pv = r.get("peak_vram_mb")
        lines.append(f"| {r['name']} | {r['particles']} | {r['images_per_batch']} | {fmt(r['s_per_anneal_step'], '{:.3f}')} | "
                     f"{fmt(r['s_per_image'], '{:.1f}')} | {fmt(r['images_per_hour'], '{:.1f}')} | {fmt(x, '{:.2f}×')} | "
                     f"{fmt(None if pv is None else pv / 1024, '{:.2f}')} | "
                     f"{fmt(None if pv is None else pv / 1024 / r['images_per_batch'], '{:.2f}')} | "
                     f"{fmt(r.get('compile_sec'), '{:.1f}')} |")
    return "\n".join(lines)


def pruned_hmc_estimate(r4: Dict[str, Any], r2: Dict[str, Any], hmc_steps: int = 65, prune_at: int = 30) -> Optional[Dict]:
    """s/image for 4→2 pruning at step 29 (steps 0…29 at 4 particles, 30…49 at 2) with HMC-65, from the
    measured per-Langevin-step and non-MCMC costs (HMC does the same decoder work per step)."""
    if any(r.get(k) for r in (r4, r2) for k in ("oom", "skipped", "error")):
        return None
    t4 = r4["non_mcmc_sec_per_anneal_step"] + hmc_steps * r4["mcmc_step_sec"]
    t2 = r2["non_mcmc_sec_per_anneal_step"] + hmc_steps * r2["mcmc_step_sec"]
    s_img = (prune_at * t4 + (NUM_ANNEAL - prune_at) * t2) / r4["images_per_batch"]
    return {"s_per_image": s_img, "images_per_hour": 3600 / s_img, "from_rows": [r4["name"], r2["name"]],
            "images_per_batch": r4["images_per_batch"]}


def _ints(text: str) -> List[int]:
    return [int(v) for v in str(text).split(",") if v.strip()]


def matrix_plan(args) -> List[tuple]:
    """(name, particles, images) rows; one `apply_speed` (one compile) serves all rows of a name."""
    names = [n for n in args.matrix_switches.split(",") if n]
    two = [n for n in args.matrix_two_particles.split(",") if n]
    batch_names = [n for n in args.matrix_batch_configs.split(",") if n]
    for n in names + two + batch_names:
        switch(n)
    rows: List[tuple] = [(n, 4, 1) for n in names]
    rows += [(n, 2, 1) for n in two]
    rows += [(n, 4, k) for n in batch_names for k in _ints(args.matrix_images) if k != 1]
    rows += [(n, 2, k) for n in batch_names if n in two for k in _ints(args.matrix_images) if k != 1]
    order: List[str] = []
    for n, _, _ in rows:
        if n not in order:
            order.append(n)
    order.sort(key=lambda n: switch(n).compile)  # compiled configs last: the cheap rows always finish
    return [r for n in order for r in rows if r[0] == n]


def matrix(args, model, operator, image, device, on_row: Optional[Callable] = None) -> Dict[str, Any]:
    results: List[Dict[str, Any]] = []
    plan = matrix_plan(args)
    t_start = time.perf_counter()
    handles: Dict[str, Any] = {}
    for i, (name, particles, images) in enumerate(plan):
        row = {"name": name, "particles": particles, "images_per_batch": images}
        if time.perf_counter() - t_start > args.budget_s:
            results.append({**row, "skipped": True})
            print(f"skipped {name} p={particles} imgs={images}: over --budget-s {args.budget_s}", file=sys.stderr)
        else:
            speed = switch(name)
            try:
                if name not in handles:
                    handles[name] = apply_speed(model, speed)
                h = handles[name]
                r = time_sampler(model, operator, image, device, speed, particles, images, args.mcmc_algo,
                                 args.mcmc_steps, args.time_mcmc_steps, args.warmup, args.steps_to_time)
                if images == 1 and particles == 4 and not args.no_breakdown and not r.get("oom"):
                    r["breakdown"] = breakdown(model, operator, image, device, speed, particles * images,
                                               args.mcmc_steps, r["s_per_anneal_step"], args.reps, args.repulsion, images)
                r.update(row, compile_sec=h.compile_sec, compiled=h.compiled, preset=speed.preset)
            except Exception as err:  # keep the other rows
                r = {**row, "error": f"{type(err).__name__}: {str(err)[:300]}"}
            results.append(r)
            print(f"[{time.perf_counter() - t_start:6.1f}s] {name:18s} p={particles} imgs={images}: "
                  + ("OOM" if r.get("oom") else r["error"] if r.get("error") else
                     f"{r['s_per_anneal_step']:.3f} s/step, {r['s_per_image']:.1f} s/img, compile {r['compile_sec']:.1f} s"),
                  file=sys.stderr, flush=True)
        last = i + 1 == len(plan) or plan[i + 1][0] != name
        if last and name in handles:
            handles.pop(name).restore()
            if switch(name).compile:
                reset_compiler()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if on_row is not None:
            on_row(results)
    return {"results": results, "derived": derive(results)}


def _row(results, name, particles, images):
    return next((r for r in results if r["name"] == name and r["particles"] == particles
                 and r["images_per_batch"] == images), None)


def derive(results: List[Dict[str, Any]]) -> Dict[str, Any]:
    """× vs exact on every row, pruning+HMC estimates, and the best batch within 20 GB (24 GB cards)."""
    base = _row(results, "exact", 4, 1)
    ok = lambda r: r is not None and not any(r.get(k) for k in ("oom", "skipped", "error"))  # noqa: E731
    bph = base["images_per_hour"] if ok(base) else None
    for r in results:
        if ok(r) and bph:
            r["x_vs_exact_W"] = r["images_per_hour"] / bph
    out: Dict[str, Any] = {}
    for name in dict.fromkeys(r["name"] for r in results):  # every row name with 4- and 2-particle rows
        for k in sorted({r["images_per_batch"] for r in results if r["name"] == name}):
            r4, r2 = _row(results, name, 4, k), _row(results, name, 2, k)
            if ok(r4) and ok(r2):
                est = pruned_hmc_estimate(r4, r2)
                if est and bph:
                    est["x_vs_exact_W"] = est["images_per_hour"] / bph
                out[f"{name}_pruning4to2_hmc65_estimate" + ("" if k == 1 else f"_{k}_images")] = est
    fits = [r for r in results if ok(r) and r["name"] == "fast" and r["particles"] == 4
            and r.get("peak_vram_mb", 0) <= 20 * 1024]
    if fits:
        best = max(fits, key=lambda r: r["images_per_hour"])
        out["fast_best_batch_within_20GB"] = {k: best.get(k) for k in (
            "images_per_batch", "s_per_image", "images_per_hour", "peak_vram_mb", "x_vs_exact_W")}
    return out


# ---------------------------------------------------------------------- step-time series (Exp2-like)
def series(args, model, operator, image, device, speed: SpeedConfig) -> Dict[str, Any]:
    """One whole run (50 annealing steps), per-step seconds, compile seconds; each step's time over
    the median of its segment (before / after pruning)."""
    import statistics

    c0 = compile_seconds()
    t0 = time.perf_counter()
    handle = apply_speed(model, speed)
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        batch = make_batch(model, operator, image, args.images_per_batch, args.particles, device)
        daps = S.DAPSConfig.with_steps(NUM_ANNEAL, mcmc=mcmc_config(args.mcmc_algo, args.time_mcmc_steps))
        hooks = [PruningHook(PruningConfig(step=args.prune_step, keep=args.prune_keep))] if args.prune_step >= 0 else []
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
            "images_per_batch": args.images_per_batch, "mcmc_algo": args.mcmc_algo,
            "mcmc_steps_per_anneal_step": args.time_mcmc_steps, "prune_step": args.prune_step,
            "prune_keep": args.prune_keep, "start_up_sec": t1 - t0, "compile_sec_at_start_up": handle.compile_sec,
            "compile_sec": compile_seconds() - c0, "sampling_sec": sample_sec, "per_step_sec": per,
            "steady_step_sec_before_pruning": med_pre, "steady_step_sec_after_pruning": med_post,
            "step_over_steady": ratio, "max_step_over_steady_excluding_step0": max(ratio[1:]),
            "peak_vram_mb": torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None}


# ---------------------------------------------------------------------- main
def header(device: torch.device) -> Dict[str, Any]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device": str(device), "card": name, "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "cudnn_allow_tf32_default": torch.backends.cudnn.allow_tf32,
            "matmul_allow_tf32_default": torch.backends.cuda.matmul.allow_tf32}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny fixture LDM (64 px images), for CPU smoke runs")
    p.add_argument("--particles", type=int, default=4)
    p.add_argument("--images-per-batch", type=int, default=1)
    p.add_argument("--mcmc-algo", choices=["langevin", "hmc"], default="langevin")
    p.add_argument("--mcmc-steps", type=int, default=None, help="workload MCMC steps (default 100 Langevin / 65 HMC)")
    p.add_argument("--time-mcmc-steps", type=int, default=None,
                   help="MCMC steps actually run per annealing step (extrapolated linearly to --mcmc-steps); "
                        "default: all of them (single mode), 10 (--matrix)")
    p.add_argument("--preset", default=None,
                   help="switches of configs/speed/<preset>.yaml (instead of the switch flags), or a --matrix "
                        "row name such as faithful+tf32")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--compile-unet", action="store_true")
    p.add_argument("--compile-mode", default="default")
    p.add_argument("--cudnn-benchmark", action="store_true")
    p.add_argument("--tf32", choices=["default", "on", "off"], default="default")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--attention", choices=["default", "math"], default="default")
    p.add_argument("--deterministic", action="store_true")
    p.add_argument("--warmup", type=int, default=1, help="annealing steps run before timing (compile happens here)")
    p.add_argument("--steps-to-time", type=int, default=None, help="timed annealing steps (default 2; 1 with --matrix)")
    p.add_argument("--reps", type=int, default=10, help="repetitions per micro-benchmark")
    p.add_argument("--repulsion", action="store_true", help="also time DINO ViT-S/16 repulsion (random weights)")
    p.add_argument("--no-breakdown", action="store_true")
    p.add_argument("--matrix", action="store_true")
    p.add_argument("--matrix-switches", default=",".join(SWITCHES),
                   help="switch sets run at 1 image per batch in --matrix (exact must be one of them)")
    p.add_argument("--matrix-two-particles", default="exact,all,fast",
                   help="switch sets also run at 2 particles (the pruned phase; also at --matrix-images "
                        "when in --matrix-batch-configs)")
    p.add_argument("--matrix-batch-configs", default="exact,fast",
                   help="switch sets run at each of --matrix-images images per batch ('' = none)")
    p.add_argument("--matrix-images", default="2,4,10", help="comma list of images per batch")
    p.add_argument("--series", action="store_true",
                   help="one whole run (50 annealing steps): per-step seconds and compile seconds")
    p.add_argument("--series-legacy", action="store_true",
                   help="--series also with static shapes, compiled no-grad decodes and no start-up compile")
    p.add_argument("--series-images", default=None,
                   help="--series: comma list of images per batch, one run each (default --images-per-batch)")
    p.add_argument("--prune-step", type=int, default=29, help="--series: prune after this step (-1 = off)")
    p.add_argument("--prune-keep", type=int, default=2)
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="--matrix: configs not started within this many seconds are reported as skipped")
    p.add_argument("--agreement", action="store_true")
    p.add_argument("--agreement-anneal-steps", type=int, default=3)
    p.add_argument("--agreement-mcmc-steps", type=int, default=20)
    p.add_argument("--agreement-draws", type=int, default=1,
                   help="--agreement: latents at which the decoder errors are measured (max over them reported)")
    p.add_argument("--agreement-extra", default="",
                   help="--agreement: comma list of further presets / matrix row names measured the same way")
    p.add_argument("--sample-hash", action="store_true",
                   help="sha256 of the final samples of the --agreement run under the switches (compare processes)")
    p.add_argument("--resample", action="store_true",
                   help="also time ReSample (sampler=resample) on the same model after the (exact) DAPS row")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.agreement_draws < 1:
        p.error(f"--agreement-draws {args.agreement_draws}: needs at least one latent")
    if args.mcmc_steps is None:
        args.mcmc_steps = MCMC_DEFAULTS[args.mcmc_algo]["num_steps"]
    if args.steps_to_time is None:
        args.steps_to_time = 1 if args.matrix else 2
    if args.time_mcmc_steps is None:
        args.time_mcmc_steps = 10 if args.matrix else 20 if args.series else args.mcmc_steps
    args.time_mcmc_steps = min(args.time_mcmc_steps, args.mcmc_steps)
    return args


def write_json(path: Optional[str], data: Dict[str, Any]) -> None:
    """`data` as JSON at `path` (its folder created); nothing without a path (no --json)."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=1, default=str))


def speed_from_args(args) -> SpeedConfig:
    if args.preset:
        return switch(args.preset)
    return speed_config(precision=args.precision, compile=args.compile, compile_unet=args.compile_unet,
                        compile_mode=args.compile_mode, cudnn_benchmark=args.cudnn_benchmark,
                        tf32={"default": None, "on": True, "off": False}[args.tf32], channels_last=args.channels_last,
                        attention=args.attention, deterministic=args.deterministic)


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    try:
        import torch._dynamo as dynamo

        dynamo.config.cache_size_limit = max(64, dynamo.config.cache_size_limit)
    except Exception:  # pragma: no cover
        pass
    t0 = time.perf_counter()
    model, operator, image = build(args.tiny, device)
    report: Dict[str, Any] = {**header(device), "workload": {
        "architecture": "tiny fixture LDM (64 px)" if args.tiny else "FFHQ-LDM (ffhq256ldm.yaml), random weights",
        "anneal_steps": NUM_ANNEAL, "ode_steps": ODE_STEPS, "mcmc_algo": args.mcmc_algo,
        "mcmc_steps": args.mcmc_steps, "mcmc_steps_run": args.time_mcmc_steps,
        "extrapolation": "s/step = non-MCMC + MCMC·mcmc_steps/mcmc_steps_run (MCMC timed separately)"},
        "build_sec": time.perf_counter() - t0}
    speed = speed_from_args(args)
    if args.agreement:
        test = speed if not speed.is_exact else SpeedConfig(precision="bf16")
        report["agreement"] = a = agreement(model, operator, image, device, test, args.particles,
                                            args.agreement_anneal_steps, args.agreement_mcmc_steps, args.mcmc_algo,
                                            args.agreement_draws)
        print(json.dumps(a, indent=1))
        keys = ("decode_max_rel_err", "decode_grad_path_max_rel_err", "grad_max_rel_err", "grad_min_cosine")
        print(f"\n### Agreement on {report['card']} (torch {report['torch']}, {report['date']}), vs strict fp32\n")
        print("| path | " + " | ".join(keys) + " | final-sample PSNR to exact, min dB |")
        print("|---|" + "---|" * (len(keys) + 1))
        print("| exact (DAPS default TF32) | " + " | ".join(f"{a['exact_vs_strict_fp32'][k]:.3g}" for k in keys)
              + f" | (strict fp32 vs exact = floor) {a['floor_strict_fp32_vs_exact_final_sample_psnr_db_min']:.2f} |")
        print(f"| {a['test']} | " + " | ".join(f"{a['test_vs_strict_fp32'][k]:.3g}" for k in keys)
              + f" | {a['test_vs_exact']['final_sample_psnr_db_min']:.2f} |")
        print("conditions:", a["conditions"])
        if a["draws"] > 1:
            print(f"over {a['draws']} latents, max (exact / {a['test']}): " + ", ".join(
                f"{k} {max(v['exact']):.3g} / {max(v['test']):.3g}" for k, v in a["over_draws"].items()))
        report["agreement_extra"] = []

        write_json(args.json, report)  # each result on disk as soon as it exists
        for name in [n for n in args.agreement_extra.split(",") if n]:
            e = agreement(model, operator, image, device, switch(name), args.particles,
                          args.agreement_anneal_steps, args.agreement_mcmc_steps, args.mcmc_algo,
                          args.agreement_draws)
            report["agreement_extra"].append(e)
            print(f"| {name}: {e['test']} | " + " | ".join(f"{e['test_vs_strict_fp32'][k]:.3g}" for k in keys)
                  + f" | {e['test_vs_exact']['final_sample_psnr_db_min']:.2f} | exact in this pass: "
                  + " ".join(f"{e['exact_vs_strict_fp32'][k]:.3g}" for k in keys)
                  + f" floor {e['floor_strict_fp32_vs_exact_final_sample_psnr_db_min']:.2f}")
            print("conditions:", e["conditions"])
            write_json(args.json, report)
    elif args.sample_hash:
        h = apply_speed(model, speed)
        try:
            batch = make_batch(model, operator, image, 1, args.particles, device)
            S.latent_daps(model, operator, batch, S.DAPSConfig.with_steps(
                args.agreement_anneal_steps, mcmc=mcmc_config(args.mcmc_algo, args.agreement_mcmc_steps)))
        finally:
            h.restore()
        report["sample_hash"] = {"config": speed.label(), "final_sample_sha256": _sha256(batch.x)}
        print(report["sample_hash"])
    elif args.series:
        report["series"] = []
        for k in _ints(args.series_images or str(args.images_per_batch)):
            args.images_per_batch = k
            report["series"].append(series(args, model, operator, image, device, speed))
        if args.series_legacy and speed.compile:
            legacy = speed_config(asdict(speed), compile_dynamic=False, compile_grad_only=False, compile_warmup=False)
            report["series"].append(series(args, model, operator, image, device, legacy))
        for r in report["series"]:
            r["s_per_image"] = (r["sampling_sec"]) / r["images_per_batch"]
            print(f"{r['config']} {r['images_per_batch']} image(s)/batch, {r['mcmc_algo']}: {r['s_per_image']:.1f} s/image; start-up {r['start_up_sec']:.1f} s, compile {r['compile_sec']:.1f} s, sampling "
                  f"{r['sampling_sec']:.1f} s; steady {r['steady_step_sec_before_pruning']:.3f} / "
                  f"{r['steady_step_sec_after_pruning']:.3f} s per step before / after pruning; max step/steady "
                  f"(excl. step 0) {r['max_step_over_steady_excluding_step0']:.2f}; per step: "
                  + " ".join(f"{v:.2f}" for v in r["per_step_sec"]))
    elif args.matrix:
        report.update(matrix(args, model, operator, image, device,
                             on_row=lambda results: write_json(args.json, {**report, "results": results,
                                                                            "partial": True})))
        base = next((r for r in report["results"] if r["name"] == "exact" and r["particles"] == 4
                     and r["images_per_batch"] == 1), None)
        print(f"\n### Speed matrix on {report['card']} (torch {report['torch']}, {report['date']})\n")
        print(f"Workload W: 1 image 256², {report['workload']['architecture']}, 50 annealing × (2 ODE + "
              f"{args.mcmc_steps} Langevin). Timed: {args.steps_to_time} annealing step(s) after {args.warmup} "
              f"warm-up step(s), {args.time_mcmc_steps} Langevin steps run per annealing step and extrapolated "
              f"linearly to {args.mcmc_steps}.\n")
        print(table(report["results"], base))
        for key, est in report["derived"].items():
            if key.endswith("estimate") or "_estimate_" in key:
                if est:
                    print(f"\n{key} (pruning 4→2 at step 29 + HMC-65, from the 4- and 2-particle rows): "
                          f"{est['s_per_image']:.1f} s/image, {est['images_per_hour']:.1f} images/hour, "
                          f"{fmt(est.get('x_vs_exact_W'), '{:.2f}×')} vs exact W")
        if report["derived"].get("fast_best_batch_within_20GB"):
            print("fast, best images/hour within 20 GB:", report["derived"]["fast_best_batch_within_20GB"])
        for r in report["results"]:
            if r.get("breakdown") and r["particles"] == 4 and not r["breakdown"].get("oom") and r["images_per_batch"] == 1:
                parts = ", ".join(f"{k} {v:.3f}" for k, v in r["breakdown"]["per_anneal_step_sec"].items())
                print(f"breakdown {r['name']} (4 particles, s per annealing step): {parts}")
    else:
        r = run_config(args, model, operator, image, device, speed, args.particles, args.images_per_batch,
                       not args.no_breakdown)
        r["name"] = speed.label()
        report["results"] = [r]
        print(table([r], None))
        if args.resample:
            report["resample"] = rs = time_resample(model, operator, image, device, args.particles, args.reps)
            mb = "n/a" if rs["peak_memory_mb"] is None else f"{rs['peak_memory_mb']:.0f} MB"
            print(f"ReSample ({args.particles} particles, {rs['plan']}): <= {rs['s_per_image_upper_bound']:.1f} s/image "
                  f"(every optimisation to max_iters), peak {mb}; parts: "
                  + ", ".join(f"{k} {v:.4f}" for k, v in rs.items() if k.endswith("_sec")))
        if r.get("breakdown") and not r["breakdown"].get("oom"):
            print(json.dumps(r["breakdown"], indent=1))
    write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
