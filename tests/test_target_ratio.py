"""Repulsion at a target ratio: λ per step and image so that ||λr|| / ||score|| = ρ; off = unchanged."""
from __future__ import annotations

import pytest
import torch

from conftest import TINY, compose
from cores.config import RepulsionConfig, build_run_config
from cores.errors import ConfigError
from cores.mcmc import MCMCConfig
from cores.models import build_model
from cores.operators import get_operator
from repulsion import RepulsionHook, compute_repulsion_gradient, schedule_factor
from sampler import DAPSConfig, SamplerHook, initial_batch, latent_daps

PRIOR = ["dataset/demo-ffhq", "dataset/demo-imagenet"]


@pytest.fixture(scope="module")
def toy(one_thread):
    model = build_model({"name": "toy", "prior_images": PRIOR, "include_twins": True, "std": 0.05}, "cpu")
    op = get_operator("phase_retrieval", oversample=2.0, resolution=64, sigma=0.05)
    return model, op


def _run(model, op, hooks, n=3, ids=(0, 1), steps=8):
    gt = model.decode(model.means[torch.as_tensor(list(ids))])
    y = op.measure(gt, torch.Generator().manual_seed(0))
    b = initial_batch(model, y, list(ids), n, 0, 10.0, torch.device("cpu"))
    latent_daps(model, op, b, DAPSConfig.with_steps(steps, mcmc=MCMCConfig(num_steps=2)), hooks=hooks)
    return b


def _lines(hook, ids=(0, 1)):
    return [l for i in ids for l in hook.image_output(i, {}).jsonl["repulsion"]]


class _PlainRepulsion(SamplerHook):
    """score + λ·r with λ = (scale·schedule(σ))² (the default, squared meaning), r from
    `compute_repulsion_gradient`: the rule without a target ratio, written out independently of `RepulsionHook`."""

    def __init__(self, scale: float, model):
        self.scale, self.model = scale, model

    def wrap_score(self, score_fn, batch, ctx):
        lam = (self.scale * schedule_factor(ctx.sigma, 1.0, 10.0)) ** 2
        if lam <= 0:
            return score_fn
        r, _ = compute_repulsion_gradient(batch.zt, lambda z: self.model.decode(z).flatten(1),
                                          batch.image_ids.cpu())
        return lambda z, s: score_fn(z, s) + lam * r


def test_off_is_bit_identical_to_the_plain_rule(toy):
    model, op = toy
    ref = _run(model, op, [_PlainRepulsion(30.0, model)])
    got = _run(model, op, [RepulsionHook(RepulsionConfig(scale=30.0, feature="pixel", target_ratio=None,
                                                         scale_max=1e-9), model)])
    assert torch.equal(ref.x, got.x) and torch.equal(ref.zt, got.zt)


def test_logged_ratio_equals_target_at_on_steps(toy):
    model, op = toy
    rho = 1.0
    hook = RepulsionHook(RepulsionConfig(scale=0.0, target_ratio=rho, feature="pixel"), model)
    base = _run(model, op, [])
    got = _run(model, op, [hook])
    assert not torch.equal(base.x, got.x)  # it acts although repulsion_scale is 0
    lines = _lines(hook)
    on = [l for l in lines if l["repulsion_on"]]
    assert on and any(not l["repulsion_on"] for l in lines)
    for l in on:
        assert l["repulsion_scale_used"] < hook.cfg.scale_max
        assert l["ratio_per_particle_at_sigma"] == pytest.approx(rho, rel=0.05)
        assert l["repulsion_multiplier"] == l["repulsion_scale_used"]  # λ itself is chosen
    # λ is chosen per image: the two images of the batch get different λ at the same step
    by_step = {}
    for l in on:
        by_step.setdefault(l["step"], []).append(l["repulsion_scale_used"])
    assert any(len(set(v)) == 2 for v in by_step.values())


def test_cap_and_zero_force(toy):
    model, op = toy
    capped = RepulsionHook(RepulsionConfig(target_ratio=1.0, scale_max=1e-3, feature="pixel"), model)
    _run(model, op, [capped])
    outs = {i: capped.image_output(i, {}) for i in (0, 1)}
    on = [l for o in outs.values() for l in o.jsonl["repulsion"] if l["repulsion_on"]]
    assert on and all(l["repulsion_scale_used"] == 1e-3 and l["ratio_per_particle_at_sigma"] < 1.0 for l in on)
    rec = outs[0].record["repulsion"]
    assert rec["scale_used_mean"] == pytest.approx(1e-3) and rec["scale_capped_steps"] == rec["active_steps"] > 0
    # one particle per image: r = 0, so λ = 0 and the run equals plain DAPS
    single = RepulsionHook(RepulsionConfig(target_ratio=1.0, feature="pixel"), model)
    assert torch.equal(_run(model, op, [single], n=1).x, _run(model, op, [], n=1).x)
    assert all(l["repulsion_scale_used"] == 0.0 for l in _lines(single) if l["repulsion_on"])


def test_config_target_ratio_turns_repulsion_on(tmp_path):
    base = TINY + [f"save_dir={tmp_path}", "repulsion_scale=0"]
    off = build_run_config(compose(base + ["pruning_step=4"]))
    assert off.repulsion.target_ratio is None and not off.repulsion.on
    assert off.pruning.sigma_break == off.repulsion.sigma_break  # the σ_break trigger holds with repulsion off too
    on = build_run_config(compose(base + ["repulsion_target_ratio=1", "pruning_step=4"]))
    assert on.repulsion.on and on.repulsion.needs_hook and on.repulsion.scale_max == 1e4
    assert on.pruning.sigma_break == on.repulsion.sigma_break  # the σ_break trigger follows repulsion
    assert not build_run_config(compose(base + ["repulsion_target_ratio=0"])).repulsion.on
    for bad in ("repulsion_target_ratio=-1", "repulsion_scale_max=0"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            build_run_config(compose(base + [bad]))
