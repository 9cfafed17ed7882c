"""The model interface the sampler relies on.

A latent model bundles a denoiser (x0-prediction in the EDM σ parameterisation)
and a first stage (encoder/decoder between latent and image space).  The
sampler only ever calls the methods below, so the exact toy prior and the real
CompVis LDMs are interchangeable.
"""
from __future__ import annotations

from typing import List, Tuple, Union

import torch
from torch import nn

Sigma = Union[float, torch.Tensor]


class LatentModel(nn.Module):
    """Base class: subclasses implement `tweedie`, `decode`, `encode`, `get_in_shape`."""

    #: side length (pixels) of the images the first stage produces
    image_resolution: int = 256

    def tweedie(self, z: torch.Tensor, sigma: Sigma) -> torch.Tensor:
        """Posterior mean E[z0 | z_σ = z] (the denoiser D(z; σ))."""
        raise NotImplementedError

    def score(self, z: torch.Tensor, sigma: Sigma) -> torch.Tensor:
        """∇ log p_σ(z) = (D(z; σ) − z) / σ²."""
        return (self.tweedie(z, sigma) - z) / as_sigma(sigma, z) ** 2

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent → image in [-1, 1] (differentiable)."""
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Image in [-1, 1] → latent."""
        raise NotImplementedError

    def get_in_shape(self) -> Tuple[int, int, int]:
        """Shape (C, H, W) of one latent."""
        raise NotImplementedError

    def reference_image(self, x: torch.Tensor) -> torch.Tensor:
        """Ground truth a run is scored against (the image itself for real models)."""
        return x

    def foreign_rows(self, x: torch.Tensor) -> List[int]:
        """Rows of `x` the prior cannot represent at all (a prior built from a few images: the
        toy); a learned prior claims none."""
        return []


def as_sigma(sigma: Sigma, like: torch.Tensor) -> torch.Tensor:
    """σ as a tensor broadcastable against a (B, C, H, W) batch `like`."""
    s = torch.as_tensor(sigma, dtype=like.dtype, device=like.device)
    if s.ndim == 1:
        s = s.view(-1, *([1] * (like.ndim - 1)))
    return s
