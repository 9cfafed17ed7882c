"""Run-folder files: modes follow the umask, bad records are named once and redone, resume takes a
new batch_size, and grid_results.png explains itself (header, ids, PSNRs, marks, sharp tiles)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, compose
from test_resume import env1, per_image, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")

FEW = ["data.end_id=2", "sampler.annealing.num_steps=3", "sampler.mcmc.num_steps=2", "eval.lpips=false"]


def _run(overrides):
    from cores.pipeline import run

    return run(compose(overrides))


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    from cores.outputs import append_jsonl, save_png, write_json, write_text

    old = os.umask(umask)
    try:
        write_json(tmp_path / "a" / "metrics.json", {"x": 1})
        write_json(tmp_path / "a" / "metrics.json", {"x": 2})      # replacing keeps the umask mode
        write_text(tmp_path / "a" / "config.yaml", "x: 1\n")
        save_png(tmp_path / "a" / "s.png", np.zeros((4, 4, 3), np.uint8))
        append_jsonl(tmp_path / "a" / "log.jsonl", {"x": 1})
    finally:
        os.umask(old)
    files = sorted((tmp_path / "a").iterdir())
    assert [p.name for p in files] == ["config.yaml", "log.jsonl", "metrics.json", "s.png"]  # no temp leftovers
    assert {p.name: p.stat().st_mode & 0o777 for p in files} == {p.name: mode for p in files}
    assert json.loads((tmp_path / "a" / "metrics.json").read_text()) == {"x": 2}


def test_run_results_are_world_readable_with_umask_022(tmp_path):
    old = os.umask(0o022)
    try:
        _run(FEW + ["num_samples=2", f"save_dir={tmp_path}", "name=r"])
    finally:
        os.umask(old)
    root = tmp_path / "r"
    for p in [root / "metrics.json", root / "config.yaml", root / "grid_results.png",
              root / "records" / "00000.json", root / "samples" / "00000_sample00.png"]:
        assert p.stat().st_mode & 0o777 == 0o644, p


def _valid_record(idx: int) -> dict:
    return {"image_idx": idx, "particle_ids": [0, 1], "psnr": [20.0, 10.0], "ssim": [0.5, 0.4],
            "lpips": [None, None], "psnr_twin": [9.0, 11.0], "measurement_loss": [1.0, 2.0], "best_idx": 0,
            "selected_idx": 0, "success": True, "both_orientations": False, "saved_particles": []}


def test_bad_records_are_named_once_and_left_out(tmp_path, capfd):
    from cores.run_folder import RunFolder

    d = tmp_path / "records"
    d.mkdir()
    (d / "00000.json").write_text(json.dumps(_valid_record(0)))
    (d / "00001.json").write_text(json.dumps(_valid_record(1))[:40])             # truncated
    (d / "00002.json").write_text(json.dumps({k: v for k, v in _valid_record(2).items() if k != "image_idx"}))
    (d / "00003.json").write_text(json.dumps({**_valid_record(3), "psnr": [20.0]}))  # length mismatch
    (d / "00004.json").write_text(json.dumps({**_valid_record(5)}))                 # wrong file
    (d / "00006.json").write_text(json.dumps({**_valid_record(6), "best_idx": 7}))  # index out of range
    (d / "00007.json").write_text("[1, 2]")
    folder = RunFolder(tmp_path)
    for _ in range(3):  # read many times per run: still one line per bad file
        assert [r["image_idx"] for r in folder.records()] == [0]
        assert folder.finished_images() == [0]
    folder.write_metrics({})
    folder.write_grid(8)
    out, err = capfd.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 6 and all(line.startswith("warning: ignoring record ") for line in lines)
    for name, why in [("00001", "not valid JSON"), ("00002", "missing image_idx"), ("00003", "bad psnr"),
                      ("00004", "does not match"), ("00006", "bad best_idx"), ("00007", "not a JSON object")]:
        assert sum(str(d / f"{name}.json") in line and why in line for line in lines) == 1, (name, lines)


def test_corrupt_records_resume_with_one_warning_each(tmp_path):
    """Drives the entry point: a truncated record and one without image_idx are each named in one
    stderr line, their images are redone (bit-identically), nothing else is touched."""
    args = [sys.executable, "posterior_sample.py", *FEW, f"save_dir={tmp_path}", "name=c"]
    first = subprocess.run(args, cwd=ROOT, env=env1(), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    root = tmp_path / "c"
    want = per_image(json.loads((root / "metrics.json").read_text()))
    r0, r1 = root / "records" / "00000.json", root / "records" / "00001.json"
    r0.write_text(r0.read_text()[:100])
    rec1 = json.loads(r1.read_text())
    del rec1["image_idx"]
    r1.write_text(json.dumps(rec1))
    again = subprocess.run(args + ["resume=true"], cwd=ROOT, env=env1(), capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Traceback" not in again.stderr and "warning" not in again.stdout
    warned = [line for line in again.stderr.splitlines() if line.startswith("warning: ignoring record")]
    assert len(warned) == 2
    assert sum(str(r0) in w and "not valid JSON" in w for w in warned) == 1
    assert sum(str(r1) in w and "missing image_idx" in w for w in warned) == 1
    got = json.loads((root / "metrics.json").read_text())
    assert per_image(got) == want
    assert json.loads(r1.read_text())["image_idx"] == 1 and json.loads(r0.read_text())["image_idx"] == 0


def test_resume_accepts_a_new_batch_size(tmp_path):
    """Per-particle streams make results independent of batching, so resume may change batch_size."""
    base = FEW[1:] + ["num_samples=2", f"save_dir={tmp_path}"]
    _run(base + ["data.end_id=2", "batch_size=1", "name=b"])
    root = tmp_path / "b"
    kept = snapshot(root, [0, 1])
    got = _run(base + ["data.end_id=4", "batch_size=3", "resume=true", "name=b"])
    assert snapshot(root, [0, 1]) == kept
    ref = _run(base + ["data.end_id=4", "batch_size=2", "name=ref"])
    assert per_image(got) == per_image(ref)
    from cores.pipeline import ConfigError

    with pytest.raises(ConfigError, match="num_samples"):  # other keys are still checked
        _run(base + ["data.end_id=4", "batch_size=3", "resume=true", "name=b", "num_samples=3"])


def _find(grid: np.ndarray, tile: np.ndarray, x: int) -> int:
    """Row where `tile` sits exactly at column x (-1 if nowhere)."""
    h = tile.shape[0]
    for y in range(grid.shape[0] - h + 1):
        if np.array_equal(grid[y:y + h, x:x + tile.shape[1]], tile):
            return y
    return -1


def test_grid_has_header_labels_marks_and_sharp_tiles(tmp_path):
    from cores.outputs import GRID_BACKGROUND, GRID_MARGIN, MARK_COLOURS, upscale_nearest

    _run(FEW + ["num_samples=3", f"save_dir={tmp_path}", "name=g"])
    root = tmp_path / "g"
    grid = np.asarray(Image.open(root / "grid_results.png").convert("RGB"))
    gt0 = np.asarray(Image.open(root / "gt" / "00000.png").convert("RGB"))
    scale = max(1, 128 // gt0.shape[0])
    assert scale == 2                                          # 64-px toy tiles, enlarged ×2
    y0 = _find(grid, upscale_nearest(gt0, scale), GRID_MARGIN)  # nearest-neighbour: an exact copy
    assert y0 > 2 * GRID_MARGIN, "no header row above the first tile"
    header = grid[:y0 - GRID_MARGIN]
    assert (header != GRID_BACKGROUND).any(axis=-1).mean() > 0.005   # text in the header band
    assert (header.min(axis=-1) < 100).any()
    # text (the image id) under the gt tile
    below = grid[y0 + gt0.shape[0] * scale: y0 + gt0.shape[0] * scale + 16, GRID_MARGIN:GRID_MARGIN + 100]
    assert (below.min(axis=-1) < 100).any()
    # the measurement tile is the saved log-amplitude view, not an almost black square
    meas = np.asarray(Image.open(root / "measurement" / "00000.png").convert("RGB"))
    assert meas.mean() > 40
    # every saved particle appears, sharp, and the best particle of each image is framed
    rec = json.loads((root / "records" / "00000.json").read_text())
    for p in rec["saved_particles"]:
        tile = upscale_nearest(np.asarray(Image.open(root / "samples" / f"00000_sample{p:02d}.png").convert("RGB")),
                               scale)
        assert any(_find(grid[y0:y0 + tile.shape[0]], tile, x) == 0 for x in range(grid.shape[1] - tile.shape[1]))
    colours = {tuple(c) for c in grid.reshape(-1, 3)[::1]}
    assert MARK_COLOURS["best"] in colours and MARK_COLOURS["selected"] in colours


def test_grid_caption_shows_twin_psnr_when_higher():
    """Captions carry the id and PSNR, and the twin PSNR only where it is higher."""
    from cores.run_folder import particle_caption

    rec = _valid_record(0)
    assert particle_caption(rec, 0) == (["p0  20.00 dB", "best, selected"], ["best", "selected"])
    assert particle_caption(rec, 1) == (["p1  10.00 dB", "twin 11.00 dB"], [])
    assert particle_caption({**rec, "psnr": [None, 10.0], "best_idx": 1}, 0) == (
        ["p0  n/a", "twin 9.00 dB", "selected"], ["selected"])
