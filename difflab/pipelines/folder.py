"""Sampling a text-to-image model folder: the one place ``difflab sample --model FOLDER`` (and Python
users) turn a folder and prompts into images, whatever the family.

Usage::

    images = sample_folder("models/sdxl-base", ["a red fox in snow"], steps=30, seed=1)   # (N, 3, H, W) in [-1, 1]

:data:`MODEL_FOLDERS` is the table of layouts, tried in order; each entry is ``(name, detect(folder)
-> bool, sample(folder, prompts, request, options, overrides, dtype) -> images)``, ``request`` holding
``negative_prompts``, ``height``, ``width`` and ``output_type``.
A new family is one entry.

| layout | recognized by | defaults |
| --- | --- | --- |
| ``difflab`` | a ``model.safetensors`` of kind ``difflab.text_model`` (``difflab demo --text``, ``difflab distill --method lcm|lcm-lora``, ``difflab dreambooth``) | the file's own ``"sampling"`` |
| ``sd3`` | ``model_index.json`` of a ``StableDiffusion3*Pipeline`` | flow Euler, 28 steps, guidance 7, the scheduler's shift |
| ``sdxl`` | ``model_index.json`` of an SDXL pipeline, a ``text_encoder_2``, or a U-Net with ``text_time`` | the scheduler's sampler and spacing, guidance 5 |
| ``stable-diffusion`` | ``model_index.json`` of a ``StableDiffusion*Pipeline`` (1.x / 2.x) | the scheduler's sampler and spacing, guidance 7.5 |
| ``flux`` | ``model_index.json`` naming a ``FluxTransformer2DModel`` transformer | flow Euler, 28 steps, guidance 3.5, 1024 x 1024 (diffusers'); :func:`~difflab.pipelines.flux.flux_text_to_image` |
| ``sd-upscaler`` | ``model_index.json`` of a ``StableDiffusionUpscalePipeline`` (x4) or ``StableDiffusionLatentUpscalePipeline`` (x2) | the scheduler's sampler and grid, 75 steps, guidance 9; needs ``image=`` (the size comes from it); :func:`~difflab.pipelines.upscale.upscale` |
| ``sdxl-file``, ``sd3-file``, ``flux-file`` | a ``.safetensors`` single file in the family's original layout (:func:`~difflab.io.family_files.single_file_family`, from tensor names) | as the family's folder; ``base=`` (a diffusers folder of the family) supplies tokenizers, scheduler and, for Flux, text encoders and autoencoder |

The diffusers folders' scheduler gives their defaults: its timestep spacing and offset, and the
sampler that does what its scheduler class does (:data:`SCHEDULER_SAMPLERS`; DDIM otherwise).
``options`` and keyword overrides replace them.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..adapters import load_lora_weights
from ..core.consistency import ConsistencyFunction
from ..io.diffusers_folder import load_diffusers_folder
from ..io.family_files import load_flux_single_file, load_sd3_single_file, load_sdxl_single_file, single_file_family
from ..io.flux_folder import is_flux_folder, load_flux_folder
from ..io.sd3_folder import is_sd3_folder, load_sd3_folder
from ..io.sdxl_folder import is_sdxl_folder, load_sdxl_folder
from ..io.text_model import TextModel, is_text_model, read_text_model
from ..io.upscaler_folder import is_upscaler_folder, load_upscaler_folder
from .flux import DEFAULT_LATENT_SIZE, FLUX_DEFAULTS, flux_text_to_image
from .options import TEXT_DEFAULTS, SampleOptions, resolve
from .sd3 import SD3_DEFAULTS, sd3_text_to_image
from .sdxl import sdxl_text_to_image
from .text_to_image import text_to_image
from .upscale import upscale, upscaler_defaults

# diffusers scheduler class -> the difflab sampler taking the same steps
SCHEDULER_SAMPLERS = {"DDIMScheduler": "ddim", "EulerDiscreteScheduler": "euler", "EulerAncestralDiscreteScheduler": "euler_ancestral",
                      "DPMSolverMultistepScheduler": "dpmpp_2m", "HeunDiscreteScheduler": "heun", "LMSDiscreteScheduler": "lms",
                      "UniPCMultistepScheduler": "unipc", "DDPMScheduler": "ddpm", "LCMScheduler": "lcm"}
LORA_NAME = "lcm"
SIZE_KEYS = ("height", "width")


def folder_defaults(sampling: dict, sdxl: bool) -> SampleOptions:
    """:data:`TEXT_DEFAULTS` with a diffusers folder's scheduler hints (``sampling`` of the loaded components)."""
    return TEXT_DEFAULTS.replace(sampler=SCHEDULER_SAMPLERS.get(sampling.get("scheduler"), "ddim"),
                                 spacing=sampling.get("timestep_spacing", "leading"),
                                 steps_offset=int(sampling.get("steps_offset", 0)), guidance_scale=5.0 if sdxl else 7.5)


# ----------------------------------------------------------------------------------------------
# difflab's own text models


def load_text_model(path, device="cpu") -> TextModel:
    """A difflab text model (:mod:`difflab.io.text_model`); an LCM-LoRA it names is plugged into the
    base network and the model becomes its consistency function (Luo et al. 2023b: sampled with
    the LCM sampler, guidance 1)."""
    model = read_text_model(path, device)
    if model.meta.get("lora"):
        load_lora_weights(model.denoiser.net, model.meta["lora"], name=LORA_NAME, prefix="unet.")
        model.denoiser = ConsistencyFunction(model.denoiser, form="lcm").eval()
    return model


def model_options(model: TextModel) -> SampleOptions:
    """The text pipelines' defaults with the model's own sampling entries (its sampler, steps, grid,
    guidance scale, ...); a grid given as a list of sigmas becomes a tensor."""
    sampling = {k: v for k, v in model.sampling.items() if k not in SIZE_KEYS}
    if isinstance(sampling.get("grid"), list):
        sampling["grid"] = torch.tensor(sampling["grid"], dtype=torch.float64)
    return TEXT_DEFAULTS.replace(**sampling)


def sample_text_model(model: TextModel, prompts, *, negative_prompts=None, options: SampleOptions | None = None,
                      height: int | None = None, width: int | None = None, output_type: str = "pt"):
    """Images of ``prompts`` from a loaded difflab text model with its defaults (:func:`model_options`),
    ``options`` replacing them, at ``height`` x ``width`` (default: the model's own size)."""
    options = model_options(model) if options is None else options
    height, width = height or model.sampling.get("height"), width or model.sampling.get("width")
    return text_to_image(model.denoiser, model.text_encoder, model.vae, prompts, negative_prompts=negative_prompts,
                         height=height, width=width, output_type=output_type, options=options)


# ----------------------------------------------------------------------------------------------
# The families: (folder, prompts, request, options, overrides, dtype) -> images


def _device(options, overrides) -> str:
    return (options.device if options is not None else None) or overrides.get("device") or "cpu"


def _sample_difflab(folder, prompts, request, options, overrides, dtype):
    device = _device(options, overrides)
    model = load_text_model(folder, device)
    if dtype is not None:
        for part in (model.denoiser, model.text_encoder, model.vae):
            if part is not None:
                part.to(dtype)
    opts = resolve(options, model_options(model), overrides).replace(device=device)
    return sample_text_model(model, prompts, options=opts, **request)


def _sample_sd3(folder, prompts, request, options, overrides, dtype, parts=None):
    device = _device(options, overrides)
    parts = parts or load_sd3_folder(folder, device=device, dtype=dtype)
    opts = resolve(options, SD3_DEFAULTS, overrides).replace(device=device)
    return sd3_text_to_image(parts.denoiser, parts.text_encoder, parts.vae, prompts, shift=parts.sampling["shift"],
                             options=opts, **request)


def _sample_flux(folder, prompts, request, options, overrides, dtype, parts=None):
    """Flux (T5 and CLIP, the size-shifted grid, the guidance scale as an input of FLUX.1-dev);
    a negative prompt needs ``true_cfg_scale``, which only the Python call takes."""
    if request.get("negative_prompts") is not None:
        raise ValueError("a Flux model takes a negative prompt only with true_cfg_scale > 1: call "
                         "difflab.pipelines.flux.flux_text_to_image(..., negative_prompts=, true_cfg_scale=)")
    device = _device(options, overrides)
    flux = parts or load_flux_folder(folder, device=device, dtype=dtype)
    size = DEFAULT_LATENT_SIZE * flux.vae.downsample_factor
    opts = resolve(options, FLUX_DEFAULTS, overrides).replace(device=device)
    return flux_text_to_image(flux, prompts, height=request["height"] or size, width=request["width"] or size,
                              output_type=request["output_type"], options=opts)


def _sample_diffusers(folder, prompts, request, options, overrides, dtype, *, sdxl: bool, parts=None):
    device = _device(options, overrides)
    load = load_sdxl_folder if sdxl else load_diffusers_folder
    parts = parts or load(folder, device=device, dtype=dtype)
    opts = resolve(options, folder_defaults(parts.sampling, sdxl), overrides).replace(device=device)
    args = (parts.denoiser, parts.text_encoder, parts.vae, prompts)
    if sdxl:
        return sdxl_text_to_image(*args, force_zeros_for_empty_prompt=parts.force_zeros_for_empty_prompt, options=opts,
                                  **request)
    return text_to_image(*args, options=opts, **request)


def _sample_upscaler(folder, prompts, request, options, overrides, dtype):
    """Stable Diffusion's x4 or x2 latent upscaler: the low-resolution ``image`` sets the size."""
    for key in ("height", "width"):
        if request.get(key) is not None:
            raise ValueError(f"{key} is set by the low-resolution image of an upscaler (x4 or x2 its size), not given")
    device = _device(options, overrides)
    parts = load_upscaler_folder(folder, device=device, dtype=dtype)
    opts = resolve(options, upscaler_defaults(parts), overrides).replace(device=device)
    return upscale(parts, prompts, request["image"], negative_prompts=request["negative_prompts"],
                   output_type=request["output_type"], options=opts)


# ----------------------------------------------------------------------------------------------
# Single files: the family's loader, then the same sampling as its folder


def _single_file(family: str, load, sample):
    """A :data:`MODEL_FOLDERS` entry's ``(detect, sample)`` for one family's single files: the file
    is read with ``load(path, base=request["base"])`` and sampled as that family's folder."""
    def detect(path) -> bool:
        return single_file_family(path) == family

    def run(path, prompts, request, options, overrides, dtype):
        request = dict(request)
        base = request.pop("base", None)
        if base is None:
            raise ValueError(f"{path} is a single-file {family} checkpoint: it holds no tokenizer or scheduler"
                             f"{' (nor text encoders or autoencoder)' if family == 'flux' else ''}; pass base= "
                             f"(difflab sample --base FOLDER), a diffusers {family} folder to take them from")
        parts = load(path, base=base, device=_device(options, overrides), dtype=dtype)
        return sample(path, prompts, request, options, overrides, dtype, parts=parts)
    return detect, run


def pipeline_class(folder) -> str:
    """The ``_class_name`` of a folder's ``model_index.json`` ("" when there is none)."""
    index = Path(folder) / "model_index.json"
    try:
        return str(json.loads(index.read_text()).get("_class_name", "")) if index.is_file() else ""
    except (OSError, ValueError):
        return ""


def is_stable_diffusion(folder) -> bool:
    """A diffusers Stable Diffusion 1.x / 2.x folder."""
    return pipeline_class(folder).startswith("StableDiffusion") and not (is_sdxl_folder(folder) or is_sd3_folder(folder)
                                                                         or is_upscaler_folder(folder))


MODEL_FOLDERS = [
    ("difflab", is_text_model, _sample_difflab),
    ("sd3", is_sd3_folder, _sample_sd3),  # SD3 and Flux before SDXL: their folders have a text_encoder_2 too
    ("flux", is_flux_folder, _sample_flux),
    ("sd-upscaler", is_upscaler_folder, _sample_upscaler),  # before stable-diffusion: its class name starts alike
    ("sdxl", is_sdxl_folder, lambda *a: _sample_diffusers(*a, sdxl=True)),
    ("stable-diffusion", is_stable_diffusion, lambda *a: _sample_diffusers(*a, sdxl=False)),
    ("sdxl-file", *_single_file("sdxl", load_sdxl_single_file, lambda *a, **k: _sample_diffusers(*a, sdxl=True, **k))),
    ("sd3-file", *_single_file("sd3", load_sd3_single_file, _sample_sd3)),
    ("flux-file", *_single_file("flux", load_flux_single_file, _sample_flux)),
]
# the entries that read a single file, and take base= (the folder supplying what the file lacks)
SINGLE_FILE_FAMILIES = ("sdxl-file", "sd3-file", "flux-file")


# the layouts that take a low-resolution image (``image=``, ``difflab sample --image``)
IMAGE_FAMILIES = ("sd-upscaler",)


def model_family(folder) -> str:
    """The name of the :data:`MODEL_FOLDERS` layout ``folder`` has; an error naming them otherwise."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"{folder} is not a folder or a single file (give one of: "
                                f"{', '.join(n for n, _, _ in MODEL_FOLDERS)})")
    for name, detect, _ in MODEL_FOLDERS:
        if detect(folder):
            return name
    named = pipeline_class(folder)
    raise ValueError(f"{folder} is not a model folder difflab knows: it needs a model.safetensors of difflab or a "
                     f"diffusers pipeline's model_index.json; known layouts: {', '.join(n for n, _, _ in MODEL_FOLDERS)}"
                     + (f" (its model_index.json names {named!r})" if named else ""))


def check_image_request(family: str, image) -> None:
    """A ValueError when an image is given to a layout that takes none, or missing for one that needs it."""
    if image is None and family in IMAGE_FAMILIES:
        raise ValueError(f"a {family} folder upscales an image: give image= (difflab sample --image LOW.png)")
    if image is not None and family not in IMAGE_FAMILIES:
        raise ValueError(f"image is for upscaler folders ({', '.join(IMAGE_FAMILIES)}); this {family} folder samples from prompts alone")


@torch.no_grad()
def sample_folder(folder, prompts, *, negative_prompts=None, height: int | None = None, width: int | None = None,
                  options: SampleOptions | None = None, dtype: torch.dtype | None = None, output_type: str = "pt",
                  image=None, base=None, **overrides) -> torch.Tensor:
    """Images (N, C, H, W) in [-1, 1], one per prompt, from the model in ``folder`` (any layout of
    :data:`MODEL_FOLDERS`) with its family's defaults; ``options`` / ``overrides`` as the
    pipelines'; ``device`` also loads the weights there (default CPU), ``dtype`` casts them
    (sampling arithmetic stays float32); ``output_type`` as the pipelines' (``"pt"``, ``"latent"``, ...).
    ``image``: the low-resolution image(s) an upscaler folder (:data:`IMAGE_FAMILIES`) needs, and
    no other takes (a (N or 1, C, H, W) tensor in [-1, 1], or Pillow images); ``base``: for a single
    file, a diffusers folder of its family supplying what the file lacks."""
    family = model_family(folder)
    check_image_request(family, image)
    sample = next(fn for name, _, fn in MODEL_FOLDERS if name == family)
    request = dict(negative_prompts=negative_prompts, height=height, width=width, output_type=output_type)
    if image is not None:
        request["image"] = image
    if base is not None:
        if family not in SINGLE_FILE_FAMILIES:
            raise ValueError(f"base= is for single-file checkpoints ({', '.join(SINGLE_FILE_FAMILIES)}); {folder} is a "
                             f"{family} model, which holds everything itself")
        request["base"] = base
    return sample(folder, prompts, request, options, overrides, dtype)


__all__ = ["sample_folder", "folder_defaults", "SCHEDULER_SAMPLERS", "MODEL_FOLDERS", "model_family", "load_text_model",
           "model_options", "sample_text_model", "pipeline_class", "is_stable_diffusion", "IMAGE_FAMILIES",
           "check_image_request", "SINGLE_FILE_FAMILIES"]
