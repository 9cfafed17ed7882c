"""Study fidelity: whole-run VRAM peak, toy defaults, use_tpu, baseline logging through the pipeline."""
from __future__ import annotations

import json
import subprocess
import sys
import types

import pytest
import torch

from conftest import ROOT, TINY, compose


class FakeCuda:
    """Stands in for torch.cuda's peak-memory counter: `alloc(mb)` raises the running peak."""

    def __init__(self):
        self.peak = 0.0

    def alloc(self, mb: float) -> None:
        self.peak = max(self.peak, mb)

    def max_memory_allocated(self, device=None) -> float:
        return self.peak * 2 ** 20

    def reset_peak_memory_stats(self, device=None) -> None:
        self.peak = 0.0


def test_run_peak_is_max_over_every_segment(monkeypatch):
    """A hook that starts a new segment (the optimisation resets the counter) cannot hide the
    sampling phase's higher peak: the run peak is ≥ every segment and ≥ the sampling phase."""
    from cores.vram import VramMeter

    fake = FakeCuda()
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", fake.max_memory_allocated)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", fake.reset_peak_memory_stats)
    meter = VramMeter(torch.device("cuda", 0))
    meter.start()
    fake.alloc(800)                 # sampling with 4 particles
    meter.mark("pre_pruning")
    fake.alloc(450)                 # after pruning to 2
    meter.mark()                    # the optimisation hook closes the sampling phase ...
    fake.alloc(300)
    meter.mark("optimization")      # ... and measures its own segment
    out = meter.summary()
    assert out["segments"] == {"pre_pruning": 800.0, "optimization": 300.0}
    assert out["peak_memory_mb"] == 800.0
    assert out["peak_memory_mb"] >= max(out["segments"].values())


def test_toy_repulsion_runs_with_default_features(tmp_path):
    """`python posterior_sample.py repulsion_scale=10` on the toy needs no DINO weights (pixel features)."""
    from cores.pipeline import run

    cfg = compose(TINY + [f"save_dir={tmp_path}", "name=rep", "repulsion_scale=10"])
    assert cfg.repulsion_feature == "pixel"
    metrics = run(cfg)
    assert metrics["metadata"]["repulsion"]["feature"] == "pixel"
    assert metrics["metadata"]["compile_sec"] == 0  # nothing compiled on the exact path
    lines = [json.loads(s) for s in (tmp_path / "rep" / "repulsion.jsonl").read_text().splitlines()]
    assert lines and all(l["feature"] == "pixel" for l in lines) and any(l["repulsion_on"] for l in lines)
    assert compose(["model=ffhq256ldm"]).repulsion_feature == "dino"  # the real models keep DINO


def test_compile_time_of_an_earlier_job_in_the_process_is_not_charged(tmp_path):
    """Hydra's basic launcher runs a sweep's jobs in one process: a compile before this run (here
    a small torch.compile) must not show up in this exact-path run's `compile_sec`."""
    from cores.pipeline import run
    from cores.speed import compile_seconds

    before = compile_seconds()
    fn = torch.compile(lambda x: (x * 2).sin(), backend="aot_eager")
    fn(torch.randn(3))
    assert compile_seconds() > before  # the process total did grow
    metrics = run(compose(TINY + [f"save_dir={tmp_path}", "name=after_compile"]))
    assert metrics["metadata"]["compile_sec"] == 0


def test_baseline_logging_through_the_pipeline(tmp_path):
    """Exp0's `repulsion_log_baseline`: repulsion.jsonl at scale 0, the same samples as without it."""
    from cores.pipeline import run

    a = run(compose(TINY + [f"save_dir={tmp_path}", "name=a"]))
    b = run(compose(TINY + [f"save_dir={tmp_path}", "name=b", "repulsion_log_baseline=true"]))
    assert [r["psnr"] for r in a["images"]] == [r["psnr"] for r in b["images"]]
    for p in (tmp_path / "a" / "samples").iterdir():
        assert p.read_bytes() == (tmp_path / "b" / "samples" / p.name).read_bytes()
    assert not (tmp_path / "a" / "repulsion.jsonl").exists()
    lines = [json.loads(s) for s in (tmp_path / "b" / "repulsion.jsonl").read_text().splitlines()]
    assert {l["step"] for l in lines} == {0, 1, 2, 5} and not any(l["repulsion_on"] for l in lines)
    assert all(l["mean_pairwise_dino_dist"] > 0 and l["weights_mean"] is not None for l in lines)


def test_use_tpu_without_torch_xla_is_one_line():
    res = subprocess.run([sys.executable, "posterior_sample.py", "use_tpu=true", "save_dir=/tmp/never"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    if res.returncode == 0:
        pytest.skip("torch_xla is installed here")
    assert res.returncode == 2 and "torch_xla" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_use_tpu_runs_on_the_xla_device_with_a_step_marker(tmp_path, monkeypatch):
    """With torch_xla importable (a stand-in here), the run uses its device and marks every annealing step."""
    from cores.pipeline import run

    marks = []
    xm = types.ModuleType("torch_xla.core.xla_model")
    xm.xla_device = lambda: torch.device("cpu")
    xm.mark_step = lambda: marks.append(1)
    pkg, core = types.ModuleType("torch_xla"), types.ModuleType("torch_xla.core")
    pkg.core, core.xla_model = core, xm
    monkeypatch.setitem(sys.modules, "torch_xla", pkg)
    monkeypatch.setitem(sys.modules, "torch_xla.core", core)
    monkeypatch.setitem(sys.modules, "torch_xla.core.xla_model", xm)
    metrics = run(compose(TINY + [f"save_dir={tmp_path}", "name=xla", "use_tpu=true", "batch_size=1"]))
    assert metrics["metadata"]["device"] == "cpu" and len(metrics["images"]) == 2
    assert len(marks) == 2 * 6  # 2 images, one batch each, 6 annealing steps


def test_ctrl_c_prints_one_line_with_the_resume_command(tmp_path):
    """SIGINT during sampling: exit 130, one stderr line with the finished count and the resume command."""
    import os
    import signal
    import time

    cmd = [sys.executable, "posterior_sample.py", "sampler.annealing.num_steps=40", "sampler.mcmc.num_steps=3",
           "data.end_id=4", "batch_size=1", "eval.lpips=false", f"save_dir={tmp_path}", "name=ctrlc"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    # SIGINT's default action in the child: a background job of a non-interactive shell ignores
    # SIGINT, children inherit that, and the run would then never see the signal
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    records = tmp_path / "ctrlc" / "records"
    while proc.poll() is None and not (records.is_dir() and any(records.glob("*.json"))):
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    lines = [l for l in err.splitlines() if l.startswith("interrupted:")]
    assert proc.returncode == 130, err[-1500:]
    assert len(lines) == 1 and "Traceback" not in err
    assert "image(s) finished" in lines[0] and lines[0].endswith("resume=true")
    assert f"name=ctrlc" in lines[0]


def test_sweep_jobs_get_their_own_folders(tmp_path):
    """`-m num_samples=2,3 name=sweep`: two run folders named from the swept key (shards keep sharing one)."""
    from cores.cli import sweep_folder_override

    res = subprocess.run([sys.executable, "posterior_sample.py", "-m", "num_samples=2,3", "name=sweep",
                          f"save_dir={tmp_path}", "sampler.annealing.num_steps=2", "sampler.mcmc.num_steps=1",
                          "data.end_id=1", "eval.lpips=false"], capture_output=True, text=True, cwd=ROOT,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    found = sorted(p.parent.name for p in (tmp_path / "sweep").glob("*/metrics.json"))
    assert found == ["num_samples=2", "num_samples=3"]
    shard = sweep_folder_override(["-m", "shard=0,1", "num_shards=2", "name=X", "seed=1"])
    assert shard == ["hydra.job.config.override_dirname.exclude_keys=[name,num_shards,seed,shard]"]
    assert sweep_folder_override(["num_samples=2"]) == []
