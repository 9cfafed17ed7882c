"""Decoder fwd+bwd time, kernel profile and error against strict fp32 of preset variants, in one process.

    python scripts/bench_decoder_variants.py --variants faithful,faithful+triton_group_norm,fast,fast+triton_group_norm \
        --json out.json [--budget-s 240]

Variants are `scripts/benchmark.py --matrix` row names, with `+triton_group_norm` also accepted.  Each runs
with CUDA graphs off (`compile_mode: default`) so that the profile shows every kernel; the decoder's fwd+bwd
at 4 rows (one image's particles) is timed with CUDA events (median of 5 blocks of 10 steps), profiled
(scripts/profile_decoder.py's kernel groups) and compared with strict fp32 (TF32 off everywhere, eager) on
the phase-retrieval loss of 4 latents: max error of the decode and of its gradient over max magnitude, per
latent, and the gradient's cosine.  The exact path (DAPS' default flags) gives the floor in the same process.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cores.models.ldm import build_random_ldm  # noqa: E402
from cores.operators import get_operator  # noqa: E402
from cores.speed import apply_speed, speed_config  # noqa: E402
from scripts.benchmark import switch  # noqa: E402
from scripts.profile_decoder import kernel_profile  # noqa: E402


def variant(name: str):
    extra = {}
    for flag in ("+triton_group_norm", "+attn_split_tf32"):
        if flag in name:
            name = name.replace(flag, "")
            extra.update(triton_group_norm=True) if flag == "+triton_group_norm" else extra.update(attention="split_tf32")
    vals = {**asdict(switch(name)), **extra}
    if vals["compile_mode"] == "reduce-overhead":
        vals["compile_mode"] = "default"  # profile every kernel
    return speed_config(vals)


def decode_and_grad(model, z, op, y):
    zz = z.detach().requires_grad_(True)
    x = model.decode(zz)
    (g,) = torch.autograd.grad(op.loss(x, y).sum(), zz)
    return x.detach().double(), g.double()


def errors(x, g, rx, rg):
    out = {"decode": [], "grad": [], "cos": []}
    for i in range(x.shape[0]):
        out["decode"].append(float((x[i] - rx[i]).abs().max() / rx[i].abs().max()))
        out["grad"].append(float((g[i] - rg[i]).abs().max() / rg[i].abs().max()))
        out["cos"].append(float(torch.nn.functional.cosine_similarity(g[i].flatten(), rg[i].flatten(), dim=0)))
    return {"decode_max": max(out["decode"]), "grad_max": max(out["grad"]), "cos_min": min(out["cos"]), **out}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="faithful,faithful+triton_group_norm,fast,fast+triton_group_norm")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--budget-s", type=float, default=1e9, help="skip the variants left after this many seconds")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    t_start = time.perf_counter()
    dev = torch.device("cuda")
    model = build_random_ldm(yaml.safe_load((ROOT / "configs/model/ffhq256ldm.yaml").read_text()), dev)
    model.requires_grad_(False)
    g = torch.Generator(device="cpu").manual_seed(0)
    z = torch.randn((args.batch, *model.get_in_shape()), generator=g).to(dev)
    op = get_operator("phase_retrieval", resolution=256)
    y = op(torch.rand(args.batch, 3, 256, 256, generator=g).to(dev) * 2 - 1)
    flags = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    rx, rg = decode_and_grad(model, z, op, y)
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "batch": args.batch,
               "exact": errors(*decode_and_grad(model, z, op, y), rx, rg), "variants": {}}
    e = results["exact"]
    print(f"{results['device']}: exact vs strict fp32: decode {e['decode_max']:.2e} grad {e['grad_max']:.2e} "
          f"cos {e['cos_min']:.6f}", flush=True)
    for name in [v for v in args.variants.split(",") if v]:
        if time.perf_counter() - t_start > args.budget_s:
            results["variants"][name] = {"skipped": "time budget"}
            print(f"{name}: skipped (time budget)", flush=True)
            continue
        cfg = variant(name)
        t0 = time.perf_counter()
        h = apply_speed(model, cfg)
        compile_s = time.perf_counter() - t0

        def step():
            zz = z.detach().requires_grad_(True)
            return torch.autograd.grad(op.loss(model.decode(zz), y).sum(), zz)

        for _ in range(3):
            step()
        blocks = []
        for _ in range(5):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(10):
                step()
            b.record()
            torch.cuda.synchronize()
            blocks.append(a.elapsed_time(b) / 10)
        prof = kernel_profile(step)
        err = errors(*decode_and_grad(model, z, op, y), rx, rg)
        x1, g1 = decode_and_grad(model, z, op, y)
        x2, g2 = decode_and_grad(model, z, op, y)
        h.restore()
        torch._dynamo.reset()
        r = {"speed": asdict(cfg), "label": cfg.label(), "compile_s": compile_s, "step_ms": sorted(blocks)[2],
             "step_ms_blocks": blocks, "profile": prof, "errors": err,
             "same_bits_twice": bool(torch.equal(x1, x2) and torch.equal(g1, g2))}
        results["variants"][name] = r
        print(f"{name} [{cfg.label()}]: decoder+loss fwd+bwd {r['step_ms']:.2f} ms (blocks "
              f"{', '.join(f'{b:.2f}' for b in blocks)}), profile {prof['total_ms']:.2f} ms GPU: "
              + ", ".join(f"{k} {v:.2f}" for k, v in sorted(prof["groups_ms"].items(), key=lambda kv: -kv[1]))
              + f"; vs strict fp32: decode {err['decode_max']:.2e} grad {err['grad_max']:.2e} cos {err['cos_min']:.6f};"
              f" same bits twice {r['same_bits_twice']}; compile {compile_s:.0f} s", flush=True)
        for ms_, n, key in prof["top"][:12]:
            print(f"    {ms_:7.3f} ms x{n:<4d} {key[:100]}")
        if args.json:  # after every variant: a later time-out keeps what is done
            Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
