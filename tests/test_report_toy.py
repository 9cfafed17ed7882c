"""End to end: two toy runs with twins in the prior (scale 0 and strong pixel repulsion), then
`parse_metrics --report`; the markdown's tables agree with the run folders and every file it names exists."""
from __future__ import annotations

import json
import re

from eval import parse_metrics as pm
from eval.plots import repulsion_curves
from eval.study import RATIO_NAMES, image_orientation, particle_orientation


def test_toy_report_end_to_end(tmp_path, one_thread):
    from cores.pipeline import run
    from tests.conftest import TINY, compose

    # linear multiplier: λ = 1000 as the test was written for (the default squared one injects 1e6)
    base = TINY + ["model.include_twins=true", "repulsion_feature=pixel", "repulsion_multiplier=linear",
                   f"save_dir={tmp_path}/toy/demo_2img"]
    for name, scale in (("s0", 0), ("s1000", 1000)):  # the scale-0 run logs its distances (baseline curve)
        run(compose(base + [f"name={name}", f"repulsion_scale={scale}", "repulsion_log_baseline=true"]))
    out = tmp_path / "report"
    assert pm.main([str(tmp_path / "toy"), "--report", str(out)]) == 0
    md = (out / "report.md").read_text()

    for heading in ("## Runs", "## Summary", "## Orientation (no PSNR threshold)", "### Paired orientation outcomes",
                    "## Selection and spread", "## Cost", "## Repulsion", "## Paired comparisons", "## Per image",
                    "## Plots", "## Definitions"):
        assert heading in md, heading
    for name in ("s0", "s1000"):
        assert f"`{tmp_path}/toy/demo_2img/{name}`" in md
    assert "| repulsion_scale | 0 | 1000 |" in md

    # the orientation row recomputed from the records with the 1 dB rule, which the stored fields follow
    cells = []
    for name in ("s0", "s1000"):
        recs = json.loads((tmp_path / "toy" / "demo_2img" / name / "metrics.json").read_text())["images"]
        for r in recs:
            bare = {k: v for k, v in r.items() if k not in ("orientation", "orientations_found",
                                                            "correct_orientation_found", "both_orientations_any")}
            assert image_orientation(bare, 1.0) == image_orientation(r, 1.0)
        found = sum(any(particle_orientation(p, q, 1.0) == "gt" for p, q in zip(r["psnr"], r["psnr_twin"]))
                    for r in recs)
        cells.append(f"{found / 2:.0%}")
    row = next(line for line in md.splitlines() if line.startswith("| correct orientation found"))
    assert [c.strip().split(" ")[0] for c in row.strip("|").split("|")[1:]] == cells

    # the repulsion run logged a step-0 ratio; the GPU-second figures come from wall time
    rep = md.split("## Repulsion")[1].split("##")[0]
    for name in RATIO_NAMES.values():  # both ratios, each under its own name
        assert re.search(rf"\| step-0 ratio {re.escape(name)}, median over images \| n/a \(n=0\) \| [0-9.e+-]+ \(n=2\) \|",
                         rep), name
    assert md.count("(wall)") == 2 and md.count("| cpu × 1 |") == 2
    assert "| scale-0 baseline curve | yes | no |" in rep
    runs = pm.load_runs(pm.find_run_dirs([str(tmp_path / "toy")]))
    labels = [label for label, *_ in repulsion_curves(runs, "dist")]
    assert labels == ["toy/demo_2img/s0 [pixel] (scale-0 baseline)", "toy/demo_2img/s1000 [pixel]"]

    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert set(links) == {"best_psnr_per_image.png", "quality_vs_compute.png", "repulsion_distance.png",
                          "repulsion_ratio.png", "repulsion_ratio_at_sigma.png"}
    for link in links:
        assert (out / link).is_file() and (out / link).stat().st_size > 1000
