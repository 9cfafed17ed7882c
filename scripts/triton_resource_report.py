"""Compile the project's Triton kernels for Hopper (sm_90) without a GPU and report what the compiler made.

    python scripts/triton_resource_report.py

For each kernel of cores/triton_group_norm.py (fp32 and bf16, 512/256/128 channels, the tile shapes the
launcher picks) and the split-TF32 GEMM of cores/decoder_ops.py: registers, spills and stack (ptxas -v on
the PTX), the widths of the global loads and stores (16-byte `v4.b32` is what a memory-bound kernel wants),
and for the GEMM whether the products are Hopper `wgmma` instructions in TF32.  Pointers and row counts are
declared 16-byte aligned / divisible by 16, as Triton specialises them at run time for the decoder's tensors.
"""
from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cores.decoder_ops as dops  # noqa: E402
import cores.triton_group_norm as tgn  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
ALIGNED_INTS = ("R", "ROWS", "M", "N", "K", "sab", "sam", "sbb", "sbk", "scb", "scm")


def compile_report(fn, sig: dict, const: dict, label: str, num_warps: int = 8, num_stages: int = 3) -> str:
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(sig)
             if sig[n].startswith("*") or n in ALIGNED_INTS}
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs), target=TARGET,
                            options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = kernel.asm["ptx"]
    ptxas = get_ptxas(90)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    out = subprocess.run([getattr(ptxas, "path", ptxas), "-v", "--gpu-name", "sm_90a", f.name, "-o", "/dev/null"],
                         capture_output=True, text=True)
    usage = " ".join(re.sub(r"\s+", " ", ln.split("info    :")[-1]).strip() for ln in out.stderr.splitlines()
                     if "registers" in ln or "spill" in ln)
    loads = sorted(set(re.findall(r"ld\.global[\.\w:]*", ptx)))
    stores = sorted(set(re.findall(r"st\.global[\.\w:]*", ptx)))
    mma = len(re.findall(r"wgmma\.mma_async[\.\w]*tf32", ptx))
    return f"{label}: {usage}; loads {loads or ['(TMA / cp.async only)']}; stores {stores}" + (
        f"; wgmma tf32 instructions {mma}" if mma else "")


def main() -> None:
    print(f"triton {triton.__version__}, target sm_90")
    gn_common = {"mean_ptr": "*fp32", "rstd_ptr": "*fp32", "w_ptr": "*fp32", "bias_ptr": "*fp32"}
    for dt in ("fp32", "bf16"):
        for c in (512, 256, 128):
            fwd_rows = tgn.TUNING["fwd_tile"] // c
            bwd_rows = tgn.TUNING["bwd_tile"] // c
            sig = {"x_ptr": f"*{dt}", "part_ptr": "*fp32", "R": "i32", "ROWS": "i32", "NCH": "i32",
                   "C": "constexpr", "G": "constexpr", "BLOCK_R": "constexpr"}
            print(compile_report(tgn._group_norm_fwd_stats, sig, {"C": c, "G": 32, "BLOCK_R": fwd_rows},
                                 f"fwd statistics {dt} C={c}", tgn.TUNING["fwd_warps"]))
            sig = {"x_ptr": f"*{dt}", "y_ptr": f"*{dt}", "part_ptr": "*fp32", **gn_common, "R": "i32", "ROWS": "i32",
                   "NCH": "i32", "eps": "fp32", "C": "constexpr", "G": "constexpr", "NCH_P2": "constexpr",
                   "BLOCK_R": "constexpr", "SILU": "constexpr"}
            sig = {k: sig[k] for k in tgn._group_norm_fwd_apply.arg_names}
            print(compile_report(tgn._group_norm_fwd_apply, sig,
                                 {"C": c, "G": 32, "NCH_P2": 128, "BLOCK_R": fwd_rows, "SILU": True},
                                 f"fwd normalise+SiLU {dt} C={c}", tgn.TUNING["fwd_warps"]))
            sig = {"dy_ptr": f"*{dt}", "x_ptr": f"*{dt}", **gn_common, "part_ptr": "*fp32", "cpart_ptr": "*fp32",
                   "R": "i32", "ROWS": "i32", "NCH": "i32", "C": "constexpr", "G": "constexpr", "BLOCK_R": "constexpr",
                   "SILU": "constexpr", "WGRAD": "constexpr"}
            sig = {k: sig[k] for k in tgn._group_norm_bwd_sums.arg_names}
            print(compile_report(tgn._group_norm_bwd_sums, sig,
                                 {"C": c, "G": 32, "BLOCK_R": bwd_rows, "SILU": True, "WGRAD": False},
                                 f"bwd sums {dt} C={c}", tgn.TUNING["bwd_warps"]))
            sig = {"dy_ptr": f"*{dt}", "x_ptr": f"*{dt}", "dx_ptr": f"*{dt}", **gn_common, "part_ptr": "*fp32",
                   "R": "i32", "ROWS": "i32", "NCH": "i32", "C": "constexpr", "G": "constexpr", "NCH_P2": "constexpr",
                   "BLOCK_R": "constexpr", "SILU": "constexpr"}
            sig = {k: sig[k] for k in tgn._group_norm_bwd_dx.arg_names}
            print(compile_report(tgn._group_norm_bwd_dx, sig,
                                 {"C": c, "G": 32, "NCH_P2": 128, "BLOCK_R": bwd_rows, "SILU": True},
                                 f"bwd dx {dt} C={c}", tgn.TUNING["bwd_warps"]))
    blk = dops._BMM_BLOCKS
    sig = {n: ("*fp32" if n.endswith("_ptr") else "i32") for n in dops._bmm_tf32x3_kernel.arg_names}
    sig.update({"BM": "constexpr", "BN": "constexpr", "BK": "constexpr", "GROUP_M": "constexpr"})
    print(compile_report(dops._bmm_tf32x3_kernel, sig, {"BM": blk["BM"], "BN": blk["BN"], "BK": blk["BK"], "GROUP_M": 8},
                         f"split-TF32 bmm {blk['BM']}x{blk['BN']}x{blk['BK']}", blk["num_warps"], blk["num_stages"]))


if __name__ == "__main__":
    main()
