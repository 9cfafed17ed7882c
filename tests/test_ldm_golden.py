"""Golden tests: the CompVis LDM loader (diffusers modules) against outputs of the original
DAPS/CompVis code (tests/fixtures/README.md §1–3), plus loader strictness, the download hint,
and the full-size configs with random weights."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cores.models import build_model  # noqa: E402
from cores.models.ldm import LDMModel, build_ldm, build_random_ldm  # noqa: E402
from cores.models.ldm_convert import DOWNLOAD_STEPS  # noqa: E402

FIX = Path(os.environ.get("GOLDEN_FIXTURES_DIR", REPO / "tests" / "fixtures"))
NAMES = ["ffhq", "cin"]
ATOL = 1e-4  # relative to the output scale (fixture README)
GRAD_ATOL = 1e-3

torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_cfg(name: str, path=None) -> dict:
    return {
        "name": "ldm",
        "ldm_config": yaml.safe_load(open(FIX / f"ldm_tiny_{name}.yaml")),
        "diffusion_path": str(path if path is not None else FIX / f"ldm_tiny_{name}.pt"),
    }


def scale(t: torch.Tensor) -> float:
    return max(1.0, float(t.abs().max()))


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def assert_close(got, ref, atol=ATOL, what=""):
    err = max_err(got, ref)
    assert err <= atol * scale(ref), f"{what}: max abs err {err:.3e} > {atol:.0e} x scale {scale(ref):.3g}"
    return err


@pytest.fixture(scope="module", params=NAMES)
def case(request):
    name = request.param
    model = build_ldm(tiny_cfg(name), "cpu")
    ref = torch.load(FIX / f"ldm_tiny_{name}_ref.pt", map_location="cpu")
    return name, model, ref


# --------------------------------------------------------------------------- golden values
def test_structure(case):
    name, m, ref = case
    assert isinstance(m, LDMModel)
    assert m.get_in_shape() == tuple(ref["z"].shape[1:])
    assert m.image_resolution == ref["decode"].shape[-1]
    assert not any(p.requires_grad for p in m.parameters())
    assert all(p.dtype == torch.float32 for p in m.parameters())
    assert m.conditional == (name == "cin")


def test_timesteps(case):
    _, m, ref = case
    assert_close(m.sigma_to_t(ref["sigmas"]), ref["c_noise"], atol=1e-6, what="c_noise")


def test_tweedie_and_eps(case):
    name, m, ref = case
    z = ref["z"].float()
    with torch.no_grad():
        for i, s in enumerate(ref["sigmas"].tolist()):
            c_in = 1 / (ref["sigmas"][i] ** 2 + 1).sqrt()
            eps = m.eps_model(c_in * z, ref["c_noise"][i : i + 1])
            assert_close(eps, ref["eps"][i], what=f"{name} eps sigma={s}")
            D = m.tweedie(z, s)  # python float
            assert_close(D, ref["tweedie"][i], what=f"{name} tweedie sigma={s}")


def test_sigma_forms_agree(case):
    _, m, ref = case
    z = ref["z"].float()
    s = float(ref["sigmas"][1])
    with torch.no_grad():
        a = m.tweedie(z, s)
        b = m.tweedie(z, torch.tensor(s))
        c = m.tweedie(z, torch.full((z.shape[0],), s))
        # per-sample sigmas: each sample as if alone
        sig = ref["sigmas"][:2].clone()
        d = m.tweedie(z, sig)
        d0 = m.tweedie(z[:1], float(sig[0]))
        d1 = m.tweedie(z[1:], float(sig[1]))
    assert max_err(a, b) <= 1e-6 * scale(a) and max_err(a, c) <= 1e-5 * scale(a)
    assert max_err(d[:1], d0) <= 1e-5 * scale(d0) and max_err(d[1:], d1) <= 1e-5 * scale(d1)
    sc = m.score(z, sig)
    assert sc.shape == z.shape and torch.isfinite(sc).all()


def test_null_class_context(case):
    name, m, ref = case
    if name != "cin":
        assert m.context(2) is None
        return
    assert m.class_label == int(ref["class_label"][0]) == 1000
    ctx = m.context(3)
    assert ctx.shape == (3, 1, ref["cond"].shape[-1])
    for b in range(3):
        assert_close(ctx[b : b + 1], ref["cond"], atol=1e-7, what="cond")


def test_decode_quantized(case):
    name, m, ref = case
    z = ref["z"].float()
    with torch.no_grad():
        _, idx = m.quantize(z)
        assert torch.equal(idx, ref["quant_indices"]), f"{name}: VQ indices differ"
        assert_close(m.decode(z), ref["decode"], what=f"{name} decode")
        assert_close(m.decode_unquantized(z), ref["decode_force_not_quantize"], what=f"{name} decode_nq")
        assert max_err(m.decode(z), ref["decode_force_not_quantize"]) > 1e-3  # quantisation really ran


def test_decode_gradient_straight_through(case):
    name, m, ref = case
    z = ref["z"].float().requires_grad_(True)
    (m.decode(z) * ref["w"].float()).sum().backward()
    assert_close(z.grad, ref["decode_grad"], atol=GRAD_ATOL, what=f"{name} decode_grad")


def test_encode(case):
    name, m, ref = case
    with torch.no_grad():
        assert_close(m.encode(ref["x"].float()), ref["encode"], what=f"{name} encode")


def poly7_steps(sigma_max: torch.Tensor, sigma_min: float = 0.001, num: int = 3) -> torch.Tensor:
    """EDM poly-7 time points in float32 (DAPS EDMScheduler with a float32 sigma_max)."""
    r = torch.linspace(0, 1, num, dtype=torch.float64).to(torch.float32)
    smax = sigma_max.to(torch.float32)
    return (smax ** (1 / 7) + r * (sigma_min ** (1 / 7) - smax ** (1 / 7))) ** 7


def test_pfode_x0hat(case):
    """2 Euler steps of dx/dt = -t * score(x, t) (DAPS DiffusionPFODE, EDM scaling 1)."""
    name, m, ref = case
    sched = torch.load(FIX / "scheduler_ref.pt", map_location="cpu")
    with torch.no_grad():
        for j, k in enumerate(ref["pfode_anneal_index"].tolist()):
            smax = ref["pfode_sigma_max"][j]
            assert float(smax) == float(sched["pfode_sigma_max"][k])
            ts = poly7_steps(smax)
            ts_ref = sched["pfode_time_steps"][k].to(torch.float32)
            assert max_err(ts, ts_ref) <= 1e-6 * float(ts_ref.max())
            x = ref["pfode_zt"][j].float()
            for i in range(len(ts_ref) - 1):
                t = ts_ref[i]
                score = (m.tweedie(x, t) - x) / t ** 2
                x = x + (ts_ref[i + 1] - t) * (-t * score)
            assert_close(x, ref["pfode_x0hat"][j], what=f"{name} pfode x0hat (anneal step {k})")


def test_ldm_timestep_mapping(case):
    name, _, _ = case
    cfg = tiny_cfg(name)
    cfg["timestep_mapping"] = "ldm"
    m = build_ldm(cfg, "cpu")
    ac = m.spec.alphas_cumprod()
    sig = ((1 - ac) / ac).sqrt().to(torch.float32)
    ks = torch.tensor([0, 10, 250, 500, 998, 999])
    t = m.sigma_to_t(sig[ks])
    assert max_err(t, ks.float()) < 1e-2
    # monotone, clamped to [0, T-1], fractional between grid points
    s = torch.logspace(-3, 3, 50)
    t = m.sigma_to_t(s)
    assert (t[1:] >= t[:-1]).all() and float(t.min()) == 0.0 and float(t.max()) == 999.0
    mid = m.sigma_to_t((sig[100:101] * sig[101:102]).sqrt())
    assert 100.0 < float(mid) < 101.0
    with torch.no_grad():
        assert torch.isfinite(m.tweedie(torch.randn(2, *m.get_in_shape()), 1.0)).all()
    with pytest.raises(ValueError):
        build_ldm(dict(tiny_cfg(name), timestep_mapping="bogus"), "cpu")


def test_build_model_registry(case):
    name, m, ref = case
    m2 = build_model(tiny_cfg(name), "cpu")
    with torch.no_grad():
        assert torch.equal(m2.tweedie(ref["z"].float(), 0.5), m.tweedie(ref["z"].float(), 0.5))


# --------------------------------------------------------------------------- loader strictness
def _write_modified(tmp_path: Path, name: str, fn) -> Path:
    ck = torch.load(FIX / f"ldm_tiny_{name}.pt", map_location="cpu", weights_only=False)
    sd = dict(ck["state_dict"])
    fn(sd)
    out = tmp_path / f"ldm_tiny_{name}_mod.pt"
    torch.save({"state_dict": sd}, out)
    return out


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("key", [
    "model.diffusion_model.middle_block.1.norm.weight",
    "model.diffusion_model.output_blocks.2.0.skip_connection.bias",
    "first_stage_model.decoder.up.0.block.1.conv2.weight",
    "first_stage_model.quantize.embedding.weight",
    "cond_stage_model.embedding.weight",
])
def test_loader_rejects_missing_key(tmp_path, name, key):
    ck = torch.load(FIX / f"ldm_tiny_{name}.pt", map_location="cpu", weights_only=False)["state_dict"]
    if key not in ck:
        pytest.skip(f"{key} not in the {name} fixture")
    path = _write_modified(tmp_path, name, lambda sd: sd.pop(key))
    with pytest.raises(ValueError, match="missing") as exc:
        build_ldm(tiny_cfg(name, path), "cpu")
    assert key in str(exc.value)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("key", [
    "model.diffusion_model.extra_block.weight",
    "first_stage_model.encoder.down.9.block.0.conv1.weight",
    "cond_stage_model.extra.weight",
])
def test_loader_rejects_extra_key(tmp_path, name, key):
    path = _write_modified(tmp_path, name, lambda sd: sd.__setitem__(key, torch.zeros(3)))
    with pytest.raises(ValueError, match="unexpected") as exc:
        build_ldm(tiny_cfg(name, path), "cpu")
    assert key in str(exc.value)


def test_loader_ignores_ema_and_schedule_buffers(tmp_path):
    def mod(sd):
        sd["model_ema.decay"] = torch.tensor(0.9999)
        sd["model_ema.diffusion_modelout2weight"] = torch.zeros(3)
        sd["betas"] = sd["betas"] * 2  # schedule buffers are not used (VPPrecond)
        sd["logvar"] = torch.zeros(1000)

    path = _write_modified(tmp_path, "ffhq", mod)
    m = build_ldm(tiny_cfg("ffhq", path), "cpu")
    ref = torch.load(FIX / "ldm_tiny_ffhq_ref.pt")
    with torch.no_grad():
        assert_close(m.tweedie(ref["z"].float(), float(ref["sigmas"][1])), ref["tweedie"][1])


def test_loader_rejects_wrong_config(tmp_path):
    cfg = tiny_cfg("ffhq")
    cfg["ldm_config"] = copy.deepcopy(cfg["ldm_config"])
    cfg["ldm_config"]["model"]["params"]["unet_config"]["params"]["num_res_blocks"] = 2
    with pytest.raises(ValueError, match="missing"):
        build_ldm(cfg, "cpu")


# --------------------------------------------------------------------------- download hints
@pytest.mark.parametrize("fname,step", [("ldm_ffhq256.pt", "ldm_ffhq256"), ("ldm_imagenet256.pt", "ldm_imagenet256")])
def test_missing_checkpoint_hint(tmp_path, fname, step):
    cfg = {"name": "ldm", "ldm_config": {"model": {"target": "nonsense"}},  # never parsed: fails first
           "diffusion_path": str(tmp_path / "checkpoints" / fname)}
    with pytest.raises(FileNotFoundError) as exc:
        build_model(cfg, "cpu")
    msg = str(exc.value)
    assert fname in msg and f"bash download.sh {step}" in msg


@pytest.mark.parametrize("cfg_name,step", [("ffhq256ldm", "ldm_ffhq256"), ("imagenet256ldm", "ldm_imagenet256")])
def test_real_config_missing_checkpoint_hint(cfg_name, step, tmp_path, monkeypatch):
    cfg = yaml.safe_load(open(REPO / "configs" / "model" / f"{cfg_name}.yaml"))
    if (REPO / cfg["diffusion_path"]).exists():
        pytest.skip("the real checkpoint is present")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"bash download.sh {step}"):
        build_model(cfg, "cpu")


def test_download_sh_steps_match_python_table():
    out = subprocess.run(["bash", str(REPO / "download.sh"), "--list"], capture_output=True, text=True, check=True)
    listed = dict(line.split("\t", 1) for line in out.stdout.strip().splitlines())
    assert listed == DOWNLOAD_STEPS


# --------------------------------------------------------------------------- full-size configs
EXPECTED_PARAMS = {
    # CompVis logs "DiffusionWrapper has 274.06 M params" (ffhq-ldm-vq-4) and "400.92 M" (cin256-v2)
    "ffhq256ldm": {"unet": 274_056_163, "vq": 55_322_782, "cond": 0},
    "imagenet256ldm": {"unet": 400_920_579, "vq": 55_322_782, "cond": 1001 * 512},
}


@pytest.mark.parametrize("cfg_name", sorted(EXPECTED_PARAMS))
def test_full_size_config_random_weights(cfg_name):
    cfg = yaml.safe_load(open(REPO / "configs" / "model" / f"{cfg_name}.yaml"))
    assert cfg["name"] == "ldm" and cfg.get("timestep_mapping", "vp") == "vp"
    m = build_random_ldm(cfg, "cpu")
    n = lambda mod: 0 if mod is None else sum(p.numel() for p in mod.parameters())  # noqa: E731
    assert {"unet": n(m.unet), "vq": n(m.vq), "cond": n(m.cond)} == EXPECTED_PARAMS[cfg_name]
    assert m.get_in_shape() == (3, 64, 64) and m.image_resolution == 256
    z = torch.randn(2, 3, 8, 8)  # small spatial size keeps this quick on CPU
    with torch.no_grad():
        D = m.tweedie(z, torch.tensor([10.0, 0.5]))
        x = m.decode(z)
        e = m.encode(torch.rand(1, 3, 32, 32) * 2 - 1)
    assert D.shape == z.shape and x.shape == (2, 3, 32, 32) and e.shape == (1, 3, 8, 8)
    assert torch.isfinite(D).all() and torch.isfinite(x).all()
