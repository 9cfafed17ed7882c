"""Per-(image, particle) random streams.

Every particle draws its noise from its own `torch.Generator`, seeded from
(seed, image index, particle index).  A particle's trajectory therefore does
not depend on the batch size, on which other images share its batch, on
pruning, or on how a run is sharded across processes (PROJECT.md §2).
A particle cloned after pruning (`pruning_refill`) gets a fresh stream from
(seed, image, its new id) under the purpose "branch", so it is as invariant as
the particles drawn at the start and unrelated to any of their streams.
"""
from __future__ import annotations

import hashlib
from typing import List, Optional, Sequence

import torch


def stream_seed(seed: int, image_idx: int, particle_idx: int, purpose: str = "particle") -> int:
    """A 63-bit seed, well mixed so that neighbouring indices give unrelated streams."""
    key = f"{purpose}:{int(seed)}:{int(image_idx)}:{int(particle_idx)}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & ((1 << 63) - 1)


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


class ParticleStreams:
    """One generator per batch row; `randn(shape)` stacks one draw per row."""

    def __init__(self, generators: List[torch.Generator], device: torch.device | str = "cpu",
                 seed: Optional[int] = None):
        self.generators = list(generators)
        self.device = torch.device(device)
        self.seed = seed  # the run seed the streams came from; clones derive theirs from it

    @classmethod
    def for_particles(cls, seed: int, image_ids: Sequence[int], particle_ids: Sequence[int],
                      device: torch.device | str = "cpu", purpose: str = "particle") -> "ParticleStreams":
        gens = [make_generator(stream_seed(seed, i, p, purpose), device) for i, p in zip(image_ids, particle_ids)]
        return cls(gens, device, seed)

    def for_clones(self, image_ids: Sequence[int], particle_ids: Sequence[int]) -> "ParticleStreams":
        """Fresh streams for particles cloned after pruning, from (seed, image, new id) alone."""
        if self.seed is None:
            raise ValueError("cloning particles needs streams that know their seed (ParticleStreams.for_particles)")
        return ParticleStreams.for_particles(self.seed, image_ids, particle_ids, self.device, purpose="branch")

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        rows = [torch.randn(tuple(shape), generator=g, device=self.device, dtype=dtype) for g in self.generators]
        return torch.stack(rows)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.randn(x.shape[1:], dtype=x.dtype)

    def select(self, rows: Sequence[int]) -> "ParticleStreams":
        return ParticleStreams([self.generators[int(r)] for r in rows], self.device, self.seed)

    def concat(self, other: "ParticleStreams") -> "ParticleStreams":
        """These rows' streams followed by `other`'s (the same generator objects, not copies)."""
        return ParticleStreams(self.generators + other.generators, self.device, self.seed)
