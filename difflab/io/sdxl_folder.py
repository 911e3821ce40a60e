"""A local diffusers SDXL folder in, difflab components out (Podell et al. 2023). Offline only.

A folder written by ``StableDiffusionXLPipeline`` / ``StableDiffusionXLImg2ImgPipeline`` /
``StableDiffusionXLInpaintPipeline.save_pretrained`` holds what an SD 1.x / 2.x folder does
(:mod:`difflab.io.diffusers_folder`, whose component loaders this module reuses) plus a second
text encoder and tokenizer::

    unet/            UNet2DConditionModel, addition_embed_type "text_time"     -> UNetSD
    text_encoder/    CLIPTextModel (CLIP ViT-L), absent in the refiner          -+-> DualCLIPTextEncoder
    text_encoder_2/  CLIPTextModelWithProjection (OpenCLIP ViT-bigG)            -+   (or CLIPTextEncoder alone)
    tokenizer/, tokenizer_2/, vae/ (scaling_factor 0.13025), scheduler/

and two settings in ``model_index.json``: ``force_zeros_for_empty_prompt`` (the base model's
unconditional embedding is zeros when no negative prompt is given) and
``requires_aesthetics_score`` (the refiner's time ids end in an aesthetic score instead of the
target size). Both text encoders give their penultimate hidden states without the final
LayerNorm (``clip_skip=1, norm_hidden=False``), as SDXL was trained.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core import Denoiser
from ..nn.text import CLIPTextEncoder, load_clip_tokenizer
from ..nn.text_dual import DualCLIPTextEncoder
from ..nn.unet_sd import UNetSD
from .diffusers_folder import (MODEL_INDEX, SD_DIFFUSION, SD_SAMPLING, _component_folder, load_diffusers_text_encoder,
                               read_scheduler_and_unet)
from .diffusers_vae import load_diffusers_vae
from .folders import read_json

SDXL_COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae", "scheduler")
SDXL_PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline")
TOKENIZERS = ("CLIPTokenizer", "CLIPTokenizerFast")


@dataclass
class SDXLComponents:
    """What an SDXL folder holds, as difflab objects (None where not loaded).

    ``text_encoder`` is a :class:`~difflab.nn.text_dual.DualCLIPTextEncoder` (base) or the second
    encoder alone (refiner, whose folder has no ``text_encoder/``); ``denoiser`` wraps ``unet``
    into ``D(x, sigma, context=, text_embeds=, time_ids=)``. The other fields as
    :class:`~difflab.io.diffusers_folder.StableDiffusionComponents`'.
    """

    unet: UNetSD | None = None
    text_encoder: torch.nn.Module | None = None
    vae: torch.nn.Module | None = None
    denoiser: Denoiser | None = None
    diffusion: dict = field(default_factory=lambda: dict(SD_DIFFUSION))
    sampling: dict = field(default_factory=lambda: {**SD_SAMPLING, "scheduler": "EulerDiscreteScheduler"})
    scheduler_config: dict | None = None
    pipeline_class: str = "StableDiffusionXLPipeline"
    force_zeros_for_empty_prompt: bool = True
    requires_aesthetics_score: bool = False


def is_sdxl_folder(folder) -> bool:
    """Whether ``folder`` is a diffusers SDXL pipeline folder: its ``model_index.json`` names an
    SDXL pipeline class or a ``text_encoder_2``, or its U-Net takes SDXL's added conditions."""
    root = Path(folder)
    if not (root / MODEL_INDEX).is_file():
        return False
    index = read_json(root / MODEL_INDEX, "a diffusers pipeline folder")
    if index.get("_class_name", "").startswith("StableDiffusionXL") or (index.get("text_encoder_2") or [None])[0]:
        return True
    unet = root / "unet" / "config.json"
    return unet.is_file() and read_json(unet, "a diffusers U-Net config").get("addition_embed_type") == "text_time"


def load_sdxl_folder(folder, *, components=SDXL_COMPONENTS, variant: str | None = None, dtype: torch.dtype | None = None,
                     device="cpu", prediction: str | None = None) -> SDXLComponents:
    """Read a local diffusers SDXL base or refiner folder (never the network).

    ``components``: which of :data:`SDXL_COMPONENTS` to read (a refiner has no ``text_encoder`` /
    ``tokenizer``: those are skipped when ``model_index.json`` lists none). ``variant``, ``dtype``,
    ``device`` and ``prediction`` as :func:`~difflab.io.diffusers_folder.load_diffusers_folder`'s.
    """
    root = Path(folder)
    index = read_json(root / MODEL_INDEX, "a diffusers pipeline folder")
    unknown = sorted(set(components) - set(SDXL_COMPONENTS))
    if unknown:
        raise ValueError(f"unknown components {unknown}; choose from {list(SDXL_COMPONENTS)}")
    if not is_sdxl_folder(root):
        raise ValueError(f"{root} is a {index.get('_class_name')} folder, not SDXL: use difflab.io.load_diffusers_folder")
    out = SDXLComponents(pipeline_class=index.get("_class_name", "StableDiffusionXLPipeline"),
                         force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),
                         requires_aesthetics_score=bool(index.get("requires_aesthetics_score", False)))

    # 1. Scheduler -> frame, prediction, grid hints; 2. U-Net (with the added conditions)
    read_scheduler_and_unet(out, root, index, components, prediction, variant, dtype, device)

    # 3. Text encoders: penultimate hidden states, no final LayerNorm (Podell et al. 2023, Section 2.1)
    encoders = [_text_encoder(root, index, name, tok, name in components, tok in components, variant, dtype)
                for name, tok in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))]
    first, second = (e.to(device) if e is not None else None for e in encoders)
    out.text_encoder = DualCLIPTextEncoder(first, second) if first is not None and second is not None else first or second

    # 4. Autoencoder (scaling_factor from its config: 0.13025 for SDXL's)
    if "vae" in components:
        out.vae = load_diffusers_vae(_component_folder(root, index, "vae", ("AutoencoderKL",)), variant=variant, dtype=dtype).to(device)
    return out


def _text_encoder(root: Path, index: dict, name: str, tokenizer_name: str, wanted: bool, with_tokenizer: bool,
                  variant, dtype) -> CLIPTextEncoder | None:
    """One of the two CLIP encoders (None when not wanted or absent from the folder, as the refiner's first)."""
    if not wanted or not (index.get(name) or [None])[0]:
        return None
    tokenizer = None
    if with_tokenizer and (index.get(tokenizer_name) or [None])[0]:
        tokenizer = load_clip_tokenizer(_component_folder(root, index, tokenizer_name, TOKENIZERS))
    folder = _component_folder(root, index, name, ("CLIPTextModel", "CLIPTextModelWithProjection"))
    return load_diffusers_text_encoder(folder, tokenizer=tokenizer, variant=variant, dtype=dtype, clip_skip=1, norm_hidden=False)


__all__ = ["SDXLComponents", "load_sdxl_folder", "is_sdxl_folder", "SDXL_COMPONENTS", "SDXL_PIPELINES"]
