"""Image to image (SDEdit; Meng et al. 2022): noise a real image part of the way, then denoise it
under a prompt. Not a new sampler: text-to-image started mid-grid, from ``sigmas[k:]``."""
from __future__ import annotations

import torch

from ..core.forward import ve_sample
from ..samplers import get_sampler
from .text_to_image import (as_images, batch_slice, check_output_type, check_size, encode, encode_prompts, finish,
                            guided, image_channels, latent_channels, noise_kwargs, param_dtype_device, run_batches,
                            sampling_grid)


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


@torch.no_grad()
def image_to_image(
    denoiser,
    text_encoder,
    vae,
    prompts,
    image,
    *,
    strength: float = 0.8,
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
    noise: torch.Tensor | None = None,
    sample_posterior: bool = True,
    prompt_embeds: torch.Tensor | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    **sampler_kwargs,
):
    """SDEdit (Meng et al. 2022, Algorithm 1): encode ``image``, add noise to the level
    sigmas[k] with k = :func:`start_index` (``strength``), and run the sampler on sigmas[k:].

    ``image``: (N or 1, C, H, W) in [-1, 1] or Pillow image(s). Its latents are a sample of the
    VAE's posterior (``sample_posterior=True``, diffusers' default ``sample_mode="sample"``) or its
    mean; either way the draw is the sample's own. ``noise``: the standard-normal noise (N, C, h, w)
    added to the latents, instead of the per-sample draw (diffusers draws it after the posterior
    sample, from the same generator). Other arguments as :func:`text_to_image`. Returns N images.
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
    images = as_images(image, n, image_channels(denoiser, vae))
    channels = images.shape[1] if vae is None else latent_channels(denoiser, vae)
    shape = (channels, *check_size(denoiser, vae, *images.shape[2:], names=("image height", "image width")))
    if noise is not None and tuple(noise.shape) != (n, *shape):
        raise ValueError(f"noise must be (N, C, h, w) = {(n, *shape)}, got {tuple(noise.shape)}")

    # 3. Slice the grid: start at sigmas[k].
    sigmas = sigmas[k:]

    def sample_batch(start, b, draws):
        # 4. Encode the images and add noise at sigmas[k] (draw 1: that noise, draw 2: the posterior's).
        eps = draws()
        if noise is not None:
            eps = noise[start:start + b]
        z = encode(vae, images[start:start + b], sample=sample_posterior, noise=draws).to(device, dtype)
        x = noised_start(z, float(sigmas[0]), eps)
        # 5. Wrap the denoiser with guidance.
        model = guided(denoiser, guidance_scale, batch_slice(uncond, start, b), guidance_rescale)
        # 6. Run the sampler from sigmas[k].
        return run(model, x, sigmas, extra_args=batch_slice(cond, start, b), **noise_kwargs(run, draws), **sampler_kwargs)

    samples = run_batches(n, batch_size, seed, shape, sample_batch, device=device, dtype=dtype,
                          desc=f"image to image ({sampler}, {len(sigmas) - 1} steps)", progress=progress)
    # 7. Decode and convert.
    return finish(samples, vae, output_type, batch_size)
