"""Images in and out: tensors in [-1, 1] <-> uint8 arrays <-> PNG files (Pillow)."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8, rounding to nearest."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def make_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 1, upscale: int = 1) -> Image.Image:
    """Tile (N, C, H, W) images in [-1, 1] into one Pillow image, ``nrow`` per row, each
    enlarged ``upscale`` times with nearest neighbours (8x8 digits are hard to see otherwise)."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, 1 or 3, H, W), got shape {tuple(images.shape)}")
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    arr = to_uint8(images)
    canvas = np.zeros((ncol * (h + pad) + pad, nrow * (w + pad) + pad, c), np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        canvas[y:y + h, x:x + w] = arr[i]
    img = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    if upscale > 1:
        img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
    return img


def save_grid(images: torch.Tensor, path, nrow: int | None = None, upscale: int = 1) -> Path:
    """Write a PNG grid atomically (temp file, then rename) and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    make_grid(images, nrow=nrow, upscale=upscale).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
