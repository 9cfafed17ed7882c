"""cuDNN benchmark's algorithm trials stay out of a run's reported VRAM (cores/warmup.py, cores/vram.py).

On CPU nothing is benchmarked, so the memory counters are a fake (`FakeStats`) and the warm-up is
forced; the GPU check of the same logic is `scripts/vram_check.py`."""
import json
from types import SimpleNamespace

import pytest
import torch

from conftest import compose
from cores.vram import VramMeter, merge_vram
from cores.warmup import run_row_counts, warm_up_run


class FakeStats:
    """Peak counters in MiB: `base` is what stays alive; a simulated trial raises the peak."""

    def __init__(self, base: float = 100.0):
        self.base, self.peak, self.log = base, base, []

    def max_allocated_mb(self) -> float:
        return self.peak

    def max_reserved_mb(self) -> float:
        return self.peak + 10

    def reset_peak(self) -> None:
        self.log.append("reset")
        self.peak = self.base

    def release_cache(self) -> None:
        self.log.append("release")


def pruning(on=True, mode="slicing", keep=2, refill=False):
    return SimpleNamespace(on=on, mode=mode, keep=keep, refill=refill)


def test_row_counts_cover_batches_and_pruning():
    assert run_row_counts(4, 1, 3) == [4]
    assert run_row_counts(4, 1, 3, pruning()) == [2, 4]
    assert run_row_counts(4, 4, 10, pruning()) == [4, 8, 16]           # batches of 4, last of 2 images
    assert run_row_counts(4, 2, 3, pruning(mode="masking", keep=1)) == [1, 2, 4, 8]
    assert run_row_counts(4, 1, 1, pruning(mode="shadow")) == [4]      # shadow keeps every row running
    assert run_row_counts(4, 1, 1, pruning(refill=True)) == [4]        # refill restores the count
    assert run_row_counts(4, 1, 1, pruning(on=False)) == [4]
    assert run_row_counts(4, 1, 0) == []


class SpyModel:
    """Decoder stand-in that logs (rows, grad) per call and raises the fake peak at a new shape."""

    def __init__(self, stats: FakeStats):
        self.stats, self.seen, self.w = stats, set(), torch.ones(())

    def get_in_shape(self):
        return (3, 2, 2)

    def decode(self, z):
        key = (z.shape[0], torch.is_grad_enabled() and z.requires_grad)
        self.stats.log.append(("decode",) + key)
        if key not in self.seen:  # a cuDNN trial: a large transient workspace
            self.seen.add(key)
            self.stats.peak = max(self.stats.peak, 60000.0)
        return z * self.w


class SpyHook:
    def __init__(self, stats):
        self.stats = stats

    def warm_up(self, model, z):
        self.stats.log.append(("hook", z.shape[0]))


def test_warm_up_runs_every_shape_before_the_reset_and_peak_excludes_trials():
    stats = FakeStats()
    meter = VramMeter(torch.device("cpu"), stats=stats)
    model = SpyModel(stats)
    rows = run_row_counts(4, 1, 1, pruning())
    assert warm_up_run(model, [SpyHook(stats)], rows, torch.device("cpu"), meter) is None  # CPU: not needed
    assert stats.log == []
    assert warm_up_run(model, [SpyHook(stats)], rows, torch.device("cpu"), meter, force=True, nograd_rows=[1]) == [2, 4]
    meter.start()
    start = len(stats.log) - 1
    warmed = [e for e in stats.log[:start] if isinstance(e, tuple)]
    assert {e[1:] for e in warmed if e[0] == "decode"} == {(1, False), (2, True), (2, False), (4, True), (4, False)}
    assert {e[1] for e in warmed if e[0] == "hook"} == {2, 4}
    assert stats.log[start - 2:] == ["release", "reset", "reset"]  # cache handed back, counters restarted
    # the run: same shapes (no trial), the sampler's own memory
    for n, grad in ((4, True), (4, False), (2, True)):
        z = torch.zeros(n, 3, 2, 2, requires_grad=grad)
        with torch.set_grad_enabled(grad):
            model.decode(z)
    stats.peak = 250.0
    meter.mark("pre_pruning")
    out = meter.summary()
    assert out["peak_memory_mb"] == 250.0 and out["segments"] == {"pre_pruning": 250.0}
    assert out["autotune_peak_mb"] == 60000.0 and out["autotune_rows"] == [1, 2, 4]
    assert out["peak_reserved_mb"] == 260.0 and out["autotune_peak_reserved_mb"] == 60010.0
    # a shape the warm-up missed would be tuned inside the run and show in its peak (the device check's case)
    model.decode(torch.zeros(3, 3, 2, 2))
    meter.mark()
    assert meter.summary()["peak_memory_mb"] == 60000.0


def test_merge_vram_keeps_the_autotune_lines():
    a = {"peak_memory_mb": 10.0, "segments": {}, "autotune_peak_mb": 900.0, "autotune_rows": [4]}
    b = {"peak_memory_mb": 12.0, "segments": {}, "autotune_peak_mb": 700.0, "autotune_rows": [2, 4]}
    m = merge_vram([a, b])
    assert m["peak_memory_mb"] == 12.0 and m["autotune_peak_mb"] == 900.0 and m["autotune_rows"] == [2, 4]
    assert "autotune_peak_mb" not in merge_vram([{"peak_memory_mb": 1.0, "segments": {}}])


def test_pipeline_warms_every_row_count_before_the_meter_starts(tmp_path, monkeypatch, one_thread):
    """Toy run, 3 images in batches of 2, 3 particles, slicing to 2, pixel repulsion: the warm-up makes
    rows 6, 3 (last batch), 4 and 2 (pruned) with the repulsion hook's networks, before the meter starts;
    metrics.json's peak is the run's, the trials' on their own line, and no warm-up call is counted."""
    import cores.pipeline as P
    import cores.warmup as W

    stats = FakeStats()
    warmed = []
    real = W.warm_up_shapes

    def spy(model, hooks, rows, device, nograd_rows=()):
        warmed.append((list(rows), sorted(type(h).__name__ for h in hooks), list(stats.log), list(nograd_rows)))
        real(model, hooks, rows, device, nograd_rows)
        stats.peak = 60000.0  # the trials' workspace

    over = ["sampler.annealing.num_steps=4", "sampler.mcmc.num_steps=2", "data.end_id=3", "num_samples=3",
            "batch_size=2", "eval.lpips=false", f"save_dir={tmp_path}", "pruning_step=1", "pruning_keep=2",
            "repulsion_scale=1", "repulsion_feature=pixel", "save_traj=true", "traj_every=2"]
    P.run(compose(over + ["name=plain"]))
    monkeypatch.setattr(W, "autotune_on", lambda device: True)
    monkeypatch.setattr(W, "warm_up_shapes", spy)
    monkeypatch.setattr(P, "VramMeter", lambda device: VramMeter(device, stats=stats))
    metrics = P.run(compose(over + ["name=warm"]))
    assert [w[0] for w in warmed] == [[2, 3, 4, 6]] and warmed[0][1] == ["PruningHook", "RepulsionHook"]
    assert warmed[0][3] == [1]  # trajectory frames: one latent per decode
    assert warmed[0][2] == ["reset"]  # only outside_run's own reset came before: the meter had not started
    vram = json.loads((tmp_path / "warm" / "metrics.json").read_text())["vram"]
    assert vram["autotune_peak_mb"] == 60000.0 and vram["autotune_rows"] == [1, 2, 3, 4, 6]
    assert vram["peak_memory_mb"] == 100.0 and max(vram["segments"].values()) == 100.0
    plain = json.loads((tmp_path / "plain" / "metrics.json").read_text())
    assert "autotune_peak_mb" not in plain["vram"]
    assert [r["compute"] for r in metrics["images"]] == [r["compute"] for r in plain["images"]]


@pytest.mark.parametrize("feature", ["pixel", "latent"])
def test_repulsion_warm_up_runs_features_with_and_without_gradient(feature):
    from cores.config import RepulsionConfig
    from repulsion import RepulsionHook

    calls = []

    class Model:
        def decode(self, z):
            calls.append((z.shape[0], torch.is_grad_enabled()))
            return z * 2

    hook = RepulsionHook(RepulsionConfig(scale=1.0, feature=feature), Model())
    hook.warm_up(Model(), torch.zeros(4, 3, 2, 2))
    assert calls == ([] if feature == "latent" else [(4, True), (4, False)])
