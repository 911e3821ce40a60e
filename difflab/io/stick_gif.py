"""Stick figures as pictures: clips of joint positions (N, F, J, 3) drawn frame by frame into an
animated GIF (Pillow), a grid of figures seen from a three-quarter view, with the ground."""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from ..data.stick_figures import JOINTS, PARENTS, check_motions

LEFT, RIGHT, CENTRE = (31, 119, 180), (214, 39, 40), (40, 40, 40)


def bone_colour(joint: int) -> tuple[int, int, int]:
    name = JOINTS[joint] if joint < len(JOINTS) else ""
    return LEFT if name.startswith("l_") else RIGHT if name.startswith("r_") else CENTRE


def project(p: torch.Tensor, azimuth: float, elevation: float) -> torch.Tensor:
    """Orthographic view (..., 3) -> (..., 2) screen (right, up) of a camera turned ``azimuth``
    radians about y from the figure's right side and tilted down by ``elevation``."""
    ca, sa, ce, se = math.cos(azimuth), math.sin(azimuth), math.cos(elevation), math.sin(elevation)
    x, y, z = p.unbind(-1)
    right = z * ca - x * sa          # azimuth 0: a side view, walking to the right
    depth = z * sa + x * ca
    return torch.stack([right, y * ce + depth * se], -1)


def stick_frames(motions: torch.Tensor, *, titles: Sequence[str] = (), columns: int = 4, size: int = 128,
                 view_metres: float = 3.2, azimuth: float = 0.6, elevation: float = 0.25,
                 marks: Sequence[Sequence[int]] = ()) -> list[Image.Image]:
    """One image per frame: a grid of ``columns`` panels of ``size`` pixels, each a figure of
    ``motions`` (N, F, J, 3) (metres, y up), the camera following its root across the screen
    (ticks on the ground every half metre show the travel), ``view_metres`` wide.
    ``marks[i]``: frames of clip i drawn with a ring on the head (given key poses)."""
    check_motions(motions, joints=len(PARENTS))
    n, frames = motions.shape[:2]
    columns = max(1, min(columns, n))
    rows = -(-n // columns)
    top = 12 if titles else 0
    scr = project(motions.float(), azimuth, elevation)                   # (N, F, J, 2)
    centre = scr[:, :, 0]                                                 # (N, F, 2): the root on screen
    scale = size / view_metres
    images = []
    for f in range(frames):
        img = Image.new("RGB", (columns * size, rows * (size + top)), (255, 255, 255))
        d = ImageDraw.Draw(img)
        for i in range(n):
            ox, oy = (i % columns) * size, (i // columns) * (size + top)
            ground = oy + top + size * 0.85

            def px(q, ox=ox, cx=float(centre[i, f, 0]), ground=ground):
                return ox + size / 2 + (float(q[0]) - cx) * scale, ground - float(q[1]) * scale

            d.line([ox + 4, ground, ox + size - 4, ground], fill=(190, 190, 190))
            first = math.ceil((float(centre[i, f, 0]) - view_metres / 2) / 0.5)
            for k in range(first, first + int(view_metres / 0.5) + 1):
                tx = px((k * 0.5, 0.0))[0]
                if ox + 4 <= tx <= ox + size - 4:
                    d.line([tx, ground, tx, ground + 4], fill=(150, 150, 150))
            if i < len(titles):
                d.text((ox + 3, oy + 1), titles[i][:22], fill=(0, 0, 0))
            for j, parent in enumerate(PARENTS):
                if parent >= 0:
                    d.line([px(scr[i, f, parent]), px(scr[i, f, j])], fill=bone_colour(j), width=2)
            hx, hy = px(scr[i, f, JOINTS.index("head")])
            r = 0.09 * scale
            ring = i < len(marks) and f in set(marks[i])
            d.ellipse([hx - r, hy - r, hx + r, hy + r], outline=(0, 160, 0) if ring else CENTRE, width=3 if ring else 1)
            d.rectangle([ox, oy, ox + size - 1, oy + size + top - 1], outline=(220, 220, 220))
        images.append(img)
    return images


def save_stick_gif(motions: torch.Tensor, path, *, titles: Sequence[str] = (), columns: int = 4, size: int = 128,
                   fps: int = 20, marks: Sequence[Sequence[int]] = (), **view) -> Path:
    """Write :func:`stick_frames` as a looping GIF at ``path``; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = stick_frames(motions, titles=titles, columns=columns, size=size, marks=marks, **view)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=round(1000 / fps), loop=0, optimize=True)
    return path


__all__ = ["project", "save_stick_gif", "stick_frames"]
