"""Motion modules: temporal transformers inserted into a pretrained image U-Net (AnimateDiff).

Guo et al. 2023, "AnimateDiff: Animate Your Personalized Text-to-Image Diffusion Models without
Specific Tuning", Section 4.2: a video batch ``(B, C, F, H, W)`` runs through the image network
with its frames folded into the batch (every spatial layer sees ``B * F`` images), and after each
ResnetBlock (+ its attention) a *motion module* attends across the F frames at every pixel::

    h + proj_out(blocks(proj_in(norm(h))))        # tokens: (B * H * W, F, C)

``norm`` is a GroupNorm over (C, F, H, W) of each clip, ``proj_in`` / ``proj_out`` linear maps on
the channels, and each of ``blocks`` a pre-norm transformer block of two temporal
self-attentions and a GEGLU feed-forward, with a sinusoidal encoding of the frame index
(Vaswani et al. 2017, Section 3.5) added to the normed tokens before each attention. ``proj_out``
starts at zero, so a freshly inserted module is the identity and the video network is the image
network frame by frame; only the motion modules train (:func:`freeze_spatial`).

Module and parameter names inside a motion module are diffusers' ``AnimateDiffTransformer3D``
(``norm``, ``proj_in``, ``transformer_blocks.{l}.{norm1, attn1, norm2, attn2, norm3, ff,
pos_embed.pe}``, ``proj_out``); where the modules sit is the image network's ``temporal`` seam
(:meth:`difflab.nn.UNetSD.temporal_sites`, :meth:`difflab.nn.UNet.temporal_sites`), so the same
modules fit the Stable Diffusion U-Net and the ADM U-Net. The key map to diffusers'
``UNetMotionModel`` / ``MotionAdapter`` is :mod:`difflab.io.keymaps.motion`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import ConfigError, JSONConfig
from .layers import TimestepMLP, _maybe_checkpoint, set_checkpointing, timestep_embedding
from .transformer import Attention, FeedForward
from .unet import UNet, UNetConfig
from .unet_sd import UNetSD, UNetSDConfig

# The image networks a MotionUNet can wrap: kind -> (class, config class). Each has a
# ``temporal`` seam in its forward and ``temporal_sites()``.
IMAGE_KINDS = {"unet_sd": (UNetSD, UNetSDConfig), "unet": (UNet, UNetConfig)}
TIME_FEATURES = 32  # width of the sinusoidal time features a noise-level-aware motion module reads (time_embedding=True)


def frame_encoding(max_frames: int, dim: int) -> torch.Tensor:
    """(1, max_frames, dim) sinusoidal encoding of the frame index f (Vaswani et al. 2017,
    Section 3.5): ``[sin(f w_0), cos(f w_0), sin(f w_1), ...]`` interleaved, ``w_i = 10000^(-2i/dim)``."""
    f = torch.arange(max_frames, dtype=torch.float32)[:, None]
    w = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(1, max_frames, dim)
    pe[0, :, 0::2] = torch.sin(f * w)
    pe[0, :, 1::2] = torch.cos(f * w)
    return pe


class FrameEncoding(nn.Module):
    """Adds :func:`frame_encoding` to (N, F, dim) tokens; a ValueError for F above ``max_frames``.
    ``pe`` is a buffer saved with the weights, as diffusers saves it."""

    def __init__(self, dim: int, max_frames: int):
        super().__init__()
        self.register_buffer("pe", frame_encoding(max_frames, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pe[:, :x.shape[1]].to(x.dtype)


class TemporalBlock(nn.Module):
    """Pre-norm transformer block over the frames (AnimateDiff's ``Temporal_Self`` x 2 + FF)::

        h = h + attn1(norm1(h) + pe)
        h = h + attn2(norm2(h) + pe)      # a second self-attention, not cross-attention
        h = h + ff(norm3(h))              # GEGLU (Shazeer 2020)
    """

    def __init__(self, dim: int, heads: int, max_frames: int):
        super().__init__()
        self.pos_embed = FrameEncoding(dim, max_frames)
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, None, heads, dim // heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, None, heads, dim // heads)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.attn1(self.pos_embed(self.norm1(h)))
        h = h + self.attn2(self.pos_embed(self.norm2(h)))
        return h + self.ff(self.norm3(h))


class TemporalTransformer(nn.Module):
    """A motion module (Guo et al. 2023, Section 4.2; diffusers' ``AnimateDiffTransformer3D``):
    ``h + proj_out(blocks(proj_in(norm(h))))`` with attention across the frames of each pixel.

    Called on the folded batch ``h`` (B * F, C, H, W) with ``num_frames = F``; ``norm`` is a
    GroupNorm (eps 1e-6) over each clip's (C, F, H, W); ``proj_out`` starts at zero (the module
    starts as the identity)."""

    def __init__(self, channels: int, heads: int, depth: int = 1, groups: int = 32, max_frames: int = 32,
                 num_directions: int | None = None, time_embedding: bool = False):
        super().__init__()
        if channels % heads:
            raise ConfigError(f"motion num_heads={heads} does not divide the {channels} channels of a motion module")
        if channels % groups:
            raise ConfigError(f"norm_num_groups={groups} does not divide the {channels} channels of a motion module")
        self.max_frames = max_frames
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        # the clip's motion label (difflab's own, not AnimateDiff's): an embedding added to every token
        self.direction_embed = nn.Embedding(num_directions + 1, channels) if num_directions is not None else None
        # the noise level (difflab's, not AnimateDiff's): an MLP of the time's sinusoidal features, added likewise
        self.time_embed = TimestepMLP(TIME_FEATURES, channels) if time_embedding else None
        self.transformer_blocks = nn.ModuleList([TemporalBlock(channels, heads, max_frames) for _ in range(depth)])
        self.proj_out = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)
        self.checkpoint = False

    def forward(self, h: torch.Tensor, num_frames: int, direction_labels: torch.Tensor | None = None,
                time_features: torch.Tensor | None = None) -> torch.Tensor:
        return _maybe_checkpoint(self.checkpoint, self._forward, h, num_frames, direction_labels, time_features)

    def _forward(self, h: torch.Tensor, num_frames: int, direction_labels: torch.Tensor | None = None,
                 time_features: torch.Tensor | None = None) -> torch.Tensor:
        bf, c, height, width = h.shape
        b = bf // num_frames
        x = self.norm(h.reshape(b, num_frames, c, height, width).transpose(1, 2))  # (B, C, F, H, W)
        x = x.permute(0, 3, 4, 2, 1).reshape(b * height * width, num_frames, c)  # tokens: one sequence per pixel
        x = self.proj_in(x)
        if self.direction_embed is not None and direction_labels is not None:  # (B,) -> one row per pixel's sequence
            x = x + self.direction_embed(direction_labels).repeat_interleave(height * width, dim=0)[:, None]
        if self.time_embed is not None:  # (B, TIME_FEATURES) -> likewise
            if time_features is None:
                raise ValueError("this motion module reads the noise level (time_embedding=True): pass time_features")
            x = x + self.time_embed(time_features.to(x.dtype)).repeat_interleave(height * width, dim=0)[:, None]
        for block in self.transformer_blocks:
            x = block(x)
        x = self.proj_out(x)
        x = x.reshape(b, height, width, num_frames, c).permute(0, 3, 4, 1, 2).reshape(bf, c, height, width)
        return h + x


@dataclass(frozen=True)
class MotionUNetConfig(JSONConfig):
    """An image network (``image_kind``, its config ``image`` as a dict) and the motion modules
    inserted into it. Per-level settings are one int or one per level of the image network
    (lowest resolution last, as ``block_out_channels``); up level j uses its down level's."""

    image_kind: str = "unet_sd"  # the wrapped image network: a key of IMAGE_KINDS ("unet_sd" or "unet")
    image: dict = field(default_factory=lambda: UNetSDConfig().to_dict())  # its config
    num_heads: int | tuple[int, ...] = 8  # attention heads of the motion modules (diffusers' motion_num_attention_heads)
    layers: int | tuple[int, ...] = 1  # TemporalBlocks per motion module (diffusers' temporal_transformer_layers_per_block)
    mid_block: bool = True  # a motion module after the middle attention (use_motion_mid_block)
    mid_layers: int = 1  # TemporalBlocks of the middle motion module
    max_frames: int = 32  # length of the frame encoding: the most frames a clip may have (motion_max_seq_length)
    norm_num_groups: int | None = None  # GroupNorm groups of the motion modules; None: the image network's
    num_frames: int = 16  # frames of a sample (the training clip length; the pipelines' default)
    levels: tuple[int, ...] | None = None  # the levels whose down/up sites get a module (None: all, as AnimateDiff)
    down_blocks: bool = True  # modules at the down (encoder) sites; False (difflab's, not AnimateDiff's): middle and up only, so the frozen encoder needs no backward
    up_modules: int | None = None  # modules per up (decoder) level, at its first n sites; None: every site (AnimateDiff's); difflab's
    num_directions: int | None = None  # motion labels (difflab's, not AnimateDiff's): an embedding in every module; label num_directions is the null one
    time_embedding: bool = False  # the noise level reaches every module (difflab's, not AnimateDiff's): an MLP of t's sinusoidal features

    def __post_init__(self):
        if self.image_kind not in IMAGE_KINDS:
            raise ConfigError(f"image_kind={self.image_kind!r} is unknown; choose one of {', '.join(IMAGE_KINDS)}")
        image = IMAGE_KINDS[self.image_kind][1].from_dict(self.image, "motion.image") if isinstance(self.image, dict) else self.image
        object.__setattr__(self, "image", image.to_dict())
        for name in ("num_heads", "layers"):
            value = getattr(self, name)
            if not isinstance(value, int):
                object.__setattr__(self, name, tuple(value))
        levels = self.num_levels
        for name in ("num_heads", "layers"):
            value = getattr(self, name)
            if not isinstance(value, int) and len(value) != levels:
                raise ConfigError(f"{name}={list(value)} must be one int or one per level of the image network ({levels})")
            if not all(isinstance(v, int) and v >= 1 for v in ((value,) if isinstance(value, int) else value)):
                raise ConfigError(f"{name}={value!r} must be ints >= 1")
        for name in ("mid_layers", "max_frames", "num_frames"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)!r} must be an int >= 1")
        if self.levels is not None:
            object.__setattr__(self, "levels", tuple(self.levels))
            bad = [v for v in self.levels if not isinstance(v, int) or not 0 <= v < levels]
            if bad:
                raise ConfigError(f"levels={list(self.levels)}: {bad} are not levels of the image network (valid: 0..{levels - 1})")
        if self.num_directions is not None and (not isinstance(self.num_directions, int) or self.num_directions < 1):
            raise ConfigError(f"num_directions={self.num_directions!r} must be an int >= 1 or None")
        if not isinstance(self.down_blocks, bool):
            raise ConfigError(f"down_blocks={self.down_blocks!r} must be a bool")
        if self.up_modules is not None and (not isinstance(self.up_modules, int) or isinstance(self.up_modules, bool)
                                            or self.up_modules < 0):
            raise ConfigError(f"up_modules={self.up_modules!r} must be an int >= 0 or None (every up site)")
        if not isinstance(self.time_embedding, bool):
            raise ConfigError(f"time_embedding={self.time_embedding!r} must be a bool")
        if self.num_frames > self.max_frames:
            raise ConfigError(f"num_frames={self.num_frames} is above max_frames={self.max_frames} (the frame encoding's length)")

    @property
    def image_config(self):
        """The image network's config object."""
        return IMAGE_KINDS[self.image_kind][1].from_dict(self.image, "motion.image")

    @property
    def num_levels(self) -> int:
        """Resolution levels of the image network."""
        c = self.image_config
        return len(c.block_out_channels if self.image_kind == "unet_sd" else c.channel_mult)

    @property
    def num_classes(self) -> int | None:
        """The image network's class count (its ``num_classes``), or None."""
        return getattr(self.image_config, "num_classes", None)

    @property
    def null_class(self) -> int | None:
        """The image network's null-class label (classifier-free guidance), or None."""
        return self.num_classes

    @property
    def null_direction(self) -> int | None:
        """The null direction label (``num_directions``), or None without directions."""
        return self.num_directions

    @property
    def in_channels(self) -> int:
        return self.image_config.in_channels

    @property
    def out_channels(self) -> int:
        c = self.image_config
        return c.out_channels or c.in_channels

    @property
    def sample_size(self) -> int | None:
        return getattr(self.image_config, "sample_size", None)

    def per_level(self, name: str, level: int) -> int:
        value = getattr(self, name)
        return value if isinstance(value, int) else value[level]

    def groups(self, channels: int) -> int:
        """The motion GroupNorm's groups at ``channels``: the set value, else the image network's
        (the ADM U-Net's is lowered to a divisor of the channels, as its own norms are)."""
        if self.norm_num_groups is not None:
            return self.norm_num_groups
        c = self.image_config
        if self.image_kind == "unet_sd":
            return c.norm_num_groups
        return max(d for d in range(1, min(c.groups, channels) + 1) if channels % d == 0)


class MotionUNet(nn.Module):
    """A video network: an image U-Net (``unet``) with motion modules (``motion``, one per
    temporal site) inserted, as diffusers' ``UNetMotionModel`` (Guo et al. 2023, Section 4.2).

    ``net(x, t, **cond)`` with ``x`` (B, C, F, H, W): frames are folded into the batch for the
    image network's layers and unfolded in the motion modules; ``t`` (B,) and every tensor in
    ``cond`` (``context``, ``context_mask``, ``class_labels``, SDXL's ``text_embeds`` and
    ``time_ids``: one row per clip) are repeated per frame; ``direction_labels`` (B,) long, with
    ``config.num_directions`` set, go to the motion modules alone (the null label when missing);
    with ``config.time_embedding`` the modules also read ``t`` (the noise level).
    Returns (B, C_out, F, H, W).
    """

    def __init__(self, config: MotionUNetConfig, image_net: nn.Module | None = None):
        super().__init__()
        self.config = c = config
        cls, _ = IMAGE_KINDS[c.image_kind]
        if image_net is not None and (not isinstance(image_net, cls) or image_net.config != c.image_config):
            raise ValueError(f"image_net must be a {cls.__name__} with the config's image settings (config.image)")
        self.unet = image_net if image_net is not None else cls(c.image_config)
        motion = {}
        for site, (channels, level) in self.unet.temporal_sites().items():
            if (not c.mid_block) if site.startswith("mid") else (c.levels is not None and level not in c.levels):
                continue
            if site.startswith("down") and not c.down_blocks:
                continue
            if site.startswith("up") and c.up_modules is not None and int(site.split("_")[2]) >= c.up_modules:
                continue
            depth = c.mid_layers if site.startswith("mid") else c.per_level("layers", level)
            motion[site] = TemporalTransformer(channels, c.per_level("num_heads", level), depth, c.groups(channels), c.max_frames,
                                               c.num_directions, c.time_embedding)
        self.motion = nn.ModuleDict(motion)
        set_checkpointing(self.motion, bool(getattr(self.unet.config, "gradient_checkpointing", False)))

    @property
    def null_class(self) -> int | None:
        """The image network's null-class label (classifier-free guidance), or None."""
        return getattr(self.unet, "null_class", None)

    def forward(self, x: torch.Tensor, t: torch.Tensor, direction_labels: torch.Tensor | None = None, **cond) -> torch.Tensor:
        """Predict for the clips ``x`` (B, C, F, H, W) at times ``t`` (B,) (a scalar is broadcast)."""
        # 1. Check inputs
        b, num_frames = self._check_inputs(x)
        directions = self._check_directions(direction_labels, b, x.device)
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(b) if t.ndim == 0 else t
        if t.shape != (b,):
            raise ValueError(f"t must be a (B,) = ({b},) tensor (one time per clip), got shape {tuple(t.shape)}")
        for key, value in cond.items():
            if torch.is_tensor(value) and (value.ndim == 0 or value.shape[0] != b):
                raise ValueError(f"{key} must have one row per clip (B = {b}), got shape {tuple(value.shape)}")

        # 2. Fold the frames into the batch (clip-major: row b * F + f), repeat the conditions per frame
        _, ch, _, height, width = x.shape
        folded = x.transpose(1, 2).reshape(b * num_frames, ch, height, width)
        cond = {k: v.repeat_interleave(num_frames, dim=0) if torch.is_tensor(v) else v for k, v in cond.items()}

        # 3. The image network, with a motion module at each temporal site (given the noise level with time_embedding)
        time_features = timestep_embedding(t, TIME_FEATURES) if self.config.time_embedding else None

        def temporal(h, site):
            return self.motion[site](h, num_frames, directions, time_features) if site in self.motion else h

        out = self.unet(folded, t.repeat_interleave(num_frames), temporal=temporal, **cond)

        # 4. Unfold
        return out.reshape(b, num_frames, *out.shape[1:]).transpose(1, 2)

    def _check_directions(self, labels, b: int, device) -> torch.Tensor | None:
        """(B,) long direction labels (the null label when None), or None without directions."""
        n = self.config.num_directions
        if n is None:
            if labels is not None:
                raise ValueError("direction_labels given, but these motion modules take none (config.num_directions is None)")
            return None
        if labels is None:
            return torch.full((b,), n, dtype=torch.long, device=device)
        labels = torch.as_tensor(labels, device=device)
        if labels.shape != (b,) or labels.dtype != torch.long or bool(((labels < 0) | (labels > n)).any()):
            raise ValueError(f"direction_labels must be a ({b},) long tensor of values in [0, {n}] ({n}: no direction), got "
                             f"{labels.dtype} of shape {tuple(labels.shape)}")
        return labels

    def _check_inputs(self, x) -> tuple[int, int]:
        c = self.config
        if x.ndim != 5 or x.shape[1] != c.in_channels:
            hint = " (a 4-D batch of images: add a frame axis, x[:, :, None], or call the image network .unet)" if x.ndim == 4 else ""
            raise ValueError(f"x must be a batch of clips (B, {c.in_channels}, F, H, W), got shape {tuple(x.shape)}{hint}")
        if x.shape[2] > c.max_frames:
            raise ValueError(f"x has F = {x.shape[2]} frames, above max_frames = {c.max_frames} (the length of the motion "
                             f"modules' frame encoding); sample at most {c.max_frames} frames")
        return x.shape[0], x.shape[2]


def is_temporal(name: str) -> bool:
    """Whether the parameter ``name`` of a :class:`MotionUNet` belongs to a motion module."""
    return name.startswith("motion.")


def temporal_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``model``'s motion modules (what AnimateDiff trains)."""
    return [p for name, p in model.named_parameters() if is_temporal(name)]


def freeze_spatial(model: nn.Module) -> list[nn.Parameter]:
    """Freeze the image network inside ``model`` (``requires_grad=False`` on every parameter that is
    not a motion module's) and leave the motion modules trainable, as AnimateDiff trains (Guo et
    al. 2023, Section 4.2); returns the trainable parameters. diffusers' ``freeze_unet2d_params``."""
    for name, p in model.named_parameters():
        p.requires_grad_(is_temporal(name))
    return temporal_parameters(model)


def insert_motion_modules(image_net: nn.Module, **motion) -> MotionUNet:
    """A :class:`MotionUNet` around the (pretrained) ``image_net`` itself, its weights shared, with
    fresh motion modules (identity at start); ``motion``: the other :class:`MotionUNetConfig` fields."""
    kinds = [k for k, (cls, _) in IMAGE_KINDS.items() if type(image_net) is cls]
    if not kinds:
        raise ValueError(f"image_net is a {type(image_net).__name__}; motion modules fit {', '.join(c.__name__ for c, _ in IMAGE_KINDS.values())}")
    config = MotionUNetConfig(image_kind=kinds[0], image=image_net.config.to_dict(), **motion)
    weight = next(image_net.parameters())
    net = MotionUNet(config, image_net)
    net.motion.to(device=weight.device, dtype=weight.dtype)
    return net


PRESETS = {
    # the Stable Diffusion tiny U-Net with motion modules: for tests
    "tiny": MotionUNetConfig(image=UNetSDConfig(block_out_channels=(32, 64), layers_per_block=1, down_attention=(True, True),
                                                up_attention=(True, True), num_heads=(2, 4), cross_attention_dim=32,
                                                norm_num_groups=8, sample_size=8).to_dict(),
                             num_heads=2, max_frames=16, num_frames=8),
    # the Stable Diffusion 1.x U-Net with the motion modules of diffusers' MotionAdapter defaults
    # (8 heads, one block per module, a middle module, 32 frames at most), sampling 16 frames
    "sd1_animatediff": MotionUNetConfig(num_heads=8, max_frames=32, num_frames=16),
}

__all__ = ["IMAGE_KINDS", "frame_encoding", "FrameEncoding", "TemporalBlock", "TemporalTransformer", "MotionUNetConfig",
           "MotionUNet", "is_temporal", "temporal_parameters", "freeze_spatial", "insert_motion_modules", "PRESETS"]
