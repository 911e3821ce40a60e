"""Checkpoints and other files: safetensors for tensors, JSON for everything else, never pickle."""
from .checkpoint import (CHECKPOINT_NAME, checkpoint_path, load_checkpoint, load_model_state, optimizer_state_from_tensors,
                         optimizer_state_to_tensors, read_metadata, save_checkpoint, strip_prefix)
from .diffusers_vae import load_diffusers_vae, load_sd_vae_from_single_file, save_diffusers_vae, sd_single_file_state
from .diffusers_folder import StableDiffusionComponents, load_diffusers_folder, save_diffusers_folder
from .motion_folder import load_motion_adapter, load_unet_motion_model, save_motion_adapter, save_unet_motion_model
from .sd3_folder import SD3Components, load_sd3_folder
from .sdxl_folder import SDXLComponents, is_sdxl_folder, load_sdxl_folder
from .single_file import load_single_file, save_single_file
from .text import load_tiny_text, save_tiny_text
from .text_model import TextModel, is_text_model, read_text_model, save_text_model

__all__ = [
    "CHECKPOINT_NAME", "checkpoint_path", "save_checkpoint", "load_checkpoint", "read_metadata", "strip_prefix",
    "load_model_state", "optimizer_state_to_tensors", "optimizer_state_from_tensors", "load_diffusers_vae",
    "save_diffusers_vae", "load_sd_vae_from_single_file", "sd_single_file_state", "load_diffusers_folder",
    "save_diffusers_folder", "StableDiffusionComponents", "load_single_file", "save_single_file",
    "save_tiny_text", "load_tiny_text", "TextModel", "is_text_model", "read_text_model", "save_text_model",
    "SDXLComponents", "load_sdxl_folder", "is_sdxl_folder", "SD3Components", "load_sd3_folder",
    "load_motion_adapter", "load_unet_motion_model", "save_motion_adapter", "save_unet_motion_model",
]
