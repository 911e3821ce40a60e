"""A 1-D temporal U-Net over sequences (B, horizon, channels): the denoiser of diffusion policies
(Chi et al. 2023, "Diffusion Policy", Section 3.2, the CNN-based policy) and of Diffuser's
trajectories (Janner et al. 2022, Section 3.1, the temporal U-Net).

A network, not a denoiser: ``net(x_in, t, obs=None)`` maps the network-scale sequence and a (B,)
float time to the raw prediction, shaped like ``x_in``. Convolutions run over time only, so the
horizon can be any multiple of ``2 ** (len(channel_mult) - 1)``.

Layout, for ``channel_mult = (m_0, ..., m_{n-1})``: level ``i`` works at horizon H / 2**i with
``model_channels * m_i`` channels.

- conditioning: the sinusoidal time embedding through an MLP, concatenated with the flattened
  observations ``obs`` (B, n_obs, obs_dim) when ``cond_dim`` > 0 (Chi et al.'s global
  conditioning); every residual block is modulated by it, FiLM (Perez et al. 2018):
  ``h = scale * h + shift`` after its first convolution;
- down: per level, two residual blocks, then a stride-2 convolution (not after the last level);
- middle: two residual blocks;
- up: per level, deepest first, concatenate the level's skip, two residual blocks, then a
  transposed stride-2 convolution (not after level 0);
- out: a convolution block and a zero-initialized 1x1 convolution (an untrained net outputs 0).

A residual block is Conv1d-GroupNorm-Mish, FiLM, Conv1d-GroupNorm-Mish, plus the input (a 1x1
convolution when the width changes).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import JSONConfig
from .layers import TimestepMLP, group_norm, timestep_embedding, zero_


@dataclass(frozen=True)
class TemporalUNetConfig(JSONConfig):
    """Everything that shapes a TemporalUNet; JSON-safe for checkpoints."""

    in_channels: int = 2           # channels per time step (action_dim; state_dim + action_dim for Diffuser)
    horizon: int = 16              # the sequence length it is trained on: one sample's shape is (horizon, in_channels)
    cond_dim: int = 0              # n_obs * obs_dim of the flattened observations; 0: unconditional
    model_channels: int = 64       # width of level 0
    channel_mult: tuple[int, ...] = (1, 2)
    kernel_size: int = 5
    time_dim: int = 64             # width of the time embedding
    groups: int = 8                # GroupNorm groups (lowered to a divisor of the width where needed)

    def __post_init__(self):
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        bad = [f"{k}={getattr(self, k)!r}" for k in ("in_channels", "horizon", "model_channels", "kernel_size", "time_dim", "groups")
               if not (isinstance(getattr(self, k), int) and getattr(self, k) >= 1)]
        bad += [] if isinstance(self.cond_dim, int) and self.cond_dim >= 0 else [f"cond_dim={self.cond_dim!r}"]
        bad += [] if self.channel_mult and all(isinstance(m, int) and m >= 1 for m in self.channel_mult) else \
            [f"channel_mult={self.channel_mult}"]
        if bad:
            raise ValueError(f"TemporalUNetConfig sizes must be positive integers (cond_dim >= 0): {', '.join(bad)}")
        if self.kernel_size % 2 == 0:
            raise ValueError(f"TemporalUNetConfig kernel_size={self.kernel_size} must be odd (same-length convolutions)")
        if self.horizon % self.downsample_factor:
            raise ValueError(f"TemporalUNetConfig horizon={self.horizon} must be a multiple of {self.downsample_factor} "
                             f"(2 ** (levels - 1) for channel_mult={self.channel_mult})")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


def conv_block(cin: int, cout: int, kernel: int, groups: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv1d(cin, cout, kernel, padding=kernel // 2), group_norm(cout, groups), nn.Mish())


class FiLMResBlock1D(nn.Module):
    """Two convolution blocks, the first modulated by FiLM from the conditioning vector
    (Chi et al. 2023, Section 3.2: "FiLM ... channel-wise scale and bias"), plus a residual path."""

    def __init__(self, cin: int, cout: int, emb_dim: int, kernel: int, groups: int):
        super().__init__()
        self.block1, self.block2 = conv_block(cin, cout, kernel, groups), conv_block(cout, cout, kernel, groups)
        self.film = nn.Sequential(nn.Mish(), nn.Linear(emb_dim, 2 * cout))
        self.skip = nn.Identity() if cin == cout else nn.Conv1d(cin, cout, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(emb)[:, :, None].chunk(2, dim=1)
        h = self.block1(x) * (1 + scale) + shift
        return self.block2(h) + self.skip(x)


class TemporalUNet(nn.Module):
    """The 1-D temporal U-Net of diffusion policies and Diffuser (see the module docstring)."""

    def __init__(self, config: TemporalUNetConfig = TemporalUNetConfig()):
        super().__init__()
        self.config = c = config
        self.time_embed = TimestepMLP(c.time_dim, c.time_dim)
        emb_dim = c.time_dim + c.cond_dim
        k, g = c.kernel_size, c.groups
        widths = [c.model_channels * m for m in c.channel_mult]
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        ch = c.in_channels
        for i, w in enumerate(widths):
            self.down.append(nn.ModuleList([FiLMResBlock1D(ch, w, emb_dim, k, g), FiLMResBlock1D(w, w, emb_dim, k, g)]))
            self.downsample.append(nn.Conv1d(w, w, 3, stride=2, padding=1) if i < len(widths) - 1 else nn.Identity())
            ch = w
        self.mid = nn.ModuleList([FiLMResBlock1D(ch, ch, emb_dim, k, g), FiLMResBlock1D(ch, ch, emb_dim, k, g)])
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for i in reversed(range(len(widths))):
            w = widths[i]
            self.up.append(nn.ModuleList([FiLMResBlock1D(ch + w, w, emb_dim, k, g), FiLMResBlock1D(w, w, emb_dim, k, g)]))
            self.upsample.append(nn.ConvTranspose1d(w, w, 4, stride=2, padding=1) if i > 0 else nn.Identity())
            ch = w
        self.out = nn.Sequential(conv_block(ch, ch, k, g), zero_(nn.Conv1d(ch, c.in_channels, 1)))

    def forward(self, x: torch.Tensor, t: torch.Tensor, obs: torch.Tensor | None = None) -> torch.Tensor:
        c = self.config
        if x.ndim != 3 or x.shape[2] != c.in_channels or x.shape[1] % c.downsample_factor:
            raise ValueError(f"TemporalUNet input must be (B, horizon, {c.in_channels}) with horizon a multiple of "
                             f"{c.downsample_factor}, got {tuple(x.shape)}")
        dtype = self.out[1].weight.dtype
        t = torch.as_tensor(t, device=x.device).float().reshape(-1).expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(t, c.time_dim).to(dtype))
        if c.cond_dim:
            if obs is None:
                raise ValueError(f"this TemporalUNet is conditioned: pass obs= (B, ...) with {c.cond_dim} values per sample")
            obs = obs.reshape(obs.shape[0], -1)
            if obs.shape != (x.shape[0], c.cond_dim):
                raise ValueError(f"obs must hold {c.cond_dim} values per sample for a batch of {x.shape[0]}, got {tuple(obs.shape)}")
            emb = torch.cat([emb, obs.to(dtype)], dim=1)
        elif obs is not None:
            raise ValueError("this TemporalUNet is unconditional (cond_dim=0): obs= is not taken")
        h = x.transpose(1, 2).to(dtype)
        skips = []
        for (b1, b2), down in zip(self.down, self.downsample):
            h = b2(b1(h, emb), emb)
            skips.append(h)
            h = down(h)
        for block in self.mid:
            h = block(h, emb)
        for (b1, b2), up in zip(self.up, self.upsample):
            h = torch.cat([h, skips.pop()], dim=1)
            h = up(b2(b1(h, emb), emb))
        return self.out(h).transpose(1, 2).to(x.dtype)


def sequence_shape(config: TemporalUNetConfig, meta: dict) -> tuple:
    """(horizon, in_channels): one sample of a denoiser around a TemporalUNet."""
    return (int(config.horizon), int(config.in_channels))


__all__ = ["TemporalUNet", "TemporalUNetConfig", "FiLMResBlock1D", "sequence_shape"]
