"""Checks that turn a bad setting into one clear line before any heavy work.

`validate_config` checks what involves several settings (each part of
`cores.config` checks its own values); `validate_inputs` looks at what
the config points to on disk (image files, checkpoints, model resolution)
without loading any model.  Both raise `ConfigError` (or the loader's own
one-line FileNotFoundError for missing weights) naming the setting.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

from cores.config import RunConfig
from cores.errors import ConfigError


def _fail(msg: str) -> None:
    raise ConfigError(msg)


def validate_config(config: RunConfig) -> None:
    """Checks that involve several settings (each part checks its own values when built)."""
    if config.data.resolution != int(config.task.get("resolution", config.data.resolution)):
        _fail(f"data.resolution={config.data.resolution} but task.resolution={config.task.get('resolution')}; "
              "they must agree")
    if config.sampler.name == "resample":
        validate_resample(config)
    else:
        validate_daps(config)
    check_run_name(config.name)
    check_save_dir(str(config.save_dir))


def validate_daps(config: RunConfig) -> None:
    """The DAPS loop's additions against its annealing schedule and particle count."""
    a = config.sampler.annealing
    if not a.sigma_min <= config.repulsion.sigma_break <= a.sigma_max:
        _fail(f"repulsion_sigma_break={config.repulsion.sigma_break} lies outside the annealing schedule "
              f"[sigma_min={a.sigma_min}, sigma_max={a.sigma_max}]")
    p = config.pruning
    if p.on:
        if not 1 <= p.keep < config.num_samples:
            _fail(f"pruning_keep={p.keep} must be >= 1 and < num_samples={config.num_samples}")
        if p.step >= a.num_steps:
            _fail(f"pruning_step={p.step} must be < sampler.annealing.num_steps={a.num_steps}")
    if config.repulsion.on and config.num_samples < 2:
        what = (f"repulsion_target_ratio={config.repulsion.target_ratio}" if config.repulsion.target_ratio
                is not None else f"repulsion_scale={config.repulsion.scale}")
        _fail(f"{what} needs num_samples >= 2 (got {config.num_samples}): repulsion acts between particles")
    o = config.optimization
    if o.enabled and o.stop == "noise" and not (o.sigma_y or 0.0) > 0:
        _fail(f"optimization_stop=noise needs the measurement noise task.sigma > 0 (got {o.sigma_y})")


def validate_resample(config: RunConfig) -> None:
    """ReSample is a baseline of its own: repulsion and pruning act inside the DAPS loop, and its own
    latent optimisation is its hard data consistency."""
    on = [name for name, flag in (("repulsion_scale/repulsion_target_ratio (repulsion)", config.repulsion.needs_hook),
                                  ("pruning_step (pruning)", config.pruning.on),
                                  ("hard_data_consistency", config.optimization.enabled)) if flag]
    if on:
        _fail(f"sampler=resample cannot be combined with {on[0]}: ReSample is run as published "
              "(it ends with its own latent optimisation); turn that setting off")


def check_save_dir(save_dir: str) -> None:
    """The results folder can be created and written: its nearest existing parent is a folder in
    which a folder can really be made (a probe folder, removed at once: permission bits say
    nothing about /proc, read-only mounts or root)."""
    import tempfile

    save = Path(save_dir)
    for parent in [save, *save.parents]:
        if parent.exists():
            if not parent.is_dir():
                _fail(f"save_dir={save_dir}: {parent} exists and is not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                _fail(f"save_dir={save_dir}: {parent} is not writable")
            try:
                os.rmdir(tempfile.mkdtemp(prefix=".write-probe-", dir=parent))
            except OSError as err:
                _fail(f"save_dir={save_dir}: cannot create folders in {parent} ({err.strerror or err})")
            break


def check_run_name(name: str) -> None:
    """`name` is a folder inside save_dir: non-empty, relative, without `..` (an empty name would
    write into save_dir itself, where every run folder sits; `../x` or `/x` outside it)."""
    from pathlib import PurePosixPath

    parts = [p for p in PurePosixPath(str(name)).parts if p != "."]
    if not str(name).strip() or not parts:
        _fail(f"name={name!s}: a run needs its own folder inside save_dir; give a non-empty name")
    if PurePosixPath(str(name)).is_absolute() or ".." in parts:
        _fail(f"name={name}: must be a relative path inside save_dir (no leading /, no ..)")


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


def check_image_files(files: Sequence[Path], resolution: Optional[int] = None) -> None:
    """Decode and convert every file once (cheap at 256 px), so that a broken or unconvertible one
    is named now, not mid-run; an image smaller than `resolution` (DAPS' resize would upscale it)
    is named in one warning."""
    from cores.console import warn
    from cores.data import read_rgb8

    for f in files:
        h, w = read_rgb8(f).shape[:2]
        if resolution is not None and min(h, w) < resolution:
            warn(f"{f} is {w}x{h} px, smaller than the model's {resolution} px: it is upscaled "
                 "(blurred ground truth)", key=("small image", str(f)))


def check_weights(config: RunConfig) -> None:
    """Weights named by the config exist (the loaders' one-line FileNotFoundError with the download hint)."""
    if str(config.model.get("name")) == "ldm":  # (ldm_random needs no checkpoint)
        from cores.models.ldm import resolve_checkpoint_path

        resolve_checkpoint_path(str(config.model["diffusion_path"]))
    if config.repulsion.needs_hook and config.repulsion.feature == "dino":
        from cores.dino import DinoFeatureExtractor

        DinoFeatureExtractor(weights_path=config.repulsion.dino.weights_path).ensure_available()  # random: no file


def validate_inputs(config: RunConfig, dataset) -> None:
    """What the config points to: image range and files, model resolution, weights on disk."""
    start, end = config.data.start_id, config.data.end_id
    if len(dataset) == 0 or (end is not None and len(dataset) < end - start):
        _fail(f"data.start_id={start}, data.end_id={end}: only {len(dataset)} image(s) of this range "
              f"exist in {config.data.root}")
    check_image_files(dataset.files, config.data.resolution)
    res = model_resolution(config.model)
    if res is not None and res != config.data.resolution:
        _fail(f"data.resolution={config.data.resolution} but model {config.model.get('name')} renders {res} px images")
    check_weights(config)

