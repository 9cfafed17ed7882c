"""README's "What a real run costs": seconds per image and hours per 100 images per experiment, from
benchmark JSONs (`scripts/benchmark.py --matrix`), for the speed presets as they are now.

    python scripts/cost_table.py docs/benchmarks/matrix_speed6_h100.json [MORE.json ...] [--a10-sec 903]
                                 [--readme README.md]    # also replace README's table with this one

A row of a JSON is used for a preset when its switches (`config`) are those of configs/speed/<preset>.yaml
today, one image per batch.  Each experiment's workload comes from its composed config
(configs/experiment/<exp>.yaml with the real model): annealing steps A, MCMC steps M, particles N,
pruning (step p, keep k).  Per annealing step a row gives `non_mcmc_sec_per_anneal_step` and
`mcmc_step_sec` at its particle count (the benchmark times 10 MCMC steps and scales; its
`extrapolation` field), so

    s/image = Σ over the A steps of (non-MCMC + M · MCMC-step seconds) at the particles alive then,

with N particles before the pruning step and k from it on.  What the benchmark does not time is named
in the table (repulsion's DINO passes, hard data consistency), never silently added or dropped.
The A10 column scales each H100 time by (the original study's A10 seconds per image of exp0) ÷ (the
H100 exact seconds per image of exp0 computed here); `--a10-sec` is that A10 time (default 903 s:
the original's Exp0 on 10 ImageNet images, 9 060 s in all, at 50 annealing × 50 Langevin steps,
4 particles).  It assumes the A10 gains from faithful/fast what the H100 gains (not measured).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PRESETS = ("exact", "faithful", "fast")
EXPERIMENTS = ("exp0_baseline", "exp1_repulsion", "exp2_pruning", "exp3_2particle", "exp4_optimization", "exp5_final")
A10_EXP0_SEC = 903.0
# the workload of that A10 measurement: the original's exp0 (commands_gpu/exp0_baseline.sh: task_group
# ldm_langevin = 50 Langevin steps, configs/task/phase_retrieval.yaml; 50 annealing steps; 4 particles)
A10_WORKLOAD = {"anneal": 50, "mcmc": 50, "algo": "langevin", "particles": 4, "prune_step": None, "keep": 4,
                "untimed": []}


def workload(exp: str) -> Dict:
    """Annealing and MCMC steps, particles, pruning and what the benchmark leaves out, from the composed
    experiment config with the real ImageNet model."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"+experiment={exp}", "model=imagenet256ldm",
                                                       "data=test-imagenet"])
    step = int(cfg.pruning_step)
    untimed = []
    if float(cfg.repulsion_scale) > 0 or cfg.get("repulsion_target_ratio") is not None:
        untimed.append("repulsion")
    if int(cfg.hard_data_consistency) == 1:
        untimed.append("hard data consistency")
    return {"anneal": int(cfg.sampler.annealing.num_steps), "mcmc": int(cfg.sampler.mcmc.num_steps),
            "algo": str(cfg.sampler.mcmc.algo), "particles": int(cfg.num_samples),
            "prune_step": step if step >= 0 else None, "keep": int(cfg.pruning_keep), "untimed": untimed}


def preset_rows(paths: List[Path]) -> Dict[str, Dict[int, Dict]]:
    """{preset: {particles: row}} of the rows (one image per batch) whose switches are the preset's now;
    a later file wins."""
    from scripts.benchmark import load_preset

    labels = {p: load_preset(p).label() for p in PRESETS}
    out: Dict[str, Dict[int, Dict]] = {p: {} for p in PRESETS}
    for path in paths:
        report = json.loads(Path(path).read_text())
        for row in report.get("results", []):
            for preset, label in labels.items():
                if row.get("config") == label and row.get("images_per_batch") == 1 and "mcmc_step_sec" in row:
                    out[preset][int(row["particles"])] = {**row, "card": report.get("card"), "file": Path(path).name,
                                                          "architecture": (report.get("workload") or {}).get("architecture")}
    return out


def seconds_per_image(work: Dict, rows: Dict[int, Dict]) -> Optional[float]:
    """The experiment's seconds per image from the per-step times of the rows at its particle counts."""
    def per_step(n: int) -> Optional[float]:
        r = rows.get(n)
        return None if r is None else r["non_mcmc_sec_per_anneal_step"] + work["mcmc"] * r["mcmc_step_sec"]

    a, p = work["anneal"], work["prune_step"]
    if p is None or p >= a:
        s = per_step(work["particles"])
        return None if s is None else a * s
    before, after = per_step(work["particles"]), per_step(work["keep"])
    return None if before is None or after is None else p * before + (a - p) * after


def table(paths: List[Path], a10_sec: float = A10_EXP0_SEC) -> str:
    rows = preset_rows(paths)
    works = {e: workload(e) for e in EXPERIMENTS}
    secs = {e: {p: seconds_per_image(w, rows[p]) for p in PRESETS} for e, w in works.items()}
    base = seconds_per_image(A10_WORKLOAD, rows["exact"])
    scale = a10_sec / base if base else None
    cards = sorted({r["card"] for p in PRESETS for r in rows[p].values() if r.get("card")})
    files = sorted({r["file"] for p in PRESETS for r in rows[p].values()})
    archs = sorted({r["architecture"] for p in PRESETS for r in rows[p].values() if r.get("architecture")})

    def cell(s: Optional[float], why: str) -> str:
        return f"{s:.0f} s · {s * 100 / 3600:.1f} h" if s is not None else f"n/a ({why})"

    head = ["experiment", "workload (N particles, annealing × MCMC steps)"] + \
        [f"{p} on the H100: s/image · h/100 images" for p in PRESETS] + \
        ["A10 estimate, exact · fast: h/100 images", "not timed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e, w in works.items():
        prune = f", pruning {w['particles']}→{w['keep']} at step {w['prune_step']}" if w["prune_step"] is not None else ""
        counts = {w["particles"], w["keep"]} if w["prune_step"] is not None else {w["particles"]}
        missing = {p: "no " + " or ".join(f"{n}-particle" for n in sorted(counts - set(rows[p]))) + " row"
                   for p in PRESETS}
        a10 = " · ".join(f"{secs[e][p] * scale * 100 / 3600:.0f}" if secs[e][p] is not None and scale else "n/a"
                         for p in ("exact", "fast"))
        lines.append("| " + " | ".join([e, f"{w['particles']}, {w['anneal']} × {w['mcmc']} {w['algo']}{prune}"]
                                      + [cell(secs[e][p], missing[p]) for p in PRESETS]
                                      + [a10, ", ".join(w["untimed"]) or "—"]) + " |")
    note = (f"H100 rows from {', '.join(files)} ({', '.join(cards)}; {'; '.join(archs) or 'architecture not recorded'}, "
            "while the experiments run the ImageNet LDM; one image per batch, the presets' "
            f"switches as in configs/speed/ now; per-step times at the row's particle count, MCMC steps "
            f"scaled to each experiment's count). A10 = H100 × {a10_sec:.0f} ÷ {base:.1f} = "
            f"H100 × {scale:.2f}: the original study's exp0 on an A10 took {a10_sec:.0f} s per image at "
            f"50 annealing × 50 Langevin steps, 4 particles; the same workload on the H100, exact, computes "
            f"here to {base:.1f} s. For fast the A10 is assumed to gain what the H100 gains (not measured)."
            if base else "No 4-particle exact row: no A10 scaling.")
    return "\n".join(lines) + "\n\n" + note + "\n"


README_START, README_END = "<!-- cost table: ", "<!-- end of cost table -->"


def write_readme(path: Path, text: str, command: str) -> None:
    """Replace the block between README's cost-table markers (the first names the command)."""
    doc = path.read_text()
    start, end = doc.index(README_START), doc.index(README_END)
    path.write_text(doc[:start] + f"{README_START}{command} -->\n{text}" + doc[end:])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", nargs="+", type=Path, help="benchmark JSONs (scripts/benchmark.py --matrix)")
    ap.add_argument("--readme", type=Path, help="also write the table into this README between its markers")
    ap.add_argument("--a10-sec", type=float, default=A10_EXP0_SEC,
                    help="the original study's A10 seconds per image of exp0 (default 903)")
    args = ap.parse_args(argv)
    missing = [p for p in args.json if not p.is_file()]
    if missing:
        print(f"error: {missing[0]} does not exist", file=sys.stderr)
        return 2
    text = table(args.json, args.a10_sec)
    print(text, end="")
    if args.readme:
        if README_START not in args.readme.read_text():
            print(f"error: {args.readme} has no cost-table markers ({README_START}… / {README_END})", file=sys.stderr)
            return 2
        shown = " ".join(str(p) for p in args.json) + ("" if args.a10_sec == A10_EXP0_SEC else f" --a10-sec {args.a10_sec:g}")
        write_readme(args.readme, text, f"python scripts/cost_table.py {shown} --readme {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
