"""Speed benchmark of the LatentDAPS sampler on the full-size FFHQ-LDM architecture.

Workloads (`--workload`, `scripts/bench/workloads.py`): W = 1 image 256², FFHQ-LDM architecture with
random weights (speed does not depend on weight values), 4 particles, 50 annealing steps × (2 PF-ODE
+ 100 Langevin); Wprime (W′) = the original study's exp1: 50 × (2 PF-ODE + 50 Langevin, lr 4e-6) with
DINO ViT-S/16 repulsion (random weights, scale 10) on steps 0–29, its three kinds of step timed apart.
The exact path stands in for official DAPS (on one H100 they agree within 1 % at W).
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
    python scripts/benchmark.py --matrix --workload Wprime --matrix-switches exact,faithful,fast
        --matrix-two-particles '' --matrix-batch-configs '' --matrix-series fast
                                                    # W′ rows, and fast + pruning 4→2 + HMC-65 as one whole run
    python scripts/benchmark.py --tiny --device cpu # smoke run on the tiny fixture LDM (64 px)

Parts (`scripts/bench/`): common (model, batch, presets, timers), workloads (W, W′), timing (the
sampler per step, micro-benchmarks), matrix, series, agreement (and sample hashes), resample, report
(printed tables).  Memory fields are MiB; the tables say GiB.
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
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import sampler as S  # noqa: E402
from cores.speed import SpeedConfig, apply_speed, speed_config  # noqa: E402
from scripts.bench import report as R  # noqa: E402
from scripts.bench.agreement import _sha256, agreement  # noqa: E402
from scripts.bench.common import (MCMC_DEFAULTS, _ints, build, header, load_preset, make_batch,  # noqa: E402,F401
                                  mcmc_config, write_json)
from scripts.bench.matrix import SWITCHES, matrix, switch, table  # noqa: E402,F401
from scripts.bench.resample import time_resample  # noqa: E402
from scripts.bench.series import series  # noqa: E402
from scripts.bench.timing import run_config  # noqa: E402
from scripts.bench.workloads import WORKLOADS  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny fixture LDM (64 px images), for CPU smoke runs")
    p.add_argument("--particles", type=int, default=4)
    p.add_argument("--images-per-batch", type=int, default=1)
    p.add_argument("--mcmc-algo", choices=["langevin", "hmc"], default="langevin")
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="W",
                   help="W: 100 Langevin (lr 5e-5), no repulsion; Wprime: the original study's exp1, 50 Langevin "
                        "(lr 4e-6), DINO repulsion on steps 0–29 (scripts/bench/workloads.py)")
    p.add_argument("--mcmc-steps", type=int, default=None,
                   help="workload MCMC steps (default: the workload's Langevin steps / 65 HMC)")
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
    p.add_argument("--matrix-series", default="",
                   help="--matrix: presets also run as one whole run with pruning (--prune-keep of --particles after "
                        "--prune-step) + HMC-65, every step run (a row '<preset>+prune4to2+hmc65 (whole run)')")
    p.add_argument("--matrix-series-hmc-steps", type=int, default=None,
                   help="--matrix-series: HMC steps per annealing step (default HMC's 65; fewer only for smoke runs)")
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
        args.mcmc_steps = (WORKLOADS[args.workload].langevin_steps if args.mcmc_algo == "langevin"
                           else MCMC_DEFAULTS[args.mcmc_algo]["num_steps"])
    if args.steps_to_time is None:
        args.steps_to_time = 1 if args.matrix else 2
    if args.time_mcmc_steps is None:
        args.time_mcmc_steps = 10 if args.matrix else 20 if args.series else args.mcmc_steps
    args.time_mcmc_steps = min(args.time_mcmc_steps, args.mcmc_steps)
    return args



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
        **WORKLOADS[args.workload].definition(args.particles),
        "architecture": "tiny fixture LDM (64 px)" if args.tiny else "FFHQ-LDM (ffhq256ldm.yaml), random weights",
        "resolution": model.image_resolution, "mcmc_algo": args.mcmc_algo, "mcmc_steps": args.mcmc_steps, "mcmc_steps_run": args.time_mcmc_steps,
        "extrapolation": "s/step = non-MCMC + MCMC·mcmc_steps/mcmc_steps_run (MCMC timed separately); with "
                         "repulsion, s/image = Σ over step kinds of steps_in_run × s/step of that kind",
        "official_code_stand_in": "the exact path (official DAPS within 1 % at W, H100, 2026-12-05)",
        "memory_unit": "MiB (2**20 bytes) in *_mb fields"},
        "build_sec": time.perf_counter() - t0}
    speed = speed_from_args(args)
    if args.agreement:
        test = speed if not speed.is_exact else SpeedConfig(precision="bf16")
        report["agreement"] = a = agreement(model, operator, image, device, test, args.particles,
                                            args.agreement_anneal_steps, args.agreement_mcmc_steps, args.mcmc_algo,
                                            args.agreement_draws)
        R.print_agreement(report, a)
        report["agreement_extra"] = []
        write_json(args.json, report)  # each result on disk as soon as it exists
        for name in [n for n in args.agreement_extra.split(",") if n]:
            e = agreement(model, operator, image, device, switch(name), args.particles,
                          args.agreement_anneal_steps, args.agreement_mcmc_steps, args.mcmc_algo,
                          args.agreement_draws)
            report["agreement_extra"].append(e)
            R.print_agreement_extra(name, e)
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
        R.print_series(report["series"])
    elif args.matrix:
        report.update(matrix(args, model, operator, image, device,
                             on_row=lambda results: write_json(args.json, {**report, "results": results,
                                                                            "partial": True})))
        R.print_matrix(report, args)
    else:
        r = run_config(args, model, operator, image, device, speed, args.particles, args.images_per_batch,
                       not args.no_breakdown)
        r["name"] = speed.label()
        report["results"] = [r]
        print(table([r], None))
        if args.resample:
            report["resample"] = rs = time_resample(model, operator, image, device, args.particles, args.reps)
            mb = "n/a" if rs["peak_memory_mb"] is None else f"{rs['peak_memory_mb']:.0f} MiB"
            print(f"ReSample ({args.particles} particles, {rs['plan']}): <= {rs['s_per_image_upper_bound']:.1f} s/image "
                  f"(every optimisation to max_iters), peak {mb}; parts: "
                  + ", ".join(f"{k} {v:.4f}" for k, v in rs.items() if k.endswith("_sec")))
        if r.get("breakdown") and not r["breakdown"].get("oom"):
            print(json.dumps(r["breakdown"], indent=1))
    write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
