"""Networks: ``net(x_in, t, **cond)``. They know nothing of samplers, sigmas or frames."""
from .layers import (
    CrossAttention, Downsample, ResBlock, SelfAttention, TimestepMLP, Upsample, group_norm, timestep_embedding, zero_,
)
from .guidance_embedding import GuidanceEmbedding
from .mmdit import MMDiT, MMDiTConfig
from .motion import MotionUNet, MotionUNetConfig, freeze_spatial, insert_motion_modules
from .sd3_text import SD3TextEncoder
from .unet import PRESETS, UNet, UNetConfig
from .sr import SRUNet, SRUNetConfig
from .diffwave import DiffWave, DiffWaveConfig
from .text import CLIPTextEncoder, CLIPTextEncoderConfig, TextEncoder, TinyTextConfig, TinyTextEncoder
from .transformer import SpatialTransformer
from .unet_sd import PRESETS as SD_PRESETS
from .unet_sd import UNetSD, UNetSDConfig
from .vae import PRESETS as VAE_PRESETS
from .vae import AutoencoderKL, DiagonalGaussian, VAEConfig, estimate_scaling_factor

__all__ = [
    "UNet", "UNetConfig", "PRESETS", "timestep_embedding", "TimestepMLP", "ResBlock", "SelfAttention", "CrossAttention",
    "Downsample", "Upsample", "group_norm", "zero_", "AutoencoderKL", "VAEConfig", "DiagonalGaussian",
    "estimate_scaling_factor", "VAE_PRESETS", "UNetSD", "UNetSDConfig", "SD_PRESETS", "SpatialTransformer",
    "TextEncoder", "CLIPTextEncoder", "CLIPTextEncoderConfig", "TinyTextEncoder", "TinyTextConfig", "GuidanceEmbedding",
    "MMDiT", "MMDiTConfig", "SD3TextEncoder",
    "SRUNet", "SRUNetConfig", "DiffWave", "DiffWaveConfig",
    "MotionUNet", "MotionUNetConfig", "insert_motion_modules", "freeze_spatial",
]
