"""Speed switches (config group `speed`, presets configs/speed/{exact,faithful,fast}.yaml); all
off = the exact path, the reference.

Each switch keeps the sampler's math in float32: only the network forwards (VQ decoder,
UNet) and the decoder's backward run in reduced precision or compiled; what `decode` and
`tweedie` hand back to the sampler is float32, so the Langevin/HMC update, the PF-ODE
step, the FFT operator and the loss stay fp32.

Switches (defaults = exact path)::

    speed:
      preset: exact          # name only (recorded in the run's config.yaml)
      precision: fp32        # fp32 | bf16: torch.autocast(bfloat16) around the decoder body and the UNet
      compile: false         # torch.compile the decoder body (post_quant_conv + decoder)
      compile_unet: false    # ... and the UNet (2 of ~102 network calls per annealing step)
      compile_mode: default  # torch.compile mode; reduce-overhead = CUDA graphs over decoder fwd / bwd
      compile_backend: inductor
      compile_dynamic: true  # symbolic batch dimension: one compile serves every batch size >= 2
      compile_warmup: true   # compile inside apply_speed (dummy fwd+bwd); a failure -> one warning, eager
      compile_grad_only: true  # only gradient decodes use the compiled graph; no-grad decodes run eager
      compile_tuning: false  # Inductor coordinate-descent tuning of its Triton kernels (norm/elementwise)
      cudnn_benchmark: false # torch.backends.cudnn.benchmark
      tf32: null             # null = PyTorch defaults (what DAPS ran); true/false = force both flags
      channels_last: false   # NHWC decoder weights and input (inside the compiled graph when compiled)
      fast_upsample: false   # nearest-2x upsampling as expand+reshape: backward is a sum, not a scatter
      attention: default     # default | math: SDPA backend of the decoder's 512-wide attention head;
                             # split_tf32: fp32-accurate 3xTF32 tensor-core matmuls (cores/decoder_ops.py)
      nhwc_group_norm: false # GroupNorm of a channels-last input as reductions over its NHWC view
      triton_group_norm: false # fused NHWC GroupNorm(+SiLU) Triton kernels, forward and backward
                             # (cores/triton_group_norm.py); replaces nhwc_group_norm where both are on
      nhwc_conv_layout: false # conv inputs and output gradients asked for in channels-last memory
      deterministic: false   # deterministic cuDNN / Inductor / PyTorch kernels: bit-identical runs

Notes on what each one changes:

* **VQ quantisation stays fp32** in every mode: the codebook distances run outside autocast,
  because a bf16 `argmin` would pick different codes and change the image, not just round it.
* **TF32.** DAPS never touches the flags, so it ran with PyTorch's defaults:
  `torch.backends.cudnn.allow_tf32 = True` (convolutions — almost all of the decoder and
  UNet — use TF32 on Ampere/Hopper) and `torch.backends.cuda.matmul.allow_tf32 = False`
  (matmuls, i.e. attention and linear layers, in full fp32).  `tf32: null` keeps exactly that,
  so the project's exact path is numerically the DAPS path; `tf32: true` also lets matmuls use
  TF32, `tf32: false` forces strict fp32 convolutions too (slower, more exact than DAPS).
* **No compile stall.** A compiled graph is specialised on its input's shapes and on grad
  mode.  Pruning shrinks the batch (4 -> 2 rows) and decodes once without gradients, and the
  end of a run decodes without gradients too: with static shapes each of these compiled a new
  graph mid-run (tens of seconds each).  Here the batch dimension is symbolic
  (`compile_dynamic`), decodes without gradients (pruning, final image, trajectory frames: one
  call each) run the same body eagerly (`compile_grad_only`), and the one compile happens up
  front (`compile_warmup`), timed: `compile_seconds()` is the process total; metrics.json gets
  the run's part of it.  A batch of one row is specialised by PyTorch and compiles once more if
  it ever occurs.
* **compile fallback.** When Inductor cannot run (no Triton, an old GPU, a platform without a
  C++/Triton toolchain) the warm-up fails: one warning, and the run goes on without compile.
* **Weight gradients are never computed**: `apply_speed` freezes every model parameter
  (`requires_grad_(False)`; the builders already do), so the backward is to the latent only.
* **cudnn_benchmark** lets cuDNN pick the fastest algorithm per shape; picks can differ in
  float rounding, hence a switch.  It applies to the decoder only: the UNet runs 2 of ~102
  network calls per annealing step and has ~100 conv shapes, so benchmarking them again at
  every new batch size (pruning) cost a 2 s step for nothing.
* **fast_upsample.** The decoder's nearest-neighbour 2x upsampling (`F.interpolate`) has a
  backward that scatters with atomic adds into an fp32 buffer (Inductor: `index_put`); on an
  H200 that took ≈ 6 % of a bf16 decoder step.  `x[:, :, :, None, :, None].expand(...)` gives
  the same forward values and a backward that is a plain sum over each 2×2 block.

* **deterministic** sets `torch.backends.cudnn.deterministic`, `torch.use_deterministic_algorithms
  (warn_only)` and Inductor's `deterministic` mode (no on-device benchmarking that picks kernels
  by timing, reduction configs restricted to one summation order), so a run gives the same bits
  in every process.  It excludes `cudnn_benchmark`: an algorithm picked by timing can differ
  from one process to the next, and with it the rounding.
  The run option `deterministic=true` (`cores.pipeline.set_deterministic`) sets the cuDNN/PyTorch
  part for the whole process and also turns off the memory-efficient attention backend; this
  switch is the preset's own and undone by `restore()`.  With `attention: default` the decoder's
  memory-efficient attention backward stays non-deterministic: the faithful preset uses `math`.
* **The 68.9 GiB of cudnn_benchmark.**  With `cudnn.benchmark` PyTorch times the candidate
  cuDNN engines (up to `torch.backends.cudnn.benchmark_limit`, 10) of every new convolution
  shape on its first call, each with its own workspace from the caching allocator.  fp32/TF32
  NHWC decoder, 4 rows, one H100: peak 68.9 GiB on the first fwd+bwd, 7.6 GiB on the next
  (`scripts/profile_decoder.py --benchmark-peak --channels-last --cudnn-benchmark`; the
  `CUDNN_CONV_WSCAP_DBG` cap did not lower it).  PyTorch keeps one cuDNN plan per shape and
  layout, timed or not, so benchmark has no effect (and no peak) for shapes already seen.
  The `faithful` preset runs without benchmark; a run with it makes every shape before its VRAM
  meter starts (`cores/warmup.py`), so the trials' peak is reported apart from the run's.

`apply_speed(model, cfg)` installs the switches on a model built by `build_model` (instance
attributes shadow `decode` / `eps_model`; the class methods — the exact path — stay
untouched) and returns a handle whose `restore()` removes them again.
"""
from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Dict, Optional

import torch

from cores.decoder_ops import install_nhwc_conv_layout, install_nhwc_group_norm, install_split_tf32_attention
from cores.triton_group_norm import install_triton_group_norm

__all__ = ["SpeedConfig", "SpeedHandle", "apply_speed", "speed_config", "compile_seconds"]

_PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

# seconds spent compiling: wall time of the apply_speed warm-ups, and dynamo's own compile-time
# total accumulated across `torch._dynamo.reset()` (which clears dynamo's counters), minus the
# part of it that fell inside the warm-ups (already counted in wall time)
_COMPILE = {"warmup_sec": 0.0, "dynamo_seen": 0.0, "dynamo_total": 0.0, "dynamo_in_warmups": 0.0}


@dataclass
class SpeedConfig:
    preset: str = field(default="exact", compare=False)  # a name only; never changes the math
    precision: str = "fp32"
    compile: bool = False
    compile_unet: bool = False
    compile_mode: str = "default"
    compile_backend: str = "inductor"
    compile_dynamic: bool = True
    compile_warmup: bool = True
    compile_grad_only: bool = True
    compile_tuning: bool = False
    cudnn_benchmark: bool = False
    tf32: Optional[bool] = None
    channels_last: bool = False
    fast_upsample: bool = False
    attention: str = "default"  # default | math | split_tf32 (cores/decoder_ops.py)
    nhwc_group_norm: bool = False
    triton_group_norm: bool = False
    nhwc_conv_layout: bool = False
    deterministic: bool = False

    def __post_init__(self) -> None:
        if self.deterministic and self.cudnn_benchmark:
            raise ValueError("speed.deterministic=true excludes speed.cudnn_benchmark=true (an algorithm "
                             "picked by timing can differ between processes)")
        if self.precision not in _PRECISIONS:
            raise ValueError(f"speed.precision={self.precision!r}: expected fp32 or bf16")
        for name in ("nhwc_group_norm", "triton_group_norm", "nhwc_conv_layout"):
            if getattr(self, name) and not self.channels_last:
                raise ValueError(f"speed.{name}=true acts on channels-last activations: it needs "
                                 "speed.channels_last=true")
        if self.attention not in ("default", "math", "split_tf32"):
            raise ValueError(f"speed.attention={self.attention!r}: expected default, math or split_tf32")
        if self.compile_mode not in _MODES:
            raise ValueError(f"speed.compile_mode={self.compile_mode!r}: expected one of {', '.join(_MODES)}")

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
            if self.compile_mode != "default":
                on.append({"reduce-overhead": "cuda_graphs"}.get(self.compile_mode, self.compile_mode))
            if not self.compile_dynamic:
                on.append("static")
            if not self.compile_grad_only:
                on.append("compile_nograd")
            if self.compile_tuning:
                on.append("tuning")
        if self.cudnn_benchmark:
            on.append("cudnn_benchmark")
        if self.tf32 is not None:
            on.append(f"tf32={'on' if self.tf32 else 'off'}")
        if self.channels_last:
            on.append("channels_last")
        if self.fast_upsample:
            on.append("fast_upsample")
        if self.attention != "default":
            on.append(f"attn_{self.attention}")
        if self.nhwc_group_norm:
            on.append("nhwc_group_norm")
        if self.triton_group_norm:
            on.append("triton_group_norm")
        if self.nhwc_conv_layout:
            on.append("nhwc_conv_layout")
        if self.deterministic:
            on.append("deterministic")
        return "+".join(on) or "exact"


_BOOLS = ("compile", "compile_unet", "compile_dynamic", "compile_warmup", "compile_grad_only", "compile_tuning",
          "cudnn_benchmark", "channels_last", "fast_upsample", "nhwc_group_norm", "triton_group_norm",
          "nhwc_conv_layout",
          "deterministic")


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
        try:
            keys = set(cfg.keys())
        except (AttributeError, TypeError):
            keys = set()
        vals.update({k: cfg[k] for k in keys - set(vals)})  # unknown keys: reported below
    vals.update(overrides)
    unknown = set(vals) - {f.name for f in fields(SpeedConfig)}
    if unknown:
        raise ValueError(f"speed: unknown key(s) {sorted(unknown)}")
    for name in _BOOLS + ("tf32",):  # bool("no") is True: only real booleans are read (tf32 may be null)
        v = vals.get(name, False)
        if not isinstance(v, bool) and not (name == "tf32" and v is None):
            raise ValueError(f"speed.{name}={v}: expected true or false" + (" or null" if name == "tf32" else ""))
    out = SpeedConfig(**vals)
    out.preset = str(out.preset)
    return out


def _dynamo_compile_sec() -> float:
    """Dynamo's cumulative compile time (trace + AOT + Inductor, and lazily compiled backwards)."""
    try:
        from torch._dynamo.utils import compilation_time_metrics as m
    except Exception:  # pragma: no cover - no dynamo
        return 0.0
    return float(sum(sum(m.get(k, [])) for k in ("_compile.compile_inner", "backward._backward_impl")))


def _dynamo_total() -> float:
    now = _dynamo_compile_sec()
    seen = _COMPILE["dynamo_seen"]
    _COMPILE["dynamo_total"] += now - seen if now >= seen else now  # now < seen: counters were reset
    _COMPILE["dynamo_seen"] = now
    return _COMPILE["dynamo_total"]


def compile_seconds() -> float:
    """Seconds this process spent compiling: the warm-ups of `apply_speed` plus any compile outside
    them (a recompile mid-run).  For metrics.json `metadata["compile_sec"]`; call it before
    `torch._dynamo.reset()` if the process resets the compiler."""
    outside = max(0.0, _dynamo_total() - _COMPILE["dynamo_in_warmups"])
    return _COMPILE["warmup_sec"] + outside


class SpeedHandle:
    """What `apply_speed` changed; `restore()` brings back the exact path and the backend flags."""

    def __init__(self, model, cfg: SpeedConfig, flags: Dict[str, bool], shadowed: list):
        self.model, self.cfg, self._flags, self._shadowed = model, cfg, flags, shadowed
        self.compile_sec = 0.0       # warm-up compile of this handle (seconds)
        self.compiled = False        # False when compile was asked for but fell back to eager
        self._patched: list = []     # modules whose `forward` is shadowed (fast_upsample, nhwc_* switches)
        self._processors: list = []  # attention modules given another processor (attention=split_tf32)
        self._swapped: list = []     # (parent, attribute, module it replaced): SiLUs folded into a norm

    def restore(self) -> None:
        for name in self._shadowed:
            self.model.__dict__.pop(name, None)
        for mod in self._patched:
            mod.__dict__.pop("forward", None)
        self._patched = []
        for mod in self._processors:
            mod.set_processor(mod.__dict__.pop("_processor_before"))
        self._processors = []
        for parent, name, before in self._swapped:
            parent._modules[name] = before
        self._swapped = []
        if self.cfg.channels_last and hasattr(self.model, "vq"):
            self.model.vq.to(memory_format=torch.contiguous_format)
        _set_flags(self._flags)
        self._shadowed = []


def _inductor_config():
    try:
        import torch._inductor.config as inductor_config
    except Exception:  # pragma: no cover - no Inductor
        return None
    return inductor_config if hasattr(inductor_config, "deterministic") else None


def _get_flags() -> Dict[str, bool]:
    ind = _inductor_config()
    return {"cudnn_benchmark": torch.backends.cudnn.benchmark,
            "cudnn_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_deterministic": torch.backends.cudnn.deterministic,
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "deterministic_warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
            "fill_uninitialized_memory": torch.utils.deterministic.fill_uninitialized_memory,
            "inductor_deterministic": bool(ind.deterministic) if ind is not None else False}


def _set_flags(flags: Dict[str, bool]) -> None:
    torch.backends.cudnn.benchmark = flags["cudnn_benchmark"]
    torch.backends.cudnn.allow_tf32 = flags["cudnn_tf32"]
    torch.backends.cuda.matmul.allow_tf32 = flags["matmul_tf32"]
    torch.backends.cudnn.deterministic = flags["cudnn_deterministic"]
    torch.use_deterministic_algorithms(flags["deterministic_algorithms"],
                                       warn_only=flags["deterministic_warn_only"])
    torch.utils.deterministic.fill_uninitialized_memory = flags["fill_uninitialized_memory"]
    ind = _inductor_config()
    if ind is not None:
        ind.deterministic = flags["inductor_deterministic"]


def _device(model) -> torch.device:
    try:
        return next(iter(model.parameters())).device
    except (StopIteration, AttributeError):
        buf = next(iter(model.buffers()), None) if hasattr(model, "buffers") else None
        return buf.device if buf is not None else torch.device("cpu")


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


def nearest2x(x: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour 2x upsampling of (B, C, H, W) whose backward is a 2×2 block sum; an NHWC
    (channels_last) input stays NHWC, so no layout transpose is added around the next conv."""
    b, c, h, w = x.shape
    if c > 1 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        y = x.permute(0, 2, 3, 1)[:, :, None, :, None, :].expand(b, h, 2, w, 2, c)
        return y.reshape(b, 2 * h, 2 * w, c).permute(0, 3, 1, 2)
    return x[:, :, :, None, :, None].expand(b, c, h, 2, w, 2).reshape(b, c, 2 * h, 2 * w)


def _patch_upsamplers(root: torch.nn.Module) -> list:
    """Shadow `forward` of the diffusers Upsample2D blocks (plain interpolate + conv) with nearest2x."""
    try:
        from diffusers.models.upsampling import Upsample2D
    except Exception:  # pragma: no cover - diffusers missing: nothing to patch
        return []
    patched = []
    for mod in root.modules():
        if (isinstance(mod, Upsample2D) and mod.interpolate and not mod.use_conv_transpose
                and getattr(mod, "norm", None) is None):
            conv = (getattr(mod, "conv", None) if mod.name == "conv" else getattr(mod, "Conv2d_0", None)) \
                if mod.use_conv else None

            def forward(hidden_states, output_size=None, *args, _conv=conv, _mod=mod, **kwargs):
                if output_size is not None:  # not used by the decoder; keep the library's path
                    return type(_mod).forward(_mod, hidden_states, output_size, *args, **kwargs)
                out = nearest2x(hidden_states)
                return _conv(out) if _conv is not None else out

            mod.forward = forward
            patched.append(mod)
    return patched


def _no_cudnn_benchmark(fn: Callable) -> Callable:
    def wrapped(*args, **kwargs):
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, benchmark=False,
                                        deterministic=torch.backends.cudnn.deterministic,
                                        allow_tf32=torch.backends.cudnn.allow_tf32):
            return fn(*args, **kwargs)

    return wrapped


def _compile(fn: Callable, cfg: SpeedConfig) -> Callable:
    mode = None if cfg.compile_mode == "default" else cfg.compile_mode
    kw: Dict[str, Any] = {"backend": cfg.compile_backend, "dynamic": None if cfg.compile_dynamic else False}
    if cfg.compile_tuning and cfg.compile_backend == "inductor":
        opts = dict(torch._inductor.list_mode_options(mode)) if mode else {}
        opts["coordinate_descent_tuning"] = True
        kw["options"] = opts
    else:
        kw["mode"] = mode
    return torch.compile(fn, **kw)


def _compile_blocker(dev: torch.device, cfg: SpeedConfig) -> Optional[str]:
    """Why Inductor cannot run here, if that is known before trying (else None)."""
    if cfg.compile_backend != "inductor" or dev.type != "cuda":
        return None
    try:
        from torch.utils._triton import has_triton
    except Exception:  # pragma: no cover
        return None
    if not has_triton():
        return "Triton is not available for this GPU"
    return None


def _mark_batch(t: torch.Tensor, cfg: SpeedConfig) -> torch.Tensor:
    if cfg.compile_dynamic and t.shape[0] >= 2:  # a size-1 dim is always specialised by PyTorch
        torch._dynamo.mark_dynamic(t, 0)
    return t


def _warn_no_compile(reason: str) -> None:
    warnings.warn(f"speed.compile: torch.compile cannot run here ({reason}); continuing without compile",
                  RuntimeWarning, stacklevel=3)


def _warm_up(fn: Callable, in_shape, dev: torch.device, grad: bool, model=None) -> float:
    """Run `fn` once on a dummy batch of 2 (forward, and backward when `grad`); wall seconds.
    With `model`, its denoiser runs once at that batch too: cuDNN builds its plans for a new
    batch size on first use (≈ 0.2 s for the UNet), which would land in the first step after
    pruning (4 → 2 rows) instead."""
    z = torch.randn((2, *in_shape), device=dev)
    t = time.perf_counter()
    if model is not None and hasattr(model, "tweedie"):
        with torch.no_grad():
            model.tweedie(z, 1.0)
    if grad:
        with torch.enable_grad():
            z = z.requires_grad_(True)
            torch.autograd.grad(fn(z).float().sum(), z)
    else:
        with torch.no_grad():
            fn(z)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter() - t


def apply_speed(model, cfg: Any = None) -> SpeedHandle:
    """Install the switches of `cfg` (SpeedConfig, Hydra node, dict or None) on `model`."""
    cfg = cfg if isinstance(cfg, SpeedConfig) else speed_config(cfg)
    if isinstance(model, torch.nn.Module):
        model.requires_grad_(False)  # gradients flow to the latent only, never to weights
    flags = _get_flags()
    new = dict(flags)
    if cfg.cudnn_benchmark:
        new["cudnn_benchmark"] = True
    if cfg.tf32 is not None:
        new["cudnn_tf32"] = new["matmul_tf32"] = bool(cfg.tf32)
    if cfg.deterministic:
        # warn_only: an op without a deterministic kernel warns instead of stopping a run; no NaN fill
        # of every torch.empty (a debugging aid that costs a pass over each new buffer)
        new.update(cudnn_benchmark=False, cudnn_deterministic=True, deterministic_algorithms=True,
                   deterministic_warn_only=True, fill_uninitialized_memory=False, inductor_deterministic=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS' condition for fixed sums
    _set_flags(new)
    shadowed: list = []
    handle = SpeedHandle(model, cfg, flags, shadowed)
    if cfg.is_exact or cfg == SpeedConfig(cudnn_benchmark=cfg.cudnn_benchmark, tf32=cfg.tf32,
                                          deterministic=cfg.deterministic):
        return handle
    dev = _device(model)
    dtype = _PRECISIONS[cfg.precision]
    want_compile = cfg.compile
    if want_compile and dev.type == "cpu" and cfg.compile_backend == "inductor" and isinstance(
            model, torch.nn.Module) and not any(True for _ in model.parameters()):
        # a network-free model (the toy prior) on a CPU: nothing worth Inductor's C++ build (≈ 10 s and a
        # raw torch log line); other backends (tests use aot_eager) still compile
        want_compile = False
    if want_compile:
        reason = _compile_blocker(dev, cfg)
        if reason is not None:
            _warn_no_compile(reason)
            want_compile = False
    has_vq = hasattr(model, "vq") and hasattr(model, "quantize")
    if has_vq:
        vq = model.vq
        if cfg.channels_last:
            vq.to(memory_format=torch.channels_last)
        if cfg.fast_upsample:
            handle._patched += _patch_upsamplers(vq.decoder)
        if cfg.triton_group_norm:
            norms, handle._swapped = install_triton_group_norm(vq.decoder)
            handle._patched += norms
        elif cfg.nhwc_group_norm:
            handle._patched += install_nhwc_group_norm(vq.decoder)
        if cfg.nhwc_conv_layout:
            handle._patched += install_nhwc_conv_layout(vq.decoder)
        if cfg.attention == "split_tf32":
            handle._processors = install_split_tf32_attention(vq.decoder)

        def body(zq: torch.Tensor) -> torch.Tensor:
            if cfg.channels_last:
                zq = zq.contiguous(memory_format=torch.channels_last)
            return vq.decoder(vq.post_quant_conv(zq))

        def install(compiled: bool) -> None:
            eager = _autocast(body, dev.type, dtype)
            fast = _compile(eager, cfg) if compiled else eager
            if cfg.attention == "math":
                eager, fast = _math_attention(eager), _math_attention(fast)

            def decode(z: torch.Tensor) -> torch.Tensor:
                zq, _ = model.quantize(z)  # fp32, outside autocast: the same codes as the exact path
                use_fast = not cfg.compile_grad_only or (torch.is_grad_enabled() and zq.requires_grad)
                out = fast(_mark_batch(zq, cfg) if compiled else zq) if use_fast else eager(zq)
                return out.float().contiguous()

            model.decode = decode

        install(want_compile)
        shadowed.append("decode")
    elif dtype is not None or want_compile:  # generic model (toy prior): wrap decode as a whole
        base = _autocast(type(model).decode.__get__(model), dev.type, dtype)

        def install(compiled: bool) -> None:
            inner = _compile(base, cfg) if compiled else base

            def decode(z: torch.Tensor) -> torch.Tensor:
                use_fast = not cfg.compile_grad_only or (torch.is_grad_enabled() and z.requires_grad)
                return (inner(_mark_batch(z, cfg) if compiled else z) if use_fast else base(z)).float()

            model.decode = decode

        install(want_compile)
        shadowed.append("decode")
    def install_eps(compiled: bool) -> None:
        if hasattr(model, "eps_model"):
            eps = _autocast(type(model).eps_model.__get__(model), dev.type, dtype)
            if compiled and cfg.compile_unet:
                eps = _compile(eps, cfg)
            if cfg.cudnn_benchmark:
                eps = _no_cudnn_benchmark(eps)
            if dtype is not None or (compiled and cfg.compile_unet) or cfg.cudnn_benchmark:
                model.eps_model = lambda x, t: eps(x, t).float()
                if "eps_model" not in shadowed:
                    shadowed.append("eps_model")
        elif dtype is not None:
            tw = _autocast(type(model).tweedie.__get__(model), dev.type, dtype)
            model.tweedie = lambda z, sigma: tw(z, sigma).float()
            if "tweedie" not in shadowed:
                shadowed.append("tweedie")

    install_eps(want_compile)
    if want_compile and "decode" in shadowed:
        handle.compiled = True
        if cfg.compile_warmup:
            d0 = _dynamo_total()
            try:
                sec = _warm_up(model.decode, model.get_in_shape(), dev, grad=True)
                if dev.type == "cuda":
                    _warm_up(model.decode, model.get_in_shape(), dev, grad=False, model=model)
                if not cfg.compile_grad_only:
                    sec += _warm_up(model.decode, model.get_in_shape(), dev, grad=False)
            except Exception as err:  # Inductor/Triton/toolchain failure: run on without compile
                _warn_no_compile(f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}")
                try:
                    torch._dynamo.reset()
                except Exception:  # pragma: no cover
                    pass
                install(False)
                install_eps(False)
                handle.compiled = False
            else:
                handle.compile_sec = sec
                _COMPILE["warmup_sec"] += sec
                _COMPILE["dynamo_in_warmups"] += _dynamo_total() - d0
    return handle
