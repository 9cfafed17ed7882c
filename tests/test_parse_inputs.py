"""What the parser is given: the original study's run folders, images from different sources, run
folders on different devices, and damaged folders or paths (one line each, never a traceback)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from eval import parse_metrics as pm
from tests.conftest import FIXTURES

ORIGINAL_RUN = FIXTURES / "original_run" / "exp0_baseline" / "imagenet_2img" / "exp0_2img"


def rec(idx: int, psnr: List[float], sha: Optional[str] = None, twin: Optional[List[float]] = None) -> Dict:
    n = len(psnr)
    best = max(range(n), key=lambda k: psnr[k])
    out = {"image_idx": idx, "particle_ids": list(range(n)), "psnr": psnr, "ssim": [0.5] * n, "lpips": [None] * n,
           "psnr_twin": twin or [5.0] * n, "measurement_loss": [1.0] * n, "best_idx": best, "selected_idx": 0,
           "success": psnr[best] >= 20, "both_orientations": False, "time_sec": 2.0}
    if sha is not None:
        out.update(source_file=f"{idx:05d}.png", source_sha256=sha)
    return out


def project_run(root: Path, rel: str, images: List[Dict], data_root: str = "datasets/test-imagenet",
                device: Optional[str] = "cuda:0") -> Path:
    d = root / rel
    (d / "records").mkdir(parents=True)
    for r in images:
        (d / "records" / f"{r['image_idx']:05d}.json").write_text(json.dumps(r))
    meta = {"wall_time_sec": 10.0, **({"device": device} if device else {})}
    (d / "metrics.json").write_text(json.dumps({"images": images, "summary": {}, "metadata": meta,
                                                "vram": {"peak_memory_mb": 100.0, "segments": {}}}))
    (d / "config.yaml").write_text(yaml.safe_dump({"data": {"name": Path(data_root).name, "root": data_root},
                                                   "num_samples": len(images[0]["psnr"]), "seed": 42}))
    return d


def cell(table: str, metric: str, col: int = 0) -> str:
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == metric:
            return cells[1 + col]
    raise KeyError(metric)


# --- the original study's run folders ------------------------------------------------------------------
def test_original_folder_is_read_as_the_original_wrote_it():
    m = json.loads((ORIGINAL_RUN / "metrics.json").read_text())
    run = pm.load_run(ORIGINAL_RUN)
    assert run.origin == "original" and run.label.endswith("(original)")
    # entry k is image data.start_id + k (start_id 1 in this folder's config.yaml)
    assert [r["image_idx"] for r in run.images] == [1, 2]
    for k, r in enumerate(run.images):
        assert r["psnr"] == m["psnr"]["per_image"][k]["samples"]
        assert r["psnr"][r["best_idx"]] == m["psnr"]["per_image"][k]["best"]
        assert r["ssim"] == m["ssim"]["per_image"][k]["samples"]
        assert r["lpips"] == m["lpips"]["per_image"][k]["samples"]
        assert r["time_sec"] == m["metadata"]["timing"]["per_image_seconds"][k]
    s = run.summary
    assert s["best_psnr"]["mean"] == pytest.approx(m["psnr"]["overall"]["best_mean"])
    assert s["best_psnr"]["std"] == pytest.approx(m["psnr"]["overall"]["best_std"])
    assert s["mean_of_mean_psnr"] == pytest.approx(m["psnr"]["overall"]["mean_of_means"])
    assert s["best_ssim_mean"] == pytest.approx(m["ssim"]["overall"]["best_mean"])
    assert s["best_lpips_mean"] == pytest.approx(m["lpips"]["overall"]["best_mean"])
    # written where CUDA could not measure (available: false): missing, not 0 MB
    assert m["metadata"]["vram"]["peak_memory_mb"] == 0.0 and run.vram["peak_memory_mb"] is None
    assert s["success_rate"] is None and s["selected_psnr_mean"] is None


def test_original_beside_project_run_marked_original(tmp_path, capsys):
    ours = project_run(tmp_path, "exp0_baseline/imagenet_2img/exp0_main",
                       [rec(1, [30.0, 20.0], "a" * 64), rec(2, [25.0, 21.0], "b" * 64)])
    assert pm.main([str(ORIGINAL_RUN), str(ours), "--brief"]) == 0
    out, err = capsys.readouterr()
    label = "exp0_baseline/imagenet_2img/exp0_2img (original)"
    assert "# Data set" not in out  # one data set (test-imagenet): one set of tables, side by side
    for heading in ("## Summary", "## Orientation", "## Cost", "## Paired comparisons"):
        part = out.split(heading, 1)[1].split("\n## ", 1)[0]
        assert label in part, heading
    summary = out.split("## Summary", 1)[1]
    assert cell(summary, "code", 0) == "original" and cell(summary, "code", 1) == "project"
    assert cell(summary, "success rate [95% CI]", 0) == "n/a (not recorded)"
    assert cell(summary, "peak VRAM (MB)", 0) == "n/a" and cell(summary, "peak VRAM (MB)", 1) == "100"
    assert cell(summary, "images per batch", 0) == "1"
    assert "paired by index only" in out  # the original records no source hash
    assert "Traceback" not in err


# --- pairing by content ---------------------------------------------------------------------------------
def test_runs_on_different_data_sets_are_not_paired(tmp_path, capsys):
    a = project_run(tmp_path, "exp5_final/imagenet_2img/exp5_main",
                    [rec(0, [30.0, 20.0], "a" * 64), rec(1, [28.0, 20.0], "b" * 64)], "datasets/test-imagenet")
    b = project_run(tmp_path, "exp5_final/ffhq_2img/exp5_main",
                    [rec(0, [10.0, 5.0], "c" * 64), rec(1, [9.0, 5.0], "d" * 64)], "datasets/test-ffhq")
    assert pm.main([str(tmp_path / "exp5_final"), "--brief"]) == 0
    out = capsys.readouterr().out
    assert "# Data set: test-imagenet" in out and "# Data set: test-ffhq" in out
    assert "## Paired comparisons" not in out and "Wilcoxon signed-rank |" not in out
    assert pm.compare_all(pm.load_runs([a, b])) == []


def test_same_index_other_content_is_not_paired(tmp_path, capsys):
    a = project_run(tmp_path, "e/x_3img/a", [rec(i, [30.0, 20.0], f"{i}" * 64) for i in range(3)])
    b = project_run(tmp_path, "e/x_3img/b", [rec(i, [20.0, 10.0], f"{i + 5}" * 64) for i in range(3)])
    assert pm.main([str(a), str(b), "--brief"]) == 0
    out = capsys.readouterr().out
    assert "hold different images" in out and "not compared" in out
    assert "## Paired comparisons" not in out and "### Paired orientation outcomes" not in out
    # two of three agree in content: only those are common images
    c = project_run(tmp_path, "e/x_3img/c", [rec(i, [20.0, 10.0], f"{i if i < 2 else 9}" * 64) for i in range(3)])
    ra, rc = pm.load_runs([a, c])
    comp = pm.paired_comparison(ra, rc)
    assert comp["n"] == 2 and [r["image_idx"] for r in comp["rows"]] == [0, 1]
    assert "1 image(s) at the same index hold other content" in "\n".join(pm.pair_warnings([(ra, rc)]))
    assert "3 images, 2 in common" in "\n".join(pm.pair_warnings([(ra, rc)]))


# --- cost labels follow the device -----------------------------------------------------------------------
@pytest.mark.parametrize("devices, unit, warned", [(("cpu", "cpu"), "CPU", False), (("cuda:0", "cuda:1"), "GPU", False),
                                                   (("cpu", "cuda:0"), "device", True), ((None, None), "device", False)])
def test_cost_labels_follow_the_device(tmp_path, devices, unit, warned):
    dirs = [project_run(tmp_path, f"e/x_1img/r{k}", [rec(0, [30.0, 20.0], "a" * 64)], device=dev)
            for k, dev in enumerate(devices)]
    text = pm.report(pm.load_runs(dirs), brief=True)
    assert f"| {unit}-seconds / image |" in text and f"| successes / {unit}-hour |" in text
    for other in {"GPU", "CPU", "device"} - {unit}:
        assert f"{other}-seconds / image" not in text
    assert ("used different devices" in text) == warned
    if unit == "device" and warned:
        assert "(wall, CPU)" in text and "(wall, GPU)" in text


# --- paths and outputs: one line --------------------------------------------------------------------------
def test_missing_path_and_file_targets_are_one_line(tmp_path, capsys):
    assert pm.main([str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert f"error: {tmp_path / 'nowhere'} does not exist" in err and "no metrics.json" not in err
    taken = tmp_path / "report.md"
    taken.write_text("x")
    for flag in ("--report", "--plots"):
        assert pm.main([str(ORIGINAL_RUN), flag, str(taken)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {flag} {taken}: a file of that name exists")
    assert taken.read_text() == "x"
    assert pm.main([str(ORIGINAL_RUN), "--csv", str(tmp_path)]) == 2
    assert "a folder of that name exists" in capsys.readouterr().err


# --- damaged run folders: one line or a rebuilt report ------------------------------------------------
@pytest.fixture(scope="module")
def real_folders(tmp_path_factory, one_thread):
    """A toy run written by the pipeline (records, metrics.json, repulsion.jsonl) and the original's folder."""
    from cores.pipeline import run
    from tests.conftest import TINY, compose

    root = tmp_path_factory.mktemp("real")
    run(compose(TINY + ["model.include_twins=true", "repulsion_scale=1000", f"save_dir={root}/e/demo_2img",
                        "name=ours"]))
    shutil.copytree(ORIGINAL_RUN, root / "o" / "imagenet_2img" / "theirs")
    return {"ours": root / "e" / "demo_2img" / "ours", "theirs": root / "o" / "imagenet_2img" / "theirs"}


CORRUPTIONS = st.sampled_from(["truncate", "flip", "empty", "delete", "json"])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.sampled_from(["ours", "theirs"]), target=st.sampled_from(["metrics.json", "config.yaml",
                                                                         "repulsion.jsonl", "records"]),
       how=CORRUPTIONS, where=st.floats(0, 1), junk=st.sampled_from(["[]", "{}", "null", '{"images": 5}',
                                                                    '{"images": [{"image_idx": "x"}]}',
                                                                    '{"psnr": {"per_image": [{}]}}']))
def test_every_corruption_gives_one_line_or_a_rebuilt_report(real_folders, tmp_path_factory, which, target, how,
                                                             where, junk):
    import contextlib
    import io

    work = tmp_path_factory.mktemp("c")
    dirs = {k: work / k for k in real_folders}
    for k, src in real_folders.items():
        shutil.copytree(src, dirs[k])
    victim = dirs[which] / target
    if target == "records":
        files = sorted(victim.glob("*.json")) if victim.is_dir() else []
        victim = files[int(where * (len(files) - 1))] if files else dirs[which] / "metrics.json"
    if victim.exists():
        data = victim.read_bytes()
        cut = int(where * len(data))
        if how == "truncate":
            victim.write_bytes(data[:cut])
        elif how == "flip" and data:
            victim.write_bytes(data[:cut] + bytes([data[min(cut, len(data) - 1)] ^ 0x5A]) + data[cut + 1:])
        elif how == "empty":
            victim.write_bytes(b"")
        elif how == "delete":
            victim.unlink()
        else:
            victim.write_text(junk)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = pm.main([str(dirs["ours"]), str(dirs["theirs"]), "--brief"])  # never raises
    lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
    about = [ln for ln in lines if str(dirs[which]) in ln]
    other = "theirs" if which == "ours" else "ours"
    assert "Traceback" not in err.getvalue()
    assert pm.run_label(dirs[other]) in out.getvalue()  # the intact folder is always reported
    if rc == 2:  # skipped: one line naming it (plus the closing count)
        assert len(about) == 1 and about[0].startswith("error: "), lines
        assert pm.run_label(dirs[which]) not in out.getvalue()
    else:  # reported: as it is, or rebuilt from records/ with one note
        assert rc == 0 and pm.run_label(dirs[which]) in out.getvalue()
        assert len([ln for ln in about if ln.startswith(("note:", "error:"))]) <= 1, lines


def test_original_fields_it_lacks_are_empty_in_the_csv_not_zero(tmp_path):
    import csv

    per_image, summary = pm.write_csv(pm.load_runs([ORIGINAL_RUN]), tmp_path / "t.csv")
    rows = list(csv.DictReader(per_image.open()))
    assert [r["image_idx"] for r in rows] == ["1", "2"]
    for r in rows:
        for key in ("success", "both_orientations", "selected_psnr", "correct_orientation_found", "orientation",
                    "selected_is_best"):
            assert r[key] == "", key
    (s,) = list(csv.DictReader(summary.open()))
    for key in ("success_rate", "correct_orientation_rate", "both_orientations_any_rate", "peak_memory_mb",
                "success_per_gpu_hour", "selection_accuracy"):
        assert s[key] == "", key
    assert float(s["best_psnr_mean"]) > 0
