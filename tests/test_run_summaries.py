"""Run totals in metrics.json cover every image on disk, also after a resume."""
import json

import pytest

from conftest import compose

pytestmark = pytest.mark.usefixtures("one_thread")


def test_totals_after_resume_cover_all_images(tmp_path):
    from cores.pipeline import run

    base = ["sampler.annealing.num_steps=4", "sampler.mcmc.num_steps=2", "num_samples=2", "batch_size=1",
            "eval.lpips=false", "hard_data_consistency=1", "optimization_max_iters=3", "pruning_step=1",
            "pruning_keep=1", "pruning_mode=shadow", f"save_dir={tmp_path}", "name=r"]
    run(compose(base + ["data.end_id=1"]))
    first = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert first["metadata"]["optimization"]["num_images"] == 1
    run(compose(base + ["data.end_id=3", "resume=true"]))  # this process only computes images 1 and 2
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert [r["image_idx"] for r in m["images"]] == [0, 1, 2]
    opt = m["metadata"]["optimization"]
    assert opt["num_images"] == 3 and opt["num_particles"] == 6
    assert opt["total_iters"] == sum(i for r in m["images"] for i in r["optimization"]["final_iters"])
    assert opt["lr"] == 5e-3  # settings still come from the hook
    assert m["metadata"]["pruning"]["num_pruned_images"] == 3
    assert 0 <= m["metadata"]["pruning"]["regret_images"] <= 3
