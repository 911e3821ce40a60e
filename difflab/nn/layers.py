"""Building blocks of the ADM / DDPM U-Net.

Ho et al. 2020, "Denoising Diffusion Probabilistic Models" (DDPM), Appendix B: a PixelCNN++-style
U-Net of residual blocks with GroupNorm, sinusoidal time embedding added in every block and
self-attention at 16x16. Dhariwal & Nichol 2021, "Diffusion Models Beat GANs" (ADM), Section 3:
the same net with the embedding applied as a scale and a shift after GroupNorm
("use_scale_shift_norm"), multi-head attention, and zero-initialized last layers so every
residual block starts as the identity. Cross-attention to a token sequence is Rombach et al. 2022
("High-Resolution Image Synthesis with Latent Diffusion Models", Section 3.3).

Every block works on a (B, C, H, W) tensor; attention blocks see it as H*W tokens of C channels.
Blocks with ``checkpoint = True`` recompute their activations in the backward pass
(``torch.utils.checkpoint``, non-reentrant) to trade compute for memory.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0, shift: float = 0.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) times (Vaswani et al. 2017, Section 3.5; Ho et al. 2020).

    With ``half = dim // 2`` and frequencies ``w_i = max_period ** (-i / (half - shift))`` for
    ``i < half``, returns ``[cos(t * w_0), ..., cos(t * w_{half-1}), sin(t * w_0), ..., sin(t * w_{half-1})]``
    (ADM's ordering), plus one zero column when ``dim`` is odd. ``t`` is a (B,) tensor; the result
    is (B, dim) float32. ``shift`` is diffusers' ``downscale_freq_shift`` (0 in ADM and DiT; 1 in
    diffusers' port of DiT, ``CombinedTimestepLabelEmbeddings``).
    """
    half = dim // 2
    w = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - shift))
    args = t.float()[:, None] * w[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def group_norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= ``groups`` that divides ``channels`` (so tiny models work)."""
    g = max(d for d in range(1, min(groups, channels) + 1) if channels % d == 0)
    return nn.GroupNorm(g, channels)


def zero_(module: nn.Module) -> nn.Module:
    """Zero a module's parameters in place (ADM's ``zero_module``): a residual branch starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def _maybe_checkpoint(enabled: bool, fn, *args):
    """Run ``fn(*args)``, recomputing it in the backward pass when ``enabled`` and gradients are on."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def set_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Turn activation checkpointing on or off in every block of ``model`` that has a ``checkpoint`` flag."""
    for m in model.modules():
        if hasattr(m, "checkpoint"):
            m.checkpoint = enabled


class TimestepMLP(nn.Module):
    """Linear-SiLU-Linear on the sinusoidal embedding (Ho et al. 2020; ADM's ``time_embed``)."""

    def __init__(self, in_dim: int, emb_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.net(emb)


class ResBlock(nn.Module):
    """Residual block conditioned on an embedding by scale and shift (ADM, "use_scale_shift_norm"; FiLM).

    ``h = conv(silu(norm(x)))``; ``scale, shift = linear(silu(emb))``;
    ``h = norm(h) * (1 + scale) + shift``; ``h = zero_conv(dropout(silu(h)))``; returns ``skip(x) + h``,
    where ``skip`` is a 1x1 conv when the channel count changes.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, dropout: float = 0.0, groups: int = 32):
        super().__init__()
        self.in_layers = nn.Sequential(group_norm(in_channels, groups), nn.SiLU(), nn.Conv2d(in_channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * out_channels))
        self.out_norm = group_norm(out_channels, groups)
        self.out_layers = nn.Sequential(nn.SiLU(), nn.Dropout(dropout), zero_(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)
        self.checkpoint = False

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return _maybe_checkpoint(self.checkpoint, self._forward, x, emb)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        scale, shift = self.emb_layers(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.out_norm(h) * (1 + scale) + shift
        return self.skip(x) + self.out_layers(h)


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, N, C) -> (B, heads, N, C / heads)."""
    b, n, c = x.shape
    return x.reshape(b, n, num_heads, c // num_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, N, D) -> (B, N, heads * D)."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H*W pixels, with a residual (DDPM at 16x16; ADM multi-head).

    ``x + proj(attention(q, k, v))`` with ``q, k, v = qkv(norm(x))``; ``proj`` starts at zero.
    """

    def __init__(self, channels: int, num_heads: int = 4, groups: int = 32):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide the channel count {channels}")
        self.num_heads = num_heads
        self.norm = group_norm(channels, groups)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = zero_(nn.Linear(channels, channels))
        self.checkpoint = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _maybe_checkpoint(self.checkpoint, self._forward, x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = (split_heads(z, self.num_heads) for z in self.qkv(tokens).chunk(3, dim=-1))
        out = self.proj(merge_heads(F.scaled_dot_product_attention(q, k, v)))
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class CrossAttention(nn.Module):
    """Multi-head cross-attention from pixels to a context sequence (Rombach et al. 2022, Section 3.3).

    Queries come from ``norm(x)``'s H*W tokens; keys and values from ``context`` (B, L, context_dim).
    ``mask`` (B, L) bool marks the real context tokens (True = attend); padded tokens get no
    weight. A sample with no real token gets no update (its attention output is zeroed), the same
    as running without context. The output projection starts at zero.
    """

    def __init__(self, channels: int, context_dim: int, num_heads: int = 4, groups: int = 32):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide the channel count {channels}")
        self.num_heads = num_heads
        self.norm = group_norm(channels, groups)
        self.q = nn.Linear(channels, channels)
        self.kv = nn.Linear(context_dim, 2 * channels)
        self.proj = zero_(nn.Linear(channels, channels))
        self.checkpoint = False

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return _maybe_checkpoint(self.checkpoint, self._forward, x, context, mask)

    def _forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, c, h, w = x.shape
        q = split_heads(self.q(self.norm(x).flatten(2).transpose(1, 2)), self.num_heads)
        k, v = (split_heads(z, self.num_heads) for z in self.kv(context.to(q.dtype)).chunk(2, dim=-1))
        attn_mask = keep = None
        if mask is not None:
            keep = mask.any(dim=1)  # (B,): samples with at least one real token
            # a fully masked row would give NaN: let it attend everywhere, then zero its output
            attn_mask = (mask | ~keep[:, None])[:, None, None, :]
        out = self.proj(merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)))
        if keep is not None:
            out = out * keep[:, None, None].to(out.dtype)
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 conv (DDPM; ADM with ``conv_resample``). ``asymmetric``:
    pad (0, 1, 0, 1) (right and bottom) and convolve unpadded instead (LDM's VAE ``Downsample``)."""

    def __init__(self, channels: int, asymmetric: bool = False):
        super().__init__()
        self.asymmetric = asymmetric
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if asymmetric else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.asymmetric else x)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour x2, then a 3x3 conv (DDPM; ADM with ``conv_resample``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def tracing() -> bool:
    """True under torch.compile or CUDA-graph capture, where a value check would break the graph."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def check_mono(x: torch.Tensor, channels: int, net: str) -> None:
    """A clear error unless ``x`` is (B, channels, L) audio (``channels`` 1: mono), naming stereo input."""
    if x.ndim != 3 or x.shape[1] != channels:
        what = f"{x.shape[1]} channels (stereo?)" if x.ndim == 3 and x.shape[1] == 2 else f"shape {tuple(x.shape)}"
        raise ValueError(f"{net} takes mono audio (B, {channels}, L), got {what}: "
                         "mix the channels down first, e.g. wave.mean(1, keepdim=True)")


def check_class_labels(class_labels, batch: int, num_classes: int | None, net: str = "network") -> None:
    """Clear errors for integer (B,) ``class_labels`` in [0, num_classes] (num_classes = the null
    class); labels given to an unconditional ``net`` (``num_classes`` None) are an error too."""
    if class_labels is None:
        return
    if num_classes is None:
        raise ValueError(f"class_labels given, but this {net} is unconditional (config.num_classes is None)")
    if class_labels.shape != (batch,) or class_labels.dtype.is_floating_point or class_labels.dtype == torch.bool:
        raise ValueError(f"class_labels must be an integer (B,) = ({batch},) tensor, got {class_labels.dtype} of shape {tuple(class_labels.shape)}")
    # reading the values syncs with the device: skipped while compiling or capturing a CUDA graph
    if batch and not tracing() and (int(class_labels.min()) < 0 or int(class_labels.max()) > num_classes):
        raise ValueError(
            f"class_labels must be in [0, {num_classes}] ({num_classes} = the null class), "
            f"got values in [{int(class_labels.min())}, {int(class_labels.max())}]"
        )


def at_site(temporal, prefix: str):
    """The per-block form of a network's ``temporal(h, site)`` seam: ``(h, k) -> temporal(h,
    f"{prefix}_{k}")``, or None when ``temporal`` is None (the video networks' hook, see
    :class:`difflab.nn.motion.MotionUNet`)."""
    if temporal is None:
        return None
    return lambda h, k: temporal(h, f"{prefix}_{k}")


def check_context(context, context_mask, batch: int, context_dim: int, dim_name: str = "context_dim") -> None:
    """Clear errors for a cross-attention context (B, L, context_dim) and its bool (B, L) mask."""
    if context is not None and (context.ndim != 3 or context.shape[0] != batch or context.shape[2] != context_dim):
        raise ValueError(f"context must be (B, L, {dim_name}) = ({batch}, L, {context_dim}), got shape {tuple(context.shape)}")
    if context_mask is not None:
        if context is None:
            raise ValueError("context_mask given without context")
        if context_mask.dtype != torch.bool or context_mask.shape != context.shape[:2]:
            raise ValueError(f"context_mask must be a bool (B, L) = {tuple(context.shape[:2])} tensor, "
                             f"got {context_mask.dtype} of shape {tuple(context_mask.shape)}")
