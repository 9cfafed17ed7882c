"""Speed switches give the exact path's results within stated tolerances (CPU), and the
benchmark runs in its tiny configuration.

Tolerances (CPU, float32 reference):
* cudnn_benchmark / tf32: no-ops on CPU → bit-identical (on GPU they change conv algorithms /
  matmul precision; the GPU agreement is measured by `scripts/benchmark.py --agreement`).
* channels_last: same math, other summation order → ≤ 1e-4 relative.
* compile: checked with the `aot_eager` backend (Dynamo tracing + AOT autograd, no code
  generation), because Inductor's C++ compile of even the tiny decoder takes minutes on two
  loaded cores; the Inductor path differs only in the kernels.  ≤ 1e-5 relative.
* fast_upsample: forward values identical to F.interpolate(nearest); ≤ 1e-5 relative after the
  convolutions.  compile + channels_last + fast_upsample: one graph serves batches of 4, 3 and 2
  rows and no-grad decodes (no recompile), ≤ 1e-4 relative.  A compile that fails gives one
  warning and exactly the exact path's results.
* bf16 (autocast around decoder body and UNet): one decode ≤ 5e-2 relative (max error over
  max output), decode gradient ≤ 1e-1 relative with cosine ≥ 0.99, denoiser ≤ 1e-2 relative;
  on the toy prior autocast has nothing to convert (no conv/matmul) → bit-identical.
"""
from __future__ import annotations

import math

import pytest
import torch
import yaml

import sampler as S
from cores.mcmc import MCMCConfig, data_gradient, run_mcmc
from cores.models import build_model
from cores.operators import get_operator
from cores.speed import SpeedConfig, apply_speed, speed_config

from conftest import FIXTURES, ROOT


@pytest.fixture(scope="module")
def tiny_ldm():
    from cores.models.ldm import build_ldm

    cfg = {"name": "ldm", "ldm_config": yaml.safe_load((FIXTURES / "ldm_tiny_ffhq.yaml").read_text()),
           "diffusion_path": str(FIXTURES / "ldm_tiny_ffhq.pt")}
    return build_ldm(cfg, "cpu")


@pytest.fixture(scope="module")
def toy():
    return build_model({"name": "toy", "prior_images": [str(ROOT / "dataset" / "demo-ffhq")], "std": 0.05}, "cpu")


def _probe(model, res: int, denoise: bool = True):
    """(decode(z), ∇_z L(decode(z), y) unclamped, D(z; 1), L) for one fixed latent."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn((1, *model.get_in_shape()), generator=g).requires_grad_(True)
    op = get_operator("phase_retrieval", resolution=res)
    y = op(torch.rand(1, 3, res, res, generator=g) * 2 - 1)
    x = model.decode(z)
    loss = op.loss(x, y)
    (grad,) = torch.autograd.grad(loss.sum(), z)
    with torch.no_grad():
        d = model.tweedie(z.detach(), torch.tensor(1.0)) if denoise else None
    return x.detach(), grad, d, loss.detach()


def _run(model, res: int, anneal: int, mcmc: int, particles: int = 2):
    op = get_operator("phase_retrieval", resolution=res)
    img = torch.nn.functional.interpolate(torch.rand(1, 3, res // 8, res // 8, generator=torch.Generator().manual_seed(1)),
                                          size=(res, res), mode="bilinear") * 2 - 1
    y = op.measure(img, torch.Generator().manual_seed(2))
    b = S.initial_batch(model, y, [0], particles, 42, 10.0, torch.device("cpu"))
    S.latent_daps(model, op, b, S.DAPSConfig.with_steps(anneal, mcmc=MCMCConfig(num_steps=mcmc)))
    return b.x


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _psnr_min(a, b):
    mse = (a - b).pow(2).flatten(1).mean(1)
    return min(float("inf") if m == 0 else 10 * math.log10(4 / m) for m in mse.tolist())


EXACT_ON_CPU = SpeedConfig(cudnn_benchmark=True, tf32=True)


@pytest.fixture(scope="module")
def ldm_ref(tiny_ldm):
    return _probe(tiny_ldm, 64)


def test_config_parsing_and_labels():
    assert speed_config(None).is_exact and speed_config({}).label() == "exact"
    s = speed_config({"precision": "bf16", "compile": True, "tf32": None})
    assert s.label() == "bf16+compile" and not s.is_exact
    with pytest.raises(ValueError, match="precision"):
        speed_config({"precision": "fp16"})
    with pytest.raises(ValueError, match="unknown"):
        speed_config(None, turbo=True)
    for key in ("compile", "deterministic", "nhwc_conv_layout", "tf32"):  # bool("no") would be True
        with pytest.raises(ValueError, match=f"speed.{key}=no: expected true or false"):
            speed_config({key: "no"})


def test_ldm_switches_single_calls(tiny_ldm, ldm_ref):
    x0, g0, d0, l0 = ldm_ref
    flags = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    h = apply_speed(tiny_ldm, EXACT_ON_CPU)
    assert torch.backends.cudnn.benchmark and torch.backends.cuda.matmul.allow_tf32
    x, g, d, loss = _probe(tiny_ldm, 64)
    h.restore()
    assert (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
            torch.backends.cuda.matmul.allow_tf32) == flags
    assert torch.equal(x, x0) and torch.equal(g, g0) and torch.equal(d, d0)
    h = apply_speed(tiny_ldm, SpeedConfig(channels_last=True))
    x, g, _, _ = _probe(tiny_ldm, 64, denoise=False)
    h.restore()
    assert _rel(x, x0) < 1e-4 and _rel(g, g0) < 1e-4
    h = apply_speed(tiny_ldm, SpeedConfig(precision="bf16"))
    assert "decode" in tiny_ldm.__dict__ and "eps_model" in tiny_ldm.__dict__
    x, g, d, loss = _probe(tiny_ldm, 64)
    h.restore()
    assert x.dtype == g.dtype == d.dtype == loss.dtype == torch.float32  # the sampler's math stays fp32
    assert 0 < _rel(x, x0) < 5e-2 and _rel(g, g0) < 1e-1 and 0 < _rel(d, d0) < 1e-2
    assert torch.nn.functional.cosine_similarity(g.flatten(1), g0.flatten(1)).min() > 0.99
    # restore() brings back the class methods: the exact path, bit for bit
    assert "decode" not in tiny_ldm.__dict__ and "eps_model" not in tiny_ldm.__dict__
    x, g, _, _ = _probe(tiny_ldm, 64, denoise=False)
    assert torch.equal(x, x0) and torch.equal(g, g0)


def test_math_attention_switch_matches(tiny_ldm, ldm_ref):
    """attention=math computes the decoder's mid-block attention with plain matmuls: same function."""
    x0, g0, _, _ = ldm_ref
    h = apply_speed(tiny_ldm, SpeedConfig(attention="math"))
    assert "decode" in tiny_ldm.__dict__
    x, g, _, _ = _probe(tiny_ldm, 64, denoise=False)
    h.restore()
    assert _rel(x, x0) < 1e-5 and _rel(g, g0) < 1e-4
    with pytest.raises(ValueError, match="speed.attention"):
        SpeedConfig(attention="flash3")


def test_compile_switch_matches(tiny_ldm, ldm_ref):
    x0, g0, _, _ = ldm_ref
    h = apply_speed(tiny_ldm, SpeedConfig(compile=True, compile_backend="aot_eager"))
    try:
        x, g, _, _ = _probe(tiny_ldm, 64, denoise=False)
    finally:
        h.restore()
        torch._dynamo.reset()
    assert _rel(x, x0) < 1e-5 and _rel(g, g0) < 1e-5


def test_ldm_short_run_agrees(tiny_ldm):
    """A complete 2-annealing-step run (2 Langevin steps each) from identical streams: bf16 samples
    are within 20 dB PSNR of the exact ones (a VQ code that flips under bf16 rounding changes a
    4×4 pixel patch, so after MCMC the agreement is not float-level; measured ≈ 26 dB)."""
    x0 = _run(tiny_ldm, 64, 2, 2, particles=1)
    h = apply_speed(tiny_ldm, SpeedConfig(precision="bf16"))
    x2 = _run(tiny_ldm, 64, 2, 2, particles=1)
    h.restore()
    assert _psnr_min(x2, x0) > 20.0


def test_toy_switches(toy):
    x0 = _run(toy, 64, 3, 3)
    for cfg in [EXACT_ON_CPU, SpeedConfig(precision="bf16", channels_last=True)]:
        h = apply_speed(toy, cfg)
        x = _run(toy, 64, 3, 3)
        h.restore()
        assert torch.equal(x, x0), cfg.label()
    h = apply_speed(toy, SpeedConfig(compile=True, compile_backend="aot_eager"))
    try:
        x = _run(toy, 64, 3, 3)
    finally:
        h.restore()
        torch._dynamo.reset()
    assert _psnr_min(x, x0) > 100.0


def test_mcmc_keeps_no_graphs(toy):
    """Nothing the MCMC hands back holds an autograd graph, and no trajectory is kept unless recorded."""
    op = get_operator("phase_retrieval", resolution=64)
    b = S.initial_batch(toy, op(torch.zeros(1, 3, 64, 64)), [0], 2, 0, 10.0, torch.device("cpu"))
    g, loss = data_gradient(toy, op, b.zt, b.y)
    assert g.grad_fn is None and loss.grad_fn is None and not g.requires_grad
    r = run_mcmc(toy, op, b.y, b.zt, b.zt.clone(), torch.tensor(1.0), 0.0, b.streams, MCMCConfig(num_steps=2))
    assert r.z.grad_fn is None
    S.latent_daps(toy, op, b, S.DAPSConfig.with_steps(2, mcmc=MCMCConfig(num_steps=1)))
    assert b.trajectory == [] and b.zt.grad_fn is None


def test_benchmark_tiny_smoke(tmp_path):
    """Single-config and agreement modes on the tiny fixture (no timing assertions)."""
    import json

    from scripts import benchmark

    out = tmp_path / "b.json"
    rep = benchmark.main(["--tiny", "--device", "cpu", "--particles", "1", "--mcmc-steps", "4",
                          "--time-mcmc-steps", "1", "--steps-to-time", "1", "--reps", "1",
                          "--precision", "bf16", "--json", str(out)])
    r = rep["results"][0]
    assert r["config"] == "bf16" and r["s_per_anneal_step"] > 0 and r["images_per_hour"] > 0
    assert set(r["breakdown"]["per_anneal_step_sec"]) >= {"decoder_fwd_bwd", "operator_fft", "unet", "other"}
    assert json.loads(out.read_text())["card"] == "cpu"
    rep = benchmark.main(["--tiny", "--device", "cpu", "--agreement", "--particles", "1",
                          "--agreement-anneal-steps", "1", "--agreement-mcmc-steps", "1"])
    a = rep["agreement"]
    assert a["test"] == "bf16" and 0 < a["test_vs_strict_fp32"]["decode_max_rel_err"] < 5e-2
    assert 0 < a["test_vs_exact"]["grad_max_rel_err"] < 1e-1
    assert a["exact_vs_strict_fp32"]["decode_max_rel_err"] == 0.0  # TF32 is a no-op on CPU
    assert a["exact_bit_identical_twice"] and a["test_bit_identical_twice"]  # CPU kernels are deterministic
    assert not a["conditions"]["decode_max_rel_err_le_daps_tf32"]  # bf16 rounding > 0 = CPU "TF32" error
    assert len(a["test_final_sample_sha256"]) == 64
    rep = benchmark.main(["--tiny", "--device", "cpu", "--agreement", "--particles", "1", "--agreement-draws", "3",
                          "--agreement-anneal-steps", "1", "--agreement-mcmc-steps", "1"])
    d = rep["agreement"]
    errs = d["over_draws"]["decode_max_rel_err"]
    assert d["draws"] == 3 and len(errs["test"]) == 3 and errs["exact"] == [0.0] * 3
    assert errs["test"][0] == d["test_vs_strict_fp32"]["decode_max_rel_err"] and len(set(errs["test"])) == 3
    assert d["conditions"]["decode_max_rel_err_max_over_draws_le_daps_tf32"] is False
    with pytest.raises(SystemExit) as stop:  # no latent: refused, not silently one
        benchmark.parse_args(["--agreement", "--agreement-draws", "0"])
    assert stop.value.code == 2


def test_fast_upsample_matches(tiny_ldm, ldm_ref):
    """nearest2x has the forward values of F.interpolate(nearest); only conv summation order moves."""
    from cores.speed import nearest2x

    x = torch.randn(2, 3, 5, 7)
    assert torch.equal(nearest2x(x), torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))
    x0, g0, _, _ = ldm_ref
    h = apply_speed(tiny_ldm, SpeedConfig(fast_upsample=True))
    assert h._patched
    x, g, _, _ = _probe(tiny_ldm, 64, denoise=False)
    h.restore()
    assert _rel(x, x0) < 1e-5 and _rel(g, g0) < 1e-5
    assert all("forward" not in m.__dict__ for m in tiny_ldm.vq.decoder.modules())


def _grad_decode(model, z):
    z = z.detach().requires_grad_(True)
    x = model.decode(z)
    (g,) = torch.autograd.grad(x.square().sum(), z)
    return x.detach(), g


def test_compile_once_for_every_batch_size(tiny_ldm):
    """One compile (at start-up) serves batches of 4, 3 and 2 rows with gradients, and decodes
    without gradients (pruning, final image) run eager: no graph is compiled after apply_speed."""
    from torch._dynamo.utils import counters

    from cores.speed import compile_seconds

    torch._dynamo.reset()
    counters.clear()
    z = torch.randn((4, *tiny_ldm.get_in_shape()), generator=torch.Generator().manual_seed(5))
    ref = [_grad_decode(tiny_ldm, z[:n]) for n in (4, 3, 2)]
    before = compile_seconds()
    h = apply_speed(tiny_ldm, SpeedConfig(compile=True, compile_backend="aot_eager", channels_last=True,
                                          fast_upsample=True))
    try:
        assert h.compiled and h.compile_sec > 0 and compile_seconds() >= before + h.compile_sec - 1e-9
        graphs = counters["stats"]["unique_graphs"]
        assert graphs >= 1
        got = [_grad_decode(tiny_ldm, z[:n]) for n in (4, 3, 2)]
        with torch.no_grad():
            xn = tiny_ldm.decode(z)
        assert counters["stats"]["unique_graphs"] == graphs  # no recompile for 4 → 2 rows nor for no-grad
        after = compile_seconds()
    finally:
        h.restore()
        torch._dynamo.reset()
    assert compile_seconds() == pytest.approx(after)  # a reset neither loses nor repeats compile time
    for (x0, g0), (x, g) in zip(ref, got):
        assert _rel(x, x0) < 1e-4 and _rel(g, g0) < 1e-4
    assert _rel(xn, ref[0][0]) < 1e-4


def test_compile_failure_warns_once_and_runs_eager(tiny_ldm, ldm_ref, monkeypatch):
    """When torch.compile cannot run (no Triton, old GPU, no toolchain) the run goes on eagerly."""
    import warnings

    import cores.speed as speed

    def broken(fn, cfg):
        def call(*a, **k):
            raise RuntimeError("Cannot find a working triton installation")
        return call

    monkeypatch.setattr(speed, "_compile", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        h = apply_speed(tiny_ldm, SpeedConfig(compile=True))
        x, g, _, _ = _probe(tiny_ldm, 64, denoise=False)
        h.restore()
    msgs = [w for w in caught if issubclass(w.category, RuntimeWarning) and "without compile" in str(w.message)]
    assert len(msgs) == 1 and not h.compiled
    x0, g0, _, _ = ldm_ref
    assert torch.equal(x, x0) and torch.equal(g, g0)


def test_speed_presets_compose():
    """`speed: exact` is the default and is the exact path; `speed=fast` names itself in the config."""
    from conftest import compose

    from scripts.benchmark import load_preset

    exact = compose([])
    assert exact.speed.preset == "exact" and speed_config(exact.speed).is_exact
    fast = compose(["speed=fast"])
    f = speed_config(fast.speed)
    assert fast.speed.preset == "fast" and f.preset == "fast" and not f.is_exact and f.compile
    assert f == load_preset("fast") and load_preset("exact").is_exact
    faithful = speed_config(compose(["speed=faithful"]).speed)
    assert faithful == load_preset("faithful") and faithful.preset == "faithful"
    # DAPS' numerics: fp32, default TF32 flags, no timing-based algorithm choice; reproducible
    assert (faithful.precision, faithful.tf32, faithful.cudnn_benchmark) == ("fp32", None, False)
    assert faithful.deterministic and faithful.compile and faithful.fast_upsample
    assert speed_config(compose(["speed=fast", "speed.precision=fp32"]).speed).precision == "fp32"


def test_compile_seconds_counts_compiles_outside_warm_up(toy):
    """Without the start-up compile, the first gradient decode compiles; compile_seconds() sees it."""
    from cores.speed import compile_seconds

    torch._dynamo.reset()
    before = compile_seconds()
    h = apply_speed(toy, SpeedConfig(compile=True, compile_backend="aot_eager", compile_warmup=False))
    try:
        assert compile_seconds() == pytest.approx(before)
        z = torch.randn((2, *toy.get_in_shape()), requires_grad=True)
        torch.autograd.grad(toy.decode(z).sum(), z)
        assert compile_seconds() > before
    finally:
        h.restore()
        torch._dynamo.reset()


def test_deterministic_switch_sets_and_restores_flags(tiny_ldm, ldm_ref):
    """deterministic: cuDNN / PyTorch / Inductor deterministic modes on, restored by restore();
    on CPU the kernels are deterministic already, so the numbers are the exact path's bits."""
    import torch._inductor.config as ind

    before = (torch.backends.cudnn.deterministic, torch.are_deterministic_algorithms_enabled(),
              torch.utils.deterministic.fill_uninitialized_memory, getattr(ind, "deterministic", None))
    h = apply_speed(tiny_ldm, SpeedConfig(deterministic=True))
    try:
        assert torch.backends.cudnn.deterministic and torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert not torch.utils.deterministic.fill_uninitialized_memory and not torch.backends.cudnn.benchmark
        if hasattr(ind, "deterministic"):
            assert ind.deterministic
        x, g, d, _ = _probe(tiny_ldm, 64)
    finally:
        h.restore()
    assert (torch.backends.cudnn.deterministic, torch.are_deterministic_algorithms_enabled(),
            torch.utils.deterministic.fill_uninitialized_memory, getattr(ind, "deterministic", None)) == before
    x0, g0, d0, _ = ldm_ref
    assert torch.equal(x, x0) and torch.equal(g, g0) and torch.equal(d, d0)
    assert SpeedConfig(deterministic=True).label() == "deterministic"
    with pytest.raises(ValueError, match="cudnn_benchmark"):
        SpeedConfig(deterministic=True, cudnn_benchmark=True)


def _faithful_on_cpu():
    """The faithful preset with Inductor replaced by aot_eager (the same graphs, no code generation)
    and without CUDA graphs (GPU only)."""
    from dataclasses import replace

    from scripts.benchmark import load_preset

    return replace(load_preset("faithful"), compile_backend="aot_eager", compile_mode="default")


def test_faithful_preset_matches_exact_and_repeats_bitwise(tiny_ldm, ldm_ref):
    """faithful changes no arithmetic type: decode and gradient ≤ 1e-5 relative to the exact path
    (summation order only), and a second run of the sampler gives the same bits."""
    x0, g0, _, _ = ldm_ref
    torch._dynamo.reset()
    h = apply_speed(tiny_ldm, _faithful_on_cpu())
    try:
        assert h.compiled
        x, g, _, _ = _probe(tiny_ldm, 64, denoise=False)
        runs = [_run(tiny_ldm, 64, 2, 2, particles=2) for _ in range(2)]
    finally:
        h.restore()
        torch._dynamo.reset()
    assert _rel(x, x0) < 1e-5 and _rel(g, g0) < 1e-5
    assert torch.equal(runs[0], runs[1])
    assert _psnr_min(runs[0], _run(tiny_ldm, 64, 2, 2, particles=2)) > 60.0


def test_matrix_row_names():
    """--matrix rows: a preset with switches taken off (-) or put on (+); unknown names stop."""
    from scripts.benchmark import load_preset, switch

    f = load_preset("faithful")
    assert switch("faithful") == f
    s = switch("faithful-cuda_graphs+tf32")
    assert s.compile_mode == "default" and s.tf32 is True and s.compile and s.preset == "faithful-cuda_graphs+tf32"
    b = switch("faithful+cudnn_benchmark")  # benchmark and deterministic exclude each other
    assert b.cudnn_benchmark and not b.deterministic
    assert switch("deterministic") == SpeedConfig(deterministic=True)
    for bad in ("faithful+turbo", "nope-compile", "faithful-"):
        with pytest.raises(SystemExit):
            switch(bad)


def test_benchmark_wprime_matrix_records_the_workload(tmp_path, one_thread):
    """W′ (the original study's exp1 workload) on the tiny fixture: the JSON defines the workload, the row
    times its three kinds of step and weights them by their counts in a whole run (30 + 4 + 16), and the
    whole-run row prunes 4 → 2 with repulsion on."""
    import json

    from scripts import benchmark

    out = tmp_path / "wp.json"
    rep = benchmark.main(["--tiny", "--device", "cpu", "--matrix", "--workload", "Wprime", "--matrix-switches", "exact",
                          "--matrix-two-particles", "", "--matrix-batch-configs", "", "--matrix-series", "exact",
                          "--matrix-series-hmc-steps", "1", "--time-mcmc-steps", "1", "--reps", "1",
                          "--json", str(out)])
    w = json.loads(out.read_text())["workload"]
    assert (w["name"], w["langevin_steps"], w["langevin_lr"], w["repulsion_scale"]) == ("Wprime", 50, 4e-6, 10.0)
    assert w["step_counts"] == {"repulsion": 30, "no_repulsion_logged": 4, "no_repulsion": 16}
    assert w["repulsion_steps"].startswith("0–29") and w["mcmc_steps"] == 50 and "exact path" in w["official_code_stand_in"]
    row, whole = rep["results"]
    kinds = row["step_kinds"]
    assert [kinds[k]["timed_steps"] for k in ("repulsion", "no_repulsion_logged", "no_repulsion")] == [[1], [2], [3, 4]]
    assert row["s_per_image"] == pytest.approx(sum(k["steps_in_run"] * k["s_per_anneal_step"] for k in kinds.values()))
    assert row["workload"] == "Wprime" and row["x_vs_exact_W"] == 1.0
    s = whole["series"]
    assert whole["name"] == "exact+prune4to2+hmc1 (whole run)" and s["repulsion"] and s["mcmc_algo"] == "hmc"
    assert len(s["per_step_sec"]) == 50 and whole["s_per_image"] == pytest.approx(s["sampling_sec"])
    assert not any(k.endswith("_estimate") for k in rep["derived"])  # steps are not alike: no 4/2-row estimate


def test_vram_check_smoke(tmp_path):
    """scripts/vram_check.py on the tiny fixture, CPU: both runs go through the run's path (repulsion on for
    4 of 6 steps); nothing is measured, and it says so."""
    import json

    from scripts import vram_check

    out = tmp_path / "v.json"
    assert vram_check.main(["--tiny", "--device", "cpu", "--preset", "fast-compile", "--mcmc-steps", "1",
                            "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    assert d["verdict"] == {"checked": False, "why": "no CUDA memory counters on this device"}
    for name in ("exact", "fast-compile"):
        r = d["results"][name]
        assert r["repulsion_steps_on"] == 4 and r["warmed_rows"] is None and r["vram"]["peak_memory_mb"] is None
    exact = {"vram": {"peak_memory_mb": 4000.0}, "held_reserved_mb": 100.0}  # held: DINO weights
    ok = vram_check.check({"exact": exact, "fast": {"vram": {"peak_memory_mb": 4500.0}, "held_reserved_mb": 400.0}},
                          "fast")
    assert ok["ok"] and ok["fast_graphs_mb"] == 300.0 and ok["bound_mb"] == pytest.approx(1.1 * 4300.0)
    assert not vram_check.check({"exact": exact, "fast": {"vram": {"peak_memory_mb": 66000.0},
                                                           "held_reserved_mb": 400.0}}, "fast")["ok"]
