"""The speed matrix: rows are switch sets, presets or <preset>±<switch>, at particle and batch counts."""
from __future__ import annotations

import sys
import time
from dataclasses import asdict
from typing import Any, Callable, Dict, List, Optional

import torch

from cores.speed import SpeedConfig, apply_speed, speed_config
from scripts.bench.common import MCMC_DEFAULTS, NUM_ANNEAL, _ints, fmt, load_preset, reset_compiler
from scripts.bench.timing import breakdown, time_sampler
from scripts.bench.workloads import WORKLOADS

_ALL = dict(precision="bf16", compile=True, cudnn_benchmark=True, tf32=True, attention="math")
SWITCHES = {
    "exact": SpeedConfig(),
    "bf16": SpeedConfig(precision="bf16"),
    "compile": SpeedConfig(compile=True),
    "cudnn_benchmark": SpeedConfig(cudnn_benchmark=True),
    "tf32": SpeedConfig(tf32=True),
    "attn_math": SpeedConfig(attention="math"),
    "channels_last": SpeedConfig(channels_last=True),
    "fast_upsample": SpeedConfig(fast_upsample=True),
    "all": SpeedConfig(**_ALL),
    "all+static": SpeedConfig(**_ALL, compile_dynamic=False),
    "all+channels_last": SpeedConfig(**_ALL, channels_last=True),
    "all+fast_upsample": SpeedConfig(**_ALL, fast_upsample=True),
    "all+channels_last+fast_upsample": SpeedConfig(**_ALL, channels_last=True, fast_upsample=True),
    "all+cuda_graphs": SpeedConfig(**_ALL, compile_mode="reduce-overhead"),
    "all+tuning": SpeedConfig(**_ALL, compile_tuning=True),
    "deterministic": SpeedConfig(deterministic=True),
    "attn_split_tf32": SpeedConfig(attention="split_tf32"),
    "fast": None,  # configs/speed/fast.yaml, read when used
    "faithful": None,  # configs/speed/faithful.yaml
}
# a preset with one switch taken off (-) or put on (+): "faithful-cuda_graphs", "faithful+cudnn_benchmark"
SWITCH_OFF = {"compile": dict(compile=False, compile_mode="default"), "cuda_graphs": dict(compile_mode="default"),
              "channels_last": dict(channels_last=False), "fast_upsample": dict(fast_upsample=False),
              "attn_math": dict(attention="default"), "deterministic": dict(deterministic=False),
              "cudnn_benchmark": dict(cudnn_benchmark=False), "bf16": dict(precision="fp32"),
              "attn_split_tf32": dict(attention="math"), "nhwc_group_norm": dict(nhwc_group_norm=False),
              "nhwc_conv_layout": dict(nhwc_conv_layout=False), "triton_group_norm": dict(triton_group_norm=False)}
SWITCH_ON = {"cudnn_benchmark": dict(cudnn_benchmark=True, deterministic=False), "tf32": dict(tf32=True),
             "cuda_graphs": dict(compile_mode="reduce-overhead"), "compile_unet": dict(compile_unet=True),
             "bf16": dict(precision="bf16"), "deterministic": dict(deterministic=True, cudnn_benchmark=False),
             "channels_last": dict(channels_last=True), "attn_split_tf32": dict(attention="split_tf32"),
             "nhwc_group_norm": dict(nhwc_group_norm=True), "attn_math": dict(attention="math"),
             "nhwc_conv_layout": dict(nhwc_conv_layout=True), "triton_group_norm": dict(triton_group_norm=True)}


def switch(name: str) -> SpeedConfig:
    """SpeedConfig of a matrix row name: a SWITCHES entry, or `<preset>(±<switch>)*`."""
    import re

    if name in SWITCHES:
        return SWITCHES[name] if SWITCHES[name] is not None else load_preset(name)
    base, *mods = re.split(r"(?=[+-])", name)
    known = f"known: {', '.join(SWITCHES)}, or <preset>±<switch> with switches {', '.join(sorted(set(SWITCH_OFF) | set(SWITCH_ON)))}"
    if base not in SWITCHES or not mods:
        raise SystemExit(f"unknown switch set {name!r}; {known}")
    vals = asdict(switch(base))
    for m in mods:
        table_ = SWITCH_ON if m[0] == "+" else SWITCH_OFF
        if m[1:] not in table_:
            raise SystemExit(f"unknown switch {m!r} in {name!r}; {known}")
        vals.update(table_[m[1:]])
    vals["preset"] = name
    return speed_config(vals)

def table(results: List[Dict[str, Any]], base: Optional[Dict[str, Any]]) -> str:
    lines = ["| config | particles | images/batch | s/anneal step | s/image | images/hour | × vs exact | "
             "peak VRAM GiB | GiB/image | compile s |", "|---|---|---|---|---|---|---|---|---|---|"]
    b = base.get("images_per_hour") if base and not base.get("skipped") else None
    for r in results:
        if r.get("oom") or r.get("skipped") or r.get("error"):
            what = "OOM" if r.get("oom") else "skipped (time budget)" if r.get("skipped") else "error"
            lines.append(f"| {r['name']} | {r['particles']} | {r['images_per_batch']} | {what} | | | | | | |")
            continue
        x = r["images_per_hour"] / b if b else None
        pv = r.get("peak_vram_mb")
        lines.append(f"| {r['name']} | {r['particles']} | {r['images_per_batch']} | {fmt(r['s_per_anneal_step'], '{:.3f}')} | "
                     f"{fmt(r['s_per_image'], '{:.1f}')} | {fmt(r['images_per_hour'], '{:.1f}')} | {fmt(x, '{:.2f}×')} | "
                     f"{fmt(None if pv is None else pv / 1024, '{:.2f}')} | "
                     f"{fmt(None if pv is None else pv / 1024 / r['images_per_batch'], '{:.2f}')} | "
                     f"{fmt(r.get('compile_sec'), '{:.1f}')} |")
    return "\n".join(lines)


def pruned_hmc_estimate(r4: Dict[str, Any], r2: Dict[str, Any], hmc_steps: int = 65, prune_at: int = 30) -> Optional[Dict]:
    """s/image for 4→2 pruning at step 29 (steps 0…29 at 4 particles, 30…49 at 2) with HMC-65, from the
    measured per-Langevin-step and non-MCMC costs (HMC does the same decoder work per step)."""
    if any(r.get(k) for r in (r4, r2) for k in ("oom", "skipped", "error")):
        return None
    t4 = r4["non_mcmc_sec_per_anneal_step"] + hmc_steps * r4["mcmc_step_sec"]
    t2 = r2["non_mcmc_sec_per_anneal_step"] + hmc_steps * r2["mcmc_step_sec"]
    s_img = (prune_at * t4 + (NUM_ANNEAL - prune_at) * t2) / r4["images_per_batch"]
    return {"s_per_image": s_img, "images_per_hour": 3600 / s_img, "from_rows": [r4["name"], r2["name"]],
            "images_per_batch": r4["images_per_batch"]}

def matrix_plan(args) -> List[tuple]:
    """(name, particles, images) rows; one `apply_speed` (one compile) serves all rows of a name."""
    names = [n for n in args.matrix_switches.split(",") if n]
    two = [n for n in args.matrix_two_particles.split(",") if n]
    batch_names = [n for n in args.matrix_batch_configs.split(",") if n]
    for n in names + two + batch_names:
        switch(n)
    rows: List[tuple] = [(n, 4, 1) for n in names]
    rows += [(n, 2, 1) for n in two]
    rows += [(n, 4, k) for n in batch_names for k in _ints(args.matrix_images) if k != 1]
    rows += [(n, 2, k) for n in batch_names if n in two for k in _ints(args.matrix_images) if k != 1]
    order: List[str] = []
    for n, _, _ in rows:
        if n not in order:
            order.append(n)
    order.sort(key=lambda n: switch(n).compile)  # compiled configs last: the cheap rows always finish
    return [r for n in order for r in rows if r[0] == n]


def matrix(args, model, operator, image, device, on_row: Optional[Callable] = None) -> Dict[str, Any]:
    results: List[Dict[str, Any]] = []
    plan = matrix_plan(args)
    t_start = time.perf_counter()
    handles: Dict[str, Any] = {}
    for i, (name, particles, images) in enumerate(plan):
        row = {"name": name, "particles": particles, "images_per_batch": images}
        if time.perf_counter() - t_start > args.budget_s:
            results.append({**row, "skipped": True})
            print(f"skipped {name} p={particles} imgs={images}: over --budget-s {args.budget_s}", file=sys.stderr)
        else:
            speed = switch(name)
            try:
                if name not in handles:
                    handles[name] = apply_speed(model, speed)
                h = handles[name]
                r = time_sampler(model, operator, image, device, speed, particles, images, args.mcmc_algo,
                                 args.mcmc_steps, args.time_mcmc_steps, args.warmup, args.steps_to_time,
                                 WORKLOADS[args.workload])
                if images == 1 and particles == 4 and not args.no_breakdown and not r.get("oom"):
                    r["breakdown"] = breakdown(model, operator, image, device, speed, particles * images,
                                               args.mcmc_steps, r["s_per_anneal_step"], args.reps, args.repulsion, images)
                r.update(row, compile_sec=h.compile_sec, compiled=h.compiled, preset=speed.preset)
            except Exception as err:  # keep the other rows
                r = {**row, "error": f"{type(err).__name__}: {str(err)[:300]}"}
            results.append(r)
            print(f"[{time.perf_counter() - t_start:6.1f}s] {name:18s} p={particles} imgs={images}: "
                  + ("OOM" if r.get("oom") else r["error"] if r.get("error") else
                     f"{r['s_per_anneal_step']:.3f} s/step, {r['s_per_image']:.1f} s/img, compile {r['compile_sec']:.1f} s"),
                  file=sys.stderr, flush=True)
        last = i + 1 == len(plan) or plan[i + 1][0] != name
        if last and name in handles:
            handles.pop(name).restore()
            if switch(name).compile:
                reset_compiler()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if on_row is not None:
            on_row(results)
    for name in [n for n in args.matrix_series.split(",") if n]:
        results.append(series_row(args, model, operator, image, device, name, t_start))
        if on_row is not None:
            on_row(results)
    return {"results": results, "derived": derive(results, estimates=not WORKLOADS[args.workload].repulsion)}


def series_row(args, model, operator, image, device, name: str, t_start: float) -> Dict[str, Any]:
    """A matrix row from one whole run of preset `name`: pruning --prune-keep of --particles after step
    --prune-step, HMC with its 65 steps all run (no extrapolation; --matrix-series-hmc-steps for smoke
    runs), the workload's repulsion."""
    from scripts.bench.series import series

    hmc = args.matrix_series_hmc_steps or MCMC_DEFAULTS["hmc"]["num_steps"]
    row = {"name": f"{name}+prune{args.particles}to{args.prune_keep}+hmc{hmc} (whole run)",
           "particles": args.particles, "images_per_batch": args.images_per_batch}
    if time.perf_counter() - t_start > args.budget_s:
        print(f"skipped {row['name']}: over --budget-s {args.budget_s}", file=sys.stderr)
        return {**row, "skipped": True}
    try:
        r = series(args, model, operator, image, device, switch(name), algo="hmc", mcmc_steps=hmc)
    except Exception as err:  # keep the other rows
        return {**row, "error": f"{type(err).__name__}: {str(err)[:300]}"}
    k = r["images_per_batch"]
    out = {**row, "s_per_anneal_step": r["sampling_sec"] / NUM_ANNEAL, "s_per_image": r["sampling_sec"] / k,
           "images_per_hour": 3600.0 * k / r["sampling_sec"], "peak_vram_mb": r["peak_vram_mb"],
           "compile_sec": r["compile_sec"], "preset": name, "series": r}
    print(f"[{time.perf_counter() - t_start:6.1f}s] {out['name']}: {out['s_per_image']:.1f} s/img "
          f"(sampling only; compile {r['compile_sec']:.1f} s)", file=sys.stderr, flush=True)
    return out


def _row(results, name, particles, images):
    return next((r for r in results if r["name"] == name and r["particles"] == particles
                 and r["images_per_batch"] == images), None)


def derive(results: List[Dict[str, Any]], estimates: bool = True) -> Dict[str, Any]:
    """× vs exact on every row (`x_vs_exact_W`: against the exact row of the same workload, the JSON's
    `workload.name`), pruning+HMC estimates (not for a workload with repulsion: its steps are
    not alike, the whole-run rows measure it), and the best batch within 20 GiB (24 GB cards)."""
    base = _row(results, "exact", 4, 1)
    ok = lambda r: r is not None and not any(r.get(k) for k in ("oom", "skipped", "error"))  # noqa: E731
    bph = base["images_per_hour"] if ok(base) else None
    for r in results:
        if ok(r) and bph:
            r["x_vs_exact_W"] = r["images_per_hour"] / bph
    out: Dict[str, Any] = {}
    for name in dict.fromkeys(r["name"] for r in results):  # every row name with 4- and 2-particle rows
        for k in sorted({r["images_per_batch"] for r in results if r["name"] == name}):
            r4, r2 = _row(results, name, 4, k), _row(results, name, 2, k)
            if estimates and ok(r4) and ok(r2):
                est = pruned_hmc_estimate(r4, r2)
                if est and bph:
                    est["x_vs_exact_W"] = est["images_per_hour"] / bph
                out[f"{name}_pruning4to2_hmc65_estimate" + ("" if k == 1 else f"_{k}_images")] = est
    fits = [r for r in results if ok(r) and r["name"] == "fast" and r["particles"] == 4
            and r.get("peak_vram_mb", 0) <= 20 * 1024]
    if fits:
        best = max(fits, key=lambda r: r["images_per_hour"])
        out["fast_best_batch_within_20GiB"] = {k: best.get(k) for k in (
            "images_per_batch", "s_per_image", "images_per_hour", "peak_vram_mb", "x_vs_exact_W")}
    return out
