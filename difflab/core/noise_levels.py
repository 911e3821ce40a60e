"""Training noise distributions: which sigma each training example is noised to.

Separate from inference grids (:mod:`difflab.core.grids`) on purpose: a training
distribution is a density over sigma, a grid is an ordered list. Each function returns
canonical sigmas of shape (n,) in float64 on the CPU, drawn from ``generator``.
"""
from __future__ import annotations

import torch


def discrete_uniform(frame, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """t ~ Uniform{0, ..., T-1}, returned as the frame's sigma_t (Ho et al. 2020, Algorithm 1)."""
    t = torch.randint(0, frame.T, (n,), generator=generator)
    return frame.sigmas[t]


def continuous_uniform(frame, n: int, generator: torch.Generator | None = None, t_min: float = 1e-4) -> torch.Tensor:
    """t ~ Uniform(t_min, 1) mapped through a continuous frame (Kingma et al. 2021, eq. 13)."""
    scale = getattr(frame, "time_scale", 1.0)
    t = t_min + (1 - t_min) * torch.rand(n, generator=generator, dtype=torch.float64)
    return frame.sigma(t * scale)


def log_normal(n: int, p_mean: float = -1.2, p_std: float = 1.2, generator: torch.Generator | None = None) -> torch.Tensor:
    """ln sigma ~ N(P_mean, P_std^2) (Karras et al. 2022, Table 1, "Training")."""
    return (p_mean + p_std * torch.randn(n, generator=generator, dtype=torch.float64)).exp()


def logit_normal(n: int, mean: float = 0.0, std: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flow matching's t = sigmoid(u), u ~ N(mean, std^2) (Esser et al. 2024, SD3, eq. 19),
    returned as the canonical sigma t / (1 - t)."""
    u = mean + std * torch.randn(n, generator=generator, dtype=torch.float64)
    return u.exp()  # sigmoid(u) / (1 - sigmoid(u)) = e^u
