"""One model folder in the diffusers / transformers layout: ``config.json`` plus safetensors
weights (``diffusion_pytorch_model.safetensors``, ``model.safetensors``, or shards listed in a
``....safetensors.index.json``). Offline only; pickled ``.bin`` files are never opened.

The shared file steps of every foreign-folder loader (:mod:`difflab.io.diffusers_folder`,
:mod:`difflab.io.diffusers_vae`, :mod:`difflab.adapters.controlnet`): read and write the config,
read and write the tensors atomically, and load renamed tensors into a model with an error that
names the missing and unexpected keys as the file names them.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .checkpoint import _atomic_write, _listing, _prepare_tensors, _write_json, load_model_state

CONFIG_NAME = "config.json"


def read_json(path, what: str) -> dict:
    """The JSON object at ``path``; FileNotFoundError naming the file and ``what`` was expected."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {path.name} at {path} (expected {what})")
    return json.loads(path.read_text(encoding="utf-8"))


def read_safetensors(folder, name: str, variant: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of ``folder / name`` (``name`` with ``.{variant}`` before ``.safetensors`` when a
    variant such as ``fp16`` is asked), or of its shards listed in ``name + ".index.json"``."""
    folder = Path(folder)
    if variant is not None:
        name = name.replace(".safetensors", f".{variant}.safetensors")
    path, index = folder / name, folder / (name + ".index.json")
    if path.is_file():
        return load_file(str(path))
    if index.is_file():  # sharded: {"weight_map": {key: shard file}}
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            tensors.update(load_file(str(folder / shard)))
        return tensors
    pickled = sorted(p.name for p in folder.glob("*.bin")) if folder.is_dir() else []
    hint = f" (found {pickled}: pickle files are never loaded; convert them to safetensors)" if pickled else ""
    raise FileNotFoundError(f"no {name} in {folder}{hint}")


def write_config(folder: Path, name: str, config: dict) -> None:
    """``config`` as indented, key-sorted JSON at ``folder / name``, atomically."""
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    _atomic_write(Path(folder) / name, lambda tmp: _write_json(tmp, text))


def write_tensors(path, tensors: dict[str, torch.Tensor]) -> None:
    """``tensors`` as one safetensors file at ``path`` (metadata ``format: pt``), atomically."""
    prepared = _prepare_tensors(tensors)
    _atomic_write(Path(path), lambda tmp: save_file(prepared, tmp, metadata={"format": "pt"}))


def save_model_folder(folder, weights_name: str, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    """Write one model folder: ``folder / weights_name`` (the tensors, already in the file's
    names) and ``folder / config.json``; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_tensors(folder / weights_name, tensors)
    write_config(folder, CONFIG_NAME, config)
    return folder


def load_into(model: torch.nn.Module, state: dict, source: str, file_name=None, *, assign: bool = False) -> None:
    """Load ``state`` (difflab names) into ``model``; a mismatch raises ValueError naming the
    missing and unexpected keys as the file names them (``file_name`` maps a difflab key back).
    ``assign``: the tensors become the parameters (for a model built on the meta device)."""
    if file_name is not None:
        expected = model.state_dict()
        missing, unexpected = set(expected) - set(state), set(state) - set(expected)
        if missing or unexpected:
            problems = [f"{what} keys ({len(keys)}): {_listing([file_name(k) for k in keys])}"
                        for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
            raise ValueError(f"{source}: checkpoint does not match {type(model).__name__}: " + "; ".join(problems))
    try:
        load_model_state(model, state, prefix="", assign=assign)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


__all__ = ["CONFIG_NAME", "read_json", "read_safetensors", "write_config", "write_tensors", "save_model_folder",
           "load_into"]
