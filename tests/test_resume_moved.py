"""A run folder moved or renamed (results copied off a scratch disk) is the same run: it resumes to
the bit-identical result of a run that never moved, its earlier records untouched and its earlier
location kept."""
from __future__ import annotations

import json
import shutil

import pytest

from conftest import TINY, compose

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(overrides):
    from cores.pipeline import run

    return run(compose(overrides))


def test_moved_folder_resumes_bit_identically(tmp_path, capsys):
    base = TINY + ["data.end_id=3"]
    _run(base + [f"save_dir={tmp_path}/ref", "name=r"])
    _run(base + ["data.end_id=2", f"save_dir={tmp_path}/scratch", "name=job17"])
    moved = tmp_path / "home" / "exp0" / "mine"
    moved.parent.mkdir(parents=True)
    shutil.move(str(tmp_path / "scratch" / "job17"), moved)
    before = {p: p.read_bytes() for p in (moved / "records").iterdir()}
    capsys.readouterr()
    got = _run(base + [f"save_dir={tmp_path}/home/exp0", "name=mine", "resume=true"])
    err = capsys.readouterr().err
    assert "was written as" in err and str(tmp_path / "scratch" / "job17") in err
    assert {p: p.read_bytes() for p in before} == before  # earlier records untouched
    want = json.loads((tmp_path / "ref" / "r" / "metrics.json").read_text())
    strip = ("time_sec", "timing", "time_segments")
    assert [{k: v for k, v in r.items() if k not in strip} for r in got["images"]] == \
        [{k: v for k, v in r.items() if k not in strip} for r in want["images"]]
    for f in sorted((tmp_path / "ref" / "r" / "samples").iterdir()):
        assert (moved / "samples" / f.name).read_bytes() == f.read_bytes(), f.name
    loc = [json.loads(line) for line in (moved / "locations.jsonl").read_text().splitlines()]
    assert [(x["save_dir"], x["name"]) for x in loc] == [(f"{tmp_path}/scratch", "job17")]
    # any other change is still refused
    from cores.errors import ConfigError

    with pytest.raises(ConfigError, match="seed"):
        _run(base + [f"save_dir={tmp_path}/home/exp0", "name=mine", "resume=true", "seed=3"])
