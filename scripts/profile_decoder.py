"""Kernel-level profile of one VQ-decoder forward+backward (what each Langevin step costs).

    python scripts/profile_decoder.py [--batch 4] [--precision fp32|bf16] [--compile] [--preset fast]
Prints the top CUDA kernels by time, grouped by kind, so it is visible what limits the step.
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
    p.add_argument("--preset", default=None, help="switches of configs/speed/<preset>.yaml (overrides the flags)")
    args = p.parse_args()
    dev = torch.device("cuda")
    model = build_random_ldm(yaml.safe_load((ROOT / "configs/model/ffhq256ldm.yaml").read_text()), dev)
    if args.preset:
        from scripts.benchmark import load_preset

        speed = load_preset(args.preset)
    else:
        speed = speed_config({"precision": args.precision, "compile": args.compile,
                              "channels_last": args.channels_last})
    apply_speed(model, speed)
    z = torch.randn(args.batch, *model.get_in_shape(), device=dev)

    def step():
        zz = z.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(model.decode(zz).square().sum(), zz)
        return g

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    groups = {}
    total = 0.0
    for e in prof.key_averages():
        t = e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
        if t <= 0:
            continue
        name = e.key.lower()
        kind = ("conv" if any(k in name for k in ("conv", "cudnn", "implicit", "xmma", "sm90", "wgrad", "dgrad"))
                else "norm" if "norm" in name else "elementwise/activation" if any(
                    k in name for k in ("elementwise", "silu", "sigmoid", "mul", "add", "triton")) else
                "attention" if any(k in name for k in ("attention", "fmha", "softmax", "gemm", "bmm")) else
                "upsample" if "upsample" in name else "other")
        groups[kind] = groups.get(kind, 0.0) + t
        total += t
    print(f"{torch.cuda.get_device_name(dev)} batch {args.batch} {speed.label()}: "
          f"{total / 5 / 1e3:.1f} ms GPU time per decoder fwd+bwd")
    for k, v in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"  {k:24s} {v / total:6.1%}")
    print(prof.key_averages().table(sort_by="cuda_time_total" if not hasattr(torch.profiler, "_x") else None,
                                    row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()
