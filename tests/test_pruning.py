"""Once-only pruning: triggers, criteria, slicing everywhere, per-image independence, the three modes."""
import json
from pathlib import Path

import pytest
import torch

from cores.evaluation import psnr
from cores.mcmc import MCMCConfig
from cores.pipeline import measure_images
from cores.pruning import PruningConfig, PruningHook, pruning_regret, select_by_diversity, select_by_loss, summarize
from cores.run_folder import RunFolder
from cores.scheduler import EDMScheduler
from sampler import DAPSConfig, SamplerHook, initial_batch, latent_daps

CFG = DAPSConfig.with_steps(8, mcmc=MCMCConfig(num_steps=3), record_trajectory=True)
JSONL_FIELDS = {"image_idx", "prune_step", "prev_sigma", "curr_sigma", "repulsion_sigma_break", "losses",
               "kept_indices", "pruned_indices", "kept_losses", "batch_before", "batch_after", "did_prune",
               "trigger", "mode"}


@pytest.fixture(scope="module")
def toy(toy_twins_ffhq4):
    return toy_twins_ffhq4


class Observer(SamplerHook):
    """Independent record of what the batch looked like: loss of z0y per step (before pruning) and sizes."""

    def __init__(self):
        self.losses, self.sizes, self.stream_sizes = {}, [], []

    def on_step(self, batch, ctx):
        with torch.no_grad():
            loss = ctx.operator.loss(ctx.model.decode(batch.z0y), batch.y)
        self.losses[ctx.step] = {(int(i), int(p)): float(v) for i, p, v in
                                 zip(batch.image_ids, batch.particle_ids, loss)}
        self.sizes.append(len(batch))
        self.stream_sizes.append(len(batch.streams))


class After(SamplerHook):
    def __init__(self):
        self.sizes = []

    def on_step(self, batch, ctx):
        self.sizes.append((len(batch), len(batch.y), len(batch.streams), len(batch.trajectory[0])))


def _run(toy, ids, particles, pcfg, folder=None, seed=42):
    model, op, gt = toy
    y = measure_images(op, gt[ids], ids, seed)
    batch = initial_batch(model, y, ids, particles, seed, CFG.annealing.sigma_max, torch.device("cpu"))
    obs, hook, after = Observer(), PruningHook(pcfg), After()
    latent_daps(model, op, batch, CFG, hooks=[obs, hook, after])
    return batch, hook, obs, after


def test_step_trigger_fires_once_keeps_k_lowest_and_shrinks_everything(toy, tmp_path):
    batch, hook, obs, after = _run(toy, [0], 4, PruningConfig(step=3, keep=2, sigma_break=None),
                                   RunFolder(tmp_path))
    assert obs.sizes == [4, 4, 4, 4, 2, 2, 2, 2]          # rows seen by the next step's observer
    assert after.sizes[3] == (2, 2, 2, 2) and after.sizes[2] == (4, 4, 4, 4)
    rec = hook.lines[0]
    assert rec["trigger"] == "step" and rec["prune_step"] == 3 and rec["did_prune"]
    at3 = obs.losses[3]
    expect = sorted(range(4), key=lambda p: at3[(0, p)])[:2]
    assert rec["kept_indices"] == expect
    assert sorted(rec["pruned_indices"]) == sorted(set(range(4)) - set(expect))
    assert batch.particle_ids.tolist() == sorted(expect)
    assert batch.zt.shape[0] == batch.y.shape[0] == len(batch.streams) == batch.x.shape[0] == 2
    assert batch.image_ids.tolist() == [0, 0]
    assert all(t.shape[0] == 2 for t in batch.trajectory) and len(batch.trajectory) == CFG.annealing.num_steps
    out = hook.image_output(0, {"psnr": [None, None], "particle_ids": batch.particle_ids.tolist()})
    RunFolder(tmp_path).write_logs_and_trajectories(0, out.jsonl, {})
    lines = [json.loads(s) for s in (tmp_path / "pruning.jsonl").read_text().splitlines()]
    assert len(lines) == 1 and set(lines[0]) == JSONL_FIELDS
    assert lines[0]["batch_before"] == 4 and lines[0]["batch_after"] == 2 and lines[0]["mode"] == "slicing"


def test_transition_trigger(toy):
    sig = EDMScheduler(CFG.annealing.num_steps, CFG.annealing.sigma_max, CFG.annealing.sigma_min, CFG.annealing.timestep).sigma_steps
    brk = float(sig[4] + sig[5]) / 2  # σ_4 ≥ break > σ_5 → transition at step 5
    _, hook, obs, _ = _run(toy, [1], 4, PruningConfig(step=7, keep=3, sigma_break=brk))
    rec = hook.lines[1]
    assert rec["trigger"] == "transition" and rec["prune_step"] == 5
    assert rec["prev_sigma"] >= brk > rec["curr_sigma"]
    assert obs.sizes == [4] * 6 + [3, 3]  # fired once only
    # the step trigger wins when it comes first
    _, hook2, _, _ = _run(toy, [1], 4, PruningConfig(step=2, keep=3, sigma_break=brk))
    assert hook2.lines[1]["trigger"] == "step" and hook2.lines[1]["prune_step"] == 2


def test_several_images_pruned_independently_equal_to_alone(toy):
    pc = PruningConfig(step=3, keep=2, sigma_break=None)
    both, hook, _, _ = _run(toy, [0, 2], 4, pc)
    assert both.image_ids.tolist() == [0, 0, 2, 2]
    for img in (0, 2):
        alone, h1, _, _ = _run(toy, [img], 4, pc)
        assert h1.lines[img]["kept_indices"] == hook.lines[img]["kept_indices"]
        rows = both.rows_of_image(img)
        assert both.particle_ids[rows].tolist() == alone.particle_ids.tolist()
        assert torch.allclose(both.x[rows], alone.x, atol=1e-5)


def test_shadow_keeps_all_running_and_reports_regret(toy):
    model, op, gt = toy
    batch, hook, obs, _ = _run(toy, [0], 4, PruningConfig(step=3, keep=2, mode="shadow", sigma_break=None))
    assert obs.sizes == [4] * 8 and len(batch) == 4
    rec = hook.lines[0]
    assert rec["batch_after"] == 4 and len(rec["pruned_indices"]) == 2
    assert batch.pruned.tolist() == [p in rec["pruned_indices"] for p in batch.particle_ids.tolist()]
    p = psnr(batch.x, gt[0:1]).tolist()
    image = {"image_idx": 0, "psnr": p, "particle_ids": batch.particle_ids.tolist()}
    image.update(hook.image_output(0, image).record)
    best = max(range(4), key=lambda i: p[i])
    assert image["pruning"]["pruning_regret"] == (best in rec["pruned_indices"])
    assert summarize([image])["regret_images"] == int(best in rec["pruned_indices"])


def _by_particle(batch, ids):
    rows = {int(p): r for r, p in enumerate(batch.particle_ids.tolist())}
    return [rows[p] for p in ids]


def test_modes_prune_alike_kept_identical_masking_frozen_shadow_running(toy):
    """The three modes prune the same particles and their kept particles are bit-identical; masking's
    pruned particles stay at their z0y of the prune step (no later work), shadow's run on."""
    model = toy[0]
    runs = {m: _run(toy, [0], 4, PruningConfig(step=3, keep=2, mode=m, sigma_break=None))
            for m in ("slicing", "masking", "shadow")}
    kept = runs["slicing"][1].lines[0]["kept_indices"]
    pruned = sorted(set(range(4)) - set(kept))
    assert all(h.lines[0]["kept_indices"] == kept for _, h, _, _ in runs.values())
    sl = runs["slicing"][0]
    assert runs["masking"][2].sizes == [4] * 4 + [2] * 4       # frozen rows take no later step
    assert runs["shadow"][2].sizes == [4] * 8
    for mode in ("masking", "shadow"):
        b = runs[mode][0]
        assert len(b) == 4 and b.particle_ids.tolist() == [0, 1, 2, 3]
        k_rows = _by_particle(b, sorted(kept))
        assert torch.equal(b.x[k_rows], sl.x) and torch.equal(b.zt[k_rows], sl.zt)
        assert b.pruned.tolist() == [p in pruned for p in range(4)]
        assert runs[mode][1].lines[0]["batch_after"] == (2 if mode == "masking" else 4)
    masked, shadow = runs["masking"][0], runs["shadow"][0]
    p_rows = _by_particle(masked, pruned)
    z0y_at_prune = shadow.trajectory[3][p_rows]                # identical in every mode up to the prune
    assert torch.equal(masked.zt[p_rows], z0y_at_prune)
    assert all(torch.equal(t[p_rows], z0y_at_prune) for t in masked.trajectory[3:])
    assert torch.equal(masked.x[p_rows], model.decode(z0y_at_prune))
    assert not torch.equal(shadow.zt[p_rows], z0y_at_prune)    # shadow particles kept moving


def test_pruned_flag_selection_among_kept_oracle_among_all(toy):
    """selected_idx (lowest loss) is taken among the kept particles, best_idx (PSNR) among all."""
    from cores.evaluation import image_record

    model, op, gt = toy
    x = torch.stack([gt[0], gt[0].flip(-2, -1), gt[1], gt[0] * 0.5])  # particle 0 is the exact image
    losses = torch.tensor([0.0, 1.0, 3.0, 2.0])
    plain = image_record(0, x, gt[0], losses, [0, 1, 2, 3], 20.0, use_lpips=False)
    assert plain["best_idx"] == 0 and plain["selected_idx"] == 0 and plain["pruned"] == [False] * 4
    rec = image_record(0, x, gt[0], losses, [0, 1, 2, 3], 20.0, use_lpips=False,
                       pruned=[True, True, False, False])
    assert rec["best_idx"] == 0 and rec["selected_idx"] == 3 and rec["pruned"] == [True, True, False, False]


def test_masking_pipeline_records_every_particle_with_flags(tmp_path):
    from conftest import compose
    from cores.pipeline import run

    cfg = compose(["sampler.annealing.num_steps=6", "sampler.mcmc.num_steps=2", "data.end_id=1", "num_samples=3",
                   "eval.lpips=false", f"save_dir={tmp_path}", "name=run", "pruning_step=2", "pruning_keep=2",
                   "pruning_mode=masking", "hard_data_consistency=1", "optimization_max_iters=2"])
    (rec,) = run(cfg)["images"]
    assert rec["particle_ids"] == [0, 1, 2] and sum(rec["pruned"]) == 1
    gone = rec["pruned"].index(True)
    assert rec["pruning"]["pruned_indices"] == [gone] and rec["pruning"]["pruning_regret"] is not None
    assert rec["selected_idx"] != gone
    # the frozen particle did no hard data consistency: no before-optimisation PSNR
    assert rec["optimization"]["particle_ids"] == [p for p in range(3) if p != gone]
    assert rec["psnr_before_optimization"][gone] is None
    assert all(rec["psnr_before_optimization"][i] is not None for i in range(3) if i != gone)


def test_regret_helper():
    assert pruning_regret([10.0, 30.0, 20.0, 5.0], [0, 1, 2, 3], [1, 3])["pruning_regret"] is True
    r = pruning_regret([10.0, 30.0, 20.0, 5.0], [0, 1, 2, 3], [0, 3])
    assert r["pruning_regret"] is False and r["best_kept_psnr"] == 30.0 and r["pruning_regret_db"] == 0.0
    assert pruning_regret([10.0, 30.0], [0, 1], [1])["pruning_regret_db"] == pytest.approx(20.0)


def test_selection_rules():
    losses = torch.tensor([1.00, 1.01, 1.02, 5.0])
    feats = torch.tensor([[0.0], [0.1], [10.0], [20.0]])
    assert select_by_loss(losses, 2) == [0, 1]
    assert select_by_diversity(losses, feats, 2, tol=0.5) == [0, 2]     # far one within tolerance
    assert select_by_diversity(losses, feats, 3, tol=0.5) == [0, 2, 1]
    assert select_by_diversity(losses, feats, 2, tol=0.001) == [0, 1]   # no candidate → loss order
    assert select_by_diversity(losses, feats, 2, tol=10.0) == [0, 3]    # particle 3 now a candidate
    assert select_by_loss(torch.tensor([float("nan"), 2.0, 1.0]), 2) == [2, 1]


def test_pipeline_outputs_hold_k_particles(tmp_path):
    from PIL import Image

    from conftest import compose
    from cores.pipeline import run

    cfg = compose(["sampler.annealing.num_steps=6", "sampler.mcmc.num_steps=2", "data.end_id=2", "num_samples=3",
                   "eval.lpips=false", f"save_dir={tmp_path}", "name=run", "pruning_step=2", "pruning_keep=2",
                   "save_traj=true", "traj_every=2", "grid_max_images=2"])
    metrics = run(cfg)
    root = tmp_path / "run"
    for rec in metrics["images"]:
        assert len(rec["psnr"]) == 2 and len(rec["particle_ids"]) == 2
        assert rec["pruning"]["did_prune"] and len(rec["pruning"]["kept_indices"]) == 2
        assert len(rec["timing"]["per_step_sec"]) == 6
    assert len(list((root / "samples").glob("*.png"))) == 4
    assert len(list((root / "trajectory").glob("*.png"))) == 4
    pruned = sorted(p.name for p in (root / "trajectory_pruned").glob("*.png"))
    assert len(pruned) == 2
    # a pruned strip holds frames up to the pruning step only: steps 0, 2 → 2 frames; survivors 0, 2, 4, 5 → 4
    w_pruned = Image.open(root / "trajectory_pruned" / pruned[0]).width
    w_kept = Image.open(next((root / "trajectory").glob("*.png"))).width
    assert w_kept == 2 * w_pruned
    lines = [json.loads(s) for s in (root / "pruning.jsonl").read_text().splitlines()]
    assert [ln["image_idx"] for ln in lines] == [0, 1] and all(set(ln) - {"pruned_trajectories"} == JSONL_FIELDS
                                                                for ln in lines)
    # each pruned particle's strip is named by its original id and listed in its pruning.jsonl line
    assert sorted(Path(p).name for ln in lines for p in ln["pruned_trajectories"]) == pruned
    assert all(f"_pruned{k:02d}.png" in " ".join(ln["pruned_trajectories"]) for ln in lines for k in ln["pruned_indices"])
    grid = Image.open(root / "grid_results.png")
    # 2 rows × (gt, measurement, 2 particles), tiles of 128 px (64 px toy images, nearest ×2) plus captions
    assert grid.width >= 4 * 128 and grid.height > 2 * 128


def test_pruning_trigger_is_the_originals_with_repulsion_off(tmp_path):
    """As the original (DAPS/sampler.py 603-613 at b967b2b): the σ_break transition triggers the prune too,
    repulsion on or not: pruning_step=40 at scale 0 prunes at 30 (σ_29 ≥ 1.0 > σ_30); an earlier step wins."""
    from conftest import compose
    from cores.pipeline import run

    base = ["sampler.mcmc.num_steps=1", "data.end_id=1", "num_samples=3", "eval.lpips=false", f"save_dir={tmp_path}",
            "pruning_keep=2"]
    rec = run(compose(base + ["name=p40", "pruning_step=40"]))["images"][0]["pruning"]
    assert rec["prune_step"] == 30 and rec["trigger"] == "transition"
    rec = run(compose(base + ["name=p40rep", "pruning_step=40", "repulsion_scale=1"]))["images"][0]["pruning"]
    assert rec["prune_step"] == 30 and rec["trigger"] == "transition"
    rec = run(compose(base + ["name=p20", "pruning_step=20"]))["images"][0]["pruning"]
    assert rec["prune_step"] == 20 and rec["trigger"] == "step"


def test_kept_identical_across_modes_with_repulsion_on_after_the_prune(toy):
    """Shadow particles form their own repulsion group: they never push the kept ones."""
    from cores.config import RepulsionConfig
    from repulsion import RepulsionHook

    model, op, gt = toy
    y = measure_images(op, gt[[0]], [0], 42)
    out = {}
    for mode in ("slicing", "masking", "shadow"):
        batch = initial_batch(model, y, [0], 4, 42, CFG.annealing.sigma_max, torch.device("cpu"))
        rep = RepulsionHook(RepulsionConfig(scale=5.0, sigma_break=0.0, feature="pixel"), model)
        hook = PruningHook(PruningConfig(step=3, keep=2, mode=mode, sigma_break=None))
        latent_daps(model, op, batch, CFG, hooks=[rep, hook])
        kept = hook.lines[0]["kept_indices"]
        out[mode] = batch.x[_by_particle(batch, sorted(kept))]
    assert torch.equal(out["masking"], out["slicing"]) and torch.equal(out["shadow"], out["slicing"])


def test_diversity_features_see_repulsions_dino_input():
    """pruning_criterion=diversity with DINO features takes `dino.preprocess` from the run's config (the
    original study's input by default), decided per image as repulsion's is."""
    from conftest import FIXTURES, TINY, compose
    from cores.config import build_run_config
    from cores.dino import DinoFeatureExtractor
    from cores.pruning import _dino_feature_fn

    base = TINY + ["pruning_step=1", "pruning_criterion=diversity", "repulsion_feature=dino"]
    assert build_run_config(compose(base)).pruning.dino_preprocess == "original"
    assert build_run_config(compose(base + ["dino.preprocess=raw"])).pruning.dino_preprocess == "raw"

    weights = str(FIXTURES / "dino_tiny_vits16.pth")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 32, 32, generator=g) * 2 - 1
    x[2:] = x[2:] * 0.5 + 0.5  # image 1's rows stay above 0: the original shift depends on the image
    ids = torch.tensor([0, 0, 1, 1])
    feats = _dino_feature_fn(weights, "original")(None, x, ids)
    original = DinoFeatureExtractor(weights_path=weights, preprocess="original")
    torch.testing.assert_close(feats, original(x, ids))
    torch.testing.assert_close(feats[2:], original(x[2:]))  # image 1 as if alone
    raw = DinoFeatureExtractor(weights_path=weights, preprocess="raw")(x)
    assert not torch.allclose(feats, raw)
