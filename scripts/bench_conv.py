"""The FFHQ-LDM VQ-f4 decoder's convolutions, forward and data gradient, per shape, on several backends.

    python scripts/bench_conv.py --json out.json [--inductor-budget-s 200]

Shapes come from hooks on the full-size decoder (random weights) at batch 4, NHWC (channels_last), as
the faithful and fast presets run them.  Per shape and precision (fp32 with cuDNN's TF32 — faithful —
and bf16 — fast): median ms (triton.testing.do_bench) and TFLOP/s of
* cuDNN bundled with torch through F.conv2d / aten.convolution_backward (input gradient only; the sampler
  freezes every weight), heuristics (benchmark off, the faithful preset) and timed choice (benchmark on);
* cuDNN's graph API through nvidia-cudnn-frontend (when importable): every engine configuration its
  heuristics (modes A and B) offer is built and timed, the fastest counts;
* Inductor's Triton convolution template (max_autotune, Triton backend only), data gradient written as
  the convolution of dy with the flipped, transposed filter (stride 1); within a time budget;
* cuBLAS on the implicit GEMM's own shape (M = B·H·W, K = Cin·kh·kw, N = Cout): what a GEMM-based
  (implicit-GEMM) convolution would reach at the GEMM library's rate, without its gather.
Errors: max |out − ref| / max |ref| against strict fp32 cuDNN (TF32 off).
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

from triton.testing import do_bench  # noqa: E402

import scripts.bench_kernels as bench_kernels  # noqa: E402
from cores.models.ldm import build_random_ldm  # noqa: E402
from scripts.bench_kernels import ms, rel  # noqa: E402  (median CUDA-event time; error over max magnitude)

PEAK = {"float32": 494.7, "bfloat16": 989.4}  # H100 SXM dense TF32 / BF16 TFLOP/s (datasheet)


DEV = "cuda"  # --smoke: "cpu" with the tiny fixture decoder, to check the script runs; its numbers mean nothing


def conv_shapes(model, batch):
    seen = {}
    hooks = []
    for mod in model.vq.decoder.modules():
        if isinstance(mod, torch.nn.Conv2d):
            def hook(m, i, o):
                key = (m.in_channels, m.out_channels, m.kernel_size[0], m.padding[0], m.stride[0], i[0].shape[-1])
                seen[key] = seen.get(key, 0) + 1
            hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        model.vq.decoder(model.vq.post_quant_conv(torch.randn(1, *model.get_in_shape(), device=DEV)))
    for h in hooks:
        h.remove()
    return [dict(cin=k[0], cout=k[1], k=k[2], pad=k[3], stride=k[4], hw=k[5], batch=batch, count=n)
            for k, n in seen.items()]


def nhwc(t):
    return t.contiguous(memory_format=torch.channels_last)


def cudnn_fe(sh, x, w, dy, direction):
    """Fastest engine configuration of cuDNN's graph API for one convolution (ms), its error input."""
    import cudnn

    dt = cudnn.data_type.BFLOAT16 if x.dtype == torch.bfloat16 else cudnn.data_type.FLOAT
    handle = cudnn.create_handle()
    g = cudnn.pygraph(io_data_type=dt, intermediate_data_type=cudnn.data_type.FLOAT,
                      compute_data_type=cudnn.data_type.FLOAT, handle=handle)
    pad, st = [sh["pad"]] * 2, [sh["stride"]] * 2
    W = g.tensor(name="W", dim=list(w.shape), stride=list(w.stride()), data_type=dt)
    if direction == "fwd":
        X = g.tensor(name="X", dim=list(x.shape), stride=list(x.stride()), data_type=dt)
        Y = g.conv_fprop(image=X, weight=W, padding=pad, stride=st, dilation=[1, 1],
                         compute_data_type=cudnn.data_type.FLOAT)
        out = torch.empty(x.shape[0], w.shape[0], *dy.shape[2:], device=DEV, dtype=x.dtype)
        out = nhwc(out)
        Y.set_output(True).set_data_type(dt).set_dim(list(out.shape)).set_stride(list(out.stride()))
        pack = {X: x, W: w, Y: out}
    else:
        DY = g.tensor(name="DY", dim=list(dy.shape), stride=list(dy.stride()), data_type=dt)
        DX = g.conv_dgrad(loss=DY, filter=W, padding=pad, stride=st, dilation=[1, 1],
                          compute_data_type=cudnn.data_type.FLOAT)
        out = torch.empty_like(x)
        DX.set_output(True).set_data_type(dt).set_dim(list(out.shape)).set_stride(list(out.stride()))
        pack = {DY: dy, W: w, DX: out}
    g.validate()
    g.build_operation_graph()
    g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.B])
    g.check_support()
    g.build_plans(cudnn.build_plan_policy.ALL)
    best, n = None, g.get_execution_plan_count()
    for i in range(min(n, 12)):
        try:
            ws = torch.empty(max(1, g.get_workspace_size_plan_at_index(i)), device=DEV, dtype=torch.uint8)
            t = float(do_bench(lambda: g.execute_plan_at_index(pack, ws, i, handle=handle), warmup=5, rep=30, return_mode="median"))
        except Exception:
            continue
        if best is None or t < best[0]:
            best = (t, i)
    ws = torch.empty(max(1, g.get_workspace_size_plan_at_index(best[1])), device=DEV, dtype=torch.uint8)
    g.execute_plan_at_index(pack, ws, best[1], handle=handle)
    torch.cuda.synchronize()
    return best[0], out, n  # noqa: E501


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--inductor-budget-s", type=float, default=200.0)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny fixture decoder: checks that the script runs")
    args = ap.parse_args()
    global DEV
    torch.manual_seed(0)
    if args.smoke:
        DEV = bench_kernels.DEV = "cpu"
        spec = yaml.safe_load((ROOT / "tests/fixtures/ldm_tiny_ffhq.yaml").read_text())
        model = build_random_ldm({"name": "ldm", "ldm_config": spec}, DEV)
    else:
        model = build_random_ldm(yaml.safe_load((ROOT / "configs/model/ffhq256ldm.yaml").read_text()), DEV)
    shapes = conv_shapes(model, args.batch)
    del model
    try:
        import cudnn
        fe = f"cudnn-frontend {getattr(cudnn, '__version__', '?')}, backend {getattr(cudnn, 'backend_version', lambda: '?')()}"
    except Exception as err:
        fe = f"not importable: {type(err).__name__}: {str(err)[:150]}"
    dev = torch.cuda.get_device_name() if DEV == "cuda" else "cpu (smoke)"
    print(f"device {dev}; torch {torch.__version__}; cuDNN {torch.backends.cudnn.version()}; {fe}", flush=True)
    # measured GEMM ceilings
    ceil = {}
    for dt in (torch.float32, torch.bfloat16):
        a = torch.randn(8192 if DEV == "cuda" else 256, 8192 if DEV == "cuda" else 256, device=DEV, dtype=dt)
        torch.backends.cuda.matmul.allow_tf32 = True
        ceil[str(dt).split(".")[-1]] = 2 * a.shape[0] ** 3 / ms(lambda: a @ a) / 1e9
    print(f"cuBLAS 8192^3 ceiling TFLOP/s: {ceil}", flush=True)
    rows = []
    t_ind = 0.0
    torch.backends.cudnn.allow_tf32 = True
    for sh in shapes:
        b, hw, cin, cout, k, pad, st = sh["batch"], sh["hw"], sh["cin"], sh["cout"], sh["k"], sh["pad"], sh["stride"]
        ho = (hw + 2 * pad - k) // st + 1
        flop = 2 * b * ho * ho * cout * cin * k * k
        for dt in (torch.float32, torch.bfloat16):
            dname = str(dt).split(".")[-1]
            x = nhwc(torch.randn(b, cin, hw, hw, device=DEV, dtype=dt))
            w = nhwc(torch.randn(cout, cin, k, k, device=DEV, dtype=dt) / (cin * k * k) ** 0.5)
            dy = nhwc(torch.randn(b, cout, ho, ho, device=DEV, dtype=dt))
            with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=False, allow_tf32=False):
                ref_f = F.conv2d(x.float(), w.float(), None, st, pad)
                ref_b = torch.ops.aten.convolution_backward(dy.float(), x.float(), w.float(), None, [st] * 2, [pad] * 2,
                                                            [1, 1], False, [0, 0], 1, [True, False, False])[0]
            fwd = lambda: F.conv2d(x, w, None, st, pad)  # noqa: E731
            bwd = lambda: torch.ops.aten.convolution_backward(dy, x, w, None, [st] * 2, [pad] * 2, [1, 1], False,  # noqa: E731
                                                              [0, 0], 1, [True, False, False])[0]
            for direction, fn, ref in (("fwd", fwd, ref_f), ("dgrad", bwd, ref_b)):
                r = dict(sh, dtype=dname, direction=direction, gflop=flop / 1e9)
                for name, bench in (("cudnn_heuristic", False), ("cudnn_benchmark", True)):
                    with torch.backends.cudnn.flags(enabled=True, benchmark=bench, deterministic=False, allow_tf32=True):
                        out = fn()
                        r[name + "_ms"] = ms(fn)
                        r[name + "_err"] = rel(out, ref)
                try:
                    t, out, nplans = cudnn_fe(sh, x, w, dy, direction)
                    r["cudnn_fe_ms"], r["cudnn_fe_err"], r["cudnn_fe_plans"] = t, rel(out, ref), nplans
                except Exception as err:
                    r["cudnn_fe_error"] = f"{type(err).__name__}: {str(err)[:160]}"
                m, kk, n = b * ho * ho, cin * k * k, cout
                if direction == "dgrad":
                    m, kk, n = b * hw * hw, cout * k * k, cin
                a_ = torch.randn(m, kk, device=DEV, dtype=dt)
                b_ = torch.randn(kk, n, device=DEV, dtype=dt)
                r["gemm_equiv_ms"] = ms(lambda: a_ @ b_)
                del a_, b_
                if k == 3 and st == 1 and min(cin, cout) >= (128 if DEV == "cuda" else 32) and t_ind < args.inductor_budget_s:
                    import torch._inductor.config as icfg

                    t0 = time.perf_counter()
                    try:
                        with icfg.patch(max_autotune=True, max_autotune_conv_backends="TRITON", max_autotune_gemm_backends="TRITON"):
                            if direction == "fwd":
                                f = torch.compile(lambda a, b_: F.conv2d(a, b_, None, 1, pad), dynamic=False)
                                ia, ib = x, w
                            else:
                                f = torch.compile(lambda a, b_: F.conv2d(a, b_, None, 1, k - 1 - pad), dynamic=False)
                                ia, ib = dy, nhwc(w.flip(2, 3).transpose(0, 1))
                            out = f(ia, ib)
                            r["inductor_triton_ms"] = ms(lambda: f(ia, ib))
                            r["inductor_triton_err"] = rel(out, ref)
                            torch._dynamo.reset()
                    except Exception as err:
                        r["inductor_triton_error"] = f"{type(err).__name__}: {str(err)[:160]}"
                    t_ind += time.perf_counter() - t0
                    r["inductor_compile_s"] = time.perf_counter() - t0
                for key in [k_ for k_ in r if k_.endswith("_ms")]:
                    r[key.replace("_ms", "_tflops")] = flop / r[key] / 1e9
                    r[key.replace("_ms", "_pct_peak")] = 100 * flop / r[key] / 1e9 / PEAK[dname]
                rows.append(r)
                print(f"conv {cin}->{cout} k{k} @{hw}² x{sh['count']} {dname} {direction}: " + ", ".join(
                    f"{kk_[:-3]} {r[kk_]:.3f} ms ({r[kk_.replace('_ms', '_pct_peak')]:.0f}%)" for kk_ in r if kk_.endswith("_ms"))
                    + "".join(f"; {kk_} {r[kk_]}" for kk_ in r if kk_.endswith("_error")), flush=True)
    tot = {}
    for r in rows:
        for key in [k_ for k_ in r if k_.endswith("_ms")]:
            d = tot.setdefault(f"{r['dtype']}", {})
            d[key] = d.get(key, 0.0) + r["count"] * r[key]
    print(f"sum over the decoder's convolutions (count-weighted, fwd + dgrad): {json.dumps(tot)}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(device=dev, torch=torch.__version__,
                                                   cudnn=torch.backends.cudnn.version(), frontend=fe,
                                                   gemm_ceiling_tflops=ceil, rows=rows, totals=tot), indent=1))


if __name__ == "__main__":
    main()
