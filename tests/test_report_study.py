"""The study's numbers in eval/ (orientation, McNemar, selection, spread, cost, repulsion, pruning, HDC,
merged metadata, CSV, report.md) on hand-made run folders whose every figure is worked out by hand."""
from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pytest
import yaml
from scipy.stats import binomtest, t as student_t

from eval import parse_metrics as pm
from eval import study
from eval.plots import quality_points, repulsion_curves

# Wilson 95 % interval of 3/4 and 2/4, worked out by hand (z = 1.96)
WILSON_3_4 = (0.300636, 0.954414)
WILSON_2_4 = (0.150036, 0.849964)


def rec(idx: int, psnr: List[Optional[float]], twin: Optional[List[Optional[float]]] = None,
        loss: Optional[List[float]] = None, ids: Optional[List[int]] = None, **extra) -> Dict:
    vals = [p for p in psnr if p is not None]
    finite = [i for i, p in enumerate(psnr) if p is not None]
    loss = loss or [float(i) for i in range(len(psnr))]
    r = {"image_idx": idx, "particle_ids": ids or list(range(len(psnr))), "psnr": psnr,
         "ssim": [None] * len(psnr), "lpips": [None] * len(psnr),
         "psnr_twin": twin if twin is not None else [5.0] * len(psnr), "measurement_loss": loss,
         "best_idx": max(finite, key=lambda i: psnr[i]) if vals else None,
         "selected_idx": min(finite, key=lambda i: loss[i]) if vals else None,
         "success": bool(vals) and max(vals) >= 20, "both_orientations": False, "non_finite_particles": [],
         "time_sec": 10.0}
    r.update(extra)
    return r


def make_run(root: Path, rel: str, images: List[Dict], config: Optional[Dict] = None, metadata: Optional[Dict] = None,
             vram: Optional[Dict] = None, repulsion: Optional[List[Dict]] = None) -> Path:
    d = root / rel
    (d / "records").mkdir(parents=True)
    for r in images:
        (d / "records" / f"{r['image_idx']:05d}.json").write_text(json.dumps(r))
    (d / "metrics.json").write_text(json.dumps({"images": images, "summary": {}, "metadata": metadata or {},
                                                "vram": vram or {"peak_memory_mb": None, "segments": {}}}))
    cfg = {"model": {"name": "toy"}, "data": {"name": "demo-imagenet"}, "num_samples": 4, "repulsion_scale": 0.0,
           "repulsion_feature": "pixel", "pruning_step": -1, "pruning_keep": 2, "pruning_mode": "slicing",
           "hard_data_consistency": -1, "name": d.name, "save_dir": str(d.parent)}
    cfg.update(config or {})
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    if repulsion:
        (d / "repulsion.jsonl").write_text("".join(json.dumps(x) + "\n" for x in repulsion))
    return d


def load(*dirs: Path):
    return pm.load_runs(list(dirs))


def cell(table: str, metric: str, col: int = 0) -> str:
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == metric:
            return cells[1 + col]
    raise AssertionError(f"no row {metric!r} in\n{table}")


def t_ci(xs: List[float]):
    m, s, n = float(np.mean(xs)), float(np.std(xs, ddof=1)), len(xs)
    half = student_t.ppf(0.975, n - 1) * s / math.sqrt(n)
    return m, m - half, m + half


# --- orientation --------------------------------------------------------------------------------
ORIENT_IMAGES = [
    rec(0, [30.0, 10.0, 20.5, None], twin=[10.0, 30.0, 20.0, 5.0]),      # gt, twin, unclear (0.5 dB), unclear (null)
    rec(1, [25.0, 24.0, 12.0, 11.0], twin=[12.0, 11.0, 25.0, 11.5]),     # gt, gt, twin, unclear
    rec(2, [10.0, 10.0, 10.0, 10.0], twin=[20.0, 20.0, 20.0, 20.0]),     # twin ×4
    rec(3, [21.0, 22.0, 23.0, 24.0], twin=[20.2, 10.0, 10.0, 10.0]),     # unclear (0.8 dB), gt ×3
]


def test_particle_orientation_rule():
    assert study.particle_orientation(21.0, 20.0, 1.0) == "gt"        # exactly the margin counts
    assert study.particle_orientation(20.0, 21.0, 1.0) == "twin"
    assert study.particle_orientation(20.5, 20.0, 1.0) == "unclear"
    assert study.particle_orientation(None, 20.0, 1.0) == "unclear"
    assert study.particle_orientation(float("nan"), 3.0, 1.0) == "unclear"
    assert study.particle_orientation(23.0, 20.5, 2.0) == "gt"
    assert study.particle_orientation(22.0, 20.5, 2.0) == "unclear"


def test_orientation_from_psnr_and_twin(tmp_path):
    (r,) = load(make_run(tmp_path, "e/demo_4img/a", ORIENT_IMAGES))
    o = study.orientation_summary(r)
    assert o["margin_db"] == 1.0
    assert o["particle_counts"] == {"gt": 6, "twin": 6, "unclear": 4} and o["num_particles"] == 16
    assert (o["correct"]["k"], o["correct"]["n"]) == (3, 4)
    assert (o["both_any"]["k"], o["both_any"]["n"]) == (2, 4)
    assert (o["correct"]["low"], o["correct"]["high"]) == pytest.approx(WILSON_3_4, abs=1e-6)
    assert (o["both_any"]["low"], o["both_any"]["high"]) == pytest.approx(WILSON_2_4, abs=1e-6)
    table = pm.report(load(make_run(tmp_path, "e/demo_4img/b", ORIENT_IMAGES)))
    assert "| correct orientation found [95% CI] | 75% [30%, 95%] (3/4) |" in table
    assert "| both orientations (any PSNR) [95% CI] | 50% [15%, 85%] (2/4) |" in table
    assert "| particles 'unclear' | 25% (4/16) |" in table


def test_orientation_margin_from_config_and_stored_fields(tmp_path):
    (r,) = load(make_run(tmp_path, "e/demo_4img/m", ORIENT_IMAGES, config={"eval": {"orientation_margin_db": 3.0}}))
    o = study.orientation_summary(r)
    # margin 3: image 1's p1 (24 vs 11) stays gt, image 3's p0 unclear; nothing else changes
    assert o["margin_db"] == 3.0 and o["particle_counts"] == {"gt": 6, "twin": 6, "unclear": 4}
    stored = [dict(ORIENT_IMAGES[0], orientation=["twin", "twin", "twin", "twin"], orientations_found=["twin"],
                   correct_orientation_found=False, both_orientations_any=False)]
    (s,) = load(make_run(tmp_path, "e/demo_1img/s", stored))
    o = study.orientation_summary(s)
    assert o["particle_counts"]["twin"] == 4 and o["correct"]["k"] == 0 and o["both_any"]["k"] == 0


def test_mcnemar_known_table():
    # b = 1 discordant pair one way, c = 9 the other: two-sided exact p = 2·(1 + 10)/2^10
    assert study.mcnemar_exact(1, 9) == pytest.approx(0.021484375, abs=1e-15)
    assert study.mcnemar_exact(9, 1) == pytest.approx(binomtest(1, 10, 0.5).pvalue)
    assert study.mcnemar_exact(0, 0) == 1.0 and study.mcnemar_exact(3, 3) == pytest.approx(1.0)


def test_orientation_pair_mcnemar(tmp_path):
    # 12 common images: A only 1, B only 9, both 1, neither 1 (stored outcome fields)
    a_out = [True] + [False] * 9 + [True, False]
    b_out = [False] + [True] * 9 + [True, False]
    mk = lambda flags: [rec(i, [20.0], correct_orientation_found=f, both_orientations_any=f)  # noqa: E731
                        for i, f in enumerate(flags)]
    ra, rb = load(make_run(tmp_path, "e/demo_12img/a", mk(a_out)), make_run(tmp_path, "f/demo_12img/b", mk(b_out)))
    res = study.orientation_pair(ra, rb)["correct_orientation_found"]
    assert (res["n"], res["a_only"], res["b_only"]) == (12, 1, 9)
    assert res["p_value"] == pytest.approx(0.021484375)
    assert res["a_rate"] == pytest.approx(2 / 12) and res["b_rate"] == pytest.approx(10 / 12)
    text = pm.report([ra, rb])
    assert "| f/demo_12img/b | e/demo_12img/a | correct orientation | 12 | 17% | 83% | 1 / 9 | 0.0215 |" in text
    rc = load(make_run(tmp_path, "g/demo_12img/c", mk(a_out)))[0]
    text = pm.report([ra, rb, rc], all_pairs=True)
    assert "| g/demo_12img/c | e/demo_12img/a | both orientations | 12 | 17% | 17% | 0 / 0 | 1 |" in text
    assert "| g/demo_12img/c | f/demo_12img/b | correct orientation | 12 | 83% | 17% | 9 / 1 | 0.0215 |" in text


# --- selection and spread --------------------------------------------------------------------------
def test_selection_and_spread(tmp_path):
    images = [
        rec(0, [30.0, 20.0, 10.0, 40.0], loss=[1, 2, 3, 0]),    # best p3, selected p3: 0 dB lost
        rec(1, [30.0, 20.0, 10.0, 40.0], loss=[0, 1, 2, 3]),    # best p3, selected p0: 10 dB lost
        rec(2, [12.0, 14.0], loss=[0, 1], ids=[1, 3]),           # pruned: best is particle 3, selected 1: 2 dB
        rec(3, [18.0, 18.0, 18.0, 18.0], loss=[3, 2, 1, 0]),    # best p0 (first max), selected p3: 0 dB, miss
    ]
    rep = [{"image_idx": i, "step": s, "repulsion_on": s <= 5, "feature": "pixel",
            "mean_pairwise_dino_dist": (100.0 + 10 * i) if s == 5 else 999.0,
            "ratio_scaled_to_score": [0.5, 1.0, 2.0, 4.0][i] if s == 0 else (0.0 if s > 5 else 0.1)}
           for i in range(4) for s in (0, 1, 2, 5, 10)]
    (r,) = load(make_run(tmp_path, "e/demo_4img/a", images, repulsion=rep, config={"repulsion_scale": 10.0},
                         metadata={"wall_time_sec": 40.0}))
    sel = study.selection_summary(r)
    assert sel["best_counts"] == {0: 1, 3: 3}
    assert (sel["accuracy"]["k"], sel["accuracy"]["n"]) == (1, 4)
    m, lo, hi = t_ci([0.0, 10.0, 2.0, 0.0])
    assert (sel["db_lost"]["mean"], sel["db_lost"]["low"], sel["db_lost"]["high"]) == pytest.approx((3.0, lo, hi))
    assert lo == pytest.approx(3.0 - 3.182446305 * math.sqrt(68 / 3) / 2)
    spr = study.spread_summary(r)
    stds = [np.std([30, 20, 10, 40], ddof=1)] * 2 + [np.std([12, 14], ddof=1), 0.0]
    assert spr["psnr_std"]["mean"] == pytest.approx(np.mean(stds)) and spr["psnr_std"]["std"] == pytest.approx(
        np.std(stds, ddof=0))  # within an image ddof 1, over images ddof 0
    assert spr["distance"]["steps"] == [5] and spr["distance"]["mean"] == pytest.approx(115.0)
    assert spr["distance"]["std"] == pytest.approx(np.std([100, 110, 120, 130], ddof=0))
    text = pm.report([r])
    assert "| best particle (oracle) counts | p0: 1, p3: 3 |" in text
    assert "| selection accuracy (selected = best) [95% CI] | 25% [5%, 70%] (1/4) |" in text
    assert f"| dB lost by selecting with loss [95% CI] | +3.00 [{lo:+.2f}, {hi:+.2f}] (n=4) |" in text
    assert "115 ± 11 (pixel, step 5, n=4)" in text  # sqrt(125): ddof 0 over images


# --- repulsion (with a scale-0 baseline that logs distances) ------------------------------------------
def rep_lines(on: bool, dist, ratios) -> List[Dict]:
    return [{"image_idx": i, "step": s, "repulsion_on": on and s <= 5, "feature": "pixel",
             "mean_pairwise_dino_dist": dist(i, s), "ratio_scaled_to_score": ratios[i] if (on and s == 0) else 0.0,
             "ratio_per_particle_at_sigma": 100 * ratios[i] if (on and s == 0) else 0.0,
             "repulsion_time_sec": 0.01} for i in range(4) for s in (0, 1, 2, 5, 10)]


def test_repulsion_with_baseline(tmp_path):
    base = make_run(tmp_path, "exp0/demo_4img/s0", [rec(i, [20.0, 21.0]) for i in range(4)],
                    repulsion=rep_lines(False, lambda i, s: 50.0 + i + s, [0] * 4))
    blocks = [{"active_steps": 4, "total_time_sec": t, "mean_pairwise_dist": 1.0} for t in (1.0, 2.0, 3.0, 6.0)]
    rep = make_run(tmp_path, "exp1/demo_4img/s10", [rec(i, [20.0, 21.0], repulsion=b) for i, b in enumerate(blocks)],
                   config={"repulsion_scale": 10.0},
                   repulsion=rep_lines(True, lambda i, s: 100.0 + 10 * i + s, [0.5, 1.0, 2.0, 4.0]))
    rb, rr = load(base, rep)
    sb, sr = study.repulsion_summary(rb), study.repulsion_summary(rr)
    assert sb["is_baseline"] and not sr["is_baseline"]
    assert sb["step0_ratio_median"] is None and sr["step0_ratio_median"] == pytest.approx(1.5)
    assert sb["step0_ratio_at_sigma_median"] is None and sr["step0_ratio_at_sigma_median"] == pytest.approx(150.0)
    assert sr["time_per_image"] == pytest.approx(3.0) and sr["feature"] == "pixel"
    # the baseline's distance is read at the repulsion run's last ON step (5): 50 + i + 5
    text = pm.report([rb, rr])
    assert "56.5 ± 1.1 (pixel, step 5, n=4)" in text and "120 ± 11 (pixel, step 5, n=4)" in text  # ddof 0
    section = text.split("## Repulsion")[1]
    assert cell(section, f"step-0 ratio {study.RATIO_NAMES['ratio']}, median over images", 1) == "1.5 (n=4)"
    assert cell(section, f"step-0 ratio {study.RATIO_NAMES['ratio_at_sigma']}, median over images", 1) == "150 (n=4)"
    curves = {label: (xs, ys, b) for label, xs, ys, b in repulsion_curves([rb, rr], "dist")}
    label = "exp0/demo_4img/s0 [pixel] (scale-0 baseline)"
    assert curves[label] == ([0, 1, 2, 5, 10], [51.5, 52.5, 53.5, 56.5, 61.5], True)
    assert [lab for lab, *_ in repulsion_curves([rb, rr], "ratio")] == ["exp1/demo_4img/s10 [pixel]"]


def test_ratio_meaning_follows_the_line_format(tmp_path):
    """`ratio_scaled_to_score` is the original's last-evaluation ratio where the line also carries
    `ratio_per_particle_at_sigma` and in the original's own logs; the project's older lines held the
    per-particle ratio at σ_i there."""
    new = {"ratio_scaled_to_score": 0.002, "ratio_per_particle_at_sigma": 0.3}
    old = {"ratio_scaled_to_score": 0.3}
    assert study.line_ratios(new) == {"ratio": 0.002, "ratio_at_sigma": 0.3}
    assert study.line_ratios(old) == {"ratio": None, "ratio_at_sigma": 0.3}
    assert study.line_ratios(old, "original") == {"ratio": 0.3, "ratio_at_sigma": None}
    lines = [{**old, "image_idx": 0, "step": 0, "repulsion_on": True}]
    (r,) = load(make_run(tmp_path, "exp1/demo_1img/older", [rec(0, [20.0, 21.0])], repulsion=lines,
                         config={"repulsion_scale": 10.0}))
    s = study.repulsion_summary(r)
    assert (s["step0_ratio_median"], s["step0_ratio_at_sigma_median"]) == (None, 0.3)
    section = pm.report([r]).split("## Repulsion")[1]
    assert cell(section, f"step-0 ratio {study.RATIO_NAMES['ratio']}, median over images", 0) == "n/a (n=0)"
    assert cell(section, f"step-0 ratio {study.RATIO_NAMES['ratio_at_sigma']}, median over images", 0) == "0.3 (n=1)"


# --- cost ----------------------------------------------------------------------------------------
def test_cost_per_gpu_hour(tmp_path):
    # images 0-2: p0 gt, p1 twin (success, both); image 3: p0 unclear (10 vs 10), p1 twin
    images = [rec(i, [25.0 if i < 3 else 10.0, 5.0], twin=[5.0 if i < 3 else 10.0, 25.0]) for i in range(4)]
    d = make_run(tmp_path, "e/demo_4img/ddp", images, vram={"peak_memory_mb": 1000.0, "segments": {}},
                 metadata={"wall_time_sec": 100.0, "world_size": 2, "device": "cuda:0",
                           "ranks": [{"peak_memory_mb": 1000.0}, {"peak_memory_mb": 1200.0}]})
    resumed = make_run(tmp_path, "e/demo_4img/resumed", images, metadata={"wall_time_sec": 1.0, "device": "cuda:0"})
    rd, rr = load(d, resumed)
    c = study.cost_summary(rd)
    assert c["gpu_sec_total"] == 200.0 and c["gpu_sec_per_image"] == 50.0 and c["source"] == "wall"
    assert c["peak_memory_mb"] == 1200.0 and c["processes"] == 2
    assert c["success_per_gpu_hour"] == pytest.approx(3 / (200 / 3600))
    assert c["both_orientations_per_gpu_hour"] == pytest.approx(3 / (200 / 3600))
    # a wall time shorter than the records' sampling time (4 × 10 s) cannot cover them: records are used
    c = study.cost_summary(rr)
    assert c["gpu_sec_per_image"] == 10.0 and c["source"] == "records"
    ((label, x, ci),) = quality_points([rd])
    assert x == 50.0 and ci["mean"] == pytest.approx(21.25)
    assert ci["low"] == pytest.approx(t_ci([25.0, 25.0, 25.0, 10.0])[1])
    assert "| GPU-seconds / image | 50 (wall) | 10 (records) |" in pm.report([rd, rr])


def test_peak_with_cudnn_autotuning_is_labelled_and_not_compared(tmp_path):
    """A GPU run with speed.cudnn_benchmark: its peak is cuDNN's autotuning (68.9 GiB measured on an H100
    for a 7.6 GiB step), so the cost and summary tables say so and the pruning table shows no VRAM saving
    from it; the same run on CPU, or without the switch, is shown plainly."""
    gpu = {"wall_time_sec": 40.0, "device": "cuda:0", "gpu_name": "NVIDIA H100 80GB HBM3"}
    images = [rec(i, [20.0, 21.0], pruning={"did_prune": True, "mode": "slicing", "pruning_regret": None})
              for i in range(4)]
    tuned = {"speed": {"preset": "fast", "cudnn_benchmark": True}}
    pruned = make_run(tmp_path, "exp2/demo_4img/p", images, metadata=gpu,
                      config={**tuned, "pruning_step": 29}, vram={"peak_memory_mb": 68200.0, "segments": {}})
    unpruned = make_run(tmp_path, "exp1/demo_4img/u", [rec(i, [20.0]) for i in range(4)], metadata=gpu,
                        config=tuned, vram={"peak_memory_mb": 70100.0, "segments": {}})
    plain = make_run(tmp_path, "exp1/demo_4img/plain", [rec(i, [20.0]) for i in range(4)],
                     metadata={**gpu, "device": "cpu", "gpu_name": None}, config=tuned,
                     vram={"peak_memory_mb": 900.0, "segments": {}})
    runs = load(unpruned, pruned, plain)
    assert [study.cost_summary(r)["peak_includes_autotuning"] for r in runs] == [True, True, False]
    text = pm.report(runs)
    cost = text.split("## Cost")[1].split("\n## ")[0]
    assert "68200 (includes cuDNN benchmark autotuning" in cost
    assert cell(pm.summary_table(runs), "peak VRAM (MB)", 0) == "70100 (incl. cuDNN benchmark autotuning)"
    assert cell(pm.summary_table(runs), "peak VRAM (MB)", 2) == "900"
    section = text.split("## Pruning")[1]
    assert cell(section, "peak VRAM saved (MB)").startswith("n/a (a peak includes cuDNN benchmark autotuning")
    warmed = make_run(tmp_path, "exp1/demo_4img/w", [rec(i, [20.0]) for i in range(4)], metadata=gpu,
                      config=tuned, vram={"peak_memory_mb": 4100.0, "segments": {}, "autotune_peak_mb": 66000.0})
    assert not study.cost_summary(load(warmed)[0])["peak_includes_autotuning"]  # trials on their own line


# --- pruning ---------------------------------------------------------------------------------------
def test_pruning_regret_and_savings(tmp_path):
    prune_cfg = {"repulsion_scale": 10.0, "pruning_step": 29, "pruning_mode": "masking"}
    regret = [(True, 2.0), (False, 0.0), (False, 0.0), (True, 4.0)]
    images = [rec(i, [20.0, 21.0], pruning={"did_prune": True, "mode": "masking", "pruning_regret": g,
                                            "pruning_regret_db": db}) for i, (g, db) in enumerate(regret)]
    pruned = make_run(tmp_path, "exp2/demo_4img/p", images, config=prune_cfg, metadata={"wall_time_sec": 60.0},
                      vram={"peak_memory_mb": 800.0, "segments": {}})
    decoy = make_run(tmp_path, "exp0/demo_4img/s0", [rec(i, [20.0]) for i in range(4)],
                     metadata={"wall_time_sec": 10.0}, vram={"peak_memory_mb": 100.0, "segments": {}})
    unpruned = make_run(tmp_path, "exp1/demo_4img/s10", [rec(i, [20.0]) for i in range(4)],
                        config={"repulsion_scale": 10.0}, metadata={"wall_time_sec": 100.0},
                        vram={"peak_memory_mb": 1000.0, "segments": {}})
    runs = load(decoy, unpruned, pruned)
    p = study.pruning_summary(runs[2], runs)
    assert p["pruned_images"] == 4 and p["modes"] == ["masking"]
    assert (p["regret"]["k"], p["regret"]["n"]) == (2, 4)
    assert (p["regret"]["low"], p["regret"]["high"]) == pytest.approx(WILSON_2_4, abs=1e-6)
    assert p["db_lost_all"]["mean"] == pytest.approx(1.5)
    assert p["db_lost_all"]["low"] == pytest.approx(t_ci([2.0, 0.0, 0.0, 4.0])[1])
    assert p["db_lost_regret"]["mean"] == pytest.approx(3.0)
    assert p["db_lost_regret"]["high"] == pytest.approx(3.0 + 12.706204736 * 1.0 / 1.0, rel=1e-6)  # sd √2, n 2
    assert p["counterpart"]["label"] == "exp1/demo_4img/s10"
    assert p["counterpart"]["gpu_sec_per_image"] == (15.0, 25.0)
    assert p["counterpart"]["peak_memory_mb"] == (800.0, 1000.0)
    text = pm.report(runs)
    section = text.split("## Pruning")[1]
    # wall times differ (60 s vs 100 s) but every image took 10 s in both: no saving to show
    assert cell(section, "time / image saved (s)").startswith("within noise (10 → 10 s, time_sec;")
    assert cell(section, "unpruned counterpart") == ("exp1/demo_4img/s10; differs in pruning_mode slicing → masking, "
                                                     "pruning_step -1 → 29")
    assert cell(section, "peak VRAM saved (MB)") == "200, 20% (1000 → 800)"
    assert cell(section, "regret: best particle was pruned [95% CI] (masking, shadow)") == "50% [15%, 85%] (2/4)"
    # without the counterpart among the inputs
    alone = load(pruned)
    assert study.pruning_summary(alone[0], alone)["counterpart"] is None


# --- hard data consistency ---------------------------------------------------------------------------
def test_hdc_per_particle(tmp_path):
    images = [rec(0, [22.0, 20.0], psnr_before_optimization=[20.0, 20.0],
                  optimization={"accepted_mask": [True, False], "final_iters": [100, 3]}),
              rec(1, [15.0, 18.5], psnr_before_optimization=[14.0, 18.0],
                  optimization={"accepted_mask": [True, True], "final_iters": [500, 250]})]
    (r,) = load(make_run(tmp_path, "exp4/demo_2img/h", images, config={"hard_data_consistency": 1}))
    h = study.hdc_summary(r)
    m, lo, hi = t_ci([2.0, 0.0, 1.0, 0.5])
    assert (h["delta"]["mean"], h["delta"]["low"], h["delta"]["high"]) == pytest.approx((0.875, lo, hi))
    assert h["delta_accepted"]["mean"] == pytest.approx((2.0 + 1.0 + 0.5) / 3)
    assert h["improved"] == 3 and (h["accepted"]["k"], h["accepted"]["n"]) == (3, 4)
    assert h["mean_iters"] == pytest.approx(213.25)
    section = pm.report([r]).split("## Hard data consistency")[1]
    row = cell(section, "PSNR change per particle, after − before (dB) [95% CI]")
    assert row == f"+0.88 [{lo:+.2f}, {hi:+.2f}] (n=4)"
    assert cell(section, "accepted rate [95% CI]") == "75% [30%, 95%] (3/4)"
    assert cell(section, "mean optimiser iterations") == "213.2"


# --- merging keeps metadata totals --------------------------------------------------------------------
def test_merge_keeps_metadata_totals(tmp_path):
    rep = lambda t: {"active_steps": 4, "total_time_sec": t, "mean_pairwise_dist": 1.0}  # noqa: E731
    opt = {"final_iters": [10, 30], "accepted_mask": [True, False], "termination_reasons": ["converged", "nan"],
           "total_time_seconds": 0.5}
    ten = make_run(tmp_path, "exp1/imagenet_10img/r",
                   [rec(i, [20.0], repulsion=rep(1.0), optimization=opt) for i in range(10)],
                   metadata={"wall_time_sec": 100.0, "git_commit": "aaa", "start_time": "2026-01-01T00:00:00",
                             "repulsion": {"scale": 10.0, "images": 10, "total_time_sec": 10.0},
                             "optimization": {"lr": 0.005, "num_particles": 20}},
                   vram={"peak_memory_mb": 3000.0, "segments": {}})
    ninety = make_run(tmp_path, "exp1/imagenet_90img/r", [rec(i, [20.0], repulsion=rep(2.0)) for i in range(10, 100)],
                      metadata={"wall_time_sec": 900.0, "world_size": 2, "start_time": "2026-01-02T00:00:00",
                                "repulsion": {"scale": 10.0, "images": 90, "total_time_sec": 180.0}},
                      vram={"peak_memory_mb": 3500.0, "segments": {}})
    (m,) = pm.load_runs(pm.find_run_dirs([str(tmp_path)]))
    assert m.label == "exp1/imagenet_100img/r"
    meta = m.metadata
    assert meta["wall_time_sec"] == 1000.0 and meta["world_size"] == 2 and meta["start_time"] == "2026-01-01T00:00:00"
    assert meta["repulsion"]["images"] == 100 and meta["repulsion"]["scale"] == 10.0
    assert meta["repulsion"]["total_time_sec"] == pytest.approx(10 * 1.0 + 90 * 2.0)
    assert meta["merged_from"] == [str(ten), str(ninety)]
    # the optimisation ran on the first 10 images only: its totals come from their records
    assert meta["optimization"]["lr"] == 0.005 and meta["optimization"]["num_particles"] == 20
    assert meta["optimization"]["mean_iters"] == 20.0 and meta["optimization"]["num_accepted"] == 10
    assert meta["optimization"]["termination_counts"] == {"converged": 10, "nan": 10}
    assert meta["optimization"]["total_time_sec"] == pytest.approx(5.0)
    assert m.vram["peak_memory_mb"] == 3500.0
    c = study.cost_summary(m)
    assert c["gpu_sec_total"] == 100.0 + 900.0 * 2 and c["gpu_sec_per_image"] == pytest.approx(19.0)


# --- CSV and report.md ---------------------------------------------------------------------------
def test_csv_columns_and_report_file(tmp_path):
    a = make_run(tmp_path / "runs", "exp0/demo_4img/a", ORIENT_IMAGES, metadata={"wall_time_sec": 80.0})
    b = make_run(tmp_path / "runs", "exp1/demo_4img/b", ORIENT_IMAGES, config={"repulsion_scale": 10.0},
                 metadata={"wall_time_sec": 40.0, "command": "posterior_sample.py repulsion_scale=10"},
                 repulsion=rep_lines(True, lambda i, s: 100.0 + i, [1.0] * 4))
    out = tmp_path / "out"
    assert pm.main([str(a), str(b), "--csv", str(out / "t.csv"), "--report", str(out / "rep"), "--brief"]) == 0
    srows = list(csv.DictReader((out / "t_summary.csv").open()))
    assert float(srows[0]["gpu_sec_per_image"]) == 20.0 and float(srows[1]["gpu_sec_per_image"]) == 10.0
    assert float(srows[0]["correct_orientation_rate"]) == 0.75
    assert float(srows[0]["both_orientations_any_rate"]) == 0.5
    # selected = p0 (lowest loss); best: 0 → p0, 1 → p0, 2 → p0 (ties: first), 3 → p3
    assert float(srows[0]["selection_accuracy"]) == 0.75
    stds = [np.std([30, 10, 20.5], ddof=1), np.std([25, 24, 12, 11], ddof=1), 0.0, np.std([21, 22, 23, 24], ddof=1)]
    assert float(srows[0]["psnr_spread_mean"]) == pytest.approx(np.mean(stds))
    rows = list(csv.DictReader((out / "t.csv").open()))
    assert rows[0]["orientation"] == "gt;twin;unclear;unclear" and rows[2]["correct_orientation_found"] == "False"
    md = (out / "rep" / "report.md").read_text()
    for heading in ("## Runs", "## Summary", "## Orientation", "## Selection and spread", "## Cost", "## Repulsion",
                    "## Paired comparisons", "## Plots", "## Definitions"):
        assert heading in md, heading
    assert "## Per image" not in md  # --brief
    assert f"`{a}`" in md and "`posterior_sample.py repulsion_scale=10`" in md
    assert "| repulsion_scale | 0.0 | 10.0 |" in md  # settings that differ
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(links) == ["best_psnr_per_image.png", "quality_vs_compute.png", "repulsion_distance.png",
                             "repulsion_ratio.png", "repulsion_ratio_at_sigma.png"]
    for link in links:
        assert (out / "rep" / link).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
