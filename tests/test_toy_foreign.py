"""The toy prior's "not one of my components" warning compares what the prior renders: a faithful
re-encode of a demo image (within one 8-bit level per pixel) is one of its images, another image is not."""
from __future__ import annotations

import torch

from tests.conftest import ROOT


def test_faithful_re_encode_is_a_component_and_another_image_is_not():
    from cores.data import ImageFolder
    from cores.models import build_model

    model = build_model({"name": "toy", "prior_images": [str(ROOT / "dataset/demo-imagenet")], "std": 0.05,
                         "include_twins": False}, torch.device("cpu"))
    ds = ImageFolder(ROOT / "dataset/demo-imagenet", 64, 0, 3)
    x = torch.stack([ds[i] for i in range(len(ds))])
    assert model.foreign_rows(x) == []
    gen = torch.Generator().manual_seed(0)
    level = 2.0 / 255  # one 8-bit level in [-1, 1]
    off_by_one = (x + level * torch.randint(-1, 2, x.shape, generator=gen)).clamp(-1, 1)
    assert model.foreign_rows(off_by_one) == []
    shifted = torch.roll(x, shifts=3, dims=-1)  # another picture of the same statistics
    darker = (x - 4 * level).clamp(-1, 1)
    assert model.foreign_rows(torch.cat([shifted, darker])) == [0, 1, 2, 3, 4, 5]
