"""Roll-outs as pictures: paths of a planar robot drawn frame by frame into an animated GIF
(Pillow), several policies side by side."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from PIL import Image, ImageDraw

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def rollout_frames(panels: Sequence[torch.Tensor], goals: torch.Tensor, obstacle_radius: float, *, size: int = 160,
                   titles: Sequence[str] = (), every: int = 2) -> list[Image.Image]:
    """One frame every ``every`` steps: per panel, a square of ``size`` pixels showing [-1, 1]^2,
    the obstacle (a grey disc at the origin), the goals (crosses) and each path (``panels[k]``
    (B, T + 1, 2)) drawn up to that step with a dot at the robot."""
    if not panels or any(p.ndim != 3 or p.shape[-1] != 2 for p in panels):
        raise ValueError("panels must be a non-empty list of (B, T + 1, 2) paths")
    steps = max(p.shape[1] for p in panels)
    top = 14 if titles else 0

    def px(xy):
        return ((float(xy[0]) + 1) / 2 * (size - 1), top + (1 - (float(xy[1]) + 1) / 2) * (size - 1))

    frames = []
    for t in list(range(0, steps, every)) + [steps - 1]:
        img = Image.new("RGB", (size * len(panels) + 4 * (len(panels) - 1), size + top), (255, 255, 255))
        draw = ImageDraw.Draw(img)
        for k, paths in enumerate(panels):
            ox = k * (size + 4)
            rr = obstacle_radius / 2 * (size - 1)
            cx, cy = px((0, 0))
            draw.ellipse([ox + cx - rr, cy - rr, ox + cx + rr, cy + rr], fill=(170, 170, 170))
            if k < len(titles):
                draw.text((ox + 4, 1), titles[k], fill=(0, 0, 0))
            for i in range(len(paths)):
                colour = COLOURS[i % len(COLOURS)]
                gx, gy = px(goals[i])
                draw.line([ox + gx - 3, gy - 3, ox + gx + 3, gy + 3], fill=colour)
                draw.line([ox + gx - 3, gy + 3, ox + gx + 3, gy - 3], fill=colour)
                pts = [px(p) for p in paths[i, :min(t, paths.shape[1] - 1) + 1]]
                pts = [(ox + x, y) for x, y in pts]
                if len(pts) > 1:
                    draw.line(pts, fill=colour, width=2)
                x, y = pts[-1]
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
            if k:
                draw.line([ox - 2, 0, ox - 2, size + top], fill=(0, 0, 0))
        frames.append(img)
    return frames


def save_rollout_gif(panels: Sequence[torch.Tensor], goals: torch.Tensor, obstacle_radius: float, path, *,
                     titles: Sequence[str] = (), size: int = 160, every: int = 2, duration_ms: int = 80) -> Path:
    """Write :func:`rollout_frames` as a looping GIF at ``path``; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = rollout_frames(panels, goals, obstacle_radius, size=size, titles=titles, every=every)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=duration_ms, loop=0, optimize=True)
    return path


__all__ = ["rollout_frames", "save_rollout_gif"]
