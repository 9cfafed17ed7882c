"""Run-folder preparation and resume (`resume=true`)."""
from __future__ import annotations

from typing import Dict, List

from omegaconf import DictConfig, OmegaConf

from cores.outputs import write_text
from cores.run_folder import RunFolder

# Keys that may differ between the original run and a resumed one.
RESUMABLE_KEYS = {"resume", "data.start_id", "data.end_id", "shard", "num_shards", "device"}


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
    a, b = _flatten(old), _flatten(new)
    keys = sorted(set(a) | set(b))
    return [k for k in keys if k not in RESUMABLE_KEYS and a.get(k, "<missing>") != b.get(k, "<missing>")]


def prepare_folder(cfg: DictConfig, folder: RunFolder, image_ids: List[int]) -> List[int]:
    """Write config.yaml and return the images still to do (all of them unless resuming)."""
    from cores.pipeline import ConfigError

    cfg_path = folder.root / "config.yaml"
    current = OmegaConf.to_container(cfg, resolve=True)
    done = set()
    if bool(cfg.resume) and cfg_path.exists():
        old = OmegaConf.to_container(OmegaConf.load(cfg_path), resolve=True)
        diff = config_differences(old, current)
        if diff:
            raise ConfigError(f"resume=true but the config differs from {cfg_path} in: {', '.join(diff)}")
        done = set(folder.finished_images())
    elif not bool(cfg.resume) and (folder.root / "records").is_dir() and any((folder.root / "records").iterdir()):
        raise ConfigError(f"{folder.root} already holds results; pass resume=true to continue it "
                          f"or choose another name=")
    folder.root.mkdir(parents=True, exist_ok=True)
    write_text(cfg_path, OmegaConf.to_yaml(cfg, resolve=True))
    return [i for i in image_ids if i not in done]
