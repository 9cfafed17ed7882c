"""The Exp5-with-baselines report: DAPS, ReSample and the project's method side by side, per dataset,
from real toy runs laid out as `exp5_final.sh --baselines` lays them out."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import compose

ROOT = Path(__file__).resolve().parents[1]
FEW = ["model=toy", "data=demo-ffhq", "model.include_twins=true", "data.end_id=2", "num_samples=2", "eval.lpips=false"]


def test_method_table_shows_daps_resample_and_the_method(tmp_path, one_thread):
    from cores.pipeline import run as pipeline_run

    root = tmp_path / "exp5_final"
    daps = ["+experiment=exp0_baseline", "sampler.annealing.num_steps=4", "sampler.mcmc.num_steps=3"]
    runs = {"exp5_main_baseline_daps": daps,
            "exp5_main_baseline_resample": ["+experiment=exp0_baseline", "sampler=resample",
                                            "repulsion_log_baseline=false", "sampler.ddim_steps=10",
                                            "sampler.pixel_optimization.max_iters=2",
                                            "sampler.latent_optimization.max_iters=2"],
            "exp5_main_scale10_prune29": daps + ["repulsion_scale=10", "pruning_step=1", "pruning_keep=1"]}
    for name, over in runs.items():
        pipeline_run(compose(over + FEW + [f"save_dir={root}", f"name=ffhq_2img/{name}"]))
    out = subprocess.run([sys.executable, "eval/parse_metrics.py", str(root), "--brief"], cwd=ROOT,
                         capture_output=True, text=True, timeout=None)
    assert out.returncode == 0, out.stderr
    section = out.stdout.split("### Methods — ffhq")[1]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in section.splitlines() if line.startswith("| ")}
    assert {"DAPS", "ReSample", "exp5_main_scale10_prune29"} <= set(rows)
    for method in ("DAPS", "ReSample", "exp5_main_scale10_prune29"):
        images, best, best_any, evals = rows[method][0], float(rows[method][1]), float(rows[method][2]), rows[method][7]
        assert images == "2" and best_any >= best and evals != "n/a"
    assert "ReSample − DAPS" in section
