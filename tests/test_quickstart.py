"""The default job (README's first command) writes a complete run folder."""
import json
import subprocess
import sys

from conftest import ROOT


def test_default_job_writes_complete_metrics(tmp_path):
    proc = subprocess.run([sys.executable, "posterior_sample.py", f"save_dir={tmp_path}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = tmp_path / "default"
    m = json.loads((run / "metrics.json").read_text())
    assert [r["image_idx"] for r in m["images"]] == [0, 1, 2, 3]
    for rec in m["images"]:
        for key in ("psnr", "ssim", "lpips", "psnr_twin", "measurement_loss"):
            assert len(rec[key]) == 4, key
        assert rec["best_idx"] in range(4) and rec["selected_idx"] in range(4)
        assert rec["psnr"][rec["best_idx"]] == max(rec["psnr"])
        assert rec["measurement_loss"][rec["selected_idx"]] == min(rec["measurement_loss"])
        assert len(rec["timing"]["per_step_sec"]) == 50 and rec["time_sec"] > 0
        assert min(rec["psnr"]) > 30.0  # the toy prior is recovered (see PROJECT.md)
    s = m["summary"]
    for key in ("best_psnr", "mean_of_mean_psnr", "best_ssim_mean", "best_lpips_mean", "selected_psnr_mean",
                "success_rate", "both_orientations_rate", "total_time_sec", "time_per_image_sec"):
        assert key in s, key
    assert s["num_images"] == 4 and s["success_rate"] == 1.0
    assert set(m["vram"]) >= {"peak_memory_mb", "segments"} and m["vram"]["segments"] == {}
    assert set(m["metadata"]) >= {"gpu_name", "torch_version", "git_commit", "start_time", "end_time"}
    assert (run / "config.yaml").exists() and (run / "grid_results.png").exists()
    assert len(list((run / "samples").glob("*.png"))) == 16
    assert "best PSNR" in proc.stdout  # the summary table
