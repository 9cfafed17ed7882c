"""Peak GPU memory of a run and of its named segments (pre/post pruning, optimisation).

Hooks mark segment boundaries; every reading also folds into the whole-run peak, so a
hook that starts a new segment can never hide an earlier, higher peak (PROJECT.md §2).
On CPU every reading is None.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch


class VramMeter:
    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.peak_mb: Optional[float] = None
        self.segments: Dict[str, float] = {}

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
        self.peak_mb = mb if self.peak_mb is None else max(self.peak_mb, mb)
        if segment is not None:
            self.segments[segment] = max(mb, self.segments.get(segment, 0.0))
        torch.cuda.reset_peak_memory_stats(self.device)

    def summary(self) -> Dict:
        """The `vram` block of metrics.json: the whole-run peak and the segments."""
        self.mark()
        return {"peak_memory_mb": self.peak_mb, "segments": dict(self.segments)}
