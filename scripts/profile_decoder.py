"""Kernel-level profile of one VQ-decoder forward+backward (what each Langevin step costs).

    python scripts/profile_decoder.py [--batch 4] [--precision fp32|bf16] [--compile] [--preset fast]
    python scripts/profile_decoder.py --preset faithful-cuda_graphs   # any `benchmark.py --matrix` row name
    python scripts/profile_decoder.py --benchmark-peak                # where cudnn.benchmark's peak comes from
    python scripts/profile_decoder.py --preset faithful+channels_last+nhwc_group_norm --trace-copies
Prints the top CUDA kernels by time, grouped by kind, so it is visible what limits the step, and the
convolutions' FLOPs per step (torch.utils.flop_counter) with the rate the convolution kernels reach.
`--trace-copies` names the PyTorch op (and the ops around it) that launched each copy or layout kernel.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cores.models.ldm import build_random_ldm  # noqa: E402
from cores.speed import apply_speed, speed_config  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--preset", default=None, help="a preset or `benchmark.py --matrix` row name (overrides the flags)")
    p.add_argument("--cudnn-benchmark", action="store_true", help="with --benchmark-peak")
    p.add_argument("--benchmark-peak", action="store_true",
                   help="peak memory of the first and of a later decoder step with cudnn.benchmark on / off")
    p.add_argument("--set", action="append", default=[], metavar="SWITCH=VALUE",
                   help="a speed switch on top of --preset, e.g. --set triton_group_norm=true (repeatable)")
    p.add_argument("--trace-copies", action="store_true",
                   help="also attribute copy / layout-transpose kernels to the ops that launched them")
    args = p.parse_args()
    dev = torch.device("cuda")
    model = build_random_ldm(yaml.safe_load((ROOT / "configs/model/ffhq256ldm.yaml").read_text()), dev)
    if args.benchmark_peak:
        benchmark_peak(model, args.batch, dev, args.channels_last, args.cudnn_benchmark)
        return
    if args.preset:
        from scripts.benchmark import switch

        speed = switch(args.preset)
        if args.set:
            from dataclasses import asdict

            speed = speed_config({**asdict(speed), **{k: yaml.safe_load(v) for k, v in
                                                      (kv.split("=", 1) for kv in args.set)}})
    else:
        speed = speed_config({"precision": args.precision, "compile": args.compile,
                              "channels_last": args.channels_last})
    apply_speed(model, speed)
    z = torch.randn(args.batch, *model.get_in_shape(), device=dev)

    def step():
        zz = z.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(model.decode(zz).square().sum(), zz)
        return g

    prof = kernel_profile(step)
    print(f"{torch.cuda.get_device_name(dev)} batch {args.batch} {speed.label()}: "
          f"{prof['total_ms']:.1f} ms GPU time per decoder fwd+bwd")
    for k, v in sorted(prof["groups_ms"].items(), key=lambda kv: -kv[1]):
        print(f"  {k:24s} {v / prof['total_ms']:6.1%}  {v:7.3f} ms")
    print("top kernels (ms per decoder step, share):")
    for ms_, n, key in prof["top"]:
        print(f"  {ms_:7.3f} ms {ms_ / prof['total_ms']:6.1%} x{n:<4d} {key[:110]}")
    if args.trace_copies:
        trace_copies(step)
    # last: under the counter's dispatch mode a compiled decoder may fall back to eager for later calls
    conv_ms = prof["groups_ms"].get("conv", 0.0)
    tflop = conv_tflop(step)
    print(f"convolutions: {tflop:.3f} TFLOP per decoder fwd+bwd (flop_counter), {conv_ms:.2f} ms in "
          f"convolution kernels -> {tflop / conv_ms * 1e3 if conv_ms else float('nan'):.0f} TFLOP/s")


def kernel_kind(name: str) -> str:
    """Group of a CUDA kernel by its name (cuDNN/cuBLAS/Inductor/Triton naming)."""
    name = name.lower()
    return ("layout transpose" if any(k in name for k in ("nchwtonhwc", "nhwctonchw", "transpose"))
            else "conv" if any(k in name for k in ("conv", "cudnn", "implicit", "xmma", "sm90", "wgrad", "dgrad"))
            else "norm" if "norm" in name else "elementwise/activation" if any(
                k in name for k in ("elementwise", "silu", "sigmoid", "mul", "add", "triton")) else
            "attention" if any(k in name for k in ("attention", "fmha", "softmax", "gemm", "bmm")) else
            "upsample" if "upsample" in name else "other")


def kernel_profile(step, steps: int = 5, warmup: int = 3, top: int = 25) -> dict:
    """GPU time per `step()` (ms): total, per kernel group, and the top kernels (ms, launches per step, name)."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total  # µs over the steps
        if t > 0:
            rows.append((t / steps / 1e3, e.count // steps, e.key))
    groups: dict = {}
    for ms_, _, key in rows:
        groups[kernel_kind(key)] = groups.get(kernel_kind(key), 0.0) + ms_
    return {"total_ms": sum(r[0] for r in rows), "groups_ms": groups, "top": sorted(rows, reverse=True)[:top]}


def conv_tflop(step) -> float:
    """Convolution FLOPs (forward and data gradient) of one `step()`, counted by PyTorch."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    per_op = counter.get_flop_counts().get("Global", {})
    return sum(v for op, v in per_op.items() if "convolution" in str(op)) / 1e12


COPY_KERNELS = ("copy", "nchwtonhwc", "nhwctonchw", "transpose")


def trace_copies(step, steps: int = 3) -> None:
    """Which op launched each copy / layout kernel: the launching op's chain of enclosing ops (outermost
    last) and input shapes, with the kernels' time per decoder step, largest first."""
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts, record_shapes=True) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    where: dict = {}
    for ev in prof.events():
        kernels = [k for k in getattr(ev, "kernels", []) if not k.name.startswith("triton_")
                   and any(c in k.name.lower() for c in COPY_KERNELS)]  # Triton names say "_to_copy" when fused
        if not kernels:
            continue
        chain, parent = [ev.name], ev.cpu_parent
        while parent is not None and len(chain) < 6:
            chain.append(parent.name)
            parent = parent.cpu_parent
        key = (" < ".join(chain), str(getattr(ev, "input_shapes", ""))[:120], kernels[0].name[:60])
        t, n = where.get(key, (0.0, 0))
        where[key] = (t + sum(k.duration for k in kernels), n + len(kernels))
    total = sum(t for t, _ in where.values())
    print(f"copy / layout kernels: {total / steps / 1e3:.3f} ms per decoder step, by launching op:")
    for (chain, shapes, kernel), (t, n) in sorted(where.items(), key=lambda kv: -kv[1][0])[:30]:
        print(f"  {t / steps / 1e3:7.3f} ms x{n // steps:<3d} {chain[:150]}  shapes {shapes}  [{kernel}]")


def benchmark_peak(model, batch: int, dev: torch.device, channels_last: bool, bench: bool) -> None:
    """Peak allocated memory of the first decoder fwd+bwd (cuDNN picks its algorithms here) and of
    the next one, fp32 with PyTorch's default TF32 flags.  One setting per process: PyTorch caches a
    cuDNN plan per convolution shape and layout, picked or timed, and reuses it whatever the
    benchmark flag says later.  CUDNN_CONV_WSCAP_DBG=<MiB> caps the workspace of each candidate."""
    import os

    from cores.speed import SpeedConfig, apply_speed

    h = apply_speed(model, SpeedConfig(channels_last=channels_last, fast_upsample=channels_last, cudnn_benchmark=bench))
    z = torch.randn(batch, *model.get_in_shape(), device=dev)
    peaks = []
    for _ in range(2):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        zz = z.detach().requires_grad_(True)
        torch.autograd.grad(model.decode(zz).square().sum(), zz)
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() / 2 ** 30)
    h.restore()
    print(f"{torch.cuda.get_device_name(dev)} batch {batch} fp32 {'NHWC' if channels_last else 'NCHW'} "
          f"cudnn.benchmark={bench} CUDNN_CONV_WSCAP_DBG={os.environ.get('CUDNN_CONV_WSCAP_DBG', 'unset')}: "
          f"peak first step {peaks[0]:.2f} GiB, second step {peaks[1]:.2f} GiB, reserved "
          f"{torch.cuda.memory_reserved() / 2 ** 30:.2f} GiB", flush=True)


if __name__ == "__main__":
    main()
