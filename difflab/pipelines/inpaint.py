"""Inpainting: fill the masked part of an image under a prompt, with any model (replacement,
RePaint) or with a mask-channel model (Stable Diffusion inpainting). Text-to-image with a mask
wrapper around the sampler or the denoiser (:mod:`difflab.guidance.inpaint`)."""
from __future__ import annotations

import functools

import torch

from ..guidance.inpaint import MaskChannels, check_mask, latent_mask, mask_channels, sample_repaint
from ..samplers import get_sampler
from .common import batch_slice, denoise, encode, finish, net_config, run_options, vae_factor
from .image_to_image import image_request, noised_start
from .options import SampleOptions

MODES = ("auto", "replace", "channels")


def inpaint_mode(denoiser, channels: int, mode: str = "auto") -> str:
    """``"channels"`` for a network taking 2C + 1 input channels (samples, mask, masked-image
    latents), ``"replace"`` for one taking C; ``mode`` forces one (and is checked)."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is unknown; choose one of {list(MODES)}")
    in_channels = getattr(net_config(denoiser), "in_channels", channels)
    kinds = {channels: "replace", 2 * channels + 1: "channels"}
    if in_channels not in kinds:
        raise ValueError(f"the network takes {in_channels} input channels: neither the {channels} sample channels "
                         f"(replacement) nor 2 x {channels} + 1 (a mask-channel inpainting model)")
    if mode != "auto" and mode != kinds[in_channels]:
        raise ValueError(f"mode={mode!r} does not fit a network of {in_channels} input channels ({kinds[in_channels]!r} does)")
    return kinds[in_channels]


def paste_known(images: torch.Tensor, known: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The known pixels put back exactly where ``mask`` is 0: where(mask, images, known)."""
    return torch.where(mask.to(torch.bool).expand_as(images), images, known.to(images.dtype))


@torch.no_grad()
def inpaint(denoiser, text_encoder, vae, prompts, image, mask, *, mode: str = "auto", strength: float = 1.0,
            resample: int = 1, jump_length: int = 1, keep_known_pixels: bool = True, negative_prompts=None,
            output_type: str = "pil", latents: torch.Tensor | None = None, sample_posterior: bool = True,
            prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
            added_cond: dict | None = None, negative_added_cond: dict | None = None,
            options: SampleOptions | None = None, **overrides):
    """Inpainting by replacement (RePaint; Lugmayr et al. 2022, Algorithm 1) or with a mask-channel
    model (Rombach et al. 2022, Section 4.5): fill the region of ``image`` (N or 1, C, H, W in
    [-1, 1], or Pillow images) where ``mask`` (N or 1, 1, H, W, of 0 = keep and 1 = fill) is 1.

    ``mode="replace"`` (any model; RePaint, Lugmayr et al. 2022, Algorithm 1): the sampler is
    wrapped by :func:`difflab.guidance.inpaint.sample_repaint`, which after every step replaces
    the known region by the known latents noised to the new level, with ``resample`` (U) passes
    over stretches of ``jump_length`` steps. Latent models see the mask at latent resolution, a
    latent pixel being known only when every pixel it covers is. In pixel space the known region
    comes out exactly; through a VAE the decoder changes the known pixels too, so
    ``keep_known_pixels=True`` pastes the original pixels back through the mask (exactly, in the
    ``"pt"`` output). ``mode="channels"`` (a mask-channel model, e.g. SD inpainting with a 9-channel
    U-Net): the denoiser is wrapped by :class:`difflab.guidance.inpaint.MaskChannels` and fed
    concat(mask at latent size (nearest), latents of image * (mask < 0.5)), as diffusers'
    ``StableDiffusionInpaintPipeline`` does. ``"auto"`` picks by the network's input channels.

    ``strength`` < 1 starts from the image noised to sigmas[k] (as :func:`image_to_image`);
    ``latents`` (N, C, h, w) standard-normal starting noise for ``strength`` = 1. Per sample the
    draws are: the starting noise, the posterior sample(s) (image, masked image), then the
    sampler's and RePaint's. ``options`` and other arguments as :func:`text_to_image`. Returns N images.
    """
    # 1-3. Check inputs, encode the prompts (and negatives, in the same call), slice the grid by strength.
    req = image_request(denoiser, text_encoder, vae, prompts, image, options, overrides, output_type=output_type,
                        strength=strength, negative_prompts=negative_prompts, prompt_embeds=prompt_embeds,
                        negative_prompt_embeds=negative_prompt_embeds,
                        channels=None if vae is None else int(vae.config.in_channels),
                        added_cond=added_cond, negative_added_cond=negative_added_cond)
    opts, device, sigmas, images, n, shape = req.opts, req.device, req.sigmas, req.images, req.n, req.shape
    masks = check_mask(mask, images).expand(n, -1, -1, -1)
    mode = inpaint_mode(denoiser, shape[0], mode)
    if latents is not None and tuple(latents.shape) != (n, *shape):
        raise ValueError(f"latents must be (N, C, h, w) = {(n, *shape)}, got {tuple(latents.shape)}")
    if latents is not None and strength < 1:
        raise ValueError("latents (starting noise) apply to strength=1; with strength < 1 the start is the noised image")

    # The mask at latent size.
    small = latent_mask(masks, vae_factor(vae), "any" if mode == "replace" else "nearest").to(device, opts.dtype)
    run = get_sampler(opts.sampler)
    repaint = functools.partial(sample_repaint, sampler=run, resample=resample, jump_length=jump_length)

    def sample_batch(start, b, draws):
        rows = slice(start, start + b)
        # 4. Starting point and known latents (draw 1: the starting noise; then the posterior's).
        x, z = inpaint_start(denoiser, vae, images[rows], sigmas, draws, strength=strength, latents=latents,
                             rows=rows, encode_known=mode == "replace", sample_posterior=sample_posterior,
                             device=device, dtype=opts.dtype)
        # 5. Wrap: the mask around the sampler (replace) or the denoiser (channels); 6. guidance and the sampler.
        cond_b, uncond_b = batch_slice(req.cond, start, b), batch_slice(req.uncond, start, b)
        if mode == "replace":
            sample = functools.partial(repaint, known=z, mask=small[rows])
            return denoise(denoiser, x, sigmas, opts, draws, cond_b, uncond_b, sampler=sample)
        masked = images[rows] * (masks[rows] < 0.5)
        latent = encode(vae, masked, sample=sample_posterior, noise=draws).to(device, opts.dtype)
        cond_b = {**(cond_b or {}), "mask_channels": mask_channels(small[rows], latent)}
        return denoise(MaskChannels(denoiser), x, sigmas, opts, draws, cond_b, uncond_b, sampler=run)

    samples = run_options(n, shape, sample_batch, opts, device=device,
                          desc=f"inpaint ({mode}, {opts.sampler}, {len(sigmas) - 1} steps)")
    # 7. Decode, put the known pixels back, convert.
    paste = (lambda x, s: paste_known(x, images[s:s + len(x)].clamp(-1, 1), masks[s:s + len(x)])) if keep_known_pixels else None
    return finish(samples, vae, output_type, opts.batch_size, paste)


def inpaint_start(denoiser, vae, images, sigmas, draws, *, strength: float, latents, rows, encode_known: bool,
                  sample_posterior: bool, device, dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(x, z)`` of one batch: the starting point at sigmas[0] (the known image noised there when
    ``strength`` < 1, else prior noise or ``latents[rows]``) and the known latents ``z`` (None when
    neither replacement nor strength < 1 needs them). The first draw is the starting noise."""
    eps = draws()
    z = None
    if encode_known or strength < 1:
        z = encode(vae, images, sample=sample_posterior, noise=draws).to(device, dtype)
    if strength < 1:
        return noised_start(z, float(sigmas[0]), eps), z
    prior = float(denoiser.prior_std(sigmas[0]))
    return (eps if latents is None else latents[rows].to(device, dtype)) * prior, z
