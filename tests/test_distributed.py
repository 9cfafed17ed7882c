"""Scale-out: torchrun ranks and cluster shards compute the same per-image results as one process."""
from __future__ import annotations

import json
import socket
import subprocess
import sys

from conftest import ROOT
from test_resume import env1, per_image

RUN = ["sampler.annealing.num_steps=4", "sampler.mcmc.num_steps=3", "num_samples=2", "batch_size=1",
       "data.end_id=5", "eval.lpips=false"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_gloo_ranks_match_one_process(tmp_path):
    single = subprocess.Popen([sys.executable, "posterior_sample.py", *RUN, f"save_dir={tmp_path}", "name=one"],
                              cwd=ROOT, env=env1(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    multi = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                            f"--master_port={free_port()}", "posterior_sample.py", *RUN, f"save_dir={tmp_path}",
                            "name=two", "device=cpu"],
                           cwd=ROOT, env=env1(), capture_output=True, text=True, timeout=300)
    assert multi.returncode == 0, multi.stderr[-3000:]
    _, err = single.communicate(timeout=300)
    assert single.returncode == 0, err[-3000:]
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert sorted(per_image(two)) == [0, 1, 2, 3, 4]
    assert per_image(two) == per_image(one)
    assert two["metadata"]["world_size"] == 2 and [r["rank"] for r in two["metadata"]["ranks"]] == [0, 1]
    # rank 1 really sampled its block (the split is 0,1 | 2,3,4) and wrote its own records
    assert sorted(p.stem for p in (tmp_path / "two" / "records").glob("*.json")) == [f"{i:05d}" for i in range(5)]
    assert multi.stdout.count("Results in") == 1  # only rank 0 reports
    meta = two["metadata"]  # wall time of the job (ranks in parallel) and the sum over ranks, separately
    assert meta["wall_time_sum_over_ranks_sec"] == sum(r["wall_time_sec"] for r in meta["ranks"])
    assert meta["wall_time_sec"] == max(r["wall_time_sec"] for r in meta["ranks"])
    assert meta["wall_time_per_image_sec"] == meta["wall_time_sec"] / 5


def test_slurm_launcher_composes_and_shards_partition_the_range():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from cores.pipeline import shard_ids

    from hydra import compose as hcompose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        hc = hcompose(config_name="config", overrides=["hydra/launcher=slurm", "shard=1", "num_shards=4",
                                                       "name=big"], return_hydra_config=True)
    launcher = hc.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    for key in ("partition", "account", "timeout_min", "gpus_per_node", "max_num_timeout"):
        assert key in launcher
    assert launcher.gpus_per_node == 1 and launcher.tasks_per_node == 1
    assert str(hc.hydra.sweep.dir) == "results/big/.hydra_multirun"  # every job writes into the run folder
    # `shard=0,1,2,3 num_shards=4` is a 4-job sweep over one key, not a product of id ranges
    parsed = OverridesParser.create().parse_overrides(["shard=0,1,2,3", "num_shards=4"])
    sweeps = [o for o in parsed if o.is_sweep_override()]
    assert [o.key_or_group for o in sweeps] == ["shard"]
    shards = [int(v) for v in sweeps[0].sweep_string_iterator()]
    ids = list(range(100))  # e.g. test-imagenet, data.end_id=100
    blocks = [shard_ids(ids, s, 4) for s in shards]
    assert [len(b) for b in blocks] == [25, 25, 25, 25]
    assert sorted(i for b in blocks for i in b) == ids


def test_submitit_local_multirun_shards_fill_one_folder(tmp_path):
    """The launcher path a SLURM multirun takes, with local processes: jobs run concurrently,
    without resume, into one run folder; the last one to finish leaves complete metrics."""
    proc = subprocess.run([sys.executable, "posterior_sample.py", "-m", "hydra/launcher=local", "shard=0,1",
                           "num_shards=2", *RUN, f"save_dir={tmp_path}", "name=sharded"],
                          cwd=ROOT, env=env1(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    root = tmp_path / "sharded"
    metrics = json.loads((root / "metrics.json").read_text())
    assert [r["image_idx"] for r in metrics["images"]] == [0, 1, 2, 3, 4]
    assert sorted(p.name for p in (root / ".hydra_multirun").iterdir() if p.name.isdigit()) == ["0", "1"]
