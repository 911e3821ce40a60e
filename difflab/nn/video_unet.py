"""A factorized space-time U-Net for video (Ho et al. 2022, "Video Diffusion Models", Section 3).

The ADM U-Net of :mod:`difflab.nn.unet` run on every frame, with temporal attention added: each
2-D layer (ResBlock with its 3x3 convs, GroupNorm, spatial self-attention, down/upsampling) sees a
clip's frames as a batch of images, and after the spatial layers of a level in
``temporal_levels`` a :class:`TemporalAttention` lets each pixel attend to the same pixel in the
other frames, with a learned relative position bias per head (Ho et al. use relative position
embeddings so that the network needs no absolute frame index).

``net(x_in, t, class_labels=, direction_labels=, independent_frames=, context=, context_mask=)``
with ``x_in`` (B, C, F, H, W). Time, class and direction embeddings are summed and condition
every ResBlock (labels ``num_classes`` / ``num_directions`` are the null tokens of classifier-free
guidance). ``independent_frames`` (a bool, or a (B,) bool tensor) masks temporal attention so
each frame attends only to itself: the frames of those samples are then independent images
(joint image-and-video training, Ho et al. 2022, Section 3.2). At F = 1 temporal attention is
that same mask.

F may be anything up to ``max_frames``, the range of the relative positions; above it is an error.

``frame_embedding`` (difflab's, off by default) adds a learned embedding of each frame's index to
that frame's conditioning (zero at start), so the per-frame layers know where in the clip they
are: the relative bias alone leaves a network nearly equivariant to shifts in time, and a clip
whose digit moves left from the right edge differs from its time reversal only in *which* frame
is first. Frames marked independent, and a lone frame (F = 1), get none: they stay the image
network, and a clip marked independent is that network run on each frame alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, JSONConfig
from .layers import (CrossAttention, Downsample, ResBlock, SelfAttention, TimestepMLP, Upsample, _maybe_checkpoint,
                     check_class_labels, check_context, group_norm, merge_heads, set_checkpointing, split_heads,
                     timestep_embedding, tracing, zero_)


@dataclass(frozen=True)
class VideoUNetConfig(JSONConfig):
    """Everything that shapes a VideoUNet (the fields of :class:`~difflab.nn.unet.UNetConfig` plus
    the temporal ones); JSON-safe for checkpoints."""

    in_channels: int = 1
    out_channels: int | None = None
    model_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2)  # level i at H / 2**i
    num_res_blocks: int = 1
    attention_levels: tuple[int, ...] = (2,)  # levels with spatial self-attention
    temporal_levels: tuple[int, ...] = (1, 2)  # levels with temporal attention (the middle always has it)
    num_heads: int = 4
    max_frames: int = 8  # the most frames the relative position bias covers
    dropout: float = 0.0
    num_classes: int | None = None  # label num_classes is the null class
    num_directions: int | None = None  # label num_directions is the null direction
    context_dim: int | None = None  # cross-attention to text tokens at the spatial attention levels
    sample_size: int = 24  # the frames' height and width at training
    patch_size: int = 1  # > 1: frames enter as p x p patches (pixel unshuffle) and leave by pixel shuffle (DiT's patchify)
    groups: int = 32
    gradient_checkpointing: bool = False
    frame_embedding: bool = False  # a learned embedding of the frame index in each frame's conditioning (absolute time)

    def __post_init__(self):
        for name in ("channel_mult", "attention_levels", "temporal_levels"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        def count(v, least=1):
            return isinstance(v, int) and not isinstance(v, bool) and v >= least
        bad = [f"{k}={getattr(self, k)!r}" for k in ("in_channels", "model_channels", "num_heads", "groups", "max_frames",
                                                      "sample_size", "patch_size") if not count(getattr(self, k))]
        bad += [] if count(self.num_res_blocks, 0) else [f"num_res_blocks={self.num_res_blocks!r}"]
        bad += [] if self.channel_mult and all(count(m) for m in self.channel_mult) else [f"channel_mult={self.channel_mult}"]
        bad += [f"{k}={getattr(self, k)!r}" for k in ("out_channels", "num_classes", "num_directions", "context_dim")
                if getattr(self, k) is not None and not count(getattr(self, k))]
        if bad:
            raise ConfigError(f"VideoUNetConfig sizes must be positive integers: {', '.join(bad)}")
        if not isinstance(self.frame_embedding, bool):
            raise ConfigError(f"VideoUNetConfig frame_embedding={self.frame_embedding!r} must be a bool")
        for name in ("attention_levels", "temporal_levels"):
            wrong = [i for i in getattr(self, name) if not 0 <= i < len(self.channel_mult)]
            if wrong:
                raise ConfigError(f"{name} {wrong} are not levels of channel_mult (valid: 0..{len(self.channel_mult) - 1})")

    @property
    def null_class(self) -> int | None:
        return self.num_classes

    @property
    def null_direction(self) -> int | None:
        return self.num_directions

    @property
    def downsample_factor(self) -> int:
        return self.patch_size * 2 ** (len(self.channel_mult) - 1)


def relative_positions(frames: int, max_frames: int, device=None) -> torch.Tensor:
    """(F, F) long: ``j - i + max_frames - 1``, the bias index of query frame i and key frame j."""
    idx = torch.arange(frames, device=device)
    return idx[None, :] - idx[:, None] + max_frames - 1


class TemporalAttention(nn.Module):
    """Multi-head self-attention across frames at every pixel, with a residual and a learned
    relative position bias b[head, j - i] (Ho et al. 2022, Section 3; the bias form of Shaw et al.
    2018 / Raffel et al. 2020). ``x + proj(attention(q, k, v))`` on the (B, H, W) sequences of F
    tokens of ``norm(x)``, normalized per frame; ``proj`` starts at zero, so a new layer is the
    identity. ``independent`` (B,) bool: those samples attend only frame i -> frame i."""

    def __init__(self, channels: int, num_heads: int, max_frames: int, groups: int = 32):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide the channel count {channels}")
        self.num_heads, self.max_frames = num_heads, max_frames
        self.norm = group_norm(channels, groups)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = zero_(nn.Linear(channels, channels))
        self.rel_bias = nn.Parameter(torch.zeros(num_heads, 2 * max_frames - 1))
        self.checkpoint = False

    def forward(self, x: torch.Tensor, frames: int, independent: torch.Tensor | None = None) -> torch.Tensor:
        return _maybe_checkpoint(self.checkpoint, self._forward, x, frames, independent)

    def _forward(self, x, frames, independent):
        bf, c, h, w = x.shape
        b = bf // frames
        # (B*F, C, H, W) -> (B*H*W, F, C): one sequence of F tokens per pixel
        tokens = self.norm(x).reshape(b, frames, c, h * w).permute(0, 3, 1, 2).reshape(b * h * w, frames, c)
        q, k, v = (split_heads(z, self.num_heads).unflatten(0, (b, h * w)) for z in self.qkv(tokens).chunk(3, dim=-1))
        bias = self.rel_bias[:, relative_positions(frames, self.max_frames, x.device)].to(q.dtype)  # (heads, F, F)
        bias = bias.expand(b, 1, -1, -1, -1)  # (B, 1, heads, F, F): broadcast over the pixels
        if independent is not None:
            eye = torch.eye(frames, dtype=torch.bool, device=x.device)
            allowed = eye | ~independent.reshape(b, 1, 1, 1, 1)
            bias = bias.masked_fill(~allowed, float("-inf"))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, HW, heads, F, D)
        out = self.proj(merge_heads(out.flatten(0, 1)))  # (B*HW, F, C)
        return x + out.reshape(b, h * w, frames, c).permute(0, 2, 3, 1).reshape(bf, c, h, w)


class VideoBlock(nn.ModuleList):
    """Layers run in order on (B*F, C, H, W), each given what it takes."""

    def forward(self, h, emb, frames, independent, context=None, context_mask=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                h = layer(h, emb)
            elif isinstance(layer, TemporalAttention):
                h = layer(h, frames, independent)
            elif isinstance(layer, CrossAttention):
                if context is not None:
                    h = layer(h, context, context_mask)
            else:
                h = layer(h)
        return h


class VideoUNet(nn.Module):
    """The factorized space-time U-Net; see the module docstring."""

    def __init__(self, config: VideoUNetConfig):
        super().__init__()
        self.config = c = config
        emb_dim = 4 * c.model_channels

        def attention(ch, level):
            layers = []
            if level in c.attention_levels:
                layers.append(SelfAttention(ch, c.num_heads, c.groups))
                if c.context_dim is not None:
                    layers.append(CrossAttention(ch, c.context_dim, c.num_heads, c.groups))
            if level in c.temporal_levels:
                layers.append(TemporalAttention(ch, c.num_heads, c.max_frames, c.groups))
            return layers

        self.time_embed = TimestepMLP(c.model_channels, emb_dim)
        self.label_embed = nn.Embedding(c.num_classes + 1, emb_dim) if c.num_classes is not None else None
        self.direction_embed = nn.Embedding(c.num_directions + 1, emb_dim) if c.num_directions is not None else None
        self.frame_embed = zero_(nn.Embedding(c.max_frames, emb_dim)) if c.frame_embedding else None

        ch = c.model_channels * c.channel_mult[0]
        p2 = c.patch_size ** 2
        self.input_conv = nn.Conv2d(c.in_channels * p2, ch, 3, padding=1)
        skip_channels = [ch]
        self.down = nn.ModuleList()
        last = len(c.channel_mult) - 1
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                self.down.append(VideoBlock([ResBlock(ch, c.model_channels * mult, emb_dim, c.dropout, c.groups),
                                             *attention(c.model_channels * mult, level)]))
                ch = c.model_channels * mult
                skip_channels.append(ch)
            if level != last:
                self.down.append(VideoBlock([Downsample(ch)]))
                skip_channels.append(ch)

        middle_attention = [SelfAttention(ch, c.num_heads, c.groups)]
        if c.context_dim is not None:
            middle_attention.append(CrossAttention(ch, c.context_dim, c.num_heads, c.groups))
        self.middle = VideoBlock([ResBlock(ch, ch, emb_dim, c.dropout, c.groups), *middle_attention,
                                  TemporalAttention(ch, c.num_heads, c.max_frames, c.groups),
                                  ResBlock(ch, ch, emb_dim, c.dropout, c.groups)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for i in range(c.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), c.model_channels * mult, emb_dim, c.dropout, c.groups)]
                ch = c.model_channels * mult
                layers += attention(ch, level)
                if level != 0 and i == c.num_res_blocks:
                    layers.append(Upsample(ch))
                self.up.append(VideoBlock(layers))

        self.out = nn.Sequential(group_norm(ch, c.groups), nn.SiLU(), zero_(nn.Conv2d(ch, (c.out_channels or c.in_channels) * p2, 3, padding=1)))
        set_checkpointing(self, c.gradient_checkpointing)

    @property
    def null_class(self) -> int | None:
        return self.config.null_class

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None,
                direction_labels: torch.Tensor | None = None, independent_frames=None,
                context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Predict from ``x`` (B, C, F, H, W) at times ``t`` (B,) float (a scalar is broadcast).

        ``class_labels`` / ``direction_labels``: (B,) long, the null token when missing;
        ``independent_frames``: bool or (B,) bool, True = the frames are separate images;
        ``context`` (B, L, context_dim) and ``context_mask`` (B, L) bool: text tokens."""
        # 1. Check inputs
        c = self.config
        t, independent = self._check_inputs(x, t, class_labels, direction_labels, independent_frames, context, context_mask)
        b, _, frames, h, w = x.shape

        # 2. Embed time, class and direction (one embedding per clip, shared by its frames)
        emb = self.time_embed(timestep_embedding(t, c.model_channels).to(self.input_conv.weight.dtype))
        for table, labels, null in ((self.label_embed, class_labels, c.null_class),
                                    (self.direction_embed, direction_labels, c.null_direction)):
            if table is not None:
                labels = torch.full((b,), null, dtype=torch.long, device=x.device) if labels is None else labels
                emb = emb + table(labels)
        emb = emb.repeat_interleave(frames, dim=0)
        if self.frame_embed is not None and frames > 1:  # the frame's index, row b * F + f; none for independent or lone frames
            index = self.frame_embed(torch.arange(frames, device=x.device)).repeat(b, 1)
            emb = emb + (index if independent is None else index * (~independent).repeat_interleave(frames)[:, None].to(index.dtype))
        if context is not None:
            context = context.repeat_interleave(frames, dim=0)
            context_mask = None if context_mask is None else context_mask.repeat_interleave(frames, dim=0)

        # 3. Frames into the batch: (B, C, F, H, W) -> (B*F, C, H, W)
        hid = self.input_conv(F.pixel_unshuffle(x.transpose(1, 2).reshape(b * frames, -1, h, w), c.patch_size))
        skips = [hid]
        for block in self.down:
            hid = block(hid, emb, frames, independent, context, context_mask)
            skips.append(hid)
        hid = self.middle(hid, emb, frames, independent, context, context_mask)
        for block in self.up:
            hid = block(torch.cat([hid, skips.pop()], dim=1), emb, frames, independent, context, context_mask)
        out = F.pixel_shuffle(self.out(hid), c.patch_size)

        # 4. Back to (B, C, F, H, W)
        return out.reshape(b, frames, -1, h, w).transpose(1, 2)

    def _check_inputs(self, x, t, class_labels, direction_labels, independent_frames, context, context_mask):
        """Raise a ValueError naming the bad argument; return (t (B,), independent (B,) bool or None)."""
        c = self.config
        if x.ndim != 5 or x.shape[1] != c.in_channels:
            hint = " (a batch of images? add a frames axis: x.unsqueeze(2) gives F = 1)" if x.ndim == 4 else ""
            raise ValueError(f"x must be a video (B, {c.in_channels}, F, H, W), got shape {tuple(x.shape)}{hint}")
        b, _, frames, h, w = x.shape
        if frames > c.max_frames:
            raise ValueError(f"x has {frames} frames, more than this network's max_frames={c.max_frames} (the range of "
                             f"its relative positions); sample at most {c.max_frames} frames, or extend a clip in pieces")
        f = c.downsample_factor
        if h % f or w % f:
            raise ValueError(f"x's height and width must be divisible by {f} (patch_size * 2 ** (len(channel_mult) - 1)), got {h}x{w}")
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(b) if t.ndim == 0 else t
        if t.shape != (b,):
            raise ValueError(f"t must be a (B,) = ({b},) tensor, got shape {tuple(t.shape)}")
        check_class_labels(class_labels, b, c.num_classes, "VideoUNet")
        if direction_labels is not None:
            if c.num_directions is None:
                raise ValueError("direction_labels given, but this VideoUNet has no directions (config.num_directions is None)")
            d = direction_labels
            if d.shape != (b,) or d.dtype.is_floating_point or d.dtype == torch.bool or (
                    b and not tracing() and (int(d.min()) < 0 or int(d.max()) > c.num_directions)):
                raise ValueError(f"direction_labels must be an integer (B,) = ({b},) tensor in [0, {c.num_directions}] "
                                 f"({c.num_directions} = the null direction), got {d.dtype} of shape {tuple(d.shape)}")
        if c.context_dim is None and context is not None:
            raise ValueError("context given, but this VideoUNet has no cross-attention (config.context_dim is None)")
        check_context(context, context_mask, b, c.context_dim)
        independent = None
        if independent_frames is not None:
            independent = torch.as_tensor(independent_frames, device=x.device)
            if independent.dtype != torch.bool or independent.shape not in ((), (b,)):
                raise ValueError(f"independent_frames must be a bool or a (B,) = ({b},) bool tensor, got "
                                 f"{independent.dtype} of shape {tuple(independent.shape)}")
            independent = independent.expand(b)
        return t, independent


PRESETS = {
    # smoke tests: two levels, one temporal level
    "tiny": VideoUNetConfig(model_channels=8, channel_mult=(1, 2), attention_levels=(1,), temporal_levels=(1,),
                            num_heads=2, max_frames=8, sample_size=8, num_classes=10, num_directions=4),
    # moving digits: 24x24 frames, 24 -> 12 -> 6
    "moving_digits": VideoUNetConfig(model_channels=32, channel_mult=(1, 2, 2), attention_levels=(2,),
                                     temporal_levels=(1, 2), num_heads=4, max_frames=8, sample_size=24,
                                     num_classes=10, num_directions=4),
}

__all__ = ["VideoUNet", "VideoUNetConfig", "TemporalAttention", "relative_positions", "PRESETS"]
