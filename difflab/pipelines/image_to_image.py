"""Image to image (SDEdit; Meng et al. 2022): noise a real image part of the way, then denoise it
under a prompt. Not a new sampler: text-to-image started mid-grid, from ``sigmas[k:]``."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.forward import ve_sample
from .common import (add_conditions, as_images, batch_slice, check_output_type, check_size, denoise, encode, encode_request, finish,
                     image_channels, latent_channels, run_options, sample_device, sampling_grid)
from .options import TEXT_DEFAULTS, SampleOptions, resolve


def start_index(steps: int, strength: float) -> int:
    """k such that img2img runs on ``sigmas[k:]`` of a ``steps``-step grid: SDEdit's t0 = strength
    (Meng et al. 2022, Algorithm 1) as diffusers' ``StableDiffusionImg2ImgPipeline.get_timesteps``
    rounds it, k = steps - min(int(steps * strength), steps). ``strength`` = 1 starts from pure
    noise at sigmas[0]; int() rounds down, so 0.75 of 10 steps runs 7 of them."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength={strength} must be in (0, 1]: the fraction of the grid to run (1 = from pure noise)")
    run = min(int(steps * strength), steps)
    if run < 1:
        raise ValueError(f"strength={strength} of {steps} steps runs no step (int(steps * strength) = 0): raise strength or steps")
    return steps - run


def noised_start(z: torch.Tensor, sigma: float, noise: torch.Tensor) -> torch.Tensor:
    """SDEdit's starting point x = x0 + sigma eps (Meng et al. 2022, eq. 2 in the canonical frame;
    diffusers' ``scheduler.add_noise`` divided by sqrt(alpha_bar))."""
    return ve_sample(z, sigma, noise.to(z.device, z.dtype))


@dataclass(frozen=True)
class ImageRequest:
    """What img2img and inpainting know after their first stages: the options, the device to
    sample on, the grid sliced at sigmas[k], the prompts' conditioning (n of them), the images
    (n, C, H, W) and the shape of one sample."""

    opts: SampleOptions
    device: torch.device
    sigmas: torch.Tensor
    cond: dict
    uncond: dict | None
    n: int
    images: torch.Tensor
    shape: tuple


def image_request(denoiser, text_encoder, vae, prompts, image, options, overrides: dict, *, output_type: str,
                  strength: float, negative_prompts=None, prompt_embeds=None, negative_prompt_embeds=None,
                  channels: int | None = None, added_cond: dict | None = None, negative_added_cond: dict | None = None) -> ImageRequest:
    """Stages 1-3 of img2img and inpainting: the options (:func:`~difflab.pipelines.options.resolve`),
    the grid sliced by ``strength`` (:func:`start_index`), the prompts and negatives encoded in one
    call, the images checked (``channels`` of them, None for any) and the sample shape (latent
    channels, image size / VAE factor); ``added_cond`` / ``negative_added_cond`` joined by
    :func:`~difflab.pipelines.common.add_conditions`."""
    opts = resolve(options, TEXT_DEFAULTS, overrides)
    check_output_type(output_type)
    net_dtype, device = sample_device(denoiser, opts)
    sigmas = sampling_grid(denoiser, opts.steps, opts.grid, opts.spacing, opts.steps_offset)
    k = start_index(len(sigmas) - 1, strength)
    cond, uncond, n = encode_request(denoiser, text_encoder, prompts, negative_prompts, opts, prompt_embeds=prompt_embeds,
                                     negative_prompt_embeds=negative_prompt_embeds)
    cond, uncond = add_conditions(cond, uncond, added_cond, negative_added_cond, n, dtype=net_dtype, device=device)
    images = as_images(image, n, channels)
    latent = images.shape[1] if vae is None else latent_channels(denoiser, vae)
    shape = (latent, *check_size(denoiser, vae, *images.shape[2:], names=("image height", "image width")))
    return ImageRequest(opts, device, sigmas[k:], cond, uncond, n, images, shape)


@torch.no_grad()
def image_to_image(denoiser, text_encoder, vae, prompts, image, *, strength: float = 0.8, negative_prompts=None,
                   output_type: str = "pil", noise: torch.Tensor | None = None, sample_posterior: bool = True,
                   prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
                   added_cond: dict | None = None, negative_added_cond: dict | None = None,
                   options: SampleOptions | None = None, **overrides):
    """SDEdit (Meng et al. 2022, Algorithm 1): encode ``image``, add noise to the level
    sigmas[k] with k = :func:`start_index` (``strength``), and run the sampler on sigmas[k:].

    ``image``: (N or 1, C, H, W) in [-1, 1] or Pillow image(s). Its latents are a sample of the
    VAE's posterior (``sample_posterior=True``, diffusers' default ``sample_mode="sample"``) or its
    mean; either way the draw is the sample's own. ``noise``: the standard-normal noise (N, C, h, w)
    added to the latents, instead of the per-sample draw (diffusers draws it after the posterior
    sample, from the same generator). ``options`` and other arguments as :func:`text_to_image`.
    Returns N images.
    """
    # 1-3. Check inputs, encode the prompts (and negatives, in the same call), slice the grid at sigmas[k].
    req = image_request(denoiser, text_encoder, vae, prompts, image, options, overrides, output_type=output_type,
                        strength=strength, negative_prompts=negative_prompts, prompt_embeds=prompt_embeds,
                        negative_prompt_embeds=negative_prompt_embeds, channels=image_channels(denoiser, vae),
                        added_cond=added_cond, negative_added_cond=negative_added_cond)
    opts, device, sigmas, images, n, shape = req.opts, req.device, req.sigmas, req.images, req.n, req.shape
    if noise is not None and tuple(noise.shape) != (n, *shape):
        raise ValueError(f"noise must be (N, C, h, w) = {(n, *shape)}, got {tuple(noise.shape)}")

    def sample_batch(start, b, draws):
        # 4. Encode the images and add noise at sigmas[k] (draw 1: that noise, draw 2: the posterior's).
        eps = draws()
        if noise is not None:
            eps = noise[start:start + b]
        z = encode(vae, images[start:start + b], sample=sample_posterior, noise=draws).to(device, opts.dtype)
        x = noised_start(z, float(sigmas[0]), eps)
        # 5-6. Guidance, then the sampler from sigmas[k].
        return denoise(denoiser, x, sigmas, opts, draws, batch_slice(req.cond, start, b), batch_slice(req.uncond, start, b))

    samples = run_options(n, shape, sample_batch, opts, device=device,
                          desc=f"image to image ({opts.sampler}, {len(sigmas) - 1} steps)")
    # 7. Decode and convert.
    return finish(samples, vae, output_type, opts.batch_size)
