"""Text-to-image models from folders on disk: one table, :data:`MODEL_FOLDERS`, of the layouts
``difflab sample --model FOLDER`` recognizes, each a detector and a loader returning a
:class:`~difflab.io.text_model.TextModel` with the family's sampling defaults.

| layout | recognized by | defaults |
| --- | --- | --- |
| ``difflab`` | ``model.safetensors`` of kind ``difflab.text_model`` (``difflab demo --text``, ``difflab distill --method lcm|lcm-lora``, ``difflab dreambooth``) | the file's own ``"sampling"`` |
| ``stable-diffusion`` | ``model_index.json`` naming a ``StableDiffusion*Pipeline`` | 50 steps, guidance 7.5, the U-Net's size |
| ``flux`` | ``model_index.json`` naming a ``FluxTransformer2DModel`` transformer | flow Euler, 28 steps, guidance 3.5, 1024 x 1024 (diffusers'); sampled by :func:`~difflab.pipelines.flux.flux_text_to_image` |

A new family is one entry: ``(name, detect(folder) -> bool, load(folder, device) -> TextModel)``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..adapters import load_lora_weights
from ..core.consistency import ConsistencyFunction
from ..io.diffusers_folder import load_diffusers_folder
from ..io.flux_folder import is_flux_folder, load_flux_folder
from ..io.text_model import TextModel, is_text_model, read_text_model
from .flux import DEFAULT_LATENT_SIZE, FLUX_DEFAULTS, flux_text_to_image
from .options import TEXT_DEFAULTS, SampleOptions
from .text_to_image import text_to_image

LORA_NAME = "lcm"


def load_difflab_folder(folder, device="cpu") -> TextModel:
    """A difflab text model (:mod:`difflab.io.text_model`); an LCM-LoRA it names is plugged into the base network and the
    model becomes its consistency function (Luo et al. 2023b: sampled with the LCM sampler, guidance 1)."""
    model = read_text_model(folder, device)
    if model.meta.get("lora"):
        load_lora_weights(model.denoiser.net, model.meta["lora"], name=LORA_NAME, prefix="unet.")
        model.denoiser = ConsistencyFunction(model.denoiser, form="lcm").eval()
    return model


def _pipeline_class(folder) -> str:
    index = Path(folder) / "model_index.json"
    if not index.is_file():
        return ""
    try:
        return str(json.loads(index.read_text()).get("_class_name", ""))
    except (OSError, ValueError):
        return ""


def is_stable_diffusion(folder) -> bool:
    name = _pipeline_class(folder)
    return name.startswith("StableDiffusion") and not name.startswith(("StableDiffusionXL", "StableDiffusion3"))


def load_stable_diffusion(folder, device="cpu") -> TextModel:
    """A diffusers Stable Diffusion 1.x/2.x folder (:func:`difflab.io.load_diffusers_folder`)."""
    c = load_diffusers_folder(folder)
    size = int(c.unet.config.sample_size) * (2 ** (len(c.vae.config.block_out_channels) - 1))
    sampling = {"sampler": "ddim", "steps": 50, "guidance_scale": 7.5, "height": size, "width": size,
                "spacing": c.sampling.get("timestep_spacing", "leading"), "steps_offset": c.sampling.get("steps_offset", 1)}
    return TextModel(c.denoiser.to(device).eval(), c.text_encoder.to(device).eval(), c.vae.to(device).eval(), sampling,
                     {"family": "stable-diffusion", "folder": str(folder)})


def load_flux(folder, device="cpu") -> TextModel:
    """A diffusers Flux folder (:func:`difflab.io.flux_folder.load_flux_folder`), sampled by its own
    pipeline (:func:`difflab.pipelines.flux.flux_text_to_image`: T5 and CLIP, the size-shifted grid,
    the guidance scale as an input of FLUX.1-dev)."""
    flux = load_flux_folder(folder, device=device)
    size = DEFAULT_LATENT_SIZE * flux.vae.downsample_factor
    sampling = {"sampler": FLUX_DEFAULTS.sampler, "steps": FLUX_DEFAULTS.steps, "guidance_scale": FLUX_DEFAULTS.guidance_scale,
                "height": size, "width": size}

    def pipeline(prompts, *, negative_prompts=None, height=None, width=None, output_type="pt", options=None):
        if negative_prompts is not None:
            raise ValueError("a Flux model takes a negative prompt only with true_cfg_scale > 1: call "
                             "difflab.pipelines.flux.flux_text_to_image(..., negative_prompts=, true_cfg_scale=)")
        return flux_text_to_image(flux, prompts, height=height, width=width, output_type=output_type, options=options)

    return TextModel(flux.denoiser, flux.text_encoder, flux.vae, sampling, {"family": "flux", "folder": str(folder)},
                     pipeline=pipeline)


MODEL_FOLDERS = [
    ("difflab", is_text_model, load_difflab_folder),
    ("stable-diffusion", is_stable_diffusion, load_stable_diffusion),
    ("flux", is_flux_folder, load_flux),
]


def model_family(folder) -> str:
    """The name of the :data:`MODEL_FOLDERS` layout ``folder`` has; a ValueError naming them otherwise."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"{folder} is not a folder (give a model folder: {', '.join(n for n, _, _ in MODEL_FOLDERS)})")
    for name, detect, _ in MODEL_FOLDERS:
        if detect(folder):
            return name
    raise ValueError(f"{folder} is not a model folder difflab knows: it needs a model.safetensors of difflab or a "
                     f"model_index.json of a diffusers pipeline; known layouts: {', '.join(n for n, _, _ in MODEL_FOLDERS)}"
                     + (f" (model_index.json names {_pipeline_class(folder)!r})" if _pipeline_class(folder) else ""))


def load_text_model(folder, device="cpu") -> TextModel:
    """The text-to-image model in ``folder``, whatever its layout (:data:`MODEL_FOLDERS`)."""
    family = model_family(folder)
    loader = next(load for name, _, load in MODEL_FOLDERS if name == family)
    model = loader(folder, device)
    model.meta.setdefault("family", family)
    return model


SIZE_KEYS = ("height", "width")


def model_options(model: TextModel) -> SampleOptions:
    """The text pipelines' defaults with the model's own sampling entries (its sampler, steps, grid,
    guidance scale, ...); a grid given as a list of sigmas becomes a tensor."""
    sampling = {k: v for k, v in model.sampling.items() if k not in SIZE_KEYS}
    if isinstance(sampling.get("grid"), list):
        sampling["grid"] = torch.tensor(sampling["grid"], dtype=torch.float64)
    return TEXT_DEFAULTS.replace(**sampling)


def sample_text_model(model: TextModel, prompts, *, negative_prompts=None, options: SampleOptions | None = None,
                      height: int | None = None, width: int | None = None, output_type: str = "pt"):
    """Images of ``prompts`` from a loaded model folder with its defaults (:func:`model_options`),
    ``options`` replacing them, at ``height`` x ``width`` (default: the model's own size)."""
    options = model_options(model) if options is None else options
    height, width = height or model.sampling.get("height"), width or model.sampling.get("width")
    if model.pipeline is not None:  # the family's own pipeline (TextModel.pipeline)
        return model.pipeline(prompts, negative_prompts=negative_prompts, height=height, width=width,
                              output_type=output_type, options=options)
    return text_to_image(model.denoiser, model.text_encoder, model.vae, prompts, negative_prompts=negative_prompts,
                         height=height, width=width, output_type=output_type, options=options)


__all__ = ["MODEL_FOLDERS", "load_text_model", "model_family", "load_difflab_folder", "load_stable_diffusion", "load_flux",
           "model_options", "sample_text_model"]
