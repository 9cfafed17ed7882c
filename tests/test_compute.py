"""Network evaluations per image (cores/compute.py): exact row counts on the toy prior for every
sampler path, FLOPs on the tiny LDM, time per phase and the VRAM fields of a pipeline run."""
import json

import pytest
import torch
import yaml

from conftest import FIXTURES, compose
from cores.compute import NETWORKS, ComputeMeter, instrument_model
from cores.config import OptimizationConfig, RepulsionConfig
from cores.mcmc import MCMCConfig
from cores.optimization import OptimizationHook
from cores.pipeline import measure_images
from cores.pruning import PruningConfig, PruningHook
from repulsion import RepulsionHook
from sampler import DAPSConfig, initial_batch, latent_daps

S, M, P, K, k = 6, 3, 4, 2, 2  # annealing steps, MCMC steps, particles, kept, prune step


@pytest.fixture(scope="module")
def toy(toy_twins_ffhq4):
    model, op, gt = toy_twins_ffhq4
    instrument_model(model)
    return model, op, gt


def _count(toy, hooks=(), algo="langevin", ids=(0,), particles=P):
    model, op, gt = toy
    ids = list(ids)
    y = measure_images(op, gt[ids], ids, 0)
    batch = initial_batch(model, y, ids, particles, 0, 10.0, torch.device("cpu"))
    cfg = DAPSConfig.with_steps(S, mcmc=MCMCConfig(algo=algo, num_steps=M, lr=2e-5 if algo == "hmc" else 5e-5))
    meter = ComputeMeter()
    with meter.counting(lambda: batch.image_ids):
        latent_daps(model, op, batch, cfg, hooks=list(hooks))
    return {i: meter.take(i) for i in ids}


def _expect(**kw):
    return {n: kw.get(n, 0) for n in NETWORKS}


@pytest.mark.parametrize("algo", ["langevin", "hmc"])
def test_counts_without_pruning(toy, algo):
    out = _count(toy, algo=algo)[0]
    assert out["compute"] == _expect(unet=2 * S * P, decoder_forward=S * M * P + P, decoder_backward=S * M * P)
    assert out["tflop"] is None  # the toy prior's networks have no FLOPs the counter knows


@pytest.mark.parametrize("mode", ["slicing", "masking", "shadow"])
def test_counts_with_pruning(toy, mode):
    got = _count(toy, [PruningHook(PruningConfig(step=k, keep=K, mode=mode, sigma_break=None))])[0]["compute"]
    if mode == "shadow":  # every particle runs to the end
        bwd, unet = S * M * P, 2 * S * P
    else:                 # slicing and masking: P particles up to step k, K after it
        bwd, unet = P * M * (k + 1) + K * M * (S - k - 1), 2 * (P * (k + 1) + K * (S - k - 1))
    final = K if mode == "slicing" else P  # masking decodes the frozen particles with the others
    assert got == _expect(unet=unet, decoder_backward=bwd, decoder_forward=bwd + P + final)


def test_counts_attributed_per_image_in_a_shared_batch(toy):
    both = _count(toy, [PruningHook(PruningConfig(step=k, keep=K, sigma_break=None))], ids=(0, 2))
    alone = _count(toy, [PruningHook(PruningConfig(step=k, keep=K, sigma_break=None))], ids=(2,))
    assert both[0]["compute"] == both[2]["compute"] == alone[2]["compute"]


def test_repulsion_and_hard_data_consistency_counts(toy):
    """Pixel features: one decode forward + backward per particle per ON step (no DINO); latent
    z0hat features add one UNet call; hard data consistency: one decode per iteration, a backward
    for every iteration but the last evaluation."""
    model, _, _ = toy
    pixel = RepulsionHook(RepulsionConfig(scale=1.0, sigma_break=0.0, feature="pixel"), model)
    iters = 2
    hdc = OptimizationHook(OptimizationConfig(enabled=True, eps=0.0, max_iters=iters))
    got = _count(toy, [pixel, hdc])[0]["compute"]
    mcmc = S * M * P
    assert got == _expect(unet=2 * S * P, decoder_forward=mcmc + S * P + (iters + 1) * P + P,
                          decoder_backward=mcmc + S * P + iters * P)
    z0hat = RepulsionHook(RepulsionConfig(scale=1.0, sigma_break=0.0, feature="latent", latent="z0hat"), model)
    assert _count(toy, [z0hat])[0]["compute"] == _expect(unet=3 * S * P, decoder_forward=mcmc + P,
                                                         decoder_backward=mcmc)


def test_dino_repulsion_counts(toy):
    from cores.dino import DinoFeatureExtractor

    model, _, _ = toy
    ext = DinoFeatureExtractor(weights_path=str(FIXTURES / "dino_tiny_vits16.pth"))
    hook = RepulsionHook(RepulsionConfig(scale=1.0, sigma_break=0.0, feature="dino"), model, ext)
    out = _count(toy, [hook], particles=2)[0]
    mcmc = S * M * 2
    assert out["compute"] == _expect(unet=2 * S * 2, decoder_forward=mcmc + S * 2 + 2, decoder_backward=mcmc + S * 2,
                                     dino_forward=S * 2, dino_backward=S * 2)
    assert out["tflop"] is None  # DINO is countable, the toy decoder is not


def test_a_call_on_other_rows_than_the_batch_is_refused(toy):
    model, _, _ = toy
    meter = ComputeMeter()
    with meter.counting(lambda: torch.tensor([0, 0, 0])), pytest.raises(ValueError, match="2 rows"):
        model.decode(torch.zeros(2, *model.get_in_shape()))
    model.decode(torch.zeros(2, *model.get_in_shape()))  # outside `counting`: not counted, no error
    assert meter.take(0)["compute"] == _expect()


def test_tflop_on_the_tiny_ldm_matches_flop_counter_at_batch_size():
    """tflop = Σ calls × FLOPs of a call, each measured here at the batch's own size (so the per-row
    measurement × rows is checked too)."""
    from torch.utils.flop_counter import FlopCounterMode

    from cores.models.ldm import build_ldm
    from cores.operators import get_operator

    model = build_ldm({"name": "ldm", "diffusion_path": str(FIXTURES / "ldm_tiny_ffhq.pt"),
                       "ldm_config": yaml.safe_load((FIXTURES / "ldm_tiny_ffhq.yaml").read_text())})
    instrument_model(model)
    op = get_operator("phase_retrieval", oversample=2.0, resolution=model.image_resolution, sigma=0.05)
    n, steps, mcmc = 2, 2, 1
    y = op(torch.zeros(1, 3, model.image_resolution, model.image_resolution))
    batch = initial_batch(model, y, [0], n, 0, 10.0, torch.device("cpu"))
    meter = ComputeMeter()
    with meter.counting(lambda: batch.image_ids):
        latent_daps(model, op, batch, DAPSConfig.with_steps(steps, mcmc=MCMCConfig(num_steps=mcmc)))
    out = meter.take(0)
    assert out["compute"] == _expect(unet=2 * steps * n, decoder_forward=steps * mcmc * n + n,
                                     decoder_backward=steps * mcmc * n)
    z = torch.randn(n, *model.get_in_shape())
    with FlopCounterMode(display=False) as unet:
        type(model).tweedie(model, z, torch.tensor(1.0))
    zg = z.clone().requires_grad_(True)
    with torch.enable_grad():
        with FlopCounterMode(display=False) as dec:
            x = type(model).decode(model, zg)
        with FlopCounterMode(display=False) as back:
            torch.autograd.grad(x.sum(), zg)
    calls = {"unet": 2 * steps, "dec": steps * mcmc + 1, "back": steps * mcmc}
    expect = (calls["unet"] * unet.get_total_flops() + calls["dec"] * dec.get_total_flops()
              + calls["back"] * back.get_total_flops()) / 1e12
    assert unet.get_total_flops() > 0 and back.get_total_flops() > 0
    assert out["tflop"] == pytest.approx(expect, rel=1e-12)


def test_pipeline_time_segments_compute_and_vram_fields(tmp_path):
    """Two images per batch, slicing 3 → 2 at step 2, hard data consistency for 2 iterations."""
    s, m, p, kept, step, iters = 6, 4, 3, 2, 2, 2
    cfg = compose(["sampler.annealing.num_steps=6", "sampler.mcmc.num_steps=4", "data.end_id=2", "num_samples=3",
                   "batch_size=2", "eval.lpips=false", f"save_dir={tmp_path}", "name=run", f"pruning_step={step}",
                   "pruning_keep=2", "hard_data_consistency=1", f"optimization_max_iters={iters}",
                   "optimization_eps=0"])
    from cores.pipeline import run

    metrics = run(cfg)
    bwd = p * m * (step + 1) + kept * m * (s - step - 1) + kept * iters
    fwd = p * m * (step + 1) + kept * m * (s - step - 1) + p + kept * (iters + 1) + kept
    for rec in metrics["images"]:
        assert rec["compute"] == _expect(unet=2 * (p * (step + 1) + kept * (s - step - 1)),
                                         decoder_forward=fwd, decoder_backward=bwd)
        assert rec["tflop"] is None
        seg = rec["time_segments"]
        assert set(seg) == {"pre_pruning", "post_pruning", "optimization"} and all(v > 0 for v in seg.values())
        assert sum(seg.values()) <= rec["time_sec"]
    summary = metrics["summary"]
    assert summary["compute"] == {n: sum(r["compute"][n] for r in metrics["images"]) for n in NETWORKS}
    assert summary["tflop"] is None
    for name in ("pre_pruning", "post_pruning", "optimization"):
        assert summary["time_segments"][name] == pytest.approx(sum(r["time_segments"][name]
                                                                   for r in metrics["images"]))
    vram = json.loads((tmp_path / "run" / "metrics.json").read_text())["vram"]
    assert set(vram) >= {"peak_memory_mb", "peak_reserved_mb", "segments", "segments_reserved"}


def test_pipeline_plain_run_has_one_sampling_segment(tmp_path):
    from cores.pipeline import run

    cfg = compose(["sampler.annealing.num_steps=3", "sampler.mcmc.num_steps=1", "data.end_id=1", "num_samples=2",
                   "eval.lpips=false", f"save_dir={tmp_path}", "name=run"])
    (rec,) = run(cfg)["images"]
    assert set(rec["time_segments"]) == {"sampling"} and 0 < rec["time_segments"]["sampling"] <= rec["time_sec"]
    assert rec["compute"] == _expect(unet=2 * 3 * 2, decoder_forward=3 * 2 + 2, decoder_backward=3 * 2)


def test_nested_scope_counts_a_subset_of_rows(toy):
    model, _, _ = toy
    meter = ComputeMeter()
    z = torch.zeros(3, *model.get_in_shape())
    with meter.counting(lambda: torch.tensor([0, 0, 1])):
        model.decode(z)
        with meter.counting(lambda: torch.tensor([1])):
            model.decode(z[2:])
        model.decode(z)
    assert meter.take(0)["compute"]["decoder_forward"] == 4 and meter.take(1)["compute"]["decoder_forward"] == 3
