"""MMDiT, the multimodal diffusion transformer of Stable Diffusion 3 (Esser et al. 2024, "Scaling
Rectified Flow Transformers for High-Resolution Image Synthesis", Section 4 and Figure 2).

A network, not a denoiser: ``net(x_in, t, context=, pooled=)`` maps the latent at network scale
(B, C, H, W), a (B,) float time (SD3: t in [0, 1000], the flow frame's ``time_scale=1000``), the
text tokens ``context`` (B, L, joint_attention_dim) and the pooled text vector ``pooled``
(B, pooled_projection_dim) to the velocity eps - x0 (prediction ``"flow"``).

The layout is diffusers' ``SD3Transformer2DModel``, with its module and parameter names, so a
``transformer/`` state dict loads as it is:

- ``pos_embed``: p x p patches by a stride-p conv, plus a 2-D sin-cos position embedding cropped
  from the centre of a ``pos_embed_max_size``^2 table (Section 5.3.2, positional encodings for
  varying aspect ratios; the table is a persistent buffer, as in diffusers);
- ``time_text_embed``: c = MLP(sinusoid(t)) + MLP(pooled) (Figure 2a, "y");
- ``context_embedder``: a linear map of the text tokens to the model width;
- ``transformer_blocks``: joint blocks (Figure 2b). Each stream (image tokens x, text tokens c)
  has its own adaLN-Zero modulation (Peebles & Xie 2023, Section 3.2), projections and MLP; the
  attention runs over the concatenation [x; c], so both streams see each other. The last block
  keeps only the image stream ("context_pre_only"). Optional RMS QK-normalisation (Section 5.3.2,
  SD 3.5) and, on the layers ``dual_attention_layers``, SD 3.5's second self-attention over the
  image tokens alone (MMDiT-X);
- ``norm_out`` (adaptive LayerNorm), ``proj_out`` and unpatchify.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import JSONConfig
from .layers import _maybe_checkpoint, merge_heads, split_heads, timestep_embedding
from .unet_sd import TimestepEmbedding

DIFFUSERS_CLASS = "SD3Transformer2DModel"
QK_NORMS = (None, "rms_norm")


@dataclass(frozen=True)
class MMDiTConfig(JSONConfig):
    """The shape of an MMDiT; field names are those of diffusers' ``SD3Transformer2DModel`` config.

    Defaults: SD3 medium (2B; 24 layers of width 1536). The model width is
    ``num_attention_heads * attention_head_dim``; ``caption_projection_dim`` must equal it.
    """

    sample_size: int = 128  # latent size at training (pipelines' default; sets the position table's scale)
    patch_size: int = 2
    in_channels: int = 16
    out_channels: int = 16
    num_layers: int = 24
    attention_head_dim: int = 64
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096  # width of the text tokens (T5-XXL)
    caption_projection_dim: int = 1536  # width of the text stream (= the model width)
    pooled_projection_dim: int = 2048  # CLIP-L (768) + CLIP-G (1280) pooled vectors
    pos_embed_max_size: int = 192  # the position table is pos_embed_max_size^2 patches; larger inputs are an error
    dual_attention_layers: tuple[int, ...] = ()  # SD 3.5 medium: (0, ..., 12)
    qk_norm: str | None = None  # None (SD3) or "rms_norm" (SD 3.5)

    def __post_init__(self):
        object.__setattr__(self, "dual_attention_layers", tuple(self.dual_attention_layers))
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm={self.qk_norm!r} is not supported; choose one of {list(QK_NORMS)}")
        if self.caption_projection_dim != self.width:
            raise ValueError(f"caption_projection_dim={self.caption_projection_dim} must equal num_attention_heads * "
                             f"attention_head_dim = {self.width} (the text and image streams share the attention)")
        if self.width % 2:
            raise ValueError(f"the model width {self.width} must be even (sin-cos position embedding)")
        bad = [i for i in self.dual_attention_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"dual_attention_layers {bad} are outside the {self.num_layers} layers")

    @property
    def width(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def downsample_factor(self) -> int:
        """Latent pixels per token along H and W: inputs must be multiples of the patch size."""
        return self.patch_size

    @classmethod
    def from_diffusers_config(cls, d: dict) -> "MMDiTConfig":
        """Read a diffusers ``SD3Transformer2DModel`` ``config.json`` dict (diffusers' defaults for absent keys)."""
        if d.get("_class_name", DIFFUSERS_CLASS) != DIFFUSERS_CLASS:
            raise ValueError(f"config.json describes a {d['_class_name']!r}, not an {DIFFUSERS_CLASS!r}")
        known = {**_DIFFUSERS_DEFAULTS, **{k: v for k, v in d.items() if k in _DIFFUSERS_DEFAULTS}}
        if known["out_channels"] is None:
            known["out_channels"] = known["in_channels"]
        return cls(**known)

    def to_diffusers_config(self) -> dict:
        return {"_class_name": DIFFUSERS_CLASS, **self.to_dict()}


# diffusers' SD3Transformer2DModel defaults (SD3 medium's own config differs: 24 layers, 24 heads, 1536, 192)
_DIFFUSERS_DEFAULTS = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=18,
                           attention_head_dim=64, num_attention_heads=18, joint_attention_dim=4096,
                           caption_projection_dim=1152, pooled_projection_dim=2048, pos_embed_max_size=96,
                           dual_attention_layers=(), qk_norm=None)


def sincos_pos_embed_2d(dim: int, grid: int, base_size: int) -> torch.Tensor:
    """(grid^2, dim) 2-D sin-cos position embedding (Vaswani et al. 2017, Section 3.5, per axis; MAE /
    DiT's ``get_2d_sincos_pos_embed``): half the channels encode one coordinate, half the other,
    positions scaled to ``arange(grid) * base_size / grid`` as in SD3 (diffusers' numerics)."""
    pos = torch.arange(grid, dtype=torch.float32) / (grid / base_size)
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    gw, gh = torch.meshgrid(pos, pos, indexing="xy")  # gw varies along columns, gh along rows

    def axis(p):
        out = torch.outer(p.reshape(-1).to(torch.float64), omega)
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([axis(gw), axis(gh)], dim=1).float()


class PatchEmbed(nn.Module):
    """Patches to tokens plus the centre crop of the position table (Esser et al. 2024, Section 5.3.2)."""

    def __init__(self, c: MMDiTConfig):
        super().__init__()
        self.patch_size, self.max_size = c.patch_size, c.pos_embed_max_size
        self.proj = nn.Conv2d(c.in_channels, c.width, c.patch_size, stride=c.patch_size)
        table = sincos_pos_embed_2d(c.width, c.pos_embed_max_size, c.sample_size // c.patch_size)
        self.register_buffer("pos_embed", table[None], persistent=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        if h > self.max_size or w > self.max_size:
            raise ValueError(f"a {x.shape[-2]}x{x.shape[-1]} latent has {h}x{w} patches, more than the position "
                             f"table's {self.max_size}x{self.max_size} (pos_embed_max_size)")
        top, left = (self.max_size - h) // 2, (self.max_size - w) // 2
        pos = self.pos_embed.reshape(1, self.max_size, self.max_size, -1)[:, top:top + h, left:left + w]
        tokens = self.proj(x).flatten(2).transpose(1, 2)  # (B, h w, D)
        return tokens + pos.reshape(1, h * w, -1).to(tokens.dtype)


class TimeTextEmbed(nn.Module):
    """c = MLP(sinusoid_256(t)) + MLP(pooled) (Esser et al. 2024, Figure 2a)."""

    def __init__(self, dim: int, pooled_dim: int):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(256, dim)
        self.text_embedder = TimestepEmbedding(pooled_dim, dim)  # Linear-SiLU-Linear, as diffusers' PixArtAlphaTextProjection

    def forward(self, t: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        return self.timestep_embedder(timestep_embedding(t, 256).to(pooled.dtype)) + self.text_embedder(pooled)


class AdaNorm(nn.Module):
    """LayerNorm without affine parameters, modulated by ``n`` vectors from c: ``linear(silu(c))``
    split into n chunks (adaLN; Peebles & Xie 2023, Section 3.2). The modulation starts at zero
    (adaLN-Zero: every block starts as the identity)."""

    def __init__(self, dim: int, n: int):
        super().__init__()
        self.linear = nn.Linear(dim, n * dim)
        self.n = n
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor):
        """``(LayerNorm(x), [the n chunks of linear(silu(c)), each (B, 1, D)])``."""
        return F.layer_norm(x, x.shape[-1:], eps=1e-6), [m[:, None] for m in self.linear(F.silu(c)).chunk(self.n, dim=1)]


def modulate(h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return h * (1 + scale) + shift


class GELU(nn.Module):
    """tanh-approximated GELU of a linear map (Hendrycks & Gimpel 2016), named as diffusers' ``GELU``."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """The MLP of each stream: Linear, tanh-GELU, Linear with 4x hidden units (``net = [GELU, Dropout, Linear]``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(GELU(dim, 4 * dim), nn.Dropout(0.0), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class JointAttention(nn.Module):
    """softmax(Q K^T / sqrt(d)) V over the image tokens and, when ``joint``, the text tokens
    concatenated after them (Esser et al. 2024, Figure 2b). Each stream has its own biased q/k/v
    projections (``to_*`` for images, ``add_*_proj`` for text) and output projection
    (``to_out.0``, ``to_add_out``; the latter absent when the text output is not used).
    ``qk_norm="rms_norm"``: RMSNorm of q and k per head before the product (Section 5.3.2)."""

    def __init__(self, dim: int, heads: int, dim_head: int, *, joint: bool, context_out: bool, qk_norm: str | None):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, inner) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])
        norm = (lambda: nn.RMSNorm(dim_head, eps=1e-6)) if qk_norm == "rms_norm" else (lambda: None)
        self.norm_q, self.norm_k = norm(), norm()
        if joint:
            self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(dim, inner) for _ in range(3))
            self.norm_added_q, self.norm_added_k = norm(), norm()
            self.to_add_out = nn.Linear(inner, dim) if context_out else None

    def _qkv(self, x, q, k, v, norm_q, norm_k):
        q, k, v = (split_heads(p(x), self.heads) for p in (q, k, v))
        return (q if norm_q is None else norm_q(q)), (k if norm_k is None else norm_k(k)), v

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None):
        """Image tokens ``x`` (B, N, D), text tokens ``c`` (B, L, D) or None: (x_out, c_out or None)."""
        q, k, v = self._qkv(x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k)
        if c is not None:
            qc, kc, vc = self._qkv(c, self.add_q_proj, self.add_k_proj, self.add_v_proj, self.norm_added_q, self.norm_added_k)
            q, k, v = torch.cat([q, qc], 2), torch.cat([k, kc], 2), torch.cat([v, vc], 2)
        out = merge_heads(F.scaled_dot_product_attention(q, k, v))
        n = x.shape[1]
        x_out = self.to_out[1](self.to_out[0](out[:, :n]))
        c_out = None if c is None or self.to_add_out is None else self.to_add_out(out[:, n:])
        return x_out, c_out


class JointBlock(nn.Module):
    """One MMDiT block (Esser et al. 2024, Figure 2b), each stream pre-norm with adaLN-Zero:

        x_m = modulate(norm(x), shift1, scale1);  c_m likewise with the text stream's own modulation
        (a, a_c) = JointAttention(x_m, c_m);      x += gate1 a;   c += gate1_c a_c
        x += gate2 MLP(modulate(norm(x), shift2, scale2));  c likewise

    ``context_pre_only`` (the last block): the text stream is only read (its modulation is an
    adaptive LayerNorm with scale and shift, no output, no MLP). ``dual``: SD 3.5's second
    attention over the image tokens alone, with its own shift/scale/gate, added after the first.
    """

    def __init__(self, c: MMDiTConfig, *, context_pre_only: bool, dual: bool):
        super().__init__()
        dim = c.width
        self.context_pre_only, self.dual = context_pre_only, dual
        self.norm1 = AdaNorm(dim, 9 if dual else 6)
        self.norm1_context = AdaNorm(dim, 2 if context_pre_only else 6)
        self.attn = JointAttention(dim, c.num_attention_heads, c.attention_head_dim, joint=True,
                                   context_out=not context_pre_only, qk_norm=c.qk_norm)
        self.attn2 = JointAttention(dim, c.num_attention_heads, c.attention_head_dim, joint=False, context_out=False,
                                    qk_norm=c.qk_norm) if dual else None
        self.ff = FeedForward(dim)
        self.ff_context = None if context_pre_only else FeedForward(dim)
        self.checkpoint = False  # recompute activations in backward (difflab.perf.memory.set_gradient_checkpointing)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, emb: torch.Tensor):
        return _maybe_checkpoint(self.checkpoint, self._forward, x, ctx, emb)

    def _forward(self, x: torch.Tensor, ctx: torch.Tensor, emb: torch.Tensor):
        h, m = self.norm1(x, emb)
        shift, scale, gate, shift2, scale2, gate2 = m[:6]
        hc, mc = self.norm1_context(ctx, emb)
        if self.context_pre_only:  # AdaLayerNormContinuous: (scale, shift)
            ctx_in = modulate(hc, mc[1], mc[0])
        else:
            c_shift, c_scale, c_gate, c_shift2, c_scale2, c_gate2 = mc
            ctx_in = modulate(hc, c_shift, c_scale)
        a, a_c = self.attn(modulate(h, shift, scale), ctx_in)
        x = x + gate * a
        if self.dual:  # the second attention sees the same normalised x with its own modulation
            shift3, scale3, gate3 = m[6:]
            x = x + gate3 * self.attn2(modulate(h, shift3, scale3))[0]
        x = x + gate2 * self.ff(modulate(F.layer_norm(x, x.shape[-1:], eps=1e-6), shift2, scale2))
        if self.context_pre_only:
            return x, None
        ctx = ctx + c_gate * a_c
        ctx = ctx + c_gate2 * self.ff_context(modulate(F.layer_norm(ctx, ctx.shape[-1:], eps=1e-6), c_shift2, c_scale2))
        return x, ctx


class MMDiT(nn.Module):
    """The SD3 transformer (Esser et al. 2024, Figure 2): ``net(x, t, context=, pooled=) -> velocity``.

    ``context`` (B, L, joint_attention_dim): the text tokens (SD3: CLIP-L and CLIP-G hidden states
    zero-padded to 4096 channels, then T5's tokens, :class:`difflab.nn.sd3_text.SD3TextEncoder`);
    None means no text token. ``pooled`` (B, pooled_projection_dim): None means zeros (the
    paper drops each text encoder to zeros in training).
    """

    def __init__(self, config: MMDiTConfig):
        super().__init__()
        self.config = c = config
        self.pos_embed = PatchEmbed(c)
        self.time_text_embed = TimeTextEmbed(c.width, c.pooled_projection_dim)
        self.context_embedder = nn.Linear(c.joint_attention_dim, c.caption_projection_dim)
        self.transformer_blocks = nn.ModuleList([
            JointBlock(c, context_pre_only=i == c.num_layers - 1, dual=i in c.dual_attention_layers) for i in range(c.num_layers)])
        self.norm_out = AdaNorm(c.width, 2)
        self.proj_out = nn.Linear(c.width, c.patch_size**2 * c.out_channels)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None,
                pooled: torch.Tensor | None = None) -> torch.Tensor:
        # 1. Check inputs
        c = self.config
        x, t, context, pooled = self._check_inputs(x, t, context, pooled)
        # 2. Tokens: patches + positions; text tokens; the conditioning vector
        h = self.pos_embed(x)
        emb = self.time_text_embed(t, pooled)
        ctx = self.context_embedder(context)
        # 3. Joint blocks
        for block in self.transformer_blocks:
            h, ctx = block(h, ctx, emb)
        # 4. Out: adaptive LayerNorm (scale, shift), projection, unpatchify
        hn, (scale, shift) = self.norm_out(h, emb)
        out = self.proj_out(modulate(hn, shift, scale))
        p, (hh, ww) = c.patch_size, (x.shape[-2] // c.patch_size, x.shape[-1] // c.patch_size)
        out = out.reshape(x.shape[0], hh, ww, p, p, c.out_channels)
        return torch.einsum("nhwpqc->nchpwq", out).reshape(x.shape[0], c.out_channels, hh * p, ww * p)

    def _check_inputs(self, x, t, context, pooled):
        """A ValueError naming the bad argument; returns (x, t (B,), context, pooled), Nones filled and
        x, context and pooled in the weights' dtype (the sampler's float32 samples meet bf16/fp16 weights)."""
        c = self.config
        if x.ndim != 4 or x.shape[1] != c.in_channels or x.shape[2] % c.patch_size or x.shape[3] % c.patch_size:
            raise ValueError(f"x must be (B, {c.in_channels}, H, W) with H and W multiples of patch_size={c.patch_size}, "
                             f"got shape {tuple(x.shape)}")
        b, dtype = x.shape[0], self.proj_out.weight.dtype
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(b) if t.ndim == 0 else t
        if t.shape != (b,):
            raise ValueError(f"t must be a (B,) = ({b},) tensor, got shape {tuple(t.shape)}")
        if context is None:
            context = x.new_zeros(b, 0, c.joint_attention_dim, dtype=dtype)
        if context.ndim != 3 or context.shape[0] != b or context.shape[2] != c.joint_attention_dim:
            raise ValueError(f"context must be (B, L, joint_attention_dim) = ({b}, L, {c.joint_attention_dim}), "
                             f"got shape {tuple(context.shape)}")
        if pooled is None:
            pooled = x.new_zeros(b, c.pooled_projection_dim, dtype=dtype)
        if pooled.shape != (b, c.pooled_projection_dim):
            raise ValueError(f"pooled must be (B, pooled_projection_dim) = ({b}, {c.pooled_projection_dim}), "
                             f"got shape {tuple(pooled.shape)}")
        return x.to(dtype), t, context.to(dtype), pooled.to(dtype)


PRESETS = {
    # Stable Diffusion 3 medium (2B): 24 layers, width 1536
    "sd3_medium": MMDiTConfig(),
    # Stable Diffusion 3.5 medium: 24 layers, RMS QK-norm, dual attention in the first 13 layers, pos table 384
    "sd35_medium": MMDiTConfig(pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"),
    # Stable Diffusion 3.5 large (8B): 38 layers, width 2432
    "sd35_large": MMDiTConfig(num_layers=38, num_attention_heads=38, caption_projection_dim=2432, qk_norm="rms_norm"),
    # a few tens of thousands of parameters, for tests
    "tiny": MMDiTConfig(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
                        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                        pooled_projection_dim=8, pos_embed_max_size=16),
}
