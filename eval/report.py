"""The study's tables (orientation, selection and spread, cost, repulsion, pruning, hard data
consistency) and the one-file report `DIR/report.md` with its plots."""
from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from eval.markdown import ci_text, fmt, table
from eval.study import (COMPUTE_KEYS, ORIENTATIONS, RATIO_NAMES, cost_summary, flat_config, hdc_summary, lacks, last_on_step,
                        seconds_unit,
                        orientation_pair, orientation_summary, pruning_on, pruning_summary, repulsion_summary, selection_summary,
                        spread_summary, world_size)


def _rate(r: Dict) -> str:
    if not r["n"]:
        return "n/a"
    return f"{r['rate']:.0%} [{r['low']:.0%}, {r['high']:.0%}] ({r['k']}/{r['n']})"


NOT_RECORDED = "n/a (not recorded: no twin PSNR)"


def _cols(runs: Sequence) -> List[str]:
    return ["metric"] + [r.label for r in runs]


# --- orientation -------------------------------------------------------------------------------
def orientation_table(runs: Sequence) -> str:
    """Correct / both orientations per image (Wilson 95 % CI) and particle fractions, one column per run."""
    o = [None if lacks(r, "orientation") else orientation_summary(r) for r in runs]

    def cell(x, text):
        return NOT_RECORDED if x is None else text(x)

    rows = [["correct orientation found [95% CI]"] + [cell(x, lambda x: _rate(x["correct"])) for x in o],
            ["both orientations (any PSNR) [95% CI]"] + [cell(x, lambda x: _rate(x["both_any"])) for x in o]]
    for k in ORIENTATIONS:
        rows.append([f"particles '{k}'"] + [cell(x, lambda x: f"{fmt(x['particle_fractions'][k], '{:.0%}')} "
                                                 f"({x['particle_counts'][k]}/{x['num_particles']})") for x in o])
    rows.append(["margin (dB)"] + [cell(x, lambda x: fmt(x["margin_db"], "{:g}")) for x in o])
    return table(_cols(runs), rows)


def orientation_pairs_table(pairs: Sequence[Tuple]) -> str:
    """Exact McNemar (two-sided) of each pair on common images."""
    rows = []
    for a, b in pairs:
        if lacks(a, "orientation") or lacks(b, "orientation"):
            rows.append([b.label, a.label, "orientations", NOT_RECORDED] + ["n/a"] * 4)
            continue
        res = orientation_pair(a, b)
        for key, name in (("correct_orientation_found", "correct orientation"),
                          ("both_orientations_any", "both orientations")):
            x = res[key]
            rows.append([b.label, a.label, name, str(x["n"]), fmt(x["a_rate"], "{:.0%}"), fmt(x["b_rate"], "{:.0%}"),
                         f"{x['a_only']} / {x['b_only']}", f"{x['p_value']:.3g}"])
    return table(["run B", "vs run A", "outcome", "common images", "A", "B", "only A / only B",
                  "McNemar exact p"], rows)


# --- selection and spread -----------------------------------------------------------------------
def selection_spread_table(runs: Sequence) -> str:
    sel = [selection_summary(r) for r in runs]
    on_steps = [s for s in (last_on_step(r) for r in runs) if s is not None]
    base_step = max(on_steps) if on_steps else None
    spr = [spread_summary(r, base_step) for r in runs]

    def counts(s: Dict) -> str:
        return ", ".join(f"p{k}: {v}" for k, v in s["best_counts"].items()) or "n/a"

    def dist(s: Dict) -> str:
        d = s["distance"]
        if d["mean"] is None:
            return "n/a"
        step = ",".join(str(x) for x in d["steps"])
        return f"{d['mean']:.4g} ± {d['std']:.2g} ({s['feature']}, step {step}, n={d['n']})"

    rows = [["best particle (oracle) counts"] + [counts(s) for s in sel],
            ["selection accuracy (selected = best) [95% CI]"] + [_rate(s["accuracy"]) for s in sel],
            ["dB lost by selecting with loss [95% CI]"] + [ci_text(s["db_lost"]) for s in sel],
            ["within-image std of particle PSNR (dB; ddof 1), mean ± std over images (ddof 0)"]
            + [f"{fmt(s['psnr_std']['mean'])} ± {fmt(s['psnr_std']['std'])}" for s in spr],
            ["pairwise feature distance at last ON step, mean ± std over images (ddof 0)"] + [dist(s) for s in spr]]
    return table(_cols(runs), rows)


# --- cost -----------------------------------------------------------------------------------------
def _of(x: Dict, key: str) -> str:
    """` (k/n images)` when only some records carry the field the mean is taken over."""
    k = x[f"{key}_images"]
    return f" ({k}/{x['num_images']} images)" if 0 < k < x["num_images"] else ""


def _phases(x: Dict) -> str:
    seg = x["time_segments_per_image"]
    if not seg:
        return "n/a"
    return ", ".join(f"{k} {fmt(v, '{:.3g}')}" for k, v in seg.items()) + _of(x, "time_segments")


def _evals(x: Dict, key: str) -> str:
    comp = x["compute_per_image"]
    return "n/a" if comp is None else fmt(comp[key], "{:.6g}") + _of(x, "compute")


def _tflop(x: Dict) -> str:
    return "n/a" if x["tflop_per_image"] is None else fmt(x["tflop_per_image"], "{:.4g}") + _of(x, "tflop")


AUTOTUNING = "includes cuDNN benchmark autotuning, not the sampler's memory"


def _peak(x: Dict, key: str) -> str:
    text = fmt(x[key], "{:.0f}")
    return f"{text} ({AUTOTUNING})" if x["peak_includes_autotuning"] and x[key] is not None else text


def cost_table(runs: Sequence) -> str:
    """Device-seconds (also per phase), peak VRAM allocated and reserved, network evaluations and TFLOP per
    image; n/a for runs written before a field existed.  The unit names the runs' device (GPU- or
    CPU-seconds); runs on different devices get the device per column instead (and a warning)."""
    c = [cost_summary(r) for r in runs]
    unit, _ = seconds_unit(runs)
    per_col = unit == "device"
    dev = lambda x: f", {x['device'].upper() if x['device'] != 'unknown' else 'device n/a'}" if per_col else ""  # noqa: E731
    rows = [[f"{unit}-seconds / image"] + [f"{fmt(x['gpu_sec_per_image'], '{:.3g}')} ({x['source']}{dev(x)})"
                                           for x in c],
            ["seconds / image by phase"] + [_phases(x) for x in c],
            ["processes"] + [str(x["processes"]) for x in c],
            [f"total {unit}-seconds"] + [fmt(x["gpu_sec_total"], "{:.4g}") for x in c],
            ["peak VRAM allocated (MB)"] + [_peak(x, "peak_memory_mb") for x in c],
            ["peak VRAM reserved (MB)"] + [_peak(x, "peak_reserved_mb") for x in c]]
    rows += [[f"network evaluations / image: {k}"] + [_evals(x, k) for x in c] for k in COMPUTE_KEYS]
    rows += [["TFLOP / image"] + [_tflop(x) for x in c],
             [f"successes / {unit}-hour"] + [fmt(x["success_per_gpu_hour"], "{:.4g}") for x in c],
             [f"both orientations (any PSNR) / {unit}-hour"] + [fmt(x["both_orientations_per_gpu_hour"], "{:.4g}")
                                                                 for x in c]]
    return table(_cols(runs), rows)


# --- repulsion --------------------------------------------------------------------------------------
def repulsion_table(runs: Sequence) -> str:
    rep = [repulsion_summary(r) for r in runs]
    rows = [["feature"] + [str(x["feature"]) if x["feature"] else "n/a" for x in rep],
            *([f"step-0 ratio {name}, median over images"]
              + [f"{fmt(x[f'step0_{key}_median'], '{:.3g}')} (n={x[f'step0_{key}_images']})" for x in rep]
              for key, name in RATIO_NAMES.items()),
            ["repulsion time / image (s)"] + [fmt(x["time_per_image"], "{:.3g}") for x in rep],
            ["scale-0 baseline curve"] + ["yes" if x["is_baseline"] else "no" for x in rep]]
    return table(_cols(runs), rows)


# --- pruning -------------------------------------------------------------------------------------
def key_changes(diff: Dict) -> str:
    """`pruning_step -1 → 29, pruning_keep 4 → 2` from {key: (this run's value, counterpart's value)}."""
    return ", ".join(f"{k} {theirs} → {mine}" for k, (mine, theirs) in diff.items())


def counterpart_text(cp: Optional[Dict]) -> str:
    """The unpruned run compared against, and every config key in which it differs from this run."""
    if cp is None:
        return "none among the inputs (no run differs only in the pruning keys)"
    text = f"{cp['label']}; differs in {key_changes(cp['pruning_keys']) or 'no pruning key'}"
    if cp["output_only_keys"]:
        text += f"; output-only (ignored): {key_changes(cp['output_only_keys'])}"
    return text


def time_saved_text(cp: Optional[Dict]) -> str:
    """Seconds per image saved, or 'within noise' with the intervals that say why (see timing_savings)."""
    if cp is None:
        return "n/a (no unpruned counterpart among the inputs)"
    t = cp["time"]
    if t["verdict"] == "n/a":
        return f"n/a (no per-image times; vs {cp['label']})"
    totals = f"{fmt(t['unpruned_sec'], '{:.3g}')} → {fmt(t['pruned_sec'], '{:.3g}')} s, {t['source']}"
    if t["criterion"] == "per-step":
        why = (f"per-step difference after pruning {ci_text(t['post'], '{:+.3g}')} s vs run-to-run "
               f"±{t['noise_bound']:.3g} s before it")
    else:
        why = f"per-image difference {ci_text(t['post'], '{:+.3g}')} s (no per-step times)"
    if t["verdict"] == "within noise":
        return f"within noise ({totals}; {why})"
    pct = f", {t['saved_frac']:.0%}" if t["saved_frac"] is not None else ""
    head = fmt(t["saved_sec"], "{:.3g}") + pct if t["verdict"] == "saving" else \
        f"none: pruned run slower by {fmt(-t['saved_sec'], '{:.3g}')} s"
    return f"{head} ({totals}; {why})"


def pruning_table(runs: Sequence, all_runs: Sequence) -> str:
    pr = [pruning_summary(r, all_runs) for r in runs]

    def vram_saved(cp: Optional[Dict]) -> str:
        if cp is None:
            return "n/a (no unpruned counterpart among the inputs)"
        mine, theirs = cp["peak_memory_mb"]
        if mine is None or theirs is None:
            return "n/a"
        if any(cp.get("peak_includes_autotuning", ())):
            return f"n/a (a peak {AUTOTUNING}: compare runs without speed.cudnn_benchmark)"
        pct = f", {(theirs - mine) / theirs:.0%}" if theirs else ""
        return f"{fmt(theirs - mine, '{:.0f}')}{pct} ({fmt(theirs, '{:.0f}')} → {fmt(mine, '{:.0f}')})"

    rows = [["mode"] + [", ".join(x["modes"]) or "n/a" for x in pr],
            ["pruned images"] + [str(x["pruned_images"]) for x in pr],
            ["regret: best particle was pruned [95% CI] (masking, shadow)"] + [_rate(x["regret"]) for x in pr],
            ["dB lost per pruned image [95% CI]"] + [ci_text(x["db_lost_all"]) for x in pr],
            ["dB lost per regret image [95% CI]"] + [ci_text(x["db_lost_regret"]) for x in pr],
            ["unpruned counterpart"] + [counterpart_text(x["counterpart"]) for x in pr],
            ["time / image saved (s)"] + [time_saved_text(x["counterpart"]) for x in pr],
            ["peak VRAM saved (MB)"] + [vram_saved(x["counterpart"]) for x in pr]]
    return table(_cols(runs), rows)


# --- hard data consistency ------------------------------------------------------------------------
def hdc_table(runs: Sequence) -> str:
    h = [hdc_summary(r) for r in runs]
    rows = [["PSNR change per particle, after − before (dB) [95% CI]"] + [ci_text(x["delta"]) for x in h],
            ["… accepted particles only"] + [ci_text(x["delta_accepted"]) for x in h],
            ["particles improved"] + [f"{x['improved']}/{x['delta']['n']}" for x in h],
            ["accepted rate [95% CI]"] + [_rate(x["accepted"]) for x in h],
            ["mean optimiser iterations"] + [fmt(x["mean_iters"], "{:.1f}") for x in h]]
    return table(_cols(runs), rows)


def study_sections(runs: Sequence, pairs: Sequence[Tuple]) -> List[str]:
    """The study's sections; repulsion, pruning and HDC only for the runs that used them."""
    out = ["## Orientation (no PSNR threshold)\n\n" + orientation_table(runs)]
    if pairs:
        out.append("### Paired orientation outcomes (exact McNemar)\n\n" + orientation_pairs_table(pairs))
    out.append("## Selection and spread\n\n" + selection_spread_table(runs))
    out.append("## Cost\n\n" + cost_table(runs))
    rep = [r for r in runs if r.repulsion or any(isinstance(i.get("repulsion"), dict) for i in r.images)]
    if rep:
        out.append("## Repulsion\n\n" + repulsion_table(rep))
    pru = [r for r in runs if pruning_on(r)]
    if pru:
        out.append("## Pruning\n\n" + pruning_table(pru, runs))
    hdc = [r for r in runs if hdc_summary(r)["ran"]]
    if hdc:
        out.append("## Hard data consistency\n\n" + hdc_table(hdc))
    return out


DEFINITIONS = """## Definitions

- Orientation of a particle: `gt` when PSNR − PSNR(rot180 of the ground truth) ≥ margin, `twin` when the
  reverse holds, else `unclear` (also for a non-finite PSNR). An image has the correct orientation when a
  particle is `gt`, both orientations when particles are `gt` and `twin`; no PSNR threshold.
- Success (summary table) is the thresholded rule of the run (`eval.success_psnr`).
- Rates carry 95 % Wilson intervals; means carry 95 % Student-t intervals; paired binary outcomes use the
  exact two-sided McNemar test (binomial on the discordant images); paired best PSNR uses Wilcoxon signed-rank.
- GPU-seconds / image (CPU-seconds for CPU runs; device-seconds, with each run's device, when the runs
  used different devices): wall time × processes of each run folder, summed over merged folders, divided by
  the images; `records` means the per-image sampling times were used (no wall time, or it covers fewer
  images than the folder holds, as after a resume). Seconds by phase: mean over images of the records'
  `time_segments`. Peak VRAM allocated is `max_memory_allocated`, reserved `max_memory_reserved` (what
  the allocator holds; nvidia-smi shows that plus the CUDA context); MB = MiB (2^20 bytes). With
  `speed.cudnn_benchmark` on a GPU, runs written before the start-up warm-up (no `vram.autotune_peak_mb`)
  peak at cuDNN's autotuning (a workspace per candidate algorithm on the first call per shape), not the
  sampler's memory: such a peak is labelled so and not used for VRAM savings. Network evaluations: mean over images
  of the records' `compute` (one particle through a network once = 1); TFLOP the records' estimate.
  n/a: the run was written before that field existed; `(k/n images)`: only k records carry it.
- ± in the summary: std over images with ddof 0 (`np.std`, as DAPS reports it); the spread of the
  particles within one image is a sample std (ddof 1).
- Best PSNR any orientation: per image the best particle's max(PSNR, PSNR to the 180° twin); the twin is an
  equally valid phase-retrieval solution.
- Protocol (run table): speed preset, precision, deterministic, images per batch, device type, GPU. A paired
  comparison of runs that differ in any of these, in seed or in image set prints one warning line above
  the tables.
- Selection accuracy: share of images where the lowest-loss particle is the highest-PSNR one; dB lost is
  best − selected PSNR.
- Repulsion ratios, from `repulsion.jsonl`: ‖λ·r‖ / ‖score‖ at the ODE's last drift evaluation is the
  original study's `ratio_scaled_to_score` (L2 norms over all the image's particles at the PF-ODE's last
  drift evaluation of the step); mean ‖λ·r_i‖ / mean ‖score_i‖ at σ_i is the project's per-particle ratio
  at the step's own noise level (`ratio_per_particle_at_sigma`; runs written before that field logged it
  as `ratio_scaled_to_score`, and show n/a for the other). The two can differ by orders of magnitude (the
  score at the ODE's later points is far larger), so each has its own row and plot.
- Pairwise feature distance: from `repulsion.jsonl`, per image at its last logged step with repulsion ON;
  a scale-0 baseline (all lines OFF) is read at the other runs' last ON step.
- Pruning regret (masking mode): the best final particle was among the pruned ones; dB lost is best
  pruned − best kept PSNR (0 without regret).
- Pruning savings are against the input run whose config differs only in the pruning keys; keys that only
  choose the files written (`save_traj`, `traj_every`, `save_samples`, `grid_max_images`) are ignored but
  listed, with every pruning key that differs. Time is per image from the records (`time_segments`, else
  the per-step times), never wall time. A time saving is shown only beyond run-to-run noise: the 95 % t
  interval of the paired per-step differences (same image and step, unpruned − pruned; the images of one
  batch share its step times and count once) from the pruning step on must lie beyond the largest
  |bound| of the same interval before the pruning step, where both runs do the same work; otherwise the
  row says "within noise".
- Hard data consistency: PSNR of each particle after the optimisation minus `psnr_before_optimization`,
  paired per particle (the t interval treats the particles of one image as independent).
"""


def runs_section(runs: Sequence) -> str:
    """The exact run folders, their commands, and the settings that differ between runs."""
    rows = []
    for r in runs:
        cmds = sorted({str((p.get("metadata") or {}).get("command")) for p in r.parts
                       if (p.get("metadata") or {}).get("command")})
        metas = [p.get("metadata") or {} for p in r.parts]
        devices = sorted({f"{m.get('gpu_name') or m.get('device') or 'n/a'} × {world_size(m)}" for m in metas})
        rows.append([r.label, "<br>".join(f"`{p}`" for p in r.paths), str(len(r.images)),
                     "<br>".join(f"`{c}`" for c in cmds) or "n/a", ", ".join(devices) or "n/a",
                     ", ".join(sorted({str(m.get("git_commit") or "n/a")[:10] for m in metas}))])
    out = [table(["run", "folders", "images", "command", "device × processes", "commit"], rows)]
    flats = [flat_config(r.config) for r in runs]
    keys = sorted({k for f in flats for k in f})
    skip = {"name", "save_dir"}
    differing = [k for k in keys if k not in skip and len({repr(f.get(k, "<missing>")) for f in flats}) > 1]
    if len(runs) > 1 and differing:
        out.append("Settings that differ between the runs (from each `config.yaml`):\n\n" + table(
            ["key"] + [r.label for r in runs],
            [[k] + [str(f.get(k, "–")) for f in flats] for k in differing]))
    return "\n\n".join(out)


def write_report(runs: Sequence, outdir: Path, body: str, argv: Optional[Sequence[str]] = None) -> Path:
    """`outdir/report.md`: runs and settings, every table of `body`, every plot (relative links)."""
    from eval.plots import write_plots

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    plots = write_plots(runs, outdir)
    captions = {"best_psnr_per_image.png": "Best-particle PSNR per image",
                "quality_vs_compute.png": "Best PSNR against seconds per image (the axis names the device)",
                "repulsion_distance.png": "Mean pairwise feature distance per step (dashed: scale-0 baseline)",
                "repulsion_ratio.png": f"{RATIO_NAMES['ratio']} per step (ON steps)",
                "repulsion_ratio_at_sigma.png": f"{RATIO_NAMES['ratio_at_sigma']} per step (ON steps)"}
    cmd = "python eval/parse_metrics.py " + " ".join(argv) if argv is not None else None
    head = ["# Study report", "",
            f"Generated {_dt.datetime.now().isoformat(timespec='seconds')}"
            + (f" by `{cmd}`." if cmd else "."), "", "## Runs", "", runs_section(runs), "", body.rstrip(), "",
            "## Plots", ""]
    for p in plots:
        head += [f"![{captions.get(p.name, p.stem)}]({p.name})", ""]
    head.append(DEFINITIONS)
    path = outdir / "report.md"
    path.write_text("\n".join(head))
    return path
