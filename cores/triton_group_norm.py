"""Fused channels-last GroupNorm (+ SiLU) forward and backward as Triton kernels (`speed.triton_group_norm`).

Why by hand: PyTorch's GroupNorm kernels are NCHW, and Inductor's fused GroupNorm+SiLU kernels on the
decoder's channels-last activations ran at about a third of the H100's memory bandwidth (PROJECT.md
§3, "Speed, layout levers and the presets now"); PyTorch has no NHWC GroupNorm upstream.

Layout: a (B, C, *spatial) tensor whose channels are its innermost dimension (channels_last for 4-D)
is read as rows of C contiguous values, (B, R, C).  Each kernel program takes a contiguous band of
rows of one batch element, so every load is a coalesced 2-D tile of whole rows.

Forward (2 kernels, x read twice, y written once):
  1. statistics: per program and group, the sums of d = x − K and d² over its band, K a per-(batch,
     group) shift (the group's mean over the first row) that keeps E[d²] − E[d]² free of cancellation
     when |mean| ≫ std; fp32 accumulators whatever the input dtype.
  2. normalise: each program adds up the partial sums of all bands of its batch element in a fixed
     order (deterministic, no atomics), writes mean and 1/std (band 0 only) and y = act(x·a + b) with
     a = γ·rstd, b = β − mean·a per channel, act = SiLU or identity.
Backward (2 kernels, x and dy read twice, dx written once):
  1. per program and channel, Σ dt and Σ dt·x̂ (dt = dy through the SiLU, x̂ the normalised input);
     per group Σ γ·dt and Σ γ·dt·x̂ for dx; per channel (only when γ or β need a gradient) for dγ, dβ.
  2. dx = rstd·(γ·dt − mean_g(γ·dt) − x̂·mean_g(γ·dt·x̂)), the partial sums added as in the forward.

Numerics: statistics and all arithmetic in fp32; y and dx in the input's dtype (bf16 under the fast
preset's autocast, where F.group_norm would have returned fp32 for the next convolution to cast back).

On CPU (tests) the same op runs a pure-PyTorch reference of the same math, or the Triton kernels
themselves under Triton's interpreter (`TRITON_INTERPRET=1`).  Both ops are torch.library custom ops,
opaque to torch.compile, with the backward registered as their autograd formula.
"""
from __future__ import annotations

import os
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

try:  # Triton is optional: without it the reference path runs (CPU) and the switch is refused on CUDA
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - no Triton
    triton = None
    tl = None

__all__ = ["group_norm_act", "layout_supported", "install_triton_group_norm", "TUNING"]

# launch parameters, tuned on an H100 (scripts/bench_group_norm.py): elements per tile, warps
# (batch_chunk 0 = every batch element in one launch pair)
TUNING = {"fwd_tile": 8192, "fwd_warps": 8, "bwd_tile": 4096, "bwd_warps": 8, "programs": 512, "batch_chunk": 0}


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def layout_supported(x: torch.Tensor, num_groups: int) -> bool:
    """Whether the fused op takes `x`: (B, C, *spatial) with channels innermost in memory
    (channels_last), C and C/G powers of two (the kernels' tiles), float32/bfloat16/float16."""
    if x.ndim < 3 or x.numel() == 0 or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    c = x.shape[1]
    if c % num_groups or not _pow2(c) or not _pow2(c // num_groups) or c > 2048:
        return False
    return x.movedim(1, -1).is_contiguous()


if triton is not None:
    @triton.jit
    def _channel_of_group(v, G: tl.constexpr, CG: tl.constexpr):
        """[G] -> [C]: each group's value repeated over its CG channels."""
        return tl.reshape(tl.broadcast_to(v[:, None], (G, CG)), (G * CG,))

    @triton.jit
    def _group_sum(v, G: tl.constexpr, CG: tl.constexpr):
        """[C] -> [G]: sum over each group's channels."""
        return tl.sum(tl.reshape(v, (G, CG)), axis=1)

    @triton.jit
    def _band_totals(part_ptr, b, NCH, NCH_P2: tl.constexpr, G: tl.constexpr, which: tl.constexpr):
        """Sum over the bands of batch element b of partial sums part[b, band, which, :] (fixed order)."""
        bands = tl.arange(0, NCH_P2)
        gi = tl.arange(0, G)
        ptrs = part_ptr + ((b * NCH + bands[:, None]) * 2 + which) * G + gi[None, :]
        return tl.sum(tl.load(ptrs, mask=bands[:, None] < NCH, other=0.0), axis=0)

    @triton.jit
    def _group_norm_fwd_stats(x_ptr, part_ptr, R, ROWS, NCH, C: tl.constexpr, G: tl.constexpr,
                              BLOCK_R: tl.constexpr):
        b = tl.program_id(0)
        band = tl.program_id(1)
        CG: tl.constexpr = C // G
        cols = tl.arange(0, C)
        base = x_ptr + b.to(tl.int64) * R * C
        shift = _channel_of_group(_group_sum(tl.load(base + cols).to(tl.float32), G, CG) / CG, G, CG)
        acc1 = tl.zeros((BLOCK_R, C), tl.float32)
        acc2 = tl.zeros((BLOCK_R, C), tl.float32)
        start = band * ROWS
        for r0 in range(0, ROWS, BLOCK_R):
            rows = start + r0 + tl.arange(0, BLOCK_R)
            m = rows < R
            v = tl.load(base + rows[:, None].to(tl.int64) * C + cols[None, :], mask=m[:, None], other=0.0)
            d = tl.where(m[:, None], v.to(tl.float32) - shift[None, :], 0.0)
            acc1 += d
            acc2 += d * d
        gi = tl.arange(0, G)
        out = part_ptr + (b * NCH + band) * 2 * G + gi
        tl.store(out, _group_sum(tl.sum(acc1, axis=0), G, CG))
        tl.store(out + G, _group_sum(tl.sum(acc2, axis=0), G, CG))

    @triton.jit
    def _group_norm_fwd_apply(x_ptr, y_ptr, part_ptr, w_ptr, bias_ptr, mean_ptr, rstd_ptr, R, ROWS, NCH, eps,
                              C: tl.constexpr, G: tl.constexpr, NCH_P2: tl.constexpr, BLOCK_R: tl.constexpr,
                              SILU: tl.constexpr):
        b = tl.program_id(0)
        band = tl.program_id(1)
        CG: tl.constexpr = C // G
        cols = tl.arange(0, C)
        gi = tl.arange(0, G)
        base = x_ptr + b.to(tl.int64) * R * C
        shift_g = _group_sum(tl.load(base + cols).to(tl.float32), G, CG) / CG
        n = (R * CG).to(tl.float32)
        m1 = _band_totals(part_ptr, b, NCH, NCH_P2, G, 0) / n
        var = tl.maximum(_band_totals(part_ptr, b, NCH, NCH_P2, G, 1) / n - m1 * m1, 0.0)
        mean_g = shift_g + m1
        rstd_g = 1.0 / tl.sqrt(var + eps)
        first = (gi * 0 + band) == 0
        tl.store(mean_ptr + b * G + gi, mean_g, mask=first)
        tl.store(rstd_ptr + b * G + gi, rstd_g, mask=first)
        a = _channel_of_group(rstd_g, G, CG) * tl.load(w_ptr + cols)
        s = tl.load(bias_ptr + cols) - _channel_of_group(mean_g, G, CG) * a
        ybase = y_ptr + b.to(tl.int64) * R * C
        start = band * ROWS
        for r0 in range(0, ROWS, BLOCK_R):
            rows = start + r0 + tl.arange(0, BLOCK_R)
            m = rows[:, None] < R
            offs = rows[:, None].to(tl.int64) * C + cols[None, :]
            v = tl.load(base + offs, mask=m, other=0.0).to(tl.float32)
            t = v * a[None, :] + s[None, :]
            if SILU:
                t = t * tl.sigmoid(t)
            tl.store(ybase + offs, t.to(y_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _bwd_channel_consts(mean_ptr, rstd_ptr, w_ptr, bias_ptr, b, C: tl.constexpr, G: tl.constexpr):
        """Per channel: the group's mean and rstd, γ, β."""
        CG: tl.constexpr = C // G
        cols = tl.arange(0, C)
        gi = tl.arange(0, G)
        mean = _channel_of_group(tl.load(mean_ptr + b * G + gi), G, CG)
        rstd = _channel_of_group(tl.load(rstd_ptr + b * G + gi), G, CG)
        return mean, rstd, tl.load(w_ptr + cols), tl.load(bias_ptr + cols)

    @triton.jit
    def _bwd_tile(dy_ptr, x_ptr, offs, m, mean, rstd, w, bias, SILU: tl.constexpr):
        """(x̂, dt) of one tile: the normalised input and dy through the SiLU (zero outside the rows)."""
        xh = (tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32) - mean[None, :]) * rstd[None, :]
        dt = tl.load(dy_ptr + offs, mask=m, other=0.0).to(tl.float32)
        if SILU:
            t = xh * w[None, :] + bias[None, :]
            sg = tl.sigmoid(t)
            dt = dt * (sg * (1.0 + t * (1.0 - sg)))
        return xh, tl.where(m, dt, 0.0)

    @triton.jit
    def _group_norm_bwd_sums(dy_ptr, x_ptr, mean_ptr, rstd_ptr, w_ptr, bias_ptr, part_ptr, cpart_ptr, R, ROWS, NCH,
                             C: tl.constexpr, G: tl.constexpr, BLOCK_R: tl.constexpr, SILU: tl.constexpr,
                             WGRAD: tl.constexpr):
        b = tl.program_id(0)
        band = tl.program_id(1)
        CG: tl.constexpr = C // G
        cols = tl.arange(0, C)
        gi = tl.arange(0, G)
        mean, rstd, w, bias = _bwd_channel_consts(mean_ptr, rstd_ptr, w_ptr, bias_ptr, b, C, G)
        off_b = b.to(tl.int64) * R * C
        acc1 = tl.zeros((BLOCK_R, C), tl.float32)
        acc2 = tl.zeros((BLOCK_R, C), tl.float32)
        start = band * ROWS
        for r0 in range(0, ROWS, BLOCK_R):
            rows = start + r0 + tl.arange(0, BLOCK_R)
            offs = off_b + rows[:, None].to(tl.int64) * C + cols[None, :]
            xh, dt = _bwd_tile(dy_ptr, x_ptr, offs, rows[:, None] < R, mean, rstd, w, bias, SILU)
            acc1 += dt
            acc2 += dt * xh
        c1 = tl.sum(acc1, axis=0)
        c2 = tl.sum(acc2, axis=0)
        out = part_ptr + (b * NCH + band) * 2 * G + gi
        tl.store(out, _group_sum(c1 * w, G, CG))
        tl.store(out + G, _group_sum(c2 * w, G, CG))
        if WGRAD:
            cout = cpart_ptr + (b * NCH + band) * 2 * C + cols
            tl.store(cout, c1)
            tl.store(cout + C, c2)

    @triton.jit
    def _group_norm_bwd_dx(dy_ptr, x_ptr, dx_ptr, mean_ptr, rstd_ptr, w_ptr, bias_ptr, part_ptr, R, ROWS, NCH,
                           C: tl.constexpr, G: tl.constexpr, NCH_P2: tl.constexpr, BLOCK_R: tl.constexpr,
                           SILU: tl.constexpr):
        b = tl.program_id(0)
        band = tl.program_id(1)
        CG: tl.constexpr = C // G
        cols = tl.arange(0, C)
        gi = tl.arange(0, G)
        n = (R * CG).to(tl.float32)
        rstd_g = tl.load(rstd_ptr + b * G + gi)
        k1 = _channel_of_group(rstd_g * _band_totals(part_ptr, b, NCH, NCH_P2, G, 0) / n, G, CG)
        k2 = _channel_of_group(rstd_g * _band_totals(part_ptr, b, NCH, NCH_P2, G, 1) / n, G, CG)
        mean, rstd, w, bias = _bwd_channel_consts(mean_ptr, rstd_ptr, w_ptr, bias_ptr, b, C, G)
        rw = rstd * w
        off_b = b.to(tl.int64) * R * C
        start = band * ROWS
        for r0 in range(0, ROWS, BLOCK_R):
            rows = start + r0 + tl.arange(0, BLOCK_R)
            m = rows[:, None] < R
            offs = off_b + rows[:, None].to(tl.int64) * C + cols[None, :]
            xh, dt = _bwd_tile(dy_ptr, x_ptr, offs, m, mean, rstd, w, bias, SILU)
            dx = dt * rw[None, :] - k1[None, :] - xh * k2[None, :]
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=m)


def _bands(b: int, r: int, c: int, tile: int) -> Tuple[int, int, int]:
    """(rows per tile, rows per program, programs per batch element): about TUNING['programs']
    programs in all, each a whole number of tiles; at most 256 per batch element, so that the partial
    sums each program adds up (bands × groups) stay a small register tile."""
    block_r = max(1, min(tile // c, triton.next_power_of_2(r)))
    per_batch = max(1, min(256, TUNING["programs"] // b))
    rows = triton.cdiv(triton.cdiv(r, per_batch), block_r) * block_r
    return block_r, rows, triton.cdiv(r, rows)


def _affine(weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], c: int, like: torch.Tensor):
    w = weight.float().contiguous() if weight is not None else like.new_ones(c, dtype=torch.float32)
    b = bias.float().contiguous() if bias is not None else like.new_zeros(c, dtype=torch.float32)
    return w, b


def _chunks(bsz: int):
    """Batch elements per launch pair: all, or TUNING['batch_chunk'] at a time so that the second kernel
    of a direction re-reads what the first just read while it is still in L2 (50 MB on an H100)."""
    step = TUNING["batch_chunk"] or bsz
    return [(b0, min(bsz, b0 + step)) for b0 in range(0, bsz, step)]


def _fwd_triton(x, weight, bias, g, eps, silu):
    bsz, r, c = x.shape
    w, bb = _affine(weight, bias, c, x)
    mean = x.new_empty((bsz, g), dtype=torch.float32)
    rstd = torch.empty_like(mean)
    y = torch.empty_like(x)
    for b0, b1 in _chunks(bsz):
        n = b1 - b0
        block_r, rows, nch = _bands(n, r, c, TUNING["fwd_tile"])
        part = x.new_empty((n, nch, 2, g), dtype=torch.float32)
        nw = TUNING["fwd_warps"] if block_r * c >= 4096 else 4
        xs = x[b0:b1]
        _group_norm_fwd_stats[(n, nch)](xs, part, r, rows, nch, C=c, G=g, BLOCK_R=block_r, num_warps=nw)
        _group_norm_fwd_apply[(n, nch)](xs, y[b0:b1], part, w, bb, mean[b0:b1], rstd[b0:b1], r, rows, nch, eps,
                                        C=c, G=g, NCH_P2=triton.next_power_of_2(nch), BLOCK_R=block_r, SILU=silu,
                                        num_warps=nw)
    return y, mean, rstd


def _bwd_triton(dy, x, mean, rstd, weight, bias, g, silu, wgrad):
    bsz, r, c = x.shape
    w, bb = _affine(weight, bias, c, x)
    dx = torch.empty_like(x)
    dw = torch.zeros(c if wgrad else 0, device=x.device, dtype=torch.float32)
    db = torch.zeros_like(dw)
    for b0, b1 in _chunks(bsz):
        n = b1 - b0
        block_r, rows, nch = _bands(n, r, c, TUNING["bwd_tile"])
        part = x.new_empty((n, nch, 2, g), dtype=torch.float32)
        cpart = x.new_empty((n, nch, 2, c) if wgrad else (1,), dtype=torch.float32)
        nw = TUNING["bwd_warps"] if block_r * c >= 4096 else 4
        xs, dys, ms, rs = x[b0:b1], dy[b0:b1], mean[b0:b1], rstd[b0:b1]
        _group_norm_bwd_sums[(n, nch)](dys, xs, ms, rs, w, bb, part, cpart, r, rows, nch, C=c, G=g, BLOCK_R=block_r,
                                       SILU=silu, WGRAD=wgrad, num_warps=nw)
        _group_norm_bwd_dx[(n, nch)](dys, xs, dx[b0:b1], ms, rs, w, bb, part, r, rows, nch, C=c, G=g,
                                     NCH_P2=triton.next_power_of_2(nch), BLOCK_R=block_r, SILU=silu, num_warps=nw)
        if wgrad:  # dγ = Σ dt·x̂, dβ = Σ dt
            dw += cpart[:, :, 1].sum(dim=(0, 1))
            db += cpart[:, :, 0].sum(dim=(0, 1))
    return dx, dw, db


def _fwd_reference(x, weight, bias, g, eps, silu):
    """The same statistics as the kernels (fp32, biased variance), in PyTorch."""
    bsz, r, c = x.shape
    xf = x.float().view(bsz, r, g, c // g)
    mean = xf.mean(dim=(1, 3))
    rstd = torch.rsqrt(xf.sub(mean[:, None, :, None]).square().mean(dim=(1, 3)) + eps)
    w, bb = _affine(weight, bias, c, x)
    y = ((xf - mean[:, None, :, None]) * rstd[:, None, :, None]).reshape(bsz, r, c) * w + bb
    if silu:
        y = F.silu(y)
    return y.to(x.dtype), mean, rstd


def _bwd_reference(dy, x, mean, rstd, weight, bias, g, silu, wgrad):
    bsz, r, c = x.shape
    w, bb = _affine(weight, bias, c, x)
    xh = ((x.float().view(bsz, r, g, c // g) - mean[:, None, :, None]) * rstd[:, None, :, None]).reshape(bsz, r, c)
    dt = dy.float()
    if silu:
        t = xh * w + bb
        s = torch.sigmoid(t)
        dt = dt * (s * (1 + t * (1 - s)))
    dxh = (dt * w).view(bsz, r, g, c // g)
    xg = xh.view(bsz, r, g, c // g)
    k1 = dxh.mean(dim=(1, 3), keepdim=True)
    k2 = (dxh * xg).mean(dim=(1, 3), keepdim=True)
    dx = (rstd[:, None, :, None] * (dxh - k1 - xg * k2)).reshape(bsz, r, c).to(x.dtype)
    if wgrad:
        return dx, (dt * xh).sum(dim=(0, 1)), dt.sum(dim=(0, 1))
    return dx, x.new_empty(0, dtype=torch.float32), x.new_empty(0, dtype=torch.float32)


def _use_kernels(x: torch.Tensor) -> bool:
    return triton is not None and (x.is_cuda or _interpret())


@torch.library.custom_op("latentdaps::group_norm_act_rows", mutates_args=())
def group_norm_act_rows(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                        num_groups: int, eps: float, silu: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GroupNorm (+ SiLU) of a (B, R, C) contiguous tensor (rows of channels): (y, mean, rstd)."""
    fn = _fwd_triton if _use_kernels(x) else _fwd_reference
    return fn(x, weight, bias, num_groups, eps, silu)


@group_norm_act_rows.register_fake
def _(x, weight, bias, num_groups, eps, silu):
    stats = x.new_empty((x.shape[0], num_groups), dtype=torch.float32)
    return torch.empty_like(x), stats, torch.empty_like(stats)


@torch.library.custom_op("latentdaps::group_norm_act_rows_backward", mutates_args=())
def group_norm_act_rows_backward(dy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                                 weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], num_groups: int,
                                 silu: bool, wgrad: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dγ, dβ); dγ and dβ are empty unless `wgrad`."""
    dy = dy.contiguous()
    fn = _bwd_triton if _use_kernels(x) else _bwd_reference
    return fn(dy, x, mean, rstd, weight, bias, num_groups, silu, wgrad)


@group_norm_act_rows_backward.register_fake
def _(dy, x, mean, rstd, weight, bias, num_groups, silu, wgrad):
    n = x.shape[2] if wgrad else 0
    return torch.empty_like(x), x.new_empty(n, dtype=torch.float32), x.new_empty(n, dtype=torch.float32)


def _setup(ctx, inputs, output) -> None:
    x, weight, bias, num_groups, _eps, silu = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, mean, rstd, weight, bias)
    ctx.num_groups, ctx.silu = num_groups, silu


def _backward(ctx, dy, _dmean, _drstd):
    x, mean, rstd, weight, bias = ctx.saved_tensors
    wgrad = bool(ctx.needs_input_grad[1] or ctx.needs_input_grad[2])
    dx, dw, db = group_norm_act_rows_backward(dy, x, mean, rstd, weight, bias, ctx.num_groups, ctx.silu, wgrad)
    dw = dw.to(weight.dtype) if ctx.needs_input_grad[1] else None
    db = db.to(bias.dtype) if ctx.needs_input_grad[2] else None
    return dx, dw, db, None, None, None


group_norm_act_rows.register_autograd(_backward, setup_context=_setup)


def group_norm_act(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                   eps: float, silu: bool = False) -> torch.Tensor:
    """F.group_norm (then SiLU when `silu`) of a (B, C, *spatial) tensor with channels innermost in
    memory (channels_last), through the fused kernels; the output has the input's layout and dtype."""
    bsz, c = x.shape[:2]
    rows = x.movedim(1, -1)
    y, _, _ = group_norm_act_rows(rows.reshape(bsz, -1, c), weight, bias, num_groups, float(eps), bool(silu))
    return y.view(rows.shape).movedim(-1, 1)


def _norm_forward(mod: torch.nn.GroupNorm, silu: bool):
    def forward(x: torch.Tensor) -> torch.Tensor:
        if layout_supported(x, mod.num_groups):
            return group_norm_act(x, mod.num_groups, mod.weight, mod.bias, mod.eps, silu)
        y = F.group_norm(x, mod.num_groups, mod.weight, mod.bias, mod.eps)
        return F.silu(y) if silu else y

    return forward


def install_triton_group_norm(root: torch.nn.Module) -> Tuple[List[torch.nn.Module], List[tuple]]:
    """Shadow `forward` of every GroupNorm under `root` with the fused kernels, and fold the SiLU that
    follows a norm into it where the library applies one right after (diffusers ResnetBlock2D without
    a time embedding: norm1 → SiLU, norm2 → SiLU; the VAE/VQ Decoder: conv_norm_out → conv_act).
    Returns (patched modules, [(parent, attribute, module it replaced)]) for restore."""
    fused, swapped = set(), []
    for mod in root.modules():
        norms = []
        act_name = None
        if all(hasattr(mod, a) for a in ("norm1", "norm2", "nonlinearity", "time_emb_proj")) \
                and mod.time_emb_proj is None and isinstance(mod.nonlinearity, torch.nn.SiLU) \
                and isinstance(mod.norm1, torch.nn.GroupNorm) and isinstance(mod.norm2, torch.nn.GroupNorm) \
                and type(mod).__name__ == "ResnetBlock2D":
            norms, act_name = [mod.norm1, mod.norm2], "nonlinearity"
        elif isinstance(getattr(mod, "conv_norm_out", None), torch.nn.GroupNorm) \
                and isinstance(getattr(mod, "conv_act", None), torch.nn.SiLU) and type(mod).__name__ == "Decoder":
            norms, act_name = [mod.conv_norm_out], "conv_act"
        if norms:
            swapped.append((mod, act_name, getattr(mod, act_name)))
            mod._modules[act_name] = torch.nn.Identity()
            fused.update(id(n) for n in norms)
    done = []
    for mod in root.modules():
        if isinstance(mod, torch.nn.GroupNorm):
            mod.forward = _norm_forward(mod, id(mod) in fused)
            done.append(mod)
    return done, swapped
