"""A text-to-image model in one safetensors file: what ``difflab dreambooth``, ``difflab demo --text``
and ``difflab distill --method lcm|lcm-lora`` write and ``difflab sample --model`` reads.

``model.safetensors`` (or any ``.safetensors`` path) holds the tensors ``unet.*`` (the denoiser's
network), ``text_encoder.*`` (a :class:`~difflab.nn.text.TinyTextEncoder`) and, for a latent model,
``vae.*`` (an :class:`~difflab.nn.AutoencoderKL`); its header holds ``kind`` (:data:`KIND`),
``spec`` (:func:`difflab.io.spec.build_denoiser`, a distilled student's ``"student"`` section
included), the encoder's and the VAE's configs, ``sampling`` (the model's own sampling defaults:
sampler, steps, grid, guidance_scale, height, width), ``lora`` (the file name, beside the model, of
an adapter to plug in on load, e.g. an LCM-LoRA; applied by :func:`difflab.pipelines.load_text_model`,
adapters sitting above io) and the writer's metadata (e.g. ``size``). Written atomically, read with
every tensor checked finite (:mod:`difflab.io.checkpoint`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..nn import AutoencoderKL
from ..nn.text import TinyTextConfig, TinyTextEncoder
from ..nn.vae import VAEConfig
from .checkpoint import CHECKPOINT_NAME, load_checkpoint, load_model_state, read_metadata, save_checkpoint
from .spec import build_denoiser, read_spec

KIND = "difflab.text_model"
MODEL_FILE = "model.safetensors"
RESERVED = ("kind", "spec", "text_encoder", "vae", "sampling", "lora")


@dataclass
class TextModel:
    """The pieces of a text-to-image model: ``denoiser`` ``D(x, sigma, context=, context_mask=)``,
    ``text_encoder``, ``vae`` (None for a pixel-space model), ``sampling`` (the model's own
    sampling defaults), ``meta`` (the file's header; ``lora`` an absolute path or None) and
    ``pipeline``: the family's own text-to-image function ``pipeline(prompts, *, negative_prompts,
    height, width, output_type, options)``, for a family that conditions or samples otherwise (Flux:
    two text encoders, a size-shifted grid); None means :func:`difflab.pipelines.text_to_image`."""

    denoiser: torch.nn.Module
    text_encoder: torch.nn.Module
    vae: torch.nn.Module | None = None
    sampling: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    pipeline: object = None


def model_file(path) -> Path:
    """The model file of ``path``: itself when a file, else ``path/model.safetensors``."""
    path = Path(path)
    return path if path.suffix == ".safetensors" or path.is_file() else path / MODEL_FILE


def is_text_model(path) -> bool:
    """Whether ``path`` (a file, or a folder holding ``model.safetensors``) is a text model of this layout."""
    file = model_file(path)
    try:
        return file.is_file() and read_metadata(file).get("kind") == KIND
    except (OSError, ValueError):
        return False


def save_text_model(path, denoiser, text_encoder: TinyTextEncoder, spec: dict, metadata: dict | None = None, *,
                    vae: AutoencoderKL | None = None, sampling: dict | None = None, lora: str | None = None,
                    state: dict | None = None) -> Path:
    """Write a text model atomically (module doc). ``path``: a ``.safetensors`` file or a folder
    (gets ``model.safetensors``); ``state``: the network's tensors when not ``denoiser.net``'s own
    (e.g. with adapters merged); ``lora``: an adapter's file name beside the model. Returns the file."""
    if not isinstance(text_encoder, TinyTextEncoder):
        raise TypeError(f"a text model holds a TinyTextEncoder, got {type(text_encoder).__name__}")
    read_spec(spec)
    clash = sorted(set(metadata or {}) & set(RESERVED))
    if clash:
        raise ValueError(f"metadata keys {clash} are the model file's own; rename them")
    state = denoiser.net.state_dict() if state is None else state
    tensors = {f"unet.{k}": v.detach() for k, v in state.items()}
    tensors.update({f"text_encoder.{k}": v for k, v in text_encoder.state_dict().items()})
    if vae is not None:
        tensors.update({f"vae.{k}": v for k, v in vae.state_dict().items()})
    meta = {**(metadata or {}), "kind": KIND, "spec": spec, "text_encoder": text_encoder.config.to_dict(),
            "vae": None if vae is None else vae.config.to_dict(), "sampling": dict(sampling or {}), "lora": lora}
    return save_checkpoint(model_file(path), tensors, meta)


def read_text_model(path, device="cpu") -> TextModel:
    """Inverse of :func:`save_text_model` (the adapter ``meta["lora"]`` names is not applied), in eval mode."""
    path = Path(path)
    file = model_file(path)
    if path.is_dir() and not file.exists() and (path / CHECKPOINT_NAME).exists():
        file = path / CHECKPOINT_NAME  # a training run's folder: read it, to say what it holds
    tensors, meta = load_checkpoint(file, device=device)
    if meta.get("kind") != KIND:
        raise ValueError(f"{file} holds a {meta.get('kind')!r} checkpoint, not a text-to-image model (kind {KIND!r}: "
                         "a U-Net with cross-attention, its TinyTextEncoder and optionally a VAE, written by difflab "
                         "dreambooth, difflab demo --text or difflab distill --method lcm|lcm-lora)")
    denoiser = build_denoiser(meta["spec"])
    text_config = TinyTextConfig.from_dict(meta["text_encoder"], "text_encoder")
    context_dim = getattr(getattr(denoiser.net, "config", None), "context_dim", text_config.width)
    if context_dim != text_config.width:
        raise ValueError(f"{file}: the U-Net's context_dim={context_dim} does not match the text encoder's width {text_config.width}")
    text_encoder = TinyTextEncoder(text_config)
    load_model_state(denoiser.net, tensors, prefix="unet.")
    load_model_state(text_encoder, tensors, prefix="text_encoder.")
    vae = None
    if meta.get("vae"):
        vae = AutoencoderKL(VAEConfig.from_dict(meta["vae"], "vae"))
        load_model_state(vae, tensors, prefix="vae.")
        vae = vae.to(device).eval()
    lora = meta.get("lora")
    if lora is not None:
        lora = file.parent / str(lora)
        if not lora.is_file():
            raise FileNotFoundError(f"{file} names the adapter {meta['lora']!r}, which is not beside it in {file.parent}")
    return TextModel(denoiser.to(device).eval(), text_encoder.to(device).eval(), vae, dict(meta.get("sampling") or {}),
                     {**meta, "lora": None if lora is None else str(lora), "file": str(file)})


__all__ = ["TextModel", "is_text_model", "save_text_model", "read_text_model", "model_file", "KIND", "MODEL_FILE"]
