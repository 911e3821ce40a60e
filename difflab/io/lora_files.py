"""LoRA files people have, read offline: difflab's own ``lora.safetensors``, PEFT's
``adapter_model.safetensors`` + ``adapter_config.json`` and diffusers' ``pytorch_lora_weights.safetensors``
(safetensors only, never pickles), and the parts of their configs that set alpha (PEFT's
``LoraConfig``: ``lora_alpha``, ``alpha_pattern``, ``use_rslora``; Kalajdzievski 2023 for rsLoRA).
:func:`write_diffusers_lora` writes diffusers' layout, as its ``save_lora_weights`` does.

The key layouts are data tables in :mod:`difflab.io.keymaps.lora`; putting the tensors into a
network is module surgery, in :mod:`difflab.adapters.lora`.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .checkpoint import METADATA_KEY, _atomic_write
from .keymaps import TRANSFORMS, rename_key
from .keymaps import lora as keymap

LORA_KIND = "difflab.lora"
LORA_FILE = "lora.safetensors"
# file names looked for in a directory, in order: difflab, PEFT's save_pretrained, diffusers' save_lora_weights
DIRECTORY_FILES = (LORA_FILE, "adapter_model.safetensors", "pytorch_lora_weights.safetensors")
PEFT_CONFIG_FILE = "adapter_config.json"
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers >= 0.34 stores the LoraConfig here
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"


def read_lora_file(source) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, config) from a state dict, a safetensors file or a directory (difflab, PEFT, diffusers)."""
    if isinstance(source, dict):
        return dict(source), {}
    path = Path(source)
    config: dict = {}
    if path.is_dir():
        found = [path / f for f in DIRECTORY_FILES if (path / f).is_file()]
        if not found:
            raise FileNotFoundError(f"no LoRA file in {path} (looked for {list(DIRECTORY_FILES)})")
        if (path / PEFT_CONFIG_FILE).is_file():
            config = json.loads((path / PEFT_CONFIG_FILE).read_text())
        path = found[0]
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: difflab reads LoRA weights from safetensors files only (never pickles)")
    if not path.is_file():
        raise FileNotFoundError(f"no LoRA file at {path}")
    try:
        f = safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error type for a bad header
        raise ValueError(f"{path} is not a LoRA file: not a valid safetensors file ({e})") from None
    with f:
        header = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if METADATA_KEY in header:
        config = json.loads(header[METADATA_KEY])
    elif DIFFUSERS_METADATA_KEY in header:
        config = json.loads(header[DIFFUSERS_METADATA_KEY])
    return tensors, config


def component_config(config: dict, prefix: str) -> dict:
    """diffusers prefixes each component's LoraConfig entries (``unet.lora_alpha``): keep ``prefix``'s."""
    if prefix and any(k.startswith(prefix) for k in config):
        return {k[len(prefix):]: v for k, v in config.items() if k.startswith(prefix)}
    return config


def config_alpha(config: dict, fmt: str, module: str, rank: int) -> float | None:
    """A module's alpha from a difflab metadata or a PEFT LoraConfig dict, or None."""
    if fmt == "difflab" or config.get("kind") == LORA_KIND:
        return config.get("modules", {}).get(module, {}).get("alpha")
    if "lora_alpha" not in config:
        return None
    alpha = keymap.pattern_value(config.get("alpha_pattern") or {}, module)
    alpha = config["lora_alpha"] if alpha is None else alpha
    return alpha * math.sqrt(rank) if config.get("use_rslora") else alpha  # rsLoRA: alpha / sqrt(r) = (alpha sqrt r) / r


def write_diffusers_lora(path, tensors: dict[str, torch.Tensor], lora_config: dict, prefix: str = "unet.") -> Path:
    """Write a LoRA in diffusers' layout, as its ``save_lora_weights`` does: every key of ``tensors``
    (PEFT's ``{module}.lora_A.weight`` / ``.lora_B.weight``) behind the component ``prefix``, and a
    header ``lora_adapter_metadata`` holding the PEFT ``LoraConfig`` dict ``lora_config`` with each
    entry behind the same prefix (``unet.r``, ``unet.lora_alpha``, ...), which diffusers'
    ``load_lora_weights`` builds its ``LoraConfig`` from. ``path``: a ``.safetensors`` file, or a
    directory that gets ``pytorch_lora_weights.safetensors``. Atomic; returns the file's path."""
    path = Path(path)
    path = path if path.suffix == ".safetensors" else path / DIFFUSERS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"format": "pt", DIFFUSERS_METADATA_KEY: json.dumps({f"{prefix}{k}": v for k, v in lora_config.items()},
                                                                 indent=2, sort_keys=True)}
    prepared = {f"{prefix}{k}": v.detach().contiguous().cpu() for k, v in tensors.items()}
    _atomic_write(path, lambda tmp: save_file(prepared, tmp, metadata=header))
    return path


def _kohya_pattern(template: str) -> re.Pattern:
    """A key-map template (``double_blocks.{i}.img_attn.qkv.``) as kohya spells a module path: dots as ``_``."""
    parts = re.split(r"\{(\w+)\}", template.rstrip("."))
    rx = "".join(re.escape(p.replace(".", "_")) if i % 2 == 0 else f"(?P<{p}>\\d+)" for i, p in enumerate(parts))
    return re.compile(rx + "$")


def kohya_to_peft(tensors: dict[str, torch.Tensor], module_names, *, kohya_prefix: str, table, fused=()) -> dict[str, torch.Tensor]:
    """A kohya LoRA whose module paths are spelled in a foreign layout (``table``: key-map rows
    ``(foreign, difflab[, transform])``, e.g. Black Forest Labs' Flux names) as a PEFT-layout LoRA on
    difflab's module names (``{module}.lora_A.weight``, ``.lora_B.weight``, ``.alpha``).

    A LoRA on a *fused* foreign layer (``fused``: rows ``(fused template, piece templates,
    proportions)`` as :func:`difflab.io.keymaps.split_fused` takes; Flux's ``img_attn.qkv`` and
    ``linear1``, SD3's ``attn.qkv``) adapts every piece: Delta W = B A, so piece i gets the same A and
    the rows of B that are its rows of the fused weight. A row whose weight transform reorders rows
    (``swap_halves``) reorders B's rows the same way. ``module_names``: the model's adaptable modules.
    Keys outside ``kohya_prefix`` are dropped; a path that names no module is a ValueError.
    """
    spelled = {}  # kohya path -> (difflab module, transform of its weight)
    for name in module_names:
        foreign, transform = rename_key(name + ".weight", table, reverse=True)
        spelled[foreign[: -len(".weight")].replace(".", "_")] = (name, transform)
    fused = [(_kohya_pattern(t), pieces, shares) for t, pieces, shares in fused]
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if not key.startswith(kohya_prefix):
            continue
        path, _, role = key[len(kohya_prefix):].partition(".")
        groups.setdefault(path, {})[role] = value
    out, unknown = {}, []
    for path, parts in groups.items():
        if not {"lora_down.weight", "lora_up.weight"} <= set(parts):
            raise ValueError(f"kohya LoRA module {kohya_prefix}{path} lacks its lora_down or lora_up weight")
        A, B, alpha = parts["lora_down.weight"], parts["lora_up.weight"], parts.get("alpha")
        if path in spelled:
            targets = [(spelled[path], B)]
        else:
            match = next(((m, pieces, shares) for rx, pieces, shares in fused for m in [rx.match(path)] if m), None)
            if match is None:
                unknown.append(kohya_prefix + path)
                continue
            m, pieces, shares = match
            unit, left = divmod(B.shape[0], sum(shares))
            names = [piece.format(**m.groupdict()).rstrip(".").replace(".", "_") for piece in pieces]
            if left or any(n not in spelled for n in names):
                unknown.append(kohya_prefix + path)
                continue
            targets = [(spelled[n], b) for n, b in zip(names, B.split([unit * s for s in shares], dim=0))]
        for (name, transform), b in targets:
            if transform is not None:
                b = TRANSFORMS[transform][0](b)
            out[f"{name}.lora_A.weight"], out[f"{name}.lora_B.weight"] = A, b.contiguous()
            if alpha is not None:
                out[f"{name}.alpha"] = alpha
    if unknown:
        raise ValueError(f"{len(unknown)} kohya LoRA modules name no layer of the model: {unknown[:10]}")
    return out


__all__ = ["kohya_to_peft", "LORA_KIND", "LORA_FILE", "DIRECTORY_FILES", "PEFT_CONFIG_FILE", "DIFFUSERS_METADATA_KEY", "DIFFUSERS_FILE",
           "read_lora_file", "component_config", "config_alpha", "write_diffusers_lora"]
