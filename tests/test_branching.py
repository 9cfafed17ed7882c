"""Branching after pruning (`pruning_refill`): the batch is refilled to N particles with clones that
carry fresh (seed, image, id) streams; results stay batch- and resume-invariant; off changes nothing."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import compose
from cores.config import RepulsionConfig, build_run_config
from cores.errors import ConfigError
from cores.mcmc import MCMCConfig
from cores.pipeline import measure_images
from cores.pruning import PruningConfig, PruningHook
from cores.rng import ParticleStreams
from repulsion import RepulsionHook
from sampler import DAPSConfig, SamplerHook, initial_batch, latent_daps

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = DAPSConfig.with_steps(8, mcmc=MCMCConfig(num_steps=3), record_trajectory=True)
METRIC_KEYS = ("particle_ids", "psnr", "ssim", "psnr_twin", "measurement_loss", "best_idx", "selected_idx",
               "success", "both_orientations", "orientation", "non_finite_particles", "nan_events")
PRUNE_KEYS = ("kept_indices", "pruned_indices", "parents", "batch_before", "batch_after", "batch_refilled")
# Slow enough per image that the kill lands while the next image is in flight (as in test_resume).
KILL_RUN = ["sampler.annealing.num_steps=10", "sampler.mcmc.num_steps=8", "num_samples=4", "batch_size=1",
            "data.end_id=4", "eval.lpips=false", "pruning_step=4", "pruning_keep=2", "pruning_refill=true",
            "pruning_criterion=diversity", "repulsion_scale=430", "repulsion_feature=pixel"]


@pytest.fixture(scope="module")
def toy(toy_twins_ffhq4):
    return toy_twins_ffhq4


class Rows(SamplerHook):
    """(image, particle) of every row after each step's hooks, to see the batch the next step runs on."""

    def __init__(self):
        self.rows: List[List[tuple]] = []

    def on_step(self, batch, ctx):
        assert len(batch) == len(batch.zt) == len(batch.y) == len(batch.streams) == len(batch.z0y) \
            == len(batch.z0hat) == len(batch.image_ids) == len(batch.particle_ids)
        assert all(len(t) == len(batch) for t in batch.trajectory)
        self.rows.append(list(zip(batch.image_ids.tolist(), batch.particle_ids.tolist())))


def _sample(toy, ids, pcfg, repulsion: float = 0.0, seed: int = 42):
    model, op, gt = toy
    y = measure_images(op, gt[ids], ids, seed)
    batch = initial_batch(model, y, ids, 4, seed, CFG.annealing.sigma_max, torch.device("cpu"))
    hooks: List[SamplerHook] = []
    if repulsion:
        hooks.append(RepulsionHook(RepulsionConfig(scale=repulsion, feature="pixel", sigma_break=1.0), model))
    prune = PruningHook(pcfg) if pcfg is not None else None
    rows = Rows()
    latent_daps(model, op, batch, CFG, hooks=hooks + ([prune] if prune else []) + [rows])
    return batch, prune, rows


def _by_particle(batch) -> Dict[tuple, torch.Tensor]:
    return {(int(i), int(p)): batch.x[r] for r, (i, p) in enumerate(zip(batch.image_ids, batch.particle_ids))}


def test_refill_copies_every_row_field_and_gives_fresh_streams():
    g = torch.Generator().manual_seed(0)
    streams = ParticleStreams.for_particles(7, [3, 3, 5], [0, 2, 1])
    from sampler import ParticleBatch

    b = ParticleBatch(zt=torch.randn(3, 2, generator=g), y=torch.randn(3, 4, generator=g),
                      image_ids=torch.tensor([3, 3, 5]), particle_ids=torch.tensor([0, 2, 1]), streams=streams,
                      z0hat=torch.randn(3, 2, generator=g), z0y=torch.randn(3, 2, generator=g),
                      trajectory=[torch.randn(3, 2, generator=g) for _ in range(2)])
    before = {k: getattr(b, k).clone() for k in ("zt", "y", "z0hat", "z0y")}
    traj = [t.clone() for t in b.trajectory]
    gens = list(streams.generators)
    b.refill([2, 0, 1], [4, 5, 6])  # image 5's clone 4 of row 2; image 3's clones 5 (of 0) and 6 (of 2)
    assert list(zip(b.image_ids.tolist(), b.particle_ids.tolist())) == [(3, 0), (3, 2), (3, 5), (3, 6), (5, 1),
                                                                        (5, 4)]
    src = [0, 1, 0, 1, 2, 2]  # original row each new row holds
    for k, t in before.items():
        assert torch.equal(getattr(b, k), t[src]), k
    assert len(b.trajectory) == 2 and all(torch.equal(t, t0[src]) for t, t0 in zip(b.trajectory, traj))
    assert len(b.streams) == 6 and b.streams.seed == 7
    assert [b.streams.generators[r] is gens[s] for r, s in ((0, 0), (1, 1), (4, 2))] == [True] * 3
    want = ParticleStreams.for_particles(7, [3, 3, 5], [5, 6, 4], purpose="branch").randn((5,))
    got = ParticleStreams([b.streams.generators[r] for r in (2, 3, 5)]).randn((5,))
    assert torch.equal(got, want)
    parent_draws = ParticleStreams.for_particles(7, [3], [0]).randn((5,))
    assert not torch.equal(want[0], parent_draws[0])  # a clone does not replay its parent's noise


@pytest.mark.parametrize("criterion", ["loss", "diversity"])
def test_refill_keeps_n_particles_round_robin_parents_and_clones_diverge(toy, criterion):
    pc = PruningConfig(step=3, keep=2, criterion=criterion, refill=True)
    batch, hook, rows = _sample(toy, [0, 2], pc)
    line = hook.lines[0]
    kept = line["kept_indices"]
    assert line["parents"] == {"4": kept[0], "5": kept[1]} and line["batch_refilled"] == 4
    assert line["batch_after"] == 2 and line["batch_before"] == 4
    assert rows.rows[2] == [(0, p) for p in range(4)] + [(2, p) for p in range(4)]
    for img in (0, 2):
        assert [r for r in rows.rows[3] if r[0] == img] == [(img, p) for p in sorted(hook.lines[img]["kept_indices"])
                                                            + [4, 5]]
    assert rows.rows[-1] == rows.rows[3] and len(batch) == 8
    x = _by_particle(batch)
    for img in (0, 2):
        for new, parent in hook.lines[img]["parents"].items():
            assert not torch.equal(x[(img, int(new))], x[(img, parent)])  # own noise from step 4 on
            # the copied trajectory equals the parent's up to the prune, then differs
            r_new = ((batch.image_ids == img) & (batch.particle_ids == int(new))).nonzero().item()
            r_par = ((batch.image_ids == img) & (batch.particle_ids == parent)).nonzero().item()
            assert all(torch.equal(t[r_new], t[r_par]) for t in batch.trajectory[:4])
            assert not torch.equal(batch.trajectory[4][r_new], batch.trajectory[4][r_par])
    out = hook.image_output(0, {"psnr": [None] * 4, "particle_ids": [0, 1, 4, 5]})
    assert out.record["pruning"]["parents"] == line["parents"]


def test_survivors_unchanged_by_clones_without_repulsion(toy):
    """Particles are independent chains without repulsion, so a survivor ends exactly as without refill."""
    plain, h0, _ = _sample(toy, [1], PruningConfig(step=3, keep=2))
    refill, h1, _ = _sample(toy, [1], PruningConfig(step=3, keep=2, refill=True))
    a, b = _by_particle(plain), _by_particle(refill)
    assert h0.lines[1]["kept_indices"] == h1.lines[1]["kept_indices"]
    assert set(a) < set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert "parents" not in h0.lines[1] and "batch_refilled" not in h0.lines[1]


@pytest.mark.parametrize("repulsion", [0.0, 430.0])
def test_refill_is_batch_invariant(toy, repulsion):
    pc = PruningConfig(step=3, keep=2, criterion="diversity", refill=True, sigma_break=1.0 if repulsion else None)
    both, hook, _ = _sample(toy, [0, 3], pc, repulsion)
    x = _by_particle(both)
    for img in (0, 3):
        alone, h1, _ = _sample(toy, [img], pc, repulsion)
        assert h1.lines[img]["parents"] == hook.lines[img]["parents"]
        assert all(torch.equal(v, x[k]) for k, v in _by_particle(alone).items())


def test_masking_with_refill_is_one_line_error():
    cfg = compose(["pruning_step=3", "pruning_mode=masking", "pruning_refill=true"])
    with pytest.raises(ConfigError, match="pruning_refill=true needs pruning_mode=slicing") as err:
        build_run_config(cfg)
    assert "\n" not in str(err.value)
    assert build_run_config(compose(["pruning_step=3", "pruning_refill=true"])).pruning.refill is True


def _records(metrics: Dict) -> Dict[int, Dict]:
    return {r["image_idx"]: {**{k: r.get(k) for k in METRIC_KEYS},
                             **{k: r["pruning"].get(k) for k in PRUNE_KEYS}} for r in metrics["images"]}


def _run(overrides):
    from cores.pipeline import run

    return run(compose(overrides))


def test_option_off_is_bit_identical_and_logs_nothing_new(tmp_path):
    base = ["sampler.annealing.num_steps=6", "sampler.mcmc.num_steps=2", "data.end_id=2", "num_samples=4",
            "eval.lpips=false", f"save_dir={tmp_path}", "pruning_step=2", "pruning_keep=2",
            "repulsion_scale=430", "repulsion_feature=pixel"]
    a = _run(base + ["name=nokey"])
    b = _run(base + ["name=off", "pruning_refill=false"])
    assert _records(a) == _records(b)
    assert all(r["pruning"].get("parents") is None and len(r["particle_ids"]) == 2 for r in a["images"])
    for name in ("nokey", "off"):
        lines = [json.loads(s) for s in (tmp_path / name / "pruning.jsonl").read_text().splitlines()]
        assert not any("parents" in ln or "batch_refilled" in ln for ln in lines)
    assert (tmp_path / "nokey" / "pruning.jsonl").read_text() == (tmp_path / "off" / "pruning.jsonl").read_text()


def test_pipeline_batch_size_1_equals_4_and_files_name_the_new_ids(tmp_path):
    base = ["sampler.annealing.num_steps=6", "sampler.mcmc.num_steps=2", "data.end_id=4", "num_samples=4",
            "eval.lpips=false", f"save_dir={tmp_path}", "pruning_step=2", "pruning_keep=2", "pruning_refill=true",
            "repulsion_scale=430", "repulsion_feature=pixel", "save_traj=true", "traj_every=2"]
    one = _run(base + ["name=bs1", "batch_size=1"])
    four = _run(base + ["name=bs4", "batch_size=4"])
    assert _records(one) == _records(four)
    root = tmp_path / "bs4"
    for rec in four["images"]:
        idx, pids, parents = rec["image_idx"], rec["particle_ids"], rec["pruning"]["parents"]
        assert pids == sorted(rec["pruning"]["kept_indices"]) + [4, 5]
        assert parents == {"4": rec["pruning"]["kept_indices"][0], "5": rec["pruning"]["kept_indices"][1]}
        assert sorted(p.name for p in (root / "samples").glob(f"{idx:05d}_*")) == \
            [f"{idx:05d}_sample{p:02d}.png" for p in pids]
        # a clone's strip starts with its parent's frames (steps 0 and 2, up to the prune), then its own
        for new, parent in parents.items():
            c = np.asarray(Image.open(root / "trajectory" / f"{idx:05d}_sample{int(new):02d}.png"))
            p = np.asarray(Image.open(root / "trajectory" / f"{idx:05d}_sample{parent:02d}.png"))
            assert c.shape == p.shape and np.array_equal(c[:, :128], p[:, :128])
            assert not np.array_equal(c[:, 128:], p[:, 128:])


def test_kill_then_resume_matches_uninterrupted_run(tmp_path):
    from test_resume import finished, kill_after, launch, per_image

    ref = launch(KILL_RUN + [f"save_dir={tmp_path}", "name=ref"])
    victim = KILL_RUN + [f"save_dir={tmp_path}", "name=victim"]
    root = tmp_path / "victim"
    kill_after(launch(victim), root, 1)
    assert 1 <= len(finished(root)) < 4
    done = launch(victim + ["resume=true"])
    _, err = done.communicate(timeout=300)
    assert done.returncode == 0, err[-3000:]
    assert ref.wait(timeout=300) == 0, ref.communicate()[1][-3000:]
    got = json.loads((root / "metrics.json").read_text())
    want = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    assert sorted(per_image(got)) == [0, 1, 2, 3]
    assert _records(got) == _records(want)
    assert all(len(r["particle_ids"]) == 4 and r["pruning"]["parents"] for r in got["images"])
