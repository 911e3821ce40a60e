"""The Diffusion Transformer, DiT (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers").

A network, not a denoiser: ``net(x_in, t, class_labels=None)`` maps the network-scale input
(B, C, H, W) and a (B,) float time to the raw prediction, like :class:`difflab.nn.UNet`.

Layout (Section 3.2, Figure 3):

- patchify: a p x p convolution with stride p turns the image into T = (H / p)(W / p) tokens of
  ``hidden_size`` channels, plus fixed 2-D sine-cosine position embeddings (the MAE / ViT ones);
- conditioning c = MLP(sinusoidal(t)) + embedding(class): the timestep embedding of ADM and
  a class table with one more row, the null class ``num_classes``, for classifier-free guidance
  (Section 3.2, "Classifier-free guidance"). Labels are dropped by the training objective
  (``TrainConfig.cfg_dropout``, as for the U-Net), not inside the network;
- ``depth`` adaLN-Zero blocks (Section 3.2, "adaLN-Zero block"): from c a linear layer regresses
  a shift, a scale and a gate for each of the block's two residual branches::

      x = x + gate_msa * attn(LN(x) * (1 + scale_msa) + shift_msa)
      x = x + gate_mlp * mlp(LN(x) * (1 + scale_mlp) + shift_mlp)

  The regressing layer starts at zero, so every block starts as the identity;
- final layer: adaLN (shift, scale) on the LayerNorm, a linear map to p * p * out_channels per
  token, zero-initialized, then unpatchify back to (B, out_channels, H, W).

``out_channels = 2 * in_channels`` is DiT's learned sigma: the first C channels are the
prediction, the last C the interpolation of the reverse variance between beta_t and beta~_t
(improved DDPM, Nichol & Dhariwal 2021, eq. 15), exactly what ``Denoiser(...,
learned_variance=True)`` reads; the hybrid loss (``TrainConfig(loss="hybrid")``) trains it and
the DDPM sampler's ``variance="learned"`` uses it. A spec with ``"learned_variance": true`` doubles
``out_channels`` itself; every other sampler ignores the variance half.

The feed-forward of a block is its own submodule, ``block.mlp`` (``nn.Module`` mapping (B, T, D)
tokens to (B, T, D)), so a variant can swap it (e.g. for a mixture of experts) with
``block.mlp = ...`` and nothing else changes; a :class:`~difflab.nn.moe.MoEFeedForward` there is also
given the conditioning vector c (``mlp(h, cond=c)``) for its router. Attention is ``F.scaled_dot_product_attention``
with one fused ``qkv`` projection (with bias) and the default scale 1 / sqrt(head dim).

Two settings exist only to reproduce diffusers' port (``DiTTransformer2DModel``) exactly:
``frequency_shift = 1`` (its timestep frequencies are ``10000 ** (-i / (half - 1))``, the
original's ``10000 ** (-i / half)``) and ``mlp_norm_eps = 1e-5`` (its ``norm_eps`` on the second
LayerNorm; the original uses 1e-6 everywhere). Loaders set them (:mod:`difflab.io.dit_files`).

Mixture of experts (the ``moe-dit`` network kind; DiT-MoE, Fei et al. 2024): with ``moe_experts = E
>= 1`` every block's feed-forward is a :class:`~difflab.nn.moe.MoEFeedForward` of E experts, each
token routed to ``moe_top_k`` of them. By default each expert's hidden width is the dense one
divided by the experts a token goes through (top-k, plus the shared expert when there is one), so
the MoE-DiT computes as much per token as the dense DiT of the same width ("same active compute")
while holding about E / k times the feed-forward weights.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import JSONConfig
from .layers import (TimestepMLP, _maybe_checkpoint, check_class_labels, merge_heads, set_checkpointing, split_heads,
                     timestep_embedding, zero_)
from .moe import MoEFeedForward


@dataclass(frozen=True)
class DiTConfig(JSONConfig):
    """Everything that shapes a DiT; JSON-safe through ``to_dict`` / ``from_dict`` for checkpoints."""

    in_channels: int = 1  # channels of x
    out_channels: int | None = None  # channels of the output; None = in_channels; 2 * in_channels = learned sigma
    sample_size: int = 8  # the image side the position embeddings are laid out for (other sizes are rescaled to it)
    patch_size: int = 2  # p: each token is a p x p patch; must divide the image size
    hidden_size: int = 128  # D, the token width
    depth: int = 4  # number of DiT blocks
    num_heads: int = 4  # attention heads; must divide hidden_size
    mlp_ratio: float = 4.0  # the feed-forward's hidden width is mlp_ratio * D
    num_classes: int | None = None  # class-conditional when set; label num_classes is the null class (CFG)
    frequency_dim: int = 256  # width of the sinusoidal timestep embedding fed to the time MLP
    frequency_shift: int = 0  # 0: the original DiT's frequencies; 1: diffusers' port (downscale_freq_shift)
    mlp_norm_eps: float = 1e-6  # eps of the LayerNorm before the feed-forward (diffusers' port: its norm_eps, 1e-5)
    gradient_checkpointing: bool = False  # recompute block activations in backward to save memory
    # mixture of experts (the moe-dit kind): 0 = the dense feed-forward of DiT
    moe_experts: int = 0  # E: experts per block's feed-forward (MoEFeedForward); 0 = dense
    moe_top_k: int = 2  # experts each token goes through (1: Switch, 2: GShard / DiT-MoE)
    moe_mlp_ratio: float | None = None  # an expert's hidden width / D; None = mlp_ratio / (top_k + shared): same active compute
    moe_capacity_factor: float | None = None  # Switch's capacity factor; None = dropless
    moe_shared_expert: bool = False  # one more expert every token goes through (DeepSeekMoE)
    moe_router_sees_sigma: bool = False  # the router reads token + W c, c the block's conditioning (time and class)
    moe_aux_alpha: float = 0.01  # alpha of the Switch load-balancing loss, recorded for the loop (nn.aux)

    def __post_init__(self):
        def count(v):
            return isinstance(v, int) and not isinstance(v, bool) and v >= 1
        bad = [f"{k}={getattr(self, k)!r}" for k in ("in_channels", "sample_size", "patch_size", "hidden_size", "depth",
                                                     "num_heads", "frequency_dim") if not count(getattr(self, k))]
        bad += [] if self.out_channels is None or count(self.out_channels) else [f"out_channels={self.out_channels!r}"]
        bad += [] if self.num_classes is None or count(self.num_classes) else [f"num_classes={self.num_classes!r}"]
        if bad:
            raise ValueError(f"DiTConfig sizes must be positive integers: {', '.join(bad)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"DiTConfig num_heads={self.num_heads} must divide hidden_size={self.hidden_size}")
        if self.hidden_size % 4:
            raise ValueError(f"DiTConfig hidden_size={self.hidden_size} must be a multiple of 4 (2-D sine-cosine position embeddings)")
        if self.sample_size % self.patch_size:
            raise ValueError(f"DiTConfig patch_size={self.patch_size} must divide sample_size={self.sample_size} (the image side)")
        if not self.mlp_ratio > 0 or self.frequency_dim % 2 or not 0 <= self.frequency_shift < self.frequency_dim // 2:
            raise ValueError(f"DiTConfig needs mlp_ratio > 0, an even frequency_dim and 0 <= frequency_shift < frequency_dim / 2, got "
                             f"mlp_ratio={self.mlp_ratio}, frequency_dim={self.frequency_dim}, frequency_shift={self.frequency_shift}")
        self._check_moe()

    def _check_moe(self) -> None:
        """Errors naming the bad ``moe_*`` field, before any weight is made."""
        def number(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        E, k = self.moe_experts, self.moe_top_k
        if not isinstance(E, int) or isinstance(E, bool) or E < 0:
            raise ValueError(f"DiTConfig moe_experts={E!r} must be an integer >= 0 (0: the dense feed-forward)")
        if not isinstance(k, int) or isinstance(k, bool) or k < 1 or (E and k > E):
            raise ValueError(f"DiTConfig moe_top_k={k!r} must be an integer in 1..moe_experts={E}")
        for name in ("moe_mlp_ratio", "moe_capacity_factor"):
            v = getattr(self, name)
            if v is not None and not (number(v) and v > 0):
                raise ValueError(f"DiTConfig {name}={v!r} must be a finite number > 0, or None")
        if not (number(self.moe_aux_alpha) and self.moe_aux_alpha >= 0):
            raise ValueError(f"DiTConfig moe_aux_alpha={self.moe_aux_alpha!r} must be a finite number >= 0")
        if E and self.expert_hidden < 1:
            raise ValueError(f"DiTConfig: an expert's hidden width int(hidden_size * moe_mlp_ratio) is {self.expert_hidden}; "
                             f"raise moe_mlp_ratio (now {self.moe_mlp_ratio}) or mlp_ratio")

    @property
    def expert_hidden(self) -> int:
        """An expert's hidden width: ``moe_mlp_ratio * D``, else the dense width split over the
        experts a token goes through (top-k plus the shared one): the dense DiT's active compute."""
        if self.moe_mlp_ratio is not None:
            return int(self.hidden_size * self.moe_mlp_ratio)
        return int(self.hidden_size * self.mlp_ratio) // (self.moe_top_k + int(self.moe_shared_expert))

    @property
    def null_class(self) -> int | None:
        """The label of the unconditional ("null") class used for classifier-free guidance, or None."""
        return self.num_classes


# ----------------------------------------------------------------------------------------------
# Position embeddings


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """(M, dim) = [sin(pos w), cos(pos w)] with w_k = 10000 ** (-k / (dim / 2)) (Vaswani et al. 2017, Section 3.5)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    out = pos.double()[:, None] * omega[None]
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int, base: int | None = None) -> torch.Tensor:
    """(grid_h * grid_w, dim) fixed 2-D position embeddings of DiT (from MAE, He et al. 2022): the
    first half encodes a token's column, the second its row, tokens in row-major order. ``base``
    (the trained grid side) rescales positions of another grid onto it, as diffusers'
    ``PatchEmbed`` does; for the trained grid the positions are 0, 1, 2, ..."""
    rows = torch.arange(grid_h, dtype=torch.float64) * ((base or grid_h) / grid_h)
    cols = torch.arange(grid_w, dtype=torch.float64) * ((base or grid_w) / grid_w)
    row, col = torch.meshgrid(rows, cols, indexing="ij")
    return torch.cat([sincos_1d(dim // 2, col.reshape(-1)), sincos_1d(dim // 2, row.reshape(-1))], dim=1).float()


# ----------------------------------------------------------------------------------------------
# Blocks


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: ``x * (1 + scale) + shift`` with per-sample (B, 1, D) scale and shift (Peebles & Xie 2023, Section 3.2)."""
    return x * (1 + scale) + shift


class Attention(nn.Module):
    """Multi-head self-attention over tokens, softmax(Q K^T / sqrt(d)) V (Vaswani et al. 2017, eq. 1),
    with one fused ``qkv`` projection ([W_q; W_k; W_v], with bias) and an output ``proj``."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (split_heads(z, self.num_heads) for z in self.qkv(x).chunk(3, dim=-1))
        return self.proj(merge_heads(F.scaled_dot_product_attention(q, k, v)))


class FeedForward(nn.Module):
    """``fc2(gelu_tanh(fc1(x)))``, the transformer's position-wise feed-forward (Vaswani et al.
    2017, eq. 2) with the tanh-approximate GELU of DiT."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """An adaLN-Zero block (Peebles & Xie 2023, Section 3.2, Figure 3): attention and feed-forward
    branches, each pre-normed and modulated by a shift and scale and gated, all six regressed from
    the conditioning by ``adaLN_modulation``, whose linear layer starts at zero (the block starts
    as the identity). ``mlp`` is any module mapping (B, T, D) -> (B, T, D) (default: DiT's
    :class:`FeedForward`); a :class:`~difflab.nn.moe.MoEFeedForward` is also given c as ``cond``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, mlp_norm_eps: float = 1e-6,
                 mlp: nn.Module | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=mlp_norm_eps)
        self.mlp = FeedForward(dim, int(dim * mlp_ratio)) if mlp is None else mlp
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), zero_(nn.Linear(dim, 6 * dim)))
        self.checkpoint = False

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return _maybe_checkpoint(self.checkpoint, self._forward, x, c)

    def _forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c)[:, None].chunk(6, dim=-1)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        h = modulate(self.norm2(x), shift_mlp, scale_mlp)
        return x + gate_mlp * (self.mlp(h, cond=c) if isinstance(self.mlp, MoEFeedForward) else self.mlp(h))


class FinalLayer(nn.Module):
    """adaLN (shift, scale) on the last LayerNorm, then a linear map to p * p * out_channels per
    token; both linear layers start at zero, so an untrained DiT outputs exactly 0."""

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = zero_(nn.Linear(dim, patch_size * patch_size * out_channels))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), zero_(nn.Linear(dim, 2 * dim)))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def moe_feed_forward(config: DiTConfig) -> MoEFeedForward | None:
    """A block's mixture-of-experts feed-forward for ``config`` (None when ``moe_experts`` is 0):
    its router sees the block's conditioning vector c (width D) when ``moe_router_sees_sigma``."""
    c = config
    if not c.moe_experts:
        return None
    return MoEFeedForward(c.hidden_size, c.expert_hidden, c.moe_experts, c.moe_top_k, c.moe_capacity_factor,
                          c.moe_shared_expert, c.moe_router_sees_sigma, c.hidden_size if c.moe_router_sees_sigma else None,
                          c.moe_aux_alpha)


# ----------------------------------------------------------------------------------------------
# The network


class DiT(nn.Module):
    """The Diffusion Transformer; see the module docstring for the layout. Initialized as the
    paper's code does: Xavier-uniform linear layers with zero biases (the patch embedding too, as
    a linear map), N(0, 0.02) time-MLP weights and class table, zero adaLN and output layers."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = c = config
        D, p = c.hidden_size, c.patch_size
        self.patch_embed = nn.Conv2d(c.in_channels, D, p, stride=p)
        self.time_embed = TimestepMLP(c.frequency_dim, D)
        # one row per class plus the null class (row num_classes) for classifier-free guidance
        self.label_embed = nn.Embedding(c.num_classes + 1, D) if c.num_classes is not None else None
        self.blocks = nn.ModuleList([DiTBlock(D, c.num_heads, c.mlp_ratio, c.mlp_norm_eps, moe_feed_forward(c))
                                     for _ in range(c.depth)])
        self.final_layer = FinalLayer(D, p, c.out_channels or c.in_channels)
        grid = c.sample_size // p
        self.register_buffer("pos_embed", sincos_2d(D, grid, grid)[None], persistent=False)
        self._init_weights()
        set_checkpointing(self, c.gradient_checkpointing)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:  # an MoE router has none
                    nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.patch_embed.weight.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        for m in (self.time_embed.net[0], self.time_embed.net[2]):
            nn.init.normal_(m.weight, std=0.02)
        if self.label_embed is not None:
            nn.init.normal_(self.label_embed.weight, std=0.02)
        for m in (*(block.adaLN_modulation[1] for block in self.blocks), self.final_layer.adaLN_modulation[1], self.final_layer.linear):
            zero_(m)  # adaLN-Zero: every block starts as the identity, the output at 0

    @property
    def null_class(self) -> int | None:
        """The null-class label (``config.num_classes``), or None for an unconditional net."""
        return self.config.null_class

    def position_embedding(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """(1, grid_h * grid_w, D): the stored table on the trained grid, else positions rescaled to it."""
        base = self.config.sample_size // self.config.patch_size
        if grid_h == grid_w == base:
            return self.pos_embed
        return sincos_2d(self.config.hidden_size, grid_h, grid_w, base).to(self.pos_embed.device)[None]

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """Predict from ``x`` (B, C, H, W) at times ``t`` (B,) float (a scalar is broadcast).

        ``class_labels``: LongTensor (B,) in [0, num_classes]; num_classes is the null class, and
        missing labels on a class-conditional net mean the null class for every sample.
        """
        # 1. Check inputs
        c = self.config
        t = self._check_inputs(x, t, class_labels)
        b, _, h, w = x.shape
        p = c.patch_size

        # 2. Conditioning: time embedding + class embedding
        dtype = self.patch_embed.weight.dtype
        cond = self.time_embed(timestep_embedding(t, c.frequency_dim, shift=c.frequency_shift).to(dtype))
        if self.label_embed is not None:
            if class_labels is None:
                class_labels = torch.full((b,), c.null_class, dtype=torch.long, device=x.device)
            cond = cond + self.label_embed(class_labels)

        # 3. Patchify: (B, C, H, W) -> (B, T, D), plus position embeddings
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        tokens = tokens + self.position_embedding(h // p, w // p).to(tokens.dtype)

        # 4. adaLN-Zero blocks, then the final layer: (B, T, p * p * out_channels)
        for block in self.blocks:
            tokens = block(tokens, cond)
        out = self.final_layer(tokens, cond)

        # 5. Unpatchify: (B, T, p * p * C_out) -> (B, C_out, H, W)
        out = out.reshape(b, h // p, w // p, p, p, -1).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(b, -1, h, w)

    def _check_inputs(self, x, t, class_labels) -> torch.Tensor:
        """Raise a ValueError naming the bad argument; return ``t`` as a (B,) tensor."""
        c = self.config
        if x.ndim != 4 or x.shape[1] != c.in_channels:
            raise ValueError(f"x must be (B, {c.in_channels}, H, W), got shape {tuple(x.shape)}")
        b, _, h, w = x.shape
        if h % c.patch_size or w % c.patch_size:
            raise ValueError(f"x's height and width must be divisible by patch_size={c.patch_size}, got {h}x{w}")
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(b)
        if t.shape != (b,):
            raise ValueError(f"t must be a (B,) = ({b},) tensor, got shape {tuple(t.shape)}")
        check_class_labels(class_labels, b, c.num_classes, "DiT")
        return t


# Table 1 of the paper: (depth, hidden size, heads) of S, B, L, XL; each at patch 2, 4 and 8.
# The paper trains them on 256 x 256 ImageNet latents (32 x 32 x 4 from the SD VAE, 1000 classes);
# its released checkpoints also learn sigma (a spec with "learned_variance": true).
SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
PRESETS = {
    f"DiT-{size}/{p}": DiTConfig(in_channels=4, sample_size=32, patch_size=p, hidden_size=D, depth=depth, num_heads=heads,
                                 num_classes=1000)
    for size, (depth, D, heads) in SIZES.items() for p in (2, 4, 8)
}
# the embedded 8x8 one-channel digits, class-conditional with a null class for CFG: 16 tokens of 2x2 pixels
PRESETS["digits"] = DiTConfig(in_channels=1, sample_size=8, patch_size=2, hidden_size=128, depth=4, num_heads=4, num_classes=10)
# half as wide (a quarter of the weights): trains the digits within minutes of a 2-core CPU
PRESETS["digits-small"] = dataclasses.replace(PRESETS["digits"], hidden_size=64)

# The moe-dit kind's presets: each DiT preset with 8 experts, top-2, dropless, at the dense preset's
# active compute (each expert half the dense hidden width). The digits ones also route on c, so
# routing can follow the noise level (Switch-DiT's timestep-aware gating, Park et al. 2024).
MOE_PRESETS = {name: dataclasses.replace(config, moe_experts=8, moe_top_k=2) for name, config in PRESETS.items()}
for name in ("digits", "digits-small"):
    MOE_PRESETS[name] = dataclasses.replace(MOE_PRESETS[name], moe_router_sees_sigma=True)


def parameter_count(config: DiTConfig) -> int:
    """The number of weights of a DiT of ``config``, from the config alone (no tensor is built);
    for a mixture of experts all of them (``difflab.nn.moe.active_parameters`` counts a token's)."""
    D, p, C = config.hidden_size, config.patch_size, config.in_channels
    hidden = int(D * config.mlp_ratio)
    mlp = 2 * D * hidden + hidden + D
    if config.moe_experts:
        h, E = config.expert_hidden, config.moe_experts
        experts = (E + int(config.moe_shared_expert)) * (2 * D * h + h + D)
        mlp = D * E + experts + (D * D + D if config.moe_router_sees_sigma else 0)
    block = (3 * D * D + 3 * D) + (D * D + D) + mlp + (6 * D * D + 6 * D)
    head = 2 * D * D + 2 * D + D * p * p * (config.out_channels or C) + p * p * (config.out_channels or C)
    embed = C * D * p * p + D + config.frequency_dim * D + D + D * D + D
    labels = (config.num_classes + 1) * D if config.num_classes is not None else 0
    return embed + labels + config.depth * block + head


__all__ = ["DiT", "DiTConfig", "DiTBlock", "FeedForward", "Attention", "FinalLayer", "PRESETS", "MOE_PRESETS", "SIZES",
           "sincos_2d", "modulate", "moe_feed_forward", "parameter_count"]
