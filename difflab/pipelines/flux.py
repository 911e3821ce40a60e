"""Flux text-to-image and image-to-image: prompts (and an image) in, images out.

The same numbered stages as :mod:`difflab.pipelines.text_to_image` and
:mod:`~difflab.pipelines.image_to_image`, over the components of a Flux folder
(:class:`difflab.io.flux_folder.FluxComponents`), with three differences from Stable Diffusion:

- the conditioning is T5's token sequence (``context``) and CLIP's pooled vector (``pooled``);
- the grid is the shifted flow grid whose shift grows with the image size (Esser et al. 2024,
  Section 5.3.2; :func:`difflab.core.grids.resolution_shift`), as diffusers' ``FluxPipeline``
  computes it from the scheduler config (:func:`flux_sigmas`);
- FLUX.1-dev is guidance-distilled: ``guidance_scale`` is an input of the network
  (:class:`difflab.guidance.GuidanceInput`), one evaluation per step, no unconditional branch.
  FLUX.1-schnell takes none and ignores it, as diffusers does. On top of it, ``true_cfg_scale``
  with negative prompts is classifier-free guidance (Ho & Salimans 2022, eq. 6) between the
  prompt's and the negative prompt's guided predictions, diffusers' ``true_cfg_scale``.

Samples are the unpacked latents (B, C, H, W); the transformer packs them into 2x2 patches
itself, so every sampler, the VAE and the per-sample seeds work as for Stable Diffusion.

The grid starts at t = 1: exactly, as diffusers, for the flow samplers (``FLOW_SIGMA_ONE``, see
:mod:`difflab.core.denoiser`); other samplers start at the largest finite level, t = 4096/4097.
"""
from __future__ import annotations

import torch

import math

from ..core import grids
from ..samplers.flow import SAMPLERS as FLOW_SAMPLERS
from ..guidance import ClassifierFreeGuidance
from ..io.flux_folder import FluxComponents
from .common import (as_images, batch_slice, check_output_type, check_size, denoise, encode, finish, guided, run_options,
                     sample_device, sampling_grid)
from .image_to_image import noised_start, start_index
from .options import SampleOptions, resolve

# diffusers' FluxPipeline defaults: 28 Euler steps, guidance 3.5 (an input of FLUX.1-dev)
FLUX_DEFAULTS = SampleOptions(sampler="flow_euler", steps=28, guidance_scale=3.5, batch_size=8)
DEFAULT_LATENT_SIZE = 128  # diffusers' default_sample_size: 1024 x 1024 images through an 8x VAE


def flux_sigmas(sampling: dict, steps: int, seq_len: int, exact_one: bool = False) -> torch.Tensor:
    """diffusers' ``FluxPipeline`` grid as canonical sigmas: t uniform from 1 to 1/steps, shifted
    by ``resolution_shift(seq_len, ...)`` when ``sampling["use_dynamic_shifting"]``, else by
    ``sampling["shift"]`` (:func:`difflab.core.grids.flow_sigmas`), then 0; from t = 1 exactly with
    ``exact_one`` (the flow samplers)."""
    if sampling.get("use_dynamic_shifting", False):
        shift = grids.resolution_shift(seq_len, sampling["base_image_seq_len"], sampling["max_image_seq_len"],
                                       sampling["base_shift"], sampling["max_shift"])
    else:
        shift = float(sampling.get("shift", 1.0))
    return grids.flow_sigmas(steps, shift=shift, exact_one=exact_one)


def flux_grid(flux: FluxComponents, opts: SampleOptions, seq_len: int) -> torch.Tensor:
    """The grid of a run: :func:`flux_sigmas` for ``grid="default"``, else ``opts.grid`` (a name
    of :data:`difflab.core.grids.GRIDS` or explicit sigmas)."""
    if isinstance(opts.grid, str) and opts.grid == "default":
        return flux_sigmas(flux.sampling, opts.steps, seq_len, exact_one=opts.sampler in FLOW_SAMPLERS)
    return sampling_grid(flux.denoiser, opts.steps, opts.grid, opts.spacing)


def encode_flux_prompts(text_encoder, text_encoder_2, prompts, *, max_sequence_length: int = 512, prompt_embeds=None,
                        pooled_prompt_embeds=None, dtype=None, device=None) -> tuple[dict, int]:
    """Prompts -> ``({"context": T5 hidden states (n, L, D), "pooled": CLIP pooled (n, P)}, n)``
    (diffusers' ``FluxPipeline.encode_prompt``: T5 padded to ``max_sequence_length``, CLIP's 77
    tokens). Or precomputed ``prompt_embeds`` (n, L, D) with ``pooled_prompt_embeds`` (n, P)."""
    if (prompt_embeds is None) != (pooled_prompt_embeds is None):
        raise ValueError("give prompt_embeds and pooled_prompt_embeds together (T5's sequence and CLIP's pooled vector)")
    if prompt_embeds is not None:
        if prompts is not None:
            raise ValueError("give prompts or prompt_embeds, not both")
        if prompt_embeds.ndim != 3 or pooled_prompt_embeds.ndim != 2 or len(pooled_prompt_embeds) != len(prompt_embeds):
            raise ValueError(f"prompt_embeds must be (N, L, D) and pooled_prompt_embeds (N, P), got "
                             f"{tuple(prompt_embeds.shape)} and {tuple(pooled_prompt_embeds.shape)}")
        context, pooled = prompt_embeds, pooled_prompt_embeds
    else:
        if prompts is None:
            raise ValueError("give prompts (a string or a non-empty list of strings) or prompt_embeds")
        if text_encoder is None or text_encoder_2 is None:
            raise ValueError("prompts need both text encoders (CLIP: text_encoder, T5: text_encoder_2), or pass "
                             "prompt_embeds and pooled_prompt_embeds")
        pooled = text_encoder.encode(prompts)[1]
        context = text_encoder_2.encode(prompts, max_length=max_sequence_length)[0]
    return {"context": context.to(device, dtype), "pooled": pooled.to(device, dtype)}, len(context)


def flux_sample_shape(flux: FluxComponents, height, width, latents=None) -> tuple[int, int, int]:
    """(C, h, w) of one sample: from ``latents`` (N, C, h, w) or the image size (default 1024 x
    1024 with an 8x VAE), which must be a multiple of twice the VAE factor (2x2 packing)."""
    net = flux.denoiser.net
    if latents is not None:
        if latents.ndim != 4:
            raise ValueError(f"latents must be unpacked (N, C, h, w), got shape {tuple(latents.shape)}")
        shape = tuple(latents.shape[1:])
    else:
        if flux.vae is None:
            raise ValueError("without a vae, give latents= (N, C, h, w)")
        f = flux.vae.downsample_factor
        height, width = height or DEFAULT_LATENT_SIZE * f, width or DEFAULT_LATENT_SIZE * f
        shape = (int(flux.vae.config.latent_channels), *check_size(flux.denoiser, flux.vae, height, width))
    if 4 * shape[0] != net.config.in_channels or shape[1] % 2 or shape[2] % 2:
        raise ValueError(f"samples of shape {shape} do not fit the transformer: it takes latents with "
                         f"{net.config.in_channels // 4} channels and even height and width")
    return shape


def encode_flux_request(flux: FluxComponents, prompts, opts: SampleOptions, *, negative_prompts=None,
                        true_cfg_scale: float = 1.0, max_sequence_length: int = 512, prompt_embeds=None,
                        pooled_prompt_embeds=None, negative_prompt_embeds=None,
                        negative_pooled_prompt_embeds=None) -> tuple[dict, dict | None, int]:
    """The prompt stage of both Flux pipelines: ``(cond, uncond, n)``, with ``uncond`` the negative
    prompts' conditioning (one, or one per prompt) when ``true_cfg_scale != 1``, else None."""
    if isinstance(true_cfg_scale, bool) or not isinstance(true_cfg_scale, (int, float)) or not math.isfinite(true_cfg_scale):
        raise ValueError(f"true_cfg_scale={true_cfg_scale!r} must be a finite number (1 = off)")
    net_dtype, device = sample_device(flux.denoiser, opts)
    kw = dict(max_sequence_length=max_sequence_length, dtype=net_dtype, device=device)
    cond, n = encode_flux_prompts(flux.text_encoder, flux.text_encoder_2, prompts, prompt_embeds=prompt_embeds,
                                  pooled_prompt_embeds=pooled_prompt_embeds, **kw)
    if true_cfg_scale == 1.0:
        return cond, None, n
    if negative_prompts is None and negative_prompt_embeds is None:
        raise ValueError(f"true_cfg_scale={true_cfg_scale} needs negative_prompts (or negative_prompt_embeds with "
                         "negative_pooled_prompt_embeds); '' is the empty prompt")
    uncond, m = encode_flux_prompts(flux.text_encoder, flux.text_encoder_2, negative_prompts, prompt_embeds=negative_prompt_embeds,
                                    pooled_prompt_embeds=negative_pooled_prompt_embeds, **kw)
    if m not in (1, n) or uncond["context"].shape[1:] != cond["context"].shape[1:]:
        raise ValueError(f"negative prompts give {tuple(uncond['context'].shape)} T5 states for prompts' "
                         f"{tuple(cond['context'].shape)}: give one or {n} negatives of the same length")
    return cond, {k: v.expand(n, *v.shape[1:]) for k, v in uncond.items()}, n


def flux_model(flux: FluxComponents, opts: SampleOptions, true_cfg_scale: float, uncond: dict | None):
    """The denoiser a Flux run samples: the guidance scale as an input (FLUX.1-dev), then, with
    ``uncond``, classifier-free guidance of scale ``true_cfg_scale`` on top (Ho & Salimans 2022, eq. 6)."""
    model = guided(flux.denoiser, opts.guidance_scale, None)
    return model if uncond is None else ClassifierFreeGuidance(model, true_cfg_scale, uncond=uncond)


@torch.no_grad()
def flux_text_to_image(flux: FluxComponents, prompts, *, height: int | None = None, width: int | None = None,
                       negative_prompts=None, true_cfg_scale: float = 1.0, max_sequence_length: int = 512,
                       latents: torch.Tensor | None = None, prompt_embeds: torch.Tensor | None = None,
                       pooled_prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
                       negative_pooled_prompt_embeds: torch.Tensor | None = None, output_type: str = "pil",
                       options: SampleOptions | None = None, **overrides):
    """Flux from text: rectified flow (Esser et al. 2024) on the size-shifted grid, with the guidance
    scale as an input of a guidance-distilled transformer.

    ``flux``: :func:`difflab.io.flux_folder.load_flux_folder`'s components. ``options``: a
    :class:`~difflab.pipelines.options.SampleOptions` (default :data:`FLUX_DEFAULTS`: flow Euler,
    28 steps, guidance 3.5); keyword ``overrides`` replace its fields, other keywords go to the
    sampler. ``negative_prompts`` (one, or one per prompt) with ``true_cfg_scale`` > 1: classifier-free
    guidance on top of the guidance input (diffusers' ``true_cfg_scale``; two evaluations per step).
    ``latents``: standard-normal starting noise (N, C, h, w), unpacked (diffusers takes
    them packed: :func:`difflab.nn.flux.pack_latents`). Returns N images as ``output_type``
    (``"latent"``: the unpacked latents); image i depends on ``seed`` and i only.
    """
    # 1. Check inputs.
    opts = resolve(options, FLUX_DEFAULTS, overrides)
    check_output_type(output_type)
    _, device = sample_device(flux.denoiser, opts)
    shape = flux_sample_shape(flux, height, width, latents)

    # 2. Encode the prompts (T5's sequence and CLIP's pooled vector), and the negatives for true CFG.
    cond, uncond, n = encode_flux_request(flux, prompts, opts, negative_prompts=negative_prompts, true_cfg_scale=true_cfg_scale,
                                          max_sequence_length=max_sequence_length, prompt_embeds=prompt_embeds,
                                          pooled_prompt_embeds=pooled_prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                                          negative_pooled_prompt_embeds=negative_pooled_prompt_embeds)
    if latents is not None and len(latents) != n:
        raise ValueError(f"latents has {len(latents)} samples for {n} prompts")

    # 3. The grid, shifted for the number of image tokens.
    sigmas = flux_grid(flux, opts, (shape[1] // 2) * (shape[2] // 2))
    prior = float(flux.denoiser.prior_std(sigmas[0]))

    def sample_batch(start, b, noise):
        # 4. Per-sample noise (its first draw is the starting noise).
        x = noise() if latents is None else latents[start:start + b].to(device, opts.dtype)
        # 5-6. The guidance scale as an input (FLUX.1-dev) [and true CFG], then the sampler.
        model = flux_model(flux, opts, true_cfg_scale, batch_slice(uncond, start, b))
        return denoise(model, x * prior, sigmas, opts.replace(guidance_scale=1.0), noise, batch_slice(cond, start, b))

    samples = run_options(n, shape, sample_batch, opts, device=device,
                          desc=f"flux text to image ({opts.sampler}, {len(sigmas) - 1} steps)")
    # 7. Decode and convert.
    return finish(samples, flux.vae, output_type, opts.batch_size)


@torch.no_grad()
def flux_image_to_image(flux: FluxComponents, prompts, image, *, strength: float = 0.6, negative_prompts=None,
                        true_cfg_scale: float = 1.0, max_sequence_length: int = 512, noise: torch.Tensor | None = None,
                        sample_posterior: bool = True, prompt_embeds: torch.Tensor | None = None,
                        pooled_prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
                        negative_pooled_prompt_embeds: torch.Tensor | None = None, output_type: str = "pil",
                        options: SampleOptions | None = None, **overrides):
    """SDEdit (Meng et al. 2022, Algorithm 1) with Flux: encode ``image`` ((N or 1, C, H, W) in
    [-1, 1] or Pillow images), noise its latents to sigmas[k] of the shifted grid (k =
    :func:`~difflab.pipelines.image_to_image.start_index`: int(steps * strength) steps run;
    diffusers' ``FluxImg2ImgPipeline`` rounds up instead, the same when steps * strength is a
    whole number) and sample from there. ``noise``: the standard-normal noise (N, C, h, w)
    instead of the per-sample draw. Other arguments as :func:`flux_text_to_image`.
    """
    # 1. Check inputs.
    opts = resolve(options, FLUX_DEFAULTS, overrides)
    check_output_type(output_type)
    _, device = sample_device(flux.denoiser, opts)
    if flux.vae is None:
        raise ValueError("image to image needs the vae to encode the image")
    cond, uncond, n = encode_flux_request(flux, prompts, opts, negative_prompts=negative_prompts, true_cfg_scale=true_cfg_scale,
                                          max_sequence_length=max_sequence_length, prompt_embeds=prompt_embeds,
                                          pooled_prompt_embeds=pooled_prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                                          negative_pooled_prompt_embeds=negative_pooled_prompt_embeds)
    images = as_images(image, n, flux.vae.config.in_channels)
    shape = flux_sample_shape(flux, *images.shape[2:])
    if noise is not None and tuple(noise.shape) != (n, *shape):
        raise ValueError(f"noise must be (N, C, h, w) = {(n, *shape)}, got {tuple(noise.shape)}")

    # 2-3. The shifted grid, sliced at sigmas[k].
    sigmas = flux_grid(flux, opts, (shape[1] // 2) * (shape[2] // 2))
    sigmas = sigmas[start_index(len(sigmas) - 1, strength):]

    def sample_batch(start, b, draws):
        # 4. Encode the images, add noise at sigmas[k] (draw 1: that noise, draw 2: the posterior's).
        eps = draws()
        if noise is not None:
            eps = noise[start:start + b]
        z = encode(flux.vae, images[start:start + b], sample=sample_posterior, noise=draws).to(device, opts.dtype)
        # 5-6. Guidance as an input [and true CFG], then the sampler from sigmas[k].
        model = flux_model(flux, opts, true_cfg_scale, batch_slice(uncond, start, b))
        return denoise(model, noised_start(z, float(sigmas[0]), eps), sigmas, opts.replace(guidance_scale=1.0), draws,
                       batch_slice(cond, start, b))

    samples = run_options(n, shape, sample_batch, opts, device=device,
                          desc=f"flux image to image ({opts.sampler}, {len(sigmas) - 1} steps)")
    # 7. Decode and convert.
    return finish(samples, flux.vae, output_type, opts.batch_size)


__all__ = ["flux_text_to_image", "flux_image_to_image", "flux_sigmas", "flux_grid", "encode_flux_prompts",
           "encode_flux_request", "flux_model", "flux_sample_shape", "FLUX_DEFAULTS"]
