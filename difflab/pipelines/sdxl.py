"""SDXL (Podell et al. 2023): text to image, image to image, inpainting, and the base -> refiner
hand-off. Not new pipelines: the SD ones (:func:`~difflab.pipelines.text_to_image`,
:func:`~difflab.pipelines.image_to_image`, :func:`~difflab.pipelines.inpaint`) fed SDXL's
conditioning, which this module builds:

- ``context``: the two CLIP encoders' penultimate hidden states side by side
  (:class:`~difflab.nn.text_dual.DualCLIPTextEncoder`; the refiner's one encoder);
- ``text_embeds``: the second encoder's projected pooled vector (Section 2.1);
- ``time_ids``: the micro-conditioning (Section 2.2): the original image size, the crop's top-left
  corner and the target size, or for the refiner the aesthetic score instead of the target size
  (Section 2.5), see :class:`MicroConditioning`.

With no negative prompt, a model whose folder sets ``force_zeros_for_empty_prompt`` (SDXL base)
gets zeros as its unconditional ``context`` and ``text_embeds``, as diffusers does.

The ensemble of experts (Section 2.5, diffusers' ``denoising_end`` / ``denoising_start``): the
base samples the first part of the grid and returns its latents at the hand-off level
(``sdxl_text_to_image(..., denoising_end=0.8, output_type="latent")``), the refiner samples the
rest from them (``sdxl_image_to_image(..., image=latents, denoising_start=0.8)``). difflab's
latents are in the canonical frame x = x0 + sigma eps, so any sampler can continue them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core import VPDiscrete
from .common import (add_conditions, as_prompts, batch_slice, check_output_type, default_size, denoise, encode_prompts,
                     finish, net_config, run_options, sample_device, sampling_grid, vae_factor)
from .image_to_image import image_to_image
from .inpaint import inpaint
from .options import TEXT_DEFAULTS, SampleOptions, resolve
from .text_to_image import text_to_image

# the number of time ids (Section 2.2): a base model's six sizes, or the refiner's five with an aesthetic score
BASE_TIME_IDS, REFINER_TIME_IDS = 6, 5


@dataclass(frozen=True)
class MicroConditioning:
    """SDXL's micro-conditioning (Podell et al. 2023, Section 2.2; the refiner's aesthetic score,
    Section 2.5). Sizes are (height, width) in pixels; None means the size of the output image.
    The negative (unconditional) values default to the positive ones."""

    original_size: tuple[int, int] | None = None  # c_size: the training image's size before resizing
    crops_coords_top_left: tuple[int, int] = (0, 0)  # c_crop: (top, left) of the crop; (0, 0) centres objects
    target_size: tuple[int, int] | None = None  # c_ar: the size asked for (multi-aspect training)
    aesthetic_score: float = 6.0  # the refiner's score for the conditional branch
    negative_original_size: tuple[int, int] | None = None
    negative_crops_coords_top_left: tuple[int, int] | None = None
    negative_target_size: tuple[int, int] | None = None
    negative_aesthetic_score: float = 2.5

    def time_ids(self, size: tuple[int, int], count: int) -> tuple[list[float], list[float]]:
        """(positive, negative) time ids for an output of ``size`` (H, W): ``original + crop +
        target`` (6, the base) or ``original + crop + (score,)`` (5, the refiner)."""
        original, target = tuple(self.original_size or size), tuple(self.target_size or size)
        neg_original = tuple(self.negative_original_size or original)
        neg_crop = tuple(self.negative_crops_coords_top_left or self.crops_coords_top_left)
        neg_target = tuple(self.negative_target_size or target)
        for name, pair in (("original_size", original), ("crops_coords_top_left", self.crops_coords_top_left),
                           ("target_size", target), ("negative_original_size", neg_original),
                           ("negative_crops_coords_top_left", neg_crop), ("negative_target_size", neg_target)):
            if len(pair) != 2:
                raise ValueError(f"{name}={pair} must be a pair (height, width) / (top, left)")
        if count == BASE_TIME_IDS:
            return [*original, *self.crops_coords_top_left, *target], [*neg_original, *neg_crop, *neg_target]
        return ([*original, *self.crops_coords_top_left, self.aesthetic_score],
                [*neg_original, *neg_crop, self.negative_aesthetic_score])


def time_id_count(unet_config, pooled_size: int) -> int:
    """How many time ids the U-Net takes: (projection_class_embeddings_input_dim - pooled width) /
    addition_time_embed_dim, which must be 6 (base) or 5 (refiner: ``requires_aesthetics_score``)."""
    if getattr(unet_config, "addition_embed_type", None) != "text_time":
        raise ValueError("the network is not an SDXL U-Net (no addition_embed_type='text_time'): use text_to_image")
    rest = unet_config.projection_class_embeddings_input_dim - pooled_size
    count, left = divmod(rest, unet_config.addition_time_embed_dim)
    if left or count not in (BASE_TIME_IDS, REFINER_TIME_IDS):
        raise ValueError(f"the U-Net's projection_class_embeddings_input_dim={unet_config.projection_class_embeddings_input_dim} "
                         f"does not fit a pooled text embedding of {pooled_size} plus 6 (base) or 5 (refiner, with an "
                         f"aesthetic score) time ids of {unet_config.addition_time_embed_dim}")
    return count


def handoff_index(denoiser, sigmas: torch.Tensor, fraction: float, name: str) -> int:
    """k such that the base samples ``sigmas[:k + 1]`` and the refiner ``sigmas[k:]`` (Podell et
    al. 2023, Section 2.5), by diffusers' rule for ``denoising_end`` / ``denoising_start``: with
    cutoff = round(T (1 - fraction)), the base takes the steps whose timestep is >= cutoff."""
    if isinstance(fraction, bool) or not isinstance(fraction, float) or not 0.0 < fraction < 1.0:
        raise ValueError(f"{name}={fraction!r} must be a float in (0, 1): the fraction of the grid the base model samples")
    frame = denoiser.frame
    if not isinstance(frame, VPDiscrete):
        raise ValueError(f"{name} needs a discrete-time (VPDiscrete) model, got a {type(frame).__name__} frame")
    cutoff = int(round(frame.T - fraction * frame.T))
    t = torch.round(frame.time(sigmas[:-1].to(torch.float64)))
    return int((t >= cutoff).sum())


def sdxl_conditioning(denoiser, text_encoder, prompts, negative_prompts, size: tuple[int, int], opts: SampleOptions, *,
                      micro: MicroConditioning | None, force_zeros_for_empty_prompt: bool) -> dict:
    """The keyword arguments that make an SD pipeline an SDXL one: ``prompt_embeds``,
    ``negative_prompt_embeds`` (None without guidance), ``added_cond`` = {``text_embeds``,
    ``time_ids``} and ``negative_added_cond``. Prompts and negatives are encoded in one call."""
    prompts = as_prompts(prompts)
    if not prompts:
        raise ValueError("prompts is an empty list: give at least one prompt (use '' for an unconditional image)")
    if text_encoder is None:
        raise ValueError("SDXL prompts need a text_encoder (a DualCLIPTextEncoder, or the refiner's CLIPTextEncoder)")
    n, guided = len(prompts), opts.guidance_scale != 1.0
    zeros = guided and negative_prompts is None and force_zeros_for_empty_prompt
    negatives = [] if not guided or zeros else as_prompts("" if negative_prompts is None else negative_prompts, "negative_prompts")
    if len(negatives) == 1:
        negatives = negatives * n
    if negatives and len(negatives) != n:
        raise ValueError(f"negative_prompts has {len(negatives)} entries for {n} prompts: give one, or one per prompt")
    hidden, pooled = text_encoder.encode(prompts + negatives)
    count = time_id_count(net_config(denoiser), pooled.shape[-1])
    ids, neg_ids = (micro or MicroConditioning()).time_ids(tuple(size), count)
    out = {"prompt_embeds": hidden[:n], "negative_prompt_embeds": None, "negative_added_cond": None,
           "added_cond": {"text_embeds": pooled[:n], "time_ids": torch.tensor([ids], dtype=torch.float32)}}
    if guided:
        neg_hidden, neg_pooled = (hidden[:n].new_zeros(hidden[:n].shape), pooled[:n].new_zeros(pooled[:n].shape)) if zeros \
            else (hidden[n:], pooled[n:])
        out.update(negative_prompt_embeds=neg_hidden,
                   negative_added_cond={"text_embeds": neg_pooled, "time_ids": torch.tensor([neg_ids], dtype=torch.float32)})
    return out


@torch.no_grad()
def sdxl_text_to_image(denoiser, text_encoder, vae, prompts, *, negative_prompts=None, height: int | None = None,
                       width: int | None = None, micro: MicroConditioning | None = None, denoising_end: float | None = None,
                       force_zeros_for_empty_prompt: bool = True, output_type: str = "pil", latents: torch.Tensor | None = None,
                       options: SampleOptions | None = None, **overrides):
    """SDXL text to image (Podell et al. 2023): :func:`~difflab.pipelines.text_to_image` with SDXL's
    conditioning (:func:`sdxl_conditioning`). ``micro``: the size and crop conditioning
    (:class:`MicroConditioning`; default: the output size, no crop). ``denoising_end``: stop at
    that fraction of the grid (:func:`handoff_index`) and return the latents there, for the
    refiner (use ``output_type="latent"``). The rest as :func:`~difflab.pipelines.text_to_image`.
    """
    # 1. Options and the output size (default: the U-Net's sample_size times the VAE factor).
    opts = resolve(options, TEXT_DEFAULTS, overrides)
    if height is None or width is None:
        h0, w0 = default_size(denoiser, vae)
        height, width = height or h0, width or w0
    # 2. Encode the prompts (and negatives, in the same call); the micro-conditioning.
    conditioning = sdxl_conditioning(denoiser, text_encoder, prompts, negative_prompts, (height, width), opts, micro=micro,
                                     force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)
    # 3. The grid, cut at the hand-off.
    if denoising_end is not None:
        sigmas = sampling_grid(denoiser, opts.steps, opts.grid, opts.spacing, opts.steps_offset)
        k = handoff_index(denoiser, sigmas, denoising_end, "denoising_end")
        if k == 0:
            raise ValueError(f"denoising_end={denoising_end} of {len(sigmas) - 1} steps leaves the base model no step")
        opts = opts.replace(grid=sigmas[:k + 1])
    # 4-7. Sample and decode as text to image does.
    return text_to_image(denoiser, None, vae, None, height=height, width=width, output_type=output_type, latents=latents,
                         options=opts, **conditioning)


@torch.no_grad()
def sdxl_image_to_image(denoiser, text_encoder, vae, prompts, image, *, strength: float = 0.3,
                        denoising_start: float | None = None, negative_prompts=None, micro: MicroConditioning | None = None,
                        force_zeros_for_empty_prompt: bool = True, output_type: str = "pil", noise: torch.Tensor | None = None,
                        sample_posterior: bool = True, options: SampleOptions | None = None, **overrides):
    """SDXL image to image: :func:`~difflab.pipelines.image_to_image` (SDEdit, ``strength``) with
    SDXL's conditioning; the micro-conditioning sizes default to the image's.

    ``denoising_start``: the refiner's half of the ensemble of experts (Section 2.5): ``image``
    is then the base's latents (N, C, h, w) at the hand-off level (what :func:`sdxl_text_to_image`
    returns with the same ``denoising_end``, steps and grid, ``output_type="latent"``), and the
    sampler continues them over ``sigmas[k:]`` (:func:`handoff_index`) without adding noise;
    ``strength`` is ignored.
    """
    opts = resolve(options, TEXT_DEFAULTS, overrides)
    if denoising_start is not None and noise is not None:
        raise ValueError("noise is added to the image by SDEdit (strength); with denoising_start the latents are continued as they are")
    if denoising_start is None:
        # 1-7. SDEdit with SDXL's conditioning.
        size = tuple(torch.as_tensor(image).shape[-2:]) if torch.is_tensor(image) else _pil_size(image)
        conditioning = sdxl_conditioning(denoiser, text_encoder, prompts, negative_prompts, size, opts, micro=micro,
                                         force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)
        return image_to_image(denoiser, None, vae, None, image, strength=strength, output_type=output_type, noise=noise,
                              sample_posterior=sample_posterior, options=opts, **conditioning)
    return _refine(denoiser, text_encoder, vae, prompts, image, denoising_start, negative_prompts, micro,
                   force_zeros_for_empty_prompt, output_type, opts)


def _refine(denoiser, text_encoder, vae, prompts, latents, denoising_start, negative_prompts, micro, force_zeros, output_type,
            opts: SampleOptions):
    """The refiner's stages: continue the base's latents from the hand-off level sigmas[k]."""
    # 1. Check inputs; the grid from the hand-off on.
    check_output_type(output_type)
    net_dtype, device = sample_device(denoiser, opts)
    latents = torch.as_tensor(latents)
    channels = int(net_config(denoiser).in_channels)
    if latents.ndim != 4 or latents.shape[1] != channels:
        raise ValueError(f"with denoising_start, image must be the base model's latents (N, {channels}, h, w), "
                         f"got shape {tuple(latents.shape)}")
    sigmas = sampling_grid(denoiser, opts.steps, opts.grid, opts.spacing, opts.steps_offset)
    k = handoff_index(denoiser, sigmas, denoising_start, "denoising_start")
    if k == len(sigmas) - 1:
        raise ValueError(f"denoising_start={denoising_start} of {len(sigmas) - 1} steps leaves the refiner no step")
    sigmas = sigmas[k:]
    # 2. Encode the prompts; SDXL's added conditions (sizes from the latents).
    size = (latents.shape[2] * vae_factor(vae), latents.shape[3] * vae_factor(vae))
    c = sdxl_conditioning(denoiser, text_encoder, prompts, negative_prompts, size, opts, micro=micro,
                          force_zeros_for_empty_prompt=force_zeros)
    cond, uncond, n = encode_prompts(None, None, guided=opts.guidance_scale != 1.0, prompt_embeds=c["prompt_embeds"],
                                     negative_prompt_embeds=c["negative_prompt_embeds"], dtype=net_dtype, device=device)
    cond, uncond = add_conditions(cond, uncond, c["added_cond"], c["negative_added_cond"], n, dtype=net_dtype, device=device)
    if latents.shape[0] not in (1, n):
        raise ValueError(f"image (the base's latents) has {latents.shape[0]} samples for {n} prompts")
    latents = latents.expand(n, -1, -1, -1)

    def sample_batch(start, b, draws):
        # 3-4. Guidance, then the sampler from sigmas[k] on the base's latents (no noise added).
        x = latents[start:start + b].to(device, opts.dtype)
        return denoise(denoiser, x, sigmas, opts, draws, batch_slice(cond, start, b), batch_slice(uncond, start, b))

    samples = run_options(n, tuple(latents.shape[1:]), sample_batch, opts, device=device,
                          desc=f"refine ({opts.sampler}, {len(sigmas) - 1} steps)")
    # 5. Decode and convert.
    return finish(samples, vae, output_type, opts.batch_size)


@torch.no_grad()
def sdxl_inpaint(denoiser, text_encoder, vae, prompts, image, mask, *, negative_prompts=None,
                 micro: MicroConditioning | None = None, force_zeros_for_empty_prompt: bool = True,
                 options: SampleOptions | None = None, **kwargs):
    """SDXL inpainting: :func:`~difflab.pipelines.inpaint` (replacement with any SDXL U-Net, or a
    9-channel inpainting U-Net) with SDXL's conditioning; sizes default to the image's. Other
    keywords (``mode``, ``strength``, ``output_type``, sampler options, ...) as ``inpaint``'s."""
    fields = SampleOptions.fields()
    opts = resolve(options, TEXT_DEFAULTS, {k: v for k, v in kwargs.items() if k in fields})
    rest = {k: v for k, v in kwargs.items() if k not in fields}
    size = tuple(torch.as_tensor(image).shape[-2:]) if torch.is_tensor(image) else _pil_size(image)
    conditioning = sdxl_conditioning(denoiser, text_encoder, prompts, negative_prompts, size, opts, micro=micro,
                                     force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)
    return inpaint(denoiser, None, vae, None, image, mask, options=opts, **conditioning, **rest)


def _pil_size(image) -> tuple[int, int]:
    """(H, W) of a Pillow image or the first of a list of them."""
    first = image[0] if isinstance(image, (list, tuple)) else image
    if not hasattr(first, "size"):
        raise ValueError(f"image must be a (N, C, H, W) tensor or Pillow image(s), got {type(image).__name__}")
    return first.size[1], first.size[0]


__all__ = ["MicroConditioning", "sdxl_conditioning", "time_id_count", "handoff_index", "sdxl_text_to_image",
           "sdxl_image_to_image", "sdxl_inpaint", "BASE_TIME_IDS", "REFINER_TIME_IDS"]
