"""Turn run folders into the study's tables and plots.

    python eval/parse_metrics.py RUN_DIR [RUN_DIR ...] [--csv FILE] [--plots DIR] [--report DIR]
                                 [--brief] [--all-pairs] [--no-merge]

A RUN_DIR is a run folder (holding metrics.json, or only records/), a folder above run folders
(searched recursively) or a glob; folders written by the original study's code are read too
(eval/original.py) and marked `original`. Summaries are recomputed from `images[]`, so merged runs
are right. A folder that cannot be read is named in one line and skipped (exit 2); a bad
metrics.json is rebuilt from the folder's records/. Images of two runs are paired by index and
source hash; runs on different data sets get their own tables.

Merging rule: folders laid out as `<experiment>/<dataset>_<N>img/<run>` merge when they agree in
experiment folder, dataset and run name once the image counts are taken out: N of the dataset folder,
and the `_<M>img` token that the experiment scripts put right after the run's experiment short name
(`<exp>_<M>img…` or `<exp>_<dataset>_<M>img…`, M ≤ N; commands_gpu/_common.sh `_run_name`). So
`imagenet_10img/exp1_10img_scale10` + `imagenet_100img/exp1_90img_scale10` give one
`<experiment>/imagenet_100img/exp1_scale10` entry (the total image count, the run name without its
count); older names without the token (`imagenet_10img/r` + `imagenet_90img/r`) keep their name.
`_sanity_check` runs carry no count and stay alone. They merge only where their configs agree outside
the run's name, folder and image range (`eval/study.RUN_IDENTITY_KEYS`), their image ranges
(`data.start_id`..`data.end_id`, else the images held) follow each other and their images are
disjoint; anything else stays separate, with a note saying why.

Tables: settings and summary side by side (one column per run), a per-image table per run
(per-particle PSNR, best, std), and paired comparisons of each run with the first one
(or all pairs with --all-pairs): per-image best-PSNR differences on common image indices,
mean difference and a Wilcoxon signed-rank test. The study's sections (orientation with exact
McNemar, selection and spread, cost, repulsion, pruning, hard data consistency) come from
`eval/study.py` (numbers) and `eval/report.py` (tables, `--report DIR/report.md`); plots from
`eval/plots.py`.
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from cores.evaluation import best_psnr_any_orientation, summarize  # noqa: E402
from cores.resume import read_jsonl_latest  # noqa: E402
from cores.vram import merge_vram  # noqa: E402
from eval.markdown import fmt as _f, rate_text as _rate, table as _md  # noqa: E402
from eval.original import ORIGINAL, is_original, records as original_records  # noqa: E402
from eval.plots import write_plots  # noqa: E402
from eval.report import study_sections, write_report  # noqa: E402
from eval.study import (common_images, config_differences, cost_summary, dataset_key, lacks, pairing_notes, seconds_unit, cudnn_autotuned, image_orientation, margin_db, merged_metadata,  # noqa: E402
                        orientation_summary, PROTOCOL_KEYS, protocol_warning, repulsion_by_step, RUN_IDENTITY_KEYS, run_protocol,
                        selection_summary, spread_summary)

SIZE_RE = re.compile(r"^(?P<dataset>.+)_(?P<n>\d+)img$")


@dataclass
class Run:
    """One run (or a merged 10 + 90 pair): per-image records plus what the tables need."""

    label: str
    paths: List[Path]
    images: List[Dict]
    vram: Dict = field(default_factory=dict)
    metadata: Dict = field(default_factory=dict)
    config: Dict = field(default_factory=dict)
    repulsion: List[Dict] = field(default_factory=list)
    # one entry per run folder behind this run: path, metadata, vram, image count, summed record time
    parts: List[Dict] = field(default_factory=list)
    # "project", or "original" for a folder written by the original study's code (eval/original.py)
    origin: str = "project"

    @property
    def summary(self) -> Dict:
        s = summarize(self.images)
        if lacks(self, "success"):  # not recorded (the original's format): n/a, not 0 %
            s.update(success_rate=None, success_rate_ci95=(None, None), both_orientations_rate=None,
                     both_orientations_rate_ci95=(None, None))
        return s

    def by_image(self) -> Dict[int, Dict]:
        return {int(r["image_idx"]): r for r in self.images}


# --- loading -------------------------------------------------------------------------------
class UnreadableRun(Exception):
    """A run folder the parser cannot report: the message is the one line the user sees."""


def _read_config(path: Path) -> Dict:
    if not path.is_file():
        return {}
    try:
        import yaml

        cfg = yaml.safe_load(path.read_text())
        return cfg if isinstance(cfg, dict) else {}
    except Exception:  # a config we cannot read only costs the settings rows
        return {}


def run_label(path: Path) -> str:
    """`<experiment>/<dataset>_<N>img/<run>`: the last three components of the folder."""
    return "/".join(Path(path).resolve().parts[-3:])


def _read_metrics(path: Path) -> Tuple[Optional[Dict], str]:
    """(metrics.json as a dict, "") or (None, why not)."""
    if not (path / "metrics.json").exists():
        return None, "is missing"
    try:
        m = json.loads((path / "metrics.json").read_text())
    except OSError as err:
        return None, f"cannot be read ({err.strerror or type(err).__name__})"
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return None, f"is not valid JSON ({' '.join(str(err).split())})"
    if not isinstance(m, dict):
        return None, "is not a JSON object"
    if not is_original(m) and not isinstance(m.get("images"), list):
        return None, "has no list of images"
    return m, ""


def _rebuilt_images(path: Path, images: Sequence, why: str, totals_lost: bool) -> List[Dict]:
    """The usable entries of metrics.json's `images`, each bad or missing one replaced by its intact
    `records/<idx>.json` (the record the run wrote last; metrics.json is rebuilt from them); one note
    line says what was rebuilt or left out."""
    from cores.run_folder import RunFolder, record_problem

    good = [r for r in images if not record_problem(r)]
    out = {int(r["image_idx"]): r for r in good}
    bad = len(images) - len(good)
    if not images and not why:
        why = "lists no image"
    if why or bad:
        added = {int(r["image_idx"]): r for r in RunFolder(path).records() if int(r["image_idx"]) not in out}
        out.update(added)
        head = f"{path / 'metrics.json'} {why}" if why else f"{path / 'metrics.json'}: {bad} image entr" + \
            ("y is" if bad == 1 else "ies are") + " unreadable"
        if not out:
            raise UnreadableRun(f"{head}, and records/ holds no intact record; skipped")
        print(f"note: {head}; reporting {len(out)} image(s): {len(good)} from metrics.json, {len(added)} "
              f"rebuilt from records/" + ("; VRAM and wall time are missing" if totals_lost else ""), file=sys.stderr)
    for r in out.values():
        r.pop("saved_particles", None)
    return [out[i] for i in sorted(out)]


def load_run(path: Path) -> Run:
    """One run folder: the project's (metrics.json, else its intact records/) or the original study's
    (eval/original.py).  UnreadableRun (one line) when neither gives an image."""
    path = Path(path)
    config = _read_config(path / "config.yaml")
    m, why = _read_metrics(path)
    origin = "project"
    if m is not None and is_original(m):
        images, vram, metadata, problem = original_records(m, config)
        if problem:
            raise UnreadableRun(f"{path / 'metrics.json'} (the original study's format): {problem}; skipped")
        origin = ORIGINAL
    else:
        images = _rebuilt_images(path, (m or {}).get("images") or [], why, totals_lost=m is None)
        vram = m.get("vram") if m is not None and isinstance(m.get("vram"), dict) else {}
        metadata = m.get("metadata") if m is not None and isinstance(m.get("metadata"), dict) else {}
    if not images:
        raise UnreadableRun(f"{path / 'metrics.json'} holds no image; skipped")
    # the log's last line per (image, step) for the images metrics.json reports (a redone image
    # after a resume appends its lines again)
    repulsion = [r for r in read_jsonl_latest(path / "repulsion.jsonl", images=[r["image_idx"] for r in images])
                 if isinstance(r, dict)]
    part = {"path": str(path), "metadata": metadata, "vram": vram, "images": len(images),
            "record_time_sec": float(sum(_vals(r.get("time_sec") for r in images)))}
    label = run_label(path) + (f" ({ORIGINAL})" if origin == ORIGINAL else "")
    return Run(label=label, paths=[path], images=images, vram=vram, metadata=metadata, config=config,
               repulsion=repulsion, parts=[part], origin=origin)


def is_run_folder(p: Path) -> bool:
    """A folder holding metrics.json, or per-image records (a run whose metrics.json was lost)."""
    return (p / "metrics.json").is_file() or (p / "records").is_dir() and any((p / "records").glob("*.json"))


def find_run_dirs(args: Iterable[str], missed: Optional[List[str]] = None) -> List[Path]:
    """Run folders named by the arguments (folders, parents of run folders, globs), in order, once each.
    An argument that names none gets one line and is appended to `missed`."""
    out: List[Path] = []
    seen = set()
    missed = [] if missed is None else missed
    for arg in args:
        matches = sorted(glob.glob(arg)) if glob.has_magic(arg) else [arg]
        if not matches:
            print(f"error: {arg}: no match", file=sys.stderr)
            missed.append(arg)
        for p in map(Path, matches):
            if not p.exists():
                print(f"error: {p} does not exist", file=sys.stderr)
                missed.append(str(p))
                continue
            if is_run_folder(p):
                found = [p]
            elif p.is_dir():
                found = sorted({q.parent.parent if q.parent.name == "records" else q.parent
                                for q in p.rglob("*.json") if ".hydra_logs" not in q.parts
                                and (q.name == "metrics.json" or q.parent.name == "records")})
                found = [q for q in found if is_run_folder(q)]
            else:
                found = []
            if not found:
                print(f"error: {p}: no metrics.json" + (" in it or below it" if p.is_dir() else
                                                        " (a file, not a run folder)"), file=sys.stderr)
                missed.append(str(p))
            for q in found:
                key = q.resolve()
                if key not in seen:
                    seen.add(key)
                    out.append(q)
    return out


def merge_key(path: Path) -> Optional[Tuple[str, str, str]]:
    """(experiment, dataset, run name without its image count) of a `<experiment>/<dataset>_<N>img/<run>`
    folder, else None.  The count taken out of the run name is only the scripts' `_<M>img` token right
    after the experiment short name (optionally followed by the dataset), with M ≤ N."""
    p = Path(path).resolve()
    m = SIZE_RE.match(p.parent.name)
    if not m:
        return None
    dataset, name = m.group("dataset"), p.name
    token = re.match(rf"^(?P<head>[^_]+(?:_{re.escape(dataset)})?)_(?P<m>\d+)img(?P<tail>_.+)?$", name)
    if token and int(token.group("m")) <= int(m.group("n")):
        name = token.group("head") + (token.group("tail") or "")
    return p.parent.parent.name, dataset, name


def image_range(run: "Run") -> Tuple[int, int]:
    """[start, end) of the images a run was asked for: `data.start_id`/`data.end_id` of its config, else
    the span of the images it holds."""
    data = run.config.get("data") if isinstance(run.config, dict) else None
    ids = [int(r["image_idx"]) for r in run.images]
    lo, hi = (min(ids), max(ids) + 1) if ids else (0, 0)
    if isinstance(data, dict):
        start, end = data.get("start_id"), data.get("end_id")
        if isinstance(start, int) and not isinstance(start, bool):
            lo = start
        if isinstance(end, int) and not isinstance(end, bool) and end > lo:
            hi = end
    return lo, hi


def merge_obstacle(chain: Sequence["Run"], run: "Run") -> Optional[str]:
    """Why `run` cannot extend the merged `chain` (None where it can): it must have the same config
    outside the run's name, folder and image range, start where the chain ends, and share no image."""
    diff = config_differences(chain[0].config, run.config, skip=RUN_IDENTITY_KEYS)
    if diff:
        return f"their configs differ in {', '.join(diff)}"
    held = {int(im["image_idx"]) for r in chain for im in r.images}
    if held & {int(im["image_idx"]) for im in run.images}:
        return "their images overlap"
    if image_range(run)[0] != image_range(chain[-1])[1]:
        return (f"their image ranges {image_range(chain[-1])[0]}..{image_range(chain[-1])[1]} and "
                f"{image_range(run)[0]}..{image_range(run)[1]} do not follow each other")
    return None


def merge_runs(runs: Sequence[Run]) -> Run:
    """One entry from runs of the same experiment/dataset/run name with disjoint images; metadata keeps
    the totals (times summed, VRAM max, hook summaries recomputed from the records)."""
    images = sorted((r for run in runs for r in run.images), key=lambda r: r["image_idx"])
    parts = [p for r in runs for p in r.parts]
    exp, dataset, name = merge_key(runs[0].paths[0])
    origin = runs[0].origin
    return Run(label=f"{exp}/{dataset}_{len(images)}img/{name}" + (f" ({ORIGINAL})" if origin == ORIGINAL else ""),
               paths=[p for r in runs for p in r.paths], images=images, vram=merge_vram([r.vram for r in runs]),
               metadata=merged_metadata(parts, images), config=runs[0].config,
               repulsion=[row for r in runs for row in r.repulsion], parts=parts, origin=origin)


def load_runs(dirs: Sequence[Path], merge: bool = True) -> List[Run]:
    """Load run folders, merging `_<N>img` siblings of one run (first-seen order kept)."""
    runs = [load_run(d) for d in dirs]
    return regroup(runs) if merge else _unique_labels(runs)


def regroup(runs: Sequence[Run]) -> List[Run]:
    """Merge the runs of one merge key whose image ranges follow each other (first-seen order kept):
    runs sorted by range start (longer first) extend a chain while `merge_obstacle` allows; what is left
    forms further chains; a run left alone in a group of several gets a note saying why."""
    groups: Dict[object, List[Run]] = {}
    order: List[object] = []
    for i, r in enumerate(runs):
        key = (merge_key(r.paths[0]), r.origin) if merge_key(r.paths[0]) else ("__single__", i)
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(r)
    out: List[Run] = []
    for key in order:
        left = sorted(groups[key], key=lambda r: (image_range(r)[0], -image_range(r)[1]))
        why: Dict[int, str] = {}
        while left:
            chain, rest = [left[0]], []
            for r in left[1:]:
                problem = merge_obstacle(chain, r)
                if problem:
                    why.setdefault(id(r), f"{chain[0].label}: {problem}")
                    rest.append(r)
                else:
                    chain.append(r)
            left = rest
            if len(chain) > 1:
                out.append(merge_runs(chain))
            else:
                out.append(chain[0])
                if id(chain[0]) in why:
                    print(f"note: not merging {chain[0].label} with {why[id(chain[0])]}", file=sys.stderr)
    return _unique_labels(out)


def _unique_labels(runs: List[Run]) -> List[Run]:
    seen: Dict[str, int] = {}
    for r in runs:
        if r.label in seen:
            seen[r.label] += 1
            r.label = f"{r.label}#{seen[r.label]}"
        else:
            seen[r.label] = 1
    return runs


# --- numbers ---------------------------------------------------------------------------------
def _vals(xs: Iterable) -> List[float]:
    return [float(x) for x in xs if x is not None and math.isfinite(float(x))]


def image_stats(rec: Dict) -> Dict:
    """Per-image numbers: best / mean / std (ddof 1) / selected PSNR, best SSIM and LPIPS."""
    p = _vals(rec.get("psnr", []))
    best_idx, sel_idx = rec.get("best_idx"), rec.get("selected_idx")
    return {
        "image_idx": int(rec["image_idx"]),
        "num_particles": len(rec.get("psnr", [])),
        "best_psnr": rec["psnr"][best_idx] if best_idx is not None else None,
        "mean_psnr": float(np.mean(p)) if p else None,
        "std_psnr": float(np.std(p, ddof=1)) if len(p) > 1 else (0.0 if p else None),
        "selected_psnr": rec["psnr"][sel_idx] if sel_idx is not None else None,
        "best_ssim": max(_vals(rec.get("ssim", [])), default=None),
        "best_lpips": min(_vals(rec.get("lpips", [])), default=None),
        "success": None if rec.get("success") is None else bool(rec["success"]),
        "both_orientations": None if rec.get("both_orientations") is None else bool(rec["both_orientations"]),
        "time_sec": rec.get("time_sec"),
    }


def wilcoxon_test(d: np.ndarray) -> Tuple[Optional[float], Optional[float], str]:
    """(statistic, p-value, note) of a two-sided Wilcoxon signed-rank test of paired differences."""
    if d.size < 2:
        return None, None, f"n={d.size} < 2"
    if not np.any(d != 0):
        return None, None, "all differences 0"
    from scipy.stats import wilcoxon

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = wilcoxon(d)
        return float(res.statistic), float(res.pvalue), ""
    except ValueError as err:
        return None, None, str(err)


def paired_comparison(a: Run, b: Run) -> Dict:
    """Best-PSNR differences b − a on common image indices with a Wilcoxon signed-rank test; the same for
    the best PSNR in any orientation (`any_*` keys: a particle on the 180° twin is a valid solution)."""
    ia, ib = a.by_image(), b.by_image()
    common = common_images(a, b)[0]
    rows = []
    for i in common:
        pa, pb = image_stats(ia[i])["best_psnr"], image_stats(ib[i])["best_psnr"]
        if pa is not None and pb is not None:
            rows.append({"image_idx": i, "a": pa, "b": pb, "diff": pb - pa})
    d = np.array([r["diff"] for r in rows], dtype=float)
    out: Dict = {"a": a.label, "b": b.label, "n": len(rows), "rows": rows,
                 "mean_diff": float(d.mean()) if d.size else None,
                 "median_diff": float(np.median(d)) if d.size else None,
                 "wins": int((d > 0).sum()), "losses": int((d < 0).sum()), "ties": int((d == 0).sum())}
    out["wilcoxon_stat"], out["p_value"], out["test_note"] = wilcoxon_test(d)
    any_a = {i: best_psnr_any_orientation(ia[i]) for i in common}
    any_b = {i: best_psnr_any_orientation(ib[i]) for i in common}
    d_any = np.array([any_b[i] - any_a[i] for i in common if any_a[i] is not None and any_b[i] is not None],
                     dtype=float)
    out["any_n"] = int(d_any.size)
    out["any_mean_diff"] = float(d_any.mean()) if d_any.size else None
    _, out["any_p_value"], out["any_test_note"] = wilcoxon_test(d_any)
    if lacks(a, "success") or lacks(b, "success"):  # not recorded in a run's format
        out["success_gained"] = out["success_lost"] = None
        return out
    succ_a = {i: bool(ia[i].get("success")) for i in common}
    succ_b = {i: bool(ib[i].get("success")) for i in common}
    out["success_gained"] = sum(succ_b[i] and not succ_a[i] for i in common)
    out["success_lost"] = sum(succ_a[i] and not succ_b[i] for i in common)
    return out


# --- formatting -------------------------------------------------------------------------------
def _cfg(run: Run, key: str):
    return run.config.get(key) if isinstance(run.config, dict) else None


def settings_rows(runs: Sequence[Run]) -> List[List[str]]:
    def model(r):
        m, d = _cfg(r, "model"), _cfg(r, "data")
        name = m.get("name") if isinstance(m, dict) else m
        if isinstance(m, dict) and m.get("diffusion_path"):
            name = f"{name} ({Path(str(m['diffusion_path'])).stem})"
        return f"{name} / {d.get('name')}" if isinstance(d, dict) else str(name)

    def prune(r):
        s = _cfg(r, "pruning_step")
        if s is None:
            return "n/a"
        if int(s) < 0:
            return "off"
        return f"step {s}, keep {_cfg(r, 'pruning_keep')}, {_cfg(r, 'pruning_criterion')}, {_cfg(r, 'pruning_mode')}"

    def hdc(r):
        v = _cfg(r, "hard_data_consistency")
        return "n/a" if v is None else ("on" if int(v) == 1 else "off")

    def rep(r):
        s, rho = _cfg(r, "repulsion_scale"), _cfg(r, "repulsion_target_ratio")
        if s is None:
            return "n/a"
        if rho is not None and float(rho) > 0:
            s = f"ratio {rho}"
        elif float(s) == 0:
            return "0"
        return (f"{s} ({_cfg(r, 'repulsion_feature')}, σ_break {_cfg(r, 'repulsion_sigma_break')}, "
                f"{_cfg(r, 'repulsion_schedule')})")

    protocols = [run_protocol(r) for r in runs]

    def lpips_net(r):
        if r.origin == ORIGINAL:  # its eval.py: piq.LPIPS(replace_pooling=True), VGG
            return "vgg (piq, the original's eval.py)"
        nets = {str(i["lpips_net"]) for i in r.images if i.get("lpips_net")}
        ev = _cfg(r, "eval")
        if not nets and isinstance(ev, dict) and ev.get("lpips_net"):
            nets = {str(ev["lpips_net"])}
        return "+".join(sorted(nets)) or "alex (before eval.lpips_net)"

    return [["model"] + [str(model(r)) for r in runs],
            ["particles"] + [str(_cfg(r, "num_samples")) for r in runs],
            ["repulsion"] + [rep(r) for r in runs],
            ["pruning"] + [prune(r) for r in runs],
            ["optimisation"] + [hdc(r) for r in runs]] + [
        [label] + [p[key] or "n/a" for p in protocols] for key, label in PROTOCOL_ROWS] + [
        ["seed"] + [str(_cfg(r, "seed")) if _cfg(r, "seed") is not None else "n/a" for r in runs],
        ["LPIPS network"] + [lpips_net(r) for r in runs]]


PROTOCOL_ROWS = (("preset", "speed preset"), ("precision", "precision"), ("deterministic", "deterministic"),
                 ("batch_size", "images per batch"), ("device", "device"), ("gpu_name", "GPU"))


BEST_PSNR_ROW = "best PSNR (dB), mean ± std (std over images, ddof 0)"
BEST_ANY_ROW = "best PSNR any orientation (dB), mean ± std (ddof 0)"


def summary_table(runs: Sequence[Run]) -> str:
    """Settings and summary metrics, one column per run."""
    sums = [r.summary for r in runs]
    rows = [["code"] + [r.origin for r in runs]] if any(r.origin != "project" for r in runs) else []
    rows += settings_rows(runs) if any(r.config for r in runs) else []

    def row(name, fn):
        rows.append([name] + [fn(r, s) for r, s in zip(runs, sums)])

    row("images", lambda r, s: str(s["num_images"]))
    row(BEST_PSNR_ROW, lambda r, s: f"{_f(s['best_psnr']['mean'])} ± {_f(s['best_psnr']['std'])}")
    row(BEST_ANY_ROW, lambda r, s: f"{_f(s['best_psnr_any_orientation']['mean'])} ± "
                                   f"{_f(s['best_psnr_any_orientation']['std'])}")
    row("mean of per-image means (dB)", lambda r, s: _f(s["mean_of_mean_psnr"]))
    row("selected-by-loss PSNR (dB)", lambda r, s: _f(s["selected_psnr_mean"]))
    row("best SSIM", lambda r, s: _f(s["best_ssim_mean"], "{:.3f}"))
    row("best LPIPS", lambda r, s: _f(s["best_lpips_mean"], "{:.3f}"))
    row("success rate [95% CI]", lambda r, s: "n/a (not recorded)" if lacks(r, "success") else
        _rate(sum(bool(i.get("success")) for i in r.images), s["num_images"]))
    row("both orientations [95% CI]", lambda r, s: "n/a (not recorded)" if lacks(r, "success") else
        _rate(sum(bool(i.get("both_orientations")) for i in r.images), s["num_images"]))
    row("final particles / image",
        lambda r, s: _f(float(np.mean([len(i.get("psnr", [])) for i in r.images])) if r.images else None, "{:.1f}"))
    row("time / image (s)", lambda r, s: _f(s["time_per_image_sec"], "{:.1f}"))
    row("total time (s)", lambda r, s: _f(s["total_time_sec"], "{:.1f}"))
    row("peak VRAM (MB)", lambda r, s: _f(r.vram.get("peak_memory_mb"), "{:.0f}") + (
        " (incl. cuDNN benchmark autotuning)" if cudnn_autotuned(r) and r.vram.get("peak_memory_mb") else ""))
    row("VRAM segments (MB)", lambda r, s: ", ".join(f"{k} {_f(v, '{:.0f}')}" for k, v in
                                                     (r.vram.get("segments") or {}).items()) or "none")
    if any("segments_reserved" in r.vram for r in runs):
        row("VRAM segments reserved (MB)", lambda r, s: ", ".join(
            f"{k} {_f(v, '{:.0f}')}" for k, v in (r.vram.get("segments_reserved") or {}).items()) or "n/a")
    if any(r.repulsion for r in runs):
        def rep(r, key, which):
            steps = repulsion_by_step(r)
            vals = [(st, v[key]) for st, v in steps.items() if v[key] is not None]
            if not vals:
                return "n/a"
            return _f(vals[0][1] if which == "first" else vals[-1][1], "{:.3g}")

        row("repulsion ratio at first logged step, last drift evaluation (the original's)",
            lambda r, s: rep(r, "ratio", "first"))
        row("repulsion ratio at first logged step, per particle at σ_i", lambda r, s: rep(r, "ratio_at_sigma", "first"))
        row("pairwise feature dist, first → last step",
            lambda r, s: f"{rep(r, 'dist', 'first')} → {rep(r, 'dist', 'last')}")
    return _md(["metric"] + [r.label for r in runs], rows)


def _yes_no(v: Optional[bool]) -> str:
    return "n/a" if v is None else ("yes" if v else "no")


def per_image_table(run: Run) -> str:
    pids = sorted({int(p) for rec in run.images for p in rec.get("particle_ids", range(len(rec.get("psnr", []))))})
    rows = []
    for rec in run.images:
        st = image_stats(rec)
        ids = rec.get("particle_ids", list(range(len(rec.get("psnr", [])))))
        by_pid = dict(zip((int(i) for i in ids), rec.get("psnr", [])))
        rows.append([str(st["image_idx"])] + [_f(by_pid.get(p)) if p in by_pid else "–" for p in pids]
                    + [_f(st["best_psnr"]), _f(st["std_psnr"]), _f(st["selected_psnr"]),
                       _yes_no(st["success"]), _yes_no(st["both_orientations"])])
    header = ["image"] + [f"p{p}" for p in pids] + ["best", "std", "selected", "success", "both"]
    return f"### {run.label} — PSNR (dB) per particle\n\n" + _md(header, rows)


def comparison_tables(comps: Sequence[Dict], per_image: bool = True) -> str:
    rows = []
    for c in comps:
        test = (f"W={c['wilcoxon_stat']:.1f}, p={c['p_value']:.3g}" if c["p_value"] is not None
                else f"n/a ({c['test_note']})")
        any_test = (f"p={c['any_p_value']:.3g}" if c.get("any_p_value") is not None
                    else f"n/a ({c.get('any_test_note', '')})")
        rows.append([c["b"], c["a"], str(c["n"]), _f(c["mean_diff"], "{:+.2f}"), _f(c["median_diff"], "{:+.2f}"),
                     f"{c['wins']}/{c['losses']}/{c['ties']}",
                     "n/a" if c["success_gained"] is None else f"+{c['success_gained']} / −{c['success_lost']}",
                     test, _f(c.get("any_mean_diff"), "{:+.2f}"), any_test])
    out = [_md(["run B", "vs run A", "common images", "mean Δ best PSNR (B−A, dB)", "median Δ",
                "B better/worse/tie", "success gained/lost", "Wilcoxon signed-rank",
                "mean Δ best PSNR any orientation (dB)", "Wilcoxon (any orientation)"], rows)]
    if per_image:
        for c in comps:
            out.append(f"#### Δ best PSNR per image: {c['b']} − {c['a']}\n\n" + _md(
                ["image", "A", "B", "B − A"],
                [[str(r["image_idx"]), _f(r["a"]), _f(r["b"]), _f(r["diff"], "{:+.2f}")] for r in c["rows"]]))
    return "\n\n".join(out)


def by_dataset(runs: Sequence[Run]) -> List[Tuple[str, List[Run]]]:
    """Runs grouped by the data set they read (first-seen order): each group is reported and paired apart."""
    groups: Dict[str, List[Run]] = {}
    for r in runs:
        groups.setdefault(dataset_key(r), []).append(r)
    return list(groups.items())


def report(runs: Sequence[Run], all_pairs: bool = False, brief: bool = False) -> str:
    """Every table: summary, the study's sections, paired best-PSNR comparisons, then per image; one
    part per data set when the runs read several (runs of different data sets are never paired)."""
    groups = by_dataset(runs)
    if len(groups) == 1:
        return group_report(runs, all_pairs, brief)
    return "\n\n".join(f"# Data set: {name}\n\n" + group_report(rs, all_pairs, brief).rstrip()
                        for name, rs in groups) + "\n"


def group_report(runs: Sequence[Run], all_pairs: bool = False, brief: bool = False) -> str:
    """The tables of runs of one data set."""
    pairs = run_pairs(runs, all_pairs)
    warnings_ = pair_warnings(pairs)
    unit_warning = seconds_unit(runs)[1]
    if unit_warning:
        warnings_.append(unit_warning)
    pairs = [(a, b) for a, b in pairs if common_images(a, b)[0]]  # a pair without common images is not tested
    parts = ["## Summary\n\n" + summary_table(runs)] + study_sections(runs, pairs)
    if warnings_:  # first, where it cannot be missed: paired numbers below mix in these differences
        parts.insert(0, "\n".join(f"> {w}" for w in warnings_))
    if pairs:
        parts.append("## Paired comparisons (best PSNR, common images)\n\n"
                     + comparison_tables([paired_comparison(a, b) for a, b in pairs], not brief))
    if not brief:
        parts.append("## Per image\n\n" + "\n\n".join(per_image_table(r) for r in runs))
    return "\n\n".join(parts) + "\n"


def pair_warnings(pairs: Sequence[Tuple[Run, Run]]) -> List[str]:
    """One line per compared pair whose protocol, seed or image set differs, or whose images differ in
    content or pair by index only (eval/study.py)."""
    out = []
    for a, b in pairs:
        notes = pairing_notes(a, b)
        if not (notes and common_images(a, b)[0] == []):  # a pair not compared needs no protocol warning
            w = protocol_warning(a, b)
            if w:
                out.append(w)
        out += notes
    return out


def run_pairs(runs: Sequence[Run], all_pairs: bool = False) -> List[Tuple[Run, Run]]:
    """Each run against the first one (the baseline), or every pair with all_pairs."""
    if all_pairs:
        return [(runs[i], runs[j]) for i in range(len(runs)) for j in range(i + 1, len(runs))]
    return [(runs[0], r) for r in runs[1:]]


def compare_all(runs: Sequence[Run], all_pairs: bool = False) -> List[Dict]:
    """Paired comparisons within each data set, of the pairs that share images."""
    return [paired_comparison(a, b) for _, rs in by_dataset(runs) for a, b in run_pairs(rs, all_pairs)
            if common_images(a, b)[0]]


# --- CSV and plots --------------------------------------------------------------------------
CSV_FIELDS = ["run", "image_idx", "num_particles", "best_psnr", "mean_psnr", "std_psnr", "selected_psnr",
              "best_ssim", "best_lpips", "success", "both_orientations", "time_sec", "particle_psnr",
              "correct_orientation_found", "both_orientations_any", "orientation", "selected_is_best"]


PROTOCOL_CSV = [f"protocol_{k}" for k in PROTOCOL_KEYS]


def write_csv(runs: Sequence[Run], path: Path) -> Tuple[Path, Path]:
    """Per-image rows to `path`, one summary row per run to `<stem>_summary.csv`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in runs:
            margin = margin_db(r.config)
            for rec in r.images:
                st = image_stats(rec)
                st["particle_psnr"] = ";".join(_f(v, "{:.4f}") for v in rec.get("psnr", []))
                o = None if lacks(r, "orientation") else image_orientation(rec, margin)  # not recorded: empty
                st.update({k: o[k] if o else None for k in ("correct_orientation_found", "both_orientations_any")},
                          orientation=";".join(o["orientation"]) if o else None,
                          selected_is_best=(rec.get("best_idx") == rec.get("selected_idx")
                                            if None not in (rec.get("best_idx"), rec.get("selected_idx")) else None))
                w.writerow({"run": r.label, **{k: st[k] for k in CSV_FIELDS[1:]}})
    spath = path.with_name(path.stem + "_summary.csv")
    with spath.open("w", newline="") as fh:
        fields = ["run", "num_images", "best_psnr_mean", "best_psnr_std", "mean_of_mean_psnr", "selected_psnr_mean",
                  "best_ssim_mean", "best_lpips_mean", "success_rate", "success_ci_low", "success_ci_high",
                  "both_orientations_rate", "both_ci_low", "both_ci_high", "time_per_image_sec", "peak_memory_mb",
                  "gpu_sec_per_image", "selection_accuracy", "correct_orientation_rate", "both_orientations_any_rate",
                  "psnr_spread_mean", "success_per_gpu_hour", "both_orientations_per_gpu_hour",
                  "best_psnr_any_orientation_mean", "best_psnr_any_orientation_std", "std_ddof", "peak_reserved_mb",
                  "tflop_per_image", "peak_includes_autotuning", *PROTOCOL_CSV]
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        for r in runs:
            s = r.summary
            cost, o = cost_summary(r), orientation_summary(r)
            w.writerow({"run": r.label, "num_images": s["num_images"], "best_psnr_mean": s["best_psnr"]["mean"],
                        "best_psnr_std": s["best_psnr"]["std"], "mean_of_mean_psnr": s["mean_of_mean_psnr"],
                        "selected_psnr_mean": s["selected_psnr_mean"], "best_ssim_mean": s["best_ssim_mean"],
                        "best_lpips_mean": s["best_lpips_mean"], "success_rate": s["success_rate"],
                        "success_ci_low": s["success_rate_ci95"][0], "success_ci_high": s["success_rate_ci95"][1],
                        "both_orientations_rate": s["both_orientations_rate"],
                        "both_ci_low": s["both_orientations_rate_ci95"][0],
                        "both_ci_high": s["both_orientations_rate_ci95"][1],
                        "time_per_image_sec": s["time_per_image_sec"],
                        "peak_memory_mb": cost["peak_memory_mb"], "gpu_sec_per_image": cost["gpu_sec_per_image"],
                        "selection_accuracy": selection_summary(r)["accuracy"]["rate"],
                        "correct_orientation_rate": None if lacks(r, "orientation") else o["correct"]["rate"],
                        "both_orientations_any_rate": None if lacks(r, "orientation") else o["both_any"]["rate"],
                        "psnr_spread_mean": spread_summary(r)["psnr_std"]["mean"],
                        "success_per_gpu_hour": cost["success_per_gpu_hour"],
                        "both_orientations_per_gpu_hour": cost["both_orientations_per_gpu_hour"],
                        "best_psnr_any_orientation_mean": s["best_psnr_any_orientation"]["mean"],
                        "best_psnr_any_orientation_std": s["best_psnr_any_orientation"]["std"],
                        "std_ddof": s["std_ddof"], "peak_reserved_mb": cost["peak_reserved_mb"],
                        "tflop_per_image": cost["tflop_per_image"],
                        "peak_includes_autotuning": cost["peak_includes_autotuning"],
                        **{f"protocol_{k}": v for k, v in run_protocol(r).items()}})
    return path, spath


def output_problem(args) -> Optional[str]:
    """One line when an output target cannot be written as asked (checked before any work)."""
    for flag, path, kind in (("--report", args.report, "folder"), ("--plots", args.plots, "folder"),
                             ("--csv", args.csv, "file")):
        if path is None:
            continue
        if kind == "folder" and path.exists() and not path.is_dir():
            return f"{flag} {path}: a file of that name exists; give a folder (the report and plots go into it)"
        if kind == "file" and path.is_dir():
            return f"{flag} {path}: a folder of that name exists; give a file name"
        blocker = next((q for q in path.parents if q.exists()), None)  # the deepest folder above that exists
        if blocker is not None and not blocker.is_dir():
            return f"{flag} {path}: {blocker} is a file, not a folder"
    return None


def load_readable(dirs: Sequence[Path], merge: bool) -> Tuple[List[Run], int]:
    """The runs that can be reported, and how many folders were skipped (each named in one line)."""
    runs, skipped = [], 0
    for d in dirs:
        try:
            run = load_run(d)
            report([run], brief=True)  # every table of this folder alone: a record the tables cannot use
        except UnreadableRun as err:
            print(f"error: {err}", file=sys.stderr)
            skipped += 1
            continue
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, ZeroDivisionError) as err:
            print(f"error: {d / 'metrics.json'}: a value the tables cannot use ({type(err).__name__}: "
                  f"{' '.join(str(err).split())[:120]}); skipped", file=sys.stderr)
            skipped += 1
            continue
        runs.append(run)
    return (regroup(runs) if merge else _unique_labels(runs)), skipped


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run folders, folders above them, or globs")
    ap.add_argument("--csv", type=Path, help="per-image CSV (and <stem>_summary.csv)")
    ap.add_argument("--plots", type=Path, help="folder for PNG plots")
    ap.add_argument("--all-pairs", action="store_true", help="compare every pair, not each run with the first")
    ap.add_argument("--brief", action="store_true", help="leave out the per-image tables")
    ap.add_argument("--no-merge", action="store_true", help="keep the --10 and --90 folders of a run separate")
    ap.add_argument("--methods", action="store_true",
                    help="the method table per dataset (automatic when a ReSample run is among the runs)")
    ap.add_argument("--report", type=Path, metavar="DIR",
                    help="write DIR/report.md with every table, the run folders and settings, and the plots")
    args = ap.parse_args(argv)
    problem = output_problem(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    missed: List[str] = []
    dirs = find_run_dirs(args.runs, missed)
    if not dirs:
        print("error: no run folder with a metrics.json found", file=sys.stderr)
        return 2
    runs, skipped = load_readable(dirs, merge=not args.no_merge)
    skipped += len(missed)
    if not runs:
        print("error: none of the run folders could be read", file=sys.stderr)
        return 2
    body = report(runs, all_pairs=args.all_pairs, brief=args.brief)
    if args.methods or any((r.config.get("sampler") or {}).get("name") == "resample" for r in runs
                           if isinstance(r.config, dict) and isinstance(r.config.get("sampler") or {}, dict)):
        from eval.methods import method_tables   # Exp5 with baselines: DAPS / ReSample / the method

        body += "\n\n## Methods\n\n" + method_tables(runs, paired_comparison)
    print(body)
    if args.report:
        shown = list(argv) if argv is not None else sys.argv[1:]
        print(f"wrote {write_report(runs, args.report, body, shown)}", file=sys.stderr)
    if args.csv:
        for p in write_csv(runs, args.csv):
            print(f"wrote {p}", file=sys.stderr)
    if args.plots:
        for p in write_plots(runs, args.plots):
            print(f"wrote {p}", file=sys.stderr)
    if skipped:
        print(f"error: {skipped} path(s) or run folder(s) skipped (named above); the tables hold the others",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
