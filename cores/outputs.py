"""Run-folder writing: every file is replaced atomically, JSONL lines are appended whole.

A kill at any moment leaves either the old or the new version of a file,
never half of one, so an interrupted run can always be resumed.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

import numpy as np
import torch
from PIL import Image


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, allow_nan=False) + "\n").encode())


def write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def append_jsonl(path: Path, obj: Any) -> None:
    """One whole line per call (a single write of a complete line, then fsync)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(obj, allow_nan=False) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_jsonl(path: Path) -> List[Dict]:
    """Complete lines only (a torn last line from a crash is ignored)."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(3,H,W) in [-1,1] → (H,W,3) uint8 (non-finite values shown as black)."""
    x = torch.nan_to_num(x.detach().float().cpu(), nan=-1.0, posinf=1.0, neginf=-1.0)
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()


def save_png(path: Path, img: np.ndarray) -> None:
    import io

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def measurement_view(y: torch.Tensor) -> np.ndarray:
    """Log-amplitude view of a (3,H,W) Fourier amplitude, normalised to [0,255]."""
    v = torch.log1p(y.detach().float().cpu().clamp_min(0)).mean(0)
    v = (v - v.min()) / (v.max() - v.min()).clamp_min(1e-12)
    g = (v * 255).round().byte().numpy()
    return np.stack([g, g, g], axis=-1)


def make_grid(rows: Iterable[List[np.ndarray]], size: int) -> Optional[np.ndarray]:
    """Rows of tiles (each resized to size×size) → one image; ragged rows are padded white."""
    rows = [r for r in rows if r]
    if not rows:
        return None
    ncol = max(len(r) for r in rows)
    grid = np.full((len(rows) * size, ncol * size, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            if tile.shape[0] != size or tile.shape[1] != size:
                tile = np.asarray(Image.fromarray(tile).resize((size, size), Image.BILINEAR))
            grid[i * size:(i + 1) * size, j * size:(j + 1) * size] = tile
    return grid
