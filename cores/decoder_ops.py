"""Decoder ops that speed switches install in place of the library's (cores/speed.py).

Levers found by the faithful preset's profile (PROJECT.md §3, "Speed, faithful preset"):

* **split-TF32 attention** (`speed.attention: split_tf32`).  DAPS runs matmuls in strict fp32
  (PyTorch's default `matmul.allow_tf32 = False`), so the decoder's 4096-token attention runs on
  SIMT cores: 18 % of a faithful decoder step on an H100.  Writing each fp32 operand as a sum
  hi + lo of two TF32 numbers and keeping the three largest products (hi·hi + hi·lo + lo·hi, the
  "3xTF32" scheme of CUTLASS) gives fp32-level products (relative error ≈ 2⁻²¹, against ≈ 2⁻¹¹ for
  one TF32 pass) from tensor-core matmuls.  Its error is far below the TF32 convolutions DAPS
  already runs, so the preset's numerics stay those of DAPS.
* **NHWC group norm** (`speed.nhwc_group_norm`).  GroupNorm written as reductions over an NHWC
  view, so that torch.compile generates one fused kernel family (statistics, normalise, SiLU and
  their backward) that reads channels-last memory in order instead of through a transpose.
* **NHWC convolution layout** (`speed.nhwc_conv_layout`).  cuDNN's convolution backward makes
  its incoming gradient and saved input channels-last with a copy of its own when they arrive in
  another layout (`contiguous` / `to` inside `convolution_backward`: 2.5 ms of a 43 ms faithful NHWC
  step on an H100, `scripts/profile_decoder.py --trace-copies`).  Asking for channels-last at the
  convolution's input and at its output gradient lets torch.compile write those tensors in that
  layout from the kernel that produces them, so the copies disappear.  Values are unchanged: only
  memory layout is asked for.

All are exact re-expressions of the library's math up to float summation order; tests bound them
against the library's modules on CPU (tests/test_decoder_ops.py).
"""
from __future__ import annotations

import os
from typing import List, Optional

import torch
import torch.nn.functional as F

try:  # optional: the fused split-TF32 GEMM (CUDA) needs Triton; without it the cuBLAS form runs
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - no Triton
    triton = None
    tl = None

__all__ = ["split_tf32", "split_tf32_bmm", "SplitTF32AttnProcessor", "group_norm_nhwc",
           "install_split_tf32_attention", "install_nhwc_group_norm", "install_nhwc_conv_layout"]

_TF32_MASK = -8192  # 0xFFFFE000: sign, exponent and the 10 mantissa bits a TF32 operand keeps


def split_tf32(x: torch.Tensor):
    """(hi, lo) with hi = x truncated to TF32 (its low 13 mantissa bits zeroed) and lo = x − hi,
    exact in fp32: hi + lo == x bit for bit, and hi passes through a TF32 matmul unrounded."""
    hi = (x.contiguous().view(torch.int32) & _TF32_MASK).view(torch.float32)
    return hi, x - hi


class _TF32Matmuls:
    """cuBLAS matmuls in TF32 inside the block (only the split products run there)."""

    def __enter__(self):
        self.before = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self.before


# which implementation split_tf32_bmm runs on CUDA: "triton" (one kernel: the split inside the GEMM's
# tile loop, `tl.dot(..., input_precision="tf32x3")`) or "cublas" (three cuBLAS TF32 products of
# operands split beforehand in separate elementwise kernels); scripts/bench_kernels.py times both
SPLIT_TF32_IMPL = {"cuda": "triton"}
_BMM_BLOCKS = dict(BM=128, BN=128, BK=32, num_warps=8, num_stages=3)  # fixed: one summation order

if triton is not None:
    @triton.jit
    def _bmm_tf32x3_kernel(a_ptr, b_ptr, c_ptr, M, N, K, sab, sam, sak, sbb, sbk, sbn, scb, scm, scn,
                           BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
        pid = tl.program_id(0)
        bid = tl.program_id(1).to(tl.int64)
        num_m = tl.cdiv(M, BM)
        num_n = tl.cdiv(N, BN)
        group = pid // (GROUP_M * num_n)  # grouped tile order: neighbouring programs share B tiles in L2
        first_m = group * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        pm = first_m + (pid % (GROUP_M * num_n)) % size_m
        pn = (pid % (GROUP_M * num_n)) // size_m
        rm = pm * BM + tl.arange(0, BM)
        rn = pn * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        a_ptrs = a_ptr + bid * sab + rm[:, None] * sam + rk[None, :] * sak
        b_ptrs = b_ptr + bid * sbb + rk[:, None] * sbk + rn[None, :] * sbn
        acc = tl.zeros((BM, BN), tl.float32)
        for k0 in range(0, K, BK):
            ka = (k0 + rk) < K
            a = tl.load(a_ptrs, mask=(rm[:, None] < M) & ka[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=ka[:, None] & (rn[None, :] < N), other=0.0)
            acc = tl.dot(a, b, acc, input_precision="tf32x3")
            a_ptrs += BK * sak
            b_ptrs += BK * sbk
        c_ptrs = c_ptr + bid * scb + rm[:, None] * scm + rn[None, :] * scn
        tl.store(c_ptrs, acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


def _bmm_tf32x3_triton(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    bsz, m, k = a.shape
    n = b.shape[2]
    c = a.new_empty((bsz, m, n))
    blk = _BMM_BLOCKS
    grid = (triton.cdiv(m, blk["BM"]) * triton.cdiv(n, blk["BN"]), bsz)
    _bmm_tf32x3_kernel[grid](a, b, c, m, n, k, *a.stride(), *b.stride(), *c.stride(), BM=blk["BM"], BN=blk["BN"],
                             BK=blk["BK"], GROUP_M=8, num_warps=blk["num_warps"], num_stages=blk["num_stages"])
    return c


@torch.library.custom_op("latentdaps::split_tf32_bmm", mutates_args=())
def split_tf32_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched a @ b of fp32 (B, n, k) × (B, k, m) as three TF32 tensor-core products.

    An opaque op for torch.compile (Inductor would lower a plain bmm under the global flag), so the
    TF32 switch applies to these products only; CUDA graphs capture it like any other kernel.  On
    CUDA with Triton the split happens inside one GEMM kernel (no split tensors in memory, operands
    read through their strides: no transposed copies)."""
    if triton is not None and (a.is_cuda and SPLIT_TF32_IMPL["cuda"] == "triton"
                               or not a.is_cuda and os.environ.get("TRITON_INTERPRET", "0") == "1"):
        return _bmm_tf32x3_triton(a, b)
    a_hi, a_lo = split_tf32(a)
    b_hi, b_lo = split_tf32(b)
    with _TF32Matmuls():
        small = torch.baddbmm(torch.bmm(a_lo, b_hi), a_hi, b_lo)
        return torch.baddbmm(small, a_hi, b_hi)


@split_tf32_bmm.register_fake
def _(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.new_empty((a.shape[0], a.shape[1], b.shape[2]))


def _bmm_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _bmm_backward(ctx, grad: torch.Tensor):
    a, b = ctx.saved_tensors
    ga = split_tf32_bmm(grad, b.transpose(1, 2)) if ctx.needs_input_grad[0] else None
    gb = split_tf32_bmm(a.transpose(1, 2), grad) if ctx.needs_input_grad[1] else None
    return ga, gb


split_tf32_bmm.register_autograd(_bmm_backward, setup_context=_bmm_setup)


def _bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """split_tf32_bmm for fp32 operands (on CPU the same three products, in plain fp32); under
    bf16 autocast the plain bmm, which there has nothing to gain."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return split_tf32_bmm(a, b)
    return torch.bmm(a, b)


class SplitTF32AttnProcessor:
    """The decoder's self-attention (diffusers `Attention` on a (B, C, H, W) input, as the VQ/KL
    decoders' mid block uses it) with fp32-accurate tensor-core matmuls for softmax(q kᵀ/√d) v.

    Same steps as diffusers' AttnProcessor2_0 for that case (group norm, q/k/v projections, one
    or more heads, output projection, residual, rescale); the score scale is applied after q kᵀ as
    CompVis' AttnBlock (what DAPS runs) does."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None or attn.spatial_norm is not None \
                or hidden_states.ndim != 4 or attn.norm_q is not None or attn.norm_k is not None:
            raise NotImplementedError("SplitTF32AttnProcessor covers the decoder's plain self-attention only")
        residual = hidden_states
        b, c, h, w = hidden_states.shape
        x = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            x = attn.group_norm(x.transpose(1, 2)).transpose(1, 2)
        q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        heads = attn.heads
        d = k.shape[-1] // heads

        def split_heads(t: torch.Tensor) -> torch.Tensor:  # (B, N, heads·d) -> (B·heads, N, d)
            return t.view(b, -1, heads, d).transpose(1, 2).reshape(b * heads, -1, d)

        q, k, v = split_heads(q), split_heads(k), split_heads(v)
        scores = _bmm(q, k.transpose(1, 2)) * (d ** -0.5)
        out = _bmm(torch.softmax(scores, dim=-1), v)
        out = out.view(b, heads, -1, d).transpose(1, 2).reshape(b, -1, heads * d)
        out = attn.to_out[1](attn.to_out[0](out))
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def install_split_tf32_attention(root: torch.nn.Module) -> List[torch.nn.Module]:
    """Give every diffusers `Attention` under `root` the split-TF32 processor; returns them (with
    their former processor kept as `_processor_before`, for restore)."""
    from diffusers.models.attention_processor import Attention

    done = []
    for mod in root.modules():
        if isinstance(mod, Attention) and not mod.is_cross_attention:
            mod._processor_before = mod.processor
            mod.set_processor(SplitTF32AttnProcessor())
            done.append(mod)
    return done


def group_norm_nhwc(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor],
                    bias: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """F.group_norm of a (B, C, H, W) tensor computed on its NHWC view: the statistics reduce over
    (H·W, C/G) of a (B, H·W, G, C/G) view, which is channels-last memory read in order.  Two-pass
    variance (mean first), biased, as F.group_norm."""
    b, c, h, w = x.shape
    g = num_groups
    xg = x.permute(0, 2, 3, 1).reshape(b, h * w, g, c // g)
    mean = xg.mean(dim=(1, 3), keepdim=True)
    centred = xg - mean
    var = centred.square().mean(dim=(1, 3), keepdim=True)
    y = (centred * torch.rsqrt(var + eps)).reshape(b, h, w, c)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y.permute(0, 3, 1, 2)


def install_nhwc_group_norm(root: torch.nn.Module) -> List[torch.nn.Module]:
    """Shadow `forward` of every 4-D GroupNorm under `root`: a channels-last input takes
    group_norm_nhwc, anything else the library's F.group_norm.  Returns the patched modules."""
    done = []
    for mod in root.modules():
        if isinstance(mod, torch.nn.GroupNorm):
            def forward(x: torch.Tensor, _m=mod) -> torch.Tensor:
                if x.ndim == 4 and x.shape[1] > 1 and not x.is_contiguous() \
                        and x.is_contiguous(memory_format=torch.channels_last):
                    return group_norm_nhwc(x, _m.num_groups, _m.weight, _m.bias, _m.eps)
                return F.group_norm(x, _m.num_groups, _m.weight, _m.bias, _m.eps)

            mod.forward = forward
            done.append(mod)
    return done


class _ChannelsLastGrad(torch.autograd.Function):
    """Identity whose backward hands the gradient on in channels-last memory (same values)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor) -> torch.Tensor:
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous(memory_format=torch.channels_last)


def install_nhwc_conv_layout(root: torch.nn.Module) -> List[torch.nn.Module]:
    """Shadow `forward` of every Conv2d under `root`: its input is made channels-last and the
    gradient of its output arrives channels-last.  Returns the patched modules."""
    done = []
    for mod in root.modules():
        if isinstance(mod, torch.nn.Conv2d):
            def forward(x: torch.Tensor, _m=mod) -> torch.Tensor:
                if x.ndim != 4:
                    return type(_m).forward(_m, x)
                y = type(_m).forward(_m, x.contiguous(memory_format=torch.channels_last))
                return _ChannelsLastGrad.apply(y) if y.requires_grad else y

            mod.forward = forward
            done.append(mod)
    return done
