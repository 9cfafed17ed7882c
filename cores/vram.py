"""Peak GPU memory of a run and of its named segments (pre/post pruning, optimisation).

Hooks mark segment boundaries; every reading also folds into the whole-run peak, so a
hook that starts a new segment can never hide an earlier, higher peak (PROJECT.md §2).
Two readings each: allocated (`max_memory_allocated`, the tensors alive at the peak) and reserved
(`max_memory_reserved`, what the caching allocator holds from the driver: allocated plus its cache).
nvidia-smi shows the reserved figure plus the CUDA context (≈ 0.5 GB, not visible to PyTorch).
The cache is never handed back between segments, so a later segment's reserved reading includes
what an earlier one left cached.  On CPU every reading is None.

Units: MiB (2**20 bytes) in every `*_mb` field; tables divide by 1024 and say GiB.

cuDNN benchmark's algorithm trials (`speed.cudnn_benchmark`) take a workspace per candidate on the
first call of each convolution shape (66.7 GiB on an H100 in exp1's first repulsion steps, for a run that needs ≈ 4 GiB).
They are no need of the run: `cores.warmup` makes every shape of the run before `start()`, inside
`outside_run()`, whose peak is reported on its own line (`autotune_peak_mb`), and hands the trials'
cached blocks back to the driver, so the run's peak, reserved peak and segments are the sampler's.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Optional, Sequence

import torch


class CudaMemoryStats:
    """The CUDA caching allocator's counters, in MiB (what `VramMeter` reads on a GPU)."""

    def __init__(self, device: torch.device):
        self.device = device

    def max_allocated_mb(self) -> float:
        return torch.cuda.max_memory_allocated(self.device) / 2 ** 20

    def max_reserved_mb(self) -> float:
        return torch.cuda.max_memory_reserved(self.device) / 2 ** 20

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def release_cache(self) -> None:
        torch.cuda.empty_cache()


class VramMeter:
    def __init__(self, device: torch.device, stats=None):
        """`stats`: the counters read (default: CUDA's on a CUDA device, none elsewhere); tests pass a fake."""
        self.device = torch.device(device)
        self.stats = stats if stats is not None else (CudaMemoryStats(self.device) if self.device.type == "cuda"
                                                      else None)
        self.peak_mb: Optional[float] = None
        self.peak_reserved_mb: Optional[float] = None
        self.segments: Dict[str, float] = {}
        self.segments_reserved: Dict[str, float] = {}
        self.autotune: Dict = {}  # the warm-up before the run (cores.warmup): its own peaks and row counts

    @property
    def active(self) -> bool:
        return self.stats is not None

    def start(self) -> None:
        if self.active:
            self.stats.reset_peak()

    @contextlib.contextmanager
    def outside_run(self, rows: Sequence[int]) -> Iterator[None]:
        """Work before the run that is no need of it (cuDNN's algorithm trials while every shape of the
        run is made once, at `rows` rows): its peaks go to `autotune_*`, never to the run's, and the
        blocks it left cached are handed back, so the run's reserved reading starts from what it keeps."""
        if not self.active:
            yield
            return
        self.stats.reset_peak()
        try:
            yield
        finally:
            self.autotune = {"autotune_peak_mb": self.stats.max_allocated_mb(),
                             "autotune_peak_reserved_mb": self.stats.max_reserved_mb(),
                             "autotune_rows": sorted(int(r) for r in rows)}
            self.stats.release_cache()
            self.stats.reset_peak()

    def mark(self, segment: Optional[str] = None) -> None:
        """Close the current segment: its peak goes to `segment` (max over batches, when named)
        and to the whole-run peak; the counter restarts."""
        if not self.active:
            return
        mb, res = self.stats.max_allocated_mb(), self.stats.max_reserved_mb()
        self.peak_mb = mb if self.peak_mb is None else max(self.peak_mb, mb)
        self.peak_reserved_mb = res if self.peak_reserved_mb is None else max(self.peak_reserved_mb, res)
        if segment is not None:
            self.segments[segment] = max(mb, self.segments.get(segment, 0.0))
            self.segments_reserved[segment] = max(res, self.segments_reserved.get(segment, 0.0))
        self.stats.reset_peak()

    def summary(self) -> Dict:
        """The `vram` block of metrics.json: the whole-run peaks and the segments, allocated and reserved,
        and (after a warm-up for cuDNN benchmark) the warm-up's own peaks."""
        self.mark()
        return {"peak_memory_mb": self.peak_mb, "peak_reserved_mb": self.peak_reserved_mb,
                "segments": dict(self.segments), "segments_reserved": dict(self.segments_reserved),
                **self.autotune}


def merge_vram(blocks: List[Dict]) -> Dict:
    """One `vram` block from several (the ranks of a run, or the folders of a merged run): the largest
    of each peak and of each segment.  The reserved readings appear only where a block has them
    (metrics.json files written before they existed lack them)."""
    out: Dict = {}
    for key in ("peak_memory_mb", "peak_reserved_mb", "autotune_peak_mb", "autotune_peak_reserved_mb"):
        if key == "peak_memory_mb" or any(key in b for b in blocks):
            vals = [b[key] for b in blocks if b.get(key) is not None]
            out[key] = max(vals) if vals else None
    if any("autotune_rows" in b for b in blocks):
        out["autotune_rows"] = sorted({r for b in blocks for r in b.get("autotune_rows") or []})
    for key in ("segments", "segments_reserved"):
        if key == "segments" or any(key in b for b in blocks):
            merged: Dict[str, float] = {}
            for b in blocks:
                for k, v in (b.get(key) or {}).items():
                    if v is not None:
                        merged[k] = max(merged.get(k, v), v)
            out[key] = merged
    return out
