"""Stable Diffusion 3 text to image (Esser et al. 2024): prompts in, images out, by rectified flow.

The stages are :func:`difflab.pipelines.text_to_image`'s, with SD3's conditioning (the text
tokens ``context`` and the pooled vector ``pooled`` of :class:`~difflab.nn.sd3_text.SD3TextEncoder`)
and SD3's grid: t uniform, then shifted, t' = shift t / (1 + (shift - 1) t) (Esser et al. 2024,
eq. 23; ``shift = 3`` for SD3), as diffusers' ``FlowMatchEulerDiscreteScheduler`` builds it
(:func:`sd3_sigmas`). Its step is difflab's ``flow_euler`` sampler, the default; any sampler works.
"""
from __future__ import annotations

import torch

from ..core import grids
from ..samplers.flow import SAMPLERS as FLOW_SAMPLERS
from .common import (as_images, as_prompts, batch_slice, check_output_type, check_size, denoise, encode, finish,
                     image_channels, latent_channels, run_options, sample_device, sampling_grid)
from .image_to_image import noised_start, start_index
from .options import SampleOptions, resolve
from .text_to_image import text_sample_shape

# diffusers' StableDiffusion3Pipeline defaults: 28 steps, guidance 7
SD3_DEFAULTS = SampleOptions(sampler="flow_euler", steps=28, guidance_scale=7.0, batch_size=8)


def sd3_sigmas(steps: int, shift: float = 3.0, T: int = 1000, exact_one: bool = False) -> torch.Tensor:
    """SD3's sampling grid (diffusers' ``FlowMatchEulerDiscreteScheduler.set_timesteps``): t uniform from
    1 to shift(1 / T), each then time-shifted (Esser et al. 2024, eq. 23), as canonical sigmas ending
    in 0; t = 1 is the largest finite sigma, or exactly 1 with ``exact_one`` (the flow samplers; see
    :func:`difflab.core.grids.flow_sigmas`)."""
    if not shift > 0:
        raise ValueError(f"shift={shift} must be > 0")
    t_min = shift / T / (1 + (shift - 1) / T)  # the scheduler's sigma_min: the smallest training level, shifted
    return grids.flow_sigmas(steps, shift=shift, t_min=t_min, exact_one=exact_one)


def sd3_grid(denoiser, opts: SampleOptions, shift: float) -> torch.Tensor:
    """The grid of ``opts``: :func:`sd3_sigmas` with the frame's ``time_scale`` as T for the default
    (from t = 1 exactly for the flow samplers, as diffusers), any other grid as
    :func:`~difflab.pipelines.common.sampling_grid` builds it."""
    if isinstance(opts.grid, str) and opts.grid == "default":
        return sd3_sigmas(opts.steps, shift, int(getattr(denoiser.frame, "time_scale", 1000)),
                          exact_one=opts.sampler in FLOW_SAMPLERS)
    return sampling_grid(denoiser, opts.steps, opts.grid, opts.spacing, opts.steps_offset)


def _rows(name: str, value, n: int, ndim: int) -> torch.Tensor:
    """``value`` (n or 1, ...) with ``ndim`` dims, expanded to n rows; a ValueError naming ``name`` otherwise."""
    if not isinstance(value, torch.Tensor) or value.ndim != ndim or value.shape[0] not in (1, n):
        shape = "(N, L, D)" if ndim == 3 else "(N, P)"
        raise ValueError(f"{name} must be a {shape} tensor with N = {n} rows (or one), "
                         f"got {tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}")
    return value.expand(n, *value.shape[1:])


def encode_sd3_prompts(text_encoder, prompts, negative_prompts=None, *, guided: bool = True, prompt_embeds=None,
                       pooled_prompt_embeds=None, negative_prompt_embeds=None, negative_pooled_prompt_embeds=None,
                       dtype=None, device=None) -> tuple[dict, dict | None, int]:
    """Prompts -> ``(cond, uncond, n)`` with ``cond = {"context": (n, L, D), "pooled": (n, P)}`` and
    the unconditional branch from the negative prompts (default ``""``, encoded like any prompt, as
    diffusers does; None when not ``guided``). Prompts and negatives are encoded in one call.
    Precomputed ``prompt_embeds`` and ``pooled_prompt_embeds`` (and the negative pair) replace the encoder.
    """
    if (prompt_embeds is None) != (pooled_prompt_embeds is None):
        raise ValueError("give prompt_embeds and pooled_prompt_embeds together (SD3 conditions on both)")
    if (negative_prompt_embeds is None) != (negative_pooled_prompt_embeds is None):
        raise ValueError("give negative_prompt_embeds and negative_pooled_prompt_embeds together")
    if prompt_embeds is not None and prompts is not None:
        raise ValueError("give prompts or prompt_embeds, not both")
    if prompt_embeds is None and prompts is None:
        raise ValueError("give prompts (a non-empty list of strings) or prompt_embeds and pooled_prompt_embeds")
    prompts = None if prompts is None else as_prompts(prompts)
    if prompts is not None and not prompts:
        raise ValueError("prompts is an empty list: give at least one prompt (use '' for an unconditional image)")
    if prompts is None and (not isinstance(prompt_embeds, torch.Tensor) or prompt_embeds.ndim != 3):
        raise ValueError(f"prompt_embeds must be an (N, L, D) tensor, got {getattr(prompt_embeds, 'shape', type(prompt_embeds).__name__)}")
    n = len(prompts) if prompts is not None else prompt_embeds.shape[0]
    negatives = [""] * n if negative_prompts is None else as_prompts(negative_prompts, "negative_prompts")
    negatives = negatives * n if len(negatives) == 1 else negatives
    if len(negatives) != n:
        raise ValueError(f"negative_prompts has {len(negatives)} entries for {n} prompts: give one, or one per prompt")
    if negative_prompts is not None and negative_prompt_embeds is not None:
        raise ValueError("give negative_prompts or negative_prompt_embeds, not both")
    if prompts is None:
        cond = {"context": prompt_embeds, "pooled": _rows("pooled_prompt_embeds", pooled_prompt_embeds, n, 2)}
    negatives = negatives if guided and negative_prompt_embeds is None else []
    to_encode = (prompts or []) + negatives
    if to_encode:
        if text_encoder is None:
            raise ValueError("prompts need a text_encoder (or pass the prompt and pooled embeddings)")
        context, pooled = text_encoder.encode(to_encode)
    if prompts is not None:
        cond = {"context": context[:n], "pooled": pooled[:n]}
    cond = {k: v.to(device, dtype) for k, v in cond.items()}
    if not guided:
        return cond, None, n
    if negative_prompt_embeds is not None:
        uncond = {"context": _rows("negative_prompt_embeds", negative_prompt_embeds, n, 3),
                  "pooled": _rows("negative_pooled_prompt_embeds", negative_pooled_prompt_embeds, n, 2)}
    else:
        rest = slice(len(to_encode) - n, None)
        uncond = {"context": context[rest], "pooled": pooled[rest]}
    if uncond["context"].shape[1:] != cond["context"].shape[1:] or uncond["pooled"].shape[1:] != cond["pooled"].shape[1:]:
        raise ValueError(f"negative embeddings {tuple(uncond['context'].shape)}, {tuple(uncond['pooled'].shape)} do not match "
                         f"the prompt embeddings {tuple(cond['context'].shape)}, {tuple(cond['pooled'].shape)}")
    return cond, {k: v.to(device, dtype) for k, v in uncond.items()}, n


@torch.no_grad()
def sd3_text_to_image(denoiser, text_encoder, vae, prompts=None, *, negative_prompts=None, height: int | None = None,
                      width: int | None = None, shift: float = 3.0, output_type: str = "pil",
                      latents: torch.Tensor | None = None, prompt_embeds=None, pooled_prompt_embeds=None,
                      negative_prompt_embeds=None, negative_pooled_prompt_embeds=None,
                      options: SampleOptions | None = None, **overrides):
    """Rectified-flow text to image (Esser et al. 2024) with classifier-free guidance (Ho & Salimans
    2022, eq. 6; on x0, which is the same as on the velocity since x0 = x_t - t u is affine in u).

    ``denoiser``: ``D(x, sigma, context=, pooled=)`` (``SD3Components.denoiser``); ``text_encoder``:
    an :class:`~difflab.nn.sd3_text.SD3TextEncoder`; ``vae``: the 16-channel ``AutoencoderKL``.
    ``shift``: the grid's time shift (``SD3Components.sampling["shift"]``, 3 for SD3), used by the
    default grid :func:`sd3_sigmas`; ``options`` / ``overrides`` as :func:`~difflab.pipelines.text_to_image`
    (defaults: ``flow_euler``, 28 steps, guidance 7, diffusers'). ``latents``: standard normal starting
    noise (N, C, h, w), diffusers' ``latents=``. Returns N images as ``output_type``.
    """
    # 1. Check inputs.
    opts = resolve(options, SD3_DEFAULTS, overrides)
    check_output_type(output_type)
    net_dtype, device = sample_device(denoiser, opts)
    shape = text_sample_shape(denoiser, vae, height=height, width=width, latents=latents)

    # 2. Encode the prompts and negatives: text tokens and pooled vectors.
    cond, uncond, n = encode_sd3_prompts(
        text_encoder, prompts, negative_prompts, guided=opts.guidance_scale != 1.0, prompt_embeds=prompt_embeds,
        pooled_prompt_embeds=pooled_prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
        negative_pooled_prompt_embeds=negative_pooled_prompt_embeds, dtype=net_dtype, device=device)
    if latents is not None and len(latents) != n:
        raise ValueError(f"latents has {len(latents)} samples for {n} prompts")

    # 3. Build the grid: SD3's shifted one unless another is asked for.
    sigmas = sd3_grid(denoiser, opts, shift)
    prior = float(denoiser.prior_std(sigmas[0]))

    def sample_batch(start, b, noise):
        # 4. Per-sample noise (or the given latents), scaled to the grid's first level.
        x = noise()  # drawn even when latents are given, so the sampler's later draws stay the same
        if latents is not None:
            x = latents[start:start + b].to(device, opts.dtype)
        # 5-6. Guidance (the unconditional branch sees the negative prompts), then the sampler.
        return denoise(denoiser, x * prior, sigmas, opts, noise, batch_slice(cond, start, b), batch_slice(uncond, start, b))

    samples = run_options(n, shape, sample_batch, opts, device=device, desc=f"SD3 ({opts.sampler}, {len(sigmas) - 1} steps)")
    # 7. Decode ((z / scaling_factor) + shift_factor) and convert.
    return finish(samples, vae, output_type, opts.batch_size)


@torch.no_grad()
def sd3_image_to_image(denoiser, text_encoder, vae, prompts, image, *, strength: float = 0.6, negative_prompts=None,
                       shift: float = 3.0, output_type: str = "pil", noise: torch.Tensor | None = None,
                       sample_posterior: bool = True, options: SampleOptions | None = None, **overrides):
    """SDEdit (Meng et al. 2022, Algorithm 1) with SD3: encode ``image`` ((N or 1, C, H, W) in [-1, 1] or
    Pillow images), noise its latents to sigmas[k] of SD3's grid, x_t = (1 - t) z + t eps (diffusers'
    ``scale_noise``; k by :func:`~difflab.pipelines.image_to_image.start_index`, i.e. diffusers'
    ``StableDiffusion3Img2ImgPipeline`` when ``steps * strength`` is a whole number), and sample
    sigmas[k:]. ``noise``: the standard-normal noise (N, C, h, w) instead of the per-sample draw.
    Other arguments as :func:`sd3_text_to_image`. Returns N images.
    """
    # 1. Check inputs; slice the grid at sigmas[k].
    opts = resolve(options, SD3_DEFAULTS, overrides)
    check_output_type(output_type)
    net_dtype, device = sample_device(denoiser, opts)
    sigmas = sd3_grid(denoiser, opts, shift)
    sigmas = sigmas[start_index(len(sigmas) - 1, strength):]

    # 2. Encode the prompts and negatives; check the images.
    cond, uncond, n = encode_sd3_prompts(text_encoder, prompts, negative_prompts, guided=opts.guidance_scale != 1.0,
                                         dtype=net_dtype, device=device)
    images = as_images(image, n, image_channels(denoiser, vae))
    shape = (latent_channels(denoiser, vae), *check_size(denoiser, vae, *images.shape[2:], names=("image height", "image width")))
    if noise is not None and tuple(noise.shape) != (n, *shape):
        raise ValueError(f"noise must be (N, C, h, w) = {(n, *shape)}, got {tuple(noise.shape)}")

    def sample_batch(start, b, draws):
        # 3. Encode the images ((z - shift_factor) * scaling_factor) and noise them to sigmas[0].
        eps = draws()  # drawn even when noise is given, so the later draws stay the same
        if noise is not None:
            eps = noise[start:start + b]
        z = encode(vae, images[start:start + b], sample=sample_posterior, noise=draws).to(device, opts.dtype)
        x = noised_start(z, float(sigmas[0]), eps)
        # 4-5. Guidance, then the sampler from sigmas[k].
        return denoise(denoiser, x, sigmas, opts, draws, batch_slice(cond, start, b), batch_slice(uncond, start, b))

    samples = run_options(n, shape, sample_batch, opts, device=device, desc=f"SD3 img2img ({opts.sampler}, {len(sigmas) - 1} steps)")
    # 6. Decode and convert.
    return finish(samples, vae, output_type, opts.batch_size)
