"""Build diffusers modules from a CompVis latent-diffusion config and load the
ORIGINAL CompVis checkpoint keys into them.

diffusers' own conversion scripts do not cover these checkpoints (legacy fused
``qkv`` attention, ``SpatialTransformer`` UNets without a text encoder, the VQ
first stage), so the mapping is written out here.  The mapping walks the
CompVis module structure *from the config* (not from the checkpoint), so

* a CompVis key the architecture needs but the checkpoint lacks is reported as
  missing, and
* a checkpoint key under ``model.diffusion_model.``, ``first_stage_model.`` or
  ``cond_stage_model.`` that the mapping never reads is reported as unconsumed;

both raise ``ValueError`` naming the key(s).  Everything else in the
checkpoint (``model_ema.*``, the DDPM schedule buffers ``betas``,
``alphas_cumprod``, ...) is ignored.

Module correspondence (CompVis → diffusers):

* ``openaimodel.UNetModel`` with ``AttentionBlock`` (ffhq-ldm-vq-4)
  → ``UNet2DModel`` (``DownBlock2D``/``AttnDownBlock2D``/...).
* ``openaimodel.UNetModel`` with ``use_spatial_transformer`` (cin256-v2)
  → ``UNet2DConditionModel`` (``CrossAttnDownBlock2D``/...), context from the
  ``ClassEmbedder`` (kept as a plain ``nn.Embedding``).
* ``autoencoder.VQModelInterface`` → ``VQModel``.

Numerical conventions checked against the CompVis code:

* timestep embedding: CompVis ``timestep_embedding`` is ``cat(cos, sin)`` with
  frequencies ``exp(-ln(10000)·i/half)`` → diffusers ``Timesteps`` with
  ``flip_sin_to_cos=True, freq_shift=0``; diffusers keeps float timesteps, so
  the continuous (fractional) VP timestep reaches the embedding unrounded.
* GroupNorm eps: UNet ``GroupNorm32`` 1e-5 (diffusers ``norm_eps``), the
  ``SpatialTransformer`` norm 1e-6 (diffusers ``Transformer2DModel`` uses 1e-6),
  first-stage ``Normalize`` 1e-6 (diffusers ``Encoder``/``Decoder`` use 1e-6).
* first-stage ``Downsample`` pads (0,1,0,1) then a stride-2 conv without
  padding → diffusers ``Downsample2D(padding=0)`` does exactly that.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

# --------------------------------------------------------------------------------------
# Weights that must be downloaded: ONE table, shared by every error message.
# The step names are those of `download.sh` (`bash download.sh STEP`).
# --------------------------------------------------------------------------------------
DOWNLOAD_STEPS: Dict[str, str] = {
    "ldm_ffhq256": "checkpoints/ldm_ffhq256.pt",
    "ldm_imagenet256": "checkpoints/ldm_imagenet256.pt",
    "dino": "checkpoints/dino_deitsmall16_pretrain.pth",
    "lpips": "~/.cache/torch/hub/checkpoints (piq lpips_weights.pt, torchvision vgg16/alexnet weights)",
    "test-ffhq": "datasets/test-ffhq",
    "test-imagenet": "datasets/test-imagenet",
}


def download_step_for(path: str) -> Optional[str]:
    """The `download.sh` step that fetches `path` (matched by file/folder name), or None."""
    name = os.path.basename(os.path.normpath(str(path)))
    for step, target in DOWNLOAD_STEPS.items():
        if os.path.basename(os.path.normpath(target.split(" ")[0])) == name:
            return step
    return None


def missing_file_error(path: str, what: str, step: Optional[str] = None) -> FileNotFoundError:
    """A FileNotFoundError naming the missing file and the `download.sh` step that fetches it."""
    step = step or download_step_for(path)
    if step is not None:
        hint = (f"run `bash download.sh {step}` on a machine with network access "
                f"(it writes {DOWNLOAD_STEPS[step]}) and copy it here")
    else:
        hint = ("point the config at an existing file; `bash download.sh` fetches the default files "
                f"(steps: {', '.join(DOWNLOAD_STEPS)})")
    return FileNotFoundError(f"{what} not found: {os.path.abspath(str(path))!r}. To get it, {hint}.")


# --------------------------------------------------------------------------------------
# Config helpers
# --------------------------------------------------------------------------------------
CONSUMED_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")
# Parts of a CompVis checkpoint that are not inference weights of the consumed modules.
# `first_stage_model.loss.*` would hold a training loss (LPIPS/discriminator) if the first
# stage had been trained with one; the LDM configs use `torch.nn.Identity` (no weights).
IGNORED_SUBPREFIXES = ("first_stage_model.loss.",)


def to_plain(cfg: Any) -> Any:
    """Hydra/OmegaConf node → plain python containers (dicts/lists)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(cfg, (DictConfig, ListConfig)):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(cfg, Mapping):
        return {k: to_plain(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [to_plain(v) for v in cfg]
    return cfg


def _target_is(node: Any, *names: str) -> bool:
    return isinstance(node, Mapping) and str(node.get("target", "")).split(".")[-1] in names


def ldm_params(ldm_config: Any) -> Dict[str, Any]:
    """`ldm_config` (CompVis yaml content, top key `model:`) → the LatentDiffusion params dict."""
    cfg = to_plain(ldm_config)
    if "model" in cfg:
        cfg = cfg["model"]
    if not _target_is(cfg, "LatentDiffusion"):
        raise ValueError(f"ldm_config: expected a CompVis LatentDiffusion config, got target={cfg.get('target')!r}")
    return cfg["params"]


# --------------------------------------------------------------------------------------
# UNet
# --------------------------------------------------------------------------------------
class UNetSpec:
    """The CompVis `openaimodel.UNetModel` hyper-parameters, with per-level attention heads."""

    def __init__(self, p: Mapping[str, Any]):
        # (use_fp16 / use_checkpoint are ignored: this code runs the weights in float32.)
        unsupported = {
            "resblock_updown": False, "use_new_attention_order": False, "num_classes": None,
            "dims": 2, "conv_resample": True,
        }
        for key, ok in unsupported.items():
            if key in p and p[key] != ok:
                raise NotImplementedError(f"CompVis UNet option {key}={p[key]!r} is not supported by this converter")
        self.image_size = int(p["image_size"])
        self.in_channels = int(p["in_channels"])
        self.out_channels = int(p["out_channels"])
        self.model_channels = int(p["model_channels"])
        self.attention_resolutions = [int(a) for a in p["attention_resolutions"]]
        nrb = p["num_res_blocks"]
        if not isinstance(nrb, int):
            raise NotImplementedError("per-level num_res_blocks is not supported")
        self.num_res_blocks = nrb
        self.channel_mult = [int(m) for m in p.get("channel_mult", (1, 2, 4, 8))]
        self.num_heads = int(p.get("num_heads", -1))
        self.num_head_channels = int(p.get("num_head_channels", -1))
        self.use_scale_shift_norm = bool(p.get("use_scale_shift_norm", False))
        self.spatial = bool(p.get("use_spatial_transformer", False))
        self.transformer_depth = int(p.get("transformer_depth", 1))
        self.context_dim = p.get("context_dim")
        self.legacy = bool(p.get("legacy", True))
        if self.spatial and self.context_dim is None:
            raise ValueError("use_spatial_transformer needs context_dim")
        if self.num_heads == -1 and self.num_head_channels == -1:
            raise ValueError("either num_heads or num_head_channels has to be set")
        self.levels = len(self.channel_mult)
        self.widths = [self.model_channels * m for m in self.channel_mult]
        self.attn_levels = [(2 ** lvl) in self.attention_resolutions for lvl in range(self.levels)]

    def heads_dimhead(self, ch: int) -> Tuple[int, int]:
        """Exactly the CompVis rule (openaimodel.UNetModel.__init__)."""
        if self.num_head_channels == -1:
            num_heads = self.num_heads
            dim_head = ch // num_heads
        else:
            num_heads = ch // self.num_head_channels
            dim_head = self.num_head_channels
        if self.legacy:
            dim_head = ch // num_heads if self.spatial else self.num_head_channels
        if self.spatial and num_heads * dim_head != ch:
            raise NotImplementedError(f"SpatialTransformer with inner_dim {num_heads * dim_head} != channels {ch}")
        return num_heads, dim_head

    def attn_heads(self, ch: int) -> int:
        """Number of heads the attention at width `ch` really uses."""
        num_heads, dim_head = self.heads_dimhead(ch)
        if self.spatial:
            return num_heads
        # AttentionBlock: heads = channels // num_head_channels, or num_heads
        if self.num_head_channels == -1:
            return self.num_heads
        return ch // self.num_head_channels


def build_unet(spec: UNetSpec) -> nn.Module:
    """An (un-initialised-values) diffusers UNet with the CompVis architecture."""
    from diffusers import UNet2DConditionModel, UNet2DModel

    common = dict(
        sample_size=spec.image_size,
        in_channels=spec.in_channels,
        out_channels=spec.out_channels,
        block_out_channels=tuple(spec.widths),
        layers_per_block=spec.num_res_blocks,
        flip_sin_to_cos=True,  # CompVis timestep_embedding: cat(cos, sin)
        freq_shift=0,          # ... with frequencies exp(-ln(1e4) * i / half)
        downsample_padding=1,  # openaimodel.Downsample: conv3x3 stride 2 padding 1
        norm_num_groups=32,
        norm_eps=1e-5,         # GroupNorm32 default eps
        act_fn="silu",
        resnet_time_scale_shift="scale_shift" if spec.use_scale_shift_norm else "default",
    )
    if spec.spatial:
        down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in spec.attn_levels)
        up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(spec.attn_levels))
        heads = tuple(spec.attn_heads(w) for w in spec.widths)
        if not spec.attn_levels[-1]:
            raise NotImplementedError("cross-attention UNet without attention at the lowest level")
        # NB diffusers' UNet2DConditionModel interprets `attention_head_dim` as the NUMBER of heads
        # (its documented legacy naming); per-level tuples are allowed.
        unet = UNet2DConditionModel(
            **common,
            down_block_types=down,
            up_block_types=up,
            mid_block_type="UNetMidBlock2DCrossAttn",
            cross_attention_dim=int(spec.context_dim),
            transformer_layers_per_block=spec.transformer_depth,
            attention_head_dim=heads,
            use_linear_projection=False,  # CompVis proj_in/proj_out are 1x1 convs
        )
    else:
        down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in spec.attn_levels)
        up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(spec.attn_levels))
        # With num_head_channels the head dim is fixed, as UNet2DModel expects.  With a fixed
        # num_heads, build with head dim 1 (so every attention is channels wide) and set the real
        # head count below.
        head_dim = spec.num_head_channels if spec.num_head_channels != -1 else 1
        unet = UNet2DModel(
            **common,
            down_block_types=down,
            up_block_types=up,
            attention_head_dim=head_dim,
            add_attention=True,  # the CompVis middle block always has attention
        )
        # UNet2DModel takes one head *dim* for all blocks; CompVis with a fixed `num_heads`
        # (num_head_channels == -1) keeps the head *count* fixed instead. The linear layers do not
        # depend on the split (inner dim == channels), so set the count per attention afterwards.
        for blk in list(unet.down_blocks) + list(unet.up_blocks) + [unet.mid_block]:
            for attn in getattr(blk, "attentions", []) or []:
                if attn is None:
                    continue
                ch = attn.to_q.weight.shape[0]
                h = spec.attn_heads(ch)
                if ch % h:
                    raise NotImplementedError(f"attention width {ch} not divisible by {h} heads")
                attn.heads = h
                attn.scale = (ch // h) ** -0.5
    return unet


# --------------------------------------------------------------------------------------
# First stage (VQ)
# --------------------------------------------------------------------------------------
class VQSpec:
    def __init__(self, p: Mapping[str, Any]):
        dd = p["ddconfig"]
        self.embed_dim = int(p["embed_dim"])
        self.n_embed = int(p["n_embed"])
        self.z_channels = int(dd["z_channels"])
        self.in_channels = int(dd["in_channels"])
        self.out_ch = int(dd["out_ch"])
        self.ch = int(dd["ch"])
        self.ch_mult = [int(m) for m in dd["ch_mult"]]
        self.num_res_blocks = int(dd["num_res_blocks"])
        self.resolution = int(dd["resolution"])
        if dd.get("double_z", False):
            raise NotImplementedError("double_z=True is a KL first stage, not a VQ one")
        if list(dd.get("attn_resolutions", [])):
            # Not needed for VQ-f4; diffusers would need AttnDown/UpDecoder blocks here.
            raise NotImplementedError("first-stage attn_resolutions other than [] are not supported")
        if dd.get("give_pre_end", False) or dd.get("tanh_out", False):
            raise NotImplementedError("give_pre_end / tanh_out are not supported")
        if p.get("remap") is not None:
            raise NotImplementedError("VQ index remapping is not supported")
        self.levels = len(self.ch_mult)


def build_vq(spec: VQSpec) -> nn.Module:
    from diffusers import VQModel

    return VQModel(
        in_channels=spec.in_channels,
        out_channels=spec.out_ch,
        down_block_types=("DownEncoderBlock2D",) * spec.levels,
        up_block_types=("UpDecoderBlock2D",) * spec.levels,
        block_out_channels=tuple(spec.ch * m for m in spec.ch_mult),
        layers_per_block=spec.num_res_blocks,
        act_fn="silu",
        latent_channels=spec.z_channels,
        sample_size=spec.resolution,
        num_vq_embeddings=spec.n_embed,
        norm_num_groups=32,
        vq_embed_dim=spec.embed_dim,
        scaling_factor=1.0,
        norm_type="group",
        mid_block_add_attention=True,  # the CompVis mid block always has attn_1
    )


# --------------------------------------------------------------------------------------
# Key mapping
# --------------------------------------------------------------------------------------
class _Mapper:
    """Collects dst-key → tensor, records which source keys were read and which were missing."""

    def __init__(self, sd: Mapping[str, torch.Tensor], prefix: str):
        self.sd = sd
        self.prefix = prefix
        self.out: Dict[str, torch.Tensor] = {}
        self.consumed: set = set()
        self.missing: List[str] = []

    def get(self, key: str) -> Optional[torch.Tensor]:
        full = self.prefix + key
        if full not in self.sd:
            self.missing.append(full)
            return None
        self.consumed.add(full)
        return self.sd[full]

    def copy(self, src: str, dst: str, squeeze_1x1: bool = False) -> None:
        t = self.get(src)
        if t is None:
            return
        if squeeze_1x1 and t.ndim > 2:
            t = t.reshape(t.shape[0], t.shape[1])
        self.out[dst] = t

    def param(self, src: str, dst: str, squeeze_1x1: bool = False) -> None:
        for s in ("weight", "bias"):
            self.copy(f"{src}.{s}", f"{dst}.{s}", squeeze_1x1 and s == "weight")


def _map_resblock(m: _Mapper, src: str, dst: str, has_skip: bool) -> None:
    """openaimodel.ResBlock → diffusers ResnetBlock2D."""
    m.param(f"{src}.in_layers.0", f"{dst}.norm1")
    m.param(f"{src}.in_layers.2", f"{dst}.conv1")
    m.param(f"{src}.emb_layers.1", f"{dst}.time_emb_proj")
    m.param(f"{src}.out_layers.0", f"{dst}.norm2")
    m.param(f"{src}.out_layers.3", f"{dst}.conv2")
    if has_skip:
        m.param(f"{src}.skip_connection", f"{dst}.conv_shortcut")


def _map_attention_block(m: _Mapper, src: str, dst: str, heads: int) -> None:
    """openaimodel.AttentionBlock (legacy fused qkv, QKVAttentionLegacy) → diffusers Attention.

    QKVAttentionLegacy reshapes the fused (B, 3C, T) tensor to (B*heads, 3*ch, T) and splits
    along dim 1, so the fused output channels are laid out head-major:
    [h0: q(ch) k(ch) v(ch) | h1: q k v | ...].  diffusers splits q/k/v (each C wide) into heads
    as contiguous ch-blocks, so q = rows {h*3ch + [0, ch)} concatenated over h, etc.
    """
    m.param(f"{src}.norm", f"{dst}.group_norm")
    w = m.get(f"{src}.qkv.weight")
    b = m.get(f"{src}.qkv.bias")
    if w is not None:
        c3, cin = w.shape[0], w.shape[1]
        ch = c3 // (3 * heads)
        wv = w.reshape(heads, 3, ch, cin)
        for i, name in enumerate(("to_q", "to_k", "to_v")):
            m.out[f"{dst}.{name}.weight"] = wv[:, i].reshape(heads * ch, cin)
    if b is not None:
        ch = b.shape[0] // (3 * heads)
        bv = b.reshape(heads, 3, ch)
        for i, name in enumerate(("to_q", "to_k", "to_v")):
            m.out[f"{dst}.{name}.bias"] = bv[:, i].reshape(heads * ch)
    m.param(f"{src}.proj_out", f"{dst}.to_out.0", squeeze_1x1=True)


def _map_spatial_transformer(m: _Mapper, src: str, dst: str, depth: int) -> None:
    """attention.SpatialTransformer → diffusers Transformer2DModel (same sub-module names)."""
    m.param(f"{src}.norm", f"{dst}.norm")
    m.param(f"{src}.proj_in", f"{dst}.proj_in")
    for d in range(depth):
        s, t = f"{src}.transformer_blocks.{d}", f"{dst}.transformer_blocks.{d}"
        for a in ("attn1", "attn2"):
            for n in ("to_q", "to_k", "to_v"):
                m.copy(f"{s}.{a}.{n}.weight", f"{t}.{a}.{n}.weight")  # bias=False in CompVis
            m.param(f"{s}.{a}.to_out.0", f"{t}.{a}.to_out.0")
        m.param(f"{s}.ff.net.0.proj", f"{t}.ff.net.0.proj")  # GEGLU
        m.param(f"{s}.ff.net.2", f"{t}.ff.net.2")
        for n in ("norm1", "norm2", "norm3"):
            m.param(f"{s}.{n}", f"{t}.{n}")
    m.param(f"{src}.proj_out", f"{dst}.proj_out")


def map_unet(spec: UNetSpec, m: _Mapper) -> None:
    """Walk the CompVis UNetModel structure and map every key."""

    def attn(src: str, dst: str, ch: int) -> None:
        if spec.spatial:
            _map_spatial_transformer(m, src, dst, spec.transformer_depth)
        else:
            _map_attention_block(m, src, dst, spec.attn_heads(ch))

    m.param("time_embed.0", "time_embedding.linear_1")
    m.param("time_embed.2", "time_embedding.linear_2")
    m.param("input_blocks.0.0", "conv_in")
    ch = spec.model_channels
    chans = [ch]
    idx = 1
    for lvl, width in enumerate(spec.widths):
        for nr in range(spec.num_res_blocks):
            _map_resblock(m, f"input_blocks.{idx}.0", f"down_blocks.{lvl}.resnets.{nr}", has_skip=ch != width)
            ch = width
            if spec.attn_levels[lvl]:
                attn(f"input_blocks.{idx}.1", f"down_blocks.{lvl}.attentions.{nr}", ch)
            chans.append(ch)
            idx += 1
        if lvl != spec.levels - 1:
            m.param(f"input_blocks.{idx}.0.op", f"down_blocks.{lvl}.downsamplers.0.conv")
            chans.append(ch)
            idx += 1
    _map_resblock(m, "middle_block.0", "mid_block.resnets.0", has_skip=False)
    attn("middle_block.1", "mid_block.attentions.0", ch)
    _map_resblock(m, "middle_block.2", "mid_block.resnets.1", has_skip=False)
    idx = 0
    for lvl in reversed(range(spec.levels)):
        up = spec.levels - 1 - lvl
        width = spec.widths[lvl]
        for i in range(spec.num_res_blocks + 1):
            ich = chans.pop()
            _map_resblock(m, f"output_blocks.{idx}.0", f"up_blocks.{up}.resnets.{i}", has_skip=ch + ich != width)
            ch = width
            sub = 1
            if spec.attn_levels[lvl]:
                attn(f"output_blocks.{idx}.1", f"up_blocks.{up}.attentions.{i}", ch)
                sub = 2
            if lvl and i == spec.num_res_blocks:
                m.param(f"output_blocks.{idx}.{sub}.conv", f"up_blocks.{up}.upsamplers.0.conv")
            idx += 1
    m.param("out.0", "conv_norm_out")
    m.param("out.2", "conv_out")


def _map_vq_resblock(m: _Mapper, src: str, dst: str, has_shortcut: bool) -> None:
    """diffusionmodules.model.ResnetBlock (temb_channels=0) → diffusers ResnetBlock2D."""
    for n in ("norm1", "conv1", "norm2", "conv2"):
        m.param(f"{src}.{n}", f"{dst}.{n}")
    if has_shortcut:
        m.param(f"{src}.nin_shortcut", f"{dst}.conv_shortcut")


def _map_vq_attn(m: _Mapper, src: str, dst: str) -> None:
    """diffusionmodules.model.AttnBlock (single head, 1x1 conv q/k/v) → diffusers Attention."""
    m.param(f"{src}.norm", f"{dst}.group_norm")
    for a, b in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
        m.param(f"{src}.{a}", f"{dst}.{b}", squeeze_1x1=True)


def map_vq(spec: VQSpec, m: _Mapper) -> None:
    widths = [spec.ch * mm for mm in spec.ch_mult]
    # encoder
    m.param("encoder.conv_in", "encoder.conv_in")
    block_in = spec.ch
    for lvl in range(spec.levels):
        for b in range(spec.num_res_blocks):
            _map_vq_resblock(m, f"encoder.down.{lvl}.block.{b}", f"encoder.down_blocks.{lvl}.resnets.{b}",
                             block_in != widths[lvl])
            block_in = widths[lvl]
        if lvl != spec.levels - 1:
            m.param(f"encoder.down.{lvl}.downsample.conv", f"encoder.down_blocks.{lvl}.downsamplers.0.conv")
    for part, mid in (("encoder", "encoder.mid_block"), ("decoder", "decoder.mid_block")):
        _map_vq_resblock(m, f"{part}.mid.block_1", f"{mid}.resnets.0", False)
        _map_vq_attn(m, f"{part}.mid.attn_1", f"{mid}.attentions.0")
        _map_vq_resblock(m, f"{part}.mid.block_2", f"{mid}.resnets.1", False)
    m.param("encoder.norm_out", "encoder.conv_norm_out")
    m.param("encoder.conv_out", "encoder.conv_out")
    # decoder: CompVis up[i_level] (i_level = 0 is full resolution) ↔ diffusers up_blocks[L-1-i_level]
    m.param("decoder.conv_in", "decoder.conv_in")
    block_in = widths[-1]
    for lvl in reversed(range(spec.levels)):
        up = spec.levels - 1 - lvl
        for b in range(spec.num_res_blocks + 1):
            _map_vq_resblock(m, f"decoder.up.{lvl}.block.{b}", f"decoder.up_blocks.{up}.resnets.{b}",
                             block_in != widths[lvl])
            block_in = widths[lvl]
        if lvl != 0:
            m.param(f"decoder.up.{lvl}.upsample.conv", f"decoder.up_blocks.{up}.upsamplers.0.conv")
    m.param("decoder.norm_out", "decoder.conv_norm_out")
    m.param("decoder.conv_out", "decoder.conv_out")
    m.copy("quantize.embedding.weight", "quantize.embedding.weight")
    m.param("quant_conv", "quant_conv")
    m.param("post_quant_conv", "post_quant_conv")


# --------------------------------------------------------------------------------------
# The whole LatentDiffusion
# --------------------------------------------------------------------------------------
class LDMSpec:
    """Parsed CompVis LatentDiffusion config."""

    def __init__(self, ldm_config: Any):
        p = ldm_params(ldm_config)
        self.params = p
        unet_cfg = p["unet_config"]
        if not _target_is(unet_cfg, "UNetModel"):
            raise NotImplementedError(f"unet_config target {unet_cfg.get('target')!r} is not supported")
        self.unet = UNetSpec(unet_cfg["params"])
        fs = p["first_stage_config"]
        if not _target_is(fs, "VQModelInterface", "VQModel"):
            raise NotImplementedError(f"first_stage_config target {fs.get('target')!r} is not supported (VQ only)")
        self.vq = VQSpec(fs["params"])
        cs = p.get("cond_stage_config", "__is_unconditional__")
        if isinstance(cs, str) and cs.strip() == "__is_unconditional__":
            self.n_classes = None
            self.class_embed_dim = None
        elif _target_is(cs, "ClassEmbedder"):
            if p.get("conditioning_key", "crossattn") != "crossattn":
                raise NotImplementedError("ClassEmbedder is supported with conditioning_key=crossattn only")
            self.n_classes = int(cs["params"].get("n_classes", 1000))
            self.class_embed_dim = int(cs["params"]["embed_dim"])
            if not self.unet.spatial or int(self.unet.context_dim) != self.class_embed_dim:
                raise ValueError("ClassEmbedder embed_dim must equal the UNet context_dim")
        else:
            raise NotImplementedError(f"cond_stage_config {cs!r} is not supported")
        if self.n_classes is None and self.unet.spatial:
            raise NotImplementedError("an unconditional model with a cross-attention UNet is not supported")
        sf = float(p.get("scale_factor", 1.0))
        if sf != 1.0 or p.get("scale_by_std", False):
            raise NotImplementedError("scale_factor != 1 is not supported (both CompVis VQ-f4 LDMs use 1.0)")
        self.timesteps = int(p.get("timesteps", 1000))
        self.linear_start = float(p.get("linear_start", 1e-4))
        self.linear_end = float(p.get("linear_end", 2e-2))
        self.beta_schedule = p.get("beta_schedule", "linear")
        if self.vq.embed_dim != self.unet.in_channels:
            raise ValueError("first stage embed_dim must equal the UNet in_channels")

    def alphas_cumprod(self) -> torch.Tensor:
        """ᾱ_t of the LDM's own schedule (CompVis make_beta_schedule), float64, length `timesteps`."""
        if self.beta_schedule != "linear":
            raise NotImplementedError(f"beta_schedule {self.beta_schedule!r}")
        betas = torch.linspace(self.linear_start ** 0.5, self.linear_end ** 0.5, self.timesteps,
                               dtype=torch.float64) ** 2
        return torch.cumprod(1.0 - betas, dim=0)


def build_modules(spec: LDMSpec) -> Dict[str, nn.Module]:
    mods: Dict[str, nn.Module] = {"unet": build_unet(spec.unet), "vq": build_vq(spec.vq)}
    if spec.n_classes is not None:
        mods["cond"] = nn.Embedding(spec.n_classes, spec.class_embed_dim)
    return mods


def convert_state_dict(spec: LDMSpec, sd: Mapping[str, torch.Tensor]) -> Dict[str, Dict[str, torch.Tensor]]:
    """CompVis LatentDiffusion state dict → {'unet': ..., 'vq': ..., 'cond': ...} diffusers state dicts.

    Raises ValueError naming missing keys and unconsumed keys under the consumed prefixes.
    """
    mu = _Mapper(sd, "model.diffusion_model.")
    map_unet(spec.unet, mu)
    mv = _Mapper(sd, "first_stage_model.")
    map_vq(spec.vq, mv)
    mappers = {"unet": mu, "vq": mv}
    if spec.n_classes is not None:
        mc = _Mapper(sd, "cond_stage_model.")
        mc.copy("embedding.weight", "weight")
        mappers["cond"] = mc
    missing = [k for m in mappers.values() for k in m.missing]
    consumed = set().union(*(m.consumed for m in mappers.values()))
    unconsumed = [k for k in sd if k.startswith(CONSUMED_PREFIXES) and k not in consumed
                  and not k.startswith(IGNORED_SUBPREFIXES)]
    if missing or unconsumed:
        msg = []
        if missing:
            msg.append(f"{len(missing)} key(s) missing from the checkpoint: {_fmt(missing)}")
        if unconsumed:
            msg.append(f"{len(unconsumed)} unexpected checkpoint key(s) not used by the model: {_fmt(unconsumed)}")
        raise ValueError("LDM checkpoint does not match the config: " + "; ".join(msg))
    return {name: m.out for name, m in mappers.items()}


def _fmt(keys: List[str], n: int = 20) -> str:
    return ", ".join(keys[:n]) + (f", ... (+{len(keys) - n} more)" if len(keys) > n else "")


def load_into(module: nn.Module, sd: Mapping[str, torch.Tensor], name: str) -> None:
    """Strict copy (dtype-casting) load; every parameter/buffer of `module` must be in `sd`."""
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    extra = [k for k in sd if k not in own]
    bad = [f"{k}: {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own
           if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or extra or bad:
        raise ValueError(f"{name}: converted weights do not fit the module: missing {_fmt(missing)}; "
                         f"extra {_fmt(extra)}; shape mismatch {_fmt(bad)}")
    module.load_state_dict(dict(sd), strict=True)  # copy_ casts fp16 → the module's float32


def read_checkpoint(path: str) -> Dict[str, torch.Tensor]:
    """The state dict of a CompVis Lightning checkpoint (trusted, user-configured path only)."""
    obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, Mapping) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: not a checkpoint with a state dict")
    return obj


@torch.no_grad()
def random_init_(module: nn.Module, gen: torch.Generator) -> None:
    """Seeded random weights with PyTorch's default distributions (Linear/Conv weight and bias
    U(±1/sqrt(fan_in)), norms 1/0, Embedding N(0,1)); much faster than the modules' own init on
    CPU and reproducible across runs (same seed, same device type → same weights)."""
    done = set()
    for mod in module.modules():
        if isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            bound = 1.0 / max(1, mod.weight[0].numel()) ** 0.5
            mod.weight.uniform_(-bound, bound, generator=gen)
            if mod.bias is not None:
                mod.bias.uniform_(-bound, bound, generator=gen)
        elif isinstance(mod, (nn.GroupNorm, nn.LayerNorm)):
            if mod.weight is not None:
                mod.weight.fill_(1.0)
            if mod.bias is not None:
                mod.bias.zero_()
        elif isinstance(mod, nn.Embedding):
            mod.weight.normal_(0.0, 1.0, generator=gen)
        else:
            continue
        done.update(id(p) for p in mod.parameters(recurse=False))
    for p in module.parameters():
        if id(p) not in done:
            p.normal_(0.0, 0.02, generator=gen)
    for b in module.buffers():  # none in these modules; keep them defined anyway
        b.zero_()


def _all_state_covered(module: nn.Module) -> bool:
    """True if every tensor of the module is in its state_dict (no non-persistent buffers)."""
    n_state = len(module.state_dict())
    n_tensors = len(list(module.parameters())) + len(list(module.buffers()))
    return n_state == n_tensors


def build_and_load(spec: LDMSpec, sd: Optional[Mapping[str, torch.Tensor]], device: torch.device,
                   seed: int = 0) -> Dict[str, nn.Module]:
    """Build the modules on `device`; with a state dict, fill every tensor from it (float32).

    With weights, the modules are created on the meta device and materialised empty (no random
    init of hundreds of millions of parameters), which is safe because the strict load
    overwrites every tensor.  Without weights (`sd=None`), `random_init_` with `seed`.
    """
    if sd is None:
        with torch.device("meta"):
            mods = build_modules(spec)
        gen = torch.Generator(device=device).manual_seed(int(seed))
        out = {}
        for name, mod in mods.items():
            mod = mod.to_empty(device=device).float()
            random_init_(mod, gen)
            out[name] = mod.eval().requires_grad_(False)
        return out
    converted = convert_state_dict(spec, sd)
    with torch.device("meta"):
        mods = build_modules(spec)
    out = {}
    for name, mod in mods.items():
        if _all_state_covered(mod):
            mod = mod.to_empty(device=device)
        else:  # pragma: no cover - defensive: rebuild normally if a module has non-persistent buffers
            with torch.device(device):
                mod = build_modules(spec)[name]
        mod = mod.float()
        load_into(mod, converted[name], name)
        out[name] = mod.eval().requires_grad_(False)
    return out
