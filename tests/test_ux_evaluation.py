"""Orientation at any PSNR, the best PSNR of either orientation, the loss unit, the console summary
and the offline LPIPS message."""
from __future__ import annotations

import math
import sys

import pytest
import torch

from conftest import ROOT


def _demo(resolution: int = 64) -> torch.Tensor:
    from cores.data import load_image

    return load_image(ROOT / "dataset" / "demo-ffhq" / "00000.png", resolution)


def test_orientation_rule():
    from cores.evaluation import orientation

    assert orientation(30.0, 10.0, 1.0) == "gt"
    assert orientation(10.0, 11.0, 1.0) == "twin"       # exactly the margin counts
    assert orientation(10.0, 10.9, 1.0) == "unclear"
    assert orientation(10.0, 10.9, 0.5) == "twin"
    assert orientation(None, 10.0, 1.0) == "unclear"
    assert orientation(float("nan"), 10.0, 1.0) == "unclear"
    assert orientation(12.0, float("inf"), 1.0) == "unclear"


def test_image_record_orientation_on_real_images():
    """gt and its 180° rotation are told apart at any PSNR; a constant image is equally far from both."""
    from cores.evaluation import image_record

    gt = _demo()
    twin = gt.flip(-2, -1)
    faint_twin = 0.3 * twin                              # far below 20 dB, still closer to the twin
    samples = torch.stack([gt + 0.01 * torch.randn_like(gt), faint_twin, torch.zeros_like(gt),
                           torch.full_like(gt, float("nan"))])
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0])
    rec = image_record(7, samples, gt, losses, [0, 1, 2, 3], success_psnr=20.0, use_lpips=False,
                       orientation_margin_db=1.0, measurement_numel=3 * 96 * 96)
    assert rec["psnr_twin"][1] < 20.0 and rec["psnr_twin"][1] > rec["psnr"][1] + 1
    assert rec["orientation"] == ["gt", "twin", "unclear", "unclear"]
    assert rec["orientations_found"] == ["gt", "twin", "unclear"]
    assert rec["correct_orientation_found"] is True and rec["both_orientations_any"] is True
    # the thresholded fields are unchanged: the twin is below 20 dB
    assert rec["success"] is True and rec["both_orientations"] is False
    assert rec["best_psnr_any_orientation"] == pytest.approx(max(rec["psnr"][0], rec["psnr_twin"][0]))
    assert rec["measurement_loss_mse"] == pytest.approx([v / (3 * 96 * 96) for v in (1.0, 2.0, 3.0, 4.0)])
    assert "sum" in rec["measurement_loss_unit"]

    only_twin = image_record(8, twin[None], gt, torch.tensor([1.0]), [0], 20.0, use_lpips=False)
    assert only_twin["orientation"] == ["twin"] and only_twin["correct_orientation_found"] is False
    assert only_twin["success"] is False
    assert only_twin["best_psnr_any_orientation"] > 40 and only_twin["psnr"][0] < 20
    assert "measurement_loss_mse" not in only_twin                 # only when the size is known


def _rec(idx, psnr, twin, margin=1.0):
    from cores.evaluation import orientation

    o = [orientation(p, t, margin) for p, t in zip(psnr, twin)]
    best = max(range(len(psnr)), key=lambda i: psnr[i])
    return {"image_idx": idx, "particle_ids": list(range(len(psnr))), "psnr": psnr, "ssim": [0.5] * len(psnr),
            "lpips": [None] * len(psnr), "psnr_twin": twin, "measurement_loss": [1.0] * len(psnr),
            "best_idx": best, "selected_idx": 0, "success": max(psnr) >= 20, "both_orientations": False,
            "non_finite_particles": [], "time_sec": 1.0, "orientation": o, "orientation_margin_db": margin,
            "orientations_found": sorted(set(o)), "correct_orientation_found": "gt" in o,
            "both_orientations_any": "gt" in o and "twin" in o,
            "best_psnr_any_orientation": max(max(p, t) for p, t in zip(psnr, twin))}


def test_summary_orientation_block_and_any_orientation():
    from cores.evaluation import summarize, wilson_ci

    images = [_rec(0, [15.0, 9.0], [10.0, 14.0]),      # gt + twin
              _rec(1, [8.07, 8.0], [35.0, 8.2]),       # twin + unclear (the "twin read as failure" case)
              _rec(2, [12.0, 12.5], [12.2, 12.1])]     # unclear, unclear
    s = summarize(images)
    o = s["orientation"]
    assert o["num_images"] == 3 and o["margin_db"] == 1.0 and o["num_particles"] == 6
    assert o["correct_orientation_found_rate"] == pytest.approx(1 / 3)
    assert o["correct_orientation_found_rate_ci95"] == wilson_ci(1, 3)
    assert o["both_orientations_any_rate"] == pytest.approx(1 / 3)
    assert o["both_orientations_any_rate_ci95"] == wilson_ci(1, 3)
    assert o["particle_fraction"] == pytest.approx({"gt": 1 / 6, "twin": 2 / 6, "unclear": 3 / 6})
    assert s["best_psnr"]["mean"] == pytest.approx((15.0 + 8.07 + 12.5) / 3)
    assert s["best_psnr_any_orientation"]["mean"] == pytest.approx((15.0 + 35.0 + 12.5) / 3)
    assert s["best_psnr_twin"]["mean"] == pytest.approx((14.0 + 35.0 + 12.2) / 3)
    assert s["success_rate"] == 0.0 and s["both_orientations_rate"] == 0.0  # thresholded fields as before
    # records written before orientation existed are left out of the block, not a crash
    old = {k: v for k, v in _rec(3, [30.0], [10.0]).items()
           if k not in ("orientation", "orientations_found", "correct_orientation_found",
                        "both_orientations_any", "best_psnr_any_orientation")}
    s2 = summarize(images + [old])
    assert s2["orientation"]["num_images"] == 3 and s2["num_images"] == 4


def test_console_summary_twin_columns_and_single_image():
    from cores.console import format_summary
    from cores.evaluation import summarize

    one = {"summary": summarize([_rec(1, [8.07, 8.0], [35.0, 8.2])])}
    text = format_summary(one, "results/x")
    assert "± 0.00" not in text and "8.07 ± n/a" in text and "35.00 ± n/a" in text
    assert "best twin PSNR" in text and "best PSNR any orient." in text
    assert "correct orient. found (any PSNR)" in text and "0% / 50% / 50%" in text
    assert "results/x" in text
    two = {"summary": summarize([_rec(0, [15.0, 9.0], [10.0, 14.0]), _rec(1, [8.07, 8.0], [35.0, 8.2])])}
    text2 = format_summary(two, "r")
    assert "± n/a" not in text2 and "| 50% [9%–91%] | 50% [9%–91%] |" in text2  # any-PSNR rates, Wilson CI
    old = {"summary": {k: v for k, v in summarize([_rec(0, [15.0], [10.0])]).items()
                       if k not in ("orientation", "best_psnr_twin", "best_psnr_any_orientation")}}
    assert "n/a" in format_summary(old, "r")                      # an older metrics.json still prints


def test_lpips_offline_prints_one_stderr_line(capfd, monkeypatch, tmp_path):
    """No backbone weights and no network: nothing on stdout (torch.hub's `Downloading:` line is
    swallowed), one warning line on stderr however often LPIPS is asked for, LPIPS is null."""
    import urllib.error

    import torch.hub

    from cores import console, evaluation

    def offline(*args, **kwargs):
        raise urllib.error.URLError("offline")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "urlopen", offline)
    monkeypatch.setattr(evaluation, "_LPIPS_STATE", {})
    monkeypatch.setattr(console, "_WARNED", set())
    gt = _demo()
    for _ in range(3):
        assert evaluation.lpips_distance(gt[None], gt) is None
    rec = evaluation.image_record(0, gt[None], gt, torch.tensor([0.0]), [0], 20.0, use_lpips=True)
    assert rec["lpips"] == [None]
    out, err = capfd.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: LPIPS unavailable") and "download.sh lpips" in lines[0]
    assert math.isfinite(rec["psnr"][0]) or rec["psnr"][0] is None


def test_warning_gets_its_own_line_under_a_progress_bar(capfd, monkeypatch):
    from tqdm import tqdm

    from cores import console

    monkeypatch.setattr(console, "_WARNED", set())
    with tqdm(total=4, file=sys.stderr, desc="run") as bar:
        bar.update(1)
        console.warn("first\nsecond", key="k")
        console.warn("again", key="k")
        bar.update(3)
    out, err = capfd.readouterr()
    assert out == ""
    lines = [line for line in err.replace("\r", "\n").splitlines() if "warning" in line]
    assert lines == ["warning: first second"]


def test_orientation_fields_on_a_toy_run_with_twins(tmp_path, one_thread):
    """Toy prior with the twins in it: every particle's label follows the rule from its two PSNRs,
    the per-image fields agree with the labels, and the summary counts them."""
    from cores.evaluation import orientation
    from cores.pipeline import run

    from conftest import compose

    m = run(compose(["model.include_twins=true", "num_samples=4", "data.end_id=3", "sampler.annealing.num_steps=6",
                     "sampler.mcmc.num_steps=3", "eval.lpips=false", f"save_dir={tmp_path}", "name=tw"]))
    labels = []
    for rec in m["images"]:
        want = [orientation(p, t, 1.0) for p, t in zip(rec["psnr"], rec["psnr_twin"])]
        assert rec["orientation"] == want
        assert rec["orientations_found"] == sorted(set(want))
        assert rec["correct_orientation_found"] == ("gt" in want)
        assert rec["both_orientations_any"] == ("gt" in want and "twin" in want)
        assert rec["best_psnr_any_orientation"] == max(max(p, t) for p, t in zip(rec["psnr"], rec["psnr_twin"]))
        labels += want
    o = m["summary"]["orientation"]
    assert o["num_particles"] == len(labels) == 12
    assert o["particle_fraction"] == {k: labels.count(k) / 12 for k in ("gt", "twin", "unclear")}
    assert o["correct_orientation_found_rate"] == sum(r["correct_orientation_found"] for r in m["images"]) / 3
    assert m["summary"]["best_psnr_any_orientation"]["mean"] >= m["summary"]["best_psnr"]["mean"]
    assert "gt" in labels and "twin" in labels  # the seed-42 run finds both modes


def test_one_final_progress_line_and_no_compile_of_the_toy_on_a_cpu(tmp_path):
    """A finished bar is not redrawn by a warning after it: its last state appears once, then one final
    line; `speed=fast` on the network-free toy prior compiles nothing (no torch log line, no compile time)."""
    import json
    import subprocess

    from conftest import ROOT

    res = subprocess.run([sys.executable, "posterior_sample.py", "speed=fast", "sampler.annealing.num_steps=3",
                          "sampler.mcmc.num_steps=2", "data.end_id=2", "batch_size=1", "eval.lpips=true",
                          f"save_dir={tmp_path}", "name=bar"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    pieces = res.stderr.replace("\r", "\n").splitlines()
    assert sum("6/6" in p for p in pieces) <= 1, res.stderr  # the finished bar is cleared, never redrawn
    assert [p for p in pieces if p.startswith("bar: 2 image(s), 6 img·step in ")] == pieces[-1:]
    assert not any(p.startswith(("W1", "W0", "I1", "I0")) or "cpp_extension" in p for p in pieces), res.stderr
    meta = json.loads((tmp_path / "bar" / "metrics.json").read_text())["metadata"]
    assert not meta.get("compile_sec")
