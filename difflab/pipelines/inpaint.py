"""Inpainting: fill the masked part of an image under a prompt, with any model (replacement,
RePaint) or with a mask-channel model (Stable Diffusion inpainting). Text-to-image with a mask
wrapper around the sampler or the denoiser (:mod:`difflab.guidance.inpaint`)."""
from __future__ import annotations

import functools

import torch

from ..guidance.inpaint import MaskChannels, check_mask, latent_mask, mask_channels, sample_repaint
from ..samplers import get_sampler
from .image_to_image import noised_start, start_index
from .text_to_image import (_net_config, as_images, batch_slice, check_output_type, check_size, encode, encode_prompts,
                            finish, guided, noise_kwargs, param_dtype_device, run_batches, sampling_grid, vae_factor)

MODES = ("auto", "replace", "channels")


def inpaint_mode(denoiser, channels: int, mode: str = "auto") -> str:
    """``"channels"`` for a network taking 2C + 1 input channels (samples, mask, masked-image
    latents), ``"replace"`` for one taking C; ``mode`` forces one (and is checked)."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is unknown; choose one of {list(MODES)}")
    in_channels = getattr(_net_config(denoiser), "in_channels", channels)
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
def inpaint(
    denoiser,
    text_encoder,
    vae,
    prompts,
    image,
    mask,
    *,
    mode: str = "auto",
    strength: float = 1.0,
    resample: int = 1,
    jump_length: int = 1,
    keep_known_pixels: bool = True,
    negative_prompts=None,
    guidance_scale: float = 7.5,
    guidance_rescale: float = 0.0,
    sampler: str = "ddim",
    steps: int = 50,
    grid="default",
    spacing: str = "trailing",
    steps_offset: int = 0,
    seed: int = 0,
    batch_size: int = 8,
    output_type: str = "pil",
    latents: torch.Tensor | None = None,
    sample_posterior: bool = True,
    prompt_embeds: torch.Tensor | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    **sampler_kwargs,
):
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
    sampler's and RePaint's. Other arguments as :func:`text_to_image`. Returns N images.
    """
    # 1. Check inputs.
    check_output_type(output_type)
    run = get_sampler(sampler)
    net_dtype, device = param_dtype_device(denoiser)
    sigmas = sampling_grid(denoiser, steps, grid, spacing, steps_offset)
    k = start_index(len(sigmas) - 1, strength)

    # 2. Encode the prompts (and negatives, in the same call).
    cond, uncond, n = encode_prompts(text_encoder, prompts, negative_prompts, guided=guidance_scale != 1.0,
                                     prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                                     dtype=net_dtype, device=device)
    images = as_images(image, n, None if vae is None else int(vae.config.in_channels))
    channels = images.shape[1] if vae is None else int(vae.config.latent_channels)
    shape = (channels, *check_size(denoiser, vae, *images.shape[2:], names=("image height", "image width")))
    masks = check_mask(mask, images).expand(n, -1, -1, -1)
    mode = inpaint_mode(denoiser, channels, mode)
    if latents is not None and tuple(latents.shape) != (n, *shape):
        raise ValueError(f"latents must be (N, C, h, w) = {(n, *shape)}, got {tuple(latents.shape)}")
    if latents is not None and strength < 1:
        raise ValueError("latents (starting noise) apply to strength=1; with strength < 1 the start is the noised image")

    # 3. Build the grid, sliced by strength.
    sigmas = sigmas[k:]
    prior = float(denoiser.prior_std(sigmas[0]))
    small = latent_mask(masks, vae_factor(vae), "any" if mode == "replace" else "nearest").to(device, dtype)

    def sample_batch(start, b, draws):
        # 4. Starting point and known latents (draw 1: the starting noise; then the posterior's).
        eps = draws()
        rows = slice(start, start + b)
        z = None
        if mode == "replace" or strength < 1:
            z = encode(vae, images[rows], sample=sample_posterior, noise=draws).to(device, dtype)
        if strength < 1:
            x = noised_start(z, float(sigmas[0]), eps)
        else:
            x = (eps if latents is None else latents[rows].to(device, dtype)) * prior
        # 5. Wrap: the mask around the sampler (replace) or the denoiser (channels); then guidance.
        model, sample, extra = denoiser, run, batch_slice(cond, start, b)
        if mode == "replace":
            sample = functools.partial(sample_repaint, known=z, mask=small[rows], sampler=run, resample=resample,
                                       jump_length=jump_length)
        else:
            masked = images[rows] * (masks[rows] < 0.5)
            latent = encode(vae, masked, sample=sample_posterior, noise=draws).to(device, dtype)
            model, extra = MaskChannels(denoiser), {**extra, "mask_channels": mask_channels(small[rows], latent)}
        model = guided(model, guidance_scale, batch_slice(uncond, start, b), guidance_rescale)
        # 6. Run the sampler.
        return sample(model, x, sigmas, extra_args=extra, **noise_kwargs(sample, draws), **sampler_kwargs)

    samples = run_batches(n, batch_size, seed, shape, sample_batch, device=device, dtype=dtype,
                          desc=f"inpaint ({mode}, {sampler}, {len(sigmas) - 1} steps)", progress=progress)
    # 7. Decode, put the known pixels back, convert.
    paste = (lambda x, s: paste_known(x, images[s:s + len(x)].clamp(-1, 1), masks[s:s + len(x)])) if keep_known_pixels else None
    return finish(samples, vae, output_type, batch_size, paste)
