"""The study protocol in the report: run-table protocol rows and the warning for unlike paired runs, the cost
table's per-phase time / VRAM reserved / network evaluations / TFLOP (n/a for older runs), best PSNR in any
orientation, and the fast-vs-exact equivalence verdict (toy runs, and a planted shift that must fail)."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import ttest_1samp

from eval import parse_metrics as pm
from eval import study
from eval import validate_speed as vs
from tests.test_report_study import cell, load, make_run, rec

ROOT = Path(__file__).resolve().parents[1]
GPU_META = {"device": "cuda:0", "gpu_name": "NVIDIA H100 80GB HBM3", "wall_time_sec": 40.0}


def protocol_config(preset: str = "exact", batch: int = 1, seed: int = 42, deterministic: bool = True):
    return {"speed": {"preset": preset, "precision": "bf16" if preset == "fast" else "fp32"},
            "batch_size": batch, "seed": seed, "deterministic": deterministic, "eval": {"lpips_net": "vgg"}}


IMAGES = [rec(i, [20.0 + i, 10.0], twin=[8.0, 30.0 - i]) for i in range(4)]


def warning_lines(text: str):
    return [line for line in text.splitlines() if "warning:" in line]


def test_run_table_shows_the_protocol(tmp_path):
    a = make_run(tmp_path, "exp0/demo_4img/a", IMAGES, config=protocol_config(), metadata=GPU_META)
    b = make_run(tmp_path, "exp0/demo_4img/b", IMAGES, config=protocol_config("fast", 4),
                 metadata={**GPU_META, "device": "cuda:3"})
    old = make_run(tmp_path, "exp0/demo_4img/old", IMAGES, metadata={})  # no speed block, no metadata
    table = pm.summary_table(load(a, b, old))
    assert [cell(table, "speed preset", k) for k in range(3)] == ["exact", "fast", "n/a"]
    assert [cell(table, "precision", k) for k in range(3)] == ["fp32", "bf16", "n/a"]
    assert [cell(table, "deterministic", k) for k in range(3)] == ["True", "True", "n/a"]
    assert [cell(table, "images per batch", k) for k in range(3)] == ["1", "4", "n/a"]
    assert [cell(table, "device", k) for k in range(3)] == ["cuda", "cuda", "n/a"]  # cuda:0 / cuda:3: same kind
    assert cell(table, "GPU", 0) == "NVIDIA H100 80GB HBM3" and cell(table, "seed", 1) == "42"
    assert cell(table, "LPIPS network", 0) == "vgg"


def test_mixed_presets_print_one_warning_line(tmp_path, capsys):
    a = make_run(tmp_path, "exp0/demo_4img/a", IMAGES, config=protocol_config(), metadata=GPU_META)
    b = make_run(tmp_path, "exp1/demo_4img/b", IMAGES, config={**protocol_config("fast", 4),
                                                                "repulsion_scale": 10.0}, metadata=GPU_META)
    same = make_run(tmp_path, "exp1/demo_4img/c", IMAGES, config={**protocol_config(), "repulsion_scale": 10.0},
                    metadata=GPU_META)
    runs = load(a, b, same)
    text = pm.report(runs[:1] + runs[2:])
    assert warning_lines(text) == []  # same protocol: nothing
    out = tmp_path / "out"
    assert pm.main([str(a), str(b), "--report", str(out), "--brief", "--csv", str(out / "t.csv")]) == 0
    console = capsys.readouterr().out
    import csv

    srows = list(csv.DictReader((out / "t_summary.csv").open()))
    assert [(r["protocol_preset"], r["protocol_batch_size"], r["std_ddof"]) for r in srows] == [
        ("exact", "1", "0"), ("fast", "4", "0")]
    (line,) = warning_lines(console)
    assert line.startswith("> warning: paired runs exp1/demo_4img/b vs exp0/demo_4img/a differ in ")
    assert "preset (exact vs fast)" in line and "precision (fp32 vs bf16)" in line and "batch_size (1 vs 4)" in line
    for key in ("deterministic", "device", "gpu_name", "seed", "images"):
        assert f" {key} (" not in line
    assert warning_lines((out / "report.md").read_text()) == [line]


def test_seed_image_set_and_gpu_are_guarded(tmp_path):
    a = make_run(tmp_path, "exp0/demo_4img/a", IMAGES, config=protocol_config(), metadata=GPU_META)
    b = make_run(tmp_path, "exp0/demo_3img/b", IMAGES[:3], config=protocol_config(seed=7, deterministic=False),
                 metadata={**GPU_META, "gpu_name": "NVIDIA A10"})
    ra, rb = load(a, b)
    keys = [k for k, *_ in study.protocol_differences(ra, rb)]
    assert keys == ["deterministic", "gpu_name", "seed", "images"]
    (line,) = warning_lines(pm.report([ra, rb], brief=True))
    assert "images (4 images vs 3 images, 3 in common)" in line
    assert "gpu_name (NVIDIA H100 80GB HBM3 vs NVIDIA A10)" in line


def new_fields(i: int, pruned: bool):
    seg = {"pre_pruning": 6.0 + i, "post_pruning": 2.0} if pruned else {"sampling": 10.0 + i}
    return {"time_segments": seg, "compute": {"unet": 100, "decoder_forward": 104 + i, "decoder_backward": 100,
                                              "encoder": 0, "dino_forward": 40, "dino_backward": 40},
            "tflop": 2.5 + i}


def test_cost_table_reads_the_new_fields_and_shows_na_for_older_runs(tmp_path):
    new = make_run(tmp_path, "exp2/demo_2img/new", [rec(i, [20.0, 10.0], **new_fields(i, True)) for i in range(2)],
                   metadata={"wall_time_sec": 30.0, "device": "cuda:0"},
                   vram={"peak_memory_mb": 6100.0, "peak_reserved_mb": 7200.0, "segments": {"pre_pruning": 6100.0},
                         "segments_reserved": {"pre_pruning": 7200.0}})
    half = make_run(tmp_path, "exp1/demo_2img/half", [rec(0, [20.0], **new_fields(0, False)), rec(1, [21.0])],
                    metadata={"wall_time_sec": 30.0, "device": "cuda:0"})
    old = make_run(tmp_path, "exp0/demo_2img/old", [rec(i, [20.0, 10.0]) for i in range(2)],
                   metadata={"wall_time_sec": 30.0, "device": "cuda:0"}, vram={"peak_memory_mb": 10116.0, "segments": {}})
    runs = load(new, half, old)
    section = pm.report(runs, brief=True).split("## Cost")[1].split("\n## ")[0]
    assert [cell(section, "GPU-seconds / image", k) for k in range(3)] == ["15 (wall)"] * 3
    assert cell(section, "seconds / image by phase", 0) == "post_pruning 2, pre_pruning 6.5"
    assert cell(section, "seconds / image by phase", 1) == "sampling 10 (1/2 images)"
    assert cell(section, "seconds / image by phase", 2) == "n/a"
    assert [cell(section, "peak VRAM allocated (MB)", k) for k in range(3)] == ["6100", "n/a", "10116"]
    assert [cell(section, "peak VRAM reserved (MB)", k) for k in range(3)] == ["7200", "n/a", "n/a"]
    assert cell(section, "network evaluations / image: decoder_forward", 0) == "104.5"
    assert cell(section, "network evaluations / image: dino_backward", 1) == "40 (1/2 images)"
    assert cell(section, "network evaluations / image: unet", 2) == "n/a"
    assert [cell(section, "TFLOP / image", k) for k in range(3)] == ["3", "2.5 (1/2 images)", "n/a"]
    # a 10 + 90 merge (images that follow each other) keeps the reserved peaks (max over parts)
    a = make_run(tmp_path / "m", "exp2/demo_1img/r", [rec(0, [20.0], **new_fields(0, True))],
                 vram={"peak_memory_mb": 5000.0, "peak_reserved_mb": 6000.0, "segments": {},
                       "segments_reserved": {"post_pruning": 5500.0}})
    b = make_run(tmp_path / "m", "exp2/demo_2img/r", [rec(1, [20.0], **new_fields(1, True))],
                 vram={"peak_memory_mb": 5200.0, "peak_reserved_mb": 5900.0, "segments": {},
                       "segments_reserved": {"post_pruning": 5800.0}})
    (m,) = load(a, b)
    assert m.vram["peak_reserved_mb"] == 6000.0 and m.vram["segments_reserved"] == {"post_pruning": 5800.0}
    assert study.cost_summary(m)["compute_per_image"]["decoder_forward"] == pytest.approx((104 + 105) / 2)


def test_any_orientation_in_summary_and_pairs(tmp_path):
    """exp3 on the toy: best PSNR 8 dB while both particles sit at 35 dB on the 180° twin, a valid solution."""
    base = [rec(i, [30.0, 12.0], twin=[9.0, 11.0]) for i in range(3)]
    twin = [rec(i, [8.0, 7.5], twin=[35.0, 34.0]) for i in range(3)]
    a = make_run(tmp_path, "exp2/demo_3img/a", base)
    b = make_run(tmp_path, "exp3/demo_3img/b", twin)
    text = pm.report(load(a, b), brief=True)
    summary = text.split("## Summary")[1]
    assert cell(summary, pm.BEST_ANY_ROW, 0) == "30.00 ± 0.00" and cell(summary, pm.BEST_ANY_ROW, 1) == "35.00 ± 0.00"
    c = pm.paired_comparison(*load(a, b))
    assert c["mean_diff"] == pytest.approx(-22.0) and c["any_mean_diff"] == pytest.approx(5.0) and c["any_n"] == 3
    pairs = text.split("## Paired comparisons")[1]
    row = [r for r in pairs.splitlines() if r.startswith("| exp3/demo_3img/b | exp2/demo_3img/a |")][0]
    assert "| -22.00 |" in row and "| +5.00 |" in row
    # a record written before the field existed: recomputed from psnr / psnr_twin
    old = {k: v for k, v in twin[0].items() if k != "best_psnr_any_orientation"}
    from cores.evaluation import best_psnr_any_orientation

    assert best_psnr_any_orientation(old) == 35.0


# --- equivalence -------------------------------------------------------------------------------------
@pytest.mark.parametrize("diffs, equivalent", [
    ([0.05, -0.02, 0.01, 0.03, -0.04, 0.0, 0.02, -0.01, 0.04, -0.03], True),   # small and tight
    ([0.5, 0.45, 0.55, 0.52, 0.48, 0.5, 0.47, 0.53, 0.51, 0.49], False),       # a shift beyond the margin
    ([1.0, -1.0, 0.9, -0.9, 1.1, -1.1, 0.8, -0.8, 1.2, -1.2], False),          # mean 0 but too noisy to show it
])
def test_tost_matches_two_one_sided_t_tests(diffs, equivalent):
    t = study.equivalence_tost(diffs, 0.2)
    lower = ttest_1samp(diffs, -0.2, alternative="greater").pvalue
    upper = ttest_1samp(diffs, 0.2, alternative="less").pvalue
    assert t["p_lower"] == pytest.approx(lower) and t["p_upper"] == pytest.approx(upper)
    assert t["p_value"] == pytest.approx(max(lower, upper)) and t["equivalent"] is equivalent
    assert (t["low"] > -0.2 and t["high"] < 0.2) is equivalent  # the 90 % interval inside the margin


def test_tost_degenerate_cases():
    assert study.equivalence_tost([0.0] * 5, 0.2)["equivalent"] is True      # identical pairs
    assert study.equivalence_tost([0.3] * 5, 0.2)["equivalent"] is False     # identical shift outside
    one = study.equivalence_tost([0.0], 0.2)
    assert one["equivalent"] is False and one["note"] == "n=1 < 2"


@pytest.fixture(scope="module")
def toy_pair(tmp_path_factory):
    """`MODEL=toy bash commands_gpu/validate_speed.sh --10` with few steps: exp0 on the 10 demo images, exact then
    fast, through the script.  The toy prior has no network: the fast preset only wraps its decode and Tweedie
    step in CPU bf16 autocast, which touches few of its operations, so the pair agrees to ~1e-5 dB.  What the
    test shows is the path (two folders that differ only in `speed.*`, paired image by image, read back and
    judged); the planted shift and the noisy-mean-0 TOST case show that the verdict can fail."""
    root = tmp_path_factory.mktemp("validate")
    env = {k: v for k, v in os.environ.items() if k not in ("DRY_RUN", "GPU", "SPEED", "BATCH", "EXTRA_ARGS")}
    env.update(MODEL="toy", SAVE_DIR=str(root), PYTHON=sys.executable,
               EXTRA_ARGS="sampler.annealing.num_steps=3 sampler.mcmc.num_steps=1 num_samples=2 eval.lpips=false")
    res = subprocess.run(["bash", "commands_gpu/validate_speed.sh", "--10"], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    run = root / "exp0_baseline" / "imagenet_10img" / "exp0_10img"
    return run, Path(f"{run}_fast"), res.stdout


def test_validate_speed_on_the_toy_is_equivalent(toy_pair):
    exact, fast, stdout = toy_pair
    import yaml

    ce, cf = (yaml.safe_load((p / "config.yaml").read_text()) for p in (exact, fast))
    assert (ce["speed"]["preset"], cf["speed"]["preset"]) == ("exact", "fast")
    flat_e, flat_f = study.flat_config(ce), study.flat_config(cf)
    differing = {k for k in flat_e.keys() | flat_f.keys() if flat_e.get(k) != flat_f.get(k)} - {"name"}
    assert differing and all(k.startswith("speed.") for k in differing)  # only the preset differs
    assert "warning" not in stdout
    line = [s for s in stdout.splitlines() if s.startswith("equivalence (TOST")][0]
    assert line.endswith("→ equivalent within ±0.2 dB")
    me = json.loads((exact / "metrics.json").read_text())["images"]
    mf = json.loads((fast / "metrics.json").read_text())["images"]
    diffs = [f["psnr"][f["best_idx"]] - e["psnr"][e["best_idx"]] for e, f in zip(me, mf)]
    assert len(diffs) == 10
    assert f"Δ best PSNR (fast − exact): mean {np.mean(diffs):+.3f} dB" in stdout


def test_validate_speed_fails_on_a_planted_shift(toy_pair, tmp_path, capsys):
    exact, fast, _ = toy_pair
    shifted = tmp_path / "exp0_baseline" / "imagenet_10img" / "exp0_10img_shifted"
    shutil.copytree(fast, shifted)
    m = json.loads((shifted / "metrics.json").read_text())
    for r in m["images"]:  # every particle 0.5 dB worse: a shift beyond the ±0.2 dB margin
        r["psnr"] = [None if p is None else p - 0.5 for p in r["psnr"]]
    (shifted / "metrics.json").write_text(json.dumps(m))
    assert vs.main([str(exact), str(shifted)]) == 0
    out = capsys.readouterr().out
    assert "→ not shown equivalent" in out and "mean -0.5" in out
    assert vs.main([str(exact), str(shifted), "--margin-db", "1.0"]) == 0  # a wider margin covers it
    assert "→ equivalent within ±1 dB" in capsys.readouterr().out
    assert vs.main([str(exact), str(shifted), "--margin-db", "-1"]) == 2


def test_validate_speed_bad_flags():
    env = {k: v for k, v in os.environ.items() if k not in ("SPEED", "BATCH")}
    for flags in ([], ["--7"], ["--10", "--margin-db", "0"], ["--10", "--margin-db", "x"]):
        res = subprocess.run(["bash", "commands_gpu/validate_speed.sh", *flags], capture_output=True, text=True,
                             env={**env, "DRY_RUN": "1"}, cwd=ROOT, timeout=60)
        assert res.returncode == 2 and res.stdout == "", flags
    res = subprocess.run(["bash", "commands_gpu/validate_speed.sh", "--10"], capture_output=True, text=True,
                         env={**env, "DRY_RUN": "1"}, cwd=ROOT, timeout=60)
    lines = res.stdout.splitlines()
    assert len(lines) == 3 and "speed=exact" in lines[0] and "speed=fast" in lines[1]
    assert lines[2].endswith("exp0_10img results/exp0_baseline/imagenet_10img/exp0_10img_fast "
                             "--margin-db 0.2")
