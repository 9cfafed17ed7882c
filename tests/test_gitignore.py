""".gitignore ignores what runs and downloads write, and nothing the repository tracks."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from conftest import ROOT

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="no git")


def ignored(repo, path: str) -> bool:
    return subprocess.run(["git", "check-ignore", "-q", path], cwd=repo).returncode == 0


def test_gitignore_in_a_fresh_repository(tmp_path):
    """Checked in a new repository holding only .gitignore (this checkout may have local excludes)."""
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    shutil.copy(ROOT / ".gitignore", tmp_path / ".gitignore")
    os.symlink("/nonexistent/venv", tmp_path / ".venv")  # README's .venv is often a symlink
    for path in ("results/toy/x.json", "checkpoints/a.pt", "datasets/test-ffhq/0.png", "outputs/o.log",
                 "configs/config.yaml", "docs/results/table.md", "cores/outputs/x.py", "dataset/demo-ffhq/0.png"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("x")
    for path in (".venv", "results/toy/x.json", "checkpoints/a.pt", "datasets/test-ffhq/0.png", "outputs/o.log",
                 "cores/__pycache__/m.pyc"):
        assert ignored(tmp_path, path), path
    for path in ("configs/config.yaml", "docs/results/table.md", "cores/outputs/x.py", "dataset/demo-ffhq/0.png"):
        assert not ignored(tmp_path, path), path


def test_no_tracked_file_is_ignored():
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "ls-files", "-ci", "--exclude-from=.gitignore"], cwd=ROOT, capture_output=True,
                         text=True)
    assert out.returncode == 0 and out.stdout == "", out.stdout
