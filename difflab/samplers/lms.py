"""Linear multistep (k-diffusion's ``sample_lms``) on the probability-flow ODE in sigma. See
:mod:`difflab.samplers.common` for the keywords every sampler shares."""
from __future__ import annotations

import torch
from numpy.polynomial import Polynomial

from .common import grid_steps, ode_derivative, prepare


def lms_coefficients(nodes, sigma_next: float) -> list[float]:
    """Explicit Adams weights on a variable grid (Hairer, Norsett & Wanner, Solving ODEs I,
    section III.1): c_j = integral over [t_i, t_{i+1}] of the Lagrange basis polynomial
    l_j(tau) = prod_{m != j} (tau - t_{i-m}) / (t_{i-j} - t_{i-m}), for ``nodes`` =
    [t_i, t_{i-1}, ..., t_{i-k+1}] (newest first) and t_{i+1} = ``sigma_next``, so that
    x_{i+1} = x_i + sum_j c_j d_{i-j} integrates the polynomial through the last k derivatives.

    Computed in closed form: with tau = t_i + h u, h = t_{i+1} - t_i, the nodes become
    r_m = (t_{i-m} - t_i) / h (r_0 = 0) and c_j = h * integral_0^1 prod_{m != j} (u - r_m) / (r_j - r_m) du,
    a polynomial integrated exactly by :mod:`numpy.polynomial`.
    """
    t_i = float(nodes[0])
    h = float(sigma_next) - t_i
    r = [(float(t) - t_i) / h for t in nodes]
    coeffs = []
    for j, r_j in enumerate(r):
        basis = Polynomial([1.0])
        for m, r_m in enumerate(r):
            if m != j:
                basis = basis * Polynomial([-r_m, 1.0]) / (r_j - r_m)
        antiderivative = basis.integ()
        coeffs.append(h * float(antiderivative(1.0) - antiderivative(0.0)))
    return coeffs


@torch.no_grad()
def sample_lms(denoiser, x: torch.Tensor, sigmas, *, order: int = 4, noise=None, extra_args: dict | None = None,
               callback=None, progress: bool = False) -> torch.Tensor:
    """Linear multistep method of order ``order`` (Adams-Bashforth on the non-uniform sigma grid;
    k-diffusion's ``sample_lms``, diffusers' ``LMSDiscreteScheduler``) on the probability-flow
    ODE dx/dsigma = (x - D(x; sigma)) / sigma (Karras et al. 2022, eq. 3-4).

    Step i keeps the last k = min(i + 1, order) derivatives d_{i-j} and takes
    x_{i+1} = x_i + sum_j c_j d_{i-j} with the weights of :func:`lms_coefficients`: one denoiser
    call per step; order k once the history is full (the first steps ramp up 1, 2, ...).
    Deterministic (``noise`` is accepted for the common signature and never called). As in
    k-diffusion and diffusers, the step to sigma = 0 is a full multistep step too (the derivatives
    are all taken at sigma > 0), so it returns D(x; sigma) only on a one-step grid.
    """
    if not isinstance(order, int) or order < 1:
        raise ValueError(f"order={order} must be a positive integer")
    sigmas, model = prepare(denoiser, x, sigmas, extra_args)
    grid = sigmas.tolist()
    ds: list[torch.Tensor] = []  # the last `order` derivatives, oldest first
    for i, sigma, sigma_next in grid_steps(sigmas, progress):
        denoised = model(x, sigma)
        ds = (ds + [ode_derivative(x, sigma, denoised)])[-order:]
        if sigma_next == 0 and len(ds) == 1:
            x = denoised  # the Euler step to 0, exactly
        else:
            coeffs = lms_coefficients(grid[i - len(ds) + 1:i + 1][::-1], sigma_next)
            x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
        if callback is not None:
            callback(dict(i=i, x=x, sigma=sigma, sigma_next=sigma_next, denoised=denoised))
    return x


SAMPLERS = {"lms": sample_lms}
