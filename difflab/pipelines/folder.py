"""Text to image from a local diffusers pipeline folder, whichever family it holds: Stable Diffusion
1.x / 2.x (:func:`difflab.io.diffusers_folder.load_diffusers_folder`, :func:`~difflab.pipelines.text_to_image`)
or Stable Diffusion 3 (:func:`difflab.io.sd3_folder.load_sd3_folder`, :func:`~difflab.pipelines.sd3.sd3_text_to_image`).
What ``difflab sample --model FOLDER`` runs."""
from __future__ import annotations

from pathlib import Path

import torch

from ..io.diffusers_folder import MODEL_INDEX, load_diffusers_folder
from ..io.folders import read_json
from ..io.sd3_folder import is_sd3_folder, load_sd3_folder
from .options import TEXT_DEFAULTS, SampleOptions, resolve
from .sd3 import SD3_DEFAULTS, sd3_text_to_image
from .text_to_image import text_to_image


def folder_family(folder) -> str:
    """``"sd3"`` or ``"sd"`` for a diffusers pipeline folder; FileNotFoundError without model_index.json."""
    path = Path(folder) / MODEL_INDEX
    read_json(path, "a diffusers pipeline folder (model_index.json)")
    return "sd3" if is_sd3_folder(folder) else "sd"


def folder_options(family: str, **overrides) -> SampleOptions:
    """The options a folder of ``family`` samples with (its defaults plus ``overrides``), checked
    before any weights are read; a ConfigError names a bad one."""
    return resolve(None, SD3_DEFAULTS if family == "sd3" else TEXT_DEFAULTS, overrides)


@torch.no_grad()
def sample_folder(folder, prompts, *, negative_prompts=None, height: int | None = None, width: int | None = None,
                  device="cpu", dtype: torch.dtype | None = None, output_type: str = "pt", **overrides):
    """Load the pipeline folder on ``device`` (``dtype``) and draw one image per prompt; ``overrides``
    are :class:`~difflab.pipelines.options.SampleOptions` fields (or sampler keywords) on top of the
    family's defaults (SD3: ``flow_euler``, 28 steps, guidance 7 and the folder's shift; SD 1.x / 2.x:
    ``ddim``, 50 steps, guidance 7.5 and the scheduler's timestep spacing and offset)."""
    if folder_family(folder) == "sd3":
        parts = load_sd3_folder(folder, device=device, dtype=dtype)
        return sd3_text_to_image(parts.denoiser, parts.text_encoder, parts.vae, prompts, negative_prompts=negative_prompts,
                                 height=height, width=width, shift=parts.sampling["shift"], output_type=output_type, **overrides)
    parts = load_diffusers_folder(folder, device=device, dtype=dtype)
    hints = {"spacing": parts.sampling.get("timestep_spacing"), "steps_offset": parts.sampling.get("steps_offset", 0)}
    if hints["spacing"] in ("leading", "trailing", "linspace") and overrides.get("grid", "default") == "default":
        overrides = {**hints, **overrides}
    return text_to_image(parts.denoiser, parts.text_encoder, parts.vae, prompts, negative_prompts=negative_prompts,
                         height=height, width=width, output_type=output_type, **overrides)
