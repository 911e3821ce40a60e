"""Text-to-image latent diffusion (Rombach et al. 2022): prompts in, images out.

The stages it shares with img2img, inpainting, outpainting and editing live in
:mod:`difflab.pipelines.common` (conventions for images, ``output_type`` and seeds there too);
the sampling options in :class:`difflab.pipelines.options.SampleOptions`.
"""
from __future__ import annotations

import torch

from .common import (add_conditions, batch_slice, check_output_type, check_size, default_size, denoise, encode_request, finish,
                     latent_channels, net_config, run_options, sample_device, sampling_grid)
from .options import TEXT_DEFAULTS, SampleOptions, resolve


def text_sample_shape(denoiser, vae, *, height=None, width=None, latent_shape=None, latents=None) -> tuple[int, int, int]:
    """The (C, h, w) of one sample: from ``latents`` (N, C, h, w), ``latent_shape``, or the image
    ``height`` x ``width`` (default: the network's ``sample_size`` times the VAE factor); a
    ValueError when the network takes other channels (a mask-channel model needs ``inpaint``)."""
    if latents is not None:
        if latents.ndim != 4:
            raise ValueError(f"latents must be (N, C, h, w), got shape {tuple(latents.shape)}")
        shape = tuple(latents.shape[1:])
    elif latent_shape is not None:
        shape = tuple(int(s) for s in latent_shape)
        if len(shape) != 3:
            raise ValueError(f"latent_shape must be (C, h, w), got {latent_shape}")
    else:
        if height is None or width is None:
            h0, w0 = default_size(denoiser, vae)
            height, width = height or h0, width or w0
        shape = (latent_channels(denoiser, vae), *check_size(denoiser, vae, height, width))
    in_channels = getattr(net_config(denoiser), "in_channels", shape[0])
    if in_channels != shape[0]:
        raise ValueError(f"the network takes {in_channels} input channels but samples have {shape[0]}: "
                         "an inpainting (mask-channel) model needs difflab.pipelines.inpaint")
    return shape


@torch.no_grad()
def text_to_image(denoiser, text_encoder, vae, prompts, *, negative_prompts=None, height: int | None = None,
                  width: int | None = None, latent_shape: tuple[int, int, int] | None = None, output_type: str = "pil",
                  latents: torch.Tensor | None = None, prompt_embeds: torch.Tensor | None = None,
                  negative_prompt_embeds: torch.Tensor | None = None, added_cond: dict | None = None,
                  negative_added_cond: dict | None = None, options: SampleOptions | None = None, **overrides):
    """Latent diffusion from text (Rombach et al. 2022, Section 3.3) with classifier-free guidance
    (Ho & Salimans 2022, eq. 6) and optional guidance rescale (Lin et al. 2024, Section 3.4).

    ``denoiser``: ``D(x, sigma, context=, context_mask=)`` (e.g. ``StableDiffusionComponents.denoiser``);
    ``text_encoder``: a :class:`difflab.nn.text.TextEncoder`; ``vae``: an ``AutoencoderKL``, or
    None for a pixel-space model. ``prompts``: a string or a non-empty list; ``negative_prompts``:
    one, or one per prompt (default: the empty prompt). ``options``: a
    :class:`~difflab.pipelines.options.SampleOptions` (default: guidance 7.5, diffusers' scale,
    1 = off, and batches of 8); keyword ``overrides`` replace its fields (``sampler=``, ``steps=``,
    ``guidance_scale=``, ``seed=``, ...), any other keyword goes to the sampler (``eta=``,
    ``s_churn=``, ``callback=``, ...). ``height``/``width`` default to the U-Net's
    ``sample_size`` times the VAE factor; ``latent_shape`` (C, h, w) gives the sample shape
    directly. ``latents``: standard normal starting noise (N, C, h, w) (diffusers' ``latents=``
    before ``init_noise_sigma``), used instead of the per-sample draws; it is scaled by
    ``denoiser.prior_std(sigmas[0])``. ``added_cond`` / ``negative_added_cond``: more network
    inputs per prompt for the conditional / unconditional branch (:func:`~difflab.pipelines.common.add_conditions`;
    SDXL's ``text_embeds`` and ``time_ids``, see :mod:`difflab.pipelines.sdxl`).

    Returns N images as ``output_type`` (see :mod:`difflab.pipelines.common`). The same ``seed``
    gives the same image i whatever ``batch_size``.
    """
    # 1. Check inputs.
    opts = resolve(options, TEXT_DEFAULTS, overrides)
    check_output_type(output_type)
    _, device = sample_device(denoiser, opts)
    shape = text_sample_shape(denoiser, vae, height=height, width=width, latent_shape=latent_shape, latents=latents)

    # 2. Encode the prompts (and negatives, in the same call).
    cond, uncond, n = encode_request(denoiser, text_encoder, prompts, negative_prompts, opts, prompt_embeds=prompt_embeds,
                                     negative_prompt_embeds=negative_prompt_embeds)
    cond, uncond = add_conditions(cond, uncond, added_cond, negative_added_cond, n, dtype=sample_device(denoiser, opts)[0],
                                  device=device)
    if latents is not None and len(latents) != n:
        raise ValueError(f"latents has {len(latents)} samples for {n} prompts")

    # 3. Build the grid.
    sigmas = sampling_grid(denoiser, opts.steps, opts.grid, opts.spacing, opts.steps_offset)
    prior = float(denoiser.prior_std(sigmas[0]))

    def sample_batch(start, b, noise):
        # 4. Per-sample noise: sample i has its own generator (its first draw is its starting noise).
        x = noise()
        if latents is not None:
            x = latents[start:start + b].to(device, opts.dtype)
        # 5-6. Guidance (the unconditional branch sees the negative prompts), then the sampler.
        return denoise(denoiser, x * prior, sigmas, opts, noise, batch_slice(cond, start, b), batch_slice(uncond, start, b))

    samples = run_options(n, shape, sample_batch, opts, device=device,
                          desc=f"text to image ({opts.sampler}, {len(sigmas) - 1} steps)")
    # 7. Decode and convert.
    return finish(samples, vae, output_type, opts.batch_size)
