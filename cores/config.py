"""Typed configuration, built in one place from the Hydra config (`build_run_config`).

The YAML keeps the flat top-level names the experiment scripts use (`num_samples`,
`repulsion_scale`, `pruning_step`, `hard_data_consistency`, …); here they are grouped into
one dataclass per part, each checking its own values in `__post_init__`.  Every value is
converted strictly (an integer key refuses 2.7 and "abc"), and a key that no part reads
(`+repulsion_scael=1`) is refused with the closest known name, so a bad override stops
with one line before any work.  Cross-field checks live in `cores/validation.py`.
Every default lives in the YAML (`configs/`); the dataclass defaults only serve direct
Python use (tests, scripts).
"""
from __future__ import annotations

import difflib
import math
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

from cores.errors import ConfigError
from cores.mcmc import MCMCConfig


def _check_choice(key: str, value: str, choices: Tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value}: expected one of {', '.join(choices)}")


def _check_range(key: str, value: float, lo: Optional[float] = None, hi: Optional[float] = None,
                 lo_open: bool = False) -> None:
    ok = math.isfinite(value)
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value <= hi
    if not ok:
        lo_s = "" if lo is None else (f"> {lo:g}" if lo_open else f">= {lo:g}")
        hi_s = "" if hi is None else f"<= {hi:g}"
        raise ConfigError(f"{key}={value}: must be a finite number {' and '.join(s for s in (lo_s, hi_s) if s)}")


# ----------------------------------------------------------------------------- sampler
@dataclass
class AnnealingConfig:
    num_steps: int = 50
    sigma_max: float = 10.0
    sigma_min: float = 0.1
    timestep: str = "poly-7"

    def __post_init__(self) -> None:
        _check_range("sampler.annealing.num_steps", self.num_steps, 1)
        _check_range("sampler.annealing.sigma_min", self.sigma_min, 0, lo_open=True)
        if not self.sigma_min < self.sigma_max:
            raise ConfigError(f"sampler.annealing.sigma_min={self.sigma_min}, sigma_max={self.sigma_max}: "
                              "need 0 < sigma_min < sigma_max")
        if not (self.timestep.startswith("poly-") and self.timestep[5:].isdigit()):
            raise ConfigError(f"sampler.annealing.timestep={self.timestep}: expected poly-<p>, e.g. poly-7")


@dataclass
class ODEConfig:
    num_steps: int = 2
    sigma_min: float = 1e-3

    def __post_init__(self) -> None:
        _check_range("sampler.ode.num_steps", self.num_steps, 1)
        _check_range("sampler.ode.sigma_min", self.sigma_min, 0, lo_open=True)


@dataclass
class DAPSConfig:
    """Shaped like `configs/sampler/*.yaml`."""

    name: str = "latent_daps"
    annealing: AnnealingConfig = field(default_factory=AnnealingConfig)
    ode: ODEConfig = field(default_factory=ODEConfig)
    mcmc: MCMCConfig = field(default_factory=MCMCConfig)
    record_trajectory: bool = False   # not in the YAML: set by the pipeline from save_traj
    max_steps: Optional[int] = None   # not in the YAML: run only the first k steps (benchmarks)

    @property
    def initial_sigma(self) -> float:
        """z_T ~ N(0, σ_max² I)."""
        return self.annealing.sigma_max

    @property
    def loop_steps(self) -> int:
        """Steps the callback reports (`step` stages): the annealing steps actually taken."""
        n = self.annealing.num_steps
        return n if self.max_steps is None else min(self.max_steps, n)

    @classmethod
    def with_steps(cls, num_steps: int, mcmc: Optional[MCMCConfig] = None, **kwargs: Any) -> "DAPSConfig":
        """DAPS' defaults with another number of annealing steps (tests, studies)."""
        return cls(annealing=AnnealingConfig(num_steps=num_steps), mcmc=mcmc or MCMCConfig(), **kwargs)


@dataclass
class TrainScheduleConfig:
    """The DDPM β schedule ReSample's DDIM steps index (models without their own: the toy prior)."""

    num_timesteps: int = 1000     # CompVis ffhq-ldm-vq-4.yaml `timesteps`
    linear_start: float = 0.0015  # CompVis ffhq-ldm-vq-4.yaml `linear_start`
    linear_end: float = 0.0195    # CompVis ffhq-ldm-vq-4.yaml `linear_end`

    def __post_init__(self) -> None:
        _check_range("sampler.train_schedule.num_timesteps", self.num_timesteps, 2)
        if not 0 < self.linear_start <= self.linear_end < 1:
            raise ConfigError(f"sampler.train_schedule: linear_start={self.linear_start}, linear_end="
                              f"{self.linear_end}: need 0 < linear_start <= linear_end < 1")


@dataclass
class ResampleOptimizerConfig:
    lr: float = 5e-3
    eps: float = 1e-3
    max_iters: int = 500
    patience: Optional[int] = None   # stop when the loss `patience` iterations earlier is lower (latent only)

    def __post_init__(self) -> None:
        _check_range("sampler.*_optimization.lr", self.lr, 0, lo_open=True)
        _check_range("sampler.*_optimization.eps", self.eps, 0)
        _check_range("sampler.*_optimization.max_iters", self.max_iters, 0)
        if self.patience is not None:
            _check_range("sampler.latent_optimization.patience", self.patience, 1)


@dataclass
class ResampleConfig:
    """Shaped like `configs/sampler/resample.yaml` (ReSample, `cores/resample.py`)."""

    name: str = "resample"
    ddim_steps: int = 500
    ddim_eta: float = 0.0
    guidance_scale: float = 0.5
    splits: int = 3
    inter_timesteps: int = 5
    travel_every: int = 10
    resample_sigma_scale: float = 40.0
    pixel_stage: bool = True
    weight_decay: float = 0.01
    pixel_optimization: ResampleOptimizerConfig = field(
        default_factory=lambda: ResampleOptimizerConfig(lr=1e-2, eps=1e-3, max_iters=2000))
    latent_optimization: ResampleOptimizerConfig = field(
        default_factory=lambda: ResampleOptimizerConfig(lr=5e-3, eps=1e-3, max_iters=500, patience=200))
    train_schedule: TrainScheduleConfig = field(default_factory=TrainScheduleConfig)
    record_trajectory: bool = False   # not in the YAML: set by the pipeline from save_traj
    max_steps: Optional[int] = None   # not in the YAML: run only the first k DDIM steps (benchmarks)

    def __post_init__(self) -> None:
        _check_range("sampler.ddim_steps", self.ddim_steps, 1)
        if self.ddim_steps >= self.train_schedule.num_timesteps:  # CompVis builds DDIM parameters only below T
            raise ConfigError(f"sampler.ddim_steps={self.ddim_steps} must be < the {self.train_schedule.num_timesteps} "
                              "training timesteps")
        _check_range("sampler.ddim_eta", self.ddim_eta, 0)
        _check_range("sampler.splits", self.splits, 1)
        _check_range("sampler.inter_timesteps", self.inter_timesteps, 0)
        _check_range("sampler.travel_every", self.travel_every, 1)
        _check_range("sampler.resample_sigma_scale", self.resample_sigma_scale, 0, lo_open=True)
        _check_range("sampler.weight_decay", self.weight_decay, 0)

    @property
    def initial_sigma(self) -> float:
        """z_T ~ N(0, I): the VP start."""
        return 1.0

    @property
    def loop_steps(self) -> int:
        """Steps the callback reports (`step` stages): the DDIM steps actually taken."""
        n = ddim_step_count(self.train_schedule.num_timesteps, self.ddim_steps)
        return n if self.max_steps is None else min(self.max_steps, n)


def ddim_step_count(num_train_timesteps: int, ddim_steps: int) -> int:
    """DDIM steps of CompVis' "uniform" timesteps: every (T // ddim_steps)-th training step, which
    can be a few more than asked for (1000 // 300 = 3 gives 334)."""
    return len(range(0, num_train_timesteps, num_train_timesteps // ddim_steps))


SAMPLERS = ("latent_daps", "resample")


# ----------------------------------------------------------------------------- additions
@dataclass
class DinoConfig:
    weights_path: str = "checkpoints/dino_deitsmall16_pretrain.pth"
    preprocess: str = "original"      # original: the original study's input (cores/dino.py) | raw: RLSD's
    resize: Optional[int] = None      # None: the preprocess' own (original 224, raw none)
    normalize: Optional[bool] = None  # None: the preprocess' own (original ImageNet mean/std, raw none)

    def __post_init__(self) -> None:
        _check_choice("dino.preprocess", self.preprocess, ("original", "raw"))
        if self.resize is not None:
            _check_range("dino.resize", self.resize, 1)


#: `repulsion_multiplier` values (RepulsionConfig.injected)
MULTIPLIERS = ("squared", "linear")


@dataclass
class RepulsionConfig:
    """DINO-SVGD repulsion in the PF-ODE score (PROJECT.md §5 "Repulsion")."""

    scale: float = 0.0
    multiplier: str = "squared"       # λ from w = scale·schedule(σ): squared (λ = w², the original code) | linear
    sigma_break: float = 1.0
    schedule: str = "constant"
    feature: str = "dino"
    latent: str = "z_t"
    normalizer: str = "rlsd"
    log_baseline: bool = False
    target_ratio: Optional[float] = None   # ρ: λ chosen per step and image so that ||λr|| / ||score|| = ρ
    scale_max: float = 1e4                 # cap on the λ a target ratio may choose
    sigma_max: float = 10.0           # the annealing σ_max (schedules decay from it); from the sampler
    dino: DinoConfig = field(default_factory=DinoConfig)

    def __post_init__(self) -> None:
        _check_range("repulsion_scale", self.scale, 0)
        if self.target_ratio is not None:
            _check_range("repulsion_target_ratio", self.target_ratio, 0)
        _check_range("repulsion_scale_max", self.scale_max, 0, lo_open=True)
        _check_range("repulsion_sigma_break", self.sigma_break)
        _check_choice("repulsion_schedule", self.schedule, ("constant", "linear", "cosine"))
        _check_choice("repulsion_multiplier", self.multiplier, MULTIPLIERS)
        _check_choice("repulsion_feature", self.feature, ("dino", "pixel", "latent"))
        _check_choice("repulsion_latent", self.latent, ("z_t", "z_t_vp", "z0hat"))
        _check_choice("repulsion_normalizer", self.normalizer, ("rlsd", "density"))

    @property
    def on(self) -> bool:
        """A target ratio, when set, replaces the scale (ρ = 0 is off, like scale 0)."""
        if self.target_ratio is not None:
            return self.target_ratio > 0
        return self.scale > 0

    def injected(self, w: float) -> float:
        """The multiplier λ the PF-ODE applies to r when the scale amounts to w = scale·schedule(σ).

        "squared": the original code multiplies r by w in its repulsion module
        (DAPS/repulsion.py line 451 at b967b2b) and again in `DiffusionPFODE.set_repulsion`
        (DAPS/sampler.py line 541, DAPS/cores/scheduler.py line 484), so `repulsion_scale=10`
        injects 100; "linear": λ = w."""
        return w * w if self.multiplier == "squared" else w

    @property
    def needs_hook(self) -> bool:
        """Off without baseline logging constructs nothing (plain DAPS, bit-identical)."""
        return self.on or self.log_baseline


@dataclass
class PruningConfig:
    """Once-only pruning (PROJECT.md §5 "Pruning"); `step < 0` = off."""

    step: int = -1
    keep: int = 2
    mode: str = "slicing"
    criterion: str = "loss"
    diversity_tol: float = 0.5
    refill: bool = False                  # clone the survivors back to the full particle count (branching)
    sigma_break: Optional[float] = None   # σ-transition trigger (repulsion_sigma_break); None: step only
    feature: str = "pixel"                # diversity distances: pixel | latent | dino
    save_traj: bool = False
    traj_every: int = 5
    dino_weights_path: str = "checkpoints/dino_deitsmall16_pretrain.pth"
    dino_preprocess: str = "raw"           # set from dino.preprocess: the diversity features see repulsion's input

    def __post_init__(self) -> None:
        _check_choice("pruning_mode", self.mode, ("slicing", "masking", "shadow"))
        _check_choice("pruning_criterion", self.criterion, ("loss", "diversity"))
        _check_range("pruning_diversity_tol", self.diversity_tol, 0)
        _check_range("pruning_keep", self.keep, 1)
        if self.refill and self.mode != "slicing":  # masking/shadow keep every particle: nothing to refill
            raise ConfigError(f"pruning_refill=true needs pruning_mode=slicing (got {self.mode})")

    @property
    def on(self) -> bool:
        return self.step >= 0


@dataclass
class OptimizationConfig:
    """ReSample-style hard data consistency (PROJECT.md §5)."""

    enabled: bool = False
    lr: float = 5e-3
    eps: float = 1e-3
    max_iters: int = 500
    weight_decay: float = 0.01
    plateau_window: int = 200
    stop: str = "eps"                 # eps: MSE < eps² | noise: MSE ≤ noise_tau·σ_y² (discrepancy principle)
    noise_tau: float = 1.0
    sigma_y: Optional[float] = None   # measurement noise std; from the task config (`task.sigma`)

    def __post_init__(self) -> None:
        _check_range("optimization_lr", self.lr, 0, lo_open=True)
        _check_range("optimization_eps", self.eps, 0)
        _check_range("optimization_max_iters", self.max_iters, 0)
        _check_range("optimization_weight_decay", self.weight_decay, 0)
        _check_choice("optimization_stop", self.stop, ("eps", "noise"))
        _check_range("optimization_noise_tau", self.noise_tau, 0, lo_open=True)

    @property
    def noise_threshold(self) -> Optional[float]:
        """τ·σ_y² when the noise rule is on (None otherwise)."""
        if self.stop != "noise":
            return None
        if self.sigma_y is None or not self.sigma_y > 0:
            raise ConfigError(f"optimization_stop=noise needs the measurement noise task.sigma > 0 "
                              f"(got {self.sigma_y})")
        return self.noise_tau * self.sigma_y ** 2


@dataclass
class EvalConfig:
    success_psnr: float = 20.0
    orientation_margin_db: float = 1.0
    lpips: bool = True
    lpips_net: str = "vgg"   # vgg: piq's VGG16 LPIPS, average pooling, [0,1] (DAPS' eval.py); alex: lpips package

    def __post_init__(self) -> None:
        _check_choice("eval.lpips_net", self.lpips_net, ("vgg", "alex"))
        _check_range("eval.success_psnr", self.success_psnr)
        _check_range("eval.orientation_margin_db", self.orientation_margin_db, 0)


@dataclass
class DataConfig:
    name: str = "demo-ffhq"
    root: str = "dataset/demo-ffhq"
    resolution: int = 256
    start_id: int = 0
    end_id: Optional[int] = None

    def __post_init__(self) -> None:
        _check_range("data.resolution", self.resolution, 1)
        _check_range("data.start_id", self.start_id, 0)
        if self.end_id is not None and self.end_id <= self.start_id:
            raise ConfigError(f"data.start_id={self.start_id}, data.end_id={self.end_id}: the image range is empty")


@dataclass
class RunConfig:
    """Everything a run needs, typed.  `model` and `task` stay mappings: they are handed to the
    model and operator registries as they are."""

    seed: int
    batch_size: int
    num_samples: int
    device: str
    use_tpu: bool
    deterministic: bool
    save_dir: str
    name: str
    resume: bool
    save_traj: bool
    traj_every: int
    save_samples: bool
    grid_max_images: int
    num_shards: int
    shard: int
    sampler: Any                      # DAPSConfig | ResampleConfig (by `sampler.name`)
    repulsion: RepulsionConfig
    pruning: PruningConfig
    optimization: OptimizationConfig
    eval: EvalConfig
    data: DataConfig
    speed: Any
    model: Dict[str, Any]
    task: Dict[str, Any]

    def __post_init__(self) -> None:
        _check_range("num_samples", self.num_samples, 1)
        _check_range("batch_size", self.batch_size, 1)
        _check_range("num_shards", self.num_shards, 1)
        _check_range("traj_every", self.traj_every, 1)
        _check_range("grid_max_images", self.grid_max_images, 0)
        if not 0 <= self.shard < self.num_shards:
            raise ConfigError(f"shard={self.shard} must lie in [0, num_shards={self.num_shards})")


# ----------------------------------------------------------------------------- strict conversion
def _base_type(tp: Any) -> Tuple[Any, bool]:
    """(type, optional) of an annotation such as Optional[int]."""
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else Any), True
    return tp, False


def convert(key: str, value: Any, tp: Any) -> Any:
    """`value` as type `tp`, or a ConfigError naming `key`, the value and what is allowed."""
    base, optional = _base_type(tp)
    if value is None:
        if optional or base is Any:
            return None
        raise ConfigError(f"{key}=null: a value is required ({getattr(base, '__name__', base)})")
    if base is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value}: expected true or false")
    if base is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{key}={value}: expected an integer")
        return int(value)
    if base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value}: expected a number")
        if math.isnan(float(value)):
            raise ConfigError(f"{key}={value}: expected a number, not NaN")
        return float(value)
    if base is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}={value}: expected a single value")
        return str(value)
    return value


def build_dataclass(cls, values: Mapping[str, Any], prefix: str = "", names: Optional[Dict[str, str]] = None):
    """`cls(**values)` with every field converted strictly; nested dataclasses recurse.

    `names` maps a field to the config key it came from (for messages); unknown keys in
    `values` are refused."""
    names = names or {}
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = [k for k in values if k not in known]
    if unknown:
        raise ConfigError(unknown_key_message(prefix + str(unknown[0]), [prefix + k for k in known]))
    kwargs: Dict[str, Any] = {}
    for f in fields(cls):
        if f.name not in values:
            continue
        key = names.get(f.name, prefix + f.name)
        v = values[f.name]
        if is_dataclass(hints[f.name]):
            if not isinstance(v, Mapping):
                raise ConfigError(f"{key}={v}: expected a group of settings")
            kwargs[f.name] = build_dataclass(hints[f.name], v, key + ".")
        else:
            kwargs[f.name] = convert(key, v, hints[f.name])
    return cls(**kwargs)


def unknown_key_message(key: str, known: List[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    return f"unknown setting {key}: no part of the run reads it{hint}"


#: flat top-level keys → (part, field)
FLAT_KEYS: Dict[str, Tuple[str, str]] = {
    "repulsion_scale": ("repulsion", "scale"),
    "repulsion_multiplier": ("repulsion", "multiplier"),
    "repulsion_sigma_break": ("repulsion", "sigma_break"),
    "repulsion_schedule": ("repulsion", "schedule"),
    "repulsion_feature": ("repulsion", "feature"),
    "repulsion_latent": ("repulsion", "latent"),
    "repulsion_normalizer": ("repulsion", "normalizer"),
    "repulsion_log_baseline": ("repulsion", "log_baseline"),
    "repulsion_target_ratio": ("repulsion", "target_ratio"),
    "repulsion_scale_max": ("repulsion", "scale_max"),
    "pruning_step": ("pruning", "step"),
    "pruning_keep": ("pruning", "keep"),
    "pruning_mode": ("pruning", "mode"),
    "pruning_criterion": ("pruning", "criterion"),
    "pruning_diversity_tol": ("pruning", "diversity_tol"),
    "pruning_refill": ("pruning", "refill"),
    "hard_data_consistency": ("optimization", "enabled"),
    "optimization_lr": ("optimization", "lr"),
    "optimization_eps": ("optimization", "eps"),
    "optimization_max_iters": ("optimization", "max_iters"),
    "optimization_weight_decay": ("optimization", "weight_decay"),
    "optimization_stop": ("optimization", "stop"),
    "optimization_noise_tau": ("optimization", "noise_tau"),
}
_RUN_SCALARS = ("seed", "batch_size", "num_samples", "device", "use_tpu", "deterministic", "save_dir", "name",
                "resume", "save_traj", "traj_every", "save_samples", "grid_max_images", "num_shards", "shard")
_GROUPS = ("sampler", "eval", "data", "dino", "speed", "model", "task", "hydra")
TOP_LEVEL_KEYS = set(_RUN_SCALARS) | set(FLAT_KEYS) | set(_GROUPS)


def build_sampler_config(values: Mapping[str, Any]):
    """DAPSConfig or ResampleConfig, chosen by `sampler.name`."""
    name = str(values.get("name", "latent_daps"))
    if name not in SAMPLERS:
        raise ConfigError(f"sampler.name={name}: expected one of {', '.join(SAMPLERS)}")
    if name == "resample":
        # the toy's model defaults tune DAPS' MCMC (sampler.mcmc), which ReSample does not have
        values = {k: v for k, v in values.items() if k != "mcmc"}
        return build_dataclass(ResampleConfig, values, "sampler.")
    return build_dataclass(DAPSConfig, values, "sampler.")


def build_run_config(cfg: Mapping[str, Any]) -> RunConfig:
    """The typed config of a composed Hydra config (a resolved plain dict or a DictConfig)."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    unknown = [k for k in cfg if k not in TOP_LEVEL_KEYS]
    if unknown:
        raise ConfigError(unknown_key_message(str(unknown[0]), sorted(TOP_LEVEL_KEYS - {"hydra"})))
    hints = typing.get_type_hints(RunConfig)
    run = {k: convert(k, cfg[k], hints[k]) for k in _RUN_SCALARS if k in cfg}
    sampler = build_sampler_config(cfg.get("sampler", {}))
    parts: Dict[str, Dict[str, Any]] = {"repulsion": {}, "pruning": {}, "optimization": {}}
    names: Dict[str, Dict[str, str]] = {"repulsion": {}, "pruning": {}, "optimization": {}}
    for key, (part, fname) in FLAT_KEYS.items():
        if key in cfg:
            parts[part][fname] = cfg[key]
            names[part][fname] = key
    hdc = parts["optimization"].get("enabled")
    if hdc is not None:  # the seed's switch: 1 = on, -1 = off
        if convert("hard_data_consistency", hdc, int) not in (-1, 1):
            raise ConfigError(f"hard_data_consistency={hdc}: expected 1 (on) or -1 (off)")
        parts["optimization"]["enabled"] = int(hdc) == 1
    parts["repulsion"]["dino"] = cfg.get("dino", {})
    parts["repulsion"]["sigma_max"] = sampler.initial_sigma
    repulsion = build_dataclass(RepulsionConfig, parts["repulsion"], names=names["repulsion"])
    pruning = build_dataclass(PruningConfig, parts["pruning"], names=names["pruning"])
    # the σ_break transition triggers the prune too, repulsion on or not (the original's rule,
    # DAPS/sampler.py lines 603-613 at b967b2b)
    pruning.sigma_break = repulsion.sigma_break
    pruning.feature = repulsion.feature if repulsion.feature != "dino" or pruning.criterion == "diversity" else "pixel"
    pruning.dino_weights_path = repulsion.dino.weights_path
    pruning.dino_preprocess = repulsion.dino.preprocess
    pruning.save_traj, pruning.traj_every = bool(run.get("save_traj", False)), int(run.get("traj_every", 5))
    optimization = build_dataclass(OptimizationConfig, parts["optimization"], names=names["optimization"])
    sigma_y = cfg.get("task", {}).get("sigma")
    optimization.sigma_y = None if sigma_y is None else convert("task.sigma", sigma_y, float)
    if sigma_y is not None:
        _check_range("task.sigma", optimization.sigma_y, 0)  # a noise standard deviation
    from cores.speed import SpeedConfig, speed_config

    speed_keys = [f.name for f in fields(SpeedConfig)]
    for key in cfg.get("speed") or {}:
        if key not in speed_keys:
            raise ConfigError(unknown_key_message(f"speed.{key}", [f"speed.{k}" for k in speed_keys]))
    try:
        speed = speed_config(cfg.get("speed"))
    except (ValueError, TypeError) as err:
        raise ConfigError(" ".join(str(err).split())) from None
    sampler.record_trajectory = bool(run.get("save_traj", False))
    missing = [k for k in _RUN_SCALARS if k not in run]
    if missing:
        raise ConfigError(f"setting {missing[0]} is missing from the config")
    return RunConfig(**run, sampler=sampler, repulsion=repulsion, pruning=pruning, optimization=optimization,
                     eval=build_dataclass(EvalConfig, cfg.get("eval", {}), "eval."),
                     data=build_dataclass(DataConfig, cfg.get("data", {}), "data."), speed=speed,
                     model=dict(cfg.get("model", {})), task=dict(cfg.get("task", {})))

