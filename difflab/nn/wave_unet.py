"""A 1-D U-Net on raw waveforms with strided down- and up-sampling, as in CRASH (Rouard & Hadjeres
2021, raw-audio drum synthesis with a 1-D U-Net) and Mousai (Schneider et al. 2023, Section 3.2).

A network, not a denoiser: ``net(x_in, t, class_labels=None)`` maps a (B, 1, L) mono waveform at
network scale and a (B,) float time to the raw prediction, shaped like ``x_in``. Unlike DiffWave
(:mod:`difflab.nn.diffwave`), whose dilated convolutions see a fixed window at the full sample
rate, the coarse levels here see the whole clip (4,032 samples / 64 = 63 positions with the
default factors), so a pitch, a rhythm or a decay can be committed to once for the whole clip.

Layout, for ``channel_mult = (m_0, ..., m_n)`` and ``factors = (f_1, ..., f_n)``: level ``i``
works at length L / (f_1 ... f_i) with ``model_channels * m_i`` channels.

- a kernel-7 conv lifts the waveform to level 0's width;
- the diffusion-step embedding (sinusoidal, then Linear-SiLU-Linear; plus a class embedding when
  ``num_classes`` is set, row ``num_classes`` being the null class of classifier-free guidance)
  scales and shifts every residual block (ADM's scale-shift norm, FiLM);
- down: per level ``num_res_blocks`` residual blocks (GroupNorm-SiLU-conv, scale-shift,
  GroupNorm-SiLU-conv, plus the input), then a strided conv of kernel 2f and stride f (not after
  the last level);
- middle: residual block, self-attention over the coarsest positions when ``attention``, residual block;
- up: per level, deepest first, the level's skip concatenated, ``num_res_blocks`` residual
  blocks, then a transposed conv of kernel 2f and stride f (not after level 0);
- out: GroupNorm-SiLU and a zero-initialised kernel-``kernel_size`` conv (an untrained net outputs 0).

``class_prior``, ``n_fft`` and ``hop`` mean what they mean for DiffWave: the buffer
``class_gain`` (num_classes + 1, n_fft // 2 + 1, 1 + sample_length // hop) holds each class's
root-mean-square STFT magnitude, set from data (:func:`difflab.pipelines.audio.class_prior_gain`),
and the pipelines whiten the training clips by it and colour the samples (PriorGrad's prior at the
class level, Lee et al. 2022). The config records ``sample_rate`` and ``sample_length``; a clip
whose length is not a multiple of the total downsampling factor, or with more than one channel,
is a ValueError naming the shape.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..config import JSONConfig
from .layers import SelfAttention, TimestepMLP, check_class_labels, check_mono, group_norm, timestep_embedding, zero_


@dataclass(frozen=True)
class WaveUNetConfig(JSONConfig):
    """Everything that shapes a WaveUNet; JSON-safe for checkpoints."""

    in_channels: int = 1            # mono
    out_channels: int | None = None  # None = in_channels
    model_channels: int = 16        # width of level 0
    channel_mult: tuple[int, ...] = (1, 2, 4, 8)
    factors: tuple[int, ...] = (4, 4, 4)  # the stride between level i and i + 1; one fewer than channel_mult
    num_res_blocks: int = 1
    kernel_size: int = 5
    attention: bool = True          # self-attention in the middle (the coarsest level)
    num_heads: int = 4
    groups: int = 8                 # GroupNorm groups (lowered to a divisor of the width where needed)
    gated: bool = False             # residual blocks with DiffWave's gated unit tanh(a) * sigmoid(b) after the first conv
    num_classes: int | None = None  # class-conditional when set; label num_classes is the null class
    sample_rate: int = 8000         # the rate the model was trained at (Hz)
    sample_length: int = 4032       # the clip length it was trained at (samples): one sample's shape
    class_prior: bool = False       # class-conditional: diffuses clips filtered by 1 / its class's mean STFT magnitude
    n_fft: int = 256                # STFT size of the class prior's filter
    hop: int = 64                   # its hop

    def __post_init__(self):
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        object.__setattr__(self, "factors", tuple(self.factors))

        def count(v):
            return isinstance(v, int) and not isinstance(v, bool) and v >= 1
        names = ("in_channels", "model_channels", "num_res_blocks", "kernel_size", "num_heads", "groups", "sample_rate",
                 "sample_length", "n_fft", "hop")
        bad = [f"{k}={getattr(self, k)!r}" for k in names if not count(getattr(self, k))]
        bad += [f"{k}={getattr(self, k)!r}" for k in ("out_channels", "num_classes")
                if getattr(self, k) is not None and not count(getattr(self, k))]
        bad += [] if self.channel_mult and all(count(m) for m in self.channel_mult) else [f"channel_mult={self.channel_mult}"]
        bad += [] if all(count(f) and f >= 2 for f in self.factors) else [f"factors={self.factors}"]
        if bad:
            raise ValueError(f"WaveUNetConfig sizes must be positive integers (factors >= 2): {', '.join(bad)}")
        if len(self.factors) != len(self.channel_mult) - 1:
            raise ValueError(f"WaveUNetConfig needs one factor between each pair of levels: {len(self.channel_mult)} "
                             f"levels (channel_mult={self.channel_mult}) take {len(self.channel_mult) - 1}, got {self.factors}")
        if self.kernel_size % 2 == 0:
            raise ValueError(f"WaveUNetConfig kernel_size={self.kernel_size} must be odd (same-length convolutions)")
        if self.sample_length % self.downsample_factor:
            raise ValueError(f"WaveUNetConfig sample_length={self.sample_length} must be a multiple of "
                             f"{self.downsample_factor} (the product of factors={self.factors})")
        if self.attention and (self.model_channels * self.channel_mult[-1]) % self.num_heads:
            raise ValueError(f"WaveUNetConfig num_heads={self.num_heads} must divide the coarsest width "
                             f"{self.model_channels * self.channel_mult[-1]}")
        if self.class_prior and self.num_classes is None:
            raise ValueError("WaveUNetConfig.class_prior=True needs a class-conditional network (num_classes set)")

    @property
    def downsample_factor(self) -> int:
        return math.prod(self.factors)

    @property
    def null_class(self) -> int | None:
        return self.num_classes

    @property
    def n_mels(self) -> None:
        """Never a vocoder (the audio pipelines ask)."""
        return None


class WaveResBlock(nn.Module):
    """GroupNorm-SiLU-conv, scale and shift from the embedding, GroupNorm-SiLU-conv (zero-initialised),
    plus the input (a 1x1 conv when the width changes): ADM's residual block in 1-D. ``gated``: the
    first conv doubles its width and tanh(a) * sigmoid(b) replaces the second SiLU (DiffWave's unit)."""

    def __init__(self, cin: int, cout: int, emb_dim: int, kernel: int, groups: int, gated: bool = False):
        super().__init__()
        width = 2 * cout if gated else cout
        self.in_layers = nn.Sequential(group_norm(cin, groups), nn.SiLU(), nn.Conv1d(cin, width, kernel, padding=kernel // 2))
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * width))
        self.out_norm = group_norm(width, groups)
        self.gated = gated
        self.out_layers = nn.Sequential(nn.SiLU(), zero_(nn.Conv1d(cout, cout, kernel, padding=kernel // 2)))
        self.skip = nn.Identity() if cin == cout else nn.Conv1d(cin, cout, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.emb(emb)[:, :, None].chunk(2, dim=1)
        h = self.out_norm(self.in_layers(x)) * (1 + scale) + shift
        if self.gated:  # DiffWave's gated unit (Kong et al. 2021, Figure 2): a multiplicative, input-dependent filter
            a, b = h.chunk(2, dim=1)
            return self.skip(x) + self.out_layers[1](torch.tanh(a) * torch.sigmoid(b))
        return self.skip(x) + self.out_layers(h)


class WaveUNet(nn.Module):
    """The 1-D waveform U-Net; see the module docstring."""

    def __init__(self, config: WaveUNetConfig = WaveUNetConfig()):
        super().__init__()
        self.config = c = config
        k, g = c.kernel_size, c.groups
        widths = [c.model_channels * m for m in c.channel_mult]
        emb_dim = 4 * c.model_channels
        self.time_embed = TimestepMLP(128, emb_dim)
        self.label_embed = nn.Embedding(c.num_classes + 1, emb_dim) if c.num_classes is not None else None
        self.input = nn.Conv1d(c.in_channels, widths[0], 7, padding=3)
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        ch = widths[0]
        for i, w in enumerate(widths):
            self.down.append(nn.ModuleList(WaveResBlock(ch if j == 0 else w, w, emb_dim, k, g, c.gated) for j in range(c.num_res_blocks)))
            ch = w
            if i < len(c.factors):
                f = c.factors[i]
                self.downsample.append(nn.Conv1d(w, widths[i + 1], 2 * f, stride=f, padding=f // 2))
                ch = widths[i + 1]
        self.mid = nn.ModuleList([WaveResBlock(ch, ch, emb_dim, k, g, c.gated), WaveResBlock(ch, ch, emb_dim, k, g, c.gated)])
        self.attention = SelfAttention(ch, c.num_heads, g) if c.attention else None
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for i in reversed(range(len(widths))):
            w = widths[i]
            self.up.append(nn.ModuleList(WaveResBlock(ch + w if j == 0 else w, w, emb_dim, k, g, c.gated) for j in range(c.num_res_blocks)))
            ch = w
            if i > 0:
                f = c.factors[i - 1]
                self.upsample.append(nn.ConvTranspose1d(w, widths[i - 1], 2 * f, stride=f, padding=f // 2))
                ch = widths[i - 1]
        self.out = nn.Sequential(group_norm(ch, g), nn.SiLU(), zero_(nn.Conv1d(ch, c.out_channels or c.in_channels, k,
                                                                               padding=k // 2)))
        if c.class_prior:  # row k: class k's STFT magnitude envelope, row num_classes: all classes'; set from data
            self.register_buffer("class_gain", torch.ones(c.num_classes + 1, c.n_fft // 2 + 1, 1 + c.sample_length // c.hop))

    def check_inputs(self, x: torch.Tensor, class_labels) -> None:
        c = self.config
        check_mono(x, c.in_channels, "WaveUNet")
        if x.shape[-1] % c.downsample_factor or x.shape[-1] == 0:
            raise ValueError(f"WaveUNet needs a clip length that is a positive multiple of {c.downsample_factor} "
                             f"(the product of factors={c.factors}), got {x.shape[-1]} samples")
        check_class_labels(class_labels, x.shape[0], c.num_classes, "WaveUNet")

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        self.check_inputs(x, class_labels)
        t = torch.as_tensor(t, device=x.device).float().reshape(-1).expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(t, 128).to(x.dtype))
        if self.label_embed is not None:
            labels = class_labels if class_labels is not None else torch.full((x.shape[0],), self.config.num_classes,
                                                                               dtype=torch.long, device=x.device)
            emb = emb + self.label_embed(labels)
        h = self.input(x)
        skips = []
        for i, blocks in enumerate(self.down):
            for block in blocks:
                h = block(h, emb)
            skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
        h = self.mid[0](h, emb)
        if self.attention is not None:
            h = self.attention(h[..., None])[..., 0]
        h = self.mid[1](h, emb)
        for i, blocks in enumerate(self.up):
            h = torch.cat([h, skips.pop()], dim=1)
            for block in blocks:
                h = block(h, emb)
            if i < len(self.upsample):
                h = self.upsample[i](h)
        return self.out(h)


__all__ = ["WaveUNet", "WaveUNetConfig", "WaveResBlock"]
