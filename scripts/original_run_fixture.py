"""Write a tiny run folder with the original study's own code, for the parser's format tests.

    python scripts/original_run_fixture.py ORIGINAL_DAPS_DIR OUT_DIR

ORIGINAL_DAPS_DIR is the original study's `DAPS/` folder (GitHub yuzzznh/diffusion_phase_retrieval,
commit b967b2b), exported outside this repository, e.g.

    git -C <mirror> archive b967b2b DAPS | tar -x -C /tmp/orig     # or `git show` file by file

Its `posterior_sample.main` runs unchanged: its data loader reads two 16 px images, its phase
retrieval operator measures them, its `Evaluator` (eval.py: piq PSNR/SSIM, per-image statistics,
`aggregate_results`) scores the samples, and its own code writes `config.yaml`, `metrics.json`,
`eval.md`, `samples/` and `grid_results.png`.  Only what needs a GPU, checkpoints or network is
replaced: the device is the CPU, the sampler returns the ground truth plus fixed noise per
particle (with the `timing_info` fields its LatentDAPS sets, sampler.py:734), the LPIPS network
is a pixel distance (piq's weights need a download), and wandb / setproctitle / imageio / FID
are absent.  The numbers are therefore not a study result; the format is the original's.
"""
from __future__ import annotations

import sys
import time
import types
from pathlib import Path

import numpy as np
import torch


def _module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    return mod


class NoisyCopySampler:
    """Stands in for the original LatentDAPS: particle k = ground truth + noise of level 0.05·(k+1)."""

    def __init__(self, **_):
        self.repulsion_info = {"repulsion_enabled": False}
        self.optimization_info = {"optimization_enabled": False}
        self.vram_segments = {}

    def get_start(self, n, model):
        return torch.zeros(n, 3, 16, 16)

    def sample(self, model, x_start, operator, y, evaluator, gt=None, **_):
        start = time.time()
        gen = torch.Generator().manual_seed(int(gt.abs().sum().item() * 1000) % 2 ** 31)
        levels = torch.tensor([0.05 * (k + 1) for k in range(gt.shape[0])]).view(-1, 1, 1, 1)
        out = (gt + levels * torch.randn(gt.shape, generator=gen)).clamp(-1, 1)
        steps = [0.001 * (s + 1) for s in range(5)]
        self.timing_info = {"total_seconds": time.time() - start + sum(steps), "total_steps": len(steps),
                            "per_step_seconds": steps, "mean_step_seconds": float(np.mean(steps)),
                            "std_step_seconds": float(np.std(steps))}
        return out


class PixelLPIPS(torch.nn.Module):
    """piq.LPIPS's call signature; mean absolute pixel difference instead of VGG features."""

    def __init__(self, replace_pooling=True, reduction="none"):
        super().__init__()

    def forward(self, x, y):
        return (x - y).abs().flatten(1).mean(1)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    orig, out = Path(argv[0]).resolve(), Path(argv[1]).resolve()
    import tempfile

    scratch = Path(tempfile.mkdtemp())
    data = scratch / "test-imagenet"   # named as their configs/data/test-imagenet.yaml root
    data.mkdir()
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(data / f"{i:05d}.png")

    import piq

    piq.LPIPS = PixelLPIPS
    _module("wandb", init=lambda **k: None, log=lambda *a, **k: None)
    _module("setproctitle", setproctitle=lambda name: None)
    _module("imageio", get_writer=None)
    _module("evaluate_fid", calculate_fid=None)
    _module("sampler", get_sampler=lambda **k: NoisyCopySampler(**k), Trajectory=object)
    _module("model", get_model=lambda **k: torch.nn.Identity())
    sys.path.insert(0, str(orig))
    import runpy

    import utils as original_utils

    original_utils.setup_device = lambda use_tpu, gpu_id=0, seed=42: (torch.manual_seed(seed),  # noqa: E731
                                                                      torch.device("cpu"))[1]
    sys.argv = ["posterior_sample.py", "+data=test-imagenet", f"data.root={data}", "data.resolution=16",
                "data.start_id=1", "data.end_id=3", "+model=imagenet256ldm", "+sampler=latent_edm_daps", "+task=phase_retrieval",
                "task_group=ldm_langevin", f"save_dir={out.parent}", f"name={out.name}", "save_traj=false",
                "num_samples=4", "sampler.diffusion_scheduler_config.num_steps=2",
                "sampler.annealing_scheduler_config.num_steps=50", "repulsion_scale=0.0", "pruning_step=-1",
                "hard_data_consistency=-1", f"hydra.run.dir={scratch}/hydra"]
    import os

    os.chdir(orig)
    try:  # their script as `python posterior_sample.py ...` runs it (Hydra finds configs/ beside it)
        runpy.run_path(str(orig / "posterior_sample.py"), run_name="__main__")
    except SystemExit as stop:
        return int(stop.code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
