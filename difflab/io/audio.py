"""Audio in and out: mono float tensors in [-1, 1] <-> 16-bit PCM WAV files (the stdlib ``wave``)."""
from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import torch


def save_wav(path, clip: torch.Tensor, sample_rate: int) -> Path:
    """Write one mono clip ((L,) or (1, L), values in [-1, 1], clipped) as 16-bit PCM WAV."""
    x = clip.detach().float().cpu()
    if x.ndim == 2 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 1:
        raise ValueError(f"save_wav writes one mono clip, (L,) or (1, L), got shape {tuple(clip.shape)}")
    if not isinstance(sample_rate, int) or sample_rate < 1:
        raise ValueError(f"sample_rate={sample_rate!r} must be a positive integer (Hz)")
    pcm = (x.clamp(-1, 1).numpy() * 32767.0).round().astype("<i2")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(sample_rate)
        f.writeframes(pcm.tobytes())
    return path


def load_wav(path) -> tuple[torch.Tensor, int]:
    """(clip (channels, L) float32 in [-1, 1], sample rate) of a 16-bit PCM WAV file."""
    with wave.open(str(path), "rb") as f:
        if f.getsampwidth() != 2:
            raise ValueError(f"{path}: {8 * f.getsampwidth()}-bit WAV; load_wav reads 16-bit PCM")
        channels, rate, data = f.getnchannels(), f.getframerate(), f.readframes(f.getnframes())
    pcm = np.frombuffer(data, dtype="<i2").reshape(-1, channels).T
    return torch.from_numpy(pcm.astype(np.float32) / 32767.0), rate


__all__ = ["save_wav", "load_wav"]
