"""Shared test helpers: repo root on sys.path, fixture paths, Hydra compose of the real configs."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

torch.set_num_threads(2)


def compose(overrides: List[str]):
    """The config `python posterior_sample.py <overrides>` would run with."""
    from hydra import compose as hcompose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return hcompose(config_name="config", overrides=list(overrides))


@pytest.fixture(scope="module")
def one_thread():
    """In-process runs on one thread: two OpenMP threads on a loaded 2-core box are ~20x slower
    for these tiny tensors (and torchrun workers run with one thread too)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def toy_twins_ffhq4():
    """(toy prior with twins, 64-px phase retrieval, ground truths of the first 4 demo-ffhq images)."""
    from cores.data import ImageFolder
    from cores.models import build_model
    from cores.operators import get_operator

    model = build_model({"name": "toy", "prior_images": [str(ROOT / r) for r in ("dataset/demo-ffhq",
                                                                                "dataset/demo-imagenet")],
                         "std": 0.05, "include_twins": True})
    op = get_operator("phase_retrieval", oversample=2.0, resolution=64, sigma=0.05)
    ds = ImageFolder(ROOT / "dataset/demo-ffhq", 64, 0, 4)
    return model, op, model.reference_image(torch.stack([ds[i] for i in range(len(ds))]))


TINY = ["sampler.annealing.num_steps=6", "sampler.mcmc.num_steps=4", "data.end_id=2", "num_samples=2",
        "eval.lpips=false"]


@pytest.fixture
def tiny_overrides(tmp_path) -> List[str]:
    return TINY + [f"save_dir={tmp_path}", "name=run"]


def _triton_interpreter_usable() -> bool:
    """Triton's CPU interpreter runs these kernels from Triton 3.8 on; under 3.6 (the GPU image's) it stops
    with "only 0-dimensional arrays can be converted to Python scalars". There the CUDA tests cover them."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return False
    import triton

    return tuple(int(p) for p in triton.__version__.split(".")[:2]) >= (3, 8)


needs_triton_interpreter = pytest.mark.skipif(not _triton_interpreter_usable(),
                                              reason="needs Triton >= 3.8's interpreter (3.6's cannot run these kernels)")
