"""DINO ViT feature extractor (Caron et al. 2021; features as RLSD uses them), built with timm from the ORIGINAL
facebookresearch/dino state dict (e.g. `dino_deitsmall16_pretrain.pth`, ViT-S/16).

* Architecture inferred from the checkpoint: embed_dim from `pos_embed`, depth from the
  `blocks.N` indices, patch size from `patch_embed.proj.weight`, heads = embed_dim // 64
  (ViT-Ti: 3, ViT-S: 6), mlp_ratio from `fc1`, qkv_bias from the presence of `qkv.bias`,
  LayerNorm eps 1e-6, no head.
* Forward exactly as the original `VisionTransformer.forward`: patch tokens, CLS token,
  position embeddings interpolated as `interpolate_pos_encoding` does for non-native input
  sizes (bicubic with `scale_factor=((w0+0.1)/sqrt(N), (h0+0.1)/sqrt(N))` — not `size=`, which
  changes the features by ~3e-3), blocks, final norm; the output is the CLS token (B, D).
* Frozen (eval, requires_grad False) but differentiable w.r.t. its input (repulsion uses a
  vector–Jacobian product through it).
* Lazy: constructing it reads nothing; the weights are loaded on first use (or `load()`).
  A missing file raises FileNotFoundError naming the file and `bash download.sh dino`;
  call `ensure_available()` to fail fast before heavy work.

Preprocessing of the (B,3,H,W) decoder output (`preprocess`):
* `"original"` (the repulsion default, `dino.preprocess: original`): the original study's
  `DinoFeatureExtractor.preprocess` (yuzzznh/diffusion_phase_retrieval, DAPS/repulsion.py lines
  171-183 at b967b2b): u = (x+1)/2 when the minimum of the batch is below 0 (else u = x), clamp
  u to [0, 1], bilinear resize to `resize` (default 224; align_corners=False, no antialias; skipped
  when already that size), then (u − ImageNet mean)/std (`normalize`, default true).  The
  original's batch is one image's particles; here `groups` (one label per row) gives every image
  its own minimum, so an image's features never depend on the other images of the batch.
* `"raw"` (the constructor default, RLSD's input): `resize=None, normalize=False` feed the raw
  [-1, 1] image unchanged; otherwise u = (x+1)/2; if `resize` is an int: bilinear resize of u
  to resize×resize; then if `normalize`: (u − ImageNet mean)/std, else u is mapped back to
  [-1, 1] (2u − 1), so `resize` alone changes only the size.
"""
from __future__ import annotations

import functools
import math
import os
import re
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DinoFeatureExtractor", "build_dino_vit", "dino_interpolate_pos_encoding",
           "DINO_DEFAULT_WEIGHTS", "IMAGENET_MEAN", "IMAGENET_STD"]

DINO_DEFAULT_WEIGHTS = "checkpoints/dino_deitsmall16_pretrain.pth"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: `preprocess` values: the original study's input (shift when negative, clamp, 224, ImageNet stats) or raw
PREPROCESS = ("original", "raw")
ORIGINAL_RESIZE = 224


def _clean_state_dict(obj: Any) -> Dict[str, torch.Tensor]:
    """Plain backbone state dict from a DINO file (also accepts the full training checkpoint's
    `teacher`/`student` entries with `module.`/`backbone.` prefixes); drops any `head.*`."""
    if isinstance(obj, dict):
        for key in ("teacher", "state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    sd = {}
    for k, v in obj.items():
        k = re.sub(r"^(module\.)?(backbone\.)?", "", k)
        if k.startswith("head."):
            continue
        sd[k] = v
    return sd


RANDOM_VITS16 = "random:vit_small_patch16"


def random_vits16_state_dict(seed: int = 0) -> Dict[str, torch.Tensor]:
    """Seeded random weights with the layout of `dino_deitsmall16_pretrain.pth` (ViT-S/16).

    Only for speed/memory benchmarks on machines without the real file
    (`dino.weights_path=random:vit_small_patch16`); features are meaningless.
    """
    from timm.models.vision_transformer import VisionTransformer

    g = torch.Generator().manual_seed(seed)
    vit = VisionTransformer(img_size=224, patch_size=16, num_classes=0, embed_dim=384, depth=12, num_heads=6,
                            qkv_bias=True, norm_layer=functools.partial(nn.LayerNorm, eps=1e-6), weight_init="skip")
    return {k: (torch.randn(v.shape, generator=g) * 0.02 if v.ndim > 1 else torch.zeros(v.shape)) + (
        1.0 if k.endswith("norm1.weight") or k.endswith("norm2.weight") or k == "norm.weight" else 0.0)
        for k, v in vit.state_dict().items()}


def build_dino_vit(sd: Dict[str, torch.Tensor]) -> nn.Module:
    """A timm VisionTransformer with the architecture of DINO state dict `sd` (weights loaded,
    cast to float32 by `load_state_dict`'s copy)."""
    from timm.models.vision_transformer import VisionTransformer

    embed_dim = int(sd["pos_embed"].shape[-1])
    n_pos = int(sd["pos_embed"].shape[1]) - 1
    grid = int(round(math.sqrt(n_pos)))
    if grid * grid != n_pos:
        raise ValueError(f"DINO pos_embed has {n_pos} patch positions, not a square grid")
    patch = int(sd["patch_embed.proj.weight"].shape[-1])
    depth = 1 + max(int(m.group(1)) for k in sd for m in [re.match(r"blocks\.(\d+)\.", k)] if m)
    mlp_hidden = int(sd["blocks.0.mlp.fc1.weight"].shape[0])
    vit = VisionTransformer(
        img_size=grid * patch,
        patch_size=patch,
        in_chans=int(sd["patch_embed.proj.weight"].shape[1]),
        num_classes=0,
        global_pool="token",
        embed_dim=embed_dim,
        depth=depth,
        num_heads=max(1, embed_dim // 64),
        mlp_ratio=mlp_hidden / embed_dim,
        qkv_bias="blocks.0.attn.qkv.bias" in sd,
        class_token=True,
        norm_layer=functools.partial(nn.LayerNorm, eps=1e-6),
        weight_init="skip",
    )
    vit.load_state_dict(sd, strict=True)
    return vit.float().eval().requires_grad_(False)


def dino_interpolate_pos_encoding(pos_embed: torch.Tensor, npatch: int, w: int, h: int, patch: int
                                  ) -> torch.Tensor:
    """facebookresearch/dino `VisionTransformer.interpolate_pos_encoding`, verbatim semantics.
    `w`, `h` are the input's dims 2 and 3 (the original names them that way)."""
    N = pos_embed.shape[1] - 1
    if npatch == N and w == h:
        return pos_embed
    class_pos_embed = pos_embed[:, 0]
    patch_pos_embed = pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    w0 = w // patch
    h0 = h // patch
    # add a small number to avoid floating point error in the interpolation (original comment)
    w0, h0 = w0 + 0.1, h0 + 0.1
    patch_pos_embed = F.interpolate(
        patch_pos_embed.reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)),
        mode="bicubic",
    )
    assert int(w0) == patch_pos_embed.shape[-2] and int(h0) == patch_pos_embed.shape[-1]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


class DinoFeatureExtractor(nn.Module):
    """Callable on (B,3,H,W) images in [-1,1] → (B, D) DINO CLS features (see module doc)."""

    def __init__(self, weights_path: str = DINO_DEFAULT_WEIGHTS, resize: Optional[int] = None,
                 normalize: Optional[bool] = None, device: Optional[torch.device | str] = None,
                 preprocess: str = "raw"):
        super().__init__()
        if preprocess not in PREPROCESS:
            raise ValueError(f"dino.preprocess={preprocess!r}: expected one of {', '.join(PREPROCESS)}")
        original = preprocess == "original"
        self.weights_path = str(weights_path)
        self.preprocess_mode = preprocess
        if resize is None:  # the preset's own size
            resize = ORIGINAL_RESIZE if original else None
        self.resize = None if resize in (0, False) or resize is None else int(resize)
        self.normalize = original if normalize is None else bool(normalize)
        self._device = None if device is None else torch.device(device)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.vit: Optional[nn.Module] = None
        self.patch_size: Optional[int] = None
        self.requires_grad_(False)
        self.eval()

    # ---------------------------------------------------------------- loading
    @property
    def loaded(self) -> bool:
        return self.vit is not None

    def _resolved_path(self) -> str:
        p = os.path.expanduser(self.weights_path)
        if not os.path.isabs(p) and not os.path.isfile(p):
            alt = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), p)
            if os.path.isfile(alt):
                return alt
        return p

    def ensure_available(self) -> None:
        """Raise the download hint now if the weights file is missing (reads nothing)."""
        if self.weights_path == RANDOM_VITS16:
            return
        path = self._resolved_path()
        if not os.path.isfile(path):
            from cores.models.ldm_convert import missing_file_error

            raise missing_file_error(path, "DINO weights (repulsion feature extractor)", step="dino")

    def load(self, device: Optional[torch.device | str] = None) -> nn.Module:
        if self.vit is None:
            if self.weights_path == RANDOM_VITS16:
                sd = random_vits16_state_dict()
            else:
                self.ensure_available()
                sd = _clean_state_dict(torch.load(self._resolved_path(), map_location="cpu", weights_only=True))
            vit = build_dino_vit(sd)
            self.patch_size = int(sd["patch_embed.proj.weight"].shape[-1])
            dev = device if device is not None else (self._device or self.mean.device)
            self.vit = vit.to(dev)
            self.vit.requires_grad_(False)
            self.vit.eval()
        return self.vit

    def train(self, mode: bool = True) -> "DinoFeatureExtractor":  # always frozen / eval
        return super().train(False)

    @property
    def embed_dim(self) -> int:
        return int(self.load().embed_dim)

    # ---------------------------------------------------------------- forward
    def preprocess(self, x: torch.Tensor, groups: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The network input of decoded images `x` (see the module doc); `groups` (B,) labels the rows
        whose common minimum decides the original preprocessing's shift (None: the whole batch)."""
        if self.preprocess_mode == "original":
            return self._original_input(x, groups)
        if self.resize is None and not self.normalize:
            return x
        u = (x + 1) / 2
        if self.resize is not None:
            u = F.interpolate(u, size=(self.resize, self.resize), mode="bilinear", align_corners=False,
                              antialias=False)
        if self.normalize:
            return (u - self.mean.to(u)) / self.std.to(u)
        return u * 2 - 1

    def _original_input(self, x: torch.Tensor, groups: Optional[torch.Tensor]) -> torch.Tensor:
        row_min = x.detach().flatten(1).amin(dim=1)
        if groups is None:
            shift = (row_min.min() < 0).expand(x.shape[0])
        else:  # each row gets its image's minimum, all images in one scatter
            _, inverse = torch.unique(groups.to(x.device), return_inverse=True)
            group_min = row_min.new_full((int(inverse.max()) + 1,), float("inf")).scatter_reduce(
                0, inverse, row_min, reduce="amin")
            shift = group_min[inverse] < 0
        u = torch.where(shift.view(-1, 1, 1, 1), (x + 1) / 2, x).clamp(0, 1)
        if self.resize is not None and tuple(u.shape[-2:]) != (self.resize, self.resize):
            u = F.interpolate(u, size=(self.resize, self.resize), mode="bilinear", align_corners=False,
                              antialias=False)
        if self.normalize:
            u = (u - self.mean.to(u)) / self.std.to(u)
        return u

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The DINO forward on an already preprocessed batch → CLS after the final norm."""
        vit = self.load(x.device)
        if next(vit.parameters()).device != x.device:
            vit.to(x.device)
        B, _, w, h = x.shape
        t = vit.patch_embed.proj(x).flatten(2).transpose(1, 2)
        t = torch.cat((vit.cls_token.expand(B, -1, -1).to(t.dtype), t), dim=1)
        t = t + dino_interpolate_pos_encoding(vit.pos_embed, t.shape[1] - 1, w, h, self.patch_size).to(t.dtype)
        for blk in vit.blocks:
            t = blk(t)
        t = vit.norm(t)
        return t[:, 0]

    def forward(self, x: torch.Tensor, groups: Optional[torch.Tensor] = None) -> torch.Tensor:
        """CLS features; the call is counted as `dino` rows when a compute meter is counting."""
        from cores.compute import counted_call

        return counted_call("dino", self._features_of, x, groups)

    def _features_of(self, x: torch.Tensor, groups: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.features(self.preprocess(x, groups))
