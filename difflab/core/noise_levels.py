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


def logit_normal(n: int, mean: float = 0.0, std: float = 1.0, generator: torch.Generator | None = None,
                 shift: float = 1.0) -> torch.Tensor:
    """Flow matching's t = sigmoid(u), u ~ N(mean, std^2) (Esser et al. 2024, SD3, eq. 19),
    returned as the canonical sigma t / (1 - t). ``shift`` applies SD3's resolution-dependent
    time shift t' = shift t / (1 + (shift - 1) t) (eq. 23), which is sigma' = shift sigma
    (:func:`difflab.core.schedules.resolution_shift` gives shift = size / base)."""
    if not shift > 0:
        raise ValueError(f"shift={shift} must be > 0")
    u = mean + std * torch.randn(n, generator=generator, dtype=torch.float64)
    return shift * u.exp()  # sigmoid(u) / (1 - sigmoid(u)) = e^u


# ----------------------------------------------------------------------------------------------
# Consistency training and distillation: adjacent pairs of a fixed discretization


def karras_levels(N: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """The N noise levels consistency models train on, increasing: sigma_i = (sigma_min^(1/rho)
    + (i - 1)/(N - 1) (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho, i = 1 .. N (Song et al. 2023,
    section 5 and Appendix C, after Karras et al. 2022, eq. 5), float64 (N,)."""
    if N < 2:
        raise ValueError(f"N={N} must be at least 2 (consistency losses compare adjacent levels)")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    ramp = torch.linspace(0, 1, N, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (lo + ramp * (hi - lo)) ** rho


def adjacent_levels(levels: torch.Tensor, n: int, generator: torch.Generator | None = None, *,
                    p_mean: float | None = None, p_std: float = 2.0) -> torch.Tensor:
    """Indices i (n,) of adjacent pairs (sigma_i, sigma_{i+1}) of increasing ``levels`` (N,):
    i ~ Uniform{0 .. N-2} (Song et al. 2023, Algorithms 2 and 3), or with ``p_mean`` the
    discretized log-normal of improved consistency training, p(i) proportional to
    erf((ln sigma_{i+1} - P_mean) / (sqrt 2 P_std)) - erf((ln sigma_i - P_mean) / (sqrt 2 P_std))
    (Song & Dhariwal 2023, section 3.5; P_mean = -1.1, P_std = 2.0)."""
    if p_mean is None:
        return torch.randint(0, len(levels) - 1, (n,), generator=generator)
    cdf = torch.erf((levels.log() - p_mean) / (2**0.5 * p_std))
    return torch.multinomial(cdf[1:] - cdf[:-1], n, replacement=True, generator=generator)
