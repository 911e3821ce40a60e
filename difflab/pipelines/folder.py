"""Sampling a local diffusers pipeline folder (Stable Diffusion 1.x / 2.x or SDXL): the one place
``difflab sample --model FOLDER`` (and Python users) turn a folder and prompts into images.

Usage::

    images = sample_folder("models/sdxl-base", ["a red fox in snow"], steps=30, seed=1)   # (N, 3, H, W) in [-1, 1]

The folder's scheduler gives the defaults: its timestep spacing and offset, and the sampler that
does what its scheduler class does (:data:`SCHEDULER_SAMPLERS`; DDIM otherwise); SDXL folders
guide at 5, SD folders at 7.5 (diffusers' defaults). ``options`` and keyword overrides replace them.
"""
from __future__ import annotations

import torch

from ..io.diffusers_folder import load_diffusers_folder
from ..io.sdxl_folder import is_sdxl_folder, load_sdxl_folder
from .options import TEXT_DEFAULTS, SampleOptions, resolve
from .sdxl import sdxl_text_to_image
from .text_to_image import text_to_image

# diffusers scheduler class -> the difflab sampler taking the same steps
SCHEDULER_SAMPLERS = {"DDIMScheduler": "ddim", "EulerDiscreteScheduler": "euler", "EulerAncestralDiscreteScheduler": "euler_ancestral",
                      "DPMSolverMultistepScheduler": "dpmpp_2m", "HeunDiscreteScheduler": "heun", "LMSDiscreteScheduler": "lms",
                      "UniPCMultistepScheduler": "unipc", "DDPMScheduler": "ddpm", "LCMScheduler": "lcm"}


def folder_defaults(sampling: dict, sdxl: bool) -> SampleOptions:
    """:data:`TEXT_DEFAULTS` with a folder's scheduler hints (``sampling`` of the loaded components)."""
    return TEXT_DEFAULTS.replace(sampler=SCHEDULER_SAMPLERS.get(sampling.get("scheduler"), "ddim"),
                                 spacing=sampling.get("timestep_spacing", "leading"),
                                 steps_offset=int(sampling.get("steps_offset", 0)), guidance_scale=5.0 if sdxl else 7.5)


@torch.no_grad()
def sample_folder(folder, prompts, *, negative_prompts=None, height: int | None = None, width: int | None = None,
                  options: SampleOptions | None = None, **overrides) -> torch.Tensor:
    """Images (N, C, H, W) in [-1, 1], one per prompt, from a diffusers SD 1.x / 2.x
    (:func:`~difflab.pipelines.text_to_image`) or SDXL folder (:func:`~difflab.pipelines.sdxl.sdxl_text_to_image`,
    with the folder's ``force_zeros_for_empty_prompt``). ``options`` / ``overrides`` as the
    pipelines'; ``device`` also loads the weights there (default CPU)."""
    # 1. Which family, and its loader.
    sdxl = is_sdxl_folder(folder)
    device = (options.device if options is not None else None) or overrides.get("device") or "cpu"
    parts = load_sdxl_folder(folder, device=device) if sdxl else load_diffusers_folder(folder, device=device)
    # 2. The options: the folder's defaults, then the caller's.
    opts = resolve(options, folder_defaults(parts.sampling, sdxl), overrides).replace(device=device)
    # 3. Sample.
    args = (parts.denoiser, parts.text_encoder, parts.vae, prompts)
    if sdxl:
        return sdxl_text_to_image(*args, negative_prompts=negative_prompts, height=height, width=width, output_type="pt",
                                  force_zeros_for_empty_prompt=parts.force_zeros_for_empty_prompt, options=opts)
    return text_to_image(*args, negative_prompts=negative_prompts, height=height, width=width, output_type="pt", options=opts)


__all__ = ["sample_folder", "folder_defaults", "SCHEDULER_SAMPLERS"]
