"""One run over several processes (`torchrun --nproc_per_node=N posterior_sample.py …`).

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them everything here is a
no-op for a single process.  Ranks never exchange tensors: every rank samples
its own block of images and writes its own per-image records (each particle
owns its random stream, so the results do not depend on the split); the
process group only carries barriers and small Python objects (the folder
check's verdict, per-rank metadata).  Rank 0 prepares the folder and writes
metrics.json / the grid.
"""
from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass
from typing import Any, List, Optional

import torch
import torch.distributed as tdist

# Ranks may wait long at the final barrier for a slower rank (minutes per image on real models).
BARRIER_TIMEOUT = _dt.timedelta(hours=24)


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_info() -> DistInfo:
    """Rank layout from the torchrun environment (a single process when it is absent)."""
    return DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                    int(os.environ.get("LOCAL_RANK", 0)))


def setup(device: torch.device) -> DistInfo:
    """Join the process group (nccl for CUDA devices, gloo otherwise) when launched by torchrun."""
    info = env_info()
    if not info.enabled or tdist.is_initialized():
        return info
    if device.type == "cuda":
        torch.cuda.set_device(device)
        tdist.init_process_group("nccl", timeout=BARRIER_TIMEOUT, device_id=device)
    else:
        tdist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
    return info


def teardown() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()


def barrier() -> None:
    if tdist.is_initialized():
        tdist.barrier()


def broadcast(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not tdist.is_initialized():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: Any) -> List[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not tdist.is_initialized():
        return [obj]
    out: List[Optional[Any]] = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out

