"""The built-in exact prior: a Gaussian mixture in a 3×16×16 latent.

"VAE": encoder = 4×4 average pooling, decoder = fixed bilinear ×4 upsampling
(linear, differentiable) → 3×64×64 images.  Mixture means = encoded demo
images (optionally with their rot180 twins), isotropic std `s`, equal
weights.  Because D(z; σ) is known in closed form, toy runs measure what the
research claims — with the true posterior modes known — in seconds on a CPU.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, List, Sequence, Tuple

import torch
import torch.nn.functional as F

from . import register_model
from .base import LatentModel, Sigma, as_sigma

TOY_RESOLUTION = 64
TOY_FACTOR = 4


class GaussianMixtureLatentPrior(LatentModel):
    """Exact denoiser D(z;σ) = Σ_k π_k(z,σ)·(s²z + σ²μ_k)/(s²+σ²), π_k ∝ N(z; μ_k, (s²+σ²)I)."""

    image_resolution = TOY_RESOLUTION

    def __init__(self, means: torch.Tensor, std: float = 0.05):
        super().__init__()
        self.register_buffer("means", means.float())  # (K, 3, 16, 16)
        self.std = float(std)

    def get_in_shape(self) -> Tuple[int, int, int]:
        return tuple(self.means.shape[1:])  # type: ignore[return-value]

    def component_logits(self, z: torch.Tensor, sigma: Sigma) -> torch.Tensor:
        """log π_k up to a per-row constant, (B, K); computed row by row so batching cannot change it."""
        var = self.std ** 2 + as_sigma(sigma, z).flatten() ** 2  # (1,) or (B,)
        sqdist = (z.unsqueeze(1) - self.means.unsqueeze(0)).pow(2).flatten(2).sum(-1)  # (B, K)
        return -sqdist / (2 * var.view(-1, 1))

    def tweedie(self, z: torch.Tensor, sigma: Sigma) -> torch.Tensor:
        s2 = self.std ** 2
        sig2 = as_sigma(sigma, z) ** 2
        weights = torch.softmax(self.component_logits(z, sigma), dim=1)  # (B, K), stable in log space
        # elementwise product + sum over k (not a matmul): BLAS blocking would make a row's
        # result depend on the batch size, breaking bit-exact batch invariance
        mean_mu = (weights[:, :, None, None, None] * self.means.unsqueeze(0)).sum(1)
        return (s2 * z + sig2 * mean_mu) / (s2 + sig2)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return F.interpolate(z, scale_factor=TOY_FACTOR, mode="bilinear", align_corners=False)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, TOY_FACTOR)

    def reference_image(self, x: torch.Tensor) -> torch.Tensor:
        """decode(encode(x)): in the decoder's range, so exact recovery is attainable."""
        return self.decode(self.encode(x))

    def foreign_rows(self, x: torch.Tensor, tol: float = 2.0 / 255) -> List[int]:
        """Rows of the images `x` that the prior does not render: what it decodes from their latent differs
        from every component's decoded image by more than one 8-bit level (2/255 in [-1, 1]) somewhere.
        The prior knows only its own images, so on any other image it reconstructs a mixture of those
        (≈ 16 dB); a faithful re-encode of one of them (16 bit, another JPEG decoder: within a level)
        is the same image to it."""
        with torch.no_grad():
            mine = self.decode(self.encode(x.to(self.means.device)))                  # (B, 3, H, W)
            comps = self.decode(self.means)                                          # (K, 3, H, W)
            dist = torch.stack([(m.unsqueeze(0) - comps).abs().flatten(1).amax(1) for m in mine])  # (B, K)
        return [int(r) for r in torch.nonzero(dist.amin(1) > tol * 1.001).flatten()]


def demo_image_files(roots: Sequence[str | Path]) -> List[Path]:
    exts = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
    files: List[Path] = []
    for root in roots:
        files += sorted(p for p in Path(root).iterdir() if p.suffix.lower() in exts)
    return files


@register_model("toy")
def build_toy(model_cfg: Any, device: torch.device) -> GaussianMixtureLatentPrior:
    from cores.data import load_image  # local import: data depends on nothing model-specific

    roots = [Path(r) for r in model_cfg["prior_images"]]
    for r in roots:
        if not r.is_dir():
            raise FileNotFoundError(f"model.prior_images: folder {r} does not exist")
    files = demo_image_files(roots)
    if not files:
        raise FileNotFoundError(f"model.prior_images: no images in {[str(r) for r in roots]}")
    images = torch.stack([load_image(f, TOY_RESOLUTION) for f in files])
    means = F.avg_pool2d(images, TOY_FACTOR)
    if model_cfg.get("include_twins", False):
        means = torch.cat([means, means.flip(-2, -1)])
    return GaussianMixtureLatentPrior(means, std=float(model_cfg.get("std", 0.05))).to(device)
