"""Every way a run stops is one stderr line with its exit code (2 bad input, 1 runtime failure,
130 Ctrl-C), the finished count and the command that continues; nothing already written is lost."""
from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, compose
from test_resume import env1

pytestmark = pytest.mark.usefixtures("one_thread")

FEW = ["num_samples=2", "sampler.annealing.num_steps=2", "sampler.mcmc.num_steps=1", "eval.lpips=false",
       "batch_size=1"]


def sha256s(root: Path, images) -> dict:
    """sha256 of every file that belongs to the given images."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*")
            if p.is_file() and any(p.name.startswith(f"{i:05d}") for i in images)}


def messages(err: str) -> list:
    """stderr without the progress bar's redraws (tqdm rewrites its line with carriage returns)."""
    return [l for l in err.splitlines() if l.strip() and "img·step" not in l]


def guarded(overrides, capfd):
    from cores.cli import run_guarded

    argv = ["posterior_sample.py", *overrides]
    code = run_guarded(compose(overrides), argv)
    return code, capfd.readouterr().err


def test_disk_full_mid_run_is_one_line_and_keeps_finished_images(tmp_path, monkeypatch, capfd):
    import cores.outputs as outputs
    from cores.pipeline import run

    args = FEW + [f"save_dir={tmp_path}", "name=full"]
    run(compose(args + ["data.end_id=1"]))
    root = tmp_path / "full"
    before = sha256s(root, [0])
    assert "records/00000.json" in before
    real = outputs.atomic_write_bytes

    def no_space(path, data):
        if Path(path).name == "00002.json":  # the disk fills while image 2 is written
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, data)

    monkeypatch.setattr(outputs, "atomic_write_bytes", no_space)
    capfd.readouterr()
    code, err = guarded(args + ["data.end_id=3", "resume=true"], capfd)
    lines = messages(err)
    assert code == 1, err
    assert len(lines) == 1 and lines[0].startswith("error: No space left on device"), lines
    assert "00002.json" in lines[0] and "2 image(s) finished" in lines[0]
    assert lines[0].endswith("resume=true") and sys.executable in lines[0]
    assert sha256s(root, [0]) == before, "a finished image changed"
    assert not list(root.rglob("*.tmp")), "a half-written file was left behind"
    monkeypatch.setattr(outputs, "atomic_write_bytes", real)
    done = run(compose(args + ["data.end_id=3", "resume=true"]))
    assert [r["image_idx"] for r in done["images"]] == [0, 1, 2]
    assert sha256s(root, [0]) == before


@pytest.mark.parametrize("error", [
    MemoryError(),
    RuntimeError("[enforce fail at alloc_cpu.cpp:118] data. DefaultCPUAllocator: can't allocate memory: you "
                 "tried to allocate 1073741824000 bytes. Error code 12 (Cannot allocate memory)"),
    RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB"),
])
def test_out_of_memory_is_one_line_with_the_resume_command(tmp_path, monkeypatch, capfd, error):
    import cores.pipeline as pipeline

    def boom(*a, **k):
        raise error

    monkeypatch.setattr(pipeline, "latent_daps", boom)
    code, err = guarded(FEW + ["data.end_id=1", f"save_dir={tmp_path}", "name=oom"], capfd)
    lines = messages(err)
    assert code == 1 and len(lines) == 1, err
    assert lines[0].startswith("error: out of memory") and "batch_size or num_samples" in lines[0]
    assert "0 image(s) finished" in lines[0] and lines[0].endswith("resume=true")


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch, capfd):
    import cores.pipeline as pipeline

    def bug(*a, **k):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(pipeline, "latent_daps", bug)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        guarded(FEW + ["data.end_id=1", f"save_dir={tmp_path}", "name=bug"], capfd)


def entry(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "posterior_sample.py", *args], cwd=ROOT, env=env1(),
                          capture_output=True, text=True, **kw)


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="no /proc")
def test_save_dir_under_proc_is_one_line():
    res = entry("save_dir=/proc/results", "name=x")
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: save_dir=/proc/results") and "Traceback" not in res.stderr


@pytest.mark.parametrize("name", ["", ".", "../x", "a/../../x", "/tmp/abs"])
def test_run_name_must_stay_inside_save_dir(tmp_path, name):
    from cores.errors import ConfigError
    from cores.validation import check_run_name

    with pytest.raises(ConfigError, match="name="):
        check_run_name(name)
    check_run_name("a/b")  # nested folders are fine


def test_bad_name_is_refused_before_anything_is_written(tmp_path):
    save = tmp_path / "save"
    res = entry(f"save_dir={save}", "name=../outside")
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        "error: name=../outside: must be a relative path inside save_dir (no leading /, no ..)"]
    res = entry(f"save_dir={save}", "name=")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and "non-empty" in res.stderr
    assert not (tmp_path / "outside").exists() and not save.exists()


def test_refused_config_leaves_no_hydra_logs(tmp_path):
    res = entry("num_samples=2", "pruning_step=1", "pruning_keep=2", f"save_dir={tmp_path / 'new'}", "name=a/b")
    assert res.returncode == 2
    assert not (tmp_path / "new").exists()
    existing = tmp_path / "old"
    (existing / "a").mkdir(parents=True)
    res = entry("num_samples=2", "pruning_step=1", "pruning_keep=2", f"save_dir={existing}", "name=a")
    assert res.returncode == 2 and sorted(p.name for p in existing.rglob("*")) == ["a"]


@pytest.mark.parametrize("delay", [0.2, 0.6, 1.0, 1.5, 2.5])
def test_ctrl_c_during_start_up_is_one_line_exit_130(tmp_path, delay):
    """SIGINT at several moments of start-up (imports, Hydra, config checks): exit 130, one line.
    The child gets SIGINT's default action back, whatever the parent (a background job of a
    non-interactive shell ignores SIGINT, and children inherit that)."""
    proc = subprocess.Popen([sys.executable, "posterior_sample.py", f"save_dir={tmp_path}", "name=c",
                             "data.end_id=1", "eval.lpips=false"], cwd=ROOT, env=env1(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
    _, err = proc.communicate()
    if proc.returncode == 0:  # finished before the signal (a fast machine): nothing to check
        pytest.skip("the run ended before the signal")
    lines = messages(err)
    assert proc.returncode == 130, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("interrupted:") and "Traceback" not in err, err


def test_resume_on_a_new_folder_says_so_and_runs(tmp_path, capfd):
    from cores.pipeline import run

    got = run(compose(FEW + ["data.end_id=1", f"save_dir={tmp_path}", "name=typo", "resume=true"]))
    assert len(got["images"]) == 1
    err = [l for l in capfd.readouterr().err.splitlines() if l.startswith("warning:")]
    assert len(err) == 1 and "resume=true" in err[0] and "typo" in err[0] and "new" in err[0]
    run(compose(FEW + ["data.end_id=2", f"save_dir={tmp_path}", "name=typo", "resume=true"]))
    assert not [l for l in capfd.readouterr().err.splitlines() if "holds no run" in l]


@pytest.mark.parametrize("bad,needle", [(["task.sigma=-0.1"], "task.sigma=-0.1"),
                                        (["task.sigma=.nan"], "task.sigma"),
                                        (["repulsion_scale=10", "num_samples=1"], "num_samples >= 2"),
                                        (["repulsion_target_ratio=0.5", "num_samples=1"], "repulsion_target_ratio")])
def test_small_settings_are_refused_in_one_line(tmp_path, bad, needle):
    from cores.errors import ConfigError
    from cores.pipeline import run

    with pytest.raises(ConfigError) as err:
        run(compose(FEW + ["data.end_id=1", f"save_dir={tmp_path}", "name=s"] + bad))
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "s").exists()


def test_toy_prior_warns_once_on_images_it_does_not_know(tmp_path, capfd):
    import shutil

    import numpy as np
    from PIL import Image

    from cores.pipeline import run

    own = FEW + ["data.end_id=2", f"save_dir={tmp_path}"]
    run(compose(own + ["name=own"]))
    assert "toy prior" not in capfd.readouterr().err
    d = tmp_path / "mine"
    d.mkdir()
    for i in range(2):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(d / f"{i}.png")
    shutil.copy(ROOT / "dataset" / "demo-ffhq" / "00000.png", d / "2.png")
    run(compose(own + ["data.end_id=3", f"data.root={d}", "name=mine"]))
    warned = [l for l in capfd.readouterr().err.splitlines() if "toy prior" in l]
    assert len(warned) == 1 and warned[0].startswith("warning: ") and "0.png" in warned[0]
