"""The toy studies' common problem: the exact prior with rot180 twins, 64-px phase retrieval and
the 20 demo images' ground truths (ids: demo-ffhq 0–9, demo-imagenet 100–109)."""
from __future__ import annotations

from typing import List, Tuple

import torch

from cores.data import ImageFolder
from cores.models import build_model
from cores.operators import get_operator

ROOTS = {"dataset/demo-ffhq": 0, "dataset/demo-imagenet": 100}  # image-id offset per folder


def toy_twins_problem(sigma_y: float = 0.05) -> Tuple[object, object, torch.Tensor, List[int]]:
    """(model, operator, ground truths, image ids) for the twin-prior toy studies."""
    model = build_model({"name": "toy", "prior_images": list(ROOTS), "include_twins": True, "std": 0.05}, "cpu")
    operator = get_operator("phase_retrieval", oversample=2.0, resolution=64, sigma=sigma_y)
    xs, ids = [], []
    for root, off in ROOTS.items():
        ds = ImageFolder(root, 64, 0, None)
        xs += [ds[i] for i in range(len(ds))]
        ids += [off + i for i in ds.indices]
    with torch.no_grad():
        gt = model.reference_image(torch.stack(xs))
    return model, operator, gt, ids
