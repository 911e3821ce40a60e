"""A plain multilayer perceptron: the behaviour-cloning baseline of diffusion policies (Chi et al.
2023, Section 5: an MLP regressing the action chunk with an L2 loss, which averages the modes of
multimodal demonstrations)."""
from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    """``depth`` hidden layers of width ``hidden`` with Mish; ``forward(x (B, ...)) -> (B, *out_shape)``
    (the input flattened per sample)."""

    def __init__(self, in_dim: int, out_shape: tuple[int, ...], hidden: int = 256, depth: int = 3):
        super().__init__()
        if min(in_dim, hidden, depth, *out_shape) < 1:
            raise ValueError(f"MLP sizes must be >= 1: in_dim={in_dim}, out_shape={out_shape}, hidden={hidden}, depth={depth}")
        self.out_shape = tuple(out_shape)
        layers, d = [], in_dim
        for _ in range(depth):
            layers += [nn.Linear(d, hidden), nn.Mish()]
            d = hidden
        layers.append(nn.Linear(d, int(torch.tensor(self.out_shape).prod())))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.reshape(x.shape[0], -1)).reshape(x.shape[0], *self.out_shape)


__all__ = ["MLP"]
