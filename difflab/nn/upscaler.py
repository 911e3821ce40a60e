"""The network of Stable Diffusion's upscalers: a U-Net fed the sample and an image side by side.

Both upscalers condition on their low-resolution input by concatenating it to the U-Net's input
along channels, *after* the frame's input scaling (diffusers' ``StableDiffusionUpscalePipeline``:
the noised low-resolution pixels, 3 channels; ``StableDiffusionLatentUpscalePipeline``: the
nearest-upsampled low-resolution latents, 4 channels). The latent upscaler's U-Net also predicts
one channel more than the sample has, which its pipeline drops; so does this wrapper.

``ImageConcatNet(unet, out_channels)`` is called as ``net(x_in, t, image=, **cond)`` and returns
``unet(cat([x_in, image]), t, **cond)[:, :out_channels]``: a network like any other for
:class:`difflab.core.Denoiser`, and classifier-free guidance hands ``image`` to both branches.
"""
from __future__ import annotations

import torch
from torch import nn


class ImageConcatNet(nn.Module):
    """``unet(cat([x_in, image], 1), t, **cond)[:, :out_channels]``; ``config`` is the U-Net's."""

    def __init__(self, unet: nn.Module, out_channels: int):
        super().__init__()
        self.unet, self.out_channels = unet, int(out_channels)

    @property
    def config(self):
        return self.unet.config

    def forward(self, x_in: torch.Tensor, t, *, image: torch.Tensor, **cond) -> torch.Tensor:
        want = self.unet.config.in_channels - x_in.shape[1]
        if image.ndim != 4 or image.shape[0] != x_in.shape[0] or image.shape[1] != want or image.shape[2:] != x_in.shape[2:]:
            raise ValueError(f"image must be ({x_in.shape[0]}, {want}, {x_in.shape[2]}, {x_in.shape[3]}) beside samples of shape "
                             f"{tuple(x_in.shape)} (the U-Net takes {self.unet.config.in_channels} channels), got {tuple(image.shape)}")
        return self.unet(torch.cat([x_in, image.to(x_in.dtype)], dim=1), t, **cond)[:, :self.out_channels]


__all__ = ["ImageConcatNet"]
