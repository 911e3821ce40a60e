"""Point clouds as pictures: orthographic views splatted into grey images, PNG grids of views and
turntable GIFs (the cloud turning about its vertical z axis).

:func:`splat` draws each point as one pixel, brighter when nearer the viewer (a z-buffer keeps the
nearest), on black; images are (1, size, size) in [-1, 1] like every other image in difflab, so
:mod:`difflab.io.images` and :mod:`difflab.io.video` write them."""
from __future__ import annotations

import math

import torch

from .images import save_grid
from .video import save_gif


def view_rotation(yaw: float, elevation: float) -> torch.Tensor:
    """The rotation taking world coordinates (z up) to the view's (x right, y up, z towards the viewer)
    for a camera at ``yaw`` about z and ``elevation`` above the horizon (degrees)."""
    th, ph = math.radians(yaw), math.radians(elevation)
    yaw_m = torch.tensor([[math.cos(th), math.sin(th), 0.0], [-math.sin(th), math.cos(th), 0.0], [0.0, 0.0, 1.0]])
    to_view = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])     # world y (depth) -> -view z
    c, s = math.cos(ph), math.sin(ph)
    tilt = torch.tensor([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])
    return tilt @ to_view @ yaw_m


def splat(points: torch.Tensor, yaw: float = 30.0, elevation: float = 20.0, size: int = 64, extent: float = 1.0) -> torch.Tensor:
    """A (1, size, size) grey image in [-1, 1] of ``points`` (N, 3) seen from (yaw, elevation):
    pixels of [-extent, extent]^2, brightness 0.35 .. 1 by nearness."""
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"points must be (N, 3), got {tuple(points.shape)}")
    p = points.float() @ view_rotation(yaw, elevation).T
    col = ((p[:, 0] / extent + 1) / 2 * size).floor().long()
    row = ((1 - p[:, 1] / extent) / 2 * size).floor().long()
    ok = (col >= 0) & (col < size) & (row >= 0) & (row < size)
    shade = 0.35 + 0.65 * ((p[:, 2] / extent + 1) / 2).clamp(0, 1)
    img = torch.zeros(size * size)
    img.scatter_reduce_(0, (row * size + col)[ok], shade[ok], reduce="amax")
    return (img * 2 - 1).reshape(1, size, size)


def turntable(points: torch.Tensor, frames: int = 12, elevation: float = 20.0, size: int = 64) -> torch.Tensor:
    """(1, frames, size, size): the cloud seen from ``frames`` yaws evenly round the circle."""
    return torch.stack([splat(points, 360.0 * k / frames, elevation, size)[0] for k in range(frames)])[None]


def save_turntable_gif(clouds: torch.Tensor, path, *, nrow: int | None = None, frames: int = 12, size: int = 64,
                       fps: float = 6.0):
    """A GIF of every cloud of ``clouds`` (B, N, 3) turning, as a grid ``nrow`` to a row."""
    clips = torch.stack([turntable(c, frames, size=size) for c in clouds])
    return save_gif(clips, path, nrow=nrow, fps=fps)


def save_views_png(clouds: torch.Tensor, path, *, nrow: int | None = None, size: int = 64, yaw: float = 30.0):
    """A PNG grid of one view of every cloud."""
    return save_grid(torch.stack([splat(c, yaw, 20.0, size) for c in clouds]), path, nrow=nrow)


__all__ = ["splat", "turntable", "view_rotation", "save_turntable_gif", "save_views_png"]
