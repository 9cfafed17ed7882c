"""cores/triton_group_norm.py: the fused NHWC GroupNorm(+SiLU) op against torch.nn.GroupNorm (+ SiLU).

Three paths are bounded:
* the op's PyTorch reference path (what CPU runs), fp32: ≤ 1e-5 relative to the library in value,
  input gradient and weight/bias gradients, on random shapes (3-D and 4-D, odd row counts);
* the Triton kernels themselves on CPU through Triton's interpreter (a subprocess with
  TRITON_INTERPRET=1): same bounds, bf16 within bf16 rounding;
* the kernels on a CUDA device (skipped without one): decoder shapes against float64, bf16, bit-identical
  reruns, and the op inside torch.compile with CUDA graphs.
On the tiny fixture LDM the switch (SiLU folded into the norms) keeps decode ≤ 1e-5 and its gradient
≤ 1e-4 relative, and restore() gives back the library's modules bit for bit."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from cores.speed import SpeedConfig, apply_speed
from cores.triton_group_norm import group_norm_act, install_triton_group_norm, layout_supported

from conftest import ROOT, needs_triton_interpreter
from test_decoder_ops import _decode_and_grad, tiny_ldm  # noqa: F401  (the fixture LDM and its decode + gradient)

# (B, C, *spatial), groups: the decoder's 128..512 channels in miniature, a 3-D (B, C, N) input as the
# attention's norm sees it, rows that are no multiple of a tile, one channel per group (tiny fixture)
SHAPES = [((2, 64, 9, 7), 32), ((3, 128, 5, 4), 32), ((2, 32, 6, 6), 32), ((1, 16, 3, 3), 4),
          ((2, 256, 11), 32)]


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max())


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.movedim(1, -1).contiguous().movedim(-1, 1)


def _compare(shape, groups, silu, dtype=torch.float32, device="cpu", seed=0):
    """Relative errors of (y, dx, dγ, dβ) of the op against F.group_norm (+ SiLU) in float64."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 3 + 2).to(device=device, dtype=dtype)
    x = _channels_last(x).requires_grad_(True)
    w = torch.randn(shape[1], generator=g).to(device).requires_grad_(True)
    b = torch.randn(shape[1], generator=g).to(device).requires_grad_(True)
    up = torch.randn(shape, generator=g).to(device)
    y = group_norm_act(x, groups, w, b, 1e-6, silu)
    grads = torch.autograd.grad((y.float() * up).sum(), (x, w, b))
    x64, w64, b64 = (t.detach().double().requires_grad_(True) for t in (x, w, b))
    ref = F.group_norm(x64, groups, w64, b64, 1e-6)
    ref = F.silu(ref) if silu else ref
    refs = torch.autograd.grad((ref * up.double()).sum(), (x64, w64, b64))
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last) if x.ndim == 4 else True
    return [_rel(y, ref)] + [_rel(a, r) for a, r in zip(grads, refs)]


@pytest.mark.parametrize("shape,groups", SHAPES)
@pytest.mark.parametrize("silu", [False, True])
def test_reference_path_matches_the_library(shape, groups, silu):
    assert layout_supported(_channels_last(torch.randn(shape)), groups)
    for err in _compare(shape, groups, silu):
        assert err < 1e-5


def test_a_wrong_kernel_would_fail():
    """The bound can tell a wrong normalisation apart (e.g. one group's statistics over all channels)."""
    x = _channels_last(torch.randn(2, 64, 5, 5) * 3 + 2)
    assert _rel(group_norm_act(x, 32, None, None, 1e-6), F.group_norm(x, 1, None, None, 1e-6)) > 1e-2


def test_layouts_the_kernels_cannot_take_are_refused():
    assert not layout_supported(torch.randn(2, 64, 5, 5), 32)  # NCHW
    assert not layout_supported(_channels_last(torch.randn(2, 96, 5, 5)), 32)  # C not a power of 2
    assert not layout_supported(_channels_last(torch.randn(2, 64, 5, 5)).double(), 32)


_INTERPRETED = r"""
import json, sys, torch
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
from tests.test_triton_group_norm import _compare, SHAPES
out = {}
for i, (shape, groups) in enumerate(SHAPES[:4]):
    out[f"fp32 {shape} silu"] = _compare(shape, groups, True, seed=i)
out["fp32 (2, 64, 9, 7) no act"] = _compare((2, 64, 9, 7), 32, False)
out["bf16 (2, 128, 6, 5) silu"] = _compare((2, 128, 6, 5), 32, True, dtype=torch.bfloat16)
import cores.triton_group_norm as m
m.TUNING["programs"] = 3  # several bands per batch element, a partial last band
out["fp32 (2, 64, 9, 7) 3 bands"] = _compare((2, 64, 9, 7), 32, True)
m.TUNING["batch_chunk"] = 2  # launches over batch chunks (2 + 1 elements)
out["fp32 (3, 64, 5, 7) chunks"] = _compare((3, 64, 5, 7), 32, True)
print(json.dumps(out))
"""


@needs_triton_interpreter
def test_triton_kernels_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", _INTERPRETED, str(ROOT)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    errs = json.loads(res.stdout.strip().splitlines()[-1])
    for name, e in errs.items():
        bound = 1e-2 if name.startswith("bf16") else 1e-5  # bf16 output: rounding ≈ 2⁻⁸ of the max
        assert max(e) < bound, (name, e)


def test_switch_on_the_fixture_decoder(tiny_ldm):
    x0, g0 = _decode_and_grad(tiny_ldm)
    silus = [m for m in tiny_ldm.vq.decoder.modules() if isinstance(m, torch.nn.SiLU)]
    h = apply_speed(tiny_ldm, SpeedConfig(channels_last=True, triton_group_norm=True))
    norms = [m for m in tiny_ldm.vq.decoder.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(h._patched) == len(norms) > 0 and len(h._swapped) >= 3  # 2+ resnets and the output norm
    assert not any(isinstance(m, torch.nn.SiLU) for m in tiny_ldm.vq.decoder.modules())
    x, g = _decode_and_grad(tiny_ldm)
    h.restore()
    assert _rel(x, x0) < 1e-5 and _rel(g, g0) < 1e-4
    assert not any("forward" in m.__dict__ for m in tiny_ldm.vq.decoder.modules())
    assert [m for m in tiny_ldm.vq.decoder.modules() if isinstance(m, torch.nn.SiLU)] == silus
    x1, g1 = _decode_and_grad(tiny_ldm)
    assert torch.equal(x1, x0) and torch.equal(g1, g0)


def test_switch_needs_channels_last_and_a_boolean():
    from cores.speed import speed_config

    with pytest.raises(ValueError, match="speed.triton_group_norm=true .* needs speed.channels_last=true"):
        SpeedConfig(triton_group_norm=True)
    with pytest.raises(ValueError, match="speed.triton_group_norm=yes: expected true or false"):
        speed_config({"channels_last": True, "triton_group_norm": "yes"})


def test_norms_with_an_nchw_input_run_the_library_and_keep_the_silu():
    block = torch.nn.Sequential(torch.nn.GroupNorm(4, 8))
    x = torch.randn(2, 8, 5, 5)
    ref = block(x)
    install_triton_group_norm(block)
    assert torch.equal(block(x), ref)


def test_op_traces_under_compile():
    x = _channels_last(torch.randn(2, 32, 6, 6)).requires_grad_(True)
    w = torch.randn(32)
    fn = torch.compile(lambda t: group_norm_act(t, 8, w, None, 1e-6, True).square().sum(), backend="aot_eager",
                       fullgraph=True)
    (ga,) = torch.autograd.grad(fn(x), x)
    (ra,) = torch.autograd.grad(F.silu(F.group_norm(x, 8, w, None, 1e-6)).square().sum(), x)
    assert _rel(ga, ra) < 1e-5


# ---- on the device (skipped without CUDA) -------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DECODER_SHAPES = [((2, 512, 64, 64), 32), ((2, 256, 128, 128), 32), ((1, 128, 256, 256), 32), ((2, 512, 4096), 32)]


@cuda
@pytest.mark.parametrize("shape,groups", DECODER_SHAPES)
def test_cuda_kernels_on_decoder_shapes(shape, groups):
    for err in _compare(shape, groups, True, device="cuda"):
        assert err < 1e-5
    for err in _compare(shape, groups, True, dtype=torch.bfloat16, device="cuda"):
        assert err < 1e-2


@cuda
def test_cuda_kernels_are_deterministic_and_fill_every_element():
    x = _channels_last(torch.randn(4, 256, 128, 128, device="cuda") * 2 + 1).requires_grad_(True)
    w, b = torch.randn(256, device="cuda"), torch.randn(256, device="cuda")
    up = torch.randn_like(x)
    outs = []
    for _ in range(2):
        y = group_norm_act(x, 32, w, b, 1e-6, True)
        (dx,) = torch.autograd.grad((y * up).sum(), x)
        outs.append((y, dx))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert torch.isfinite(outs[0][0]).all() and torch.isfinite(outs[0][1]).all()


@cuda
def test_cuda_op_inside_compile_with_cuda_graphs():
    x = _channels_last(torch.randn(2, 128, 32, 32, device="cuda")).requires_grad_(True)
    w = torch.randn(128, device="cuda")

    def f(t):
        return group_norm_act(t, 32, w, None, 1e-6, True).square().sum()

    fn = torch.compile(f, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        (ga,) = torch.autograd.grad(fn(x), x)
    (ra,) = torch.autograd.grad(F.silu(F.group_norm(x.double(), 32, w.double(), None, 1e-6)).square().sum(), x)
    assert _rel(ga, ra) < 1e-5
