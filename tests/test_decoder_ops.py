"""cores/decoder_ops.py: the split-TF32 matmul and attention, and the NHWC group norm, against
the library ops they replace (CPU, fp32; float64 where the claim is about accuracy).

Bounds: split_tf32_bmm ≤ 2e-6 relative to float64 (fp32-level; one TF32 pass is ≈ 1e-3); the
attention processor and the NHWC group norm ≤ 1e-5 relative to the library's modules (same math,
other summation order); on the tiny fixture LDM the decode ≤ 1e-5 and its gradient ≤ 1e-4
relative (as the other fp32 switches in tests/test_speed.py); restore() gives back the exact
path bit for bit."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import yaml

from cores.decoder_ops import (SplitTF32AttnProcessor, _ChannelsLastGrad, group_norm_nhwc, install_nhwc_conv_layout,
                               install_nhwc_group_norm,
                               split_tf32, split_tf32_bmm)
from cores.operators import get_operator
from cores.speed import SpeedConfig, apply_speed

from conftest import FIXTURES, needs_triton_interpreter


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max())


def test_split_is_exact_and_hi_is_tf32():
    x = torch.randn(1000) * torch.logspace(-20, 20, 1000)
    hi, lo = split_tf32(x)
    assert torch.equal(hi + lo, x)
    assert ((hi.view(torch.int32) & 0x1FFF) == 0).all()  # hi passes a TF32 matmul unrounded
    assert (lo.abs() <= x.abs() * 2.0 ** -10).all()


def test_split_tf32_bmm_is_fp32_accurate_with_gradients():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 17, 64, generator=g, requires_grad=True)
    b = torch.randn(3, 64, 9, generator=g, requires_grad=True)
    out = split_tf32_bmm(a, b)
    ref = torch.bmm(a.double(), b.double())
    assert _rel(out, ref) < 2e-6
    w = torch.randn(out.shape, generator=g)
    ga, gb = torch.autograd.grad((out * w).sum(), (a, b))
    a64, b64 = a.detach().double().requires_grad_(True), b.detach().double().requires_grad_(True)
    ra, rb = torch.autograd.grad((torch.bmm(a64, b64) * w.double()).sum(), (a64, b64))
    assert _rel(ga, ra) < 2e-6 and _rel(gb, rb) < 2e-6
    # truncating both operands to TF32 instead (one pass) is far off: the test can tell them apart
    one_pass = torch.bmm(split_tf32(a.detach())[0], split_tf32(b.detach())[0])
    assert _rel(one_pass, ref) > 1e-4


def test_split_tf32_bmm_traces_under_compile():
    """An opaque custom op with a fake kernel: Dynamo/AOT autograd trace through it."""
    a, b = torch.randn(2, 5, 8, requires_grad=True), torch.randn(2, 8, 3)
    fn = torch.compile(lambda a, b: split_tf32_bmm(a, b).square().sum(), backend="aot_eager", fullgraph=True)
    (ga,) = torch.autograd.grad(fn(a, b), a)
    (ra,) = torch.autograd.grad(torch.bmm(a, b).square().sum(), a)
    torch.testing.assert_close(ga, ra, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_ldm():
    from cores.models.ldm import build_ldm

    cfg = {"name": "ldm", "ldm_config": yaml.safe_load((FIXTURES / "ldm_tiny_ffhq.yaml").read_text()),
           "diffusion_path": str(FIXTURES / "ldm_tiny_ffhq.pt")}
    return build_ldm(cfg, "cpu")


def _decode_and_grad(model):
    g = torch.Generator().manual_seed(0)
    z = torch.randn((2, *model.get_in_shape()), generator=g).requires_grad_(True)
    op = get_operator("phase_retrieval", resolution=64)
    y = op(torch.rand(2, 3, 64, 64, generator=g) * 2 - 1)
    x = model.decode(z)
    (grad,) = torch.autograd.grad(op.loss(x, y).sum(), z)
    return x.detach(), grad


def test_processor_matches_the_library_attention(tiny_ldm):
    from diffusers.models.attention_processor import Attention

    attn = next(m for m in tiny_ldm.vq.decoder.modules() if isinstance(m, Attention))
    x = torch.randn(2, attn.to_q.in_features, 8, 8)
    ref = attn(x)
    before = attn.processor
    attn.set_processor(SplitTF32AttnProcessor())
    try:
        out = attn(x)
    finally:
        attn.set_processor(before)
    assert _rel(out, ref) < 1e-5 and not torch.equal(out, x)


def test_split_tf32_switch_on_the_fixture_decoder(tiny_ldm):
    x0, g0 = _decode_and_grad(tiny_ldm)
    h = apply_speed(tiny_ldm, SpeedConfig(attention="split_tf32"))
    assert any(isinstance(m.processor, SplitTF32AttnProcessor) for m in h._processors)
    x, g = _decode_and_grad(tiny_ldm)
    h.restore()
    assert _rel(x, x0) < 1e-5 and _rel(g, g0) < 1e-4
    assert not any(isinstance(getattr(m, "processor", None), SplitTF32AttnProcessor)
                   for m in tiny_ldm.vq.decoder.modules())
    x1, g1 = _decode_and_grad(tiny_ldm)
    assert torch.equal(x1, x0) and torch.equal(g1, g0)


@pytest.mark.parametrize("shape,groups", [((2, 64, 9, 7), 32), ((3, 96, 16, 16), 32), ((1, 12, 5, 5), 4)])
def test_group_norm_nhwc_matches_f_group_norm(shape, groups):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=g) * 3 + 1).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    w = torch.randn(shape[1], generator=g, requires_grad=True)
    b = torch.randn(shape[1], generator=g, requires_grad=True)
    up = torch.randn(shape, generator=g)
    y = group_norm_nhwc(x, groups, w, b, 1e-6)
    ref = F.group_norm(x, groups, w, b, 1e-6)
    assert _rel(y, ref) < 1e-5
    grads = torch.autograd.grad((F.silu(y) * up).sum(), (x, w, b))
    refs = torch.autograd.grad((F.silu(ref) * up).sum(), (x, w, b))
    for a, r in zip(grads, refs):
        assert _rel(a, r) < 1e-5


@pytest.mark.parametrize("switches,patched_type,least", [
    (dict(nhwc_group_norm=True), torch.nn.GroupNorm, 1),
    (dict(nhwc_group_norm=True, nhwc_conv_layout=True), torch.nn.Conv2d, 10)])
def test_nhwc_switches_on_the_fixture_decoder(tiny_ldm, switches, patched_type, least):
    """Same values up to summation order; `restore()` gives back the library's modules, bit for bit."""
    x0, g0 = _decode_and_grad(tiny_ldm)
    h = apply_speed(tiny_ldm, SpeedConfig(channels_last=True, **switches))
    assert sum(isinstance(m, patched_type) for m in h._patched) >= least
    x, g = _decode_and_grad(tiny_ldm)
    h.restore()
    assert _rel(x, x0) < 1e-5 and _rel(g, g0) < 1e-4
    assert not any("forward" in m.__dict__ for m in tiny_ldm.vq.decoder.modules())
    x1, g1 = _decode_and_grad(tiny_ldm)
    assert torch.equal(x1, x0) and torch.equal(g1, g0)


@pytest.mark.parametrize("switch", ["nhwc_group_norm", "nhwc_conv_layout"])
def test_nhwc_switches_without_channels_last_are_refused(switch):
    with pytest.raises(ValueError, match=f"speed.{switch}=true .* needs speed.channels_last=true"):
        SpeedConfig(**{switch: True})


def test_nhwc_group_norm_leaves_nchw_inputs_to_the_library():
    gn = torch.nn.GroupNorm(4, 8)
    x = torch.randn(2, 8, 5, 5)
    ref = gn(x)
    install_nhwc_group_norm(gn)
    assert torch.equal(gn(x), ref)


def test_channels_last_grad_is_identity_with_a_channels_last_gradient():
    y = torch.randn(2, 6, 5, 4, requires_grad=True)
    out = _ChannelsLastGrad.apply(y)
    assert torch.equal(out, y)
    up = torch.randn(2, 6, 5, 4)  # NCHW gradient coming back
    (g,) = torch.autograd.grad(out, y, up)
    assert torch.equal(g, up) and g.is_contiguous(memory_format=torch.channels_last) and not g.is_contiguous()


def test_nhwc_conv_layout_keeps_values_and_gradients():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(8, 3, 1))
    net.to(memory_format=torch.channels_last)
    x = torch.randn(2, 4, 9, 7).contiguous(memory_format=torch.channels_last).requires_grad_(True)

    def run():
        y = net(x)
        return y, torch.autograd.grad(y.square().sum(), x)[0]

    y0, g0 = run()
    patched = install_nhwc_conv_layout(net)
    assert len(patched) == 2
    y1, g1 = run()
    assert torch.equal(y1, y0) and _rel(g1, g0) < 1e-6
    for m in patched:
        m.__dict__.pop("forward")
    y2, g2 = run()
    assert torch.equal(y2, y0) and torch.equal(g2, g0)


def test_nhwc_conv_layout_traces_under_compile():
    conv = torch.nn.Conv2d(3, 5, 3, padding=1).to(memory_format=torch.channels_last)
    install_nhwc_conv_layout(conv)
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)

    def loss(z):
        return conv(z).square().sum()

    (g_ref,) = torch.autograd.grad(loss(x.requires_grad_(True)), x)
    fn = torch.compile(loss, backend="aot_eager", fullgraph=True)
    (g,) = torch.autograd.grad(fn(x), x)
    assert _rel(g, g_ref) < 1e-6



_BMM_INTERPRETED = r"""
import json, sys, torch
sys.path[:0] = [sys.argv[1]]
from cores.decoder_ops import split_tf32_bmm
g = torch.Generator().manual_seed(0)
out = {}
for name, a, b in (("plain", torch.randn(2, 70, 40, generator=g), torch.randn(2, 40, 50, generator=g)),
                   ("b transposed", torch.randn(2, 33, 48, generator=g), torch.randn(2, 21, 48, generator=g).transpose(1, 2)),
                   ("a transposed", torch.randn(1, 40, 130, generator=g).transpose(1, 2), torch.randn(1, 40, 9, generator=g))):
    ref = torch.bmm(a.double(), b.double())
    c = split_tf32_bmm(a, b)
    out[name] = [list(c.shape) == list(ref.shape), float((c - ref).abs().max() / ref.abs().max())]
print(json.dumps(out))
"""


@needs_triton_interpreter
def test_split_tf32_triton_kernel_under_the_interpreter():
    """The fused split-TF32 GEMM (the CUDA path) on CPU through Triton's interpreter: shapes that are
    no multiple of its tiles, operands read through transposed strides, every output element written."""
    import json
    import os
    import subprocess
    import sys

    from conftest import ROOT

    res = subprocess.run([sys.executable, "-c", _BMM_INTERPRETED, str(ROOT)], capture_output=True, text=True,
                         env=dict(os.environ, TRITON_INTERPRET="1"), timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    for name, (shape_ok, err) in json.loads(res.stdout.strip().splitlines()[-1]).items():
        assert shape_ok and err < 2e-6, (name, err)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_split_tf32_triton_kernel_on_the_device_is_fp32_accurate():
    """On the decoder's attention shapes: fp32-level error (one TF32 pass is ≈ 1e-3), through the
    transposed key operand, with gradients through the custom op."""
    import cores.decoder_ops as dops

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k = (torch.randn(2, 4096, 512, device="cuda", generator=g) for _ in range(2))
    assert dops.SPLIT_TF32_IMPL["cuda"] == "triton"
    s = split_tf32_bmm(q, k.transpose(1, 2))
    ref = torch.bmm(q.double(), k.double().transpose(1, 2))
    assert _rel(s, ref) < 1e-5
    p = torch.softmax(s[:, :, :1024] / 512 ** 0.5, dim=-1).requires_grad_(True)
    v = torch.randn(2, 1024, 512, device="cuda", generator=g, requires_grad=True)
    out = split_tf32_bmm(p, v)
    gp, gv = torch.autograd.grad(out.square().sum(), (p, v))
    p64, v64 = p.detach().double().requires_grad_(True), v.detach().double().requires_grad_(True)
    rp, rv = torch.autograd.grad(torch.bmm(p64, v64).square().sum(), (p64, v64))
    assert _rel(out, torch.bmm(p64, v64)) < 1e-5 and _rel(gp, rp) < 1e-5 and _rel(gv, rv) < 1e-5
