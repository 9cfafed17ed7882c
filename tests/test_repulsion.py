"""Repulsion: kernel maths (RLSD's and the density form), groups, guard rails, OFF = no change,
logging, effect on the toy prior."""
from __future__ import annotations

import json
import math
import warnings
from typing import Callable, Optional

import pytest
import torch

from conftest import FIXTURES, TINY, compose
from cores.config import RepulsionConfig
from cores.mcmc import MCMCConfig
from cores.models import build_model
from cores.operators import get_operator
from cores.scheduler import DiffusionPFODE, EDMScheduler
import repulsion
from repulsion import REPULSION_FIELDS, RepulsionHook, compute_repulsion_gradient, logged_step, schedule_factor
from sampler import DAPSConfig, StepContext, initial_batch, latent_daps

PRIOR = ["dataset/demo-ffhq", "dataset/demo-imagenet"]


@pytest.fixture(scope="module")
def toy():
    model = build_model({"name": "toy", "prior_images": PRIOR, "include_twins": True, "std": 0.05}, "cpu")
    op = get_operator("phase_retrieval", oversample=2.0, resolution=64, sigma=0.05)
    return model, op


def _batch(model, op, ids, n, seed=0):
    gt = model.decode(model.means[torch.as_tensor(ids)])
    y = op.measure(gt, torch.Generator().manual_seed(seed))
    return initial_batch(model, y, ids, n, seed, 10.0, torch.device("cpu"))


def _mlp(d_in: int, d_out: int = 5):
    g = torch.Generator().manual_seed(3)
    W = torch.randn(d_out, d_in, generator=g, dtype=torch.float64) / math.sqrt(d_in)
    return lambda z: torch.tanh(z.flatten(1) @ W.T) * 3.0


# ----------------------------------------------------------------------------- kernel maths
def test_two_particles_weight_half_and_push_apart():
    z = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    r, d = compute_repulsion_gradient(z, lambda v: v.flatten(1))
    assert torch.isfinite(r).all()
    assert d["weights_mean"] == pytest.approx(0.5, abs=1e-6)
    assert d["weights_max"] == pytest.approx(0.5, abs=1e-6) and d["weights_nonzero_frac"] == 1.0
    assert d["mean_pairwise_dist"] == pytest.approx(float((z[0] - z[1]).norm()), rel=1e-5)
    # latent features: r_1 ∝ z_1 − z_2 exactly, r_2 = −r_1
    cos = torch.nn.functional.cosine_similarity(r[0].flatten(), (z[0] - z[1]).flatten(), dim=0)
    assert cos > 0.9999
    torch.testing.assert_close(r[1], -r[0])


def test_single_particle_is_noop():
    z = torch.randn(1, 3, 4, 4)
    r, d = compute_repulsion_gradient(z, lambda v: v.flatten(1))
    assert torch.equal(r, torch.zeros_like(z))
    assert d["weights_mean"] is None and d["mean_pairwise_dist"] is None


def _kde_objective(z, phi):
    """Σ_i −log Σ_j exp(−||φ(z_i) − f_j||² / h_i) with f_j (j ≠ i) and h_i frozen: r = its gradient."""
    f = phi(z)
    fd = f.detach()
    n = f.shape[0]
    d = torch.cdist(fd, fd)
    off = ~torch.eye(n, dtype=torch.bool)
    h = torch.quantile(d[off].view(n, n - 1), 0.5, dim=1) ** 2 / math.log(n)
    total = 0.0
    for i in range(n):
        d2 = (f[i] - fd).pow(2).sum(-1)  # j = i: zero value and zero gradient, so w_ii = 1
        total = total - torch.logsumexp(-d2 / h[i], dim=0)
    return total


def test_density_gradient_matches_autograd_and_finite_differences():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)
    phi = _mlp(18)
    r, _ = compute_repulsion_gradient(z, phi, normalizer="density")
    zz = z.clone().requires_grad_(True)
    (auto,) = torch.autograd.grad(_kde_objective(zz, phi), zz)
    torch.testing.assert_close(r, auto, rtol=1e-9, atol=1e-12)  # r = −∇ log KDE
    # finite differences of the frozen objective on a few coordinates
    f0 = phi(z).detach()
    for (i, c, a, b) in [(0, 0, 1, 2), (2, 1, 0, 0), (3, 1, 2, 1)]:
        e = torch.zeros_like(z)
        e[i, c, a, b] = 1e-6

        def obj(v, i=i):
            f = phi(v)
            d2 = (f[i] - f0).pow(2).sum(-1)
            d2[i] = 0.0
            n = 4
            dd = torch.cdist(f0, f0)
            h = torch.quantile(dd[~torch.eye(n, dtype=torch.bool)].view(n, n - 1), 0.5, dim=1)[i] ** 2 / math.log(n)
            return -torch.logsumexp(-d2 / h, 0)

        fd = (obj(z + e) - obj(z - e)) / 2e-6
        assert float(fd) == pytest.approx(float(r[i, c, a, b]), rel=1e-5, abs=1e-9)


def test_groups_never_interact_and_nonfinite_is_isolated():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(7, 2, 3, 3, generator=g, dtype=torch.float64)
    groups = torch.tensor([5, 5, 5, 9, 9, 9, 9])
    phi = _mlp(18)
    r, d = compute_repulsion_gradient(z, phi, groups)
    assert set(d["per_group"]) == {5, 9}
    moved = z.clone()
    moved[:3] += 2.0 * torch.randn(3, 2, 3, 3, generator=g, dtype=torch.float64)
    r2, _ = compute_repulsion_gradient(moved, phi, groups)
    assert torch.equal(r[3:], r2[3:])          # image 9 did not notice image 5 moving
    assert not torch.allclose(r[:3], r2[:3])
    alone, _ = compute_repulsion_gradient(z[3:], phi)
    torch.testing.assert_close(r[3:], alone)
    # a NaN particle in group 9: its r is 0, it leaves the group, group 5 is untouched
    bad = z.clone()
    bad[4, 0, 0, 0] = float("nan")
    r3, d3 = compute_repulsion_gradient(bad, phi, groups)
    assert torch.isfinite(r3).all() and d3["nonfinite_rows"] == [4]
    assert torch.equal(r3[4], torch.zeros_like(r3[4]))
    assert torch.equal(r3[:3], r[:3])
    rest, _ = compute_repulsion_gradient(z[[3, 5, 6]], phi)
    torch.testing.assert_close(r3[[3, 5, 6]], rest)


# ----------------------------------------------------------------------------- RLSD's kernel
def _rlsd_reference(z: torch.Tensor, phi: Callable[[torch.Tensor], torch.Tensor],
                    groups: Optional[list] = None, median: str = "lower") -> torch.Tensor:
    """RLSD's repulsion written out particle by particle in float64 (log N bandwidth).

    For each i: the N − 1 distances to the others, their lower median m (the (k−1)//2-th
    smallest of k), h = m²/log N, w_j = exp(−d_j²/h), g = Σ_j 2·w_j·(f_i − f_j)/h,
    r_i = J_φ(z_i)ᵀ g / Σ_j w_j with the full Jacobian of the row.
    """
    z = z.double()
    B = z.shape[0]
    groups = [0] * B if groups is None else groups
    f = phi(z).detach()
    r = torch.zeros_like(z)
    for i in range(B):
        others = [j for j in range(B) if j != i and groups[j] == groups[i]]
        n = len(others) + 1
        if n < 2:
            continue
        dist = [math.sqrt(sum(float(f[i, k] - f[j, k]) ** 2 for k in range(f.shape[1]))) for j in others]
        srt = sorted(dist)
        k = len(srt)
        m = srt[(k - 1) // 2] if median == "lower" else 0.5 * (srt[(k - 1) // 2] + srt[k // 2])
        h = m * m / math.log(n)
        g = torch.zeros(f.shape[1], dtype=torch.float64)
        wsum = 0.0
        for j, dj in zip(others, dist):
            w = math.exp(-dj * dj / h)
            wsum += w
            g += 2.0 * w * (f[i] - f[j]) / h
        jac = torch.autograd.functional.jacobian(lambda v: phi(v.unsqueeze(0))[0], z[i])  # (D, *shape)
        r[i] = torch.tensordot(g, jac, dims=1) / wsum
    return r


@pytest.mark.parametrize("n", [2, 3, 4, 8])
def test_rlsd_matches_independent_formula_with_groups(n):
    g = torch.Generator().manual_seed(10 + n)
    z = torch.randn(2 * n, 2, 3, 3, generator=g, dtype=torch.float64)
    labels = [4 if k % 2 == 0 else 1 for k in range(2 * n)]  # two images, rows interleaved
    phi = _mlp(18)
    r, d = compute_repulsion_gradient(z, phi, torch.tensor(labels))
    assert r.dtype == torch.float64 and set(d["per_group"]) == {4, 1}
    ref = _rlsd_reference(z, phi, labels)
    torch.testing.assert_close(r, ref, rtol=1e-10, atol=1e-12)
    assert r.abs().sum() > 0
    assert torch.isfinite(r).all()
    # the default is RLSD's form, which is not the density form; for odd N the median matters too
    dens, _ = compute_repulsion_gradient(z, phi, torch.tensor(labels), normalizer="density")
    assert not torch.allclose(r, dens)
    if n % 2 == 1:
        assert not torch.allclose(r, _rlsd_reference(z, phi, labels, median="mean"))


def test_rlsd_two_and_four_particles_factor_to_density():
    """Even N: same median, so |r_rlsd| / |r_density| = (1 + S_i) / S_i per particle (3 at N = 2)."""
    g = torch.Generator().manual_seed(5)
    ident = lambda v: v.flatten(1)  # noqa: E731
    z2 = torch.randn(2, 6, generator=g, dtype=torch.float64)
    a, _ = compute_repulsion_gradient(z2, ident)
    b, _ = compute_repulsion_gradient(z2, ident, normalizer="density")
    torch.testing.assert_close(a.norm(dim=1) / b.norm(dim=1), torch.full((2,), 3.0, dtype=torch.float64))
    d = float((z2[0] - z2[1]).norm())
    torch.testing.assert_close(a[0], 2 * math.log(2) * (z2[0] - z2[1]) / d ** 2)  # w = 1/2, S = 1/2
    z4 = torch.randn(4, 6, generator=g, dtype=torch.float64)
    a, _ = compute_repulsion_gradient(z4, ident)
    b, _ = compute_repulsion_gradient(z4, ident, normalizer="density")
    _, s, _ = repulsion._group_kernel(z4, 1e-6, "rlsd")
    torch.testing.assert_close(a.norm(dim=1) / b.norm(dim=1), (1 + s) / s)


def test_rlsd_kernel_sum_lower_bound():
    """Σ_{j≠i} w_ij ≥ ⌈(N−1)/2⌉ / N, and the bound is reached."""
    g = torch.Generator().manual_seed(6)
    for n in range(2, 10):
        bound = math.ceil((n - 1) / 2) / n
        for trial in range(40):
            f = torch.randn(n, 3, generator=g, dtype=torch.float64)
            f = f * torch.rand(n, 1, generator=g, dtype=torch.float64).pow(4) * 10 ** (trial % 4)  # uneven spread
            _, s, _ = repulsion._group_kernel(f, 1e-6, "rlsd")
            assert float(s.min()) >= bound * (1 - 1e-12), (n, trial, float(s.min()))
    # particle 0 with two neighbours at the median distance and one far away: S_0 = 2/4 exactly
    f = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1e3]], dtype=torch.float64)
    _, s, _ = repulsion._group_kernel(f, 1e-6, "rlsd")
    assert float(s[0]) == pytest.approx(0.5, abs=1e-12)
    # identical particles: no force, no division by zero
    r, _ = compute_repulsion_gradient(torch.ones(3, 4), lambda v: v)
    assert torch.equal(r, torch.zeros(3, 4))


def _density_kernel_frozen(f: torch.Tensor, eps: float, normalizer: str = "density"):
    """The density kernel exactly as it was before the RLSD normaliser existed."""
    n = f.shape[0]
    diff = f.unsqueeze(1) - f.unsqueeze(0)
    d2 = diff.pow(2).sum(-1)
    d = d2.sqrt()
    off = ~torch.eye(n, dtype=torch.bool, device=f.device)
    med = torch.quantile(d[off].view(n, n - 1), 0.5, dim=1)
    h = (med.pow(2) / max(math.log(n), eps)).clamp_min(1e-30)
    w = torch.exp(-d2 / h.unsqueeze(1))
    g = (2 * w.unsqueeze(-1) * diff).sum(1) / h.unsqueeze(1)
    wo = w[off]
    stats = {"mean_pairwise_dist": float(d[off].mean()), "weights_mean": float(wo.mean()),
             "weights_max": float(wo.max()), "weights_nonzero_frac": float((wo > repulsion.WEIGHT_NONZERO_TOL).float().mean())}
    return g, w.sum(1), stats


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_density_normalizer_bit_identical_to_before(dtype, monkeypatch):
    g = torch.Generator().manual_seed(7)
    W = torch.randn(5, 18, generator=g, dtype=dtype)
    phi = lambda v: torch.tanh(v.flatten(1) @ W.T) * 3.0  # noqa: E731
    cases = []
    for n in (2, 3, 4, 5, 8):
        z = torch.randn(2 * n, 2, 3, 3, generator=g).to(dtype)
        cases.append((z, torch.arange(2 * n) % 2))
    got = [compute_repulsion_gradient(z, phi, gr, normalizer="density") for z, gr in cases]
    monkeypatch.setattr(repulsion, "_group_kernel", _density_kernel_frozen)
    for (z, gr), (r, d) in zip(cases, got):
        r0, d0 = compute_repulsion_gradient(z, phi, gr, normalizer="density")
        assert torch.equal(r, r0) and d == d0


def test_normalizer_name_is_checked_and_module_passes_it(toy):
    model, _ = toy
    z = torch.randn(3, 4)
    with pytest.raises(ValueError, match="repulsion_normalizer"):
        compute_repulsion_gradient(z, lambda v: v, normalizer="kde")
    from cores.config import build_run_config
    from cores.errors import ConfigError

    with pytest.raises(ConfigError, match="repulsion_normalizer"):
        RepulsionConfig(scale=1.0, normalizer="kde")
    base = ["repulsion_scale=1.0", "repulsion_feature=pixel"]
    hook = RepulsionHook.from_config(build_run_config(compose(base)).repulsion, model, "cpu")
    assert hook.cfg.normalizer == "rlsd"
    hook = RepulsionHook.from_config(build_run_config(compose(base + ["repulsion_normalizer=density"])).repulsion,
                                     model, "cpu")
    assert hook.cfg.normalizer == "density"
    b = _batch(model, toy[1], [0], 3)
    r, _ = hook.repulsion(b.zt, 5.0, torch.zeros(3, dtype=torch.long))  # the hook uses its configured normaliser
    r0, _ = compute_repulsion_gradient(b.zt, hook.features, torch.zeros(3, dtype=torch.long), normalizer="density")
    assert torch.equal(r, r0)


def test_schedule_and_logged_steps():
    for s in ("constant", "linear", "cosine"):
        assert schedule_factor(10.0, 1.0, 10.0, s) == pytest.approx(1.0, rel=1e-8)  # the original's +1e-8
        assert schedule_factor(0.99, 1.0, 10.0, s) == 0.0
        assert schedule_factor(1.0, 1.0, 10.0, s) == 0.0  # ON iff σ > σ_break: off at equality, as the original
    assert schedule_factor(1.0 + 1e-6, 1.0, 10.0, "constant") == 1.0
    # the original's u = (σ − σ_break)/(σ_max − σ_break + 1e-8), exactly
    assert schedule_factor(5.5, 1.0, 10.0, "linear") == 4.5 / (9.0 + 1e-8)
    assert schedule_factor(10.0, 10.0, 10.0, "linear") == 0.0 == schedule_factor(10.0, 10.0, 10.0, "cosine")
    assert schedule_factor(5.5, 1.0, 10.0, "cosine") == pytest.approx(0.5)
    assert schedule_factor(3.25, 1.0, 10.0, "cosine") < schedule_factor(3.25, 1.0, 10.0, "linear")
    expected = {0, 1, 2, 5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 75, 100, 125}
    assert {s for s in range(130) if logged_step(s)} == expected


def _hook(model, scale, sigma_break=1.0, feature="pixel", multiplier="linear", **kw):
    """λ = scale unless `multiplier="squared"` (the config default) is asked for."""
    return RepulsionHook(RepulsionConfig(scale=scale, sigma_break=sigma_break, sigma_max=10.0, feature=feature,
                                         multiplier=multiplier, **kw), model)


def _lines(hook, ids=(0, 1)):
    return [l for i in ids for l in hook.image_output(i, {}).jsonl["repulsion"]]


def test_first_score_norm_is_from_first_evaluation(toy):
    model, op = toy
    b = _batch(model, op, [0], 3)
    hook = _hook(model, 1.0)
    ctx = StepContext(0, 4.0, None, 2.0, 50, model, op)
    wrapped = hook.wrap_score(model.score, b, ctx)
    DiffusionPFODE(wrapped, EDMScheduler(2, torch.tensor(4.0), 1e-3)).sample(b.zt)
    torch.testing.assert_close(hook._pending["score_norm"][0],
                               model.score(b.zt, torch.tensor(4.0)).flatten(1).norm(dim=1))
    # scale 0 without baseline logging: nothing is constructed, the model's score goes in unwrapped
    assert RepulsionHook.from_config(RepulsionConfig(scale=0.0), model, "cpu") is None


def test_dino_reexport_and_dino_features(toy):
    from repulsion import DinoFeatureExtractor

    model, op = toy
    ext = DinoFeatureExtractor(weights_path=str(FIXTURES / "dino_tiny_vits16.pth"))
    mod = RepulsionHook(RepulsionConfig(scale=1.0, feature="dino"), model, ext)
    z = torch.randn(3, *model.get_in_shape())
    r, d = compute_repulsion_gradient(z, mod.features, torch.tensor([0, 0, 0]))
    assert r.shape == z.shape and torch.isfinite(r).all() and r.abs().sum() > 0
    assert 0 < d["weights_mean"] < 1


# ----------------------------------------------------------------------------- in the sampler
def _run(model, op, rep, steps=6, ids=(0, 1), n=3, mcmc=3, callback=None):
    b = _batch(model, op, list(ids), n)
    latent_daps(model, op, b, DAPSConfig.with_steps(steps, mcmc=MCMCConfig(num_steps=mcmc)),
                hooks=[rep] if rep is not None else [], callback=callback)
    return b


def test_module_off_below_break_changes_nothing(toy):
    model, op = toy
    ref = _run(model, op, None, n=2)
    off = _hook(model, 50.0, sigma_break=20.0)
    got = _run(model, op, off, n=2)
    assert torch.equal(ref.x, got.x) and torch.equal(ref.zt, got.zt)
    lines = _lines(off)
    assert lines and all(not l["repulsion_on"] and l["repulsion_cleared"] for l in lines)
    assert all(l["repulsion_scale_used"] == 0.0 and l["repulsion_norm"] == 0.0 for l in lines)
    on = _run(model, op, _hook(model, 50.0), n=2)
    assert not torch.equal(ref.x, on.x)  # the same module ON does change the result


def test_baseline_logging_at_scale0_is_bit_identical(toy):
    """scale 0 + log_baseline: repulsion.jsonl lines with distances and weights, no force, same samples."""
    model, op = toy
    ref = _run(model, op, None, steps=6, n=3)
    hook = RepulsionHook.from_config(RepulsionConfig(scale=0.0, log_baseline=True, feature="pixel"), model, "cpu")
    got = _run(model, op, hook, steps=6, n=3)
    assert torch.equal(ref.x, got.x) and torch.equal(ref.zt, got.zt)
    lines = _lines(hook)
    assert sorted({l["step"] for l in lines}) == [0, 1, 2, 5] and len(lines) == 8
    for l in lines:
        assert not l["repulsion_on"] and l["repulsion_norm"] == 0.0 and l["feature"] == "pixel"
        assert l["mean_pairwise_dino_dist"] > 0 and 0 < l["weights_mean"] <= 1 and l["score_base_norm"] > 0


def test_jsonl_fields_steps_and_summary(toy):
    model, op = toy
    rep = _hook(model, 1000.0)
    _run(model, op, rep, steps=12, mcmc=1)
    outs = {i: rep.image_output(i, {}) for i in (0, 1)}
    lines = [l for o in outs.values() for l in o.jsonl["repulsion"]]
    assert all(tuple(l) == REPULSION_FIELDS for l in lines)
    assert sorted({l["step"] for l in lines}) == [0, 1, 2, 5, 10]
    assert sorted((l["step"], l["image_idx"]) for l in lines) == sorted((s, i) for s in [0, 1, 2, 5, 10] for i in (0, 1))
    sig = EDMScheduler(12, 10.0, 0.1).sigma_steps
    for l in lines:
        assert l["sigma"] == pytest.approx(float(sig[l["step"]]))
        assert l["repulsion_on"] == (l["sigma"] > 1.0) and l["repulsion_cleared"] == (not l["repulsion_on"])
        assert l["score_base_norm"] > 0 and l["mean_pairwise_dino_dist"] > 0
        if l["repulsion_on"]:
            assert l["repulsion_scale_used"] == 1000.0 and l["repulsion_norm"] > 0
            assert l["ratio_scaled_to_score"] == pytest.approx(l["scaled_repulsion_norm"] / l["score_base_norm"])
            assert l["repulsion_multiplier"] == 1000.0  # linear: λ = w
            assert 0 < l["weights_mean"] <= 1 and l["weights_nonzero_frac"] > 0
        else:
            assert l["repulsion_norm"] == 0.0 and l["weights_mean"] is None
    active = sum(float(s) > 1.0 for s in sig[:12])
    s = outs[0].record["repulsion"]
    assert s["active_steps"] == active and s["total_time_sec"] > 0 and s["mean_pairwise_dist"] > 0
    import repulsion

    assert repulsion.summarize([{"image_idx": i, **o.record} for i, o in outs.items()])["images"] == 2


def test_ratio_warning_once_per_image(toy):
    import repulsion

    model, op = toy
    rep = _hook(model, 1e7, feature="latent")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        _run(model, op, rep, steps=4, mcmc=1)
    msgs = [x for x in w if "repulsion: image" in str(x.message)]
    records = [{"image_idx": i, **rep.image_output(i, {}).record} for i in (0, 1)]
    assert len(msgs) == 2 and repulsion.summarize(records)["ratio_warnings"] == [0, 1]


def test_z_t_vp_latent_applies_the_chain_rule(toy):
    """r for `z_t_vp` = (∂u/∂z_t)·r(u) with u = z_t/√(1+σ²): the gradient of the same objective in z_t."""
    model, op = toy
    b = _batch(model, op, [0], 3)
    sigma = 3.0
    c = 1 / math.sqrt(1 + sigma ** 2)
    vp = _hook(model, 1.0, latent="z_t_vp", feature="latent")
    r_vp, _ = vp.repulsion(b.zt, sigma, torch.zeros(3, dtype=torch.long))
    r_u, _ = compute_repulsion_gradient(b.zt * c, vp.features, torch.zeros(3, dtype=torch.long))
    torch.testing.assert_close(r_vp, r_u * c)
    # with linear features the median bandwidth makes r invariant to rescaling the latent, so the VP
    # latent changes nothing here (it does through a nonlinear decoder + DINO)
    plain = _hook(model, 1.0, feature="latent")
    r_zt, _ = plain.repulsion(b.zt, sigma, torch.zeros(3, dtype=torch.long))
    torch.testing.assert_close(r_vp, r_zt, rtol=1e-5, atol=1e-9)


def test_particles_move_apart_on_toy_prior(toy):
    """Mean pairwise pixel distance of z0hat (the PF-ODE output the repulsion acts on) over the ON phase."""
    model, op = toy
    dist = {}
    for scale in (0.0, 1000.0):
        seen = []

        def cb(info, seen=seen):
            batch = info["batch"]
            if info["stage"] == "ode" and info["sigma"] >= 1.0:
                x = model.decode(batch.z0hat).flatten(1)
                ds = [torch.pdist(x[batch.rows_of_image(i)]).mean() for i in batch.image_ids.unique()]
                seen.append(float(torch.stack(ds).mean()))

        rep = _hook(model, scale) if scale else None
        _run(model, op, rep, steps=8, ids=(0, 12), n=4, mcmc=2, callback=cb)
        dist[scale] = seen
    assert len(dist[0.0]) >= 3
    assert sum(dist[1000.0]) > 1.1 * sum(dist[0.0]), dist
    assert all(a > b for a, b in zip(dist[1000.0], dist[0.0])), dist


# ----------------------------------------------------------------------------- pipeline level
def test_pipeline_scale0_bit_identical_and_no_module(tmp_path, monkeypatch):
    from cores import pipeline
    import repulsion as rep_mod

    def boom(*a, **k):
        raise AssertionError("RepulsionHook built at repulsion_scale=0")

    monkeypatch.setattr(rep_mod.RepulsionHook, "__init__", boom)
    base = pipeline.run(compose(TINY + [f"save_dir={tmp_path}", "name=a", "model.include_twins=true"]))
    monkeypatch.undo()
    # a module that exists but never fires (linear schedule is 0 at σ_break = σ_max) changes no number
    cfg = compose(TINY + [f"save_dir={tmp_path}", "name=b", "model.include_twins=true", "repulsion_scale=5",
                          "repulsion_sigma_break=10.0", "repulsion_schedule=linear", "repulsion_feature=pixel"])
    other = pipeline.run(cfg)
    for a, b in zip(base["images"], other["images"]):
        assert a["psnr"] == b["psnr"] and a["measurement_loss"] == b["measurement_loss"]
        assert b["repulsion"]["active_steps"] == 0
    for p in (tmp_path / "a" / "samples").iterdir():
        assert p.read_bytes() == (tmp_path / "b" / "samples" / p.name).read_bytes()
    assert not (tmp_path / "a" / "repulsion.jsonl").exists()
    lines = [json.loads(s) for s in (tmp_path / "b" / "repulsion.jsonl").read_text().splitlines()]
    assert {l["step"] for l in lines} == {0, 1, 2, 5} and len(lines) == 8
    assert other["metadata"]["repulsion"]["scale"] == 5.0


# ----------------------------------------------------------------------------- the original's meanings
class _ScoreRecorder(repulsion.SamplerHook):
    """First hook: sees z_t and the model's own score at every PF-ODE evaluation (before repulsion is added)."""

    def __init__(self):
        self.calls = {}  # step -> [(sigma, score)]
        self.zt = {}     # step -> z_t

    def wrap_score(self, score_fn, batch, ctx):
        self.zt[ctx.step] = batch.zt.clone()

        def rec(z, sigma):
            out = score_fn(z, sigma)
            self.calls.setdefault(ctx.step, []).append((float(sigma), out.detach().clone()))
            return out
        return rec


@pytest.mark.parametrize("multiplier", ["squared", "linear"])
def test_log_norms_are_the_originals_at_the_last_evaluation(toy, multiplier):
    """score_base_norm / scaled_repulsion_norm / ratio_scaled_to_score: norms over the image's particles at the
    PF-ODE's last drift evaluation (the original overwrites them at each call); repulsion_multiplier = λ;
    the project's ratio at σ_i under its own name."""
    model, op = toy
    rec = _ScoreRecorder()
    rep = _hook(model, 3.0, multiplier=multiplier)
    b = _batch(model, op, [0, 1], 3)
    latent_daps(model, op, b, DAPSConfig.with_steps(6, mcmc=MCMCConfig(num_steps=1)), hooks=[rec, rep])
    lam = 9.0 if multiplier == "squared" else 3.0
    lines = _lines(rep)
    on = [l for l in lines if l["repulsion_on"]]
    assert on and all(l["repulsion_multiplier"] == lam and l["repulsion_scale_used"] == 3.0 for l in on)
    for l in lines:
        rows = slice(0, 3) if l["image_idx"] == 0 else slice(3, 6)
        calls = rec.calls[l["step"]]
        assert len(calls) == 2  # two Euler evaluations; the log holds the last one
        last = calls[-1][1][rows]
        assert l["score_base_norm"] == pytest.approx(float(last.double().norm()), rel=1e-9)
        if l["repulsion_on"]:
            r, _ = rep.repulsion(rec.zt[l["step"]], l["sigma"], torch.tensor([0, 0, 0, 1, 1, 1]))
            r = r[rows].double()
            assert l["scaled_repulsion_norm"] == pytest.approx(lam * float(r.norm()), rel=1e-6)
            assert l["repulsion_norm"] == pytest.approx(lam / 3.0 * float(r.norm()), rel=1e-6)  # what w multiplies
            assert l["ratio_scaled_to_score"] == pytest.approx(
                l["scaled_repulsion_norm"] / (l["score_base_norm"] + 1e-12), rel=1e-12)
            # the project's ratio: per-particle norms at σ_i (the first evaluation), averaged over the particles
            first = calls[0][1][rows].double().flatten(1).norm(dim=1).mean()
            assert l["ratio_per_particle_at_sigma"] == pytest.approx(
                lam * float(r.flatten(1).norm(dim=1).mean() / first), rel=1e-6)
        else:
            assert l["ratio_scaled_to_score"] == 0.0 and l["repulsion_multiplier"] == 0.0


def test_squared_multiplier_is_linear_with_the_scale_squared(toy):
    """`repulsion_multiplier=squared` at scale s runs exactly `linear` at scale s² (constant schedule)."""
    model, op = toy
    sq = _run(model, op, _hook(model, 2.0, multiplier="squared"), n=3)
    lin = _run(model, op, _hook(model, 4.0, multiplier="linear"), n=3)
    assert torch.equal(sq.x, lin.x)
    assert not torch.equal(sq.x, _run(model, op, _hook(model, 2.0, multiplier="linear"), n=3).x)


def test_multiplier_config_default_and_choices():
    from cores.config import build_run_config
    from cores.errors import ConfigError

    c = build_run_config(compose(TINY + ["repulsion_scale=10", "repulsion_feature=pixel"])).repulsion
    assert c.multiplier == "squared" and c.injected(10.0) == 100.0
    lin = build_run_config(compose(TINY + ["repulsion_scale=10", "repulsion_multiplier=linear"])).repulsion
    assert lin.injected(10.0) == 10.0
    with pytest.raises(ConfigError, match="repulsion_multiplier=cubic"):
        build_run_config(compose(TINY + ["repulsion_multiplier=cubic"]))


def test_repulsion_off_at_sigma_break_equal_to_a_grid_point(toy):
    """ON iff σ > σ_break: with σ_break equal to σ_1 the repulsion acts at step 0 only."""
    model, op = toy
    sig = EDMScheduler(6, 10.0, 0.1).sigma_steps
    rep = _hook(model, 5.0, sigma_break=float(sig[1]))
    _run(model, op, rep, steps=6, n=2)
    assert [l["repulsion_on"] for l in _lines(rep, ids=(0,)) if l["step"] in (0, 1)] == [True, False]


def test_original_dino_input_per_image():
    """dino.preprocess=original: (x+1)/2 when the image's particles go below 0, clamp, 224, ImageNet stats;
    each image of a batch decides its own shift (the original's batch is one image's particles)."""
    from cores.dino import DinoFeatureExtractor

    ext = DinoFeatureExtractor(FIXTURES / "dino_tiny_vits16.pth", preprocess="original")
    assert ext.resize == 224 and ext.normalize
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    x[2:] = x[2:].abs() * 0.5 + 0.1  # image 1: all ≥ 0, not shifted
    g = torch.tensor([0, 0, 1, 1])
    got = ext.preprocess(x, g)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    u = torch.cat([((x[:2] + 1) / 2).clamp(0, 1), x[2:].clamp(0, 1)])
    want = (torch.nn.functional.interpolate(u, size=(224, 224), mode="bilinear", align_corners=False) - mean) / std
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # one batch-wide minimum (groups=None) shifts the second image too: what batching would change
    assert not torch.allclose(ext.preprocess(x)[2:], want[2:])
    torch.testing.assert_close(ext.preprocess(x[2:], g[2:]), want[2:], rtol=0, atol=1e-6)
    raw = DinoFeatureExtractor(FIXTURES / "dino_tiny_vits16.pth", preprocess="raw")
    assert torch.equal(raw.preprocess(x), x)
    with pytest.raises(ValueError, match="dino.preprocess"):
        DinoFeatureExtractor(preprocess="rlsd")
