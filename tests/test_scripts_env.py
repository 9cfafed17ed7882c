"""The experiment scripts find the environment without activation ($PYTHON, else the repository's
.venv, else python3) and pass EXTRA_ARGS as the same words DRY_RUN prints."""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT

PLAIN_PATH = "/usr/local/bin:/usr/bin:/bin"
STUB = """#!/bin/sh
# records which interpreter was chosen and the words it got (NUL-separated)
printf '%s\\n' "$0" > "{out}.which"
: > "{out}"
for a in "$@"; do printf '%s\\0' "$a" >> "{out}"; done
"""


def words(out: Path) -> list:
    return out.read_text().split("\0")[:-1]


def stub(path: Path, out: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(STUB.format(out=out))
    path.chmod(0o755)
    return path


def script_copy(tmp_path: Path) -> Path:
    """The scripts alone in a folder laid out like the repository (no .venv yet)."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "commands_gpu", repo / "commands_gpu")
    return repo


def run(repo: Path, *flags: str, **env: str) -> subprocess.CompletedProcess:
    e = {"PATH": PLAIN_PATH, "HOME": os.environ.get("HOME", "/tmp"), **env}
    return subprocess.run(["bash", str(repo / "commands_gpu" / "exp0_baseline.sh"), *flags], env=e, cwd=repo,
                          capture_output=True, text=True, timeout=120)


def test_interpreter_lookup_order(tmp_path):
    repo = script_copy(tmp_path)
    out = tmp_path / "argv.json"
    bindir = tmp_path / "bin"
    stub(bindir / "python3", out)
    # no PYTHON, no .venv: python3 from PATH (not `python`, which a plain system may not have)
    res = run(repo, "--1", MODEL="toy", PATH=f"{bindir}:{PLAIN_PATH}")
    assert res.returncode == 0, res.stderr
    assert Path(f"{out}.which").read_text().strip() == str(bindir / "python3")
    # the repository's .venv, when present, wins over PATH
    venv_python = stub(repo / ".venv" / "bin" / "python", out)
    res = run(repo, "--1", MODEL="toy", PATH=f"{bindir}:{PLAIN_PATH}")
    assert res.returncode == 0, res.stderr
    assert Path(f"{out}.which").read_text().strip() == str(venv_python)
    # $PYTHON wins over both
    mine = stub(tmp_path / "mine" / "py", out)
    res = run(repo, "--1", MODEL="toy", PYTHON=str(mine), PATH=f"{bindir}:{PLAIN_PATH}")
    assert res.returncode == 0 and Path(f"{out}.which").read_text().strip() == str(mine)
    dry = run(repo, "--1", MODEL="toy", DRY_RUN="1", PATH=f"{bindir}:{PLAIN_PATH}")
    assert shlex.split(dry.stdout)[0] == str(venv_python)


def test_extra_args_are_the_words_dry_run_prints(tmp_path):
    repo = script_copy(tmp_path)
    out = tmp_path / "argv.json"
    py = stub(tmp_path / "bin" / "py", out)
    extra = """sampler.mcmc.num_steps=3 data.root='/tmp/my images' "eval.success_psnr=21" name=a\\ b"""
    dry = run(repo, "--1", MODEL="toy", DRY_RUN="1", PYTHON=str(py), EXTRA_ARGS=extra)
    assert dry.returncode == 0, dry.stderr
    printed = shlex.split(dry.stdout.strip())
    res = run(repo, "--1", MODEL="toy", PYTHON=str(py), EXTRA_ARGS=extra)
    assert res.returncode == 0, res.stderr
    got = words(out)
    assert printed[1:] == got
    assert got[-4:] == ["sampler.mcmc.num_steps=3", "data.root=/tmp/my images", "eval.success_psnr=21", "name=a b"]
    assert shlex.split(res.stderr.splitlines()[0][2:])[1:] == got  # the echoed "+ command" line too


def test_unbalanced_quotes_in_extra_args_are_one_line(tmp_path):
    repo = script_copy(tmp_path)
    res = run(repo, "--1", MODEL="toy", DRY_RUN="1", EXTRA_ARGS="name='oops")
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.strip().splitlines() == ["error: EXTRA_ARGS=name='oops: unbalanced quotes"]


@pytest.mark.skipif(not (ROOT / ".venv" / "bin" / "python").exists(), reason="no .venv in the repository")
def test_toy_script_runs_with_a_plain_path(tmp_path):
    """README's quick start made .venv; nothing is activated and `python` is not on PATH."""
    res = run(ROOT, "--1", MODEL="toy", SAVE_DIR=str(tmp_path), OMP_NUM_THREADS="1",
              EXTRA_ARGS="sampler.annealing.num_steps=2 sampler.mcmc.num_steps=1 eval.lpips=false num_samples=2")
    assert res.returncode == 0, res.stderr[-2000:]
    assert list(tmp_path.glob("exp0_baseline/*/*/metrics.json"))


def test_interpreter_without_the_packages_is_one_line():
    import sys

    res = subprocess.run([sys.executable, "-S", "posterior_sample.py"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env={"PATH": PLAIN_PATH})
    assert res.returncode == 2 and "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {sys.executable} has no module") and ".venv" in lines[0]


def test_resume_flag_continues_a_script_run(tmp_path):
    """`--resume` passes resume=true (before EXTRA_ARGS, which still win): a second run of the same flags
    continues the folder instead of being refused, and leaves the finished image as it was."""
    import sys

    dry = run(ROOT, "--1", "--resume", MODEL="toy", DRY_RUN="1", PYTHON=sys.executable, EXTRA_ARGS="seed=3")
    assert dry.returncode == 0 and dry.stdout.split()[-2:] == ["resume=true", "seed=3"], dry.stdout
    env = dict(MODEL="toy", SAVE_DIR=str(tmp_path), OMP_NUM_THREADS="1", PYTHON=sys.executable,
               EXTRA_ARGS="sampler.annealing.num_steps=2 sampler.mcmc.num_steps=1 eval.lpips=false num_samples=2")
    assert run(ROOT, "--1", **env).returncode == 0
    (record,) = tmp_path.glob("exp0_baseline/*/*/records/00000.json")
    before = (record.read_bytes(), record.stat().st_mtime_ns)
    again = run(ROOT, "--1", **env)
    assert again.returncode == 2 and "pass resume=true" in again.stderr
    resumed = run(ROOT, "--1", "--resume", **env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (record.read_bytes(), record.stat().st_mtime_ns) == before
    assert "--resume" in run(ROOT, "--help").stderr
