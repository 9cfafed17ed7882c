"""Checks that turn a bad setting into one clear line before any heavy work (SPEC §8)."""
from __future__ import annotations

from omegaconf import DictConfig


def _fail(msg: str) -> None:
    from cores.pipeline import ConfigError

    raise ConfigError(msg)


def validate_config(cfg: DictConfig) -> None:
    if int(cfg.num_samples) < 1:
        _fail(f"num_samples={cfg.num_samples}: need at least 1 particle per image")
    if int(cfg.batch_size) < 1:
        _fail(f"batch_size={cfg.batch_size}: need at least 1 image per batch")
    if not 0 <= int(cfg.shard) < int(cfg.num_shards):
        _fail(f"shard={cfg.shard} must lie in [0, num_shards={cfg.num_shards})")
    if cfg.data.end_id is not None and int(cfg.data.end_id) <= int(cfg.data.start_id):
        _fail(f"data.start_id={cfg.data.start_id}, data.end_id={cfg.data.end_id}: the image range is empty")
    if float(cfg.repulsion_scale) < 0:
        _fail(f"repulsion_scale={cfg.repulsion_scale} must be >= 0")
    if str(cfg.repulsion_schedule) not in ("constant", "linear", "cosine"):
        _fail(f"repulsion_schedule={cfg.repulsion_schedule}: expected constant, linear or cosine")
    if str(cfg.repulsion_feature) not in ("dino", "pixel", "latent"):
        _fail(f"repulsion_feature={cfg.repulsion_feature}: expected dino, pixel or latent")
    a = cfg.sampler.annealing
    if float(cfg.repulsion_scale) > 0 and not float(a.sigma_min) <= float(cfg.repulsion_sigma_break) <= float(a.sigma_max):
        _fail(f"repulsion_sigma_break={cfg.repulsion_sigma_break} lies outside the annealing schedule "
              f"[{a.sigma_min}, {a.sigma_max}]")
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
