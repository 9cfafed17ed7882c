"""The experiment scripts and configs: usage, DRY_RUN commands (experiment, image ranges, folders), resolved
settings, GPU, MODEL=toy."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "commands_gpu"

# script → (experiment folder, run tag, settings every command must resolve to)
# the reference protocol: exact path, deterministic kernels, one image per batch, LPIPS as DAPS computes it
PROTOCOL = {"speed.preset": "exact", "deterministic": "True", "batch_size": "1", "eval.lpips_net": "vgg"}
# the original study's MCMC: its `ldm_langevin` task group (DAPS/configs/task/phase_retrieval.yaml at b967b2b)
MCMC = {"sampler.mcmc.algo": "langevin", "sampler.mcmc.num_steps": "50", "sampler.mcmc.lr": "4e-6",
        "sampler.mcmc.lr_min_ratio": "0.01", "sampler.mcmc.tau": "0.01"}
COMMON = {"seed": "42", **MCMC, "save_traj": "True", "repulsion_multiplier": "squared",
          "dino.preprocess": "original", **PROTOCOL}
REP = {"repulsion_scale": "10", "repulsion_sigma_break": "1.0", "repulsion_schedule": "constant"}
EXPECTED = {
    "exp0_baseline.sh": ("exp0_baseline", "exp0", "",
                         {"num_samples": "4", "repulsion_scale": "0", "pruning_step": "-1",
                          "hard_data_consistency": "-1"}),
    "exp1_repulsion.sh": ("exp1_repulsion", "exp1", "scale10",
                          {"num_samples": "4", **REP, "pruning_step": "-1", "hard_data_consistency": "-1"}),
    "exp2_pruning.sh": ("exp2_pruning", "exp2", "scale10_prune29",
                        {"num_samples": "4", **REP, "pruning_step": "29", "pruning_keep": "2",
                         "pruning_criterion": "loss", "pruning_mode": "slicing", "hard_data_consistency": "-1"}),
    "exp3_2particle.sh": ("exp3_2particle", "exp3", "scale10",
                          {"num_samples": "2", **REP, "pruning_step": "-1", "hard_data_consistency": "-1"}),
    "exp4_optimization.sh": ("exp4_optimization", "exp4", "",
                             {"num_samples": "4", **REP, "pruning_step": "-1", "hard_data_consistency": "1",
                              "optimization_lr": "5.0e-3", "optimization_eps": "1.0e-3",
                              "optimization_max_iters": "500"}),
    "exp5_final.sh": ("exp5_final", "exp5", "scale10_prune25_hdc1",
                      {"num_samples": "4", **REP, "pruning_step": "25", "pruning_keep": "2",
                       "hard_data_consistency": "1", "optimization_lr": "5.0e-3", "optimization_eps": "1.0e-3",
                       "optimization_max_iters": "500"}),
}


def original_name(name: str, n: int, dataset: str = "imagenet") -> str:
    """`<dataset>_<folder>img/<run>` as the original scripts name the run of `name` on n images."""
    exp, short, tag, _ = EXPECTED[name]
    folder = 100 if n == 90 else n
    if name == "exp5_final.sh":
        run = f"exp5_{dataset}_{n}img"
    else:
        run = f"{short}_sanity_check" if n == 1 else f"{short}_{n}img"
    return f"{dataset}_{folder}img/{run}" + (f"_{tag}" if tag else "")


# the original scripts' folders (DAPS/commands_gpu/exp*.sh at b967b2b: save_dir/name), written out
ORIGINAL_FOLDERS = {
    "exp0_baseline.sh": ["imagenet_1img/exp0_sanity_check", "imagenet_10img/exp0_10img", "imagenet_100img/exp0_90img"],
    "exp1_repulsion.sh": ["imagenet_1img/exp1_sanity_check_scale10", "imagenet_10img/exp1_10img_scale10",
                          "imagenet_100img/exp1_90img_scale10"],
    "exp2_pruning.sh": ["imagenet_1img/exp2_sanity_check_scale10_prune29", "imagenet_10img/exp2_10img_scale10_prune29",
                        "imagenet_100img/exp2_90img_scale10_prune29"],
    "exp3_2particle.sh": ["imagenet_1img/exp3_sanity_check_scale10", "imagenet_10img/exp3_10img_scale10",
                          "imagenet_100img/exp3_90img_scale10"],
    "exp4_optimization.sh": ["imagenet_1img/exp4_sanity_check", "imagenet_10img/exp4_10img", "imagenet_100img/exp4_90img"],
}


def run_script(name: str, *flags: str, **env: str) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items()
         if k not in ("DRY_RUN", "GPU", "MODEL", "SAVE_DIR", "EXTRA_ARGS", "SPEED", "BATCH")}
    e.update(env)
    return subprocess.run(["bash", str(SCRIPTS / name), *flags], capture_output=True, text=True, env=e,
                          cwd=ROOT, timeout=300)


def parse(line: str) -> Dict:
    """Env prefix, program and Hydra overrides of one printed command."""
    toks = shlex.split(line)
    env = {}
    while toks and "=" in toks[0] and not toks[0].startswith(("python", "/")):
        k, v = toks.pop(0).split("=", 1)
        env[k] = v
    assert toks[1] == "posterior_sample.py", line
    overrides = dict(t.split("=", 1) for t in toks[2:])
    return {"env": env, "python": toks[0], "overrides": overrides, "args": toks[2:]}


def dry(name: str, *flags: str, **env: str) -> List[Dict]:
    res = run_script(name, *flags, DRY_RUN="1", **env)
    assert res.returncode == 0, res.stderr
    return [parse(line) for line in res.stdout.strip().splitlines()]


def size_flags(name: str) -> List[str]:
    return (["--imagenet"] if name == "exp5_final.sh" else []) + ["--1", "--10", "--90"]


def test_every_experiment_has_a_script():
    assert sorted(p.name for p in SCRIPTS.glob("exp*.sh")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_no_flag_prints_usage_and_fails(name):
    res = run_script(name)
    assert res.returncode != 0
    assert "usage" in res.stderr and "--10" in res.stderr
    assert res.stdout == ""
    bad = run_script(name, "--7", DRY_RUN="1")
    assert bad.returncode != 0 and "unknown flag --7" in bad.stderr and bad.stdout == ""


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_dry_run_carries_settings_ranges_and_folders(name):
    from omegaconf import OmegaConf

    from tests.conftest import compose

    exp, short, tag, settings = EXPECTED[name]
    cmds = dry(name, *size_flags(name))
    assert len(cmds) == 3
    ranges = [(c["overrides"]["data.start_id"], c["overrides"]["data.end_id"]) for c in cmds]
    assert ranges == [("0", "1"), ("0", "10"), ("10", "100")]
    for c, n in zip(cmds, (1, 10, 90)):
        o = c["overrides"]
        assert c["env"] == {}
        assert o["+experiment"] == exp  # the settings live in configs/experiment/<exp>.yaml
        cfg = compose(c["args"])
        for k, v in {**COMMON, **settings}.items():
            assert float(OmegaConf.select(cfg, k)) == float(v) if v[-1].isdigit() else \
                str(OmegaConf.select(cfg, k)) == v, (k, OmegaConf.select(cfg, k), v)
        assert o["model"] == "imagenet256ldm" and o["data"] == "test-imagenet"
        assert cfg.repulsion_feature == "dino"
        assert o["save_dir"] == f"results/{exp}"
        assert o["name"] == original_name(name, n)
        assert len(c["args"]) == len(o), "an override appears twice"
    # flags run in the order given
    order = dry(name, *([a for a in size_flags(name) if not a.startswith("--1")] + ["--1"]))
    assert [c["overrides"]["data.end_id"] for c in order][-1] == "1"


def test_exp1_example_folder_of_the_spec():
    (c,) = dry("exp1_repulsion.sh", "--1")
    o = c["overrides"]
    assert f"{o['save_dir']}/{o['name']}" == "results/exp1_repulsion/imagenet_1img/exp1_sanity_check_scale10"


@pytest.mark.parametrize("name", sorted(ORIGINAL_FOLDERS))
def test_dry_run_prints_the_original_folders(name):
    """`DRY_RUN=1 bash commands_gpu/expN.sh --1 --10 --90`: the original scripts' save_dir/name, flag by flag;
    SPEED/BATCH suffixes come after the original name."""
    exp = EXPECTED[name][0]
    got = [f"{c['overrides']['save_dir']}/{c['overrides']['name']}" for c in dry(name, "--1", "--10", "--90")]
    assert got == [f"results/{exp}/{f}" for f in ORIGINAL_FOLDERS[name]]
    (f,) = dry(name, "--10", SPEED="fast", BATCH="4")
    assert f["overrides"]["name"] == ORIGINAL_FOLDERS[name][1] + "_fast_batch4"
    (b,) = dry(name, "--10", BATCH="1")
    assert b["overrides"]["name"] == ORIGINAL_FOLDERS[name][1]


def test_exp5_runs_the_original_exp5_final():
    """exp5_final.sh --imagenet --ffhq: ImageNet 10-99 and FFHQ 0-99 with the original's folders and settings."""
    from omegaconf import OmegaConf

    from tests.conftest import compose

    cmds = dry("exp5_final.sh", "--imagenet", "--ffhq")
    got = [(c["overrides"]["data.start_id"], c["overrides"]["data.end_id"],
            f"{c['overrides']['save_dir']}/{c['overrides']['name']}") for c in cmds]
    assert got == [("10", "100", "results/exp5_final/imagenet_100img/exp5_imagenet_90img_scale10_prune25_hdc1"),
                   ("0", "100", "results/exp5_final/ffhq_100img/exp5_ffhq_100img_scale10_prune25_hdc1")]
    for c in cmds:
        cfg = compose(c["args"])
        assert (int(cfg.pruning_step), int(cfg.hard_data_consistency), float(cfg.repulsion_scale)) == (25, 1, 10.0)
        assert OmegaConf.select(cfg, "sampler.mcmc.num_steps") == 50 and cfg.sampler.mcmc.lr == 4e-6


@pytest.mark.parametrize("name", ["exp0_baseline.sh", "exp4_optimization.sh"])
def test_gpu_selects_the_device(name):
    cmds = dry(name, *size_flags(name)[:2], GPU="3")
    assert cmds and all(c["env"] == {"CUDA_VISIBLE_DEVICES": "3"} for c in cmds)


def test_exp5_datasets():
    cmds = dry("exp5_final.sh", "--ffhq", "--imagenet", "--100")
    assert [(c["overrides"]["model"], c["overrides"]["data"]) for c in cmds] == [
        ("ffhq256ldm", "test-ffhq"), ("imagenet256ldm", "test-imagenet")]
    assert cmds[0]["overrides"]["name"] == "ffhq_100img/exp5_ffhq_100img_scale10_prune25_hdc1"
    assert (cmds[0]["overrides"]["data.start_id"], cmds[0]["overrides"]["data.end_id"]) == ("0", "100")
    default = dry("exp5_final.sh", "--imagenet")  # no size: images 10-99, as the original exp5_final.sh
    assert [(c["overrides"]["data.start_id"], c["overrides"]["data.end_id"]) for c in default] == [("10", "100")]
    assert run_script("exp5_final.sh", "--10", DRY_RUN="1").returncode != 0  # no dataset
    assert run_script("exp1_repulsion.sh", "--ffhq", DRY_RUN="1").returncode != 0  # exp5 only


def test_toy_model_and_overrides():
    from tests.conftest import compose

    (c,) = dry("exp1_repulsion.sh", "--10", MODEL="toy", SAVE_DIR="/tmp/x", EXTRA_ARGS="sampler.mcmc.num_steps=3")
    o = c["overrides"]
    assert o["model"] == "toy" and o["data"] == "demo-imagenet" and o["model.include_twins"] == "true"
    assert compose(c["args"]).repulsion_feature == "pixel"  # the toy prior's default (model_defaults/toy.yaml)
    assert o["save_dir"] == "/tmp/x/exp1_repulsion"
    assert c["args"][-1] == "sampler.mcmc.num_steps=3"  # appended last: it wins
    (d,) = dry("exp0_baseline.sh", "--1", MODEL="toy")
    assert d["overrides"]["save_dir"] == "results/toy/exp0_baseline"
    res = run_script("exp0_baseline.sh", "--1", "--90", MODEL="toy", DRY_RUN="1")
    assert res.returncode != 0 and "--90" in res.stderr and res.stdout == ""  # checked before anything runs
    assert run_script("exp0_baseline.sh", "--1", MODEL="big", DRY_RUN="1").returncode != 0


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("toy", [False, True])
def test_commands_compose_with_the_real_configs(name, toy):
    """Every override names an existing config key with an accepted value (Hydra rejects unknown keys)."""
    from tests.conftest import compose

    flags = [f for f in size_flags(name) if f in ("--imagenet", "--1")]
    (c,) = dry(name, *flags, **({"MODEL": "toy"} if toy else {}))
    cfg = compose(c["args"])
    exp, short, tag, settings = EXPECTED[name]
    assert int(cfg.num_samples) == int(settings["num_samples"])
    assert float(cfg.repulsion_scale) == float(settings["repulsion_scale"])
    # the original's ldm_langevin MCMC, on the toy too (configs/model_sampler_defaults/toy_ldm_langevin.yaml)
    assert (int(cfg.sampler.mcmc.num_steps), float(cfg.sampler.mcmc.lr)) == (50, 4e-6) and int(cfg.seed) == 42
    assert cfg.model.name == ("toy" if toy else "ldm")
    assert cfg.data.name == ("demo-imagenet" if toy else "test-imagenet")
    if not toy:
        assert "imagenet256" in str(cfg.model.diffusion_path)


def test_toy_exp0_end_to_end_then_parser(tmp_path):
    """A real (tiny) run through the script, then the parser on its folder."""
    res = run_script("exp0_baseline.sh", "--1", MODEL="toy", SAVE_DIR=str(tmp_path),
                     EXTRA_ARGS="sampler.annealing.num_steps=4 sampler.mcmc.num_steps=2 eval.lpips=false",
                     PYTHON=sys.executable)
    assert res.returncode == 0, res.stderr[-2000:]
    run = tmp_path / "exp0_baseline" / "imagenet_1img" / "exp0_sanity_check"
    metrics = json.loads((run / "metrics.json").read_text())
    assert [r["image_idx"] for r in metrics["images"]] == [0] and len(metrics["images"][0]["psnr"]) == 4
    out = subprocess.run([sys.executable, "eval/parse_metrics.py", str(tmp_path / "exp*" / "*" / "*")],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    best = metrics["summary"]["best_psnr"]["mean"]
    assert "exp0_baseline/imagenet_1img/exp0_sanity_check" in out.stdout
    assert f"| best PSNR (dB), mean ± std (std over images, ddof 0) | {best:.2f} ± 0.00 |" in out.stdout


def test_experiment_config_runs_directly():
    """`python posterior_sample.py +experiment=exp1_repulsion model=toy data.end_id=1` is Exp1 on the toy."""
    from tests.conftest import compose

    cfg = compose(["+experiment=exp1_repulsion", "model=toy", "data.end_id=1"])
    assert float(cfg.repulsion_scale) == 10 and int(cfg.num_samples) == 4 and cfg.repulsion_feature == "pixel"
    assert cfg.save_dir == "results/exp1_repulsion"
    five = compose(["+experiment=exp5_final"])
    assert int(five.pruning_step) == 25 and int(five.hard_data_consistency) == 1  # the original exp5_final.sh


def test_toy_exp2_writes_survivor_and_pruned_trajectories(tmp_path):
    """`MODEL=toy bash commands_gpu/exp2_pruning.sh --1` (few steps): trajectory/ and trajectory_pruned/."""
    res = run_script("exp2_pruning.sh", "--1", MODEL="toy", SAVE_DIR=str(tmp_path), PYTHON=sys.executable,
                     EXTRA_ARGS="sampler.annealing.num_steps=6 sampler.mcmc.num_steps=1 eval.lpips=false "
                                "pruning_step=2 traj_every=2")
    assert res.returncode == 0, res.stderr[-2000:]
    run = tmp_path / "exp2_pruning" / "imagenet_1img" / "exp2_sanity_check_scale10_prune29"
    lines = [json.loads(s) for s in (run / "pruning.jsonl").read_text().splitlines()]
    pruned = lines[-1]["pruned_indices"]
    assert len(pruned) == 2
    assert sorted(p.name for p in (run / "trajectory_pruned").iterdir()) == \
        sorted(f"00000_pruned{k:02d}.png" for k in pruned)
    assert sorted(p.name for p in (run / "trajectory").iterdir()) == \
        sorted(f"00000_sample{k:02d}.png" for k in lines[-1]["kept_indices"])


def test_reference_protocol_by_default_fast_and_batch_on_request():
    """The experiments run the reference protocol; SPEED=fast / BATCH=N (scripts) or speed=fast batch_size=N
    opt in, and a fast run gets its own folder."""
    from tests.conftest import compose

    (c,) = dry("exp1_repulsion.sh", "--1")
    cfg = compose(c["args"])
    assert cfg.speed.preset == "exact" and cfg.speed.compile is False and cfg.speed.precision == "fp32"
    assert cfg.deterministic is True and cfg.batch_size == 1
    (f,) = dry("exp1_repulsion.sh", "--1", SPEED="fast", BATCH="4")
    fast = compose(f["args"])
    assert fast.speed.preset == "fast" and fast.speed.compile is True and fast.speed.precision == "bf16"
    assert fast.batch_size == 4 and fast.deterministic is True
    assert f["overrides"]["name"] == "imagenet_1img/exp1_sanity_check_scale10_fast_batch4"  # after the original name
    (e,) = dry("exp1_repulsion.sh", "--1", SPEED="exact")
    assert e["overrides"]["name"] == c["overrides"]["name"]  # naming the default changes nothing
    direct = compose(["+experiment=exp3_2particle", "speed=fast", "batch_size=2"])
    assert direct.speed.preset == "fast" and direct.batch_size == 2
    (t,) = dry("exp1_repulsion.sh", "--1", MODEL="toy", SPEED="fast")
    assert compose(t["args"]).speed.preset == "fast"  # one speed override: the toy does not force its own


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("speed", ["", "fast"])
def test_every_experiment_composes_to_the_protocol(name, speed):
    """`DRY_RUN=1 bash commands_gpu/expN_*.sh --1` composed: exact, deterministic, one image per batch, VGG LPIPS;
    SPEED=fast gives the fast preset and nothing else changes."""
    from omegaconf import OmegaConf

    from tests.conftest import compose

    flags = [f for f in size_flags(name) if f in ("--imagenet", "--1")]
    (c,) = dry(name, *flags, **({"SPEED": speed} if speed else {}))
    cfg = compose(c["args"])
    want = {**PROTOCOL, "speed.preset": speed or "exact"}
    assert {k: str(OmegaConf.select(cfg, k)) for k in want} == want


def test_cfg_job_of_the_printed_command_shows_the_protocol():
    """The literal check: the printed command with `--cfg job` (Hydra prints the composed config, runs nothing)."""
    import yaml

    (c,) = dry("exp2_pruning.sh", "--1")
    res = subprocess.run([sys.executable, "posterior_sample.py", *c["args"], "--cfg", "job"], capture_output=True,
                         text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    cfg = yaml.safe_load(res.stdout)
    assert (cfg["speed"]["preset"], cfg["deterministic"], cfg["batch_size"], cfg["eval"]["lpips_net"]) == \
        ("exact", True, 1, "vgg")


def test_readme_direct_command_is_the_scripts():
    """README's `+experiment=` example is what the script prints, so it runs with the same settings."""
    import re

    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(python posterior_sample.py \+experiment=exp1_repulsion .*?)```", text, re.S).group(1)
    readme = shlex.split(block.replace("\\\n", " "))
    (c,) = dry("exp1_repulsion.sh", "--1")
    assert readme[1:] == shlex.split(" ".join(["posterior_sample.py", *c["args"]]))
