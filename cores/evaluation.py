"""Image quality metrics (piq, lpips) and the per-image / per-run summaries of metrics.json."""
from __future__ import annotations

import math
import warnings
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from .compute import run_compute

_LPIPS_STATE: Dict[str, object] = {}


def _to01(x: torch.Tensor) -> torch.Tensor:
    return ((x.float() + 1) / 2).clamp(0, 1)


def psnr(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of [-1,1] images, computed on [0,1] with piq."""
    import piq

    return piq.psnr(_to01(x), _to01(ref).expand_as(x), data_range=1.0, reduction="none")


def ssim(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    import piq

    return piq.ssim(_to01(x), _to01(ref).expand_as(x), data_range=1.0, reduction="none")


LPIPS_NETS = ("vgg", "alex")


def _build_lpips(net: str) -> torch.nn.Module:
    """vgg: piq's LPIPS with max pooling replaced by average pooling, as DAPS' eval.py builds it; its two weight
    files (piq's `lpips_weights.pt` and torchvision's `vgg16-397923af.pth`) are read from the torch hub cache
    (`bash download.sh lpips`).  alex: the `lpips` package's AlexNet LPIPS."""
    if net == "vgg":
        import piq

        return piq.LPIPS(replace_pooling=True, reduction="none").eval()
    import lpips

    return lpips.LPIPS(net="alex", verbose=False).eval()


def lpips_distance(x: torch.Tensor, ref: torch.Tensor, net: str = "vgg") -> Optional[torch.Tensor]:
    """Per-image LPIPS of [-1,1] images; None with one stderr warning line when its weights are unavailable.

    `vgg` (default) is the value DAPS reports: piq's VGG16 LPIPS (average pooling) on [0,1] images.
    `alex` is the `lpips` package's AlexNet LPIPS on [-1,1] images (this project's value before 2026-11-27).
    Building a network may try to download weights, and torch.hub prints its `Downloading: …` line into
    the results table; everything it prints is swallowed here.
    """
    if net not in LPIPS_NETS:
        raise ValueError(f"eval.lpips_net={net}: expected one of {', '.join(LPIPS_NETS)}")
    if net not in _LPIPS_STATE:
        import contextlib
        import io

        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
                    warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _LPIPS_STATE[net] = _build_lpips(net)
        except Exception as err:  # no network / no cached weights
            from .console import one_line, warn

            warn(f"LPIPS unavailable ({type(err).__name__}: {one_line(err)[:120]}); reported as null. "
                 "Fetch its weights with `bash download.sh lpips`.", key="lpips")
            _LPIPS_STATE[net] = None
    model = _LPIPS_STATE[net]
    if model is None:
        return None
    model = model.to(x.device)
    with torch.no_grad():
        if net == "vgg":
            return model(_to01(x), _to01(ref).expand_as(x)).flatten()
        return model(x.float().clamp(-1, 1), ref.float().expand_as(x).clamp(-1, 1)).flatten()


def finite_or_none(v: float) -> Optional[float]:
    return float(v) if v is not None and math.isfinite(v) else None


ORIENTATIONS = ("gt", "twin", "unclear")
MEASUREMENT_LOSS_UNIT = ("sum of squared amplitude errors over the whole measurement "
                         "(3 x H' x W' padded-FFT canvas); measurement_loss_mse = sum / measurement_numel")


def orientation(p: Optional[float], p_twin: Optional[float], margin_db: float) -> str:
    """`gt` / `twin` when one PSNR beats the other by ≥ margin, else `unclear` (also for missing values).

    Unlike `success`, this needs no absolute PSNR, so it says which mode a particle went to even
    when no particle gets close to either (the common case on real images).
    """
    if p is None or p_twin is None or not (math.isfinite(p) and math.isfinite(p_twin)):
        return "unclear"
    if p - p_twin >= margin_db:
        return "gt"
    if p_twin - p >= margin_db:
        return "twin"
    return "unclear"


def image_record(image_idx: int, samples: torch.Tensor, gt: torch.Tensor, losses: torch.Tensor,
                 particle_ids: Sequence[int], success_psnr: float, use_lpips: bool = True,
                 orientation_margin_db: float = 1.0, measurement_numel: Optional[int] = None,
                 pruned: Optional[Sequence[bool]] = None, lpips_net: str = "vgg") -> Dict:
    """Per-image entry of metrics.json: per particle PSNR/SSIM/LPIPS, twin PSNR, orientation, loss,
    best/selected.  `measurement_numel` (elements of one measurement) adds the per-element loss.
    `pruned` flags particles removed by pruning (masking/shadow keep them in the outputs): the
    oracle `best_idx` looks at every particle, loss selection (`selected_idx`) at the kept ones."""
    twin = gt.flip(-2, -1)
    ok = torch.isfinite(samples).flatten(1).all(dim=1)  # piq rejects NaN: score finite rows, NaN the rest
    samples = torch.nan_to_num(samples, nan=0.0, posinf=1.0, neginf=-1.0)
    bad = lambda vals: [v if good else float("nan") for v, good in zip(vals, ok.tolist())]  # noqa: E731
    p = bad(psnr(samples, gt).tolist())
    pt = bad(psnr(samples, twin).tolist())
    s = bad(ssim(samples, gt).tolist())
    lp = lpips_distance(samples, gt, lpips_net) if use_lpips else None
    lp = bad(lp.tolist()) if lp is not None else [None] * len(p)
    loss = [float(v) for v in losses.tolist()]
    finite = [i for i, v in enumerate(p) if math.isfinite(v) and math.isfinite(loss[i])]
    best = max(finite, key=lambda i: p[i]) if finite else None
    pruned = [bool(v) for v in pruned] if pruned is not None else [False] * len(p)
    kept = [i for i in finite if not pruned[i]]
    selected = min(kept, key=lambda i: loss[i]) if kept else None
    correct = any(p[i] >= success_psnr and p[i] >= pt[i] for i in finite)
    twin_found = any(pt[i] >= success_psnr and pt[i] > p[i] for i in finite)
    orient = [orientation(p[i], pt[i], float(orientation_margin_db)) if i in finite else "unclear"
              for i in range(len(p))]
    any_orient = [max(p[i], pt[i]) for i in finite if math.isfinite(pt[i])]
    rec = {
        "image_idx": int(image_idx),
        "particle_ids": [int(i) for i in particle_ids],
        "psnr": [finite_or_none(v) for v in p],
        "ssim": [finite_or_none(v) for v in s],
        "lpips": [finite_or_none(v) if v is not None else None for v in lp],
        "lpips_net": lpips_net if use_lpips else None,
        "psnr_twin": [finite_or_none(v) for v in pt],
        "measurement_loss": [finite_or_none(v) for v in loss],
        "pruned": pruned,
        "best_idx": best,
        "selected_idx": selected,
        "success": bool(correct),
        "both_orientations": bool(correct and twin_found),
        "non_finite_particles": [i for i in range(len(p)) if i not in finite],
        "orientation": orient,
        "orientation_margin_db": float(orientation_margin_db),
        "orientations_found": sorted(set(orient)),
        "correct_orientation_found": "gt" in orient,
        "both_orientations_any": "gt" in orient and "twin" in orient,
        "best_psnr_any_orientation": max(any_orient) if any_orient else None,
        "measurement_loss_unit": MEASUREMENT_LOSS_UNIT,
    }
    if measurement_numel:
        rec["measurement_numel"] = int(measurement_numel)
        rec["measurement_loss_mse"] = [finite_or_none(v / measurement_numel) for v in loss]
    return rec


# Across-image ± of the summaries: population std (ddof 0, np.std's default), as DAPS reports it; the
# original study's "17.50 ± 3.67 dB" is that value (3.87 with ddof 1).  The spread of the particles
# within one image stays a sample std (ddof 1).
ACROSS_IMAGE_DDOF = 0


def _mean_std(values: List[float]) -> Dict[str, Optional[float]]:
    v = np.array([x for x in values if x is not None], dtype=float)
    if v.size == 0:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=ACROSS_IMAGE_DDOF)), "n": int(v.size)}


def wilson_ci(successes: int, n: int, z: float = 1.96) -> List[Optional[float]]:
    """95 % Wilson score interval of a rate."""
    if n == 0:
        return [None, None]
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return [max(0.0, centre - half), min(1.0, centre + half)]


def best_psnr_any_orientation(rec: Dict) -> Optional[float]:
    """The record's best PSNR in either orientation: max over particles of max(PSNR, twin PSNR); recomputed
    from `psnr` / `psnr_twin` for records written before the field existed."""
    if "best_psnr_any_orientation" in rec:
        return rec["best_psnr_any_orientation"]
    pairs = zip(rec.get("psnr") or [], rec.get("psnr_twin") or [])
    vals = [max(p, q) for p, q in pairs if p is not None and q is not None and math.isfinite(p) and math.isfinite(q)]
    return max(vals) if vals else None


def summarize(images: List[Dict]) -> Dict:
    """The `summary` block of metrics.json, recomputed from per-image records."""
    def at(rec, key, idx):
        return rec[key][idx] if idx is not None else None

    best_psnr = [at(r, "psnr", r["best_idx"]) for r in images]
    mean_psnr = [float(np.mean([v for v in r["psnr"] if v is not None])) if any(v is not None for v in r["psnr"])
                 else None for r in images]
    best_ssim = [max([v for v in r["ssim"] if v is not None], default=None) for r in images]
    best_lpips = [min([v for v in r["lpips"] if v is not None], default=None) for r in images]
    sel_psnr = [at(r, "psnr", r["selected_idx"]) for r in images]
    n = len(images)
    succ = sum(bool(r["success"]) for r in images)
    both = sum(bool(r["both_orientations"]) for r in images)
    times = [r.get("time_sec") for r in images]
    best_twin = [max([v for v in r["psnr_twin"] if v is not None], default=None) for r in images]
    return {
        "num_images": n,
        "std_ddof": ACROSS_IMAGE_DDOF,  # the ± of the blocks below: std over images, ddof 0 (as DAPS)
        "best_psnr": _mean_std(best_psnr),
        "best_psnr_twin": _mean_std(best_twin),
        "best_psnr_any_orientation": _mean_std([best_psnr_any_orientation(r) for r in images]),
        "mean_of_mean_psnr": _mean_std(mean_psnr)["mean"],
        "best_ssim_mean": _mean_std(best_ssim)["mean"],
        "best_lpips_mean": _mean_std(best_lpips)["mean"],
        "selected_psnr_mean": _mean_std(sel_psnr)["mean"],
        "success_rate": succ / n if n else None,
        "success_rate_ci95": wilson_ci(succ, n),
        "both_orientations_rate": both / n if n else None,
        "both_orientations_rate_ci95": wilson_ci(both, n),
        "total_time_sec": float(sum(t for t in times if t is not None)),
        "time_per_image_sec": _mean_std(times)["mean"],
        "non_finite_particles": sum(len(r.get("non_finite_particles", [])) for r in images),
        "orientation": orientation_summary(images),
        "measurement_loss_unit": MEASUREMENT_LOSS_UNIT,
        "time_segments": time_segment_totals(images),
        **run_compute(images),
    }


def time_segment_totals(images: List[Dict]) -> Dict[str, float]:
    """Seconds per phase summed over the run's images (records without `time_segments` add nothing)."""
    out: Dict[str, float] = {}
    for r in images:
        for name, sec in (r.get("time_segments") or {}).items():
            out[name] = out.get(name, 0.0) + float(sec)
    return out


def orientation_summary(images: List[Dict]) -> Dict:
    """Rates (with Wilson 95 % CIs) of images where the ground-truth orientation / both orientations
    were found at any PSNR, and the share of all particles in each orientation.  Records written
    without orientation fields are left out (`num_images` counts those used)."""
    recs = [r for r in images if isinstance(r.get("orientation"), list)]
    n = len(recs)
    correct = sum(bool(r.get("correct_orientation_found")) for r in recs)
    both = sum(bool(r.get("both_orientations_any")) for r in recs)
    labels = [o for r in recs for o in r["orientation"]]
    margins = {r.get("orientation_margin_db") for r in recs}
    return {
        "num_images": n,
        "margin_db": margins.pop() if len(margins) == 1 else None,
        "correct_orientation_found_rate": correct / n if n else None,
        "correct_orientation_found_rate_ci95": wilson_ci(correct, n),
        "both_orientations_any_rate": both / n if n else None,
        "both_orientations_any_rate_ci95": wilson_ci(both, n),
        "num_particles": len(labels),
        "particle_fraction": {k: (labels.count(k) / len(labels) if labels else None) for k in ORIENTATIONS},
    }
