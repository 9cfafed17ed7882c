"""Speed switches (config block `speed:`); all off = the exact path, the reference.

Each switch keeps the sampler's math in float32: only the network forwards (VQ decoder,
UNet) and the decoder's backward run in reduced precision or compiled; what `decode` and
`tweedie` hand back to the sampler is float32, so the Langevin/HMC update, the PF-ODE
step, the FFT operator and the loss stay fp32.

Switches (defaults = exact path)::

    speed:
      precision: fp32        # fp32 | bf16: torch.autocast(bfloat16) around the decoder body and the UNet
      compile: false         # torch.compile the decoder body (post_quant_conv + decoder)
      compile_unet: false    # ... and the UNet (2 of ~102 network calls per annealing step)
      compile_mode: default  # torch.compile mode; see below
      compile_backend: inductor
      cudnn_benchmark: false # torch.backends.cudnn.benchmark
      tf32: null             # null = PyTorch defaults (what DAPS ran); true/false = force both flags
      channels_last: false   # NHWC decoder; measured slower in eager bf16 (SPEC §9)

Notes on what each one changes:

* **VQ quantisation stays fp32** in every mode: the codebook distances run outside autocast,
  because a bf16 `argmin` would pick different codes and change the image, not just round it.
* **TF32.** DAPS never touches the flags, so it ran with PyTorch's defaults:
  `torch.backends.cudnn.allow_tf32 = True` (convolutions — almost all of the decoder and
  UNet — use TF32 on Ampere/Hopper) and `torch.backends.cuda.matmul.allow_tf32 = False`
  (matmuls, i.e. attention and linear layers, in full fp32).  `tf32: null` keeps exactly that,
  so the project's exact path is numerically the DAPS path; `tf32: true` also lets matmuls use
  TF32, `tf32: false` forces strict fp32 convolutions too (slower, more exact than DAPS).
* **compile_mode.** `default` (Inductor kernels, no CUDA graphs).  The decoder forward+backward
  of one Langevin step is tens of ms of large convolutions, so launch overhead — what
  `reduce-overhead` (CUDA graphs) removes — is a few % at most, while CUDA graphs pin one
  static buffer set per batch size and grad mode; `max-autotune` spends minutes benchmarking
  conv/GEMM choices.  Shapes are static (`dynamic=False`): a batch size change (pruning, the
  last batch) recompiles once.
* **cudnn_benchmark** lets cuDNN pick the fastest algorithm per shape; picks can differ in
  float rounding, hence a switch.

`apply_speed(model, cfg)` installs the switches on a model built by `build_model` (instance
attributes shadow `decode` / `eps_model`; the class methods — the exact path — stay
untouched) and returns a handle whose `restore()` removes them again.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable, Dict, Optional

import torch

__all__ = ["SpeedConfig", "SpeedHandle", "apply_speed", "speed_config"]

_PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


@dataclass
class SpeedConfig:
    precision: str = "fp32"
    compile: bool = False
    compile_unet: bool = False
    compile_mode: str = "default"
    compile_backend: str = "inductor"
    cudnn_benchmark: bool = False
    tf32: Optional[bool] = None
    channels_last: bool = False
    attention: str = "default"  # default | math: SDPA backend of the decoder's attention

    def __post_init__(self) -> None:
        if self.precision not in _PRECISIONS:
            raise ValueError(f"speed.precision={self.precision!r}: expected fp32 or bf16")
        if self.attention not in ("default", "math"):
            raise ValueError(f"speed.attention={self.attention!r}: expected default or math")

    @property
    def is_exact(self) -> bool:
        return self == SpeedConfig()

    def label(self) -> str:
        """Short name of the switches that are on ('exact' when none)."""
        on = []
        if self.precision != "fp32":
            on.append(self.precision)
        if self.compile:
            on.append("compile" + ("+unet" if self.compile_unet else ""))
        if self.cudnn_benchmark:
            on.append("cudnn_benchmark")
        if self.tf32 is not None:
            on.append(f"tf32={'on' if self.tf32 else 'off'}")
        if self.channels_last:
            on.append("channels_last")
        if self.attention != "default":
            on.append(f"attn_{self.attention}")
        return "+".join(on) or "exact"


def speed_config(cfg: Any = None, **overrides: Any) -> SpeedConfig:
    """SpeedConfig from a Hydra `speed` node / dict / None (all off), plus keyword overrides."""
    vals: Dict[str, Any] = {}
    if cfg is not None:
        for f in fields(SpeedConfig):
            try:
                v = cfg[f.name]
            except (KeyError, AttributeError, TypeError):
                continue
            vals[f.name] = v
    vals.update(overrides)
    unknown = set(vals) - {f.name for f in fields(SpeedConfig)}
    if unknown:
        raise ValueError(f"speed: unknown key(s) {sorted(unknown)}")
    out = SpeedConfig(**vals)
    out.compile, out.compile_unet = bool(out.compile), bool(out.compile_unet)
    out.cudnn_benchmark, out.channels_last = bool(out.cudnn_benchmark), bool(out.channels_last)
    out.tf32 = None if out.tf32 is None else bool(out.tf32)
    return out


class SpeedHandle:
    """What `apply_speed` changed; `restore()` brings back the exact path and the backend flags."""

    def __init__(self, model, cfg: SpeedConfig, flags: Dict[str, bool], shadowed: list):
        self.model, self.cfg, self._flags, self._shadowed = model, cfg, flags, shadowed

    def restore(self) -> None:
        for name in self._shadowed:
            self.model.__dict__.pop(name, None)
        if self.cfg.channels_last and hasattr(self.model, "vq"):
            self.model.vq.to(memory_format=torch.contiguous_format)
        _set_flags(self._flags)
        self._shadowed = []


def _get_flags() -> Dict[str, bool]:
    return {"cudnn_benchmark": torch.backends.cudnn.benchmark,
            "cudnn_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_tf32": torch.backends.cuda.matmul.allow_tf32}


def _set_flags(flags: Dict[str, bool]) -> None:
    torch.backends.cudnn.benchmark = flags["cudnn_benchmark"]
    torch.backends.cudnn.allow_tf32 = flags["cudnn_tf32"]
    torch.backends.cuda.matmul.allow_tf32 = flags["matmul_tf32"]


def _device_type(model) -> str:
    try:
        return next(iter(model.parameters())).device.type
    except StopIteration:
        buf = next(iter(model.buffers()), None)
        return buf.device.type if buf is not None else "cpu"


def _autocast(fn: Callable, device_type: str, dtype: Optional[torch.dtype]) -> Callable:
    if dtype is None:
        return fn

    def wrapped(*args, **kwargs):
        with torch.autocast(device_type, dtype=dtype):
            return fn(*args, **kwargs)

    return wrapped


def _math_attention(fn: Callable) -> Callable:
    """Run `fn` with the plain-matmul SDPA backend.

    The VQ decoder's mid-block attention has one 512-channel head over 64×64 tokens: too wide
    for flash attention, so PyTorch falls back to the memory-efficient kernel, whose backward
    took 9–15 ms of a 37–53 ms decoder step on an H200 (scripts/profile_decoder.py).  Two
    cuBLAS GEMMs and a softmax do the same work in far less time at 4096 tokens.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def wrapped(*args, **kwargs):
        with sdpa_kernel([SDPBackend.MATH]):
            return fn(*args, **kwargs)

    return wrapped


def _compile(fn: Callable, cfg: SpeedConfig) -> Callable:
    return torch.compile(fn, mode=None if cfg.compile_mode == "default" else cfg.compile_mode,
                         backend=cfg.compile_backend, dynamic=False)


def apply_speed(model, cfg: Any = None) -> SpeedHandle:
    """Install the switches of `cfg` (SpeedConfig, Hydra node, dict or None) on `model`."""
    cfg = cfg if isinstance(cfg, SpeedConfig) else speed_config(cfg)
    flags = _get_flags()
    new = dict(flags)
    if cfg.cudnn_benchmark:
        new["cudnn_benchmark"] = True
    if cfg.tf32 is not None:
        new["cudnn_tf32"] = new["matmul_tf32"] = bool(cfg.tf32)
    _set_flags(new)
    shadowed = []
    if cfg.is_exact or cfg == SpeedConfig(cudnn_benchmark=cfg.cudnn_benchmark, tf32=cfg.tf32):
        return SpeedHandle(model, cfg, flags, shadowed)
    dev = _device_type(model)
    dtype = _PRECISIONS[cfg.precision]
    has_vq = hasattr(model, "vq") and hasattr(model, "quantize")
    if has_vq:
        vq = model.vq
        if cfg.channels_last:
            vq.to(memory_format=torch.channels_last)

        def body(zq: torch.Tensor) -> torch.Tensor:
            if cfg.channels_last:
                zq = zq.contiguous(memory_format=torch.channels_last)
            return vq.decoder(vq.post_quant_conv(zq))

        body = _autocast(body, dev, dtype)
        if cfg.compile:
            body = _compile(body, cfg)
        if cfg.attention == "math":
            body = _math_attention(body)

        def decode(z: torch.Tensor) -> torch.Tensor:
            zq, _ = model.quantize(z)  # fp32, outside autocast: the same codes as the exact path
            return body(zq).float().contiguous()

        model.decode = decode
        shadowed.append("decode")
    elif dtype is not None or cfg.compile:  # generic model (toy prior): wrap decode as a whole
        inner = _autocast(type(model).decode.__get__(model), dev, dtype)
        if cfg.compile:
            inner = _compile(inner, cfg)
        model.decode = lambda z: inner(z).float()
        shadowed.append("decode")
    if hasattr(model, "eps_model"):
        eps = _autocast(type(model).eps_model.__get__(model), dev, dtype)
        if cfg.compile and cfg.compile_unet:
            eps = _compile(eps, cfg)
        if eps is not None and (dtype is not None or (cfg.compile and cfg.compile_unet)):
            model.eps_model = lambda x, t: eps(x, t).float()
            shadowed.append("eps_model")
    elif dtype is not None:
        tw = _autocast(type(model).tweedie.__get__(model), dev, dtype)
        model.tweedie = lambda z, sigma: tw(z, sigma).float()
        shadowed.append("tweedie")
    return SpeedHandle(model, cfg, flags, shadowed)
