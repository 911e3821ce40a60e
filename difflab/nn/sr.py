"""A super-resolution network: SR3's conditioning (Saharia et al. 2022, "Image Super-Resolution via
Iterative Refinement", Section 2.4: the low-resolution image, upsampled with bicubic interpolation,
is concatenated to the noisy input along the channels) around difflab's ADM :class:`UNet`, plus the
noise-conditioning augmentation level of cascaded diffusion (Ho et al. 2022, "Cascaded Diffusion
Models", Section 4.1: the low-resolution input is noised to a level s, and s is given to the model).

``net(x_in, t, low_res=z, low_res_sigma=s, class_labels=)``: ``z`` (B, C, H / factor, W / factor) is
the conditioning image as the caller augmented it (:func:`difflab.core.noise_augment`: ``(x_lo + s
eps) / sqrt(1 + s^2)``, the variance-preserving form of CDM's z_s = alpha_s z + sigma_s eps), ``s``
(a number or (B,)) its canonical noise level, 0 for a clean image. The level is embedded like a time
(sinusoidal of ``level_scale * s / sqrt(1 + s^2)``, a Linear-SiLU-Linear whose last layer starts at
zero) and added, through a forward hook, to the output of the U-Net's ``time_embed``, so it
conditions every ResBlock exactly as the time does (the same seam as
:class:`~difflab.nn.GuidanceEmbedding`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, JSONConfig
from .layers import timestep_embedding, zero_
from .unet import UNet, UNetConfig

UPSAMPLE_MODES = ("bicubic", "bilinear", "nearest")


def upsample(low_res: torch.Tensor, size, mode: str = "bicubic") -> torch.Tensor:
    """``low_res`` (B, C, h, w) interpolated to ``size`` (H, W) (SR3's bicubic by default;
    ``align_corners=False`` for bicubic and bilinear)."""
    if mode not in UPSAMPLE_MODES:
        raise ValueError(f"upsample mode={mode!r} is unknown; choose one of {list(UPSAMPLE_MODES)}")
    kwargs = {} if mode == "nearest" else dict(align_corners=False)
    return F.interpolate(low_res, size=tuple(size), mode=mode, **kwargs)


@dataclass(frozen=True)
class SRUNetConfig(JSONConfig):
    """The backbone (``unet``: a :class:`UNetConfig` as a dict, ``in_channels`` the image's channels;
    the wrapper doubles them for the concatenated low-res image) and the conditioning."""

    unet: dict = field(default_factory=lambda: UNetConfig().to_dict())
    factor: int = 2  # output size / low-res size (2 or 4 in SR3 and CDM; any int >= 2)
    upsample: str = "bicubic"  # how the low-res image is brought to the output size
    level_features: int = 64  # channels of the sinusoidal embedding of the augmentation level
    level_scale: float = 1000.0  # the level's noise fraction s / sqrt(1 + s^2) in [0, 1) times this, like a timestep

    def __post_init__(self):
        if not isinstance(self.factor, int) or isinstance(self.factor, bool) or self.factor < 2:
            raise ConfigError(f"factor={self.factor!r} must be an int >= 2 (the upscaling factor)")
        if self.upsample not in UPSAMPLE_MODES:
            raise ConfigError(f"upsample={self.upsample!r} is unknown; choose one of {list(UPSAMPLE_MODES)}")
        if not isinstance(self.level_features, int) or self.level_features < 2:
            raise ConfigError(f"level_features={self.level_features!r} must be an int >= 2")
        object.__setattr__(self, "unet", self.backbone.to_dict())  # checked, lists for JSON

    @property
    def backbone(self) -> UNetConfig:
        return UNetConfig.from_dict(dict(self.unet), "spec.network.config.unet")

    # What pipelines and specs read off a network's config: the image's channels, classes, factor.
    in_channels = property(lambda self: self.backbone.in_channels)
    num_classes = property(lambda self: self.backbone.num_classes)
    null_class = property(lambda self: self.backbone.null_class)
    downsample_factor = property(lambda self: self.backbone.downsample_factor)


class SRUNet(nn.Module):
    """``net(x_in, t, low_res=, low_res_sigma=0, class_labels=)``; see the module docstring."""

    def __init__(self, config: SRUNetConfig):
        super().__init__()
        self.config = config
        base = config.backbone
        self.unet = UNet(dataclasses.replace(base, in_channels=2 * base.in_channels,
                                             out_channels=base.out_channels or base.in_channels))
        emb_dim = 4 * base.model_channels
        self.level_embed = nn.Sequential(nn.Linear(config.level_features, emb_dim), nn.SiLU(), zero_(nn.Linear(emb_dim, emb_dim)))
        self._level = None  # the embedded level of the call in progress, read by the hook
        self.unet.time_embed.register_forward_hook(self._add_level)

    def _add_level(self, module, args, output):
        return output if self._level is None else output + self._level.to(output.dtype)

    def forward(self, x: torch.Tensor, t: torch.Tensor, low_res: torch.Tensor | None = None, low_res_sigma=None,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        c = self.config
        if low_res is None:
            raise ValueError("this network super-resolves: pass low_res= (B, C, H / factor, W / factor), the conditioning image")
        b, ch, h, w = x.shape if x.ndim == 4 else (None,) * 4
        want = (b, ch, None if h is None else h // c.factor, None if w is None else w // c.factor)
        if x.ndim != 4 or low_res.shape != want or h % c.factor or w % c.factor:
            raise ValueError(f"low_res must be (B, C, H / {c.factor}, W / {c.factor}) = {want} for x of shape "
                             f"{tuple(x.shape)}, got {tuple(low_res.shape)}")
        s = torch.as_tensor(0.0 if low_res_sigma is None else low_res_sigma, dtype=torch.float32, device=x.device)
        s = s.expand(b) if s.ndim == 0 else s.reshape(-1)
        if s.shape != (b,) or not bool((s >= 0).all()):
            raise ValueError(f"low_res_sigma must be a number or a ({b},) tensor of levels >= 0, got {tuple(s.shape)}")
        level = timestep_embedding(c.level_scale * s / (1 + s**2).sqrt(), c.level_features)
        self._level = self.level_embed(level.to(self.level_embed[0].weight.dtype))
        try:
            up = upsample(low_res.to(x.dtype), (h, w), c.upsample)
            return self.unet(torch.cat([x, up], dim=1), t, class_labels=class_labels)
        finally:
            self._level = None


__all__ = ["SRUNet", "SRUNetConfig", "upsample", "UPSAMPLE_MODES"]
