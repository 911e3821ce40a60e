"""DDIM (Song et al. 2021) in the canonical frame. See :mod:`difflab.samplers.common` for the
keywords every sampler shares."""
from __future__ import annotations

import torch

from .common import ancestral_step, grid_steps, noise_source, ode_derivative, prepare


@torch.no_grad()
def sample_ddim(denoiser, x: torch.Tensor, sigmas, *, eta: float = 0.0, noise=None, extra_args: dict | None = None,
                callback=None, progress: bool = False) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12), in the canonical frame x = x0 + sigma eps.

    With the estimates x0_hat = D(x, sigma) and eps_hat = (x - x0_hat) / sigma, one step to
    sigma_next (s_n) is::

        sigma_up   = eta * sqrt(s_n^2 (sigma^2 - s_n^2) / sigma^2)     # eq. 16, divided by sqrt(ab_prev)
        sigma_down = sqrt(s_n^2 - sigma_up^2)
        x_next     = x0_hat + sigma_down * eps_hat + sigma_up * z

    which is eq. 12 (``sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma_t^2) eps + sigma_t z``)
    divided by sqrt(ab_prev), with ab = 1 / (1 + sigma^2). ``eta=0`` is the deterministic DDIM
    (an exponential-integrator Euler step of the probability-flow ODE); ``eta=1`` has DDPM's
    posterior variance. The step to sigma = 0 returns x0_hat.
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta={eta} must be in [0, 1] (0: deterministic DDIM, 1: DDPM's variance)")
    sigmas, model = prepare(denoiser, x, sigmas, extra_args)
    draw = noise_source(noise, x)
    for i, sigma, sigma_next in grid_steps(sigmas, progress):
        denoised = model(x, sigma)
        if sigma_next == 0:
            x = denoised
        else:
            eps = ode_derivative(x, sigma, denoised)
            sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
            x = denoised + sigma_down * eps
            if sigma_up > 0:
                x = x + sigma_up * draw()
        if callback is not None:
            callback(dict(i=i, x=x, sigma=sigma, sigma_next=sigma_next, denoised=denoised))
    return x
