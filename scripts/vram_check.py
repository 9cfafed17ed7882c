"""Device check: a run with speed=fast reports the VRAM it needs, not cuDNN benchmark's trials.

exp1's settings — 4 particles, DINO ViT-S/16 repulsion (random weights, scale 10, on while σ ≥ 1.0),
Langevin lr 4e-6 — on the FFHQ-LDM architecture with random weights, over a short annealing schedule
(6 steps: 4 with repulsion, 2 without, one of them logged) so that both kinds of step come.  Each preset
runs in its own process, the way a run does: model → `apply_speed` → hooks → `cores.warmup` (shapes made
before the meter starts, when cuDNN benchmarks) → `VramMeter.start()` → `latent_daps` → the meter's
summary, i.e. metrics.json's `vram` block.  No Hydra.

Printed per preset: the run's peak (allocated and reserved), the warm-up's trials (`autotune_peak_mb`),
and what the process still holds after the run and `empty_cache()` above what it held before
`apply_speed`.  The compiled graphs' memory (CUDA graph pools, compiled constants) is fast's held
memory less exact's (both hold the DINO weights loaded during the run).  The check:

    peak(fast) ≤ 1.1 × (peak(exact) + graphs(fast))        (allocated MiB)

    python scripts/vram_check.py                    # CUDA, full-size architecture (< 4 min on an H100)
    python scripts/vram_check.py --tiny --device cpu  # smoke: the same code path, nothing measured
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ANNEAL_STEPS = 6      # σ: 10, 5.56, 2.93, 1.45 (repulsion on) | 0.66, 0.27 (off; step 5 logged)
TOLERANCE = 1.1


def one_preset(preset: str, tiny: bool, device_name: str, mcmc_steps: int) -> Dict[str, Any]:
    """One run of exp1's settings under `preset`; the vram block and the graphs' memory (MiB)."""
    import torch

    import sampler as S
    from cores.vram import VramMeter
    from cores.warmup import run_row_counts, warm_up_run
    from cores.speed import apply_speed
    from scripts.bench.common import build, make_batch, mcmc_config
    from scripts.bench.matrix import switch
    from scripts.bench.workloads import WORKLOADS

    device = torch.device(device_name)
    cuda = device.type == "cuda"
    mib = lambda b: b / 2 ** 20  # noqa: E731
    model, operator, image = build(tiny, device)
    workload = WORKLOADS["Wprime"]
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        base = (mib(torch.cuda.memory_allocated(device)), mib(torch.cuda.memory_reserved(device)))
    t0 = time.perf_counter()
    handle = apply_speed(model, switch(preset))
    hooks = [workload.repulsion_hook(model, device)]
    vram = VramMeter(device)
    particles = 4
    warmed = warm_up_run(model, hooks, run_row_counts(particles, 1, 1), device, vram)
    vram.start()
    batch = make_batch(model, operator, image, 1, particles, device)
    daps = S.DAPSConfig.with_steps(ANNEAL_STEPS, mcmc=mcmc_config("langevin", mcmc_steps, workload.langevin_lr))
    S.latent_daps(model, operator, batch, daps, hooks=hooks)
    out: Dict[str, Any] = {"preset": preset, "device": str(device), "warmed_rows": warmed,
                           "compile_sec": handle.compile_sec, "seconds": time.perf_counter() - t0,
                           "vram": vram.summary(),
                           "repulsion_steps_on": hooks[0].image_output(0, {}).record["repulsion"]["active_steps"]}
    if cuda:
        torch.cuda.synchronize(device)
        del batch
        torch.cuda.empty_cache()
        out["held_allocated_mb"] = mib(torch.cuda.memory_allocated(device)) - base[0]
        out["held_reserved_mb"] = mib(torch.cuda.memory_reserved(device)) - base[1]
        out["card"] = torch.cuda.get_device_name(device)
    return out


def check(results: Dict[str, Dict[str, Any]], test: str) -> Dict[str, Any]:
    """The criterion on the two presets' readings (not checked where nothing was measured)."""
    exact, fast = results["exact"], results[test]
    pe, pf = exact["vram"].get("peak_memory_mb"), fast["vram"].get("peak_memory_mb")
    if pe is None or pf is None:
        return {"checked": False, "why": "no CUDA memory counters on this device"}
    graphs = max(0.0, fast.get("held_reserved_mb", 0.0) - exact.get("held_reserved_mb", 0.0))
    bound = TOLERANCE * (pe + graphs)
    return {"checked": True, "fast_peak_mb": pf, "exact_peak_mb": pe, "fast_graphs_mb": graphs,
            "bound_mb": bound, "ok": pf <= bound}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--tiny", action="store_true", help="the tiny fixture LDM (64 px): a CPU smoke run")
    p.add_argument("--mcmc-steps", type=int, default=5, help="Langevin steps per annealing step")
    p.add_argument("--preset", default="fast",
                   help="the preset checked against exact (a preset or `benchmark.py --matrix` row name)")
    p.add_argument("--json", default=None, help="write the readings and the verdict here")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process: one preset, JSON on stdout
    args = p.parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {device}: CUDA is not available here")
    if args.one:
        print("RESULT " + json.dumps(one_preset(args.one, args.tiny, device, args.mcmc_steps)))
        return 0
    results: Dict[str, Dict[str, Any]] = {}
    for preset in ("exact", args.preset):  # each in a fresh process: cuDNN's plan cache and the allocator start empty
        cmd = [sys.executable, str(Path(__file__).resolve()), "--one", preset, "--device", device,
               "--mcmc-steps", str(args.mcmc_steps)] + (["--tiny"] if args.tiny else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            sys.stderr.write(proc.stderr[-3000:])
            print(f"vram_check: the {preset} run failed (exit {proc.returncode})", file=sys.stderr)
            return 1
        results[preset] = json.loads(line[len("RESULT "):])
    verdict = check(results, args.preset)
    gib = lambda v: "n/a" if v is None else f"{v / 1024:.2f} GiB"  # noqa: E731
    card = results[args.preset].get("card", device)
    print(f"exp1 settings, {'tiny fixture LDM' if args.tiny else 'FFHQ-LDM (random weights)'}, 4 particles, "
          f"{ANNEAL_STEPS} annealing steps × {args.mcmc_steps} Langevin, on {card}:")
    for name, r in results.items():
        v = r["vram"]
        print(f"  {name}: peak {gib(v.get('peak_memory_mb'))} allocated, {gib(v.get('peak_reserved_mb'))} reserved; "
              f"segments {v.get('segments')}; cuDNN trials before the run "
              f"{gib(v.get('autotune_peak_mb'))} (rows {v.get('autotune_rows')}); held after the run "
              f"{gib(r.get('held_reserved_mb'))} reserved / {gib(r.get('held_allocated_mb'))} allocated; "
              f"repulsion steps {r['repulsion_steps_on']}; {r['seconds']:.1f} s")
    if verdict["checked"]:
        print(f"{args.preset} {gib(verdict['fast_peak_mb'])} ≤ 1.1 × (exact {gib(verdict['exact_peak_mb'])} + compiled graphs "
              f"{gib(verdict['fast_graphs_mb'])}) = {gib(verdict['bound_mb'])}: {'OK' if verdict['ok'] else 'FAILED'}")
    else:
        print(f"not checked: {verdict['why']} (smoke run of the code path only)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"results": results, "verdict": verdict}, indent=1))
    return 0 if verdict.get("ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())
