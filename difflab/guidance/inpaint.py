"""Inpainting as wrappers: known pixels in, the rest filled by the model.

Two ways, for two kinds of model:

- :func:`sample_repaint` wraps *any sampler* for *any model* (RePaint; Lugmayr et al. 2022,
  Algorithm 1): after every step the known region is replaced by the known image noised to the
  new level, and ``resample`` loops re-noise and repeat a stretch of steps so the filled region
  can harmonize with what is known.
- :class:`MaskChannels` wraps the denoiser of a *mask-channel* model (Stable Diffusion
  inpainting: the U-Net input is concat(noisy latents, mask, masked-image latents), 9 channels).
  The network sees the extra channels; samplers never know.

Masks are (B, 1, H, W) or (1, 1, H, W) with values in {0, 1}, **1 = fill** (diffusers' white),
0 = keep.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..progress import progress_range
from ..core import Denoiser
from ..core.forward import ve_sample
from ..samplers.common import check_sigmas, noise_source


def check_mask(mask, images: torch.Tensor, name: str = "mask") -> torch.Tensor:
    """``mask`` as a float tensor (B or 1, 1, H, W) of 0s and 1s matching ``images`` (B, C, H, W);
    a ValueError naming the problem otherwise."""
    mask = torch.as_tensor(mask)
    b, _, h, w = images.shape
    if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[0] not in (1, b) or tuple(mask.shape[2:]) != (h, w):
        raise ValueError(f"{name} must be (B, 1, H, W) or (1, 1, H, W) = ({b} or 1, 1, {h}, {w}) to match the images "
                         f"{tuple(images.shape)}, got shape {tuple(mask.shape)}")
    mask = mask.to(images.device, images.dtype if images.is_floating_point() else torch.float32)
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{name} must hold only 0 (keep) and 1 (fill); threshold a soft mask first, e.g. (mask > 0.5)")
    return mask


def latent_mask(mask: torch.Tensor, factor: int, mode: str = "any") -> torch.Tensor:
    """A pixel mask (B, 1, H, W) at latent resolution (H / factor, W / factor).

    ``"any"`` (for replacement): a latent pixel is filled when any pixel it covers is, so only
    latents whose every pixel is known count as known (max pooling). ``"nearest"``: what
    diffusers feeds mask-channel models (``F.interpolate`` with its default nearest mode).
    """
    if factor == 1:
        return mask
    if mode == "any":
        return F.max_pool2d(mask, factor)
    if mode == "nearest":
        return F.interpolate(mask, size=(mask.shape[2] // factor, mask.shape[3] // factor))
    raise ValueError(f"mode={mode!r} must be 'any' or 'nearest'")


@torch.no_grad()
def sample_repaint(denoiser, x: torch.Tensor, sigmas, *, known: torch.Tensor, mask: torch.Tensor, sampler,
                   resample: int = 1, jump_length: int = 1, noise=None, extra_args: dict | None = None, callback=None,
                   progress: bool = False, **sampler_kwargs) -> torch.Tensor:
    """RePaint (Lugmayr et al. 2022, Algorithm 1 with the resampling jumps of their Section 4.2),
    in the canonical frame x = x0 + sigma eps, around any sampler.

    ``known`` (B, ...) is the clean known sample x0 and ``mask`` (B or 1, ...) is 1 where the model
    fills. For each step sigma_i -> sigma_{i+1} of ``sigmas``::

        x_unknown = sampler(denoiser, x, [sigma_i, sigma_{i+1}])      # line 7: one reverse step
        x_known   = known + sigma_{i+1} z,   z ~ N(0, I)                 # line 5: q(x_{t-1} | x0)
        x         = mask * x_unknown + (1 - mask) * x_known               # line 8

    The step to sigma = 0 puts ``known`` back exactly. Resampling: the steps are taken in stretches
    of ``jump_length``; each stretch is run ``resample`` (their U) times, and between runs x is
    re-noised from the end of the stretch back to its start, x += sqrt(sigma_start^2 - sigma_end^2) z
    (line 10, q(x_t | x_{t-1}) made canonical; with ``jump_length=1`` this is Algorithm 1 exactly).
    A stretch that ends at sigma = 0 is not repeated.

    ``sampler`` is any sampler function (``difflab.samplers.get_sampler(name)``) and gets
    ``sampler_kwargs``; it is called on one step at a time, so multistep samplers (LMS, DPM++ 2M,
    UniPC) restart their history every step and act as first-order. ``noise`` feeds the sampler
    and the known-region and re-noising draws (a :class:`difflab.core.SampleNoise` keeps samples
    independent of the batch). ``callback`` gets dict(i=, x=, sigma=, sigma_next=, denoised=,
    repeat=) after every step; ``i`` counts steps of the grid, ``repeat`` the pass over its stretch.
    """
    sigmas = check_sigmas(sigmas)
    if resample < 1 or jump_length < 1:
        raise ValueError(f"resample={resample} and jump_length={jump_length} must be >= 1")
    if known.shape != x.shape:
        raise ValueError(f"known must be shaped like x {tuple(x.shape)}, got {tuple(known.shape)}")
    keep = ~mask.to(torch.bool).expand_as(x)
    known = known.to(x.device, x.dtype)
    draw = noise_source(noise, x)
    n = len(sigmas) - 1
    for start in progress_range(0, n, jump_length, disable=not progress):
        end = min(start + jump_length, n)
        repeats = 1 if float(sigmas[end]) == 0 else resample
        for r in range(repeats):
            for i in range(start, end):
                sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
                seen = {}
                x = sampler(denoiser, x, sigmas[i:i + 2], extra_args=extra_args, callback=seen.update, noise=noise,
                            **sampler_kwargs)
                x_known = known if sigma_next == 0 else ve_sample(known, sigma_next, draw())
                x = torch.where(keep, x_known, x)
                if callback is not None:
                    callback(dict(i=i, x=x, sigma=sigma, sigma_next=sigma_next, denoised=seen.get("denoised"), repeat=r))
            if r < repeats - 1:  # jump back: re-noise from the end of the stretch to its start
                hi, lo = float(sigmas[start]), float(sigmas[end])
                x = ve_sample(x, (hi**2 - lo**2) ** 0.5, draw())
    return x


class _ConcatChannels(nn.Module):
    """A network ``net(cat([x_in, extra], dim=1), t, **cond)``: the extra channels are appended to
    the network's input after the frame's scaling, as diffusers' inpainting pipeline does."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x_in: torch.Tensor, t, *, extra_channels: torch.Tensor, **cond):
        return self.net(torch.cat([x_in, extra_channels.to(x_in.dtype)], dim=1), t, **cond)


class MaskChannels(nn.Module):
    """The denoiser of a mask-channel inpainting model (Rombach et al. 2022, Section 4.5; Stable
    Diffusion inpainting): ``D(x, sigma, mask_channels=, **cond)`` with the network fed
    concat(x_in, mask_channels) along channels, where x_in is x at the network's scale and
    ``mask_channels`` = concat(mask, masked-image latents) (B, 1 + C, h, w), unscaled.

    It is a denoiser like any other: samplers see (B, C, h, w) samples, and classifier-free
    guidance duplicates ``mask_channels`` for both branches, as diffusers does.
    """

    def __init__(self, denoiser: Denoiser):
        super().__init__()
        self.denoiser = denoiser
        self.inner = Denoiser(_ConcatChannels(denoiser.net), denoiser.frame, denoiser.prediction, denoiser.sigma_data)

    def forward(self, x: torch.Tensor, sigma, *, mask_channels: torch.Tensor, **cond) -> torch.Tensor:
        if mask_channels.shape[0] != x.shape[0] or mask_channels.shape[2:] != x.shape[2:]:
            raise ValueError(f"mask_channels must be (B, 1 + C, h, w) matching x {tuple(x.shape)}, got {tuple(mask_channels.shape)}")
        return self.inner(x, sigma, extra_channels=mask_channels, **cond)

    @property
    def frame(self):
        return self.denoiser.frame

    def prior_std(self, sigma):
        return self.denoiser.prior_std(sigma)


def mask_channels(mask: torch.Tensor, masked_latents: torch.Tensor) -> torch.Tensor:
    """concat(mask, masked-image latents) along channels: the extra input of a mask-channel model."""
    return torch.cat([mask.to(masked_latents.dtype).expand(masked_latents.shape[0], -1, -1, -1), masked_latents], dim=1)


__all__ = ["check_mask", "latent_mask", "sample_repaint", "MaskChannels", "mask_channels"]
