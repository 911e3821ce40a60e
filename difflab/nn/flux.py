"""Flux (Black Forest Labs, 2024): a rectified-flow transformer on packed latents with joint text-image attention.

A network, not a denoiser: ``net(x_in, t, context=, pooled=, guidance_scale=)`` maps a latent at
network scale (``Flow`` frame: x_t = (1 - t) x0 + t eps), the flow time t in [0, 1], the T5
hidden states and CLIP's pooled vector to the velocity eps - x0; ``difflab.core.Denoiser(net,
Flow(), "flow")`` wraps it. Module and parameter names are those of diffusers'
``FluxTransformer2DModel``, so its ``transformer/`` state dict loads as it is.

The architecture is SD3's MM-DiT (Esser et al. 2024, "Scaling Rectified Flow Transformers for
High-Resolution Image Synthesis", Section 4 and Figure 2) with Flux's changes:

- latents (B, C, H, W) are packed into 2x2 patches, (B, H/2 * W/2, 4C) tokens (:func:`pack_latents`);
  ``x_embedder`` / ``context_embedder`` map image / T5 tokens to the width ``heads * head_dim``;
- conditioning vector ``temb`` = MLP(sinusoidal(1000 t)) + MLP(pooled) [+ MLP(sinusoidal(1000 w))
  for the guidance-distilled FLUX.1-dev, w the guidance scale], as in SD3's Figure 2a;
- ``num_layers`` double-stream blocks (SD3's MM-DiT block, Figure 2b): separate weights for text
  and image tokens, adaLN-Zero modulation (Peebles & Xie 2023, "Scalable Diffusion Models with
  Transformers", Section 3.2) from ``temb``, one attention over the joined sequence, QK RMSNorm
  (SD3 Section 5.3.1), tanh-GELU MLPs;
- ``num_single_layers`` single-stream blocks on the joined sequence: attention and MLP in
  parallel from one modulated input (Dehghani et al. 2023, "Scaling Vision Transformers to 22
  Billion Parameters", Section 2.1, "parallel layers"), one output projection;
- rotary position embeddings (Su et al. 2021, "RoFormer", Section 3.4.2) over 3 axes with
  ``axes_dims_rope`` channels each (theta 10000), on position ids (0, row, col) of image tokens
  and (0, 0, 0) of text tokens (:func:`latent_image_ids`);
- ``norm_out``: LayerNorm modulated by ``temb`` (scale first, then shift), then ``proj_out``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import JSONConfig
from .layers import merge_heads, split_heads, timestep_embedding
from .mmdit import AdaNorm, FeedForward, modulate  # adaLN-Zero and the tanh-GELU MLP, shared with SD3's MMDiT
from .unet_sd import TimestepEmbedding  # Linear-SiLU-Linear, diffusers' names

DIFFUSERS_CLASS = "FluxTransformer2DModel"
ROPE_THETA = 10000.0
TIME_SCALE = 1000.0  # the network embeds 1000 t (and 1000 w), as diffusers' forward does


@dataclass(frozen=True)
class FluxConfig(JSONConfig):
    """The shape of a Flux transformer; field names are those of diffusers' ``FluxTransformer2DModel``.

    Defaults: FLUX.1 (12B): 19 double-stream and 38 single-stream blocks, 24 heads of 128, T5-XXL
    context (4096), CLIP-L pooled (768), 16 latent channels packed 2x2 (64). ``guidance_embeds``:
    FLUX.1-dev takes the guidance scale as an input; FLUX.1-schnell does not.
    """

    patch_size: int = 1  # diffusers' field; Flux packs 2x2 outside the transformer, so it is always 1
    in_channels: int = 64
    out_channels: int | None = None  # None: in_channels
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)

    def __post_init__(self):
        object.__setattr__(self, "axes_dims_rope", tuple(int(d) for d in self.axes_dims_rope))
        if self.patch_size != 1:
            raise ValueError(f"patch_size={self.patch_size} is not supported: Flux packs 2x2 latent patches outside the "
                             "transformer, with patch_size=1")
        if sum(self.axes_dims_rope) != self.attention_head_dim or any(d % 2 for d in self.axes_dims_rope):
            raise ValueError(f"axes_dims_rope={list(self.axes_dims_rope)} must be even numbers summing to "
                             f"attention_head_dim={self.attention_head_dim}")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def downsample_factor(self) -> int:
        """Latents are packed in 2x2 patches: their H and W must be even."""
        return 2

    @classmethod
    def from_diffusers_config(cls, d: dict) -> "FluxConfig":
        """Read a diffusers ``FluxTransformer2DModel`` ``config.json`` dict; an unknown setting raises."""
        if d.get("_class_name", DIFFUSERS_CLASS) != DIFFUSERS_CLASS:
            raise ValueError(f"config.json describes a {d['_class_name']!r}, not a {DIFFUSERS_CLASS!r}")
        fields = set(cls.__dataclass_fields__)
        unknown = sorted(k for k in d if not k.startswith("_") and k not in fields)
        if unknown:
            raise ValueError(f"unsupported {DIFFUSERS_CLASS} config keys: {unknown} (difflab reads {sorted(fields)})")
        return cls(**{k: d[k] for k in fields if k in d})

    def to_diffusers_config(self) -> dict:
        return {"_class_name": DIFFUSERS_CLASS, "_diffusers_version": "0.42.1", **self.to_dict()}


# ----------------------------------------------------------------------------------------------
# Packing and position ids (plain functions)


def pack_latents(z: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) latents -> (B, H/2 * W/2, 4C) tokens, one per 2x2 patch, row-major; a token's
    channels are (c, dy, dx) in that order (diffusers' ``FluxPipeline._pack_latents``)."""
    b, c, h, w = z.shape
    if h % 2 or w % 2:
        raise ValueError(f"latents must have even height and width to pack 2x2 patches, got shape {tuple(z.shape)}")
    return z.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents`: (B, H/2 * W/2, 4C) -> (B, C, H, W) for latents of ``height`` x ``width``."""
    b, n, c4 = tokens.shape
    if n != (height // 2) * (width // 2) or c4 % 4:
        raise ValueError(f"{tuple(tokens.shape)} tokens are not the 2x2 patches of {height} x {width} latents")
    return tokens.reshape(b, height // 2, width // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, height, width)


def latent_image_ids(rows: int, cols: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Position ids (rows * cols, 3) of the packed image tokens: (0, row, col), row-major."""
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.stack([torch.zeros_like(r), r, c], dim=-1).reshape(-1, 3).to(device, dtype)


def text_ids(length: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Position ids (length, 3) of the text tokens: all zero (their order is in T5's own embedding)."""
    return torch.zeros(length, 3, device=device, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# Rotary position embeddings


def rope_cos_sin(ids: torch.Tensor, axes_dims, theta: float = ROPE_THETA) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` (N, sum(axes_dims)) of RoFormer's rotation (Su et al. 2021, eq. 34) per axis:
    axis i gives angles p_i * theta^(-2j / d_i), j < d_i / 2, each repeated twice (interleaved
    pairs), from positions ``ids`` (N, len(axes_dims)). Angles in float64, as diffusers does."""
    cos, sin = [], []
    for i, d in enumerate(axes_dims):
        freqs = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=ids.device) / d)
        angles = torch.outer(ids[:, i].float(), freqs)
        cos.append(angles.cos().repeat_interleave(2, dim=1).float())
        sin.append(angles.sin().repeat_interleave(2, dim=1).float())
    return torch.cat(cos, dim=-1), torch.cat(sin, dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each channel pair (x_2j, x_2j+1) of ``x`` (B, heads, N, D) by its angle (Su et al. 2021, eq. 34)."""
    x_re, x_im = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-x_im, x_re], dim=-1).flatten(-2)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Embeddings and modulation


class TimeTextEmbedding(nn.Module):
    """temb = MLP(sinusoidal(1000 t, 256)) + MLP(pooled) [+ MLP(sinusoidal(1000 w, 256))] (SD3, Figure 2a)."""

    def __init__(self, dim: int, pooled_dim: int, guidance: bool):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(256, dim)
        if guidance:
            self.guidance_embedder = TimestepEmbedding(256, dim)
        self.text_embedder = TimestepEmbedding(pooled_dim, dim)

    def forward(self, t: torch.Tensor, pooled: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        emb = self.timestep_embedder(timestep_embedding(TIME_SCALE * t, 256).to(pooled.dtype))
        if w is not None:
            emb = emb + self.guidance_embedder(timestep_embedding(TIME_SCALE * w, 256).to(pooled.dtype))
        return emb + self.text_embedder(pooled)


# ----------------------------------------------------------------------------------------------
# Attention and blocks


def joint_attention(q, k, v, cos, sin) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V (Vaswani et al. 2017, eq. 1) with RoPE on q and k; (B, heads, N, D) in, (B, N, heads D) out."""
    return merge_heads(F.scaled_dot_product_attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v))


class FluxAttention(nn.Module):
    """q, k, v projections (with bias) and per-head RMSNorm on q and k (SD3, Section 5.3.1); with
    ``context=True`` a second set for the text tokens (``add_*_proj``, ``norm_added_*``,
    ``to_add_out``); without ``to_out`` in the single-stream blocks (``pre_only``)."""

    def __init__(self, dim: int, heads: int, head_dim: int, context: bool, pre_only: bool = False, eps: float = 1e-6):
        super().__init__()
        self.heads = heads
        inner = heads * head_dim
        self.norm_q, self.norm_k = nn.RMSNorm(head_dim, eps=eps), nn.RMSNorm(head_dim, eps=eps)
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, inner) for _ in range(3))
        if not pre_only:
            self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])
        if context:
            self.norm_added_q, self.norm_added_k = nn.RMSNorm(head_dim, eps=eps), nn.RMSNorm(head_dim, eps=eps)
            self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(dim, inner) for _ in range(3))
            self.to_add_out = nn.Linear(inner, dim)

    def qkv(self, x: torch.Tensor, added: bool = False):
        """(q, k, v) (B, heads, N, head_dim) of tokens ``x``, q and k RMS-normalized; ``added``: the text weights."""
        names = ("add_q_proj", "add_k_proj", "add_v_proj", "norm_added_q", "norm_added_k") if added else \
            ("to_q", "to_k", "to_v", "norm_q", "norm_k")
        q, k, v = (split_heads(getattr(self, n)(x), self.heads) for n in names[:3])
        return getattr(self, names[3])(q), getattr(self, names[4])(k), v


class FluxTransformerBlock(nn.Module):
    """Double-stream (MM-DiT) block (Esser et al. 2024, Figure 2b): text tokens ``c`` and image
    tokens ``x`` keep their own weights and adaLN-Zero modulation, and attend jointly (text first)."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.norm1, self.norm1_context = AdaNorm(dim, 6), AdaNorm(dim, 6)
        self.attn = FluxAttention(dim, heads, head_dim, context=True)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(dim)
        self.norm2_context = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff_context = FeedForward(dim)

    def forward(self, x, c, temb, cos, sin):
        h, (shift, scale, gate, shift_mlp, scale_mlp, gate_mlp) = self.norm1(x, temb)
        hc, (c_shift, c_scale, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp) = self.norm1_context(c, temb)
        (q, k, v) = self.attn.qkv(modulate(h, shift, scale))
        (qc, kc, vc) = self.attn.qkv(modulate(hc, c_shift, c_scale), added=True)
        out = joint_attention(torch.cat([qc, q], 2), torch.cat([kc, k], 2), torch.cat([vc, v], 2), cos, sin)
        out_c, out_x = out.split([c.shape[1], x.shape[1]], dim=1)
        x = x + gate * self.attn.to_out[0](out_x)
        x = x + gate_mlp * self.ff(modulate(self.norm2(x), shift_mlp, scale_mlp))
        c = c + c_gate * self.attn.to_add_out(out_c)
        c = c + c_gate_mlp * self.ff_context(modulate(self.norm2_context(c), c_shift_mlp, c_scale_mlp))
        return x, c


class FluxSingleTransformerBlock(nn.Module):
    """Single-stream block on the joined sequence: one modulated input feeds attention and an MLP
    in parallel (Dehghani et al. 2023, Section 2.1), ``proj_out`` maps both back, gated residual."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm = AdaNorm(dim, 3)
        self.proj_mlp = nn.Linear(dim, hidden)
        self.proj_out = nn.Linear(dim + hidden, dim)
        self.attn = FluxAttention(dim, heads, head_dim, context=False, pre_only=True)

    def forward(self, h, temb, cos, sin):
        y, (shift, scale, gate) = self.norm(h, temb)
        y = modulate(y, shift, scale)
        attn = joint_attention(*self.attn.qkv(y), cos, sin)
        mlp = F.gelu(self.proj_mlp(y), approximate="tanh")
        return h + gate * self.proj_out(torch.cat([attn, mlp], dim=2))


class FluxTransformer(nn.Module):
    """The Flux transformer (see the module docstring): ``forward(x, t, context=, pooled=,
    guidance_scale=None, img_ids=None, txt_ids=None)``.

    ``x``: latents (B, C, H, W) (packed here and unpacked on the way out; image ids from the
    shape) or packed tokens (B, N, in_channels) with ``img_ids`` (N, 3); ``t``: (B,) flow time in
    [0, 1]; ``context``: T5 hidden states (B, L, joint_attention_dim); ``pooled``: CLIP's pooled
    vector (B, pooled_projection_dim); ``guidance_scale``: a number or (B,), required by
    guidance-distilled models (``config.guidance_embeds``) and refused by the others;
    ``txt_ids`` default to zeros. Returns the velocity in the layout of ``x``.
    """

    def __init__(self, config: FluxConfig = FluxConfig()):
        super().__init__()
        self.config = c = config
        dim = c.inner_dim
        # pipelines pass the scale as an input instead of guiding (difflab.guidance.GuidanceInput)
        self.takes_guidance_scale = c.guidance_embeds
        self.time_text_embed = TimeTextEmbedding(dim, c.pooled_projection_dim, c.guidance_embeds)
        self.context_embedder = nn.Linear(c.joint_attention_dim, dim)
        self.x_embedder = nn.Linear(c.in_channels, dim)
        self.transformer_blocks = nn.ModuleList(
            [FluxTransformerBlock(dim, c.num_attention_heads, c.attention_head_dim) for _ in range(c.num_layers)])
        self.single_transformer_blocks = nn.ModuleList(
            [FluxSingleTransformerBlock(dim, c.num_attention_heads, c.attention_head_dim) for _ in range(c.num_single_layers)])
        self.norm_out = AdaNorm(dim, 2)  # diffusers' AdaLayerNormContinuous: (scale, shift), scale first
        self.proj_out = nn.Linear(dim, c.patch_size ** 2 * (c.out_channels or c.in_channels))

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None, pooled: torch.Tensor | None = None,
                guidance_scale=None, img_ids: torch.Tensor | None = None, txt_ids: torch.Tensor | None = None) -> torch.Tensor:
        tokens, img_ids = self._tokens(x, img_ids)
        w = self._guidance(guidance_scale, x.shape[0], x.device)
        dtype = self.x_embedder.weight.dtype
        self._check_text(context, pooled, x.shape[0])
        # t and w pass through the network's dtype before the 1000x scaling, as in diffusers' forward
        temb = self.time_text_embed(t.to(dtype), pooled.to(dtype), None if w is None else w.to(dtype))
        h, c = self.x_embedder(tokens.to(dtype)), self.context_embedder(context.to(dtype))
        txt_ids = text_ids(c.shape[1], x.device) if txt_ids is None else txt_ids
        cos, sin = rope_cos_sin(torch.cat([txt_ids, img_ids]), self.config.axes_dims_rope)
        for block in self.transformer_blocks:
            h, c = block(h, c, temb, cos, sin)
        hc = torch.cat([c, h], dim=1)
        for block in self.single_transformer_blocks:
            hc = block(hc, temb, cos, sin)
        hn, (scale, shift) = self.norm_out(hc[:, c.shape[1]:], temb)
        out = self.proj_out(modulate(hn, shift, scale))
        return unpack_latents(out, *x.shape[2:]) if x.ndim == 4 else out

    def _tokens(self, x, img_ids):
        """(packed tokens, image ids) of the input."""
        c_in = self.config.in_channels
        if x.ndim == 4:
            if 4 * x.shape[1] != c_in:
                raise ValueError(f"x has {x.shape[1]} channels; this transformer takes {c_in // 4} latent channels "
                                 f"(in_channels={c_in} after 2x2 packing)")
            tokens = pack_latents(x)
            return tokens, latent_image_ids(x.shape[2] // 2, x.shape[3] // 2, x.device) if img_ids is None else img_ids
        if x.ndim != 3 or x.shape[2] != c_in or img_ids is None or img_ids.shape != (x.shape[1], 3):
            raise ValueError(f"x must be latents (B, {c_in // 4}, H, W), or packed tokens (B, N, {c_in}) with img_ids "
                             f"(N, 3); got x {tuple(x.shape)}, img_ids {None if img_ids is None else tuple(img_ids.shape)}")
        return x, img_ids

    def _guidance(self, guidance_scale, batch: int, device) -> torch.Tensor | None:
        if not self.config.guidance_embeds:
            if guidance_scale is not None:
                raise ValueError("guidance_scale= given, but this Flux transformer has no guidance embedding "
                                 "(guidance_embeds=False, e.g. FLUX.1-schnell)")
            return None
        if guidance_scale is None:
            raise ValueError("this Flux transformer is guidance-distilled (guidance_embeds=True, e.g. FLUX.1-dev): "
                             "pass guidance_scale= (diffusers' default is 3.5)")
        w = torch.as_tensor(guidance_scale, dtype=torch.float32, device=device)
        w = w.expand(batch) if w.ndim == 0 else w.reshape(-1)
        if w.shape != (batch,):
            raise ValueError(f"guidance_scale must be a number or have shape ({batch},), got {tuple(w.shape)}")
        return w

    def _check_text(self, context, pooled, batch: int) -> None:
        c = self.config
        if context is None or context.ndim != 3 or context.shape[0] != batch or context.shape[2] != c.joint_attention_dim:
            raise ValueError(f"context must be T5 hidden states (B={batch}, L, {c.joint_attention_dim}), got "
                             f"{None if context is None else tuple(context.shape)}")
        if pooled is None or tuple(pooled.shape) != (batch, c.pooled_projection_dim):
            raise ValueError(f"pooled must be CLIP's pooled text embedding ({batch}, {c.pooled_projection_dim}), got "
                             f"{None if pooled is None else tuple(pooled.shape)}")


__all__ = ["FluxConfig", "FluxTransformer", "pack_latents", "unpack_latents", "latent_image_ids", "text_ids",
           "rope_cos_sin", "apply_rope"]
