"""CompVis latent diffusion models (ffhq-ldm-vq-4, cin256-v2) as `LatentModel`s (Rombach et al. 2022; DAPS' VPPrecond denoiser).

Model config (Hydra `model` node or dict)::

    name: ldm
    ldm_config: {model: {target: ...LatentDiffusion, params: {...}}}   # the CompVis yaml content
    diffusion_path: checkpoints/ldm_ffhq256.pt                         # original Lightning .ckpt
    timestep_mapping: vp          # optional: vp (default, DAPS) | ldm (see below)
    class_label: 1000             # optional, class-conditional models only (DAPS: null class 1000)

Denoiser (DAPS `VPPrecond`, default ``timestep_mapping: vp``)::

    c_in = 1/sqrt(σ²+1),  t = 999·σ_inv(σ),  D(z; σ) = z − σ·ε_θ(c_in·z, t)
    σ_inv(σ) = (sqrt(β_min² + 2·β_d·ln(1+σ²)) − β_min)/β_d,  β_min = 0.1, β_d = 19.9

The continuous VP-SDE σ_inv differs from the LDM's own discrete sqrt-linear β schedule
(linear_start 0.0015, linear_end 0.0195): e.g. σ = 1 gives t ≈ 167 with VPPrecond but the LDM
was trained to see σ = 1 at t ≈ 271.  ``timestep_mapping: ldm`` uses the schedule-consistent
mapping instead: t is the fractional index at which the LDM's own noise level
σ_k = sqrt((1−ᾱ_k)/ᾱ_k) equals σ (linear interpolation in log σ between integer k, clamped
to [0, T−1] outside σ_0 ≈ 0.039 … σ_{T−1} ≈ 157).  c_in is the same in both mappings (it
is exactly sqrt(ᾱ) when σ = σ_k).  The default stays ``vp`` so results are comparable with
DAPS.

`decode(z)` runs the VQ quantiser in the forward pass (nearest codebook entry) with a
straight-through gradient, then post_quant_conv + decoder (DAPS
`differentiable_decode_first_stage`, scale_factor 1).  `encode(x)` = quant_conv(encoder(x)),
no quantisation.  `tweedie`, `eps_model`, `decode` and `encode` are plain functions of their
tensors so that they can be wrapped with autocast / torch.compile later.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from . import register_model
from .base import LatentModel, Sigma
from .ldm_convert import LDMSpec, build_and_load, missing_file_error, read_checkpoint, to_plain

__all__ = ["LDMModel", "build_ldm", "build_random_ldm", "resolve_checkpoint_path", "VP_BETA_MIN", "VP_BETA_D"]

VP_BETA_MIN = 0.1
VP_BETA_D = 19.9
NULL_CLASS = 1000
_REPO_ROOT = Path(__file__).resolve().parents[2]


class LDMModel(LatentModel):
    """A CompVis LDM (diffusers modules) with DAPS' VPPrecond denoiser semantics."""

    def __init__(self, spec: LDMSpec, modules: Dict[str, nn.Module], timestep_mapping: str = "vp",
                 class_label: Optional[int] = None):
        super().__init__()
        if timestep_mapping not in ("vp", "ldm"):
            raise ValueError(f"timestep_mapping must be 'vp' or 'ldm', got {timestep_mapping!r}")
        self.spec = spec
        self.unet = modules["unet"]
        self.vq = modules["vq"]
        self.cond = modules.get("cond")  # nn.Embedding (ClassEmbedder) or None
        self.conditional = self.cond is not None
        self.timestep_mapping = timestep_mapping
        self.num_timesteps = spec.timesteps
        if self.conditional:
            self.class_label = NULL_CLASS if class_label is None else int(class_label)
            if not 0 <= self.class_label < spec.n_classes:
                raise ValueError(f"class_label {self.class_label} outside [0, {spec.n_classes})")
        else:
            self.class_label = None
        size = spec.unet.image_size
        self._in_shape = (spec.vq.embed_dim, size, size)
        self.image_resolution = size * 2 ** (spec.vq.levels - 1)
        # log σ_k of the LDM's own schedule, for timestep_mapping='ldm' (float64, not a module buffer)
        ac = spec.alphas_cumprod()
        self._ldm_log_sigmas = (0.5 * torch.log((1.0 - ac) / ac))

    # ------------------------------------------------------------------ interface
    def get_in_shape(self) -> Tuple[int, int, int]:
        return self._in_shape

    @property
    def device(self) -> torch.device:
        return self.vq.post_quant_conv.weight.device

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Continuous UNet timestep for noise level σ (any shape, float32 in → float32 out)."""
        if self.timestep_mapping == "vp":
            sigma_inv = ((VP_BETA_MIN ** 2 + 2 * VP_BETA_D * (1 + sigma ** 2).log()).sqrt() - VP_BETA_MIN) / VP_BETA_D
            return (self.num_timesteps - 1) * sigma_inv
        log_s = sigma.detach().to(torch.float64).clamp_min(1e-30).log()
        table = self._ldm_log_sigmas.to(log_s.device)
        idx = torch.searchsorted(table, log_s.contiguous()).clamp(1, len(table) - 1)
        lo, hi = table[idx - 1], table[idx]
        frac = ((log_s - lo) / (hi - lo)).clamp(0.0, 1.0)
        t = (idx - 1).to(torch.float64) + frac
        return t.to(sigma.dtype)

    def context(self, batch: int) -> Optional[torch.Tensor]:
        """Cross-attention context: the ClassEmbedder embedding of the null class, (B, 1, ctx)."""
        if not self.conditional:
            return None
        emb = self.cond.weight[self.class_label]
        return emb.view(1, 1, -1).expand(batch, 1, emb.shape[-1])

    def eps_model(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Raw UNet ε prediction; `t` is (1,) or (B,) float (fractional timesteps are kept)."""
        if self.conditional:
            return self.unet(x, t, encoder_hidden_states=self.context(x.shape[0])).sample
        return self.unet(x, t).sample

    def _sigma(self, sigma: Sigma, z: torch.Tensor) -> torch.Tensor:
        s = torch.as_tensor(sigma, device=z.device).to(torch.float32).reshape(-1)
        if s.numel() not in (1, z.shape[0]):
            raise ValueError(f"sigma has {s.numel()} entries for a batch of {z.shape[0]}")
        return s

    def tweedie(self, z: torch.Tensor, sigma: Sigma) -> torch.Tensor:
        """D(z; σ) = z − σ·ε_θ(c_in·z, t(σ)); σ: float, 0-dim or (B,) tensor."""
        s = self._sigma(sigma, z)
        sb = s.view(-1, 1, 1, 1)
        c_in = 1 / (sb ** 2 + 1).sqrt()
        t = self.sigma_to_t(s)
        eps = self.eps_model((c_in * z).to(z.dtype), t)
        return z - sb.to(z.dtype) * eps.to(z.dtype)

    # ------------------------------------------------------------------ first stage
    def quantize(self, z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Nearest-codebook quantisation (squared L2, as CompVis VectorQuantizer) with a
        straight-through gradient. Returns (z_q (B,C,H,W), indices (B,H,W))."""
        B, C, H, W = z.shape
        zf = z.permute(0, 2, 3, 1).reshape(-1, C)
        e = self.vq.quantize.embedding.weight
        d = (zf.detach() ** 2).sum(1, keepdim=True) + (e ** 2).sum(1) - 2 * zf.detach() @ e.t()
        idx = torch.argmin(d, dim=1)
        zq = e[idx].view(B, H, W, C).permute(0, 3, 1, 2)
        zq = z + (zq - z).detach()
        return zq, idx.view(B, H, W)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent → image in [-1, 1]: VQ quantise (straight-through), post_quant_conv, decoder."""
        zq, _ = self.quantize(z)
        return self.vq.decoder(self.vq.post_quant_conv(zq))

    def decode_unquantized(self, z: torch.Tensor) -> torch.Tensor:
        """Decoder without quantisation (diagnostic only; not what DAPS uses)."""
        return self.vq.decoder(self.vq.post_quant_conv(z))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Image in [-1, 1] → latent: quant_conv(encoder(x)), no quantisation."""
        return self.vq.quant_conv(self.vq.encoder(x))

    def extra_repr(self) -> str:
        return (f"in_shape={self._in_shape}, image_resolution={self.image_resolution}, "
                f"conditional={self.conditional}, timestep_mapping={self.timestep_mapping!r}")


# ---------------------------------------------------------------------- builders
def _get(cfg: Any, key: str, default: Any = None) -> Any:
    try:
        v = cfg[key]
    except (KeyError, AttributeError, TypeError):
        return default
    return default if v is None else v


def resolve_checkpoint_path(path: str) -> str:
    """An existing file for `path` (as given, or relative to the repo root); raises with the
    `download.sh` hint when there is none."""
    p = Path(os.path.expanduser(str(path)))
    candidates = [p] if p.is_absolute() else [Path.cwd() / p, _REPO_ROOT / p]
    for c in candidates:
        if c.is_file():
            return str(c)
    raise missing_file_error(str(candidates[0]), "LDM checkpoint (model.diffusion_path)")


def build_ldm(model_cfg: Any, device: torch.device | str = "cpu") -> LDMModel:
    """Build the LDM from `model_cfg` and load the original CompVis checkpoint (strict)."""
    path = _get(model_cfg, "diffusion_path")
    if path is None:
        raise ValueError("model.diffusion_path is not set")
    path = resolve_checkpoint_path(path)  # fail fast, before anything heavy
    spec = LDMSpec(to_plain(model_cfg["ldm_config"]))
    sd = read_checkpoint(path)
    try:
        mods = build_and_load(spec, sd, torch.device(device))
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    del sd
    return LDMModel(spec, mods, timestep_mapping=str(_get(model_cfg, "timestep_mapping", "vp")),
                    class_label=_get(model_cfg, "class_label")).eval().requires_grad_(False)


def build_random_ldm(model_cfg: Any, device: torch.device | str = "cpu", seed: int = 0) -> LDMModel:
    """The full architecture of `model_cfg` with seeded random weights (PyTorch default init
    distributions), no checkpoint. For benchmarks and shape tests."""
    spec = LDMSpec(to_plain(model_cfg["ldm_config"]))
    mods = build_and_load(spec, None, torch.device(device), seed=seed)
    return LDMModel(spec, mods, timestep_mapping=str(_get(model_cfg, "timestep_mapping", "vp")),
                    class_label=_get(model_cfg, "class_label")).eval().requires_grad_(False)


@register_model("ldm_random")
def _build_random_registered(model_cfg: Any, device: torch.device) -> LDMModel:
    """`model.name=ldm_random`: the configured architecture with seeded random weights and no
    checkpoint — for speed/memory runs of the whole pipeline where the weights are not on disk."""
    return build_random_ldm(model_cfg, device, seed=int(_get(model_cfg, "random_seed", 0)))


@register_model("ldm")
def _build_ldm_registered(model_cfg: Any, device: torch.device) -> LDMModel:
    return build_ldm(model_cfg, device)
