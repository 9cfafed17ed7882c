"""Bandwidth, error and tuning of the fused NHWC GroupNorm(+SiLU) kernels and of the split-TF32 attention
GEMMs on the FFHQ-LDM VQ-f4 decoder's shapes (batch 4), on one CUDA device.

    python scripts/bench_kernels.py --json out.json

GroupNorm: the decoder's norm shapes are collected with hooks from the full-size decoder (random weights);
for each, fp32 and bf16: forward and backward time of the Triton kernels (median of CUDA-event timings,
triton.testing.do_bench), GB/s of the fewest bytes the op must move (forward x in + y out, backward x and
dy in + dx out) against a device-to-device copy measured in the same process, the same pass through
Inductor's fused kernels of `group_norm_nhwc` + SiLU (the `nhwc_group_norm` switch) and through eager
F.group_norm, and max errors of y and dx against float64.  A sweep of the launch parameters picks TUNING.

Attention: the decoder's q kᵀ (4 × 4096 × 512 · 512 × 4096) and P v (4 × 4096 × 4096 · 4096 × 512)
products in strict fp32 (cuBLAS SIMT, what DAPS runs), as three cuBLAS TF32 products of pre-split operands,
and as one Triton tf32x3 kernel (block configurations swept), each against float64.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

import cores.decoder_ops as dops  # noqa: E402
import cores.triton_group_norm as tgn  # noqa: E402
from cores.models.ldm import build_random_ldm  # noqa: E402


DEV = "cuda"  # --smoke: "cpu", the kernels through Triton's interpreter (TRITON_INTERPRET=1), tiny sizes


def ms(fn) -> float:
    if DEV == "cpu":  # smoke run: one call, wall clock (checks the script, measures nothing)
        t = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t)
    return float(do_bench(fn, warmup=20, rep=100, return_mode="median"))


def rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max())


def copy_bandwidth() -> float:
    x = torch.randn(2 ** 28 if DEV == "cuda" else 2 ** 12, device=DEV)
    y = torch.empty_like(x)
    return 2 * x.numel() * 4 / ms(lambda: y.copy_(x)) / 1e6  # GB/s (bytes read + written)


def norm_shapes(model, batch: int):
    """(C, spatial, groups, silu-after, count) of every GroupNorm call in one decoder forward."""
    seen = {}
    hooks = []
    for mod in model.vq.decoder.modules():
        if isinstance(mod, torch.nn.GroupNorm):
            hooks.append(mod.register_forward_hook(
                lambda m, i, o: seen.__setitem__((tuple(i[0].shape[1:]), m.num_groups),
                                                 seen.get((tuple(i[0].shape[1:]), m.num_groups), 0) + 1)))
    with torch.no_grad():
        model.vq.decoder(model.vq.post_quant_conv(torch.randn(1, *model.get_in_shape(), device=DEV)))
    for h in hooks:
        h.remove()
    return [((batch, *shape), g, n) for (shape, g), n in seen.items()]


def bench_group_norm(shapes, bw_copy: float, sweep: bool):
    rows, tuning_scores = [], {}
    fwd_cfgs = [(8192, 8, 512, 0), (4096, 4, 512, 0), (8192, 8, 1056, 0), (16384, 8, 512, 0), (4096, 4, 264, 0),
                (8192, 8, 512, 1), (8192, 8, 512, 2)] if sweep else []
    for shape, g, count in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            es = torch.finfo(dtype).bits // 8
            x = (torch.randn(shape, device=DEV) * 2 + 0.5).to(dtype)
            x = x.movedim(1, -1).contiguous().movedim(-1, 1)
            c = shape[1]
            w, b = torch.randn(c, device=DEV), torch.randn(c, device=DEV)
            dy = torch.randn_like(x)
            xr = x.movedim(1, -1).reshape(shape[0], -1, c)
            dyr = dy.movedim(1, -1).reshape(shape[0], -1, c)
            n = x.numel()
            fwd = lambda: tgn.group_norm_act_rows(xr, w, b, g, 1e-6, True)  # noqa: E731
            y, mean, rstd = fwd()
            bwd = lambda: tgn.group_norm_act_rows_backward(dyr, xr, mean, rstd, w, b, g, True, False)  # noqa: E731
            # errors against float64 (and the same for PyTorch's own fp32 GroupNorm, for scale)
            x64 = x.double().requires_grad_(True)
            ref = F.silu(F.group_norm(x64, g, w.double(), b.double(), 1e-6))
            (rdx,) = torch.autograd.grad(ref, x64, dy.double())
            dx = bwd()[0]
            xt = x.detach().float().requires_grad_(True)
            tref = F.silu(F.group_norm(xt, g, w, b, 1e-6))
            (tdx,) = torch.autograd.grad(tref, xt, dy.float())
            t_f, t_b = ms(fwd), ms(bwd)
            # Inductor's fused kernels of the NHWC reductions (the nhwc_group_norm switch) and eager torch
            xg = x.detach().requires_grad_(True)
            torch._dynamo.reset()  # one lambda's code object per row: no recompile limit is reached
            # what the presets run now: the NHWC reductions for 4-D inputs, F.group_norm for the attention's 3-D one
            base = dops.group_norm_nhwc if x.ndim == 4 else F.group_norm
            # fp32 inside as autocast runs GroupNorm (its fp32 list), the input's dtype out
            ind = torch.compile(lambda t: F.silu(base(t.float(), g, w, b, 1e-6)).to(t.dtype))
            eag = lambda t: F.silu(F.group_norm(t.float(), g, w, b, 1e-6)).to(t.dtype)  # noqa: E731
            ours = lambda t: tgn.group_norm_act(t, g, w, b, 1e-6, True)  # noqa: E731
            fb = {}
            for name, fn in (("triton", ours), ("inductor_nhwc", ind), ("eager_torch", eag)):
                def step(fn=fn):
                    return torch.autograd.grad(fn(xg), xg, dy)
                step()
                fb[name] = ms(step)
            row = dict(shape=list(shape), groups=g, count=count, dtype=str(dtype).split(".")[-1],
                       fwd_ms=t_f, bwd_ms=t_b,
                       fwd_gbs=2 * n * es / t_f / 1e6, bwd_gbs=3 * n * es / t_b / 1e6,
                       fwd_moved_gbs=3 * n * es / t_f / 1e6, bwd_moved_gbs=5 * n * es / t_b / 1e6,
                       err_y=rel(y.view(x.movedim(1, -1).shape).movedim(-1, 1), ref),
                       err_dx=rel(dx.view(x.movedim(1, -1).shape).movedim(-1, 1), rdx),
                       torch_err_y=rel(tref, ref), torch_err_dx=rel(tdx, rdx),
                       fwd_bwd_ms=fb)
            row["fwd_pct_copy"] = 100 * row["fwd_gbs"] / bw_copy
            row["bwd_pct_copy"] = 100 * row["bwd_gbs"] / bw_copy
            rows.append(row)
            print(f"GN {tuple(shape)} {row['dtype']} x{count}: fwd {t_f:.3f} ms {row['fwd_gbs']:.0f} GB/s "
                  f"({row['fwd_pct_copy']:.0f}% copy), bwd {t_b:.3f} ms {row['bwd_gbs']:.0f} GB/s "
                  f"({row['bwd_pct_copy']:.0f}%); fwd+bwd triton {fb['triton']:.3f} inductor {fb['inductor_nhwc']:.3f} "
                  f"eager {fb['eager_torch']:.3f} ms; err y {row['err_y']:.1e} dx {row['err_dx']:.1e} "
                  f"(torch fp32 {row['torch_err_y']:.1e} / {row['torch_err_dx']:.1e})", flush=True)
            saved = dict(tgn.TUNING)
            for tile, warps, progs, chunk in fwd_cfgs:
                tgn.TUNING.update(fwd_tile=tile, fwd_warps=warps, bwd_tile=tile, bwd_warps=warps, programs=progs,
                                  batch_chunk=chunk)
                y2 = fwd()[0]
                dx2 = bwd()[0]
                ok = rel(y2, y) < 1e-5 if dtype == torch.float32 else rel(y2, y) < 1e-2
                key = f"tile {tile}/warps {warps}/programs {progs}/batch chunk {chunk or 'all'}"
                s = tuning_scores.setdefault(key, {"fwd": 0.0, "bwd": 0.0, "ok": True})
                s["fwd"] += count * ms(fwd)
                s["bwd"] += count * ms(bwd)
                s["ok"] = s["ok"] and ok and rel(dx2, dx) < 1e-2
            tgn.TUNING.update(saved)
    return rows, tuning_scores


def bench_attention(sweep: bool):
    out = {}
    torch.backends.cuda.matmul.allow_tf32 = False
    g = torch.Generator(device=DEV).manual_seed(0)
    n, d = (4096, 512) if DEV == "cuda" else (64, 32)
    q, k, v = (torch.randn(4, n, d, device=DEV, generator=g) for _ in range(3))
    p = torch.softmax(torch.bmm(q, k.transpose(1, 2)) / d ** 0.5, dim=-1)
    cases = {"qk": (q, k.transpose(1, 2)), "pv": (p, v)}
    blocks = [dict(BM=128, BN=128, BK=32, num_warps=8, num_stages=3), dict(BM=128, BN=256, BK=16, num_warps=8, num_stages=3),
              dict(BM=64, BN=128, BK=32, num_warps=4, num_stages=4)] if sweep else [dict(dops._BMM_BLOCKS)]
    default = dict(dops._BMM_BLOCKS)
    for name, (a, b) in cases.items():
        ref = torch.bmm(a.double(), b.double())
        flop = 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
        r = {"strict_fp32_ms": ms(lambda: torch.bmm(a, b)), "strict_fp32_err": rel(torch.bmm(a, b), ref)}
        dops.SPLIT_TF32_IMPL["cuda"] = "cublas"
        r["cublas_3xtf32_ms"] = ms(lambda: dops.split_tf32_bmm(a, b))
        r["cublas_3xtf32_err"] = rel(dops.split_tf32_bmm(a, b), ref)
        dops.SPLIT_TF32_IMPL["cuda"] = "triton"
        for blk in blocks:
            dops._BMM_BLOCKS.update(blk)
            key = "triton_{BM}x{BN}x{BK}_w{num_warps}_s{num_stages}".format(**blk)
            try:
                r[key + "_ms"] = ms(lambda: dops.split_tf32_bmm(a, b))
                r[key + "_err"] = rel(dops.split_tf32_bmm(a, b), ref)
            except Exception as err:  # a block configuration that does not fit (shared memory)
                r[key + "_error"] = f"{type(err).__name__}: {str(err)[:120]}"
        dops._BMM_BLOCKS.update(default)
        torch.backends.cuda.matmul.allow_tf32 = True
        r["cublas_1xtf32_ms"] = ms(lambda: torch.bmm(a, b))
        r["cublas_1xtf32_err"] = rel(torch.bmm(a, b), ref)
        torch.backends.cuda.matmul.allow_tf32 = False
        r["gflop"] = flop / 1e9
        out[name] = r
        print(f"attention {name}: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                                for k, v in r.items()), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny fixture decoder, with TRITON_INTERPRET=1: checks "
                    "that the script runs end to end; its numbers mean nothing")
    args = ap.parse_args()
    global DEV
    if args.smoke:
        DEV = "cpu"
        dops.SPLIT_TF32_IMPL["cuda"] = "triton"
    torch.manual_seed(0)
    cfg = ROOT / ("tests/fixtures/ldm_tiny_ffhq.yaml" if args.smoke else "configs/model/ffhq256ldm.yaml")
    spec = yaml.safe_load(cfg.read_text())
    model = build_random_ldm(spec if not args.smoke else {"name": "ldm", "ldm_config": spec}, DEV)
    shapes = norm_shapes(model, args.batch)
    del model
    bw = copy_bandwidth()
    name = torch.cuda.get_device_name() if DEV == "cuda" else "cpu (smoke)"
    print(f"device {name}, torch {torch.__version__}, triton {triton.__version__}; "
          f"copy bandwidth {bw:.0f} GB/s; norm shapes {shapes}", flush=True)
    gn_rows, scores = bench_group_norm(shapes, bw, not args.no_sweep)
    best = None
    for key, s in sorted(scores.items(), key=lambda kv: kv[1]["fwd"] + kv[1]["bwd"]):
        print(f"tuning {key}: fwd {s['fwd']:.3f} ms, bwd {s['bwd']:.3f} ms (weighted by count, both dtypes), ok {s['ok']}")
        best = best or (key if s["ok"] else None)
    attn = bench_attention(not args.no_sweep)
    tot = {d: {k: sum(r["count"] * (r["fwd_bwd_ms"][k]) for r in gn_rows if r["dtype"] == d)
               for k in ("triton", "inductor_nhwc", "eager_torch")} for d in ("float32", "bfloat16")}
    print(f"GroupNorm+SiLU fwd+bwd per decoder step (sum over its norms): {json.dumps(tot)}; best tuning {best}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(device=name, torch=torch.__version__,
                                                   triton=triton.__version__, copy_gbs=bw, group_norm=gn_rows,
                                                   tuning=scores, best_tuning=best, per_step_ms=tot,
                                                   attention=attn), indent=1))


if __name__ == "__main__":
    main()
