"""A :class:`~difflab.nn.text.TinyTextEncoder` on disk: weights and config in one safetensors
checkpoint (plus its JSON copy), written and read by :mod:`difflab.io.checkpoint`.

The network lives in :mod:`difflab.nn.text`; its file I/O lives here, so that ``nn`` never
imports ``io`` (see the layering table in ``docs/design.md``).
"""
from __future__ import annotations

from pathlib import Path

from ..nn.text import TinyTextConfig, TinyTextEncoder
from .checkpoint import load_checkpoint, load_model_state, save_checkpoint

KIND = "TinyTextEncoder"


def save_tiny_text(encoder: TinyTextEncoder, path) -> Path:
    """Weights and config (vocabulary included) in one safetensors checkpoint; returns the file."""
    return save_checkpoint(path, encoder.state_dict(), {"kind": KIND, "config": encoder.config.to_dict()})


def load_tiny_text(path, device="cpu") -> TinyTextEncoder:
    """Inverse of :func:`save_tiny_text` (a ``.safetensors`` file or the directory holding
    ``checkpoint.safetensors``), in eval mode on ``device``."""
    tensors, meta = load_checkpoint(path, device=device)
    if meta.get("kind") != KIND:
        raise ValueError(f"{path} holds a {meta.get('kind')!r} checkpoint, not a TinyTextEncoder")
    encoder = TinyTextEncoder(TinyTextConfig.from_dict(meta["config"]))
    load_model_state(encoder, tensors, prefix="")
    return encoder.to(device).eval()
