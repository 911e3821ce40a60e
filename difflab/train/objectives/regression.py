"""Plain regression: per-example mean squared error of ``module(x)`` against targets ``y``: the
behaviour-cloning baseline of diffusion policies (an MLP regressing action chunks; Chi et al.
2023, Section 5) and Diffuser's return model (Janner et al. 2022, Section 3.2)."""
from __future__ import annotations

import torch
from torch import nn


class Regression:
    """Mean over all but the batch dimension of (module(x) - y)^2, per example. Draws nothing."""

    name = "regression"

    def __init__(self, module: nn.Module):
        self.module = module

    def draw(self, batch: dict, generator: torch.Generator) -> dict:
        return {}

    def loss(self, batch: dict) -> torch.Tensor:
        pred = self.module(batch["x"])
        y = batch["y"].to(pred.dtype)
        if pred.shape != y.shape:
            raise ValueError(f"the module's output {tuple(pred.shape)} must be shaped like the targets y {tuple(y.shape)}")
        return ((pred - y) ** 2).reshape(len(y), -1).mean(dim=1)


__all__ = ["Regression"]
