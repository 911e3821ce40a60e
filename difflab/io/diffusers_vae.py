"""Autoencoder weights people already have, read and written offline (local files only).

- a diffusers ``AutoencoderKL`` folder: ``config.json`` + ``diffusion_pytorch_model.safetensors``
  (or a sharded ``...safetensors.index.json``), e.g. the ``vae/`` folder of a Stable Diffusion
  pipeline: :func:`load_diffusers_vae`, and back: :func:`save_diffusers_vae`;
- the ``first_stage_model.*`` tensors of a single-file Stable Diffusion 1.x / 2.x / XL checkpoint
  (the original latent-diffusion layout): :func:`load_sd_vae_from_single_file`, and back:
  :func:`sd_single_file_state`.

Key names go through the tables of :mod:`difflab.io.keymaps.vae`; a mismatch raises a
ValueError naming the missing and unexpected keys. Pickled ``.bin`` / ``.ckpt`` files are never
opened. Nothing here touches the network.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..nn.vae import AutoencoderKL, VAEConfig
from .folders import CONFIG_NAME, load_into, read_json, read_safetensors, save_model_folder
from .keymaps import from_difflab, to_difflab
from .keymaps.vae import DIFFUSERS, ORIGINAL, ORIGINAL_IGNORED_PREFIXES, ORIGINAL_PREFIX

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"

# diffusers config key -> VAEConfig field
_CONFIG_FIELDS = {
    "in_channels": "in_channels", "out_channels": "out_channels", "latent_channels": "latent_channels",
    "block_out_channels": "block_out_channels", "layers_per_block": "layers_per_block",
    "norm_num_groups": "norm_num_groups", "scaling_factor": "scaling_factor", "shift_factor": "shift_factor",
    "mid_block_add_attention": "mid_block_attention", "use_quant_conv": "use_quant_conv",
    "use_post_quant_conv": "use_post_quant_conv",
}
# diffusers config keys that do not change the network
_IGNORED = {"sample_size", "force_upcast"}
# diffusers config keys whose only supported value is this one
_REQUIRED = {"act_fn": "silu", "latents_mean": None, "latents_std": None}


# ----------------------------------------------------------------------------------------------
# config.json <-> VAEConfig


def config_from_diffusers(d: dict) -> VAEConfig:
    """A :class:`VAEConfig` from a diffusers ``AutoencoderKL`` ``config.json`` dict; settings
    difflab does not implement raise a ValueError naming them."""
    if d.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise ValueError(f"config.json describes a {d['_class_name']!r}, not an 'AutoencoderKL'")
    unknown = sorted(k for k in d if not k.startswith("_") and k not in _CONFIG_FIELDS and k not in _IGNORED
                     and k not in _REQUIRED and k not in ("down_block_types", "up_block_types"))
    if unknown:
        raise ValueError(f"unsupported AutoencoderKL config keys: {unknown}")
    for key, value in _REQUIRED.items():
        if d.get(key, value) != value:
            raise ValueError(f"unsupported AutoencoderKL config: {key}={d[key]!r} (difflab supports only {value!r})")
    kwargs = {field: d[key] for key, field in _CONFIG_FIELDS.items() if key in d}
    n = len(kwargs.get("block_out_channels", VAEConfig.block_out_channels))
    for key, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = list(d.get(key, [block] * n))
        if types != [block] * n:
            raise ValueError(f"unsupported AutoencoderKL config: {key}={types} (difflab supports {n} x {block!r}, "
                             f"one per entry of block_out_channels)")
    return VAEConfig(**kwargs)


def config_to_diffusers(config: VAEConfig, sample_size: int = 512) -> dict:
    """The diffusers ``config.json`` dict of a :class:`VAEConfig` (``sample_size`` is diffusers'
    default tile size; it does not change the network)."""
    c = config.to_dict()
    d = {"_class_name": "AutoencoderKL", "act_fn": "silu",
         "down_block_types": ["DownEncoderBlock2D"] * len(config.block_out_channels),
         "up_block_types": ["UpDecoderBlock2D"] * len(config.block_out_channels),
         "sample_size": sample_size, "force_upcast": True, "latents_mean": None, "latents_std": None}
    d.update({key: c[field] for key, field in _CONFIG_FIELDS.items()})
    return d


# ----------------------------------------------------------------------------------------------
# Loading into a model


def _load_renamed(config: VAEConfig, state: dict[str, torch.Tensor], source: str, dtype: torch.dtype | None) -> AutoencoderKL:
    vae = AutoencoderKL(config)
    load_into(vae, state, source)
    if dtype is not None:
        vae.to(dtype)
    return vae.eval()


def load_diffusers_vae(folder, *, variant: str | None = None, dtype: torch.dtype | None = None) -> AutoencoderKL:
    """An :class:`AutoencoderKL` from a local diffusers ``AutoencoderKL`` folder (``config.json`` +
    ``diffusion_pytorch_model[.variant].safetensors``), in eval mode. Offline: reads only the folder.

    The weights keep their stored values and are copied into the model's float32 parameters
    (cast to ``dtype`` afterwards when given).
    """
    folder = Path(folder)
    config = config_from_diffusers(read_json(folder / CONFIG_NAME, "a diffusers AutoencoderKL folder"))
    state = to_difflab(read_safetensors(folder, WEIGHTS_NAME, variant), DIFFUSERS)
    return _load_renamed(config, state, f"diffusers AutoencoderKL weights in {folder}", dtype)


def save_diffusers_vae(vae: AutoencoderKL, folder, *, sample_size: int = 512) -> Path:
    """Write ``vae`` as a diffusers ``AutoencoderKL`` folder (``config.json`` +
    ``diffusion_pytorch_model.safetensors``), atomically; returns the folder."""
    return save_model_folder(folder, WEIGHTS_NAME, from_difflab(vae.state_dict(), DIFFUSERS),
                             config_to_diffusers(vae.config, sample_size))


# ----------------------------------------------------------------------------------------------
# Single-file Stable Diffusion checkpoints (original layout)


def infer_vae_config(state: dict[str, torch.Tensor], *, norm_num_groups: int = 32, scaling_factor: float = 0.18215,
                     shift_factor: float | None = None) -> VAEConfig:
    """The :class:`VAEConfig` that a difflab-layout state dict was made for, read from tensor
    shapes. GroupNorm groups and the latent scaling are not stored in the weights: pass them
    (defaults: Stable Diffusion 1.x / 2.x; SD XL uses ``scaling_factor=0.13025``)."""
    def shape(key):
        if key not in state:
            raise ValueError(f"cannot infer the VAE config: no tensor {key!r} in the checkpoint")
        return state[key].shape
    widths = []
    while f"encoder.down_blocks.{len(widths)}.resnets.0.conv1.weight" in state:
        widths.append(shape(f"encoder.down_blocks.{len(widths)}.resnets.0.conv1.weight")[0])
    if not widths:
        raise ValueError("cannot infer the VAE config: no encoder.down_blocks.0.resnets.0.conv1.weight in the checkpoint")
    layers = len({m.group(1) for k in state for m in [re.match(r"encoder\.down_blocks\.0\.resnets\.(\d+)\.", k)] if m})
    return VAEConfig(
        in_channels=shape("encoder.conv_in.weight")[1], out_channels=shape("decoder.conv_out.weight")[0],
        latent_channels=shape("decoder.conv_in.weight")[1], block_out_channels=tuple(widths), layers_per_block=layers,
        norm_num_groups=norm_num_groups, scaling_factor=scaling_factor, shift_factor=shift_factor,
        mid_block_attention="encoder.mid_block.attention.to_q.weight" in state,
        use_quant_conv="quant_conv.weight" in state, use_post_quant_conv="post_quant_conv.weight" in state)


def _num_levels(original: dict[str, torch.Tensor]) -> int:
    levels = {m.group(1) for k in original for m in [re.match(r"encoder\.down\.(\d+)\.", k)] if m}
    if not levels:
        raise ValueError("no encoder.down.{i}.* tensors: not the autoencoder of a Stable Diffusion checkpoint")
    return len(levels)


def load_sd_vae_from_single_file(tensors, config: VAEConfig | None = None, *, prefix: str = ORIGINAL_PREFIX,
                                 norm_num_groups: int = 32, scaling_factor: float = 0.18215,
                                 shift_factor: float | None = None, dtype: torch.dtype | None = None) -> AutoencoderKL:
    """An :class:`AutoencoderKL` from the autoencoder of a single-file Stable Diffusion checkpoint.

    ``tensors``: the checkpoint's tensors (a dict, or the path of a ``.safetensors`` file); the
    keys under ``prefix`` (``"first_stage_model."``; ``""`` for a bare autoencoder state dict)
    are read in the original latent-diffusion layout. Without ``config``, the architecture is
    read from the tensor shapes (:func:`infer_vae_config`, with ``norm_num_groups`` and
    ``scaling_factor``, ``shift_factor``: SD3's 16-channel autoencoder has both). Training leftovers under ``loss.`` (LPIPS, discriminator) are skipped.
    """
    if not isinstance(tensors, dict):
        tensors = load_file(str(tensors))
    original = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if not original:
        prefixes = sorted({k.split(".", 1)[0] + "." for k in tensors})
        raise ValueError(f"no tensors under prefix {prefix!r} in the checkpoint (prefixes present: {prefixes})")
    original = {k: v for k, v in original.items() if not k.startswith(ORIGINAL_IGNORED_PREFIXES)}
    num_levels = len(config.block_out_channels) if config is not None else _num_levels(original)
    state = to_difflab(original, ORIGINAL, num_levels=num_levels)
    if config is None:
        config = infer_vae_config(state, norm_num_groups=norm_num_groups, scaling_factor=scaling_factor,
                                  shift_factor=shift_factor)
    return _load_renamed(config, state, f"single-file Stable Diffusion autoencoder (prefix {prefix!r})", dtype)


def sd_single_file_state(vae: AutoencoderKL, prefix: str = ORIGINAL_PREFIX) -> dict[str, torch.Tensor]:
    """``vae``'s weights in the original latent-diffusion layout, keys under ``prefix``: what a
    single-file Stable Diffusion checkpoint holds for its autoencoder."""
    state = from_difflab(vae.state_dict(), ORIGINAL, num_levels=len(vae.config.block_out_channels))
    return {prefix + k: v for k, v in state.items()}


__all__ = ["load_diffusers_vae", "save_diffusers_vae", "config_from_diffusers", "config_to_diffusers",
           "load_sd_vae_from_single_file", "sd_single_file_state", "infer_vae_config"]
