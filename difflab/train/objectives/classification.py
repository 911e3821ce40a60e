"""Plain classification: per-example cross-entropy of ``module(x)`` against labels ``y``, with
an optional random augmentation drawn on the CPU from the loop's generator (the digits judge's
random shifts, :func:`random_shift`)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def random_shift(x: torch.Tensor, shift: int, generator: torch.Generator, fill: float | str = -1.0) -> torch.Tensor:
    """Translate each image (N, C, H, W) by up to ``shift`` pixels in x and y, filling with ``fill``:
    a value (the digits' background, -1) or ``"replicate"`` (edge pixels repeated, for scenes with a room)."""
    if shift == 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (shift,) * 4, mode="replicate") if fill == "replicate" else F.pad(x, (shift,) * 4, value=float(fill))
    dy, dx = torch.randint(0, 2 * shift + 1, (2, n), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]          # (n, h, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, :]          # (n, 1, w)
    return padded[torch.arange(n)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)


class Classification:
    """Cross-entropy of ``module(x)`` (logits (B, K)) against ``y`` (B,), per example.
    ``augment(x, generator) -> x``, when given, transforms the whole batch in ``draw``."""

    name = "classification"

    def __init__(self, module: nn.Module, augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None):
        self.module, self.augment = module, augment

    def draw(self, batch: dict, generator: torch.Generator) -> dict:
        return {"x": self.augment(batch["x"], generator)} if self.augment is not None else {}

    def loss(self, batch: dict) -> torch.Tensor:
        return F.cross_entropy(self.module(batch["x"]), batch["y"], reduction="none")


__all__ = ["Classification", "random_shift"]
