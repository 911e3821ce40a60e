"""Two-dimensional toy data sets: points as (n, 2) float32 tensors of roughly unit variance per
axis, drawn from a ``torch.Generator`` so a seed fixes them (``None`` uses torch's global RNG).

``noise`` is the standard deviation of Gaussian jitter in the curve's own units (as in
scikit-learn's ``make_moons`` / ``make_swiss_roll``), added before the fixed rescaling.
"""
from __future__ import annotations

import math

import torch


def _normal(shape, generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator, dtype=torch.float64)


def _uniform(n: int, generator) -> torch.Tensor:
    return torch.rand(n, generator=generator, dtype=torch.float64)


def moons(n: int, noise: float = 0.05, generator: torch.Generator | None = None, *, return_labels: bool = False):
    """Two interleaving half circles (scikit-learn's ``make_moons``, moon and angle drawn uniformly):
    the upper one (label 0) is (cos t, sin t), the lower one (label 1) (1 - cos t, 1/2 - sin t),
    t in [0, pi]; then each axis is centred and scaled by its exact standard deviation."""
    label = (_uniform(n, generator) < 0.5).long()   # each point picks a moon with probability 1/2
    t = math.pi * _uniform(n, generator)
    upper = torch.stack([t.cos(), t.sin()], 1)
    lower = torch.stack([1 - t.cos(), 0.5 - t.sin()], 1)
    x = torch.where(label[:, None] == 0, upper, lower) + noise * _normal((n, 2), generator)
    # E over both moons: mean (1/2, 1/4), var_x = 3/4, var_y = (1/2 + 3/4 - 2/pi)/2 - 1/16
    mean = torch.tensor([0.5, 0.25], dtype=torch.float64)
    var = torch.tensor([0.75, (1.25 - 2 / math.pi) / 2 - 1 / 16], dtype=torch.float64) + noise**2
    x = ((x - mean) / var.sqrt()).float()
    return (x, label) if return_labels else x


def swiss_roll(n: int, noise: float = 0.5, generator: torch.Generator | None = None) -> torch.Tensor:
    """The 2-D swiss roll (scikit-learn's ``make_swiss_roll``, its (x, z) plane): t = 3 pi/2 (1 + 2u),
    u ~ U(0, 1), point (t cos t, t sin t); then each axis is centred and scaled by the curve's
    standard deviation (computed by quadrature over u)."""
    t = 1.5 * math.pi * (1 + 2 * _uniform(n, generator))
    x = torch.stack([t * t.cos(), t * t.sin()], 1) + noise * _normal((n, 2), generator)
    u = (torch.arange(100_000, dtype=torch.float64) + 0.5) / 100_000   # midpoint rule
    tq = 1.5 * math.pi * (1 + 2 * u)
    curve = torch.stack([tq * tq.cos(), tq * tq.sin()], 1)
    mean, var = curve.mean(0), curve.var(0, unbiased=False) + noise**2
    return ((x - mean) / var.sqrt()).float()


def ring_means(modes: int = 8, radius: float | None = None, std: float = 0.1) -> torch.Tensor:
    """(modes, 2) float64 centres evenly spaced on a circle, the first at angle 0. The default
    radius sqrt(2 (1 - std^2)) gives the equal-weight mixture of N(mean_k, std^2 I) exactly unit
    variance per axis (for modes >= 3: per-axis variance radius^2/2 + std^2)."""
    if radius is None:
        if not 0 <= std < 1:
            raise ValueError(f"std={std} must be in [0, 1) for the default unit-variance radius")
        radius = math.sqrt(2 * (1 - std**2))
    angle = 2 * math.pi * torch.arange(modes, dtype=torch.float64) / modes
    return radius * torch.stack([angle.cos(), angle.sin()], 1)


def gaussian_mixture(
    n: int,
    means: torch.Tensor | None = None,
    std: float = 0.1,
    generator: torch.Generator | None = None,
    *,
    weights: torch.Tensor | None = None,
    return_labels: bool = False,
):
    """n draws from sum_k w_k N(means_k, std^2 I); ``means`` defaults to :func:`ring_means` (8 modes,
    unit variance), ``weights`` to equal. The mixture is known exactly, so its exact denoiser is
    too: a test oracle. ``return_labels`` also returns each point's component (n,) long."""
    means = ring_means(8, std=std) if means is None else torch.as_tensor(means, dtype=torch.float64)
    k = means.shape[0]
    weights = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
    component = torch.multinomial(weights, n, replacement=True, generator=generator)
    x = (means[component] + std * _normal((n, means.shape[1]), generator)).float()
    return (x, component) if return_labels else x
