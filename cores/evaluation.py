"""Image quality metrics (piq, lpips) and the per-image / per-run summaries of metrics.json."""
from __future__ import annotations

import math
import warnings
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

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


def lpips_distance(x: torch.Tensor, ref: torch.Tensor) -> Optional[torch.Tensor]:
    """LPIPS (AlexNet, `lpips` package); None with one warning when its weights are unavailable."""
    if "model" not in _LPIPS_STATE:
        try:
            import lpips

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _LPIPS_STATE["model"] = lpips.LPIPS(net="alex", verbose=False).eval()
        except Exception as err:  # no network / no cached backbone weights
            warnings.warn(f"LPIPS unavailable ({type(err).__name__}: {str(err)[:120]}); "
                          "reported as null. Fetch its weights with `bash download.sh lpips`.")
            _LPIPS_STATE["model"] = None
    model = _LPIPS_STATE["model"]
    if model is None:
        return None
    model = model.to(x.device)
    with torch.no_grad():
        return model(x.float().clamp(-1, 1), ref.float().expand_as(x).clamp(-1, 1)).flatten()


def finite_or_none(v: float) -> Optional[float]:
    return float(v) if v is not None and math.isfinite(v) else None


def image_record(image_idx: int, samples: torch.Tensor, gt: torch.Tensor, losses: torch.Tensor,
                 particle_ids: Sequence[int], success_psnr: float, use_lpips: bool = True) -> Dict:
    """Per-image entry of metrics.json: per particle PSNR/SSIM/LPIPS, twin PSNR, loss, best/selected."""
    twin = gt.flip(-2, -1)
    ok = torch.isfinite(samples).flatten(1).all(dim=1)  # piq rejects NaN: score finite rows, NaN the rest
    samples = torch.nan_to_num(samples, nan=0.0, posinf=1.0, neginf=-1.0)
    bad = lambda vals: [v if good else float("nan") for v, good in zip(vals, ok.tolist())]  # noqa: E731
    p = bad(psnr(samples, gt).tolist())
    pt = bad(psnr(samples, twin).tolist())
    s = bad(ssim(samples, gt).tolist())
    lp = lpips_distance(samples, gt) if use_lpips else None
    lp = bad(lp.tolist()) if lp is not None else [None] * len(p)
    loss = [float(v) for v in losses.tolist()]
    finite = [i for i, v in enumerate(p) if math.isfinite(v) and math.isfinite(loss[i])]
    best = max(finite, key=lambda i: p[i]) if finite else None
    selected = min(finite, key=lambda i: loss[i]) if finite else None
    correct = any(p[i] >= success_psnr and p[i] >= pt[i] for i in finite)
    twin_found = any(pt[i] >= success_psnr and pt[i] > p[i] for i in finite)
    return {
        "image_idx": int(image_idx),
        "particle_ids": [int(i) for i in particle_ids],
        "psnr": [finite_or_none(v) for v in p],
        "ssim": [finite_or_none(v) for v in s],
        "lpips": [finite_or_none(v) if v is not None else None for v in lp],
        "psnr_twin": [finite_or_none(v) for v in pt],
        "measurement_loss": [finite_or_none(v) for v in loss],
        "best_idx": best,
        "selected_idx": selected,
        "success": bool(correct),
        "both_orientations": bool(correct and twin_found),
        "non_finite_particles": [i for i in range(len(p)) if i not in finite],
    }


def _mean_std(values: List[float]) -> Dict[str, Optional[float]]:
    v = np.array([x for x in values if x is not None], dtype=float)
    if v.size == 0:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0, "n": int(v.size)}


def wilson_ci(successes: int, n: int, z: float = 1.96) -> List[Optional[float]]:
    """95 % Wilson score interval of a rate."""
    if n == 0:
        return [None, None]
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return [max(0.0, centre - half), min(1.0, centre + half)]


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
    return {
        "num_images": n,
        "best_psnr": _mean_std(best_psnr),
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
    }
