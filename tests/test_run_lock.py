"""One writer per run folder: a second process of the same shard is refused in one line naming the
holder (exit 2); shards of one run still fill one folder together; a dead holder never blocks."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from conftest import ROOT, compose
from test_resume import env1

pytestmark = pytest.mark.usefixtures("one_thread")

FEW = ["data.end_id=2", "num_samples=2", "sampler.annealing.num_steps=3", "sampler.mcmc.num_steps=2",
       "eval.lpips=false"]


def test_lock_names_the_holder_and_allows_other_shards(tmp_path):
    from cores.errors import ConfigError
    from cores.lock import RunLock

    with RunLock(tmp_path, 0, 1):
        with pytest.raises(ConfigError) as err:
            RunLock(tmp_path, 0, 1).acquire()
        msg = str(err.value)
        assert f"pid {os.getpid()} on host {socket.gethostname()}" in msg and "\n" not in msg
        with pytest.raises(ConfigError, match="another sharding"):  # another split of the images
            RunLock(tmp_path, 1, 2).acquire()
    with RunLock(tmp_path, 0, 2), RunLock(tmp_path, 1, 2):  # shards of one run side by side
        with pytest.raises(ConfigError, match=r"\.lock\.shard1of2"):
            RunLock(tmp_path, 1, 2).acquire()
        with pytest.raises(ConfigError, match="another sharding"):
            RunLock(tmp_path, 0, 1).acquire()
    with RunLock(tmp_path, 0, 1):  # released: free again
        pass


def test_lock_file_of_a_dead_process_does_not_block(tmp_path):
    from cores.lock import RunLock

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / ".lock").write_text(f"pid {dead.stdout.strip()} on host {socket.gethostname()} since earlier\n")
    with RunLock(tmp_path, 0, 1):
        assert f"pid {os.getpid()}" in (tmp_path / ".lock").read_text()


def test_run_into_a_locked_folder_is_refused_and_leaves_it_alone(tmp_path):
    from cores.errors import ConfigError
    from cores.lock import RunLock
    from cores.pipeline import run

    with RunLock(tmp_path / "run", 0, 1):
        with pytest.raises(ConfigError, match=f"pid {os.getpid()}"):
            run(compose(FEW + [f"save_dir={tmp_path}", "name=run"]))
    assert not (tmp_path / "run" / "config.yaml").exists()
    assert not (tmp_path / "run" / "records").exists()
    run(compose(FEW + [f"save_dir={tmp_path}", "name=run"]))  # free again once the holder is gone


def _start(args):
    return subprocess.Popen([sys.executable, "posterior_sample.py", *args], cwd=ROOT, env=env1(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_processes_started_together_with_different_seeds(tmp_path):
    """Exactly one writes the folder; config.yaml names the seed of the one that did."""
    slow = ["data.end_id=3", "num_samples=2", "sampler.annealing.num_steps=20", "sampler.mcmc.num_steps=4",
            "eval.lpips=false", f"save_dir={tmp_path}", "name=both"]
    procs = {seed: _start(slow + [f"seed={seed}"]) for seed in (7, 42)}
    out = {seed: p.communicate(timeout=600) for seed, p in procs.items()}
    codes = {seed: p.returncode for seed, p in procs.items()}
    assert sorted(codes.values()) == [0, 2], {s: o[1][-1500:] for s, o in out.items()}
    winner = next(s for s, c in codes.items() if c == 0)
    loser = next(s for s, c in codes.items() if c == 2)
    lines = out[loser][1].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in out[loser][1]
    assert "is being written by pid" in lines[0] or "already holds results" in lines[0], lines
    cfg = (tmp_path / "both" / "config.yaml").read_text()
    assert f"seed: {winner}\n" in cfg
    metrics = json.loads((tmp_path / "both" / "metrics.json").read_text())
    assert sorted(r["image_idx"] for r in metrics["images"]) == [0, 1, 2]


def test_two_shards_started_together_fill_one_folder(tmp_path):
    base = ["data.end_id=4", "num_samples=2", "sampler.annealing.num_steps=6", "sampler.mcmc.num_steps=2",
            "eval.lpips=false", "num_shards=2", f"save_dir={tmp_path}", "name=shards"]
    procs = [_start(base + [f"shard={k}"]) for k in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
    root = tmp_path / "shards"
    assert sorted(p.name for p in (root / "records").iterdir()) == [f"{i:05d}.json" for i in range(4)]
    metrics = json.loads((root / "metrics.json").read_text())
    assert sorted(r["image_idx"] for r in metrics["images"]) == [0, 1, 2, 3]
