"""Networks: ``net(x_in, t, **cond)``. They know nothing of samplers, sigmas or frames."""
from .layers import (
    CrossAttention, Downsample, ResBlock, SelfAttention, TimestepMLP, Upsample, group_norm, timestep_embedding, zero_,
)
from .unet import PRESETS, UNet, UNetConfig

__all__ = [
    "UNet", "UNetConfig", "PRESETS", "timestep_embedding", "TimestepMLP", "ResBlock", "SelfAttention", "CrossAttention",
    "Downsample", "Upsample", "group_norm", "zero_",
]
