"""Adapters: module surgery by name pattern (STYLE.md, rule 9). LoRA (Hu et al. 2021) in :mod:`.lora`."""
from .lora import (AdapterSpec, LoRAConv2d, LoRALinear, adaptable_modules, find_modules, inject_lora, list_adapters,
                   load_lora, load_lora_weights, lora_layers, lora_parameters, lora_state_dict, mark_only_lora_trainable,
                   matches, merge_lora, remove_lora, save_lora, set_adapter_weights, unmerge_lora)

__all__ = ["AdapterSpec", "LoRALinear", "LoRAConv2d", "inject_lora", "set_adapter_weights", "merge_lora", "unmerge_lora",
           "remove_lora", "lora_state_dict", "lora_parameters", "mark_only_lora_trainable", "save_lora", "load_lora",
           "load_lora_weights", "list_adapters", "lora_layers", "adaptable_modules", "find_modules", "matches"]
