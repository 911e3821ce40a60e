"""Sampling a diffusers pipeline folder from prompts: the one place ``difflab sample --model`` (and
Python users) turn a local ``model_index.json`` folder into images.

Usage::

    images = sample_folder("FLUX.1-schnell", ["a red fox"], height=512, width=512, steps=4)

:data:`FOLDER_KINDS` maps the pipeline class a folder's ``model_index.json`` names to a kind,
and :data:`FOLDER_PIPELINES` maps a kind to its loader, its text-to-image function and its
default options: one row per family, so a new family is one entry in each table.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..io.diffusers_folder import MODEL_INDEX, load_diffusers_folder
from ..io.flux_folder import load_flux_folder
from ..io.folders import read_json
from .flux import FLUX_DEFAULTS, flux_text_to_image
from .options import TEXT_DEFAULTS, SampleOptions, resolve
from .text_to_image import text_to_image


def _flux(parts, prompts, **kw):
    return flux_text_to_image(parts, prompts, **kw)


def _stable_diffusion(parts, prompts, **kw):
    return text_to_image(parts.denoiser, parts.text_encoder, parts.vae, prompts, **kw)


# model_index.json "_class_name" -> kind
FOLDER_KINDS = {"FluxPipeline": "flux", "FluxImg2ImgPipeline": "flux", "FluxInpaintPipeline": "flux",
                "StableDiffusionPipeline": "sd", "StableDiffusionImg2ImgPipeline": "sd"}
# kind -> (load(folder, device=), text_to_image(parts, prompts, **kw), default options)
FOLDER_PIPELINES = {"flux": (load_flux_folder, _flux, FLUX_DEFAULTS),
                    "sd": (load_diffusers_folder, _stable_diffusion, TEXT_DEFAULTS)}


def folder_kind(folder) -> str:
    """The kind (a key of :data:`FOLDER_PIPELINES`) of a diffusers pipeline folder; a
    FileNotFoundError or ValueError naming the folder when it is none difflab samples."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"model folder {folder} does not exist")
    index = read_json(folder / MODEL_INDEX, "a diffusers pipeline folder (model_index.json)")
    cls = index.get("_class_name")
    if cls not in FOLDER_KINDS:
        raise ValueError(f"{folder / MODEL_INDEX} names a {cls!r}; difflab samples the pipeline classes "
                         f"{', '.join(sorted(FOLDER_KINDS))}")
    return FOLDER_KINDS[cls]


def folder_defaults(folder) -> SampleOptions:
    """The default sampling options of the folder's family (Flux: flow Euler, 28 steps, guidance 3.5)."""
    return FOLDER_PIPELINES[folder_kind(folder)][2]


def sample_folder(folder, prompts, *, height: int | None = None, width: int | None = None,
                  options: SampleOptions | None = None, **overrides) -> torch.Tensor:
    """Images (N, C, H, W) in [-1, 1], one per prompt, from a local diffusers pipeline folder of a
    kind in :data:`FOLDER_PIPELINES`. ``options`` / ``overrides``: the sampling options (default:
    the family's; ``device`` also loads the weights there, default CPU)."""
    # 1. Check the folder and the options before reading any weights.
    load, sample, defaults = FOLDER_PIPELINES[folder_kind(folder)]
    opts = resolve(options, defaults, overrides)
    # 2. Load, on the options' device.
    device = "cpu" if opts.device is None else opts.device
    parts = load(folder, device=device)
    # 3. Sample.
    return sample(parts, prompts, height=height, width=width, output_type="pt", options=opts.replace(device=device))


__all__ = ["sample_folder", "folder_kind", "folder_defaults", "FOLDER_KINDS", "FOLDER_PIPELINES"]
