"""Records name their source image (file name + sha256); resume refuses, in one line naming the
first mismatch, when the data folder was renamed, added to or replaced since."""
from __future__ import annotations

import hashlib
import shutil

import pytest

from conftest import ROOT, compose

pytestmark = pytest.mark.usefixtures("one_thread")

FEW = ["num_samples=2", "sampler.annealing.num_steps=2", "sampler.mcmc.num_steps=1", "eval.lpips=false"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A run over images 0-1 of a 4-image copy of demo-ffhq."""
    from cores.pipeline import run

    base = tmp_path_factory.mktemp("src")
    data = base / "data"
    data.mkdir()
    for p in sorted((ROOT / "dataset" / "demo-ffhq").iterdir())[:4]:
        shutil.copy(p, data / p.name)
    run(compose(FEW + ["data.end_id=2", f"data.root={data}", f"save_dir={base}", "name=run"]))
    return base


def _copy(finished_run, tmp_path):
    shutil.copytree(finished_run / "data", tmp_path / "data")
    shutil.copytree(finished_run / "run", tmp_path / "run")
    cfg = tmp_path / "run" / "config.yaml"  # the copy's paths, so that only the data folder differs
    cfg.write_text(cfg.read_text().replace(str(finished_run), str(tmp_path)))
    return tmp_path / "data"


def _resume(tmp_path):
    from cores.pipeline import run

    return run(compose(FEW + ["data.end_id=3", f"data.root={tmp_path / 'data'}", f"save_dir={tmp_path}",
                              "name=run", "resume=true"]))


def test_records_store_file_name_and_sha256(finished_run):
    import json

    for idx in (0, 1):
        rec = json.loads((finished_run / "run" / "records" / f"{idx:05d}.json").read_text())
        f = sorted((finished_run / "data").iterdir())[idx]
        assert rec["source_file"] == f.name
        assert rec["source_sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()


def test_unchanged_folder_resumes(finished_run, tmp_path):
    _copy(finished_run, tmp_path)
    got = _resume(tmp_path)
    assert [r["image_idx"] for r in got["images"]] == [0, 1, 2]


def _refused(tmp_path, *needles):
    from cores.errors import ConfigError

    before = {p: p.read_bytes() for p in (tmp_path / "run" / "records").iterdir()}
    with pytest.raises(ConfigError) as err:
        _resume(tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and ("records/00000.json" in msg or "records/00001.json" in msg), msg
    for n in needles:
        assert n in msg, msg
    assert {p: p.read_bytes() for p in (tmp_path / "run" / "records").iterdir()} == before
    return msg


def test_renamed_file_is_refused(finished_run, tmp_path):
    data = _copy(finished_run, tmp_path)
    (data / "00000.png").rename(data / "00000_face.png")   # still sorts first, same content
    msg = _refused(tmp_path, "00000.png", "00000_face.png", "records/00000.json")
    assert "renamed" in msg


def test_inserted_file_is_refused(finished_run, tmp_path):
    data = _copy(finished_run, tmp_path)
    shutil.copy(ROOT / "dataset" / "demo-ffhq" / "00009.png", data / "0.png")  # sorts before every other
    _refused(tmp_path, "records/00000.json", "now 0.png")


def test_replaced_file_is_refused(finished_run, tmp_path):
    data = _copy(finished_run, tmp_path)
    shutil.copy(ROOT / "dataset" / "demo-ffhq" / "00009.png", data / "00001.png")
    msg = _refused(tmp_path, "records/00001.json", "replaced")
    assert "00001.png" in msg


def test_removed_files_are_refused(finished_run, tmp_path):
    data = _copy(finished_run, tmp_path)
    for p in sorted(data.iterdir())[1:]:
        p.unlink()
    from cores.errors import ConfigError
    from cores.pipeline import run

    with pytest.raises(ConfigError, match="records/00001.json"):
        run(compose(FEW + ["data.end_id=1", f"data.root={data}", f"save_dir={tmp_path}", "name=run",
                           "resume=true"]))
