"""Joint image + depth: one diffusion model over RGB and depth as four channels (LDM3D; Stan et
al. 2023, Section 3, in pixel space), used three ways:

- :func:`generate_image_depth`: both modalities together, from noise (class labels optional);
- :func:`depth_from_image`: monocular depth (the task of Marigold; Ke et al. 2024) as channel
  inpainting: the RGB channels are known, the depth channel is filled;
- :func:`image_from_depth`: depth-conditioned generation, the other way round.

Channel inpainting is RePaint (Lugmayr et al. 2022, Algorithm 1;
:func:`difflab.guidance.inpaint.sample_repaint`) with a mask over channels instead of pixels:
after every step the known channels are replaced by the known values noised to the new level.
Images are (N, 3, H, W) in [-1, 1]; depth is one channel in [-1, 1] (the data set's map, e.g.
:func:`difflab.data.scenes.depth_to_unit`).
"""
from __future__ import annotations

import functools

import torch

from ..guidance.inpaint import sample_repaint
from ..samplers import get_sampler
from .class_to_image import check_labels, generate
from .common import denoise, run_options, sample_device, sampling_grid
from .options import CLASS_DEFAULTS, SampleOptions, resolve

IMAGE_CHANNELS = (0, 1, 2)
DEPTH_CHANNELS = (3,)


def join(images: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) images and (N, 1, H, W) depth as the model's (N, 4, H, W) samples."""
    if images.ndim != 4 or images.shape[1] != 3 or depth.shape != (images.shape[0], 1, *images.shape[2:]):
        raise ValueError(f"images must be (N, 3, H, W) and depth (N, 1, H, W) of the same N, H, W; got "
                         f"{tuple(images.shape)} and {tuple(depth.shape)}")
    return torch.cat([images, depth.to(images.dtype)], 1)


def split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's (N, 4, H, W) samples as (images (N, 3, H, W), depth (N, 1, H, W))."""
    return x[:, :3], x[:, 3:]


def channel_mask(fill, channels: int = 4) -> torch.Tensor:
    """(1, channels, 1, 1): 1 on the channels to fill, 0 on the known ones (the mask of
    :func:`difflab.guidance.inpaint.sample_repaint`, broadcast over the batch and the pixels)."""
    mask = torch.zeros(1, channels, 1, 1)
    mask[:, list(fill)] = 1
    return mask


@torch.no_grad()
def generate_image_depth(denoiser, labels=None, *, num_samples: int | None = None, size: int = 16,
                         options: SampleOptions | None = None, **overrides) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and depth maps generated together (LDM3D's joint generation), for class ``labels``
    (with classifier-free guidance, ``guidance_scale=``) or ``num_samples`` unconditional ones;
    options as :func:`difflab.pipelines.generate`. Returns (images, depth)."""
    return split(generate(denoiser, labels, num_samples=num_samples, shape=(4, size, size), options=options, **overrides))


@torch.no_grad()
def complete_channels(denoiser, known: torch.Tensor, fill, *, labels=None, resample: int = 2, jump_length: int = 1,
                      options: SampleOptions | None = None, **overrides) -> torch.Tensor:
    """Fill the channels ``fill`` of ``known`` (N, C, H, W; the values there are ignored) by RePaint
    over channels, keeping the others. A class-conditional model sees ``labels`` (guided by
    ``guidance_scale``) or, without labels, its null class (the unconditional model). ``resample``
    and ``jump_length`` as :func:`difflab.guidance.inpaint.sample_repaint`. Returns (N, C, H, W)
    with the known channels exactly as given."""
    # 1. Check inputs.
    opts = resolve(options, CLASS_DEFAULTS, overrides)
    if known.ndim != 4:
        raise ValueError(f"known must be (N, C, H, W), got shape {tuple(known.shape)}")
    n, channels = known.shape[:2]
    in_channels = getattr(getattr(denoiser.net, "config", None), "in_channels", channels)
    if channels != in_channels:
        raise ValueError(f"known has {channels} channels but the model takes {in_channels}")
    bad = [c for c in fill if not 0 <= c < channels]
    if bad or not len(fill):
        raise ValueError(f"fill must name some of the channels 0..{channels - 1}, got {list(fill)}")
    num_classes = getattr(getattr(denoiser.net, "config", None), "num_classes", None)
    if labels is not None:
        labels, _ = check_labels(denoiser, labels, None)
        if len(labels) != n:
            raise ValueError(f"labels must have one entry per sample ({n}), got {len(labels)}")
    elif opts.guidance_scale != 1.0:
        raise ValueError("guidance_scale != 1 needs class labels to guide towards")
    _, device = sample_device(denoiser, opts)
    mask = channel_mask(fill, channels).to(device)
    known = known.to(device, torch.float32)

    # 2. Build the grid and the RePaint wrapper around the sampler.
    sigmas = sampling_grid(denoiser, opts.steps, opts.grid, opts.spacing, opts.steps_offset).to(device, torch.float32)
    prior = float(denoiser.prior_std(sigmas[0].double()))
    repaint = functools.partial(sample_repaint, sampler=get_sampler(opts.sampler), resample=resample, jump_length=jump_length)

    def sample_batch(start, b, noise):
        # 3. Start from noise; 4. the condition (the labels, or the null class of a conditional model).
        x = noise() * prior
        cond = uncond = None
        if num_classes is not None:
            null = torch.full((b,), num_classes, dtype=torch.long, device=device)
            cond = {"class_labels": null if labels is None else labels[start:start + b].to(device)}
            uncond = {"class_labels": null}
        # 5. RePaint over channels, with guidance.
        sample = functools.partial(repaint, known=known[start:start + b], mask=mask)
        return denoise(denoiser, x, sigmas, opts, noise, cond, uncond, sampler=sample).clamp(-1, 1)

    # 6. Return, the known channels exactly.
    out = run_options(n, (channels, *known.shape[2:]), sample_batch, opts, device=device,
                      desc=f"channel inpainting ({opts.sampler}, {opts.steps} steps)")
    return torch.where(mask.bool().cpu(), out, known.cpu())


@torch.no_grad()
def depth_from_image(denoiser, images: torch.Tensor, **kwargs) -> torch.Tensor:
    """Monocular depth (Ke et al. 2024's task) from a joint model: the depth channel of
    :func:`complete_channels` with the RGB channels known. Returns (N, 1, H, W)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, H, W), got shape {tuple(images.shape)}")
    known = join(images, torch.zeros_like(images[:, :1]))
    return split(complete_channels(denoiser, known, DEPTH_CHANNELS, **kwargs))[1]


@torch.no_grad()
def image_from_depth(denoiser, depth: torch.Tensor, **kwargs) -> torch.Tensor:
    """Depth-conditioned generation from a joint model: the RGB channels of
    :func:`complete_channels` with the depth channel known. Returns (N, 3, H, W)."""
    if depth.ndim != 4 or depth.shape[1] != 1:
        raise ValueError(f"depth must be (N, 1, H, W), got shape {tuple(depth.shape)}")
    known = join(torch.zeros(depth.shape[0], 3, *depth.shape[2:]), depth)
    return split(complete_channels(denoiser, known, IMAGE_CHANNELS, **kwargs))[0]


__all__ = ["join", "split", "channel_mask", "generate_image_depth", "complete_channels", "depth_from_image",
           "image_from_depth", "IMAGE_CHANNELS", "DEPTH_CHANNELS"]
