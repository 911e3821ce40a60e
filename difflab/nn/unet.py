"""The ADM / DDPM U-Net (Ho et al. 2020, Appendix B; Dhariwal & Nichol 2021, Section 3).

A network, not a denoiser: ``net(x_in, t, class_labels=, context=, context_mask=)`` maps the
network-scale input and a (B,) float time to the raw prediction (eps, v, x0, ... whatever it is
trained for). It knows nothing of sigmas, frames or samplers; ``difflab.core.Denoiser`` wraps it.

Layout, for ``channel_mult = (m_0, ..., m_{n-1})``: level ``i`` works at resolution H / 2**i with
``model_channels * m_i`` channels.

- down: per level, ``num_res_blocks`` x (ResBlock [+ attention]), then a stride-2 conv (not after
  the last level); every output is kept as a skip connection;
- middle: ResBlock, attention, ResBlock;
- up: per level, deepest first, ``num_res_blocks + 1`` x (concatenate a skip, ResBlock
  [+ attention]), then nearest x2 + conv (not after level 0);
- out: GroupNorm, SiLU, zero-initialized 3x3 conv, so an untrained net outputs exactly 0.

"Attention" is self-attention, followed by cross-attention to ``context`` when ``context_dim`` is
set. Time and class embeddings are summed and condition every ResBlock by scale and shift.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import JSONConfig
from .layers import (CrossAttention, check_class_labels, check_context, Downsample, ResBlock, SelfAttention, TimestepMLP, Upsample, group_norm,
                     set_checkpointing, timestep_embedding, zero_)


@dataclass(frozen=True)
class UNetConfig(JSONConfig):
    """Everything that shapes a UNet; JSON-safe through ``to_dict`` / ``from_dict`` for checkpoints."""

    in_channels: int = 1  # channels of x
    out_channels: int | None = None  # channels of the prediction; None = in_channels
    model_channels: int = 64  # base width; level i has model_channels * channel_mult[i] channels
    channel_mult: tuple[int, ...] = (1, 2)  # one entry per resolution level; H, W halve between levels
    num_res_blocks: int = 2  # ResBlocks per level on the way down (one more on the way up)
    attention_levels: tuple[int, ...] = (1,)  # indices into channel_mult of the levels with attention (level i is at H / 2**i)
    num_heads: int = 4  # attention heads; must divide the channel count of every attention level
    dropout: float = 0.0  # dropout inside ResBlocks (DDPM's CIFAR-10 model: 0.1)
    num_classes: int | None = None  # class-conditional when set; label num_classes is the null class (CFG)
    context_dim: int | None = None  # width of the context tokens; adds cross-attention to every attention block
    groups: int = 32  # GroupNorm groups, lowered to a divisor of the channel count where needed
    gradient_checkpointing: bool = False  # recompute block activations in backward to save memory

    def __post_init__(self):
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        object.__setattr__(self, "attention_levels", tuple(self.attention_levels))
        if not self.channel_mult:
            raise ValueError("channel_mult must have at least one level")
        def count(v, least=1):
            return isinstance(v, int) and not isinstance(v, bool) and v >= least
        bad = [f"{k}={getattr(self, k)!r}" for k in ("in_channels", "model_channels", "num_heads", "groups")
               if not count(getattr(self, k))]
        bad += [] if self.out_channels is None or count(self.out_channels) else [f"out_channels={self.out_channels!r}"]
        bad += [] if all(count(m) for m in self.channel_mult) else [f"channel_mult={self.channel_mult}"]
        bad += [] if count(self.num_res_blocks, 0) else [f"num_res_blocks={self.num_res_blocks!r}"]
        if bad:
            raise ValueError(f"UNetConfig sizes must be positive integers (num_res_blocks >= 0): {', '.join(bad)}")
        bad = [i for i in self.attention_levels if not 0 <= i < len(self.channel_mult)]
        if bad:
            raise ValueError(f"attention_levels {bad} are not levels of channel_mult (valid: 0..{len(self.channel_mult) - 1})")
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"num_classes must be a positive int or None, got {self.num_classes}")

    @property
    def null_class(self) -> int | None:
        """The label of the unconditional ("null") class used for classifier-free guidance, or None."""
        return self.num_classes

    @property
    def downsample_factor(self) -> int:
        """H and W must be divisible by this: 2 ** (number of levels - 1)."""
        return 2 ** (len(self.channel_mult) - 1)



class Block(nn.ModuleList):
    """Layers run in order, each given what it takes (ADM's ``TimestepEmbedSequential``).

    Cross-attention is skipped when no context is given (the same as a fully masked context).
    ``temporal(h)``, when given, runs once: after the first ResBlock and the attention that
    follows it, before any later ResBlock or resampling layer (where AnimateDiff puts a motion
    module, Guo et al. 2023, Section 4.2).
    """

    def forward(self, h, emb, context=None, context_mask=None, temporal=None):
        seen_res = False
        for layer in self:
            if temporal is not None and seen_res and isinstance(layer, (ResBlock, Downsample, Upsample)):
                h, temporal = temporal(h), None
            seen_res = seen_res or isinstance(layer, ResBlock)
            if isinstance(layer, ResBlock):
                h = layer(h, emb)
            elif isinstance(layer, CrossAttention):
                if context is not None:
                    h = layer(h, context, context_mask)
            else:
                h = layer(h)
        return temporal(h) if temporal is not None and seen_res else h


class UNet(nn.Module):
    """The ADM / DDPM U-Net; see the module docstring for the layout."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = c = config
        emb_dim = 4 * c.model_channels  # DDPM and ADM: time embedding of 4x the base width

        def attention(ch):
            for_level = [SelfAttention(ch, c.num_heads, c.groups)]
            if c.context_dim is not None:
                for_level.append(CrossAttention(ch, c.context_dim, c.num_heads, c.groups))
            return for_level

        self.time_embed = TimestepMLP(c.model_channels, emb_dim)
        # one row per class plus the null class (row num_classes) for classifier-free guidance
        self.label_embed = nn.Embedding(c.num_classes + 1, emb_dim) if c.num_classes is not None else None

        ch = c.model_channels * c.channel_mult[0]
        self.input_conv = nn.Conv2d(c.in_channels, ch, 3, padding=1)
        skip_channels = [ch]
        self.down = nn.ModuleList()
        self._sites = {"down": [], "up": []}  # the temporal site of each block (None: a resampling block)
        for level, mult in enumerate(c.channel_mult):
            for k in range(c.num_res_blocks):
                self._sites["down"].append(f"down_{level}_{k}")
                layers = [ResBlock(ch, c.model_channels * mult, emb_dim, c.dropout, c.groups)]
                ch = c.model_channels * mult
                if level in c.attention_levels:
                    layers += attention(ch)
                self.down.append(Block(layers))
                skip_channels.append(ch)
            if level != len(c.channel_mult) - 1:
                self._sites["down"].append(None)
                self.down.append(Block([Downsample(ch)]))
                skip_channels.append(ch)

        self.middle = Block([ResBlock(ch, ch, emb_dim, c.dropout, c.groups), *attention(ch), ResBlock(ch, ch, emb_dim, c.dropout, c.groups)])

        self.up = nn.ModuleList()
        for j, (level, mult) in enumerate(reversed(list(enumerate(c.channel_mult)))):
            for i in range(c.num_res_blocks + 1):
                self._sites["up"].append(f"up_{j}_{i}")
                layers = [ResBlock(ch + skip_channels.pop(), c.model_channels * mult, emb_dim, c.dropout, c.groups)]
                ch = c.model_channels * mult
                if level in c.attention_levels:
                    layers += attention(ch)
                if level != 0 and i == c.num_res_blocks:
                    layers.append(Upsample(ch))
                self.up.append(Block(layers))

        self.out = nn.Sequential(group_norm(ch, c.groups), nn.SiLU(), zero_(nn.Conv2d(ch, c.out_channels or c.in_channels, 3, padding=1)))

        set_checkpointing(self, c.gradient_checkpointing)

    @property
    def null_class(self) -> int | None:
        """The null-class label (``config.num_classes``), or None for an unconditional net."""
        return self.config.null_class

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        temporal=None,
    ) -> torch.Tensor:
        """Predict from ``x`` (B, C, H, W) at times ``t`` (B,) float (a scalar is broadcast).

        ``class_labels``: LongTensor (B,) in [0, num_classes]; num_classes is the null class, and
        missing labels on a class-conditional net mean the null class for every sample.
        ``context``: (B, L, context_dim) tokens for cross-attention; ``context_mask``: (B, L) bool,
        True for real tokens. Missing context on a cross-attention net skips cross-attention.
        ``temporal``: the seam of video networks (:class:`difflab.nn.motion.MotionUNet`), a callable
        ``temporal(h, site) -> h`` run at the sites :meth:`temporal_sites` names; None changes nothing.
        """
        # 1. Check inputs
        c = self.config
        t = self._check_inputs(x, t, class_labels, context, context_mask)

        # 2. Embed time and class
        emb = self.time_embed(timestep_embedding(t, c.model_channels).to(self.input_conv.weight.dtype))
        if self.label_embed is not None:
            if class_labels is None:
                class_labels = torch.full((x.shape[0],), c.null_class, dtype=torch.long, device=x.device)
            emb = emb + self.label_embed(class_labels)

        # 3. Down, keeping every output as a skip
        h = self.input_conv(x)
        skips = [h]
        for block, site in zip(self.down, self._sites["down"]):
            h = block(h, emb, context, context_mask, _at(temporal, site))
            skips.append(h)

        # 4. Middle
        h = self.middle(h, emb, context, context_mask, _at(temporal, "mid_0"))

        # 5. Up, concatenating the skips in reverse order
        for block, site in zip(self.up, self._sites["up"]):
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context, context_mask, _at(temporal, site))

        # 6. Out
        return self.out(h)

    def temporal_sites(self) -> dict[str, tuple[int, int]]:
        """``{site: (channels, level)}`` where ``forward``'s ``temporal`` runs, in order: ``down_{i}_{k}``
        after the k-th ResBlock (+ attention) of level i, ``mid_0`` after the middle attention,
        ``up_{j}_{k}`` after the k-th of up level j (deepest first): the layout of
        :meth:`difflab.nn.UNetSD.temporal_sites`, so the same motion modules fit both."""
        c, n = self.config, len(self.config.channel_mult)
        width = [c.model_channels * m for m in c.channel_mult]
        sites = {s: (width[int(s.split("_")[1])], int(s.split("_")[1])) for s in self._sites["down"] if s is not None}
        sites["mid_0"] = (width[-1], n - 1)
        sites.update({s: (width[n - 1 - int(s.split("_")[1])], n - 1 - int(s.split("_")[1])) for s in self._sites["up"]})
        return sites

    def _check_inputs(self, x, t, class_labels, context, context_mask) -> torch.Tensor:
        """Raise a ValueError naming the bad argument; return ``t`` as a (B,) tensor."""
        c = self.config
        if x.ndim != 4 or x.shape[1] != c.in_channels:
            raise ValueError(f"x must be (B, {c.in_channels}, H, W), got shape {tuple(x.shape)}")
        b, _, h, w = x.shape
        f = c.downsample_factor
        if h % f or w % f:
            raise ValueError(f"x's height and width must be divisible by {f} (2 ** (len(channel_mult) - 1)), got {h}x{w}")
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(b)
        if t.shape != (b,):
            raise ValueError(f"t must be a (B,) = ({b},) tensor, got shape {tuple(t.shape)}")

        check_class_labels(class_labels, b, c.num_classes, "UNet")

        if c.context_dim is None and context is not None:
            raise ValueError("context given, but this UNet has no cross-attention (config.context_dim is None)")
        check_context(context, context_mask, b, c.context_dim)
        return t


def _at(temporal, site):
    """``h -> temporal(h, site)`` for a block's one temporal site (None: no seam, or no site)."""
    if temporal is None or site is None:
        return None
    return lambda h: temporal(h, site)


PRESETS = {
    # about 0.2 M parameters, for smoke tests
    "tiny": UNetConfig(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), num_heads=2),
    # the embedded 8x8 one-channel digits, class-conditional with a null class for CFG
    "digits": UNetConfig(in_channels=1, model_channels=32, channel_mult=(1, 2), num_res_blocks=2, attention_levels=(1,), num_heads=4, dropout=0.1, num_classes=10),
    # DDPM's CIFAR-10 model (Ho et al. 2020, Appendix B): 32x32, widths 128-256-256-256, one head of
    # attention at 16x16 (level 1), dropout 0.1; DDPM adds its time embedding instead of scale/shift
    "cifar10": UNetConfig(in_channels=3, model_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2, attention_levels=(1,), num_heads=1, dropout=0.1),
}

