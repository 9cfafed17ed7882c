"""Run folders written by the original study's code (GitHub yuzzznh/diffusion_phase_retrieval, DAPS/,
commit b967b2b), read into the parser's per-image records so they sit beside the project's runs.

Their `metrics.json` (posterior_sample.py's `results`, eval.py's `Evaluator.aggregate_results`) holds
per metric `{"per_image": [{samples, mean, std, max, min, best, best_idx}], "overall": {best_mean,
best_std, mean_of_means, std_of_means}}` and a `metadata` block (timing, vram, device as a dict, …); it
has no list of images: entry k is image `data.start_id + k` of the sorted data folder (data.py slices
the sorted file list), and no file names or hashes, no twin PSNR, no loss-selected particle, no
success flag.  What they lack stays missing (None / n/a), never 0.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

ORIGINAL = "original"
METRICS = ("psnr", "ssim", "lpips")
# record fields the original's format does not hold: the tables show n/a for what derives from them
LACKS = ("psnr_twin", "selected_idx", "success", "both_orientations", "orientation", "measurement_loss",
         "source_sha256", "time_segments", "compute", "peak_reserved_mb")


def is_original(metrics: object) -> bool:
    """The original's format: metric blocks with `per_image` lists, no `images` list."""
    return (isinstance(metrics, dict) and "images" not in metrics and isinstance(metrics.get("psnr"), dict)
            and isinstance(metrics["psnr"].get("per_image"), list))


def _number(v) -> Optional[float]:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _start_id(config: Dict) -> int:
    data = config.get("data") if isinstance(config, dict) else None
    start = data.get("start_id") if isinstance(data, dict) else None
    return int(start) if isinstance(start, int) and not isinstance(start, bool) else 0


def records(metrics: Dict, config: Dict) -> Tuple[List[Dict], Dict, Dict, str]:
    """(per-image records, vram, metadata, problem) from an original `metrics.json`; `problem` is ""
    or why the file cannot be read (then the lists are empty)."""
    blocks = {k: metrics.get(k) for k in METRICS if isinstance(metrics.get(k), dict)}
    per = {k: b.get("per_image") for k, b in blocks.items()}
    if any(not isinstance(v, list) for v in per.values()) or len({len(v) for v in per.values()}) != 1:
        return [], {}, {}, "its metric blocks do not list the same images"
    meta = metrics.get("metadata") if isinstance(metrics.get("metadata"), dict) else {}
    timing = meta.get("timing") if isinstance(meta.get("timing"), dict) else {}
    times = timing.get("per_image_seconds") if isinstance(timing.get("per_image_seconds"), list) else []
    start = _start_id(config)
    images = []
    for k, entry in enumerate(per["psnr"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("samples"), list):
            return [], {}, {}, f"image entry {k} has no samples"
        psnr = [_number(v) for v in entry["samples"]]
        n = len(psnr)
        rec: Dict = {"image_idx": start + k, "particle_ids": list(range(n)), "psnr": psnr,
                     "psnr_twin": [None] * n, "measurement_loss": [None] * n, "selected_idx": None,
                     "success": None, "both_orientations": None, "origin": ORIGINAL,
                     "time_sec": _number(times[k]) if k < len(times) else None}
        best = entry.get("best_idx")
        rec["best_idx"] = best if isinstance(best, int) and not isinstance(best, bool) and 0 <= best < n else None
        for key in ("ssim", "lpips"):
            other = per.get(key)
            samples = other[k].get("samples") if other and isinstance(other[k], dict) else None
            rec[key] = [_number(v) for v in samples] if isinstance(samples, list) and len(samples) == n \
                else [None] * n
        images.append(rec)
    vram_block = meta.get("vram") if isinstance(meta.get("vram"), dict) else {}
    device = meta.get("device") if isinstance(meta.get("device"), dict) else {}
    # their get_memory_stats (utils/device.py) writes peak 0.0 with available=False where it could not
    # measure (no CUDA): that is a missing value, not 0 MB
    measured = device.get("available") is not False
    peak = _number(vram_block.get("peak_memory_mb")) if measured else None
    segments = vram_block.get("segments") if isinstance(vram_block.get("segments"), dict) else {}
    vram = {"peak_memory_mb": peak, "peak_reserved_mb": None,
            "segments": {k: v for k, v in segments.items() if _number(v) is not None} if measured else {}}
    metadata = {"origin": ORIGINAL, "device": device.get("type") if isinstance(device.get("type"), str) else None,
                "device_info": device, "wall_time_sec": _number(timing.get("total_seconds")),
                "timestamp": meta.get("timestamp"), "hyperparameters": meta.get("hyperparameters")}
    return images, vram, metadata, ""
