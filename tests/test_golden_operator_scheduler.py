"""Golden checks against references computed by DAPS' own operator and scheduler."""
import torch

from conftest import FIXTURES, ROOT
from cores.data import load_image
from cores.operators import get_operator
from cores.scheduler import EDMScheduler, get_diffusion_scheduler


def test_phase_retrieval_matches_daps():
    ref = torch.load(FIXTURES / "phase_retrieval_ref.pt")
    op = get_operator("phase_retrieval", oversample=2.0, resolution=256, sigma=0.05)
    assert op.pad == int(ref["pad"]) == 64
    x = ref["x"].float()
    amp = op(x)
    assert amp.shape == (1, 3, 384, 384)
    torch.testing.assert_close(amp, ref["amplitude"], atol=1e-5, rtol=0)
    y = ref["amplitude"] + 0.05 * ref["noise_fp16"].float()
    torch.testing.assert_close(op.loss(x, y), ref["loss"], atol=1e-3, rtol=1e-6)


def test_phase_retrieval_is_per_sample_and_twin_invariant():
    ref = torch.load(FIXTURES / "phase_retrieval_ref.pt")
    op = get_operator("phase_retrieval", resolution=256)
    x = ref["x"].float()
    twin = x.flip(-2, -1)
    batch = torch.cat([x, twin, torch.zeros_like(x)])
    amp = op(batch)
    torch.testing.assert_close(amp[0], amp[1], atol=1e-4, rtol=0)  # |A| cannot tell the twin apart
    y = amp[:1].expand(3, -1, -1, -1)
    loss = op.loss(batch, y)
    assert loss.shape == (3,) and loss[0] < 1e-6 and loss[1] < 1e-3 and loss[2] > 1.0


def test_demo_image_loads_like_daps():
    ref = torch.load(FIXTURES / "phase_retrieval_ref.pt")
    x = load_image(ROOT / "dataset" / "demo-ffhq" / ref["x_files"][0], 256)
    assert (x - ref["x"].float()[0]).abs().max() < 3e-4


def test_annealing_schedule_is_bit_exact():
    ref = torch.load(FIXTURES / "scheduler_ref.pt")
    s = get_diffusion_scheduler("edm", num_steps=50, sigma_max=10, sigma_min=0.1, timestep="poly-7")
    assert s.num_steps == int(ref["anneal_num_steps_attr"]) == 51
    assert torch.equal(s.time_steps, ref["anneal_time_steps"])
    assert torch.equal(s.sigma_steps, ref["anneal_sigma_steps"])
    assert float(s.sigma_max) == float(ref["anneal_prior_sigma"])  # DAPS get_prior_sigma()
    # the poly-7 grid gives: σ_28 ≈ 1.105, σ_29 ≈ 1.007, σ_30 ≈ 0.92
    assert abs(float(s.sigma_steps[29]) - 1.007) < 1e-3 and float(s.sigma_steps[30]) < 1.0 < float(s.sigma_steps[29])


def test_pfode_inner_schedules_are_bit_exact():
    ref = torch.load(FIXTURES / "scheduler_ref.pt")
    anneal = EDMScheduler(50, 10, 0.1)
    for k in range(50):
        inner = EDMScheduler(2, anneal.sigma_steps[k], 0.001)
        assert torch.equal(inner.time_steps.double(), ref["pfode_time_steps"][k])
        assert torch.equal(inner.sigma_steps.double(), ref["pfode_sigma_steps"][k])
    for i, smax in enumerate(ref["pfode_float_sigma_max"].tolist()):
        inner = EDMScheduler(2, smax, 0.001)
        assert torch.equal(inner.time_steps, ref["pfode_float_time_steps"][i])
        assert torch.equal(inner.sigma_steps.double(), ref["pfode_float_sigma_steps"][i])
