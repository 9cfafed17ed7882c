"""The run folder: per-image records, samples, logs, trajectories, grid, metrics.json.

Each finished image gets `records/<idx>.json`; `metrics.json` and
`grid_results.png` are always rebuilt from what is on disk, so an
interrupted, resumed or multi-process run ends with the same files as an
uninterrupted one.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from PIL import Image

from .evaluation import summarize
from .outputs import append_jsonl, make_grid, measurement_view, save_png, to_uint8, write_json

RECORD_DIR = "records"


class RunFolder:
    def __init__(self, root: Path):
        self.root = Path(root)

    # --- paths -----------------------------------------------------------------
    def record_path(self, image_idx: int) -> Path:
        return self.root / RECORD_DIR / f"{image_idx:05d}.json"

    def sample_path(self, image_idx: int, particle: int) -> Path:
        return self.root / "samples" / f"{image_idx:05d}_sample{particle:02d}.png"

    def jsonl(self, name: str) -> Path:
        return self.root / f"{name}.jsonl"

    # --- state -------------------------------------------------------------------
    def finished_images(self) -> List[int]:
        return [int(r["image_idx"]) for r in self.records() if self._outputs_complete(r)]

    def _outputs_complete(self, rec: Dict) -> bool:
        return all(self.sample_path(rec["image_idx"], p).exists() for p in rec.get("saved_particles", []))

    def records(self) -> List[Dict]:
        """Every readable record, by image index."""
        d = self.root / RECORD_DIR
        recs = []
        for p in sorted(d.glob("*.json")) if d.is_dir() else []:
            try:
                recs.append(json.loads(p.read_text()))
            except (json.JSONDecodeError, OSError):
                continue  # a torn file cannot exist (atomic writes) but never trust it
        return sorted(recs, key=lambda r: r["image_idx"])

    # --- writing -----------------------------------------------------------------
    def write_image(self, record: Dict, samples: torch.Tensor, particle_ids: List[int], gt: torch.Tensor,
                    y: torch.Tensor, save_samples: bool = True) -> None:
        """Images first, the record last: a record on disk means the image is complete."""
        idx = record["image_idx"]
        save_png(self.root / "gt" / f"{idx:05d}.png", to_uint8(gt))
        save_png(self.root / "measurement" / f"{idx:05d}.png", measurement_view(y))
        saved = []
        if save_samples:
            for row, p in enumerate(particle_ids):
                save_png(self.sample_path(idx, p), to_uint8(samples[row]))
                saved.append(int(p))
        write_json(self.record_path(idx), {**record, "saved_particles": saved})

    def write_trajectory(self, sub: str, image_idx: int, particle: int, frames: List[np.ndarray]) -> None:
        """One strip per particle: `trajectory/00000_sample00.png`, `trajectory_pruned/00000_pruned00.png`."""
        tag = "pruned" if sub == "trajectory_pruned" else "sample"
        if frames:
            save_png(self.root / sub / f"{image_idx:05d}_{tag}{particle:02d}.png", np.concatenate(frames, axis=1))

    def write_logs_and_trajectories(self, image_idx: int, logs: Dict[str, List[Dict]],
                                    trajectories: Dict[str, Dict[int, List[np.ndarray]]]) -> None:
        """An image's log lines (appended to `<name>.jsonl`) and trajectory strips; called before
        its record, so a record on disk means these are complete too."""
        for sub, per_particle in trajectories.items():
            for particle, frames in per_particle.items():
                self.write_trajectory(sub, image_idx, particle, frames)
        for name, lines in logs.items():
            for line in lines:
                append_jsonl(self.jsonl(name), line)

    def write_metrics(self, extra: Dict, records: Optional[List[Dict]] = None) -> Dict:
        """metrics.json from `records` (default: read from disk)."""
        images = [dict(r) for r in (self.records() if records is None else records)]
        for r in images:
            r.pop("saved_particles", None)
        metrics = {"images": images, "summary": summarize(images), **extra}
        write_json(self.root / "metrics.json", metrics)
        return metrics

    def write_grid(self, max_images: int, size: int = 128, records: Optional[List[Dict]] = None) -> None:
        rows = []
        for rec in (self.records() if records is None else records)[:max_images]:
            idx = rec["image_idx"]
            tiles = [self.root / "gt" / f"{idx:05d}.png", self.root / "measurement" / f"{idx:05d}.png"]
            tiles += [self.sample_path(idx, p) for p in rec.get("saved_particles", [])]
            rows.append([np.asarray(Image.open(t).convert("RGB")) for t in tiles if t.exists()])
        grid = make_grid(rows, size)
        if grid is not None:
            save_png(self.root / "grid_results.png", grid)
