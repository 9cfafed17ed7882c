"""The run folder: per-image records, samples, logs, trajectories, grid, metrics.json.

Each finished image gets `records/<idx>.json`; `metrics.json` and
`grid_results.png` are always rebuilt from what is on disk, so an
interrupted, resumed or multi-process run ends with the same files as an
uninterrupted one.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image

from .console import one_line, warn
from .evaluation import summarize
from .outputs import (GRID_LEGEND, GRID_LEGEND_PRUNED, GridCell, append_jsonl, measurement_view, render_grid,
                      save_png, to_uint8, write_json)

RECORD_DIR = "records"
GRID_HEADER = [["ground truth"], ["measurement", "(log-amplitude)"], ["particles:", "id, PSNR"]]
# Fields every record must have, with the types a reader relies on.
REQUIRED_FIELDS = {"image_idx": int, "particle_ids": list, "psnr": list, "ssim": list, "lpips": list,
                   "psnr_twin": list, "measurement_loss": list, "success": bool, "both_orientations": bool}
OPTIONAL_INDEX_FIELDS = ("best_idx", "selected_idx")
# per-particle lists of numbers (null where a value is missing)
NUMBER_LIST_FIELDS = ("psnr", "ssim", "lpips", "psnr_twin", "measurement_loss")


def record_problem(rec: object) -> str:
    """Why a per-image record (a `records/` file or an entry of metrics.json's `images`) cannot be
    used, or "" when it can."""
    if not isinstance(rec, dict):
        return "not a JSON object"
    missing = [k for k in REQUIRED_FIELDS if k not in rec]
    if missing:
        return "missing " + ", ".join(missing)
    wrong = [k for k, t in REQUIRED_FIELDS.items()
             if not isinstance(rec[k], t) or (t is int and isinstance(rec[k], bool))]
    n = len(rec["particle_ids"]) if isinstance(rec["particle_ids"], list) else -1
    wrong += [k for k, t in REQUIRED_FIELDS.items() if t is list and k not in wrong and len(rec[k]) != n]
    for k in OPTIONAL_INDEX_FIELDS:
        v = rec.get(k)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < n):
            wrong.append(k)
    wrong += [k for k in NUMBER_LIST_FIELDS if k not in wrong and isinstance(rec.get(k), list)
              and not all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in rec[k])]
    if not isinstance(rec.get("saved_particles", []), list):
        wrong.append("saved_particles")
    if "pruned" in rec and (not isinstance(rec["pruned"], list) or len(rec["pruned"]) != n):
        wrong.append("pruned")
    return "bad " + ", ".join(wrong) if wrong else ""


def read_record(path: Path) -> Tuple[Optional[Dict], str]:
    """(record, "") or (None, why it cannot be used)."""
    try:
        rec = json.loads(Path(path).read_text())
    except OSError as err:
        return None, f"unreadable ({type(err).__name__})"
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return None, f"not valid JSON ({one_line(err)})"
    why = record_problem(rec)
    if why:
        return None, why
    if Path(path).stem != f"{rec['image_idx']:05d}":
        return None, f"image_idx {rec['image_idx']} does not match the file name"
    return rec, ""


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
        """Every valid record, by image index.

        A record that does not parse or lacks a field (hand-edited, copied from elsewhere, written
        by an incompatible version) is named in one warning line and left out, so its image counts
        as unfinished and `resume=true` redoes it.
        """
        d = self.root / RECORD_DIR
        recs = []
        for p in sorted(d.glob("*.json")) if d.is_dir() else []:
            rec, why = read_record(p)
            if rec is None:
                try:
                    st = p.stat()
                    key = ("record", str(p), st.st_mtime_ns, st.st_size)
                except OSError:
                    key = ("record", str(p))
                warn(f"ignoring record {p}: {why}; its image counts as unfinished (resume=true redoes it)", key=key)
                continue
            recs.append(rec)
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
        """grid_results.png: a header row, then per image gt, measurement and every saved particle,
        with image id, per-particle PSNR (and twin PSNR when higher) and best/selected frames.
        Tiles smaller than `size` are enlarged by an integer factor, nearest-neighbour only."""
        rows, scale, any_pruned = [], None, False
        for rec in (self.records() if records is None else records)[:max_images]:
            idx = rec["image_idx"]
            gt_path, m_path = self.root / "gt" / f"{idx:05d}.png", self.root / "measurement" / f"{idx:05d}.png"
            row = []
            if gt_path.exists():
                gt = np.asarray(Image.open(gt_path).convert("RGB"))
                scale = scale or max(1, size // max(gt.shape[:2]))
                row.append(GridCell(gt, [f"image {idx}"] + removed_caption(rec)))
            if m_path.exists():
                row.append(GridCell(np.asarray(Image.open(m_path).convert("RGB")), [""]))
            row += [self._particle_cell(rec, p) for p in rec.get("saved_particles", [])
                    if self.sample_path(idx, p).exists()]
            any_pruned = any_pruned or bool(pruned_particle_ids(rec))
            rows.append(row)
        grid = render_grid(GRID_HEADER, rows, scale or 1,
                           [GRID_LEGEND] + ([GRID_LEGEND_PRUNED] if any_pruned else []))
        if grid is not None:
            save_png(self.root / "grid_results.png", grid)

    def _particle_cell(self, rec: Dict, particle: int) -> GridCell:
        img = np.asarray(Image.open(self.sample_path(rec["image_idx"], particle)).convert("RGB"))
        return GridCell(img, *particle_caption(rec, particle))


def pruned_particle_ids(rec: Dict) -> List[int]:
    """Ids of the image's particles removed by pruning: those flagged by the per-particle `pruned`
    (a list aligned with `particle_ids`, or `pruned` inside each entry of `particles`) together with
    the record's `pruning.pruned_indices` (particle ids, as pruning.jsonl lists them; the only trace
    of particles that slicing dropped from the record)."""
    ids = [int(i) for i in rec.get("particle_ids", [])]
    out = set()
    flags = rec.get("pruned")
    if isinstance(flags, list) and len(flags) == len(ids):
        out |= {i for i, f in zip(ids, flags) if f}
    parts = rec.get("particles")
    if isinstance(parts, list) and all(isinstance(p, dict) for p in parts):
        out |= {int(p.get("id", p.get("particle_id", k))) for k, p in enumerate(parts) if p.get("pruned")}
    block = rec.get("pruning")
    if isinstance(block, dict) and block.get("did_prune"):
        out |= {int(i) for i in block.get("pruned_indices") or []}
    return sorted(out)


def removed_caption(rec: Dict) -> List[str]:
    """Text under the ground truth naming the pruned particles the grid cannot show (slicing drops them)."""
    gone = [p for p in pruned_particle_ids(rec) if p not in {int(i) for i in rec.get("particle_ids", [])}]
    if not gone:
        return []
    step = (rec.get("pruning") or {}).get("prune_step") if isinstance(rec.get("pruning"), dict) else None
    return [f"pruned: {', '.join(f'p{p}' for p in gone)}" + (f" (step {step})" if step is not None else "")]


def particle_caption(rec: Dict, particle: int) -> Tuple[List[str], List[str]]:
    """Grid text under a particle (id, PSNR, twin PSNR when higher, best/selected/pruned) and its frames."""
    ids = [int(i) for i in rec.get("particle_ids", [])]
    if particle not in ids:
        return [f"p{particle}"], []
    k = ids.index(particle)
    p, pt = rec["psnr"][k], rec["psnr_twin"][k]
    caption = [f"p{particle}  {p:.2f} dB" if p is not None else f"p{particle}  n/a"]
    if pt is not None and (p is None or pt > p):
        caption.append(f"twin {pt:.2f} dB")
    marks = [m for m, key in (("best", "best_idx"), ("selected", "selected_idx")) if rec.get(key) == k]
    if particle in pruned_particle_ids(rec):
        marks.append("pruned")
    if marks:
        caption.append(", ".join(marks))
    return caption, marks
