"""Stable Diffusion's upscalers: a prompt and a low-resolution image in, an image 4x or 2x its size out.

Both are text-conditional latent diffusion models whose U-Net also sees the low-resolution input,
concatenated to its input along channels (:class:`~difflab.nn.upscaler.ImageConcatNet`, so the
denoiser is called ``D(x, sigma, image=, ...)`` and classifier-free guidance gives both branches
the same image). Loaded from diffusers folders by :func:`difflab.io.upscaler_folder.load_upscaler_folder`.

- :func:`upscale_x4` (diffusers' ``StableDiffusionUpscalePipeline``): the image stays in pixel
  space at the latents' size (the x4 VAE decodes 4x larger). It is first noised by the
  low-resolution schedule at ``noise_level`` (noise-conditioning augmentation, Ho et al. 2022,
  Section 4.1), and the level is the U-Net's class label.
- :func:`upscale_latent` (diffusers' ``StableDiffusionLatentUpscalePipeline``): the image is SD
  latents (or pixels, encoded by the VAE), nearest-upsampled 2x; the U-Net also takes
  ``timestep_cond`` = [Fourier features of noise level 0, the pooled prompt embedding] and is
  EDM-preconditioned with sigma_data = 1 (Karras et al. 2022, Table 1), sampled with Euler.

Per sample, the draws are: the starting noise, then (own stream,
:func:`~difflab.pipelines.super_resolution.augmentation_noise`) the low-resolution image's noise
(x4) or the VAE posterior's (latent upscaler given pixels), then the sampler's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core import grids
from .common import (add_conditions, as_images, as_prompts, batch_slice, check_output_type, denoise, encode, encode_request,
                     finish, net_config, run_options, sample_device, sampling_grid)
from .options import TEXT_DEFAULTS, SampleOptions, resolve
from .super_resolution import augmentation_noise

# diffusers' defaults of both pipelines: 75 steps, guidance 9
UPSCALE_DEFAULTS = TEXT_DEFAULTS.replace(steps=75, guidance_scale=9.0)
# the latent upscaler's noise level (always 0 in diffusers' pipeline) as Fourier features: cos 0 = 1, sin 0 = 0
LEVEL_FEATURES = 64
SCHEDULER_SAMPLERS = {"DDIMScheduler": "ddim", "EulerDiscreteScheduler": "euler", "DDPMScheduler": "ddpm",
                      "EulerAncestralDiscreteScheduler": "euler_ancestral", "DPMSolverMultistepScheduler": "dpmpp_2m"}


def upscaler_defaults(parts) -> SampleOptions:
    """:data:`UPSCALE_DEFAULTS` with a loaded upscaler folder's scheduler hints: its sampler, timestep
    spacing and offset, and (latent upscaler) the Karras grid when the scheduler uses Karras sigmas."""
    s = parts.sampling
    opts = UPSCALE_DEFAULTS.replace(sampler=SCHEDULER_SAMPLERS.get(s.get("scheduler"), "ddim" if parts.kind == "x4" else "euler"),
                                    spacing=s.get("timestep_spacing", "leading"), steps_offset=int(s.get("steps_offset", 0)))
    return opts.replace(grid="karras", steps_offset=0) if s.get("grid") == "karras" else opts


def check_noise_level(noise_level, max_noise_level: int, alpha_bars: torch.Tensor) -> int:
    """``noise_level`` as an int in [0, max_noise_level] (and within the low-res schedule)."""
    if isinstance(noise_level, bool) or not isinstance(noise_level, int) or not 0 <= noise_level <= max_noise_level \
            or noise_level >= len(alpha_bars):
        raise ValueError(f"noise_level={noise_level!r} must be an int in [0, {max_noise_level}] (the folder's max_noise_level)")
    return noise_level


@torch.no_grad()
def upscale_x4(denoiser, text_encoder, vae, prompts, image, *, low_res_alpha_bars: torch.Tensor, noise_level: int = 20,
               max_noise_level: int = 350, negative_prompts=None, output_type: str = "pil", latents: torch.Tensor | None = None,
               low_res_noise: torch.Tensor | None = None, options: SampleOptions | None = None, **overrides):
    """The x4 upscaler (diffusers' ``StableDiffusionUpscalePipeline``): ``image`` (N or 1, 3, h, w)
    in [-1, 1] or Pillow images, one per prompt, to N images of 4h x 4w.

    ``low_res_alpha_bars``: the low-resolution schedule (``UpscalerComponents.low_res_alpha_bars``);
    the image becomes sqrt(a) image + sqrt(1 - a) eps with a = alpha_bar[noise_level] and the
    U-Net is told ``noise_level`` (its class label; Ho et al. 2022, Section 4.1: more noise, more
    freedom to invent detail). ``latents``: standard-normal starting noise (N, 4, h, w) and
    ``low_res_noise`` (N, 3, h, w) the low-res image's noise, instead of the per-sample draws.
    Options as :func:`~difflab.pipelines.text_to_image` (defaults: 75 steps, guidance 9).
    """
    # 1. Check inputs.
    opts = resolve(options, UPSCALE_DEFAULTS, overrides)
    check_output_type(output_type)
    net_dtype, device = sample_device(denoiser, opts)
    alpha_bars = torch.as_tensor(low_res_alpha_bars, dtype=torch.float64)
    level = check_noise_level(noise_level, max_noise_level, alpha_bars)
    n = len(as_prompts(prompts))
    if not n:
        raise ValueError("prompts is an empty list: give at least one prompt (use '' for an unconditional image)")
    images = as_images(image, n, channels=3)
    c, (h, w) = 4 if vae is None else int(vae.config.latent_channels), images.shape[2:]
    for name, given, shape in (("latents", latents, (n, c, h, w)), ("low_res_noise", low_res_noise, (n, 3, h, w))):
        if given is not None and tuple(given.shape) != shape:
            raise ValueError(f"{name} must be {shape} for {n} prompts and images of {h} x {w}, got {tuple(given.shape)}")

    # 2. Encode the prompts (and negatives, in the same call); the level is every sample's class label.
    cond, uncond, n = encode_request(denoiser, text_encoder, prompts, negative_prompts, opts)
    labels = {"class_labels": torch.full((1,), level, dtype=torch.long)}
    cond, uncond = add_conditions(cond, uncond, labels, None, n, dtype=net_dtype, device=device)

    # 3. Build the grid.
    sigmas = sampling_grid(denoiser, opts.steps, opts.grid, opts.spacing, opts.steps_offset)
    prior = float(denoiser.prior_std(sigmas[0]))
    a = float(alpha_bars[level])

    def sample_batch(start, b, noise):
        # 4. Starting noise; the low-res image noised at its level (its own stream).
        x = noise() if latents is None else latents[start:start + b].to(device, opts.dtype)
        eps = augmentation_noise(opts.seed, start, b, (3, h, w))() if low_res_noise is None else low_res_noise[start:start + b]
        low = (a ** 0.5) * images[start:start + b] + ((1 - a) ** 0.5) * eps.float()
        extra = {"image": low.to(device, net_dtype)}
        # 5-6. Guidance (both branches see the image and its level), then the sampler.
        return denoise(denoiser, x * prior, sigmas, opts, noise, {**batch_slice(cond, start, b), **extra},
                       None if uncond is None else {**batch_slice(uncond, start, b), **extra})

    samples = run_options(n, (c, h, w), sample_batch, opts, device=device, desc=f"upscale x4 ({opts.sampler}, {len(sigmas) - 1} steps)")
    # 7. Decode (4x larger) and convert.
    return finish(samples, vae, output_type, opts.batch_size)


def latent_upscaler_grid(denoiser, opts: SampleOptions, timestep_frame=None) -> torch.Tensor:
    """The latent upscaler's sigmas: ``opts.grid`` on its EDM frame (``"karras"``: Karras et al.
    2022, eq. 5 over the schedule's range, diffusers' ``use_karras_sigmas``), or for ``"default"``
    / ``"timesteps"`` the discrete schedule's timestep grid (``timestep_frame``, ``spacing``,
    ``steps_offset``) as diffusers' EulerDiscreteScheduler walks it."""
    if isinstance(opts.grid, str) and opts.grid in ("default", "timesteps"):
        if timestep_frame is None:
            raise ValueError("the timestep grid of the latent upscaler needs timestep_frame (UpscalerComponents.timestep_frame)")
        return grids.timestep_sigmas(timestep_frame, grids.discrete_timesteps(timestep_frame.T, opts.steps, opts.spacing,
                                                                              opts.steps_offset))
    return sampling_grid(denoiser, opts.steps, opts.grid, opts.spacing, 0)


@torch.no_grad()
def upscale_latent(denoiser, text_encoder, vae, prompts, image, *, negative_prompts=None, output_type: str = "pil",
                   latents: torch.Tensor | None = None, timestep_frame=None, options: SampleOptions | None = None, **overrides):
    """The x2 latent upscaler (diffusers' ``StableDiffusionLatentUpscalePipeline``): ``image`` is
    SD latents (N or 1, 4, h, w) (a text-to-image run's ``output_type="latent"``), or images (N or
    1, 3, H, W) in [-1, 1] / Pillow images that the VAE encodes; the output is N images of 2x the
    size (16 h x 16 w pixels for latents).

    The U-Net sees the latents upsampled 2x (nearest) beside the sample, and ``timestep_cond`` =
    [1 x 64, 0 x 64, pooled prompt embedding]: the Fourier features of noise level 0 and the
    pooled CLIP vector. As diffusers, guidance applies only for ``guidance_scale > 1`` and
    ``guidance_scale = 0`` replaces the prompts by ''. ``latents``: standard-normal starting noise
    (N, 4, 2h, 2w). ``timestep_frame``: for the timestep grids (:func:`latent_upscaler_grid`).
    Options as :func:`~difflab.pipelines.text_to_image` (defaults: Euler, 75 steps, guidance 9).
    """
    # 1. Check inputs; diffusers' guidance rule.
    opts = resolve(options, UPSCALE_DEFAULTS, overrides)
    check_output_type(output_type)
    net_dtype, device = sample_device(denoiser, opts)
    prompts = as_prompts(prompts)
    if not prompts:
        raise ValueError("prompts is an empty list: give at least one prompt (use '' for an unconditional image)")
    n, scale = len(prompts), opts.guidance_scale
    if scale == 0:
        prompts = [""] * n
    if scale <= 1:
        opts = opts.replace(guidance_scale=1.0)
    if text_encoder is None:
        raise ValueError("the latent upscaler needs its text_encoder (hidden states and the pooled vector)")
    pixels = not (torch.is_tensor(image) and image.ndim == 4 and image.shape[1] == 4)
    images = as_images(image, n, channels=3) if pixels else as_images(image, n, channels=4, name="image (latents)")
    if pixels and vae is None:
        raise ValueError("image holds pixels (3 channels), but no vae was given to encode them: give SD latents (N, 4, h, w) or the vae")
    f = vae.downsample_factor if pixels else 1
    c, h, w = 4, images.shape[2] // f, images.shape[3] // f
    if latents is not None and tuple(latents.shape) != (n, c, 2 * h, 2 * w):
        raise ValueError(f"latents must be {(n, c, 2 * h, 2 * w)} for {n} prompts, got {tuple(latents.shape)}")

    # 2. Encode the prompts and negatives in one call: the last hidden states and the pooled vectors.
    guided = opts.guidance_scale != 1.0
    negatives = (as_prompts("" if negative_prompts is None else negative_prompts, "negative_prompts")) if guided else []
    negatives = negatives * n if len(negatives) == 1 else negatives
    if guided and len(negatives) != n:
        raise ValueError(f"negative_prompts has {len(negatives)} entries for {n} prompts: give one, or one per prompt")
    hidden, pooled = text_encoder.encode(prompts + negatives)
    level = pooled.new_tensor([1.0] * LEVEL_FEATURES + [0.0] * LEVEL_FEATURES).expand(len(pooled), -1)
    timestep_cond = torch.cat([level, pooled], dim=-1)
    cond, uncond, _ = encode_request(denoiser, None, None, None, opts, prompt_embeds=hidden[:n],
                                     negative_prompt_embeds=hidden[n:] if guided else None)
    cond, uncond = add_conditions(cond, uncond, {"timestep_cond": timestep_cond[:n]},
                                  {"timestep_cond": timestep_cond[n:]} if guided else None, n, dtype=net_dtype, device=device)

    # 3. Build the grid.
    sigmas = latent_upscaler_grid(denoiser, opts, timestep_frame)
    prior = float(denoiser.prior_std(sigmas[0]))

    def sample_batch(start, b, noise):
        # 4. Starting noise; the image's latents (a posterior draw on its own stream), upsampled 2x.
        x = noise() if latents is None else latents[start:start + b].to(device, opts.dtype)
        z = images[start:start + b]
        if pixels:
            z = encode(vae, z, sample=True, noise=augmentation_noise(opts.seed, start, b, (c, h, w)))
        extra = {"image": F.interpolate(z.float(), scale_factor=2, mode="nearest").to(device, net_dtype)}
        # 5-6. Guidance (both branches see the image), then the sampler.
        return denoise(denoiser, x * prior, sigmas, opts, noise, {**batch_slice(cond, start, b), **extra},
                       None if uncond is None else {**batch_slice(uncond, start, b), **extra})

    samples = run_options(n, (c, 2 * h, 2 * w), sample_batch, opts, device=device,
                          desc=f"latent upscale x2 ({opts.sampler}, {len(sigmas) - 1} steps)")
    # 7. Decode and convert.
    return finish(samples, vae, output_type, opts.batch_size)


@torch.no_grad()
def upscale(parts, prompts, image, *, options: SampleOptions | None = None, **kwargs):
    """Either upscaler from its loaded folder (:class:`~difflab.io.upscaler_folder.UpscalerComponents`)
    with the folder's defaults (:func:`upscaler_defaults`); keywords as :func:`upscale_x4` /
    :func:`upscale_latent` (``noise_level`` for the x4)."""
    fields = SampleOptions.fields()
    opts = resolve(options, upscaler_defaults(parts), {k: v for k, v in kwargs.items() if k in fields})
    rest = {k: v for k, v in kwargs.items() if k not in fields}
    args = (parts.denoiser, parts.text_encoder, parts.vae, prompts, image)
    if parts.kind == "x4":
        return upscale_x4(*args, low_res_alpha_bars=parts.low_res_alpha_bars, max_noise_level=parts.max_noise_level,
                          options=opts, **rest)
    if "noise_level" in rest:
        raise ValueError("noise_level is the x4 upscaler's; the latent upscaler always runs at level 0 (as diffusers')")
    return upscale_latent(*args, timestep_frame=parts.timestep_frame, options=opts, **rest)


__all__ = ["upscale", "upscale_x4", "upscale_latent", "upscaler_defaults", "latent_upscaler_grid", "check_noise_level",
           "UPSCALE_DEFAULTS"]
