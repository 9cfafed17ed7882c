"""Resume: kill -9 at any moment leaves a folder `resume=true` finishes with the same results;
finished images are never rewritten; config changes and clobbering runs are refused."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest

from conftest import ROOT, compose


pytestmark = pytest.mark.usefixtures("one_thread")

# Per-image metrics that must not depend on interruption, resumption or process layout.
METRIC_KEYS = ("particle_ids", "psnr", "ssim", "psnr_twin", "measurement_loss", "best_idx", "selected_idx",
               "success", "both_orientations", "non_finite_particles", "nan_events")
# Slow enough per image (~0.5 s) that the kill lands while the next image is in flight.
KILL_RUN = ["sampler.annealing.num_steps=10", "sampler.mcmc.num_steps=8", "num_samples=4", "batch_size=1",
            "data.end_id=5", "eval.lpips=false"]


def env1() -> Dict[str, str]:
    """One thread everywhere: float reductions then do not depend on the process layout."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def launch(overrides: List[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "posterior_sample.py", *overrides], cwd=ROOT, env=env1(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def per_image(metrics: Dict) -> Dict[int, Dict]:
    return {r["image_idx"]: {k: r.get(k) for k in METRIC_KEYS} for r in metrics["images"]}


def snapshot(root: Path, images: List[int]) -> Dict[str, tuple]:
    """(bytes, mtime_ns) of every file that belongs to the given images."""
    out = {}
    for p in root.rglob("*"):
        if p.is_file() and any(p.name.startswith(f"{i:05d}") for i in images) and ".hydra" not in str(p):
            out[str(p.relative_to(root))] = (p.read_bytes(), p.stat().st_mtime_ns)
    return out


def finished(root: Path) -> List[int]:
    d = root / "records"
    return sorted(int(p.stem) for p in d.glob("*.json")) if d.is_dir() else []


def kill_after(proc: subprocess.Popen, root: Path, n_records: int) -> None:
    """SIGKILL once `n_records` records exist (no time limit: the run either writes them or ends)."""
    while len(finished(root)) < n_records:
        assert proc.poll() is None, f"run ended before it could be killed: {proc.communicate()[1][-2000:]}"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def test_kill9_then_resume_matches_uninterrupted_run(tmp_path):
    ref = launch(KILL_RUN + [f"save_dir={tmp_path}", "name=ref"])
    victim_args = KILL_RUN + [f"save_dir={tmp_path}", "name=victim"]
    root = tmp_path / "victim"
    # kill twice at different moments, resuming in between
    kill_after(launch(victim_args), root, 1)
    first = finished(root)
    assert 1 <= len(first) < 5
    kept = snapshot(root, first)
    assert any(k.startswith("samples/") for k in kept) and any(k.startswith("records/") for k in kept)
    kill_after(launch(victim_args + ["resume=true"]), root, len(first) + 1)
    second = finished(root)
    assert snapshot(root, first) == kept, "a finished image was rewritten by the resumed run"
    kept2 = snapshot(root, second)
    done = launch(victim_args + ["resume=true"])
    out, err = done.communicate(timeout=300)
    assert done.returncode == 0, err[-3000:]
    assert ref.wait(timeout=300) == 0, ref.communicate()[1][-3000:]
    assert snapshot(root, second) == kept2
    got = json.loads((root / "metrics.json").read_text())
    want = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    assert sorted(per_image(got)) == [0, 1, 2, 3, 4]
    assert per_image(got) == per_image(want)
    assert got["summary"]["num_images"] == 5
    assert got["summary"]["best_psnr"] == want["summary"]["best_psnr"]
    assert sorted(p.name for p in (root / "samples").iterdir()) == sorted(
        p.name for p in (tmp_path / "ref" / "samples").iterdir())


def _run(overrides):
    from cores.pipeline import run

    return run(compose(overrides))


def test_config_change_refused_with_keys_and_nothing_touched(tiny_overrides, tmp_path):
    from cores.pipeline import ConfigError

    _run(tiny_overrides)
    root = tmp_path / "run"
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError) as err:
        _run(tiny_overrides + ["resume=true", "sampler.mcmc.lr=1e-4", "seed=3"])
    msg = str(err.value)
    assert "sampler.mcmc.lr" in msg and "seed" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match="already holds results for image"):
        _run(tiny_overrides)  # same config, no resume: would clobber finished images
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}
    assert after == before


def test_resume_skips_complete_redoes_incomplete_and_rebuilds_metrics(tiny_overrides, tmp_path):
    first = _run(tiny_overrides + ["data.end_id=3"])
    root = tmp_path / "run"
    keep0 = snapshot(root, [0])
    (root / "samples" / "00001_sample01.png").unlink()  # image 1 incomplete → redone
    (root / "metrics.json").unlink()
    # the image range may change on resume (extends the run by image 3... here 2 is already done)
    again = _run(tiny_overrides + ["data.end_id=4", "resume=true"])
    assert snapshot(root, [0]) == keep0
    assert (root / "samples" / "00001_sample01.png").exists()
    assert [r["image_idx"] for r in again["images"]] == [0, 1, 2, 3]
    assert per_image(again)[1] == per_image(first)[1]
    on_disk = json.loads((root / "metrics.json").read_text())
    assert per_image(on_disk) == per_image(again)


def test_other_shards_share_a_folder_without_resume(tiny_overrides, tmp_path):
    from cores.pipeline import ConfigError

    a = _run(tiny_overrides + ["data.end_id=4", "shard=0", "num_shards=2"])
    assert [r["image_idx"] for r in a["images"]] == [0, 1]
    b = _run(tiny_overrides + ["data.end_id=4", "shard=1", "num_shards=2"])
    assert [r["image_idx"] for r in b["images"]] == [0, 1, 2, 3]
    with pytest.raises(ConfigError, match="image\\(s\\) 2, 3"):
        _run(tiny_overrides + ["data.end_id=4", "shard=1", "num_shards=2"])
    with pytest.raises(ConfigError, match="num_samples"):  # another shard with other settings
        _run(tiny_overrides + ["data.end_id=6", "shard=2", "num_shards=3", "num_samples=3"])


def test_read_jsonl_latest_keeps_the_redo(tmp_path):
    from cores.resume import read_jsonl_latest

    p = tmp_path / "repulsion.jsonl"
    lines = [{"image_idx": 0, "step": 0, "v": "old"}, {"image_idx": 0, "step": 1, "v": "old"},
             {"image_idx": 1, "step": 0, "v": "only"},
             {"image_idx": 0, "step": 0, "v": "new"}, {"image_idx": 0, "step": 1, "v": "new"}]
    p.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"image_idx": 0, "st')  # torn tail
    got = read_jsonl_latest(p)
    assert [(r["image_idx"], r["step"], r["v"]) for r in got] == [(1, 0, "only"), (0, 0, "new"), (0, 1, "new")]
    assert [r["v"] for r in read_jsonl_latest(p, images=[1])] == ["only"]
    per_image_log = tmp_path / "pruning.jsonl"  # one line per image: keyed by image_idx alone
    per_image_log.write_text('{"image_idx": 2, "k": 1}\n{"image_idx": 2, "k": 2}\n')
    assert [r["k"] for r in read_jsonl_latest(per_image_log)] == [2]
