"""Clips out: (N, C, F, H, W) tensors in [-1, 1] as an animated GIF (Pillow), an MP4 (imageio
with its ffmpeg plugin, the optional ``video`` extra) or a PNG of the frames side by side. Each
writes atomically (a temporary file, then a rename) and returns the path."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .images import make_grid


def check_clips(clips: torch.Tensor) -> torch.Tensor:
    if not torch.is_tensor(clips) or clips.ndim != 5 or clips.shape[1] not in (1, 3):
        raise ValueError(f"clips must be (N, 1 or 3, F, H, W) in [-1, 1], got "
                         f"{tuple(clips.shape) if torch.is_tensor(clips) else type(clips).__name__}")
    return clips


def grid_frames(clips: torch.Tensor, nrow: int | None = None, upscale: int = 1) -> list:
    """One Pillow image per frame t: the clips' frames t tiled ``nrow`` to a row."""
    clips = check_clips(clips)
    return [make_grid(clips[:, :, t], nrow=nrow, upscale=upscale) for t in range(clips.shape[2])]


def _atomic(path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    write(tmp)
    os.replace(tmp, path)
    return path


def save_gif(clips: torch.Tensor, path, *, nrow: int | None = None, upscale: int = 1, fps: float = 4.0, loop: int = 0) -> Path:
    """An animated GIF of the clips as a grid (``nrow`` to a row), ``fps`` frames a second, looping."""
    if fps <= 0:
        raise ValueError(f"fps={fps} must be > 0")
    frames = grid_frames(clips, nrow, upscale)
    return _atomic(path, lambda p: frames[0].save(p, format="GIF", save_all=True, append_images=frames[1:],
                                                  duration=round(1000 / fps), loop=loop))


def save_mp4(clips: torch.Tensor, path, *, nrow: int | None = None, upscale: int = 4, fps: float = 4.0) -> Path:
    """An H.264 MP4 of the clips as a grid, through imageio's ffmpeg plugin (``pip install
    difflab[video]``). Frames are padded to even sizes, as the codec needs."""
    try:
        import imageio.v2 as imageio
        import imageio_ffmpeg  # noqa: F401  (the plugin's ffmpeg binary)
    except ImportError as err:
        raise ImportError("MP4 needs imageio and imageio-ffmpeg: pip install difflab[video] "
                          "(or write a GIF with save_gif)") from err
    arrays = []
    for img in grid_frames(clips, nrow, upscale):
        a = np.asarray(img.convert("RGB"))
        arrays.append(np.pad(a, ((0, a.shape[0] % 2), (0, a.shape[1] % 2), (0, 0))))

    def write(p):
        with imageio.get_writer(p, format="FFMPEG", fps=fps, codec="libx264", macro_block_size=1) as w:
            for a in arrays:
                w.append_data(a)
    return _atomic(path, write)


def save_frame_grid(clips: torch.Tensor, path, *, upscale: int = 1) -> Path:
    """A PNG with one row per clip and its frames left to right."""
    clips = check_clips(clips)
    n, c, f, h, w = clips.shape
    img = make_grid(clips.transpose(1, 2).reshape(n * f, c, h, w), nrow=f, upscale=upscale)
    return _atomic(path, lambda p: img.save(p, format="PNG"))


__all__ = ["save_gif", "save_mp4", "save_frame_grid", "grid_frames"]
