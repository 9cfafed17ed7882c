"""Peak GPU memory of a run and of its named segments (pre/post pruning, optimisation).

Hooks mark segment boundaries; every reading also folds into the whole-run peak, so a
hook that starts a new segment can never hide an earlier, higher peak (PROJECT.md §2).
Two readings each: allocated (`max_memory_allocated`, the tensors alive at the peak) and reserved
(`max_memory_reserved`, what the caching allocator holds from the driver: allocated plus its cache).
nvidia-smi shows the reserved figure plus the CUDA context (≈ 0.5 GB, not visible to PyTorch).
The cache is never handed back between segments, so a later segment's reserved reading includes
what an earlier one left cached.  On CPU every reading is None.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch


class VramMeter:
    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.peak_mb: Optional[float] = None
        self.peak_reserved_mb: Optional[float] = None
        self.segments: Dict[str, float] = {}
        self.segments_reserved: Dict[str, float] = {}

    @property
    def active(self) -> bool:
        return self.device.type == "cuda"

    def start(self) -> None:
        if self.active:
            torch.cuda.reset_peak_memory_stats(self.device)

    def mark(self, segment: Optional[str] = None) -> None:
        """Close the current segment: its peak goes to `segment` (max over batches, when named)
        and to the whole-run peak; the counter restarts."""
        if not self.active:
            return
        mb = torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        res = torch.cuda.max_memory_reserved(self.device) / 2 ** 20
        self.peak_mb = mb if self.peak_mb is None else max(self.peak_mb, mb)
        self.peak_reserved_mb = res if self.peak_reserved_mb is None else max(self.peak_reserved_mb, res)
        if segment is not None:
            self.segments[segment] = max(mb, self.segments.get(segment, 0.0))
            self.segments_reserved[segment] = max(res, self.segments_reserved.get(segment, 0.0))
        torch.cuda.reset_peak_memory_stats(self.device)

    def summary(self) -> Dict:
        """The `vram` block of metrics.json: the whole-run peaks and the segments, allocated and reserved."""
        self.mark()
        return {"peak_memory_mb": self.peak_mb, "peak_reserved_mb": self.peak_reserved_mb,
                "segments": dict(self.segments), "segments_reserved": dict(self.segments_reserved)}


def merge_vram(blocks: List[Dict]) -> Dict:
    """One `vram` block from several (the ranks of a run, or the folders of a merged run): the largest
    of each peak and of each segment.  The reserved readings appear only where a block has them
    (metrics.json files written before they existed lack them)."""
    out: Dict = {}
    for key in ("peak_memory_mb", "peak_reserved_mb"):
        if key == "peak_memory_mb" or any(key in b for b in blocks):
            vals = [b[key] for b in blocks if b.get(key) is not None]
            out[key] = max(vals) if vals else None
    for key in ("segments", "segments_reserved"):
        if key == "segments" or any(key in b for b in blocks):
            merged: Dict[str, float] = {}
            for b in blocks:
                for k, v in (b.get(key) or {}).items():
                    if v is not None:
                        merged[k] = max(merged.get(k, v), v)
            out[key] = merged
    return out
