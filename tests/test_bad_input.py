"""Every wrong override is one line (exit code 2) before any work, and nothing is written."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT

BAD = [
    (["num_samples=abc"], "num_samples=abc"),
    (["data.start_id=abc"], "data.start_id=abc"),
    (["repulsion_sigma_break=abc"], "repulsion_sigma_break=abc"),
    (["seed=abc"], "seed=abc"),
    (["eval.success_psnr=abc"], "eval.success_psnr=abc"),
    (["num_samples=2.7"], "num_samples=2.7"),
    (["batch_size=1.5"], "batch_size=1.5"),
    (["repulsion_scael=1"], "did you mean repulsion_scale"),
    (["+repulsion_scael=1"], "did you mean repulsion_scale"),
    (["sampler.mcmc.num_step=3"], "unknown setting sampler.mcmc.num_step; did you mean sampler.mcmc.num_steps?"),
    (["dino.resise=224"], "did you mean dino.resize?"),
    (["name=día"], "name=día: Hydra cannot read this value unquoted"),
    (["sampler.mcmc.algo=gibbs"], "sampler.mcmc.algo=gibbs"),
    (["repulsion_schedule=step"], "repulsion_schedule=step"),
    (["model=nope"], "model/nope"),
    (["data=test-imagenet"], "bash download.sh test-imagenet"),
    (["speed.channels_last=true", "speed.nhwc_conv_layout=maybe"], "speed.nhwc_conv_layout=maybe: expected true or false"),
    (["speed.tf32=1"], "speed.tf32=1: expected true or false or null"),
]


@pytest.mark.parametrize("args,expect", BAD, ids=[a[0] for a, _ in BAD])
def test_bad_override_is_one_line_exit_2(tmp_path, args, expect):
    res = subprocess.run([sys.executable, "posterior_sample.py", *args, f"save_dir={tmp_path}", "name=bad"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 2, res.stderr[-1500:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], res.stderr
    assert not (tmp_path / "bad" / "records").exists()


def test_the_quoting_the_lexer_message_names_works(tmp_path):
    from conftest import compose

    res = subprocess.run([sys.executable, "posterior_sample.py", "name=día", f"save_dir={tmp_path}"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    quoted = res.stderr.split("quote it inside the argument: ")[1].strip().strip('"')
    assert quoted == "name='día'" and compose([quoted]).name == "día"


def test_save_dir_that_is_a_file(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    res = subprocess.run([sys.executable, "posterior_sample.py", f"save_dir={notes}"], capture_output=True,
                         text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "is not a folder" in res.stderr and notes.read_text() == "keep me"
