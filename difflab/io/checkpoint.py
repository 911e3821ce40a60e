"""Checkpoints: tensors in safetensors, everything else as JSON. Never pickle.

One checkpoint is one ``.safetensors`` file. Its header's metadata holds the JSON document
under ``"difflab.metadata"`` (so tensors and metadata are written, replaced and read together);
a copy of the JSON is written beside it (``checkpoint.json``) for people and tools to read,
but loading reads only the ``.safetensors`` file.

Writes are atomic: into a temporary file in the same directory, fsync, ``os.replace``, fsync
the directory. A crash or error mid-write leaves the previous checkpoint intact.

Optimizer state is flattened to tensors ``{prefix}state.{i}.{name}`` (``exp_avg``, ``step``, ...)
plus JSON for the param groups: :func:`optimizer_state_to_tensors` and back.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

CHECKPOINT_NAME = "checkpoint.safetensors"
METADATA_KEY = "difflab.metadata"
FORMAT_VERSION = 1
# Buffers only training adds to a network: the FP8 scaling state of difflab.perf.fp8 (amax history,
# scales). A training checkpoint's model.* / ema.* hold them (exact resume); a network built for
# inference has none, so without_training_buffers drops them before loading.
TRAINING_BUFFERS = ("fp8_amax_history", "fp8_scale")


def checkpoint_path(path) -> Path:
    """A directory (existing, or any path not ending in ``.safetensors`` that is not an existing
    file) means ``path / "checkpoint.safetensors"``; a ``.safetensors`` path or an existing file is
    used as it is (so a wrong file is reported as what it is, not as a missing folder)."""
    path = Path(path)
    return path if path.suffix == ".safetensors" or path.is_file() else path / CHECKPOINT_NAME


# ----------------------------------------------------------------------------------------------
# Atomic writes


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, write) -> None:
    """``write(tmp_path)`` into a temporary file beside ``path``, fsync, then rename over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _write_json(tmp: str, text: str) -> None:
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def atomic_write_text(path, text: str) -> None:
    """Replace the text file ``path`` atomically: readers see the old text or the new, never a mix."""
    path = Path(path)
    _atomic_write(path, lambda tmp: _write_json(tmp, text))


def temporary_files(folder, name: str) -> list[Path]:
    """The temporary files an interrupted atomic write of ``folder / name`` can leave behind."""
    return sorted(Path(folder).glob(f".{name}.*.tmp"))


# ----------------------------------------------------------------------------------------------
# Save and load


def _to_json(metadata: dict, indent: int | None = None) -> str:
    try:
        return json.dumps(metadata, allow_nan=False, sort_keys=True, indent=indent)
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint metadata must be plain JSON (dict, list, str, finite numbers, bool, None): {e}") from None


def _prepare_tensors(tensors: dict) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors; tensors sharing memory (tied weights) are cloned,
    since safetensors stores each tensor once."""
    out, seen = {}, set()
    for k, v in tensors.items():
        if not isinstance(k, str) or not torch.is_tensor(v):
            raise TypeError(f"checkpoint tensors must map str -> torch.Tensor, got {k!r}: {type(v).__name__}")
        v = v.detach().to("cpu").contiguous()
        ptr = (v.untyped_storage().data_ptr(), v.storage_offset()) if v.numel() else None
        if ptr is not None and (ptr in seen or v.untyped_storage().nbytes() != v.numel() * v.element_size()):
            v = v.clone()
        elif ptr is not None:
            seen.add(ptr)
        out[k] = v
    return out


def save_checkpoint(path, tensors: dict[str, torch.Tensor], metadata: dict) -> Path:
    """Write ``tensors`` and JSON ``metadata`` atomically to ``path`` (a ``.safetensors`` file, or
    a directory that gets ``checkpoint.safetensors``), plus a ``.json`` copy of the metadata.
    Returns the ``.safetensors`` path."""
    path = checkpoint_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = _to_json(metadata)
    header = {"format": "pt", "difflab.version": str(FORMAT_VERSION), METADATA_KEY: text}
    prepared = _prepare_tensors(tensors)
    _atomic_write(path, lambda tmp: save_file(prepared, tmp, metadata=header))
    _atomic_write(path.with_suffix(".json"), lambda tmp: _write_json(tmp, _to_json(metadata, indent=1) + "\n"))
    return path


def _open(path: Path, device: str):
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        return safe_open(str(path), framework="pt", device=str(device))
    except Exception as e:  # safetensors raises its own error type for a bad header
        raise ValueError(f"{path} is not a difflab checkpoint: not a valid safetensors file ({e})") from None


def _metadata(f, path: Path) -> dict:
    header = f.metadata() or {}
    if METADATA_KEY not in header:
        raise ValueError(f"{path} is a safetensors file but not a difflab checkpoint (no {METADATA_KEY!r} in its header)")
    return json.loads(header[METADATA_KEY])


class NonFiniteError(ValueError):
    """A tensor holds NaN or infinity where only finite numbers make sense."""


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors that hold a NaN or an infinity."""
    return sorted(k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))


def check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    """Raise :class:`NonFiniteError` naming the tensors of ``what`` that are not finite."""
    bad = non_finite(tensors)
    if bad:
        raise NonFiniteError(f"{what} holds tensors that are not finite (NaN or inf): {_listing(bad)}; "
                             "it cannot be used (resume from an earlier checkpoint, or retrain)")


def load_checkpoint(path, device: str | torch.device = "cpu", *, finite: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """Read ``(tensors, metadata)`` written by :func:`save_checkpoint` (safetensors only). Every
    floating tensor is checked finite (``finite=False`` reads a damaged file anyway, to inspect it)."""
    path = checkpoint_path(path)
    with _open(path, device) as f:
        metadata = _metadata(f, path)
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if finite:
        check_finite(tensors, str(path))
    return tensors, metadata


def read_metadata(path) -> dict:
    """The JSON metadata of a checkpoint, without reading its tensors."""
    path = checkpoint_path(path)
    with _open(path, "cpu") as f:
        return _metadata(f, path)


def format_version(path) -> int | None:
    """The difflab format version in a checkpoint's header (:data:`FORMAT_VERSION` when written
    by this difflab), None when it has none; read without its tensors."""
    path = checkpoint_path(path)
    with _open(path, "cpu") as f:
        version = (f.metadata() or {}).get("difflab.version")
    return int(version) if version is not None and version.isdigit() else None


# ----------------------------------------------------------------------------------------------
# Model state


def _listing(keys, limit: int = 10) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def strip_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors whose key starts with ``prefix``, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def without_training_buffers(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` without the :data:`TRAINING_BUFFERS` (keys whose last part names one)."""
    return {k: v for k, v in tensors.items() if k.rsplit(".", 1)[-1] not in TRAINING_BUFFERS}


def load_model_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor], prefix: str = "model.", *,
                     assign: bool = False) -> None:
    """Load the tensors under ``prefix`` (``"model."`` or ``"ema."`` in training checkpoints)
    into ``model``. A checkpoint that does not match the model raises ValueError listing the
    missing keys, unexpected keys and shape mismatches. ``assign``: the tensors become the
    parameters (a model built on the meta device takes them without ever allocating its own)."""
    state = strip_prefix(tensors, prefix)
    if not state:
        prefixes = sorted({k.split(".", 1)[0] + "." for k in tensors})
        raise ValueError(f"no tensors under prefix {prefix!r} in the checkpoint (prefixes present: {prefixes})")
    expected = model.state_dict()
    missing, unexpected = set(expected) - set(state), set(state) - set(expected)
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        problems = []
        if missing:
            problems.append(f"missing keys ({len(missing)}): {_listing(missing)}")
        if unexpected:
            problems.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
        if shapes:
            problems.append(f"shape mismatches ({len(shapes)}): " + "; ".join(shapes[:10]))
        raise ValueError(f"checkpoint does not match {type(model).__name__} (prefix {prefix!r}): " + "; ".join(problems))
    model.load_state_dict(state, assign=assign)


# ----------------------------------------------------------------------------------------------
# Optimizer state as tensors + JSON


def _encode(value, key: str, tensors: dict):
    if torch.is_tensor(value):
        tensors[key] = value
        return {"__tensor__": key}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]
    return value


def _decode(value, tensors: dict):
    if isinstance(value, dict) and "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if isinstance(value, dict) and "__tuple__" in value:
        return tuple(_decode(v, tensors) for v in value["__tuple__"])
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    return value


def optimizer_state_to_tensors(state_dict: dict, prefix: str = "optim.") -> tuple[dict[str, torch.Tensor], dict]:
    """Flatten ``optimizer.state_dict()`` into tensors ``{prefix}state.{i}.{name}`` and a JSON
    dict ``{"state": {i: {name: key or value}}, "param_groups": [...]}``."""
    tensors: dict[str, torch.Tensor] = {}
    state = {str(i): {name: _encode(v, f"{prefix}state.{i}.{name}", tensors) for name, v in s.items()}
             for i, s in state_dict["state"].items()}
    groups = [{name: _encode(v, f"{prefix}param_groups.{g}.{name}", tensors) for name, v in group.items()}
              for g, group in enumerate(state_dict["param_groups"])]
    return tensors, {"state": state, "param_groups": groups}


def optimizer_state_from_tensors(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """Rebuild the ``optimizer.state_dict()`` flattened by :func:`optimizer_state_to_tensors`."""
    try:
        state = {int(i): {name: _decode(v, tensors) for name, v in s.items()} for i, s in meta["state"].items()}
        groups = [{name: _decode(v, tensors) for name, v in group.items()} for group in meta["param_groups"]]
    except KeyError as e:
        raise ValueError(f"optimizer state in the checkpoint is incomplete: tensor {e} is missing") from None
    return {"state": state, "param_groups": groups}


__all__ = ["CHECKPOINT_NAME", "FORMAT_VERSION", "checkpoint_path", "save_checkpoint", "atomic_write_text", "temporary_files",
           "load_checkpoint", "read_metadata", "format_version", "non_finite", "check_finite", "NonFiniteError", "strip_prefix",
           "TRAINING_BUFFERS", "without_training_buffers",
           "load_model_state", "optimizer_state_to_tensors", "optimizer_state_from_tensors"]
