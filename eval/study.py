"""The study's numbers per run and per pair of runs, from records, metadata and logs.

Each function takes a loaded run (see `eval/parse_metrics.py`) and returns plain numbers, so the
markdown, CSV and plots all show the same values and tests can check them by hand.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from cores.compute import NETWORKS as COMPUTE_KEYS  # the networks of a record's `compute`
from cores.evaluation import wilson_ci

ORIENTATIONS = ("gt", "twin", "unclear")
DEFAULT_MARGIN_DB = 1.0
# keys that name a run or pick its images rather than define it: ignored (silently) when looking for a
# run's counterpart
RUN_NAME_KEYS = {"name", "save_dir", "resume", "data.start_id", "data.end_id", "shard", "num_shards"}
# keys that only choose which files a run writes: ignored for the counterpart, but listed when they differ
OUTPUT_ONLY_KEYS = {"grid_max_images", "save_samples", "save_traj", "traj_every"}
RUN_IDENTITY_KEYS = RUN_NAME_KEYS | OUTPUT_ONLY_KEYS
PRUNING_KEYS = {"pruning_step", "pruning_keep", "pruning_mode", "pruning_criterion", "pruning_diversity_tol",
                "pruning_refill"}


# --- what a run holds, and which images two runs share ------------------------------------------
def lacks(run, field: str) -> bool:
    """Whether the run's format does not record `field` (the original study's folders, eval/original.py):
    what derives from it is shown as n/a, never as 0."""
    from eval.original import LACKS, ORIGINAL

    return getattr(run, "origin", "project") == ORIGINAL and field in LACKS


def common_images(a, b) -> Tuple[List[int], Dict[str, int]]:
    """The image indices two runs share: the same index and the same source content (`source_sha256`);
    where a record has no hash (the original's format, older records) the index alone pairs them.
    Counts: `same_index`, `by_index` (paired without a hash), `differ` (same index, other content)."""
    ia, ib = a.by_image(), b.by_image()
    same = sorted(set(ia) & set(ib))
    common, by_index, differ = [], 0, 0
    for i in same:
        ha, hb = ia[i].get("source_sha256"), ib[i].get("source_sha256")
        if ha is None or hb is None:
            common.append(i)
            by_index += 1
        elif ha == hb:
            common.append(i)
        else:
            differ += 1
    return common, {"same_index": len(same), "by_index": by_index, "differ": differ}


def pairing_notes(a, b) -> List[str]:
    """One line each when two compared runs hold different images at the same index, or pair only by index."""
    common, c = common_images(a, b)
    out = []
    if c["differ"] and not common:
        out.append(f"warning: {b.label} and {a.label} hold different images (none of their "
                   f"{c['same_index']} shared index(es) has the same source content); not compared")
    elif c["differ"]:
        out.append(f"warning: {b.label} vs {a.label}: {c['differ']} image(s) at the same index hold other "
                   f"content; compared on the {len(common)} image(s) whose content agrees")
    if c["by_index"]:
        out.append(f"note: {b.label} vs {a.label}: {c['by_index']} image(s) paired by index only (a record "
                   "without a source hash: the original study's format or an older run)")
    return out


def dataset_key(run) -> str:
    """The data set a run read: its data folder's name (`data.root`), else `data.name`, else the
    `<dataset>_<N>img` part of its label."""
    from pathlib import PurePath

    data = run.config.get("data") if isinstance(run.config, dict) else None
    if isinstance(data, dict) and isinstance(data.get("root"), str) and data["root"].strip("/"):
        return PurePath(data["root"].rstrip("/")).name
    if isinstance(data, dict) and data.get("name"):
        return str(data["name"])
    parts = run.label.split("/")
    return parts[-2].rsplit("_", 1)[0] if len(parts) >= 2 and parts[-2].endswith("img") else "unknown"


# --- small statistics -------------------------------------------------------------------------
def finite(xs: Iterable) -> List[float]:
    return [float(x) for x in xs if x is not None and math.isfinite(float(x))]


def mean_std(xs: Iterable) -> Tuple[Optional[float], Optional[float], int]:
    """Mean and std over images (ddof 0, as DAPS reports ±; 0 for one value) of the finite values, and their
    count.  A spread of the particles within one image is a sample std (ddof 1) instead."""
    from cores.evaluation import ACROSS_IMAGE_DDOF

    v = finite(xs)
    if not v:
        return None, None, 0
    return float(np.mean(v)), float(np.std(v, ddof=ACROSS_IMAGE_DDOF)), len(v)


def mean_ci(xs: Iterable, level: float = 0.95) -> Dict[str, Optional[float]]:
    """Mean with a Student-t confidence interval (None bounds below two values)."""
    from scipy.stats import t

    v = finite(xs)
    out: Dict[str, Optional[float]] = {"mean": None, "low": None, "high": None, "n": len(v)}
    if not v:
        return out
    out["mean"] = float(np.mean(v))
    if len(v) > 1:
        half = float(t.ppf(0.5 + level / 2, len(v) - 1) * np.std(v, ddof=1) / math.sqrt(len(v)))
        out["low"], out["high"] = out["mean"] - half, out["mean"] + half
    return out


def equivalence_tost(xs: Iterable, margin: float, alpha: float = 0.05) -> Dict[str, object]:
    """Two one-sided t-tests (Schuirmann's TOST) that the mean paired difference lies within ±margin.

    H0: mean ≤ −margin or mean ≥ +margin.  Equivalence is shown when both one-sided p-values are below
    `alpha`, i.e. when the (1 − 2·alpha) t interval lies inside ±margin.  Identical pairs (zero spread) are
    equivalent exactly when their mean lies inside the margin.  Below two values nothing is shown."""
    from scipy.stats import t

    v = finite(xs)
    n = len(v)
    out: Dict[str, object] = {"n": n, "margin": float(margin), "alpha": alpha, "mean": None, "low": None,
                              "high": None, "p_lower": None, "p_upper": None, "p_value": None,
                              "equivalent": False, "note": ""}
    if n < 2:
        out["note"] = f"n={n} < 2"
        return out
    mean, se = float(np.mean(v)), float(np.std(v, ddof=1)) / math.sqrt(n)
    out["mean"] = mean
    if se == 0.0:
        out["low"] = out["high"] = mean
        out["p_lower"] = 0.0 if mean > -margin else 1.0
        out["p_upper"] = 0.0 if mean < margin else 1.0
    else:
        half = float(t.ppf(1 - alpha, n - 1)) * se
        out["low"], out["high"] = mean - half, mean + half
        out["p_lower"] = float(t.sf((mean + margin) / se, n - 1))   # H0: mean <= -margin
        out["p_upper"] = float(t.cdf((mean - margin) / se, n - 1))  # H0: mean >= +margin
    out["p_value"] = max(out["p_lower"], out["p_upper"])
    out["equivalent"] = bool(out["p_value"] < alpha)
    return out


def rate(k: int, n: int) -> Dict[str, Optional[float]]:
    lo, hi = wilson_ci(k, n)
    return {"k": k, "n": n, "rate": (k / n) if n else None, "low": lo, "high": hi}


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: the discordant pairs b (A only) and c (B only) under Bin(b+c, ½)."""
    if b + c == 0:
        return 1.0
    from scipy.stats import binomtest

    return float(binomtest(min(b, c), b + c, 0.5).pvalue)


# --- orientation ------------------------------------------------------------------------------
def margin_db(config: Dict) -> float:
    ev = config.get("eval") if isinstance(config, dict) else None
    m = ev.get("orientation_margin_db") if isinstance(ev, dict) else None
    return float(m) if m is not None else DEFAULT_MARGIN_DB


def particle_orientation(p: Optional[float], p_twin: Optional[float], margin: float) -> str:
    """'gt' / 'twin' when one PSNR beats the other by at least `margin` dB, else 'unclear' (the run's rule)."""
    from cores.evaluation import orientation

    return orientation(p, p_twin, margin)


def image_orientation(rec: Dict, margin: float) -> Dict:
    """The record's orientation fields, or the same fields computed from `psnr` / `psnr_twin`."""
    if isinstance(rec.get("orientation"), list):
        orient = [str(o) for o in rec["orientation"]]
    else:
        pt = rec.get("psnr_twin") or [None] * len(rec.get("psnr", []))
        orient = [particle_orientation(p, q, margin) for p, q in zip(rec.get("psnr", []), pt)]
    found = sorted(set(orient))
    correct = rec.get("correct_orientation_found")
    both = rec.get("both_orientations_any")
    return {"orientation": orient,
            "orientations_found": list(rec.get("orientations_found", found)),
            "correct_orientation_found": bool("gt" in orient if correct is None else correct),
            "both_orientations_any": bool(("gt" in orient and "twin" in orient) if both is None else both)}


def orientation_summary(run) -> Dict:
    """Image rates of the correct orientation / both orientations (Wilson CI) and particle fractions."""
    margin = margin_db(run.config)
    per = [image_orientation(r, margin) for r in run.images]
    stored = {r["orientation_margin_db"] for r in run.images if r.get("orientation_margin_db") is not None}
    if len(stored) == 1:  # the margin the records were labelled with
        margin = float(stored.pop())
    n = len(per)
    counts = {o: sum(p["orientation"].count(o) for p in per) for o in ORIENTATIONS}
    total = sum(counts.values())
    return {"margin_db": margin,
            "correct": rate(sum(p["correct_orientation_found"] for p in per), n),
            "both_any": rate(sum(p["both_orientations_any"] for p in per), n),
            "particle_counts": counts, "num_particles": total,
            "particle_fractions": {o: (counts[o] / total if total else None) for o in ORIENTATIONS}}


def orientation_pair(a, b) -> Dict[str, Dict]:
    """Exact McNemar of A vs B on common images, for both binary orientation outcomes."""
    ma, mb = margin_db(a.config), margin_db(b.config)
    ia, ib = a.by_image(), b.by_image()
    common = common_images(a, b)[0]
    out = {}
    for key in ("correct_orientation_found", "both_orientations_any"):
        xa = [image_orientation(ia[i], ma)[key] for i in common]
        xb = [image_orientation(ib[i], mb)[key] for i in common]
        b_only_a = sum(x and not y for x, y in zip(xa, xb))
        c_only_b = sum(y and not x for x, y in zip(xa, xb))
        out[key] = {"n": len(common), "a_rate": (sum(xa) / len(common)) if common else None,
                    "b_rate": (sum(xb) / len(common)) if common else None,
                    "a_only": b_only_a, "b_only": c_only_b, "p_value": mcnemar_exact(b_only_a, c_only_b)}
    return out


# --- selection and spread -----------------------------------------------------------------------
def _at(rec: Dict, key: str, idx) -> Optional[float]:
    vals = rec.get(key) or []
    return vals[idx] if idx is not None and idx < len(vals) else None


def selection_summary(run) -> Dict:
    """best_idx counts (by particle id), loss-selection accuracy and the dB it loses on average."""
    counts: Dict[int, int] = {}
    hits, lost = [], []
    for rec in run.images:
        best, sel = rec.get("best_idx"), rec.get("selected_idx")
        ids = rec.get("particle_ids") or list(range(len(rec.get("psnr", []))))
        if best is not None:
            pid = int(ids[best])
            counts[pid] = counts.get(pid, 0) + 1
        if best is not None and sel is not None:
            hits.append(best == sel)
            pb, ps = _at(rec, "psnr", best), _at(rec, "psnr", sel)
            if pb is not None and ps is not None:
                lost.append(pb - ps)
    return {"best_counts": dict(sorted(counts.items())), "accuracy": rate(sum(hits), len(hits)),
            "db_lost": mean_ci(lost)}


def feature_of(run) -> Optional[str]:
    for row in run.repulsion:
        if row.get("feature"):
            return str(row["feature"])
    f = run.config.get("repulsion_feature") if isinstance(run.config, dict) else None
    return str(f) if f is not None else None


def last_on_step(run) -> Optional[int]:
    steps = [int(r["step"]) for r in run.repulsion if r.get("repulsion_on") and "step" in r]
    return max(steps) if steps else None


def distance_at_step(run, step: Optional[int] = None) -> Dict:
    """Per image the mean pairwise feature distance at its last logged ON step (or at `step`)."""
    by_img: Dict[int, Tuple[int, float]] = {}
    for r in run.repulsion:
        d = r.get("mean_pairwise_dino_dist")
        if d is None or "step" not in r or not math.isfinite(float(d)):
            continue
        s = int(r["step"])
        if step is None and not r.get("repulsion_on"):
            continue
        if step is not None and s != step:
            continue
        img = int(r["image_idx"])
        if img not in by_img or s > by_img[img][0]:
            by_img[img] = (s, float(d))
    vals = [d for _, d in by_img.values()]
    m, sd, n = mean_std(vals)
    steps = sorted({s for s, _ in by_img.values()})
    return {"mean": m, "std": sd, "n": n, "steps": steps}


def spread_summary(run, baseline_step: Optional[int] = None) -> Dict:
    """Within-image spread: std of particle PSNR; feature distance at the last ON step.

    A run without ON lines (a scale-0 baseline that logs distances) is read at `baseline_step`,
    the other runs' last ON step, so the two distances are taken at the same step."""
    stds = []
    for rec in run.images:
        p = finite(rec.get("psnr", []))
        if len(p) > 1:
            stds.append(float(np.std(p, ddof=1)))
        elif p:
            stds.append(0.0)
    m, sd, n = mean_std(stds)
    if last_on_step(run) is not None:
        dist = distance_at_step(run)
    elif baseline_step is not None:
        dist = distance_at_step(run, baseline_step)
    else:
        dist = {"mean": None, "std": None, "n": 0, "steps": []}
    return {"psnr_std": {"mean": m, "std": sd, "n": n}, "distance": dist, "feature": feature_of(run)}


# --- cost ---------------------------------------------------------------------------------------
def world_size(meta: Dict) -> int:
    if meta.get("world_size"):
        return int(meta["world_size"])
    if isinstance(meta.get("ranks"), list) and meta["ranks"]:
        return len(meta["ranks"])
    return 1


def part_gpu_seconds(part: Dict) -> Tuple[Optional[float], str]:
    """GPU-seconds of one run folder: wall time × processes; the records' sampling times when the
    wall time is missing or cannot cover every record (a resumed run's last job saw only some)."""
    meta = part.get("metadata") or {}
    wall = meta.get("wall_time_sec")
    rec_time = part.get("record_time_sec") or 0.0
    if wall is not None:
        total = float(wall) * world_size(meta)
        if total >= 0.99 * rec_time:
            return total, "wall"
    return (rec_time if part.get("images") else None), "records"


def _speed_block(run) -> Dict:
    """The run's `speed` settings from its config.yaml ({} when absent)."""
    cfg = run.config if isinstance(run.config, dict) else {}
    return cfg.get("speed") if isinstance(cfg.get("speed"), dict) else {}


def _part_metadata(run) -> List[Dict]:
    """The metadata of each merged part of the run (the run's own when it has no parts)."""
    return [p.get("metadata") or {} for p in run.parts] or [run.metadata or {}]


def _peak(run, key: str) -> Optional[float]:
    """The largest `key` (peak_memory_mb / peak_reserved_mb) over the run and every rank of its parts."""
    vals = finite([run.vram.get(key)] + [r.get(key) for p in run.parts
                                         for r in ((p.get("metadata") or {}).get("ranks") or [])])
    return max(vals) if vals else None


def cudnn_autotuned(run) -> bool:
    """Whether the run's peak VRAM includes cuDNN benchmark's autotuning: with `speed.cudnn_benchmark`
    on a GPU, the first call per convolution shape tries candidate algorithms, each with its own
    workspace (68.9 GiB on an H100 for a decoder whose steady state needs 7.6 GiB, PROJECT.md §3), and
    the peak counters keep that, not the sampler's memory.  A run that warmed its shapes before the
    meter started (`vram.autotune_peak_mb` present, cores/warmup.py) reports the trials on their own
    line: its peak is the sampler's."""
    on_gpu = any(str(m.get("device", "")).startswith("cuda") or m.get("gpu_name") for m in _part_metadata(run))
    warmed = "autotune_peak_mb" in (run.vram or {})
    return bool(_speed_block(run).get("cudnn_benchmark")) and on_gpu and not warmed


def device_kind(run) -> str:
    """'cpu', 'gpu' or 'unknown' from the devices in the run's metadata (every rank of every folder)."""
    devices = []
    for part in run.parts:
        meta = part.get("metadata") or {}
        ranks = meta.get("ranks") if isinstance(meta.get("ranks"), list) else []
        devices += [str(d.get("device")) for d in ranks if isinstance(d, dict) and d.get("device")]
        device = _meta_value(meta, "device")
        if device:
            devices.append(str(device))
        elif meta.get("gpu_name"):
            devices.append("cuda")
    kinds = {"cpu" if d.startswith("cpu") else "gpu" for d in devices}
    return kinds.pop() if len(kinds) == 1 else "unknown"


def seconds_unit(runs: Sequence) -> Tuple[str, Optional[str]]:
    """(unit of the cost rows, warning): `GPU` or `CPU` when every run used that device, else `device`
    (each column then names its device); a warning line when the runs used different devices."""
    kinds = {r.label: device_kind(r) for r in runs}
    known = set(kinds.values()) - {"unknown"}
    if set(kinds.values()) == {"gpu"}:
        return "GPU", None
    if set(kinds.values()) == {"cpu"}:
        return "CPU", None
    if len(known) < 2:
        return "device", None
    named = ", ".join(f"{label}: {k.upper() if k != 'unknown' else 'not recorded'}" for label, k in kinds.items())
    return "device", (f"warning: the runs used different devices ({named}); their seconds and rates per hour "
                      "are not comparable across devices")


def cost_summary(run) -> Dict:
    """GPU-seconds per image, peak VRAM and successes per GPU-hour."""
    totals = [part_gpu_seconds(p) for p in run.parts]
    known = [t for t, _ in totals if t is not None]
    sources = sorted({s for _, s in totals})
    n = len(run.images)
    gpu_total = float(sum(known)) if known else None
    per_image = gpu_total / n if gpu_total is not None and n else None
    succ = sum(bool(r.get("success")) for r in run.images)
    margin = margin_db(run.config)
    both = sum(image_orientation(r, margin)["both_orientations_any"] for r in run.images)
    hours = gpu_total / 3600 if gpu_total else None
    if lacks(run, "success"):
        hours = None  # no success flags, no orientations: n/a per hour rather than 0
    return {"gpu_sec_total": gpu_total, "gpu_sec_per_image": per_image, "source": "+".join(sources),
            "processes": max((world_size(p.get("metadata") or {}) for p in run.parts), default=1),
            "peak_memory_mb": _peak(run, "peak_memory_mb"),
            "peak_reserved_mb": _peak(run, "peak_reserved_mb"),
            "peak_includes_autotuning": cudnn_autotuned(run),
            "device": device_kind(run),
            "success_per_gpu_hour": succ / hours if hours else None,
            "both_orientations_per_gpu_hour": both / hours if hours else None,
            **work_per_image(run.images)}


def work_per_image(images: Sequence[Dict]) -> Dict:
    """Per-image means of the records' `time_segments` (seconds per phase), `compute` (network evaluations,
    one particle through a network once = 1) and `tflop`, over the records that carry them; None (shown
    n/a) where no record does, as in runs written before these fields existed.  `*_images` counts the
    records each mean is taken over."""
    seg_recs = [r["time_segments"] for r in images if isinstance(r.get("time_segments"), dict)]
    phases = sorted({k for s in seg_recs for k in s})
    comp_recs = [r["compute"] for r in images if isinstance(r.get("compute"), dict)]
    tflops = finite(r.get("tflop") for r in images)
    return {"time_segments_per_image": ({k: float(np.mean(finite(s.get(k, 0.0) for s in seg_recs))) for k in phases}
                                        if seg_recs else None),
            "time_segments_images": len(seg_recs),
            "compute_per_image": ({k: float(np.mean(finite(c.get(k, 0) for c in comp_recs))) for k in COMPUTE_KEYS}
                                  if comp_recs else None),
            "compute_images": len(comp_recs),
            "tflop_per_image": float(np.mean(tflops)) if tflops else None,
            "tflop_images": len(tflops), "num_images": len(images)}


# --- protocol ------------------------------------------------------------------------------------
# What a paired test assumes equal besides the compared setting: the numerical path, the kernels, the
# batching (per-image VRAM and times), the hardware.  Seed and image set are checked next to them.
PROTOCOL_KEYS = ("preset", "precision", "deterministic", "batch_size", "device", "gpu_name")


def _meta_value(meta: Dict, key: str):
    """A protocol value stored in run metadata (flat key, or inside a `speed` block); a block (the
    original's `device: {type: …}`) gives its `type`."""
    if isinstance(meta.get(key), dict):
        return meta[key].get("type") if isinstance(meta[key].get("type"), str) else None
    if meta.get(key) is not None:
        return meta[key]
    speed = meta.get("speed") if isinstance(meta.get("speed"), dict) else {}
    return speed.get(key)


def run_protocol(run) -> Dict[str, Optional[str]]:
    """Speed preset, precision, determinism, images per batch, device type and GPU name of a run, as
    strings (None where neither config.yaml nor the metadata records it).  Several parts that differ
    (a merged 10 + 90 pair run on two cards) give `a+b`."""
    cfg = run.config if isinstance(run.config, dict) else {}
    speed = _speed_block(run)
    metas = _part_metadata(run)
    from_cfg = {"preset": speed.get("preset"), "precision": speed.get("precision"),
                "deterministic": cfg.get("deterministic"), "batch_size": cfg.get("batch_size")}
    if getattr(run, "origin", "project") != "project":
        # the original's posterior_sample.py samples image by image (its `batch_size` key is unused)
        from_cfg["batch_size"] = 1
    out: Dict[str, Optional[str]] = {}
    for key in PROTOCOL_KEYS:
        if from_cfg.get(key) is not None:
            vals = {from_cfg[key]}
        else:
            vals = {_meta_value(m, key) for m in metas} - {None}
            if key == "preset" and not vals:
                vals = {_meta_value(m, "speed_preset") for m in metas} - {None}
        if key == "device":  # cuda:0 and cuda:3 are the same protocol; the card is `gpu_name`
            vals = {str(v).split(":")[0] for v in vals}
        if key == "gpu_name" and not vals and {str(m.get("device", "")).split(":")[0] for m in metas} == {"cpu"}:
            vals = {"none (CPU)"}
        out[key] = "+".join(sorted(str(v) for v in vals)) if vals else None
    return out


def protocol_differences(a, b) -> List[Tuple[str, Optional[str], Optional[str]]]:
    """(key, value in A, value in B) for each protocol key, the seed and the image set where two runs differ."""
    pa, pb = run_protocol(a), run_protocol(b)
    diff = [(k, pa[k], pb[k]) for k in PROTOCOL_KEYS if pa[k] != pb[k]]
    sa = a.config.get("seed") if isinstance(a.config, dict) else None
    sb = b.config.get("seed") if isinstance(b.config, dict) else None
    if sa != sb:
        diff.append(("seed", None if sa is None else str(sa), None if sb is None else str(sb)))
    ia, ib = set(a.by_image()), set(b.by_image())
    common = common_images(a, b)[0]
    if ia != ib or len(common) != len(ia):
        diff.append(("images", f"{len(ia)} images", f"{len(ib)} images, {len(common)} in common"))
    return diff


def differences_text(diff: Sequence[Tuple[str, Optional[str], Optional[str]]]) -> str:
    """`key (a vs b), …` for `protocol_differences` rows (n/a where a run does not record the value)."""
    return ", ".join(f"{k} ({'n/a' if x is None else x} vs {'n/a' if y is None else y})" for k, x, y in diff)


def protocol_warning(a, b) -> Optional[str]:
    """One line naming the keys in which two paired runs differ, or None when they agree."""
    diff = protocol_differences(a, b)
    if not diff:
        return None
    return (f"warning: paired runs {b.label} vs {a.label} differ in {differences_text(diff)}; paired "
            "differences mix their effect in")


# --- repulsion ---------------------------------------------------------------------------------
#: the two ratios ||λ·r|| / ||score|| a repulsion.jsonl line can hold (keys of `repulsion_by_step`)
RATIO_NAMES = {"ratio": "‖λ·r‖ / ‖score‖ at the ODE's last drift evaluation (the original's log)",
               "ratio_at_sigma": "mean ‖λ·r_i‖ / mean ‖score_i‖ at σ_i"}


def line_ratios(row: Dict, origin: str = "project") -> Dict[str, Optional[float]]:
    """{"ratio", "ratio_at_sigma"} of one repulsion.jsonl line.  `ratio_scaled_to_score` is the original's
    ratio (norms over the image's particles at the PF-ODE's last drift evaluation) in the original's lines
    and in the project's lines that carry `ratio_per_particle_at_sigma`; the project's lines written
    before that field existed held the per-particle ratio at σ_i in `ratio_scaled_to_score`."""
    if "ratio_per_particle_at_sigma" in row or origin != "project":
        return {"ratio": row.get("ratio_scaled_to_score"), "ratio_at_sigma": row.get("ratio_per_particle_at_sigma")}
    return {"ratio": None, "ratio_at_sigma": row.get("ratio_scaled_to_score")}


def repulsion_summary(run) -> Dict:
    """Median step-0 ratios over images (each meaning of `RATIO_NAMES`), and repulsion seconds per image."""
    step0 = [line_ratios(r, getattr(run, "origin", "project")) for r in run.repulsion
             if int(r.get("step", -1)) == 0 and r.get("repulsion_on", True)]
    times = finite((r.get("repulsion") or {}).get("total_time_sec") for r in run.images
                   if isinstance(r.get("repulsion"), dict))
    out = {"time_per_image": mean_std(times)[0], "feature": feature_of(run), "is_baseline": is_baseline(run)}
    for key in RATIO_NAMES:
        ratios = finite(x[key] for x in step0)
        out[f"step0_{key}_median"] = float(np.median(ratios)) if ratios else None
        out[f"step0_{key}_images"] = len(ratios)
    return out


def is_baseline(run) -> bool:
    """A scale-0 run that logged pairwise distances (its repulsion.jsonl lines are all OFF)."""
    s = run.config.get("repulsion_scale") if isinstance(run.config, dict) else None
    return bool(run.repulsion) and s is not None and float(s) == 0.0


# --- pruning ---------------------------------------------------------------------------------
def flat_config(d, prefix: str = "") -> Dict[str, object]:
    out: Dict[str, object] = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            out.update(flat_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(a: Dict, b: Dict, skip: set = RUN_NAME_KEYS) -> Dict[str, Tuple[object, object]]:
    """{flat key: (value in a, value in b)} for every key outside `skip` whose values differ
    ('<missing>' where one config lacks the key)."""
    fa, fb = flat_config(a), flat_config(b)
    out = {}
    for k in sorted(set(fa) | set(fb)):
        if k in skip:
            continue
        va, vb = fa.get(k, "<missing>"), fb.get(k, "<missing>")
        if va != vb:
            out[k] = (va, vb)
    return out


def counterpart(run, runs: Sequence, ignore: set) -> Optional[object]:
    """The other input run (sharing images with this one) whose config differs from this one's only in
    `ignore` and the output-only keys (run name, folder and image range never count)."""
    if not run.config:
        return None
    for other in runs:
        if other is run or not other.config:
            continue
        diff = config_differences(run.config, other.config)
        if set(diff) <= ignore | OUTPUT_ONLY_KEYS and common_images(run, other)[0]:
            return other
    return None


def pruning_on(run) -> bool:
    s = run.config.get("pruning_step") if isinstance(run.config, dict) else None
    return (s is not None and int(s) >= 0) or any(isinstance(r.get("pruning"), dict) for r in run.images)


def pruning_summary(run, runs: Sequence = ()) -> Dict:
    """Masking-mode regret (was the eventual best particle pruned?) and savings vs the unpruned run."""
    blocks = [r["pruning"] for r in run.images if isinstance(r.get("pruning"), dict)]
    judged = [b for b in blocks if b.get("did_prune") and b.get("pruning_regret") is not None]
    k = sum(bool(b["pruning_regret"]) for b in judged)
    gaps = [b.get("pruning_regret_db") for b in judged]
    regret_gaps = [b.get("pruning_regret_db") for b in judged if b["pruning_regret"]]
    modes = sorted({str(b.get("mode")) for b in blocks if b.get("mode")})
    out = {"pruned_images": sum(bool(b.get("did_prune")) for b in blocks), "modes": modes,
           "regret": rate(k, len(judged)), "db_lost_all": mean_ci(gaps), "db_lost_regret": mean_ci(regret_gaps),
           "counterpart": None}
    other = counterpart(run, [r for r in runs if not pruning_on(r)], PRUNING_KEYS)
    if other is not None:
        mine, theirs = cost_summary(run), cost_summary(other)
        diff = config_differences(run.config, other.config)
        out["counterpart"] = {"label": other.label,
                              "pruning_keys": {k: v for k, v in diff.items() if k in PRUNING_KEYS},
                              "output_only_keys": {k: v for k, v in diff.items() if k in OUTPUT_ONLY_KEYS},
                              "time": timing_savings(run, other),
                              "gpu_sec_per_image": (mine["gpu_sec_per_image"], theirs["gpu_sec_per_image"]),
                              "peak_memory_mb": (mine["peak_memory_mb"], theirs["peak_memory_mb"]),
                              "peak_includes_autotuning": (mine["peak_includes_autotuning"],
                                                           theirs["peak_includes_autotuning"])}
    return out


# --- time saved by pruning, judged against run-to-run noise -----------------------------------------
def step_times(rec: Dict) -> Optional[List[float]]:
    """The image's per-step sampling seconds (`timing.per_step_sec`), or None when not recorded."""
    t = rec.get("timing")
    steps = t.get("per_step_sec") if isinstance(t, dict) else None
    return [float(x) for x in steps] if isinstance(steps, list) and steps and len(finite(steps)) == len(steps) \
        else None


def image_seconds(rec: Dict) -> Tuple[Optional[float], str]:
    """(seconds this image took, source): the sum of `time_segments` (all phases), else of the per-step
    times, else `time_sec`; never the run's wall time, which also holds start-up and loading."""
    seg = rec.get("time_segments")
    if isinstance(seg, dict) and seg and len(finite(seg.values())) == len(seg):
        return float(sum(float(v) for v in seg.values())), "time_segments"
    steps = step_times(rec)
    if steps is not None:
        return float(sum(steps)), "per-step times"
    t = rec.get("time_sec")
    return (float(t), "time_sec") if t is not None and math.isfinite(float(t)) else (None, "none")


def prune_step_of(rec: Dict, config: Dict) -> Optional[int]:
    """The step at which this image's particles were pruned (record first, then the config); None when
    the image was not pruned."""
    block = rec.get("pruning")
    if isinstance(block, dict):
        if not block.get("did_prune"):
            return None
        if block.get("prune_step") is not None:
            return int(block["prune_step"])
    s = config.get("pruning_step") if isinstance(config, dict) else None
    return int(s) if s is not None and int(s) >= 0 else None


def timing_savings(pruned, unpruned) -> Dict:
    """Seconds per image saved by pruning, shown only when larger than the run-to-run noise.

    Both runs do the same work before the pruning step, so the paired per-step differences
    (unpruned − pruned, same image and step; images of one batch, whose step times are shares of the
    same clock readings, count once) before it are pure run-to-run noise; their 95 % t interval
    bounds how far two identical runs drift apart.  After the pruning step (the step itself included) the
    same differences hold the saving.  The saving is real when the 95 % t interval of the post-pruning
    differences lies entirely beyond that noise bound (verdict 'saving', or 'slower' on the other side);
    otherwise 'within noise'.  Without per-step times the per-image differences' interval must exclude 0.
    The seconds shown are the per-image totals (`image_seconds`) averaged over the common images."""
    mine, theirs = pruned.by_image(), unpruned.by_image()
    common = common_images(pruned, unpruned)[0]
    totals = [(image_seconds(mine[i]), image_seconds(theirs[i])) for i in common]
    pairs = [(a, b) for (a, _), (b, _) in totals if a is not None and b is not None]
    sources = sorted({s for pair in totals for _, s in pair if s != "none"})
    out: Dict = {"images": len(pairs), "source": "+".join(sources) or "none", "pruned_sec": None,
                 "unpruned_sec": None, "saved_sec": None, "saved_frac": None, "verdict": "n/a",
                 "criterion": None, "post": mean_ci([]), "pre": mean_ci([]), "noise_bound": None}
    if not pairs:
        return out
    a, b = float(np.mean([p[0] for p in pairs])), float(np.mean([p[1] for p in pairs]))
    out.update(pruned_sec=a, unpruned_sec=b, saved_sec=b - a, saved_frac=((b - a) / b) if b else None)
    pre, post, seen = [], [], set()
    for i in common:
        ta, tb = step_times(mine[i]), step_times(theirs[i])
        if ta is None or tb is None or len(ta) != len(tb):
            continue
        p = prune_step_of(mine[i], pruned.config)
        if (tuple(ta), tuple(tb), p) in seen:  # images of one batch share its step times: count them once
            continue
        seen.add((tuple(ta), tuple(tb), p))
        for s, (x, y) in enumerate(zip(ta, tb)):
            (post if p is not None and s >= p else pre).append(y - x)
    if len(post) >= 2:
        out["post"], out["pre"] = mean_ci(post), mean_ci(pre)
        pre_ci = out["pre"]
        noise = max(abs(pre_ci["low"]), abs(pre_ci["high"])) if pre_ci["low"] is not None else 0.0
        out["noise_bound"], out["criterion"] = noise, "per-step"
        lo, hi = out["post"]["low"], out["post"]["high"]
    else:
        c = mean_ci(y - x for x, y in pairs)
        out["post"], out["noise_bound"], out["criterion"] = c, 0.0, "per-image"
        lo, hi, noise = c["low"], c["high"], 0.0
    if lo is None:
        out["verdict"] = "within noise"
    elif lo > noise:
        out["verdict"] = "saving"
    elif hi < -noise:
        out["verdict"] = "slower"
    else:
        out["verdict"] = "within noise"
    return out


# --- hard data consistency ---------------------------------------------------------------------
def hdc_summary(run) -> Dict:
    """Per-particle PSNR change of the optimisation (after − before, paired), accepted rate, iterations."""
    deltas, deltas_acc = [], []
    accepted, iters, images = [], [], 0
    for rec in run.images:
        opt = rec.get("optimization") if isinstance(rec.get("optimization"), dict) else {}
        before = rec.get("psnr_before_optimization")
        acc = list(opt.get("accepted_mask") or [])
        accepted += [bool(a) for a in acc]
        iters += finite(opt.get("final_iters") or [])
        if isinstance(before, list):
            images += 1
            # accepted flags are in the optimisation's particle order (masking leaves frozen ones out)
            opt_ids = opt.get("particle_ids")
            pids = rec.get("particle_ids") or list(range(len(before)))
            accepted_of = dict(zip(opt_ids, acc)) if isinstance(opt_ids, list) else dict(zip(pids, acc))
            for j, (a, b) in enumerate(zip(rec.get("psnr", []), before)):
                if a is not None and b is not None:
                    deltas.append(float(a) - float(b))
                    if j < len(pids) and accepted_of.get(pids[j]):
                        deltas_acc.append(float(a) - float(b))
    return {"delta": mean_ci(deltas), "delta_accepted": mean_ci(deltas_acc), "images": images,
            "improved": sum(d > 0 for d in deltas), "accepted": rate(sum(accepted), len(accepted)),
            "mean_iters": mean_std(iters)[0], "ran": bool(accepted) or images > 0}


# --- merging metadata ----------------------------------------------------------------------------
def merged_metadata(parts: Sequence[Dict], images: List[Dict]) -> Dict:
    """Metadata of a merged entry: the first part's settings, times summed, hook totals from records."""
    import copy

    metas = [p.get("metadata") or {} for p in parts]
    out = copy.deepcopy(metas[0]) if metas else {}
    walls = [m.get("wall_time_sec") for m in metas]
    out["wall_time_sec"] = float(sum(walls)) if all(w is not None for w in walls) and walls else None
    out["world_size"] = max(world_size(m) for m in metas) if metas else 1
    ends = [m.get("end_time") for m in metas if m.get("end_time")]
    if ends:
        out["end_time"] = max(ends)
    starts = [m.get("start_time") for m in metas if m.get("start_time")]
    if starts:
        out["start_time"] = min(starts)
    for name, block in hook_totals(images, {k for m in metas for k in m}).items():
        out[name] = {**(out.get(name) or {}), **block}
    out["merged_from"] = [p["path"] for p in parts]
    out["parts"] = [{"path": p["path"], "images": p.get("images"), "wall_time_sec": m.get("wall_time_sec"),
                     "world_size": world_size(m), "git_commit": m.get("git_commit"), "gpu_name": m.get("gpu_name")}
                    for p, m in zip(parts, metas)]
    return out


def hook_totals(images: List[Dict], present: set) -> Dict:
    """Repulsion / pruning / optimisation run totals recomputed from the records, with each part's own
    `summarize`, for the parts the metadata or the records name."""
    from cores import optimization, pruning
    import repulsion

    fns = {"repulsion": repulsion.summarize, "pruning": pruning.summarize, "optimization": optimization.summarize}
    return {name: fn(images) for name, fn in fns.items()
            if name in present or any(isinstance(r.get(name), dict) for r in images)}


# --- per-step repulsion curves -------------------------------------------------------------------
def repulsion_by_step(run) -> Dict[int, Dict[str, Optional[float]]]:
    """Mean over images of the pairwise feature distance and of both scaled-repulsion/score ratios
    (`RATIO_NAMES`) per step (ratios only where repulsion was ON: an OFF step's zero is no ratio)."""
    acc: Dict[int, Dict[str, List[float]]] = {}
    for row in run.repulsion:
        if "step" not in row:
            continue
        a = acc.setdefault(int(row["step"]), {"dist": [], **{k: [] for k in RATIO_NAMES}})
        a["dist"] += finite([row.get("mean_pairwise_dino_dist")])
        if row.get("repulsion_on", True):
            for key, v in line_ratios(row, getattr(run, "origin", "project")).items():
                a[key] += finite([v])
    return {s: {k: (float(np.mean(v)) if v else None) for k, v in a.items()} for s, a in sorted(acc.items())}
