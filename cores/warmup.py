"""Every network shape of a run made once before its VRAM meter starts (cuDNN benchmark's trials).

With `torch.backends.cudnn.benchmark` on (`speed.cudnn_benchmark`, the fast preset), the first call
of a convolution at a new shape times up to 10 candidate algorithms, each with a workspace from the
caching allocator: on an H100 that took 66.7 GiB in the first repulsion steps of exp1 (DINO and
decoder shapes at the particle count) for a run that needs ≈ 4 GiB.  Those trials are no need of the
run, and on a smaller card they would try only what fits.  So before `VramMeter.start()` the run
makes each shape it will use — decoder forward+backward (Langevin/HMC, optimisation) and forward
without gradient (pruning, final image), and every hook's own networks (`SamplerHook.warm_up`:
repulsion's decode + DINO forward and backward) — at each row count it will have: particles ×
images of a batch (the last batch may be smaller), and the kept count after pruning; with
`save_traj` also the one-row decodes of the trajectory frames.  The trials'
peak is reported on its own line (`vram.autotune_peak_mb`), the run's peak and segments hold the
sampler's memory only.  Without cudnn.benchmark nothing is run: no trials, nothing to move.

What the warm-up cannot foresee (a shape that only a later failure path creates) would still be
tuned inside the run; `scripts/vram_check.py` checks on a GPU that exp1 with `speed=fast` reports
a peak within 10 % of `speed=exact`'s plus the compiled graphs' memory.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

__all__ = ["autotune_on", "run_row_counts", "warm_up_shapes", "warm_up_run"]


def autotune_on(device: torch.device) -> bool:
    """Whether new convolution shapes will be benchmarked by cuDNN on `device`."""
    return torch.device(device).type == "cuda" and bool(torch.backends.cudnn.benchmark)


def run_row_counts(particles: int, batch_size: int, num_images: int, pruning=None) -> List[int]:
    """Row counts a run's batches pass through: particles × images per batch (full and last batch)
    and, with pruning that shrinks the batch (slicing without refill, masking), kept × images."""
    if num_images <= 0:
        return []
    per_batch = {min(batch_size, num_images)}
    if num_images % batch_size:
        per_batch.add(num_images % batch_size)
    per_image = {particles}
    if pruning is not None and pruning.on and pruning.mode != "shadow" and not (pruning.refill and
                                                                               pruning.mode == "slicing"):
        per_image.add(min(pruning.keep, particles))
    return sorted({k * n for k in per_batch for n in per_image})


def warm_up_shapes(model, hooks: Sequence, rows: Sequence[int], device: torch.device,
                   nograd_rows: Sequence[int] = ()) -> None:
    """At each row count: a decode with gradient and its backward, a decode without gradient, and
    each hook's `warm_up` (its own networks); at each of `nograd_rows` a decode without gradient only
    (trajectory frames decode one latent at a time; a gradient decode of one row would compile a graph
    the run never uses)."""
    for n in nograd_rows:
        with torch.no_grad():
            model.decode(torch.randn((n, *model.get_in_shape()), device=device))
    for n in rows:
        z = torch.randn((n, *model.get_in_shape()), device=device)
        with torch.enable_grad():
            zz = z.clone().requires_grad_(True)
            torch.autograd.grad(model.decode(zz).float().sum(), zz)
        with torch.no_grad():
            model.decode(z)
        for hook in hooks:
            hook.warm_up(model, z)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def warm_up_run(model, hooks: Sequence, rows: Sequence[int], device: torch.device, vram,
                force: bool = False, nograd_rows: Sequence[int] = ()) -> Optional[List[int]]:
    """`warm_up_shapes` inside `vram.outside_run` when cuDNN will benchmark (or `force`); the rows warmed."""
    if not (force or autotune_on(device)) or not rows:
        return None
    with vram.outside_run(sorted(set(rows) | set(nograd_rows))):
        warm_up_shapes(model, hooks, rows, device, nograd_rows)
    return list(rows)
