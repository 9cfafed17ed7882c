"""Measurement operators (DAPS semantics).

Only Fourier phase retrieval is needed by the study; the registry keeps the
door open for other tasks (`task=...` in Hydra) without touching the sampler.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

OPERATORS: Dict[str, Callable[..., "Operator"]] = {}


def register_operator(name: str):
    def deco(cls):
        OPERATORS[name] = cls
        return cls

    return deco


def get_operator(name: str, **kwargs) -> "Operator":
    """Build the operator registered as `name`."""
    if name not in OPERATORS:
        raise ValueError(f"task operator {name!r} is unknown; registered: {sorted(OPERATORS)}")
    return OPERATORS[name](**kwargs)


class Operator:
    """y = A(x) + σ_y·n.  `loss` is per sample: a (B,) tensor, never reduced over the batch."""

    sigma: float = 0.0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def measure(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Noisy measurement.  Pass a generator to make the noise independent of batching."""
        clean = self(x)
        noise = torch.randn(clean.shape, generator=generator, device=clean.device, dtype=clean.dtype)
        return clean + self.sigma * noise

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """L(x, y) = Σ (A(x) − y)² over all non-batch dims."""
        return (self(x) - y).pow(2).flatten(1).sum(-1)


def fft2c(x: torch.Tensor) -> torch.Tensor:
    """Centred orthonormal 2-D FFT over the last two dims."""
    x = torch.fft.ifftshift(x, dim=(-2, -1))
    x = torch.fft.fft2(x, norm="ortho")
    return torch.fft.fftshift(x, dim=(-2, -1))


@register_operator("phase_retrieval")
class PhaseRetrieval(Operator):
    """|FFT| of the [0,1] image zero-padded by oversample/8·resolution on each side."""

    def __init__(self, oversample: float = 2.0, resolution: int = 256, sigma: float = 0.05):
        self.oversample = float(oversample)
        self.resolution = int(resolution)
        self.pad = int(self.oversample / 8.0 * self.resolution)
        self.sigma = float(sigma)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            raise ValueError(
                f"phase_retrieval expects {self.resolution}×{self.resolution} images, got {tuple(x.shape[-2:])}"
            )
        x01 = x * 0.5 + 0.5
        padded = F.pad(x01, (self.pad, self.pad, self.pad, self.pad))
        return fft2c(padded).abs()


@register_operator("down_sampling_free")
class Identity(Operator):
    """Identity measurement (denoising); handy for debugging the prior."""

    def __init__(self, sigma: float = 0.05, **_):
        self.sigma = float(sigma)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x
