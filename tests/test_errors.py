"""Bad inputs give one line naming the setting before any heavy work, and leave the folder alone;
a NaN in one particle is contained and reported."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, compose
from test_resume import env1, per_image

SMALL = ["sampler.annealing.num_steps=3", "sampler.mcmc.num_steps=3", "num_samples=3", "batch_size=1",
         "data.end_id=2", "eval.lpips=false"]


pytestmark = pytest.mark.usefixtures("one_thread")


def run_cfg(overrides):
    from cores.pipeline import run

    return run(compose(overrides))


def folder_state(root: Path):
    return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def bad_images(tmp_path) -> Path:
    d = tmp_path / "imgs"
    d.mkdir()
    for p in sorted((ROOT / "dataset" / "demo-ffhq").iterdir())[:3]:
        shutil.copy(p, d / p.name)
    good = (d / "00001.png").read_bytes()
    (d / "00001.png").write_bytes(good[: len(good) // 2])  # truncated
    return d


CASES = [
    (["num_samples=0"], "num_samples=0"),
    (["pruning_step=1", "pruning_keep=3"], "pruning_keep=3"),
    (["repulsion_sigma_break=20"], "repulsion_sigma_break=20"),
    (["repulsion_sigma_break=-1"], "repulsion_sigma_break=-1"),
    (["data.start_id=2", "data.end_id=2"], "data.start_id=2"),
    (["data.start_id=8", "data.end_id=12"], "data.end_id=12"),  # the demo folder holds 10 images
    (["data.start_id=12", "data.end_id=14"], "data.start_id=12"),
    (["data.resolution=128", "task.resolution=128"], "data.resolution=128"),
    (["data.resolution=128"], "task.resolution"),
    (["data.root=/nonexistent/images"], "data.root"),
    (["shard=0", "num_shards=4"], "shard=0"),  # 2 images over 4 shards: shard 0 gets none
    (["device=cuda"], "device=cuda"),
    (["use_tpu=true"], "use_tpu"),
    (["model=ffhq256ldm", "model.diffusion_path=/nonexistent/ldm.ckpt"], "download.sh"),
]


@pytest.mark.parametrize("bad,needle", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_setting_one_line_before_work(bad, needle, tmp_path, monkeypatch):
    from cores.pipeline import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    base = SMALL + [f"save_dir={tmp_path}", "name=run"]
    with pytest.raises((ConfigError, FileNotFoundError)) as err:
        run_cfg(base + bad)
    msg = str(err.value)
    assert needle in msg, msg
    assert "\n" not in msg and len(msg) < 400
    assert not (tmp_path / "run").exists(), "the folder was touched before the error"


def test_unreadable_image_named(tmp_path, bad_images):
    from cores.pipeline import ConfigError

    with pytest.raises(ConfigError, match="00001.png") as err:
        run_cfg(SMALL + [f"save_dir={tmp_path}", "name=run", f"data.root={bad_images}", "data.end_id=3"])
    assert "data.root" in str(err.value)


def test_errors_leave_an_existing_run_untouched(tmp_path):
    from cores.pipeline import ConfigError

    base = SMALL + [f"save_dir={tmp_path}", "name=run"]
    run_cfg(base)
    before = folder_state(tmp_path / "run")
    for bad in (["resume=true", "num_samples=0"], ["resume=true", "num_samples=2"], ["resume=true", "data.end_id=40"],
                ["resume=true", "pruning_step=0", "pruning_keep=5"], []):
        with pytest.raises(ConfigError):
            run_cfg(base + bad)
    assert folder_state(tmp_path / "run") == before


def test_entry_point_exit_codes_and_single_line(tmp_path):
    bad = subprocess.run([sys.executable, "posterior_sample.py", "num_sample=3", f"save_dir={tmp_path}"],
                         cwd=ROOT, env=env1(), capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "num_sample" in bad.stderr and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) <= 8  # Hydra's own short message
    cfg_err = subprocess.run([sys.executable, "posterior_sample.py", "num_samples=2", "pruning_step=1",
                              "pruning_keep=2", f"save_dir={tmp_path}"],
                             cwd=ROOT, env=env1(), capture_output=True, text=True, timeout=120)
    assert cfg_err.returncode == 2
    assert cfg_err.stderr.strip().splitlines() == [
        "error: pruning_keep=2 must be >= 1 and < num_samples=2"]
    assert not (tmp_path / "default").exists()  # not even Hydra's .hydra_logs


# ---------------------------------------------------------------------------------- NaN containment
class NaNInjector(torch.nn.Module):
    """Wraps a model; the `at`-th decode with gradient (an MCMC step) or the final decode returns NaN in `row`."""

    def __init__(self, inner, row: int, at: int = -1, final: bool = False):
        super().__init__()
        self.inner, self.row, self.at, self.final, self.calls = inner, row, at, final, 0
        self.image_resolution = inner.image_resolution

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)

    def decode(self, z):
        out = self.inner.decode(z)
        hit = False
        if z.requires_grad:
            self.calls += 1
            hit = self.calls == self.at
        elif self.final:  # the decode of the final latents: the first no-grad one after MCMC
            hit = self.calls > 0
        if hit and z.shape[0] > self.row:
            mask = torch.zeros(z.shape[0], 1, 1, 1, dtype=torch.bool)
            mask[self.row] = True
            out = out * torch.where(mask, float("nan"), 1.0)  # NaN also in that row's gradient
            self.at, self.final = -1, False  # once
        return out


@pytest.mark.parametrize("where", ["mcmc", "final"])
def test_nan_in_one_particle_is_contained_and_reported(tmp_path, monkeypatch, where):
    import cores.pipeline as pipeline

    base = SMALL + [f"save_dir={tmp_path}"]
    clean = run_cfg(base + ["name=clean"])
    real_build = pipeline.build_model
    row = 1
    monkeypatch.setattr(pipeline, "build_model", lambda mcfg, dev: NaNInjector(
        real_build(mcfg, dev), row, at=5 if where == "mcmc" else -1, final=where == "final"))
    hurt = run_cfg(base + ["name=hurt"])
    a, b = per_image(clean), per_image(hurt)
    assert a[1] == b[1], "an image that never saw a NaN changed"
    for key in ("psnr", "ssim", "psnr_twin", "measurement_loss"):
        assert [v for i, v in enumerate(a[0][key]) if i != row] == [v for i, v in enumerate(b[0][key]) if i != row]
    on_disk = json.loads((tmp_path / "hurt" / "metrics.json").read_text())
    if where == "mcmc":  # reset to z0hat at that step, reported per particle
        assert b[0]["nan_events"] == [{"step": 1, "image_idx": 0, "particle": row, "stage": "mcmc"}]
        assert on_disk["numerics"]["nan_events"] == 1 and on_disk["numerics"]["images_with_nan_events"] == [0]
    else:  # the particle's final image is non-finite: excluded from best/selected, counted
        assert b[0]["non_finite_particles"] == [row] and b[0]["psnr"][row] is None
        assert b[0]["best_idx"] != row and b[0]["selected_idx"] != row
        assert on_disk["numerics"]["non_finite_particles"] == 1
        assert on_disk["summary"]["non_finite_particles"] == 1
    assert json.loads((tmp_path / "clean" / "metrics.json").read_text())["numerics"]["nan_events"] == 0
