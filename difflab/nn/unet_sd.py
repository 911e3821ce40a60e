"""The Stable Diffusion U-Net: a text-conditional latent U-Net (Rombach et al. 2022, Section 3.3).

A network, not a denoiser: ``net(x_in, t, context=, context_mask=)`` maps the latent at network
scale, a (B,) float time and the text encoder's hidden states to the raw prediction (eps for SD
1.x and 2-base, v for SD 2.x 768-v); ``difflab.core.Denoiser`` wraps it. SDXL's U-Net (Podell et
al. 2023, Section 2.1-2.2) is the same network with a few settings more: a transformer depth per
level (``transformer_layers_per_block=(1, 2, 10)``), no attention in the first level, and the
added conditions ``text_embeds`` (the pooled text embedding) and ``time_ids`` (the
micro-conditioning sizes; ``addition_embed_type="text_time"``), see :meth:`UNetSD.forward`.

Architecturally it is diffusers' ``UNet2DConditionModel`` for the SD 1.x / 2.x / XL family, with the
same module and parameter names, so a diffusers ``unet/`` state dict loads as it is (the key map
to the original ``ldm`` layout is :mod:`difflab.io.keymaps.unet_sd`). For level ``i`` of
``block_out_channels = (c_0, ..., c_{n-1})`` (resolution H / 2**i):

- ``conv_in``; time embedding: sinusoidal ``[cos, sin]`` of t (difflab's ``timestep_embedding``,
  which is diffusers' with ``flip_sin_to_cos=True, freq_shift=0``), then ``time_embedding`` =
  Linear-SiLU-Linear to ``4 c_0`` channels;
- ``down_blocks[i]``: ``layers_per_block`` x (ResnetBlock [+ SpatialTransformer]), then a stride-2
  conv (not after the last level); every output is kept as a skip connection;
- ``mid_block``: ResnetBlock, SpatialTransformer, ResnetBlock;
- ``up_blocks[j]`` (j = 0 is the deepest level): ``layers_per_block + 1`` x (concatenate a skip,
  ResnetBlock [+ SpatialTransformer]), then nearest upsampling + conv (not after the last);
- out: GroupNorm, SiLU, ``conv_out``.

A ResnetBlock *adds* the projected time embedding between its two convs (DDPM's form, Ho et al.
2020, Appendix B), unlike difflab's ADM ``ResBlock`` which scales and shifts. With
``addition_embed_type="text_time"`` (SDXL) ``add_embedding`` (Linear-SiLU-Linear) maps
``[text_embeds, sinusoidal(time_ids)]`` to the same ``4 c_0`` channels, added to the time embedding.

Stable Diffusion's upscalers are the same class with a few settings more (diffusers' names):

- the x4 upscaler: ``num_class_embeds`` (an embedding of ``class_labels``, the low-resolution
  image's noise level, added to the time embedding) and ``only_cross_attention`` per level (the
  first attention of each transformer block attends to the text instead of the pixels);
- the x2 latent upscaler: ``block_style="k"``, k-diffusion's blocks (:mod:`difflab.nn.unet_k`:
  AdaGroupNorm, blur resampling, one skip per level, no middle block), Gaussian Fourier time
  features (``time_embedding_type="fourier"``, ``2 c_0`` channels), a ``timestep_cond`` vector
  (the noise level's features and the pooled text) projected by ``time_embedding.cond_proj`` and
  added to the time features, GELU, 1x1 ``conv_in`` / ``conv_out`` and no output norm.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import JSONConfig
from .layers import Downsample, Upsample, at_site, check_context, _maybe_checkpoint, set_checkpointing, timestep_embedding
from .transformer import SpatialTransformer
from .unet_k import activation, k_down_block, k_up_block

DIFFUSERS_CLASS = "UNet2DConditionModel"


@dataclass(frozen=True)
class UNetSDConfig(JSONConfig):
    """Everything that shapes a UNetSD; JSON-safe through ``to_dict`` / ``from_dict``.

    ``num_heads`` is what diffusers' config calls ``attention_head_dim`` (a historical misnomer
    there: it is the number of heads per level; SD 1.x has 8 everywhere, SD 2.x has head width 64,
    i.e. (5, 10, 20, 20)). ``up_attention`` lists the up levels deepest first, as diffusers'
    ``up_block_types`` does.
    """

    in_channels: int = 4  # latent channels in
    out_channels: int = 4  # channels of the prediction
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)  # width of each level
    layers_per_block: int = 2  # ResnetBlocks per level on the way down (one more on the way up)
    down_attention: tuple[bool, ...] = (True, True, True, False)  # CrossAttnDownBlock2D (True) or DownBlock2D
    up_attention: tuple[bool, ...] = (False, True, True, True)  # deepest first: CrossAttnUpBlock2D or UpBlock2D
    num_heads: tuple[int, ...] = (8, 8, 8, 8)  # attention heads per level (diffusers' "attention_head_dim")
    cross_attention_dim: int = 768  # width of the text tokens (CLIP ViT-L: 768; OpenCLIP ViT-H: 1024)
    transformer_layers_per_block: int | tuple[int, ...] = 1  # BasicTransformerBlocks per SpatialTransformer: one int, or one per level (SDXL: (1, 2, 10))
    use_linear_projection: bool = False  # SD 2.x: linear proj_in/proj_out on tokens; SD 1.x: 1x1 convs
    norm_num_groups: int | None = 32  # GroupNorm groups (must divide every width); None: K blocks only, no output norm
    norm_eps: float = 1e-5  # GroupNorm eps of the ResnetBlocks and the output norm (LayerNorms keep 1e-5, as in diffusers)
    dropout: float = 0.0  # dropout in ResnetBlocks and attention
    sample_size: int = 64  # the latent size the model was trained at (pipelines' default)
    gradient_checkpointing: bool = False  # recompute block activations in backward to save memory
    addition_embed_type: str | None = None  # SDXL: "text_time" (pooled text + micro-conditioning added to the time embedding)
    addition_time_embed_dim: int = 256  # sinusoidal width of each time id (SDXL: 256)
    projection_class_embeddings_input_dim: int | None = None  # pooled width + ids x addition_time_embed_dim (SDXL base: 1280 + 6 x 256)
    num_class_embeds: int | None = None  # x4 upscaler: class_labels (its noise level) in 0..num_class_embeds-1, embedded and added to the time embedding
    only_cross_attention: bool | tuple[bool, ...] = False  # per level (or one for all): attn1 of each transformer block attends to the text (x4 upscaler)
    block_style: str = "sd"  # "sd": SD's blocks; "k": k-diffusion's (difflab.nn.unet_k; the x2 latent upscaler)
    head_dim: int | None = None  # block_style "k": the attention head width (what diffusers' attention_head_dim means for K blocks)
    time_embedding_type: str = "positional"  # "positional" (sinusoidal, c_0 wide) or "fourier" (Gaussian Fourier features, 2 c_0 wide)
    time_cond_proj_dim: int | None = None  # width of timestep_cond, projected (no bias) and added to the time features
    timestep_post_act: str | None = None  # activation after the time MLP (latent upscaler: "gelu")
    act_fn: str = "silu"  # activation of the time MLP and of the K blocks ("silu" or "gelu"; SD blocks: "silu")
    conv_in_kernel: int = 3  # kernel of conv_in (1 or 3)
    conv_out_kernel: int = 3  # kernel of conv_out (1 or 3)
    mid_block: bool = True  # the middle ResnetBlock-SpatialTransformer-ResnetBlock (none in the latent upscaler)

    def __post_init__(self):
        for name in ("block_out_channels", "down_attention", "up_attention", "num_heads"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        n = len(self.block_out_channels)
        if n < 1:
            raise ValueError("block_out_channels must have at least one level")
        if not isinstance(self.only_cross_attention, bool):
            only = tuple(bool(v) for v in self.only_cross_attention)
            object.__setattr__(self, "only_cross_attention", only)
            if len(only) != n:
                raise ValueError(f"only_cross_attention={list(only)} must be one bool or one per level ({n})")
        choices = {"block_style": ("sd", "k"), "time_embedding_type": ("positional", "fourier"), "act_fn": ("silu", "gelu"),
                   "timestep_post_act": (None, "silu", "gelu"), "conv_in_kernel": (1, 3), "conv_out_kernel": (1, 3)}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not supported; choose one of {list(allowed)}")
        if self.num_class_embeds is not None and self.num_class_embeds < 1:
            raise ValueError(f"num_class_embeds={self.num_class_embeds} must be None or >= 1")
        if self.block_style == "k":
            if not self.head_dim or self.head_dim < 1:
                raise ValueError("block_style='k' needs head_dim (the attention head width)")
            if self.mid_block or self.addition_embed_type or self.only_cross_attention is not False:
                raise ValueError("block_style='k' has no middle block, no added conditions and no only_cross_attention")
            return
        if self.act_fn != "silu" or self.norm_num_groups is None:
            raise ValueError("SD blocks (block_style='sd') use act_fn='silu' and an int norm_num_groups")
        if not isinstance(self.transformer_layers_per_block, int):
            layers = tuple(self.transformer_layers_per_block)
            object.__setattr__(self, "transformer_layers_per_block", layers)
            if len(layers) != n or not all(isinstance(d, int) and d >= 1 for d in layers):
                raise ValueError(f"transformer_layers_per_block={list(layers)} must be one int >= 1 or one per level ({n})")
        if self.addition_embed_type not in (None, "text_time"):
            raise ValueError(f"addition_embed_type={self.addition_embed_type!r} is not supported; choose None or 'text_time'")
        if self.addition_embed_type and (self.projection_class_embeddings_input_dim or 0) <= 0:
            raise ValueError("addition_embed_type='text_time' needs projection_class_embeddings_input_dim "
                             "(pooled text width + number of time ids x addition_time_embed_dim)")
        for name in ("down_attention", "up_attention", "num_heads"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries but block_out_channels has {n} levels")
        for ch, heads in zip(self.block_out_channels, self.num_heads):
            if ch % heads:
                raise ValueError(f"num_heads {heads} does not divide the level width {ch}")
            if ch % self.norm_num_groups:
                raise ValueError(f"norm_num_groups={self.norm_num_groups} does not divide the level width {ch}")

    @property
    def downsample_factor(self) -> int:
        """How much the deepest level is smaller than the input: 2 ** (levels - 1)."""
        return 2 ** (len(self.block_out_channels) - 1)

    def level_only_cross(self, level: int) -> bool:
        """Whether the transformer blocks of down level ``level`` (and its up level) attend only to the text."""
        o = self.only_cross_attention
        return o if isinstance(o, bool) else o[level]

    @property
    def time_embed_dim(self) -> int:
        """Width of the time embedding: 4 c_0 (positional) or 2 c_0 (fourier), as diffusers'."""
        return self.block_out_channels[0] * (2 if self.time_embedding_type == "fourier" else 4)

    def transformer_depth(self, level: int) -> int:
        """BasicTransformerBlocks in the SpatialTransformers of down level ``level`` (its up level too)."""
        d = self.transformer_layers_per_block
        return d if isinstance(d, int) else d[level]


    # -- diffusers' config.json ----------------------------------------------------------------

    @classmethod
    def from_diffusers_config(cls, d: dict) -> "UNetSDConfig":
        """Read a diffusers ``UNet2DConditionModel`` ``config.json`` dict (SD 1.x / 2.x / XL family).

        The upscalers' settings are read too (``num_class_embeds``, ``only_cross_attention``, K
        blocks, Fourier time, ``time_cond_proj_dim``, ...). Settings this U-Net does not implement
        raise ValueError naming them (a ``class_embed_type``, per-block layer counts, other
        ``addition_embed_type`` than SDXL's ``"text_time"``, SD and K blocks mixed, ...); settings that do
        not change the function (``upcast_attention``, which diffusers' SDPA attention ignores too,
        ``sample_size``, ...) are accepted.
        """
        get = lambda k: d.get(k, _DIFFUSERS_DEFAULTS.get(k))  # noqa: E731
        unsupported = []
        down, up = tuple(get("down_block_types")), tuple(get("up_block_types"))
        k_style = all(b.startswith("K") for b in down + up)
        variants = {"addition_embed_type": ("text_time",), "num_class_embeds": "int", "only_cross_attention": "bools",
                    "time_embedding_type": ("fourier",), "time_cond_proj_dim": "int", "timestep_post_act": ("silu", "gelu"),
                    "conv_in_kernel": (1,), "conv_out_kernel": (1,), "mid_block_type": (None,),
                    "act_fn": ("gelu",) if k_style else (), "resnet_time_scale_shift": ("scale_shift",) if k_style else ()}
        for key, ok in _DIFFUSERS_REQUIRED.items():
            value = get(key)
            allowed = variants.get(key, ())
            if (allowed == "int" and isinstance(value, int) and value > 0) or (not isinstance(allowed, str) and value in allowed):
                continue  # a variant UNetSD implements (SDXL's added conditions, the upscalers' settings)
            if allowed == "bools" and isinstance(value, (list, tuple)) and all(isinstance(v, bool) for v in value):
                continue
            if isinstance(value, (list, tuple)):  # one flag per block: fine when every entry is the supported value
                value = ok if all(v == ok for v in value) else tuple(value)
            if value != ok:
                unsupported.append(f"{key}={value!r} (supported: {ok!r})")
        allowed_down, allowed_up = {"CrossAttnDownBlock2D", "DownBlock2D"}, {"CrossAttnUpBlock2D", "UpBlock2D"}
        if k_style:
            allowed_down, allowed_up = {"KCrossAttnDownBlock2D", "KDownBlock2D"}, {"KCrossAttnUpBlock2D", "KUpBlock2D"}
            heads = get("attention_head_dim")
            if not isinstance(heads, int) or get("num_attention_heads") is not None:
                unsupported.append(f"attention_head_dim={heads!r} (supported with K blocks: one int, the head width)")
        if (get("mid_block_type") is None) != k_style:
            unsupported.append(f"mid_block_type={get('mid_block_type')!r} with {'K' if k_style else 'SD'} blocks")
        only = get("only_cross_attention")
        if only is True and get("mid_block_only_cross_attention") is not False:
            unsupported.append("only_cross_attention=True in the middle block (supported: per level, middle block False)")
        if set(down) - allowed_down or set(up) - allowed_up:
            unsupported.append(f"down_block_types={list(down)}, up_block_types={list(up)} (supported: {sorted(allowed_down | allowed_up)})")
        for key in ("layers_per_block", "cross_attention_dim"):
            if not isinstance(get(key), int):
                unsupported.append(f"{key}={get(key)!r} (supported: one int for every level)")
        depth = get("transformer_layers_per_block")
        if not isinstance(depth, int) and not all(isinstance(v, int) for v in depth):
            unsupported.append(f"transformer_layers_per_block={depth!r} (supported: one int, or one int per level)")
        if get("norm_num_groups") is None and not k_style:
            unsupported.append("norm_num_groups=None (supported with K blocks only)")
        if unsupported:
            raise ValueError(f"this diffusers UNet2DConditionModel config is outside the SD 1.x / 2.x / XL / upscaler family UNetSD implements: {'; '.join(unsupported)}")
        n = len(get("block_out_channels"))
        heads = get("num_attention_heads") or get("attention_head_dim")
        heads = (heads,) * n if isinstance(heads, int) else tuple(heads)
        sample_size = get("sample_size")
        k_args = dict(block_style="k", head_dim=heads[0], mid_block=False) if k_style else {}
        heads = (1,) * n if k_style else heads  # K blocks read attention_head_dim as the head width
        return cls(
            in_channels=get("in_channels"), out_channels=get("out_channels"),
            block_out_channels=tuple(get("block_out_channels")), layers_per_block=get("layers_per_block"),
            down_attention=tuple(b.endswith("CrossAttnDownBlock2D") for b in down),
            up_attention=tuple(b.endswith("CrossAttnUpBlock2D") for b in up),
            num_heads=heads, cross_attention_dim=get("cross_attention_dim"),
            transformer_layers_per_block=depth if isinstance(depth, int) else tuple(depth),
            use_linear_projection=bool(get("use_linear_projection")), norm_num_groups=get("norm_num_groups"),
            norm_eps=get("norm_eps"), dropout=get("dropout"),
            sample_size=sample_size if isinstance(sample_size, int) else 64,
            addition_embed_type=get("addition_embed_type"), addition_time_embed_dim=get("addition_time_embed_dim") or 256,
            projection_class_embeddings_input_dim=get("projection_class_embeddings_input_dim"),
            num_class_embeds=get("num_class_embeds"),
            only_cross_attention=only if isinstance(only, bool) else tuple(only),
            time_embedding_type=get("time_embedding_type"), time_cond_proj_dim=get("time_cond_proj_dim"),
            timestep_post_act=get("timestep_post_act"), act_fn=get("act_fn"), conv_in_kernel=get("conv_in_kernel"),
            conv_out_kernel=get("conv_out_kernel"), **k_args,
        )

    def to_diffusers_config(self) -> dict:
        """The diffusers ``config.json`` dict of the same model (inverse of ``from_diffusers_config``)."""
        kb = "K" if self.block_style == "k" else ""
        return {
            "_class_name": DIFFUSERS_CLASS,
            **{k: list(v) if isinstance(v, tuple) else v for k, v in _DIFFUSERS_REQUIRED.items()},
            "in_channels": self.in_channels, "out_channels": self.out_channels,
            "block_out_channels": list(self.block_out_channels), "layers_per_block": self.layers_per_block,
            "down_block_types": [f"{kb}CrossAttnDownBlock2D" if a else f"{kb}DownBlock2D" for a in self.down_attention],
            "up_block_types": [f"{kb}CrossAttnUpBlock2D" if a else f"{kb}UpBlock2D" for a in self.up_attention],
            "attention_head_dim": self.head_dim if kb else list(self.num_heads), "cross_attention_dim": self.cross_attention_dim,
            "num_class_embeds": self.num_class_embeds, "time_embedding_type": self.time_embedding_type,
            "only_cross_attention": self.only_cross_attention if isinstance(self.only_cross_attention, bool)
            else list(self.only_cross_attention), "time_cond_proj_dim": self.time_cond_proj_dim,
            "timestep_post_act": self.timestep_post_act, "conv_in_kernel": self.conv_in_kernel,
            "conv_out_kernel": self.conv_out_kernel, "mid_block_type": "UNetMidBlock2DCrossAttn" if self.mid_block else None,
            "resnet_time_scale_shift": "scale_shift" if kb else "default",
            "transformer_layers_per_block": self.transformer_layers_per_block if isinstance(self.transformer_layers_per_block, int)
            else list(self.transformer_layers_per_block),
            "addition_embed_type": self.addition_embed_type, "addition_time_embed_dim": self.addition_time_embed_dim,
            "projection_class_embeddings_input_dim": self.projection_class_embeddings_input_dim,
            "use_linear_projection": self.use_linear_projection, "norm_num_groups": self.norm_num_groups,
            "norm_eps": self.norm_eps, "dropout": self.dropout, "sample_size": self.sample_size,
            "act_fn": self.act_fn, "downsample_padding": 1, "center_input_sample": False,
        }


# The settings UNetSD implements (a diffusers config with anything else raises) ...
_DIFFUSERS_REQUIRED = {
    "flip_sin_to_cos": True, "freq_shift": 0, "mid_block_type": "UNetMidBlock2DCrossAttn", "act_fn": "silu",
    "center_input_sample": False, "downsample_padding": 1, "mid_block_scale_factor": 1, "only_cross_attention": False,
    "dual_cross_attention": False, "class_embed_type": None, "addition_embed_type": None, "num_class_embeds": None,
    "encoder_hid_dim": None, "encoder_hid_dim_type": None, "resnet_time_scale_shift": "default",
    "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": False, "time_embedding_type": "positional",
    "time_embedding_dim": None, "time_embedding_act_fn": None, "timestep_post_act": None, "time_cond_proj_dim": None,
    "conv_in_kernel": 3, "conv_out_kernel": 3, "attention_type": "default", "class_embeddings_concat": False,
    "cross_attention_norm": None, "reverse_transformer_layers_per_block": None,
}
# ... and diffusers' defaults for the keys read above.
_DIFFUSERS_DEFAULTS = {
    "in_channels": 4, "out_channels": 4, "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "attention_head_dim": 8, "num_attention_heads": None, "cross_attention_dim": 1280, "transformer_layers_per_block": 1,
    "use_linear_projection": False, "norm_num_groups": 32, "norm_eps": 1e-5, "dropout": 0.0, "sample_size": None,
    **_DIFFUSERS_REQUIRED, "mid_block_only_cross_attention": None, "addition_time_embed_dim": None,
    "projection_class_embeddings_input_dim": None,
}


class TimestepEmbedding(nn.Module):
    """Linear-SiLU-Linear on the sinusoidal embedding (Ho et al. 2020, Appendix B), named as diffusers names it.

    The latent upscaler's variant: ``act`` GELU, a ``post_act`` after the second linear, and a
    condition vector projected by ``cond_proj`` (no bias) and added to the features first."""

    def __init__(self, in_dim: int, emb_dim: int, act: str = "silu", post_act: str | None = None, cond_dim: int | None = None):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, emb_dim)
        if cond_dim is not None:
            self.cond_proj = nn.Linear(cond_dim, in_dim, bias=False)
        self.act = activation(act)
        self.linear_2 = nn.Linear(emb_dim, emb_dim)
        self.post_act = activation(post_act) if post_act else None

    def forward(self, emb: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        if condition is not None:
            emb = emb + self.cond_proj(condition.to(emb.dtype))
        emb = self.linear_2(self.act(self.linear_1(emb)))
        return emb if self.post_act is None else self.post_act(emb)


class FourierFeatures(nn.Module):
    """Gaussian Fourier features ``[cos(2 pi w t), sin(2 pi w t)]`` of the time t (Tancik et al.
    2020, Section 4; NCSN++'s noise embedding), ``w`` a fixed random vector stored as ``weight``."""

    def __init__(self, size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(size), requires_grad=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        x = t.float()[:, None] * self.weight.float()[None, :] * (2 * math.pi)
        return torch.cat([torch.cos(x), torch.sin(x)], dim=-1)


class ResnetBlock(nn.Module):
    """Residual block with an additive time embedding (Ho et al. 2020, Appendix B; SD's ``ResBlock``).

    ``h = conv1(silu(norm1(x))) + time_emb_proj(silu(emb))``;
    ``h = conv2(dropout(silu(norm2(h))))``; returns ``shortcut(x) + h``, where ``conv_shortcut``
    is a 1x1 conv present only when the channel count changes.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, groups: int, eps: float, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(emb_dim, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.checkpoint = False

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return _maybe_checkpoint(self.checkpoint, self._forward, x, emb)

    def _forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class SizedUpsample(Upsample):
    """difflab's ``Upsample`` (nearest, then a 3x3 conv) to an explicit size, so odd sizes round-trip
    (nearest x2 when ``size`` is twice the input, as diffusers' ``Upsample2D`` with ``output_size``)."""

    def forward(self, x: torch.Tensor, size=None) -> torch.Tensor:
        return super().forward(x) if size is None else self.conv(F.interpolate(x, size=tuple(size), mode="nearest"))


class DownBlock(nn.Module):
    """One level on the way down: ``resnets[k]`` (+ ``attentions[k]``) (+ ``temporal(h, k)``), then
    ``downsamplers[0]``."""

    def __init__(self, resnets, attentions, downsample: Downsample | None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions) if attentions else None
        self.downsamplers = nn.ModuleList([downsample]) if downsample is not None else None

    def forward(self, h, emb, context, mask, temporal=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for k, resnet in enumerate(self.resnets):
            h = resnet(h, emb)
            if self.attentions is not None:
                h = self.attentions[k](h, context, mask)
            if temporal is not None:
                h = temporal(h, k)
            skips.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)
            skips.append(h)
        return h, skips


class MidBlock(nn.Module):
    """``resnets[0]``, ``attentions[0]`` (+ ``temporal(h, 0)``), ``resnets[1]`` (diffusers'
    ``UNetMidBlock2DCrossAttn``; ``UNetMidBlockCrossAttnMotion`` with the temporal layer)."""

    def __init__(self, resnets, attention):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList([attention])

    def forward(self, h, emb, context, mask, temporal=None):
        h = self.resnets[0](h, emb)
        h = self.attentions[0](h, context, mask)
        if temporal is not None:
            h = temporal(h, 0)
        return self.resnets[1](h, emb)


class UpBlock(nn.Module):
    """One level on the way up: per ResnetBlock, concatenate the latest skip, ``resnets[k]``
    (+ ``attentions[k]``) (+ ``temporal(h, k)``); then ``upsamplers[0]`` to the size of the next skip."""

    def __init__(self, resnets, attentions, upsample: SizedUpsample | None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions) if attentions else None
        self.upsamplers = nn.ModuleList([upsample]) if upsample is not None else None

    def forward(self, h, skips: list, emb, context, mask, temporal=None):
        for k, resnet in enumerate(self.resnets):
            h = resnet(torch.cat([h, skips.pop()], dim=1), emb)
            if self.attentions is not None:
                h = self.attentions[k](h, context, mask)
            if temporal is not None:
                h = temporal(h, k)
        if self.upsamplers is not None:
            h = self.upsamplers[0](h, skips[-1].shape[-2:])
        return h


class UNetSD(nn.Module):
    """The Stable Diffusion 1.x / 2.x / XL U-Net; see the module docstring for the layout."""

    def __init__(self, config: UNetSDConfig):
        super().__init__()
        self.config = c = config
        chans, n = c.block_out_channels, len(c.block_out_channels)
        emb_dim = c.time_embed_dim

        def resnet(cin, cout):
            return ResnetBlock(cin, cout, emb_dim, c.norm_num_groups, c.norm_eps, c.dropout)

        def attention(ch, heads, level, only_cross=False):
            return SpatialTransformer(ch, heads, ch // heads, c.cross_attention_dim, c.transformer_depth(level),
                                      c.norm_num_groups, c.use_linear_projection, c.dropout, only_cross_attention=only_cross)

        self.conv_in = nn.Conv2d(c.in_channels, chans[0], c.conv_in_kernel, padding=c.conv_in_kernel // 2)
        if c.time_embedding_type == "fourier":  # the latent upscaler: Gaussian Fourier features, 2 c_0 wide
            self.time_proj = FourierFeatures(chans[0])
        self.time_embedding = TimestepEmbedding(emb_dim if c.time_embedding_type == "fourier" else chans[0], emb_dim, c.act_fn,
                                                c.timestep_post_act, c.time_cond_proj_dim)
        if c.num_class_embeds is not None:  # the x4 upscaler's noise level
            self.class_embedding = nn.Embedding(c.num_class_embeds, emb_dim)
        if c.addition_embed_type == "text_time":  # SDXL (Podell et al. 2023, Section 2.2)
            self.add_embedding = TimestepEmbedding(c.projection_class_embeddings_input_dim, emb_dim)

        if c.block_style == "k":
            self._build_k_levels(emb_dim)
            set_checkpointing(self, c.gradient_checkpointing)
            return

        self.down_blocks = nn.ModuleList()
        ch = chans[0]
        for i in range(n):
            resnets, attns = [], []
            for k in range(c.layers_per_block):
                resnets.append(resnet(ch if k == 0 else chans[i], chans[i]))
                if c.down_attention[i]:
                    attns.append(attention(chans[i], c.num_heads[i], i, c.level_only_cross(i)))
            ch = chans[i]
            self.down_blocks.append(DownBlock(resnets, attns, Downsample(ch) if i < n - 1 else None))

        self.mid_block = MidBlock([resnet(ch, ch), resnet(ch, ch)], attention(ch, c.num_heads[-1], n - 1)) if c.mid_block else None

        # up level j is down level n - 1 - j; its k-th ResnetBlock takes the skip of the matching
        # down output (the level's input width for the last one, which comes from one level above)
        self.up_blocks = nn.ModuleList()
        for j in range(n):
            i = n - 1 - j
            out_ch, skip_ch_last = chans[i], chans[max(i - 1, 0)]
            resnets, attns = [], []
            for k in range(c.layers_per_block + 1):
                skip_ch = skip_ch_last if k == c.layers_per_block else out_ch
                resnets.append(resnet((ch if k == 0 else out_ch) + skip_ch, out_ch))
                if c.up_attention[j]:
                    attns.append(attention(out_ch, c.num_heads[i], i, c.level_only_cross(i)))
            ch = out_ch
            self.up_blocks.append(UpBlock(resnets, attns, SizedUpsample(ch) if j < n - 1 else None))

        self.conv_norm_out = nn.GroupNorm(c.norm_num_groups, ch, eps=c.norm_eps)
        self.conv_act = activation(c.act_fn)
        self.conv_out = nn.Conv2d(ch, c.out_channels, c.conv_out_kernel, padding=c.conv_out_kernel // 2)

        set_checkpointing(self, c.gradient_checkpointing)

    def _build_k_levels(self, emb_dim: int) -> None:
        """The levels of ``block_style="k"`` (:mod:`difflab.nn.unet_k`), channels as diffusers'
        ``UNet2DConditionModel`` lays them out; no middle block, no output norm without groups."""
        c = self.config
        chans, n = c.block_out_channels, len(c.block_out_channels)
        common = dict(emb_dim=emb_dim, layers=c.layers_per_block, head_dim=c.head_dim, context_dim=c.cross_attention_dim,
                      act=c.act_fn, eps=c.norm_eps, dropout=c.dropout)
        self.down_blocks = nn.ModuleList(
            k_down_block(chans[max(i - 1, 0)], chans[i], cross=c.down_attention[i], last=i == n - 1, **common) for i in range(n))
        self.mid_block = None
        rev = chans[::-1]
        self.up_blocks = nn.ModuleList(
            k_up_block(rev[min(j + 1, n - 1)], rev[j], cross=c.up_attention[j], last=j == n - 1, **common) for j in range(n))
        self.conv_norm_out = None if c.norm_num_groups is None else nn.GroupNorm(c.norm_num_groups, chans[0], eps=c.norm_eps)
        self.conv_act = activation(c.act_fn)
        self.conv_out = nn.Conv2d(chans[0], c.out_channels, c.conv_out_kernel, padding=c.conv_out_kernel // 2)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        down_block_additional_residuals: list[torch.Tensor] | tuple[torch.Tensor, ...] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
        text_embeds: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        temporal=None,
    ) -> torch.Tensor:
        """Predict from the latent ``x`` (B, C, H, W) at times ``t`` (B,) float (a scalar is broadcast).

        ``context``: (B, L, cross_attention_dim) text-encoder hidden states (diffusers'
        ``encoder_hidden_states``); ``context_mask``: (B, L) bool, True for tokens to attend to
        (diffusers' ``encoder_attention_mask``). Missing context skips the cross-attention.
        ``class_labels``: (B,) integers in ``[0, num_class_embeds)``, required exactly when the config
        has ``num_class_embeds`` (the x4 upscaler's noise level); None otherwise.
        ``timestep_cond`` (B, time_cond_proj_dim): the vector added (projected) to the time features,
        required exactly when the config has ``time_cond_proj_dim`` (the latent upscaler's noise
        level features and pooled text).

        ``down_block_additional_residuals`` (one tensor per skip connection, shaped like it) and
        ``mid_block_additional_residual`` (shaped like the middle block's output) are added to the
        skips and to the middle output: the ControlNet hook (Zhang et al. 2023, Section 3.2;
        diffusers' arguments of the same names, :mod:`difflab.adapters.controlnet`). None leaves
        the computation untouched.

        ``text_embeds`` (B, D) and ``time_ids`` (B, K): SDXL's added conditions (Podell et al. 2023,
        Section 2.2; diffusers' ``added_cond_kwargs``), required exactly when the config has
        ``addition_embed_type="text_time"``. ``time_ids`` are the micro-conditioning numbers
        (original height and width, crop top and left, then the target height and width, or the
        refiner's aesthetic score); each gets a sinusoidal embedding of ``addition_time_embed_dim``
        and ``add_embedding([text_embeds, those])`` is added to the time embedding.

        ``temporal``: the seam of video networks (:class:`difflab.nn.motion.MotionUNet`): a callable
        ``temporal(h, site) -> h`` run after every ResnetBlock and its attention, at the sites
        :meth:`temporal_sites` names (AnimateDiff's motion modules, Guo et al. 2023, Section 4.2).
        None leaves the computation untouched.
        """
        # 1. Check inputs
        t = self._check_inputs(x, t, context, context_mask, class_labels, timestep_cond)

        # 2. Embed time (the latent upscaler's condition vector, the x4 upscaler's class, SDXL's added conditions)
        features = self.time_proj(t) if self.config.time_embedding_type == "fourier" else \
            timestep_embedding(t, self.config.block_out_channels[0])
        emb = self.time_embedding(features.to(self.conv_in.weight.dtype), timestep_cond)
        if class_labels is not None:
            emb = emb + self.class_embedding(class_labels).to(emb.dtype)
        emb = self._add_conditions(emb, text_embeds, time_ids, x.shape[0])

        # 3. Down, keeping every output as a skip
        h = self.conv_in(x)
        skips = [h]
        for i, block in enumerate(self.down_blocks):
            h, out = block(h, emb, context, context_mask, at_site(temporal, f"down_{i}"))
            skips += out
        if (down_block_additional_residuals is not None or mid_block_additional_residual is not None) and self.mid_block is None:
            raise ValueError("ControlNet residuals need SD blocks with a middle block (this UNetSD has block_style='k')")
        if down_block_additional_residuals is not None:
            skips = _add_residuals(skips, down_block_additional_residuals, "down_block_additional_residuals")

        # 4. Middle
        if self.mid_block is not None:
            h = self.mid_block(h, emb, context, context_mask, at_site(temporal, "mid"))
        if mid_block_additional_residual is not None:
            h = _add_residuals([h], [mid_block_additional_residual], "mid_block_additional_residual")[0]

        # 5. Up, concatenating the skips in reverse order
        for j, block in enumerate(self.up_blocks):
            h = block(h, skips, emb, context, context_mask, at_site(temporal, f"up_{j}"))

        # 6. Out
        if self.conv_norm_out is not None:
            h = self.conv_act(self.conv_norm_out(h))
        return self.conv_out(h)

    def temporal_sites(self) -> dict[str, tuple[int, int]]:
        """``{site: (channels, level)}`` of the sites where ``forward``'s ``temporal`` runs, in the
        order it runs them: ``down_{i}_{k}`` after the k-th ResnetBlock (+ attention) of down level
        i, ``mid_0`` after the middle attention, ``up_{j}_{k}`` after the k-th of up block j
        (deepest first, level ``n - 1 - j``): the places of diffusers' ``UNetMotionModel`` motion modules."""
        c, n = self.config, len(self.config.block_out_channels)
        sites = {f"down_{i}_{k}": (c.block_out_channels[i], i) for i in range(n) for k in range(c.layers_per_block)}
        sites["mid_0"] = (c.block_out_channels[-1], n - 1)
        sites.update({f"up_{j}_{k}": (c.block_out_channels[n - 1 - j], n - 1 - j)
                      for j in range(n) for k in range(c.layers_per_block + 1)})
        return sites

    def _add_conditions(self, emb, text_embeds, time_ids, b: int) -> torch.Tensor:
        """``emb + add_embedding([text_embeds, sinusoidal(time_ids)])`` (SDXL), after checking the inputs."""
        c = self.config
        if c.addition_embed_type is None:
            if text_embeds is not None or time_ids is not None:
                raise ValueError("text_embeds / time_ids given, but this UNetSD has no added conditions (addition_embed_type=None)")
            return emb
        if text_embeds is None or time_ids is None:
            raise ValueError("this UNetSD (addition_embed_type='text_time', SDXL) needs text_embeds (B, D) and time_ids (B, K)")
        if text_embeds.ndim != 2 or time_ids.ndim != 2 or len(text_embeds) != b or len(time_ids) != b:
            raise ValueError(f"text_embeds must be (B, D) and time_ids (B, K) with B = {b}, got shapes "
                             f"{tuple(text_embeds.shape)} and {tuple(time_ids.shape)}")
        width = text_embeds.shape[1] + time_ids.shape[1] * c.addition_time_embed_dim
        if width != c.projection_class_embeddings_input_dim:
            raise ValueError(f"text_embeds ({text_embeds.shape[1]}) + {time_ids.shape[1]} time_ids x {c.addition_time_embed_dim} "
                             f"= {width} features, but the U-Net takes projection_class_embeddings_input_dim="
                             f"{c.projection_class_embeddings_input_dim} (a refiner takes 5 ids with an aesthetic score, a base 6)")
        ids = timestep_embedding(time_ids.flatten(), c.addition_time_embed_dim).reshape(b, -1)
        return emb + self.add_embedding(torch.cat([text_embeds.to(ids.dtype), ids], dim=-1).to(emb.dtype))

    def _check_inputs(self, x, t, context, context_mask, class_labels, timestep_cond) -> torch.Tensor:
        """Raise a ValueError naming the bad argument; return ``t`` as a (B,) tensor."""
        c = self.config
        if x.ndim != 4 or x.shape[1] != c.in_channels:
            raise ValueError(f"x must be (B, {c.in_channels}, H, W), got shape {tuple(x.shape)}")
        b = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(b)
        if t.shape != (b,):
            raise ValueError(f"t must be a (B,) = ({b},) tensor, got shape {tuple(t.shape)}")
        if (class_labels is None) != (c.num_class_embeds is None):
            raise ValueError("class_labels given, but this UNetSD has no class embedding (condition through context)"
                             if c.num_class_embeds is None else
                             f"this UNetSD (num_class_embeds={c.num_class_embeds}) needs class_labels (B,), e.g. the x4 upscaler's noise level")
        if class_labels is not None and (class_labels.shape != (b,) or class_labels.is_floating_point()
                                         or not bool(((class_labels >= 0) & (class_labels < c.num_class_embeds)).all())):
            raise ValueError(f"class_labels must be ({b},) integers in [0, {c.num_class_embeds}), got {class_labels.tolist()}")
        if (timestep_cond is None) != (c.time_cond_proj_dim is None):
            raise ValueError("timestep_cond given, but this UNetSD has no time_cond_proj_dim" if c.time_cond_proj_dim is None
                             else f"this UNetSD needs timestep_cond ({b}, {c.time_cond_proj_dim}) (the latent upscaler's noise level and pooled text)")
        if timestep_cond is not None and timestep_cond.shape != (b, c.time_cond_proj_dim):
            raise ValueError(f"timestep_cond must be ({b}, {c.time_cond_proj_dim}), got shape {tuple(timestep_cond.shape)}")
        check_context(context, context_mask, b, c.cross_attention_dim, "cross_attention_dim")
        return t


def _add_residuals(features: list, residuals, name: str) -> list:
    """``[f + r for f, r in zip(features, residuals)]`` after checking that the counts and shapes agree."""
    residuals = list(residuals)
    if len(residuals) != len(features):
        raise ValueError(f"{name} has {len(residuals)} tensors, but the U-Net has {len(features)} of those features")
    for k, (f, r) in enumerate(zip(features, residuals)):
        if r.shape != f.shape:
            raise ValueError(f"{name}[{k}] has shape {tuple(r.shape)}, but the feature it adds to has {tuple(f.shape)}")
    return [f + r.to(f.dtype) for f, r in zip(features, residuals)]


PRESETS = {
    # Stable Diffusion 1.x (Rombach et al. 2022; CompVis / runwayml v1-5): 860 M parameters, CLIP ViT-L/14 text
    "sd1": UNetSDConfig(),
    # Stable Diffusion 2.x (OpenCLIP ViT-H/14 text, head width 64, linear projections); 768-v uses sample_size 96
    "sd2": UNetSDConfig(num_heads=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True),
    # a few hundred thousand parameters, for tests and the embedded digits demo's latent model
    "tiny": UNetSDConfig(block_out_channels=(32, 64), layers_per_block=1, down_attention=(True, True), up_attention=(True, True),
                         num_heads=(2, 4), cross_attention_dim=32, norm_num_groups=8, sample_size=8),
    # SDXL base 1.0 (Podell et al. 2023, Table 1): 2.6 B parameters, CLIP ViT-L + OpenCLIP ViT-bigG text (768 + 1280)
    "sdxl": UNetSDConfig(block_out_channels=(320, 640, 1280), down_attention=(False, True, True), up_attention=(True, True, False),
                         num_heads=(5, 10, 20), cross_attention_dim=2048, transformer_layers_per_block=(1, 2, 10),
                         use_linear_projection=True, sample_size=128, addition_embed_type="text_time",
                         addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816),
    # SDXL refiner 1.0: OpenCLIP ViT-bigG text only, 5 time ids (aesthetic score instead of the target size)
    "sdxl_refiner": UNetSDConfig(block_out_channels=(384, 768, 1536, 1536), down_attention=(False, True, True, False),
                                 up_attention=(False, True, True, False), num_heads=(6, 12, 24, 24), cross_attention_dim=1280,
                                 transformer_layers_per_block=4, use_linear_projection=True, sample_size=128,
                                 addition_embed_type="text_time", addition_time_embed_dim=256,
                                 projection_class_embeddings_input_dim=2560),
}
