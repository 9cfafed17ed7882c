"""Checks that turn a bad setting into one clear line before any heavy work (SPEC §8).

`validate_config` looks at the config alone; `validate_inputs` looks at what
the config points to on disk (image files, checkpoints, model resolution)
without loading any model.  Both raise `ConfigError` (or the loader's own
one-line FileNotFoundError for missing weights) naming the setting.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import DictConfig


def _fail(msg: str) -> None:
    from cores.pipeline import ConfigError

    raise ConfigError(msg)


def _float(cfg: DictConfig, key: str) -> float:
    v = float(cfg[key])
    if math.isnan(v):
        _fail(f"{key}={cfg[key]} is not a number")
    return v


def validate_config(cfg: DictConfig) -> None:
    """Settings that are wrong whatever is on disk."""
    if int(cfg.num_samples) < 1:
        _fail(f"num_samples={cfg.num_samples}: need at least 1 particle per image")
    if int(cfg.batch_size) < 1:
        _fail(f"batch_size={cfg.batch_size}: need at least 1 image per batch")
    if int(cfg.num_shards) < 1:
        _fail(f"num_shards={cfg.num_shards}: need at least 1 shard")
    if not 0 <= int(cfg.shard) < int(cfg.num_shards):
        _fail(f"shard={cfg.shard} must lie in [0, num_shards={cfg.num_shards})")
    if int(cfg.data.start_id) < 0:
        _fail(f"data.start_id={cfg.data.start_id} must be >= 0")
    if cfg.data.end_id is not None and int(cfg.data.end_id) <= int(cfg.data.start_id):
        _fail(f"data.start_id={cfg.data.start_id}, data.end_id={cfg.data.end_id}: the image range is empty")
    if int(cfg.data.resolution) != int(cfg.task.resolution):
        _fail(f"data.resolution={cfg.data.resolution} but task.resolution={cfg.task.resolution}; they must agree")
    a = cfg.sampler.annealing
    if int(a.num_steps) < 1:
        _fail(f"sampler.annealing.num_steps={a.num_steps}: need at least 1 annealing step")
    if int(cfg.sampler.mcmc.num_steps) < 0:
        _fail(f"sampler.mcmc.num_steps={cfg.sampler.mcmc.num_steps} must be >= 0")
    if not 0 < float(a.sigma_min) < float(a.sigma_max):
        _fail(f"sampler.annealing.sigma_min={a.sigma_min}, sigma_max={a.sigma_max}: need 0 < sigma_min < sigma_max")
    if _float(cfg, "repulsion_scale") < 0:
        _fail(f"repulsion_scale={cfg.repulsion_scale} must be >= 0")
    if str(cfg.repulsion_schedule) not in ("constant", "linear", "cosine"):
        _fail(f"repulsion_schedule={cfg.repulsion_schedule}: expected constant, linear or cosine")
    if str(cfg.repulsion_feature) not in ("dino", "pixel", "latent"):
        _fail(f"repulsion_feature={cfg.repulsion_feature}: expected dino, pixel or latent")
    if not float(a.sigma_min) <= _float(cfg, "repulsion_sigma_break") <= float(a.sigma_max):
        _fail(f"repulsion_sigma_break={cfg.repulsion_sigma_break} lies outside the annealing schedule "
              f"[sigma_min={a.sigma_min}, sigma_max={a.sigma_max}]")
    if int(cfg.pruning_step) >= 0:
        if not 1 <= int(cfg.pruning_keep) < int(cfg.num_samples):
            _fail(f"pruning_keep={cfg.pruning_keep} must be >= 1 and < num_samples={cfg.num_samples}")
        if int(cfg.pruning_step) >= int(a.num_steps):
            _fail(f"pruning_step={cfg.pruning_step} must be < sampler.annealing.num_steps={a.num_steps}")
        if str(cfg.pruning_mode) not in ("slicing", "masking"):
            _fail(f"pruning_mode={cfg.pruning_mode}: expected slicing or masking")
        if str(cfg.pruning_criterion) not in ("loss", "diversity"):
            _fail(f"pruning_criterion={cfg.pruning_criterion}: expected loss or diversity")
    if int(cfg.hard_data_consistency) not in (-1, 1):
        _fail(f"hard_data_consistency={cfg.hard_data_consistency}: expected 1 (on) or -1 (off)")
    if str(cfg.sampler.mcmc.algo) not in ("langevin", "hmc"):
        _fail(f"sampler.mcmc.algo={cfg.sampler.mcmc.algo}: expected langevin or hmc")


def model_resolution(model_cfg: Any) -> Optional[int]:
    """Image side length the configured model renders, read from the config (None when unknown)."""
    name = str(model_cfg.get("name"))
    if name == "toy":
        from cores.models.toy import TOY_RESOLUTION

        return TOY_RESOLUTION
    try:
        return int(model_cfg["ldm_config"]["model"]["params"]["first_stage_config"]["params"]["ddconfig"]
                   ["resolution"])
    except (KeyError, TypeError, AttributeError):
        return None


def check_image_files(files: Sequence[Path]) -> None:
    """Decode every file once (cheap at 256 px) so that a broken one is named now, not mid-run."""
    from PIL import Image

    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
        except Exception as err:  # PIL raises many types for broken files
            _fail(f"data.root: cannot read image {f} ({type(err).__name__}: {str(err)[:80]})")


def check_weights(cfg: DictConfig) -> None:
    """Weights named by the config exist (the loaders' one-line FileNotFoundError with the download hint)."""
    if str(cfg.model.get("name")) == "ldm":  # (ldm_random needs no checkpoint)
        from cores.models.ldm import resolve_checkpoint_path

        resolve_checkpoint_path(str(cfg.model.diffusion_path))
    if float(cfg.repulsion_scale) > 0 and str(cfg.repulsion_feature) == "dino":
        from cores.dino import DinoFeatureExtractor

        DinoFeatureExtractor(weights_path=str(cfg.dino.weights_path)).ensure_available()  # random: needs no file


def validate_inputs(cfg: DictConfig, dataset) -> None:
    """What the config points to: image range and files, model resolution, weights on disk."""
    start, end = int(cfg.data.start_id), cfg.data.end_id
    if len(dataset) == 0 or (end is not None and len(dataset) < int(end) - start):
        _fail(f"data.start_id={start}, data.end_id={end}: only {len(dataset)} image(s) of this range "
              f"exist in {cfg.data.root}")
    check_image_files(dataset.files)
    res = model_resolution(cfg.model)
    if res is not None and res != int(cfg.data.resolution):
        _fail(f"data.resolution={cfg.data.resolution} but model {cfg.model.name} renders {res} px images")
    check_weights(cfg)
