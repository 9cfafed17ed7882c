"""eval/parse_metrics.py on hand-made run folders with known numbers: tables, 10 + 90 merge, pairs, CSV, plots."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pytest
from scipy.stats import wilcoxon

from cores.evaluation import wilson_ci
from eval import parse_metrics as pm


def record(idx: int, psnr: List[float], loss: Optional[List[float]] = None, success: bool = True,
           both: bool = False, time_sec: float = 10.0) -> Dict:
    loss = loss or [float(i) for i in range(len(psnr))]
    return {"image_idx": idx, "particle_ids": list(range(len(psnr))), "psnr": psnr,
            "ssim": [p / 100 for p in psnr], "lpips": [1 - p / 100 for p in psnr], "psnr_twin": [5.0] * len(psnr),
            "measurement_loss": loss, "best_idx": int(np.argmax(psnr)), "selected_idx": int(np.argmin(loss)),
            "success": success, "both_orientations": both, "non_finite_particles": [], "time_sec": time_sec}


def make_run(root: Path, exp: str, size: str, name: str, images: List[Dict], peak: Optional[float] = 1000.0,
             segments: Optional[Dict] = None, repulsion: Optional[List[Dict]] = None, scale: float = 0.0) -> Path:
    d = root / exp / size / name
    d.mkdir(parents=True)
    # a deliberately wrong stored summary: the parser must recompute from images[]
    (d / "metrics.json").write_text(json.dumps({"images": images, "summary": {"best_psnr": {"mean": -1}},
                                                "vram": {"peak_memory_mb": peak, "segments": segments or {}},
                                                "metadata": {}}))
    (d / "config.yaml").write_text(f"model:\n  name: toy\ndata:\n  name: demo-imagenet\nnum_samples: 4\n"
                                   f"repulsion_scale: {scale}\nrepulsion_feature: pixel\nrepulsion_sigma_break: 1.0\n"
                                   f"repulsion_schedule: constant\npruning_step: -1\nhard_data_consistency: -1\n")
    if repulsion:
        (d / "repulsion.jsonl").write_text("".join(json.dumps(r) + "\n" for r in repulsion))
    return d


@pytest.fixture
def two_runs(tmp_path):
    base = make_run(tmp_path, "exp0_baseline", "imagenet_1img", "a", [
        record(0, [10.0, 20.0, 30.0, 40.0], loss=[4, 1, 3, 2], success=True, both=True, time_sec=8.0),
        record(1, [12.0, 14.0, 16.0, 18.0], success=False, time_sec=12.0)], peak=2048.0)
    rep = [{"image_idx": i, "step": s, "mean_pairwise_dino_dist": 30.0 + s + i, "ratio_scaled_to_score": 0.06 / (s + 1),
            "ratio_per_particle_at_sigma": 2.4 / (s + 1)} for i in (0, 1) for s in (0, 1, 2, 5)]
    other = make_run(tmp_path, "exp1_repulsion", "imagenet_1img", "b", [
        record(0, [41.0, 39.0, 35.0, 20.0], success=True),
        record(1, [21.0, 11.0, 9.0, 8.0], success=True)], peak=None,
        segments={"pre_pruning": 900.0, "post_pruning": 500.0}, repulsion=rep, scale=10.0)
    return base, other


def column(table: str, metric: str) -> List[str]:
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == metric:
            return cells[1:]
    raise AssertionError(f"no row {metric!r} in\n{table}")


def test_summary_table_values(two_runs):
    runs = pm.load_runs(list(two_runs))
    table = pm.summary_table(runs)
    assert column(table, "metric") == ["exp0_baseline/imagenet_1img/a", "exp1_repulsion/imagenet_1img/b"]
    # run a: best 40, 18 → mean 29, std over images as DAPS (ddof 0) = 11.00 (15.56 with ddof 1)
    assert column(table, pm.BEST_PSNR_ROW)[0] == "29.00 ± 11.00"
    assert "ddof 0" in pm.BEST_PSNR_ROW  # the header says which std
    assert column(table, "mean of per-image means (dB)")[0] == f"{(25 + 15) / 2:.2f}"
    assert column(table, "selected-by-loss PSNR (dB)")[0] == f"{(20 + 12) / 2:.2f}"  # lowest loss: p1, p0
    assert column(table, "best SSIM")[0] == f"{(0.40 + 0.18) / 2:.3f}"
    assert column(table, "best LPIPS")[0] == f"{(0.60 + 0.82) / 2:.3f}"
    lo, hi = wilson_ci(1, 2)
    assert column(table, "success rate [95% CI]")[0] == f"50% [{lo:.0%}, {hi:.0%}] (1/2)"
    assert column(table, "success rate [95% CI]")[1].startswith("100% [")
    assert column(table, "both orientations [95% CI]")[0].startswith("50% [")
    assert column(table, "time / image (s)")[0] == "10.0"
    assert column(table, "peak VRAM (MB)") == ["2048", "n/a"]
    assert column(table, "VRAM segments (MB)") == ["none", "pre_pruning 900, post_pruning 500"]
    assert column(table, "repulsion") == ["0", "10.0 (pixel, σ_break 1.0, constant)"]
    assert column(table, "repulsion ratio at first logged step, last drift evaluation (the original's)") == [
        "n/a", "0.06"]
    assert column(table, "repulsion ratio at first logged step, per particle at σ_i") == ["n/a", "2.4"]
    assert column(table, "pairwise feature dist, first → last step") == ["n/a → n/a", "30.5 → 35.5"]


def test_per_image_table(two_runs):
    (a, _) = pm.load_runs(list(two_runs))
    t = pm.per_image_table(a)
    row0 = [c.strip() for c in t.splitlines()[4].strip("|").split("|")]
    assert row0 == ["0", "10.00", "20.00", "30.00", "40.00", "40.00", f"{np.std([10, 20, 30, 40], ddof=1):.2f}",
                    "20.00", "yes", "yes"]


def test_merge_10_and_90(tmp_path):
    ten = make_run(tmp_path, "exp1_repulsion", "imagenet_10img", "exp1_main_scale10",
                   [record(i, [10.0 + i, 5.0]) for i in range(10)], peak=3000.0, segments={"optimization": 10.0})
    ninety = make_run(tmp_path, "exp1_repulsion", "imagenet_90img", "exp1_main_scale10",
                      [record(i, [10.0 + i, 5.0], success=False) for i in range(10, 100)], peak=3500.0,
                      segments={"optimization": 20.0})
    other = make_run(tmp_path, "exp1_repulsion", "imagenet_10img", "other_run", [record(0, [1.0, 2.0])])
    runs = pm.load_runs(pm.find_run_dirs([str(tmp_path / "exp1_repulsion" / "*" / "*")]))
    labels = sorted(r.label for r in runs)
    assert labels == ["exp1_repulsion/imagenet_100img/exp1_main_scale10", "exp1_repulsion/imagenet_10img/other_run"]
    merged = next(r for r in runs if "100img" in r.label)
    s = merged.summary
    assert s["num_images"] == 100
    assert [r["image_idx"] for r in merged.images] == list(range(100))
    assert s["best_psnr"]["mean"] == pytest.approx(np.mean([10.0 + i for i in range(100)]))
    assert s["success_rate"] == pytest.approx(0.10)
    assert s["success_rate_ci95"] == pytest.approx(wilson_ci(10, 100))
    assert merged.vram == {"peak_memory_mb": 3500.0, "segments": {"optimization": 20.0}}
    table = pm.summary_table(runs)
    assert "10% [" in table and "(10/100)" in table
    # --no-merge keeps them apart; a parent folder argument finds all three
    assert len(pm.load_runs(pm.find_run_dirs([str(tmp_path)]), merge=False)) == 3
    assert {ten, ninety, other} == set(pm.find_run_dirs([str(tmp_path)]))


def script_folders(tmp_path: Path, script: str, *flags: str, **env: str) -> List[Path]:
    """Run folders laid out exactly as the experiment script names them (its DRY_RUN commands: save_dir,
    name, image range), each holding fabricated records of its images and the config it resolves."""
    from tests.test_experiments import dry

    out = []
    for c in dry(script, *flags, **env):
        o = c["overrides"]
        start, end = int(o["data.start_id"]), int(o["data.end_id"])
        d = make_run(tmp_path, o["save_dir"].split("/")[-1], *o["name"].split("/"),
                     [record(i, [10.0 + i, 5.0]) for i in range(start, end)], scale=10.0)
        cfg = (d / "config.yaml").read_text()  # the range as posterior_sample.py writes it
        (d / "config.yaml").write_text(cfg.replace("data:\n", f"data:\n  start_id: {start}\n  end_id: {end}\n"))
        assert pm.load_run(d).config["data"]["end_id"] == end
        out.append(d)
    return out


@pytest.mark.parametrize("script, merged", [
    ("exp1_repulsion.sh", "exp1_repulsion/imagenet_100img/exp1_scale10"),
    ("exp0_baseline.sh", "exp0_baseline/imagenet_100img/exp0")])
def test_merge_original_run_names(tmp_path, capsys, script, merged):
    """--1 --10 --90 under the original names (`imagenet_10img/exp1_10img_scale10`,
    `imagenet_100img/exp1_90img_scale10`): the 10 and 90 merge into one 100-image entry named without
    the count; the sanity check stays alone, silently."""
    sanity, ten, ninety = script_folders(tmp_path, script, "--1", "--10", "--90")
    assert (ten.parent.name, ninety.parent.name) == ("imagenet_10img", "imagenet_100img")
    runs = pm.load_runs(pm.find_run_dirs([str(tmp_path)]))
    by_label = {r.label: r for r in runs}
    assert sorted(by_label) == sorted([merged, pm.run_label(sanity)])
    assert [r["image_idx"] for r in by_label[merged].images] == list(range(100))
    assert by_label[merged].paths == [ten, ninety]
    assert "not merging" not in capsys.readouterr().err


def test_merge_exp5_names_keeps_the_sanity_check_apart(tmp_path, capsys):
    """exp5 puts the dataset before the count (`exp5_imagenet_10img_…`): the 1-image run shares the
    key but overlaps the 10 images, so it stays alone with a note; 10 + 90 merge."""
    one, ten, ninety = script_folders(tmp_path, "exp5_final.sh", "--imagenet", "--1", "--10", "--90")
    runs = pm.load_runs(pm.find_run_dirs([str(tmp_path)]))
    assert sorted(r.label for r in runs) == sorted([
        "exp5_final/imagenet_100img/exp5_imagenet_scale10_prune25_hdc1", pm.run_label(one)])
    assert "their images overlap" in capsys.readouterr().err


def test_merge_needs_the_same_config_and_following_ranges(tmp_path, capsys):
    """Runs of one merge key stay apart when their configs differ outside name/folder/range, or when
    their image ranges leave a gap; the speed suffix keeps its place in the merged name."""
    ten, ninety = script_folders(tmp_path, "exp1_repulsion.sh", "--10", "--90", SPEED="fast")
    assert pm.merge_key(ten) == pm.merge_key(ninety) == ("exp1_repulsion", "imagenet", "exp1_scale10_fast")
    assert [r.label for r in pm.load_runs([ten, ninety])] == ["exp1_repulsion/imagenet_100img/exp1_scale10_fast"]
    cfg = (ninety / "config.yaml").read_text()
    (ninety / "config.yaml").write_text(cfg.replace("num_samples: 4", "num_samples: 2"))
    assert len(pm.load_runs([ten, ninety])) == 2
    assert "their configs differ in num_samples" in capsys.readouterr().err
    (ninety / "config.yaml").write_text(cfg.replace("start_id: 10", "start_id: 20"))
    metrics = json.loads((ninety / "metrics.json").read_text())
    metrics["images"] = [im for im in metrics["images"] if im["image_idx"] >= 20]
    (ninety / "metrics.json").write_text(json.dumps(metrics))
    assert len(pm.load_runs([ten, ninety])) == 2
    assert "0..10 and 20..100 do not follow each other" in capsys.readouterr().err


def test_merge_key_strips_only_the_scripts_count():
    key = lambda p: pm.merge_key(Path("/r") / p)  # noqa: E731
    assert key("e/imagenet_10img/exp1_10img_scale10") == ("e", "imagenet", "exp1_scale10")
    assert key("e/ffhq_100img/exp5_ffhq_90img_x") == ("e", "ffhq", "exp5_ffhq_x")
    assert key("e/imagenet_10img/exp0_main_scale0") == ("e", "imagenet", "exp0_main_scale0")  # older names
    assert key("e/imagenet_1img/exp0_sanity_check") == ("e", "imagenet", "exp0_sanity_check")
    assert key("e/imagenet_10img/exp1_90img_x") == ("e", "imagenet", "exp1_90img_x")  # more than the folder holds
    assert key("e/imagenet_10img/exp1_x_10img") == ("e", "imagenet", "exp1_x_10img")  # not after the short name
    assert key("e/imagenet/exp1_10img") is None


def test_overlapping_runs_are_not_merged(tmp_path, capsys):
    make_run(tmp_path, "exp0_baseline", "imagenet_10img", "r", [record(i, [20.0]) for i in range(10)])
    make_run(tmp_path, "exp0_baseline", "imagenet_1img", "r", [record(0, [20.0])])
    runs = pm.load_runs(pm.find_run_dirs([str(tmp_path)]))
    assert sorted(r.summary["num_images"] for r in runs) == [1, 10]
    assert "overlap" in capsys.readouterr().err


def test_paired_comparison_matches_scipy(tmp_path):
    a_best = [10.0, 12.0, 15.0, 11.0, 20.0, 18.0, 9.0]
    b_best = [12.5, 11.0, 19.0, 15.0, 21.5, 18.0, 16.0]
    a = make_run(tmp_path, "e", "imagenet_10img", "a", [record(i, [v, 1.0]) for i, v in enumerate(a_best)])
    # run b has one extra image (not common) and misses none
    b = make_run(tmp_path, "e2", "imagenet_10img", "b",
                 [record(i, [1.0, v]) for i, v in enumerate(b_best)] + [record(50, [99.0])])
    ra, rb = pm.load_runs([a, b])
    c = pm.paired_comparison(ra, rb)
    d = np.array(b_best) - np.array(a_best)
    assert c["n"] == 7 and c["mean_diff"] == pytest.approx(d.mean())
    ref = wilcoxon(d)
    assert c["p_value"] == pytest.approx(ref.pvalue) and c["wilcoxon_stat"] == pytest.approx(ref.statistic)
    assert (c["wins"], c["losses"], c["ties"]) == (5, 1, 1)
    text = pm.comparison_tables([c])
    assert f"{d.mean():+.2f}" in text and f"p={ref.pvalue:.3g}" in text and "5/1/1" in text
    assert "| 2 | 15.00 | 19.00 | +4.00 |" in text


def test_paired_comparison_degenerate_cases(tmp_path):
    a = make_run(tmp_path, "e", "imagenet_1img", "a", [record(0, [10.0]), record(1, [12.0])])
    same = make_run(tmp_path, "f", "imagenet_1img", "same", [record(0, [10.0]), record(1, [12.0])])
    one = make_run(tmp_path, "g", "imagenet_1img", "one", [record(1, [13.0]), record(7, [1.0])])
    none = make_run(tmp_path, "h", "imagenet_1img", "none", [record(5, [13.0])])
    ra, rs, ro, rn = pm.load_runs([a, same, one, none])
    c = pm.paired_comparison(ra, rs)
    assert c["p_value"] is None and c["test_note"] == "all differences 0" and c["mean_diff"] == 0.0
    c = pm.paired_comparison(ra, ro)
    assert c["n"] == 1 and c["p_value"] is None and "n=1" in c["test_note"] and c["mean_diff"] == pytest.approx(1.0)
    c = pm.paired_comparison(ra, rn)
    assert c["n"] == 0 and c["mean_diff"] is None
    assert "n/a (n=0 < 2)" in pm.comparison_tables([c])


def test_cli_csv_and_plots(two_runs, tmp_path, capsys):
    out_csv, plots = tmp_path / "out" / "t.csv", tmp_path / "plots"
    pattern = str(tmp_path / "exp*" / "*" / "*")
    assert pm.main([pattern, "--csv", str(out_csv), "--plots", str(plots)]) == 0
    stdout = capsys.readouterr().out
    assert "## Summary" in stdout and "## Per image" in stdout and "## Paired comparisons" in stdout
    rows = list(csv.DictReader(out_csv.open()))
    assert len(rows) == 4 and rows[0]["run"] == "exp0_baseline/imagenet_1img/a"
    assert float(rows[0]["best_psnr"]) == 40.0 and rows[0]["particle_psnr"] == "10.0000;20.0000;30.0000;40.0000"
    srows = list(csv.DictReader((tmp_path / "out" / "t_summary.csv").open()))
    assert float(srows[0]["best_psnr_mean"]) == pytest.approx(29.0)
    assert math.isclose(float(srows[0]["success_ci_low"]), wilson_ci(1, 2)[0])
    for name in ("best_psnr_per_image.png", "repulsion_distance.png", "repulsion_ratio.png",
                 "repulsion_ratio_at_sigma.png"):
        p = plots / name
        assert p.is_file() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    # brief: no per-image tables
    assert pm.main([pattern, "--brief"]) == 0
    assert "## Per image" not in capsys.readouterr().out


def test_cli_nothing_found(tmp_path, capsys):
    assert pm.main([str(tmp_path / "nope*")]) == 2
    assert "no run folder" in capsys.readouterr().err


def test_toy_run_folder(tmp_path):
    """A real toy run's metrics.json (pipeline format) parses and reproduces its stored summary."""
    from tests.conftest import TINY, compose
    from cores.pipeline import run

    cfg = compose(TINY + ["sampler.annealing.num_steps=3", "sampler.mcmc.num_steps=2",
                         f"save_dir={tmp_path}/exp0_baseline/demo_2img", "name=r"])
    metrics = run(cfg)
    (r,) = pm.load_runs(pm.find_run_dirs([str(tmp_path)]))
    s = metrics["summary"]
    assert r.label == "exp0_baseline/demo_2img/r"
    assert r.summary["best_psnr"] == s["best_psnr"]
    assert column(pm.summary_table([r]), pm.BEST_PSNR_ROW) == [
        f"{s['best_psnr']['mean']:.2f} ± {s['best_psnr']['std']:.2f}"]
    # ± as DAPS: across images ddof 0 (np.std), within an image (the particles' spread) ddof 1
    best = [rec["psnr"][rec["best_idx"]] for rec in metrics["images"]]
    assert s["std_ddof"] == 0 and s["best_psnr"]["std"] == pytest.approx(np.std(best, ddof=0))
    assert s["best_psnr"]["std"] != pytest.approx(np.std(best, ddof=1))
    parts = [v for v in metrics["images"][0]["psnr"] if v is not None]
    assert pm.image_stats(metrics["images"][0])["std_psnr"] == pytest.approx(np.std(parts, ddof=1))
