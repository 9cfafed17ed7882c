"""README's cost table: seconds per image from a benchmark JSON's per-step times at each experiment's
composed workload, and the A10 column scaled on the original study's exp0 workload (50 × 50 Langevin)."""
from __future__ import annotations

import json

import pytest

from scripts import cost_table as ct


def test_table_from_per_step_times(tmp_path):
    from scripts.benchmark import load_preset

    rows = [{"config": "exact", "particles": n, "images_per_batch": 1, "non_mcmc_sec_per_anneal_step": 0.1 * n,
             "mcmc_step_sec": 0.01 * n} for n in (4, 2)]
    rows.append({"config": load_preset("fast").label(), "particles": 4, "images_per_batch": 1,
                 "non_mcmc_sec_per_anneal_step": 0.05, "mcmc_step_sec": 0.002})
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"card": "NVIDIA H100 80GB HBM3", "results": rows}))
    w0, w2 = ct.workload("exp0_baseline"), ct.workload("exp2_pruning")
    sec = ct.seconds_per_image(w0, ct.preset_rows([path])["exact"])
    assert sec == pytest.approx(w0["anneal"] * (0.4 + w0["mcmc"] * 0.04))
    p = w2["prune_step"]
    assert ct.seconds_per_image(w2, ct.preset_rows([path])["exact"]) == pytest.approx(
        p * (0.4 + w2["mcmc"] * 0.04) + (w2["anneal"] - p) * (0.2 + w2["mcmc"] * 0.02))
    text = ct.table([path], a10_sec=903)
    a10_base = 50 * (0.4 + 50 * 0.04)  # the original's exp0 workload on this "H100"
    assert f"A10 = H100 × 903 ÷ {a10_base:.1f}" in text
    exp0 = next(line for line in text.splitlines() if line.startswith("| exp0_baseline"))
    assert f"{sec:.0f} s · {sec * 100 / 3600:.1f} h" in exp0
    assert f"| {sec * 903 / a10_base * 100 / 3600:.0f} · " in exp0
    assert "n/a (no 4-particle row)" in exp0  # faithful: no row in this file
    assert "hard data consistency" in next(line for line in text.splitlines() if line.startswith("| exp4"))


def test_readme_block_is_replaced_in_place(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"head\n{ct.README_START}old -->\nold table\n{ct.README_END}\ntail\n")
    ct.write_readme(readme, "| new |\n", "python scripts/cost_table.py x.json --readme README.md")
    assert readme.read_text() == (f"head\n{ct.README_START}python scripts/cost_table.py x.json --readme README.md -->\n"
                                  f"| new |\n{ct.README_END}\ntail\n")
