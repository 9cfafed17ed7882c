"""Multi-GPU scaling of `posterior_sample.py` under torchrun, with the full-size LDM architecture.

Runs the same job (≥ 8 images, FFHQ-LDM architecture with seeded random weights, so no
checkpoint is needed) with 1, 2, … processes (`torch.distributed.run --nproc_per_node=N`),
reports the wall time of each and checks that every per-image metric is identical to the
1-process run.  Results: JSON on stdout and in <save_dir>/multigpu_bench.json.

    python scripts/multigpu_bench.py                         # 1 vs 2 GPUs, 8 images (reduced steps)
    python scripts/multigpu_bench.py --gpus 1,2,4 --images 16
    python scripts/multigpu_bench.py --annealing 50 --mcmc 100   # the full workload W per image
    # CPU smoke run on the tiny fixture architecture:
    python scripts/multigpu_bench.py --device cpu --gpus 1,2 --images 2 --annealing 2 --mcmc 2 \
        --ldm-yaml tests/fixtures/ldm_tiny_ffhq.yaml

Worker mode (`--worker`, what each torchrun rank runs) composes the Hydra config with
`model.name=ldm_random` (the architecture with weights seeded by `model.random_seed`, identical
on every rank) and calls `cores.pipeline.run`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

METRIC_KEYS = ("particle_ids", "psnr", "ssim", "psnr_twin", "measurement_loss", "best_idx", "selected_idx",
               "non_finite_particles", "nan_events")


def worker(overrides: List[str], ldm_yaml: str | None) -> None:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from cores.pipeline import ConfigError, run

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    if ldm_yaml:
        OmegaConf.set_struct(cfg, False)
        ldm = OmegaConf.load(ldm_yaml)
        cfg.model.ldm_config = ldm
        res = int(ldm.model.params.first_stage_config.params.ddconfig.resolution)
        cfg.data.resolution = cfg.task.resolution = res
    try:
        run(cfg)
    except (ConfigError, FileNotFoundError) as err:
        print("error: " + " ".join(str(err).split()), file=sys.stderr)
        sys.exit(2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def per_image(metrics: Dict) -> Dict[int, Dict]:
    return {r["image_idx"]: {k: r.get(k) for k in METRIC_KEYS} for r in metrics["images"]}


def max_abs_diff(a: Dict[int, Dict], b: Dict[int, Dict]) -> float:
    worst = 0.0
    for i in a:
        for k in ("psnr", "ssim", "psnr_twin", "measurement_loss"):
            for x, y in zip(a[i][k], b.get(i, {}).get(k, [])):
                if (x is None) != (y is None):
                    return float("inf")
                if x is not None:
                    worst = max(worst, abs(x - y))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--gpus", default="1,2", help="process counts to compare, e.g. 1,2,4")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--particles", type=int, default=4)
    ap.add_argument("--annealing", type=int, default=10, help="annealing steps (50 = workload W)")
    ap.add_argument("--mcmc", type=int, default=20, help="Langevin steps per annealing step (100 = W)")
    ap.add_argument("--model", default="ffhq256ldm", help="model config whose architecture is used")
    ap.add_argument("--data", default="demo-ffhq")
    ap.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK) or cpu")
    ap.add_argument("--weight-seed", type=int, default=0)
    ap.add_argument("--ldm-yaml", default=None, help="another CompVis yaml (e.g. the tiny fixture)")
    ap.add_argument("--save-dir", default="results/multigpu_bench")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    args = ap.parse_args()
    base = [f"model={args.model}", "model.name=ldm_random", f"data={args.data}", "data.start_id=0",
            f"data.end_id={args.images}", f"num_samples={args.particles}", "batch_size=1",
            f"sampler.annealing.num_steps={args.annealing}", f"sampler.mcmc.num_steps={args.mcmc}",
            "eval.lpips=false", "save_samples=true", f"device={args.device}", f"save_dir={args.save_dir}",
            f"++model.random_seed={args.weight_seed}"]
    if args.worker:
        worker(base + args.overrides, args.ldm_yaml)
        return
    counts = [int(n) for n in args.gpus.split(",")]
    report: Dict = {"images": args.images, "particles": args.particles, "annealing": args.annealing,
                    "mcmc": args.mcmc, "model": args.model, "runs": []}
    ref = None
    for n in counts:
        name = f"nproc{n}"
        shutil.rmtree(Path(args.save_dir) / name, ignore_errors=True)
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", f"--master_port={free_port()}",
               str(Path(__file__).resolve()), "--worker", f"--images={args.images}",
               f"--particles={args.particles}", f"--annealing={args.annealing}", f"--mcmc={args.mcmc}",
               f"--model={args.model}", f"--data={args.data}", f"--device={args.device}",
               f"--weight-seed={args.weight_seed}", f"--save-dir={args.save_dir}"]
        cmd += [f"--ldm-yaml={args.ldm_yaml}"] if args.ldm_yaml else []
        cmd += args.overrides + [f"name={name}"]
        print(f"[bench] {n} process(es): {' '.join(cmd)}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])})
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.exit(f"[bench] the {n}-process run failed (exit {proc.returncode})")
        metrics = json.loads((Path(args.save_dir) / name / "metrics.json").read_text())
        got = per_image(metrics)
        ref = got if ref is None else ref
        meta = metrics["metadata"]
        report["runs"].append({
            "processes": n, "wall_sec": wall, "run_wall_sec": meta.get("wall_time_sec"),
            "sum_image_sec": metrics["summary"]["total_time_sec"],
            "gpus": [r["gpu_name"] for r in meta.get("ranks", [meta])],
            "peak_memory_mb": metrics["vram"]["peak_memory_mb"],
            "num_images": len(got), "identical_to_first": got == ref,
            "max_abs_metric_diff": max_abs_diff(ref, got),
        })
    first = report["runs"][0]
    for r in report["runs"]:
        r["speedup_wall"] = first["wall_sec"] / r["wall_sec"]
        r["speedup_run"] = (first["run_wall_sec"] / r["run_wall_sec"]) if r["run_wall_sec"] else None
    text = json.dumps(report, indent=2)
    print(text)
    (Path(args.save_dir) / "multigpu_bench.json").write_text(text + "\n")
    if not all(r["identical_to_first"] and r["num_images"] == args.images for r in report["runs"]):
        sys.exit("[bench] per-image metrics differ between process counts (see max_abs_metric_diff)")


if __name__ == "__main__":
    main()
