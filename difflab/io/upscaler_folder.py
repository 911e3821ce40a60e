"""Local diffusers folders of Stable Diffusion's upscalers in, difflab components out. Offline only.

Two layouts, told apart by ``model_index.json``'s ``_class_name``:

``StableDiffusionUpscalePipeline`` (the x4 upscaler, stabilityai/stable-diffusion-x4-upscaler)::

    unet/                UNet2DConditionModel, 7 input channels (4 latent + 3 low-res pixels),
                         num_class_embeds (the noise level), only_cross_attention   -> UNetSD
    text_encoder/, tokenizer/   CLIPTextModel (OpenCLIP ViT-H)                       -> CLIPTextEncoder
    vae/                 AutoencoderKL, factor 4, scaling_factor 0.08333
    scheduler/           DDIMScheduler (v-prediction)                                -> VPDiscrete frame
    low_res_scheduler/   DDPMScheduler: the schedule that noises the low-res image   -> ``low_res_alpha_bars``
    model_index.json     ``max_noise_level`` (350)

``StableDiffusionLatentUpscalePipeline`` (the x2 latent upscaler, stabilityai/sd-x2-latent-upscaler)::

    unet/                UNet2DConditionModel with K blocks, Fourier time features, time_cond_proj_dim,
                         8 input channels (4 latent + 4 low-res latents), 5 output channels -> UNetSD
    text_encoder/, tokenizer/   CLIPTextModel (CLIP ViT-L): last hidden states before the final
                         LayerNorm, and the pooled vector                            -> CLIPTextEncoder
    vae/                 AutoencoderKL (SD's, scaling_factor 0.18215)
    scheduler/           EulerDiscreteScheduler, prediction_type "sample"            -> EDM frame

The latent upscaler is EDM-preconditioned as diffusers' pipeline runs it (Karras et al. 2022,
Table 1, with sigma_data = 1): network input x / sqrt(sigma^2 + 1), time ln(sigma) / 4, and
x0 = x / (sigma^2 + 1) + F sigma / sqrt(sigma^2 + 1); its sigma range is that of the scheduler's
discrete schedule, and ``use_karras_sigmas`` picks the Karras grid. So its denoiser is
``Denoiser(net, EDM(sigma_data=1, ...), "edm")``, the x4's the usual ``VPDiscrete`` one. Both
wrap the U-Net in :class:`~difflab.nn.upscaler.ImageConcatNet`: ``D(x, sigma, image=, ...)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core import Denoiser, VPDiscrete
from ..nn.unet_sd import UNetSD
from ..nn.upscaler import ImageConcatNet
from ..nn.text import load_clip_tokenizer
from .diffusers_folder import (MODEL_INDEX, SCHEDULER_CONFIG, SD_DIFFUSION, SD_SAMPLING, _component_folder,
                               diffusion_from_scheduler_config, load_diffusers_text_encoder, read_scheduler_and_unet)
from .diffusers_vae import load_diffusers_vae
from .folders import read_json
from .spec import build_frame

# pipeline class -> difflab's name for the kind of upscaler
UPSCALER_PIPELINES = {"StableDiffusionUpscalePipeline": "x4", "StableDiffusionLatentUpscalePipeline": "latent"}
COMPONENTS = ("unet", "text_encoder", "tokenizer", "vae", "scheduler")
X4_MAX_NOISE_LEVEL = 350  # diffusers' default max_noise_level
X4_SCALING_FACTOR = 0.08333  # the x4 VAE's, which diffusers' pipeline enforces


@dataclass
class UpscalerComponents:
    """An upscaler folder as difflab objects (None where not loaded).

    ``kind``: ``"x4"`` or ``"latent"``. ``denoiser``: ``D(x, sigma, image=, context=, ...)`` around
    ``unet`` (:class:`~difflab.nn.upscaler.ImageConcatNet`); ``diffusion`` its spec; ``sampling``
    the scheduler's hints; ``timestep_frame``: the scheduler's discrete schedule (for the latent
    upscaler's timestep grids); ``low_res_alpha_bars`` (x4): alpha_bar of the schedule that noises
    the low-resolution image at ``noise_level``; ``max_noise_level`` (x4).
    """

    kind: str = "x4"
    unet: UNetSD | None = None
    text_encoder: torch.nn.Module | None = None
    vae: torch.nn.Module | None = None
    denoiser: Denoiser | None = None
    diffusion: dict = field(default_factory=lambda: dict(SD_DIFFUSION))
    sampling: dict = field(default_factory=lambda: dict(SD_SAMPLING))
    scheduler_config: dict | None = None
    timestep_frame: VPDiscrete | None = None
    low_res_alpha_bars: torch.Tensor | None = None
    max_noise_level: int = X4_MAX_NOISE_LEVEL


def upscaler_kind(folder) -> str | None:
    """``"x4"`` / ``"latent"`` for a diffusers upscaler folder, None for any other folder."""
    index = Path(folder) / MODEL_INDEX
    if not index.is_file():
        return None
    return UPSCALER_PIPELINES.get(read_json(index, "a diffusers pipeline folder").get("_class_name"))


def is_upscaler_folder(folder) -> bool:
    """Whether ``folder`` is a diffusers ``StableDiffusionUpscalePipeline`` or ``StableDiffusionLatentUpscalePipeline`` folder."""
    return upscaler_kind(folder) is not None


def edm_diffusion(timestep_frame: VPDiscrete) -> dict:
    """The latent upscaler's spec: EDM with sigma_data 1 over the discrete schedule's sigma range."""
    return {"frame": "edm", "sigma_data": 1.0, "sigma_min": float(timestep_frame.sigma_min),
            "sigma_max": float(timestep_frame.sigma_max), "prediction": "edm"}


def load_upscaler_folder(folder, *, components=COMPONENTS, variant: str | None = None, dtype: torch.dtype | None = None,
                         device="cpu") -> UpscalerComponents:
    """Read a local diffusers upscaler folder (never the network); ``components``, ``variant``,
    ``dtype`` and ``device`` as :func:`~difflab.io.diffusers_folder.load_diffusers_folder`'s."""
    root = Path(folder)
    index = read_json(root / MODEL_INDEX, "a diffusers pipeline folder")
    kind = UPSCALER_PIPELINES.get(index.get("_class_name"))
    if kind is None:
        raise ValueError(f"{root} is a {index.get('_class_name')!r} folder, not an upscaler (one of {sorted(UPSCALER_PIPELINES)})")
    unknown = sorted(set(components) - set(COMPONENTS))
    if unknown:
        raise ValueError(f"unknown components {unknown}; choose from {list(COMPONENTS)}")
    out = UpscalerComponents(kind=kind, max_noise_level=int(index.get("max_noise_level", X4_MAX_NOISE_LEVEL)))

    # 1. Scheduler -> frame, prediction, grid hints; 2. U-Net
    read_scheduler_and_unet(out, root, index, components, "x0" if kind == "latent" else None, variant, dtype, device)
    out.timestep_frame = build_frame(out.diffusion)
    if kind == "latent":  # EDM preconditioning over the discrete schedule's sigmas
        out.diffusion = edm_diffusion(out.timestep_frame)
        out.sampling["grid"] = "karras" if (out.scheduler_config or {}).get("use_karras_sigmas") else "timesteps"
    else:
        low = _component_folder(root, index, "low_res_scheduler")
        low_config = read_json(low / SCHEDULER_CONFIG, "a diffusers scheduler config")
        out.low_res_alpha_bars = build_frame(diffusion_from_scheduler_config(low_config, "eps")[0]).alpha_bars
    if out.unet is not None:
        sample_channels = out.unet.config.in_channels - (3 if kind == "x4" else out.unet.config.out_channels - 1)
        net = ImageConcatNet(out.unet, sample_channels)
        out.denoiser = Denoiser(net, build_frame(out.diffusion), prediction=out.diffusion["prediction"])

    # 3. Tokenizer and text encoder (the latent upscaler's: the last hidden states before the final LayerNorm)
    tokenizer = None
    if "tokenizer" in components:
        tokenizer = load_clip_tokenizer(_component_folder(root, index, "tokenizer", ("CLIPTokenizer", "CLIPTokenizerFast")))
    if "text_encoder" in components:
        enc = _component_folder(root, index, "text_encoder", ("CLIPTextModel",))
        out.text_encoder = load_diffusers_text_encoder(enc, tokenizer=tokenizer, variant=variant, dtype=dtype,
                                                       norm_hidden=kind != "latent").to(device)

    # 4. Autoencoder (the x4's: factor 4, scaling_factor 0.08333)
    if "vae" in components:
        out.vae = load_diffusers_vae(_component_folder(root, index, "vae", ("AutoencoderKL",)), variant=variant, dtype=dtype).to(device)
        if kind == "x4" and out.vae.config.scaling_factor != X4_SCALING_FACTOR:
            raise ValueError(f"{root}/vae has scaling_factor={out.vae.config.scaling_factor}, but the x4 upscaler's VAE has "
                             f"{X4_SCALING_FACTOR} (diffusers resets it too): fix vae/config.json")
    return out


__all__ = ["UpscalerComponents", "load_upscaler_folder", "is_upscaler_folder", "upscaler_kind", "edm_diffusion",
           "UPSCALER_PIPELINES", "X4_MAX_NOISE_LEVEL", "X4_SCALING_FACTOR"]
