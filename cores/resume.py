"""Run-folder preparation, resume (`resume=true`) and reading logs of resumed runs.

Rules (one folder = one experiment; several jobs may fill it):
- The folder's `config.yaml` must match the new config in every key except
  RESUMABLE_KEYS (image range, shard, device, batch size); otherwise the run is refused
  with the differing keys listed, whether resuming or not.
- `resume=true`: images with a complete record (record + its samples) are
  skipped and their files left untouched; every other image of the range is
  (re)done from scratch — the image in flight when a run died has no record.
- `resume=false` into a folder that holds records: refused only when some of
  those records belong to images this job would compute; records of other
  images (other shards of a cluster multirun writing the same folder) are fine.
- JSONL logs are append-only, so an image that is redone appends its lines a
  second time.  `read_jsonl_latest` keeps the last line per (image_idx, step)
  and can restrict to finished images; log readers should use it.  Logs are
  never rewritten at resume time, because other shards may be appending.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from omegaconf import DictConfig, OmegaConf

from cores.errors import ConfigError
from cores.outputs import read_jsonl, write_text
from cores.run_folder import RECORD_DIR, RunFolder

# Keys that may differ between jobs writing the same run folder.  `batch_size` is one: every
# particle draws from its own random stream, so a result does not depend on how images are batched.
RESUMABLE_KEYS = {"resume", "data.start_id", "data.end_id", "shard", "num_shards", "device", "batch_size"}
# Where a run lives is not what it is: a folder moved or renamed (results copied off a cluster's scratch
# disk) is the same run, and resumes; `locations.jsonl` keeps where it was written before.
LOCATION_KEYS = {"save_dir", "name"}
LOCATIONS_LOG = "locations.jsonl"


def _flatten(d, prefix: str = "") -> Dict[str, object]:
    out: Dict[str, object] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_differences(old: Dict, new: Dict) -> List[str]:
    """Flattened keys (outside RESUMABLE_KEYS) whose values differ."""
    a, b = _flatten(old), _flatten(new)
    keys = sorted(set(a) | set(b))
    return [k for k in keys if k not in RESUMABLE_KEYS | LOCATION_KEYS and a.get(k, "<missing>") != b.get(k, "<missing>")]


def describe_differences(old: Dict, new: Dict, keys: Sequence[str], limit: int = 8) -> str:
    """`key (old → new), …` on one line."""
    a, b = _flatten(old), _flatten(new)

    def short(v: object) -> str:
        s = repr(v)
        return s if len(s) <= 40 else s[:37] + "..."

    parts = [f"{k} ({short(a.get(k, '<missing>'))} -> {short(b.get(k, '<missing>'))})" for k in keys[:limit]]
    if len(keys) > limit:
        parts.append(f"and {len(keys) - limit} more")
    return ", ".join(parts)


def recorded_images(folder: RunFolder) -> List[int]:
    """Images with a record file (complete or not)."""
    d = folder.root / RECORD_DIR
    return sorted(int(p.stem) for p in d.glob("*.json") if p.stem.isdigit()) if d.is_dir() else []


def check_sources(folder: RunFolder, dataset) -> None:
    """Every record's `source_file` / `source_sha256` still describe the image at its index in
    `data.root` (`dataset.source(idx)`); otherwise ConfigError naming the first mismatch.

    Records hold the sorted index of their image; a file added, renamed or replaced in the data
    folder would otherwise make a resumed run pair old records with other images.  Records
    written before these fields existed carry no source and are not checked.
    """
    for rec in folder.records():
        idx, name, digest = rec["image_idx"], rec.get("source_file"), rec.get("source_sha256")
        if name is None or digest is None:
            continue
        now = dataset.source(idx)
        where = folder.record_path(idx)
        if now is None:
            raise ConfigError(f"data.root {dataset.root} changed since {where} was written: image {idx} was {name} "
                              f"and the folder now holds only {len(dataset.all_files)} image(s); restore the "
                              "data folder or use another name=")
        if (now["source_file"], now["source_sha256"]) != (name, digest):
            what = ("was renamed or another file now sorts at its place" if now["source_sha256"] == digest
                    or now["source_file"] != name else "was replaced (same name, other content)")
            raise ConfigError(f"data.root {dataset.root} changed since {where} was written: image {idx} was "
                              f"{name} (sha256 {digest[:12]}) and is now {now['source_file']} (sha256 "
                              f"{now['source_sha256'][:12]}): it {what}; restore the data folder or use "
                              "another name=")


def prepare_folder(cfg: DictConfig, folder: RunFolder, image_ids: List[int]) -> List[int]:
    """Check the folder against `cfg`, write config.yaml, return the images still to do.

    Raises ConfigError (one line) before anything is written when the folder cannot take this run.
    """
    cfg_path = folder.root / "config.yaml"
    current = OmegaConf.to_container(cfg, resolve=True)
    recorded = recorded_images(folder)
    if cfg_path.exists() and (bool(cfg.resume) or recorded):
        old = OmegaConf.to_container(OmegaConf.load(cfg_path), resolve=True)
        diff = config_differences(old, current)
        if diff:
            raise ConfigError(f"{'resume=true but the' if cfg.resume else 'the'} config differs from {cfg_path} "
                              f"in: {describe_differences(old, current, diff)}; use another name= "
                              f"or the folder's settings")
    done = set()
    if bool(cfg.resume) and not cfg_path.exists():
        from cores.console import warn

        warn(f"resume=true but {folder.root} holds no run yet; starting a new one (check name= if you meant "
             "to continue an existing run)")
    if bool(cfg.resume):
        done = set(folder.finished_images())
    else:
        mine = sorted(set(recorded) & set(image_ids))
        if mine:
            shown = ", ".join(map(str, mine[:5])) + (", ..." if len(mine) > 5 else "")
            raise ConfigError(f"{folder.root} already holds results for image(s) {shown}; pass resume=true "
                              f"to continue it or choose another name=")
    folder.root.mkdir(parents=True, exist_ok=True)
    if cfg_path.exists():
        note_move(folder, OmegaConf.to_container(OmegaConf.load(cfg_path), resolve=True), current)
    write_text(cfg_path, OmegaConf.to_yaml(cfg, resolve=True))
    return [i for i in image_ids if i not in done]


def note_move(folder: RunFolder, old: Dict, new: Dict) -> None:
    """When the folder's config.yaml names another location (the folder was moved or renamed), append
    the old one to `locations.jsonl` and say so in one line; records stay as they were written."""
    was = {k: old.get(k) for k in sorted(LOCATION_KEYS)}
    if was == {k: new.get(k) for k in sorted(LOCATION_KEYS)}:
        return
    import datetime
    import json

    from cores.console import note

    with open(folder.root / LOCATIONS_LOG, "a") as fh:
        fh.write(json.dumps({**was, "until": datetime.datetime.now().isoformat(timespec="seconds")}) + "\n")
    note(f"{folder.root} was written as {Path(str(was['save_dir'])) / str(was['name'])}; continuing it here "
         f"(the earlier location is kept in {LOCATIONS_LOG})")


def records_signature(folder: RunFolder) -> Tuple:
    """(name, mtime, size) of every record: changes whenever a job finishes an image."""
    d = folder.root / RECORD_DIR
    if not d.is_dir():
        return ()
    out = []
    for p in sorted(d.glob("*.json")):
        try:
            st = p.stat()
        except FileNotFoundError:
            continue
        out.append((p.name, st.st_mtime_ns, st.st_size))
    return tuple(out)


def read_jsonl_latest(path: Path, keys: Iterable[str] = ("image_idx", "step"),
                      images: Optional[Iterable[int]] = None) -> List[Dict]:
    """Complete lines of a JSONL log, keeping only the last line per `keys` value (lines without
    a key field use None for it), optionally only of `images`; in order of last appearance.

    An image redone after an interruption appends its lines again; the last ones are the redo's.
    """
    keep = None if images is None else {int(i) for i in images}
    latest: Dict[Tuple, Dict] = {}
    for rec in read_jsonl(path):
        if keep is not None and rec.get("image_idx") not in keep:
            continue
        key = tuple(rec.get(k) for k in keys)
        latest.pop(key, None)  # re-insert: dict order = order of last appearance
        latest[key] = rec
    return list(latest.values())


def read_run_log(root: Path, name: str) -> List[Dict]:
    """`<root>/<name>.jsonl` as it belongs to the finished images of the run folder."""
    folder = RunFolder(Path(root))
    return read_jsonl_latest(folder.jsonl(name), images=folder.finished_images())
