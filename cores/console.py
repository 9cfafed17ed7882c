"""What a run prints: one-line warnings on stderr and the end-of-run summary table."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict, Hashable, List, Optional, Sequence, Set, Union

_WARNED: Set[Hashable] = set()


def one_line(text: str) -> str:
    """Collapse any whitespace (newlines from exception texts included) so a message stays one line."""
    return " ".join(str(text).split())


def note(message: str) -> None:
    """`note: …` as exactly one stderr line (information, nothing wrong)."""
    from tqdm import tqdm

    tqdm.write("note: " + one_line(message), file=sys.stderr)
    sys.stderr.flush()


def warn(message: str, key: Optional[Hashable] = None) -> None:
    """`warning: …` as exactly one stderr line; with `key`, at most once per process for that key.

    Python's `warnings.warn` prints two lines (the message and the source line) and Hydra's logger
    goes to stdout between the results, so neither is used for run-time warnings.
    """
    if key is not None:
        if key in _WARNED:
            return
        _WARNED.add(key)
    from tqdm import tqdm

    # through tqdm, so a progress bar on stderr is cleared first instead of sharing the line
    tqdm.write("warning: " + one_line(message), file=sys.stderr)
    sys.stderr.flush()


def _num(v: Optional[float], fmt: str = "{:.2f}") -> str:
    return "n/a" if v is None else fmt.format(v)


def _mean_pm_std(block: Optional[Dict]) -> str:
    """`mean ± std`; the spread of one image is not a number, so it reads `± n/a` then."""
    if not block or block.get("mean") is None:
        return "n/a"
    std = block.get("std") if (block.get("n") or 0) > 1 else None
    return f"{_num(block['mean'])} ± {_num(std)}"


def _rate(rate: Optional[float], ci: Optional[Sequence[Optional[float]]]) -> str:
    if rate is None:
        return "n/a"
    if ci and ci[0] is not None and ci[1] is not None:
        return f"{rate:.0%} [{ci[0]:.0%}–{ci[1]:.0%}]"
    return f"{rate:.0%}"


def _md(header: List[str], row: List[str]) -> List[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), "| " + " | ".join(row) + " |"]


def format_summary(metrics: Dict, root: Union[str, Path]) -> str:
    """The table printed at the end of a run, from metrics.json's content.

    A particle that converged to the 180° twin is a valid phase-retrieval solution, so the
    table shows the twin and the better-of-both PSNR next to the ground-truth PSNR, and the
    orientation rates that need no PSNR threshold next to the thresholded ones.
    """
    s = metrics["summary"]
    quality = _md(
        ["images", "best PSNR", "best twin PSNR", "best PSNR any orient.", "mean-of-means PSNR", "selected PSNR",
         "best SSIM", "best LPIPS", "s/image"],
        [str(s["num_images"]), _mean_pm_std(s.get("best_psnr")), _mean_pm_std(s.get("best_psnr_twin")),
         _mean_pm_std(s.get("best_psnr_any_orientation")), _num(s.get("mean_of_mean_psnr")),
         _num(s.get("selected_psnr_mean")), _num(s.get("best_ssim_mean"), "{:.3f}"),
         _num(s.get("best_lpips_mean"), "{:.3f}"), _num(s.get("time_per_image_sec"), "{:.1f}")])
    o = s.get("orientation") or {}
    frac = o.get("particle_fraction") or {}
    orient = _md(
        ["success (PSNR ≥ eval.success_psnr)", "both orient. (≥ eval.success_psnr)", "correct orient. found (any PSNR)", "both orient. found (any PSNR)",
         "particles gt / twin / unclear"],
        [_rate(s.get("success_rate"), s.get("success_rate_ci95")),
         _rate(s.get("both_orientations_rate"), s.get("both_orientations_rate_ci95")),
         _rate(o.get("correct_orientation_found_rate"), o.get("correct_orientation_found_rate_ci95")),
         _rate(o.get("both_orientations_any_rate"), o.get("both_orientations_any_rate_ci95")),
         " / ".join(_num(frac.get(k), "{:.0%}") for k in ("gt", "twin", "unclear")) if frac else "n/a"])
    lines = [f"\nResults in {root}", *quality, "± : std over images, ddof 0 (np.std, as DAPS reports it)", "",
             *orient]
    if o.get("margin_db") is not None:
        lines.append(f"orientation: gt or twin when that PSNR is ≥ {o['margin_db']:g} dB above the other, "
                     "else unclear")
    num = metrics.get("numerics") or {}
    if num.get("nan_events") or num.get("non_finite_particles"):
        lines.append(f"warning: {num['nan_events']} NaN/inf MCMC reset(s) in image(s) {num['images_with_nan_events']}, "
                     f"{num['non_finite_particles']} non-finite final particle(s) (metrics.json: numerics)")
    return "\n".join(lines)
