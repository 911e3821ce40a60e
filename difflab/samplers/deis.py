"""DEIS (Zhang & Chen 2023, "Fast Sampling of Diffusion Models with Exponential Integrator"):
multistep exponential integrators with polynomial extrapolation of the noise prediction, in the
canonical frame x = x0 + sigma eps.

In the canonical frame rho = sigma (the paper's rho = sigma_vp / alpha, section 4) and the
probability-flow ODE is dx/drho = eps(x, rho): the exponential integrator's transition is the
identity, and a step from rho_s0 to rho_t is x_t = x_s0 + int eps drho. tAB-DEIS (eq. 14-15)
replaces eps by the Lagrange polynomial through the last r + 1 outputs eps_j at times tau_j;
diffusers' DEISMultistepScheduler (``solver_type="logrho"``) takes tau = log rho::

    x_t = x_s0 + sum_j C_j eps_j,   C_j = int_{rho_s0}^{rho_t} l_j(log rho) drho,
    l_j(u) = prod_{k != j} (u - u_k) / (u_j - u_k),  u_k = log rho_k

and the integral has a closed form: with u = log rho, int e^u P(u) du = e^u sum_m (-1)^m P^(m)(u)
for a polynomial P. Order 1 is DDIM.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .common import grid_steps, prepare
from .dpm_solver import step_order


def deis_coefficients(rho_t: float, rhos) -> list[float]:
    """C_j = int_{rho_s0}^{rho_t} l_j(log rho) drho for the Lagrange basis through ``rhos``
    (newest first, rhos[0] = rho_s0) in log rho (Zhang & Chen 2023, eq. 15 with tau = log rho;
    diffusers' ``ind_fn`` for orders 2 and 3)."""
    u = [math.log(r) for r in rhos]
    coefs = []
    for j, uj in enumerate(u):
        others = [uk for k, uk in enumerate(u) if k != j]
        P = np.poly1d(np.poly(others) if others else [1.0]) / math.prod(uj - uk for uk in others)
        antideriv = lambda v: math.exp(v) * sum((-1) ** m * P.deriv(m)(v) for m in range(len(others) + 1))  # noqa: E731
        coefs.append(float(antideriv(math.log(rho_t)) - antideriv(u[0])))
    return coefs


@torch.no_grad()
def sample_deis(denoiser, x: torch.Tensor, sigmas, *, order: int = 3, lower_order_final: bool = True, noise=None,
                extra_args: dict | None = None, callback=None, progress: bool = False) -> torch.Tensor:
    """tAB-DEIS of order 1-3 in log rho (Zhang & Chen 2023, eq. 14-15; diffusers'
    DEISMultistepScheduler), noise prediction eps = (x - D) / sigma, 1 NFE per step, deterministic.

    Step i uses order min(order, i + 1), and with ``lower_order_final`` and fewer than 15 steps at
    most n - i (diffusers' rule, as for DPM-Solver). The step to sigma = 0 returns the denoised
    estimate (log rho = -inf there; diffusers' DEIS always stops at the smallest training sigma).
    """
    if order not in (1, 2, 3):
        raise ValueError(f"order={order} must be 1, 2 or 3")
    sigmas, model = prepare(denoiser, x, sigmas, extra_args)
    n = len(sigmas) - 1
    history = []  # (rho_j, eps_j), newest first
    for i, sigma, sigma_next in grid_steps(sigmas, progress):
        denoised = model(x, sigma)
        history = ([(sigma, (x - denoised) / sigma)] + history)[:order]
        if sigma_next == 0:
            x = denoised
        else:
            k = step_order(order, i, n, lower_order_final)
            C = deis_coefficients(sigma_next, [rho for rho, _ in history[:k]])
            x = x + sum(c * eps for c, (_, eps) in zip(C, history))
        if callback is not None:
            callback(dict(i=i, x=x, sigma=sigma, sigma_next=sigma_next, denoised=denoised))
    return x


SAMPLERS = {"deis": sample_deis}
