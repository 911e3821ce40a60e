"""Adapters: module surgery by name pattern (STYLE.md, rule 9; the surgery itself in :mod:`.surgery`).
LoRA (Hu et al. 2021) in :mod:`.lora`, ControlNet (Zhang et al. 2023) in :mod:`.controlnet`, IP-Adapter
(Ye et al. 2023) in :mod:`.ip_adapter`."""
from .controlnet import (ControlledDenoiser, ControlledUNet, ControlNet, ControlNetConditioningEmbedding, ControlNetConfig,
                         control_sigma_range, controlnet_from_original, load_diffusers_controlnet,
                         save_diffusers_controlnet, skip_channels)
from .ip_adapter import (DecoupledCrossAttention, ImageProjection, IPAdapterUNet, cross_attention_modules,
                         install_ip_adapter, ip_adapter_layers, ip_adapter_parameters, ip_adapter_state_dict,
                         load_ip_adapter_state_dict, mark_only_ip_adapter_trainable, remove_ip_adapter,
                         set_ip_adapter_scale)
from .lora import (AdapterSpec, LoRAConv2d, LoRALinear, adaptable_modules, find_modules, first_present, inject_lora,
                   list_adapters,
                   load_lora, load_lora_weights, lora_layers, lora_parameters, lora_state_dict, mark_only_lora_trainable,
                   merge_lora, remove_lora, save_lora, save_lora_weights, set_adapter_weights, unmerge_lora)
from .surgery import matches, outermost, replace_module, select

__all__ = ["first_present", "AdapterSpec", "LoRALinear", "LoRAConv2d", "inject_lora", "set_adapter_weights", "merge_lora", "unmerge_lora",
           "remove_lora", "lora_state_dict", "lora_parameters", "mark_only_lora_trainable", "save_lora", "load_lora",
           "save_lora_weights", "load_lora_weights", "list_adapters", "lora_layers", "adaptable_modules", "find_modules",
           "matches", "select", "outermost", "replace_module",
           "ControlNetConfig", "ControlNet", "ControlNetConditioningEmbedding", "ControlledUNet", "ControlledDenoiser",
           "control_sigma_range", "skip_channels", "load_diffusers_controlnet", "save_diffusers_controlnet",
           "controlnet_from_original", "ImageProjection", "DecoupledCrossAttention", "IPAdapterUNet", "install_ip_adapter",
           "remove_ip_adapter", "set_ip_adapter_scale", "ip_adapter_layers", "cross_attention_modules",
           "ip_adapter_parameters", "mark_only_ip_adapter_trainable", "ip_adapter_state_dict", "load_ip_adapter_state_dict"]
