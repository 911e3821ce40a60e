"""Inversion: from a clean sample back to what a sampler would map to it. Deterministic DDIM
inversion runs the probability-flow ODE backwards to a latent noise; edit-friendly DDPM inversion
finds the noise maps that make the ancestral DDPM sampler retrace a chosen noisy trajectory."""
from __future__ import annotations

import torch

from ..core.forward import ve_posterior
from .common import grid_steps, noise_source, ode_derivative, prepare


@torch.no_grad()
def invert_ddim(denoiser, x0: torch.Tensor, sigmas, *, extra_args: dict | None = None, callback=None,
                progress: bool = False) -> torch.Tensor:
    """DDIM inversion (Song et al. 2021, eq. 14 integrated from x0 towards x_T, their section 5.4;
    Mokady et al. 2023, section 3, "DDIM inversion"), in the canonical frame x = x0 + sigma eps.

    ``sigmas`` is the *sampling* grid (strictly decreasing, usually ending in 0, as given to
    :func:`difflab.samplers.ddim.sample_ddim`); it is walked in reverse, from ``sigmas[-1]``
    (where ``x0`` lives) up to ``sigmas[0]``, and the latent at ``sigmas[0]`` is returned, ready
    to be passed back to a sampler on the same grid. Each step uses D at the current level to go
    to the next higher one::

        eps_hat = (x - D(x; sigma)) / sigma,    x_next = D(x; sigma) + sigma_next * eps_hat

    the Euler step of dx/dsigma = eps_hat (eq. 14 in canonical form) with sigma increasing. At
    sigma = 0 the sample carries no noise to estimate, so the first step of a grid ending in 0
    keeps x0_hat = x0 and takes the direction from D at the next level:
    x_next = x0 + sigma_next (x0 - D(x0; sigma_next)) / sigma_next (diffusers' DDIMInverseScheduler
    with ``set_alpha_to_one=True`` does the same with the network at its first timestep).
    One denoiser call per step; first order.

    The inversion is exact only as steps -> infinity: each step assumes eps_hat is constant over
    [sigma, sigma_next], an O(h^2) local error (O(h) globally), so sampling from the returned
    latent on the same grid reproduces ``x0`` only up to that error (it falls about 2x per
    doubling of the steps; tests/test_inversion.py measures it).

    Note: diffusers' inversion pipelines (and Mokady et al.'s code) call the network at the
    *next* timestep with the sample at the current one; this function keeps the denoiser
    contract D(x; sigma) with x at sigma; both are first order and differ by O(h) over the run.
    ``callback`` receives dict(i=, x=, sigma=, sigma_next=, denoised=) with sigma < sigma_next.
    """
    sigmas, model = prepare(denoiser, x0, sigmas, extra_args)
    x = x0
    for i, sigma, sigma_next in grid_steps(sigmas.flip(0), progress):  # rising: sigma < sigma_next
        if sigma == 0:  # x is its own x0_hat; its noise direction is estimated one level up
            denoised = x
            eps = ode_derivative(x, sigma_next, model(x, sigma_next))
        else:
            denoised = model(x, sigma)
            eps = ode_derivative(x, sigma, denoised)
        x = denoised + sigma_next * eps
        if callback is not None:
            callback(dict(i=i, x=x, sigma=sigma, sigma_next=sigma_next, denoised=denoised))
    return x


@torch.no_grad()
def invert_ddpm(denoiser, x0: torch.Tensor, sigmas, *, noise=None, extra_args: dict | None = None,
                callback=None, progress: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Edit-friendly DDPM inversion (Huberman-Spiegelglas, Kulikov, Michaeli 2024, Section 3 and
    Algorithm 1, eq. 6-7), in the canonical frame x = x0 + sigma eps.

    ``sigmas`` is the sampling grid of :func:`difflab.samplers.sample_ddpm` (variance
    ``"fixed_small"``). Each level gets its *own* independent noise (not one shared eps as in
    DDPM's forward chain): x_i = x0 + sigma_i eps_i, eps_i ~ N(0, I) from ``noise``. Then for each
    step i -> i+1 with sigma_{i+1} > 0 the noise map that the ancestral step must draw to land on
    x_{i+1} is solved for (eq. 6)::

        mu_i = x0_hat + (sigma_{i+1} / sigma_i)^2 (x_i - x0_hat),  x0_hat = D(x_i; sigma_i)
        z_i  = (x_{i+1} - mu_i) / std_i,   std_i^2 = sigma_{i+1}^2 (sigma_i^2 - sigma_{i+1}^2) / sigma_i^2

    Returns ``(x_first, maps)``: x at ``sigmas[0]`` and the maps z_i in the order ``sample_ddpm``
    draws them. ``sample_ddpm(denoiser, x_first, sigmas, noise=iter(maps).__next__)`` under the
    same conditioning retraces x_1 .. x_{n-1} (up to float rounding) and ends at D(x_{n-1}), so the
    only reconstruction error is the last denoising step's; under other conditioning (a new class
    or prompt) the same maps give the edit (Section 4). The maps are not N(0, I) (the paper's
    Fig. 3: they carry the image's structure), which is why edits keep it.
    ``callback`` gets dict(i=, x=, sigma=, sigma_next=, denoised=, z=) per step of the grid.
    """
    sigmas, model = prepare(denoiser, x0, sigmas, extra_args)
    draw = noise_source(noise, x0)
    xs = [x0 + float(s) * draw() if float(s) > 0 else x0 for s in sigmas]  # independent noise per level
    maps = []
    for i, sigma, sigma_next in grid_steps(sigmas, progress):
        if sigma_next == 0:
            break
        denoised = model(xs[i], sigma)
        mu, var = ve_posterior(denoised, xs[i], sigma, sigma_next)
        z = (xs[i + 1] - mu) / var**0.5
        maps.append(z)
        if callback is not None:
            callback(dict(i=i, x=xs[i + 1], sigma=sigma, sigma_next=sigma_next, denoised=denoised, z=z))
    return xs[0], maps


SAMPLERS = {}  # inversion is not a sampler: it maps x0 to noise; import invert_ddim directly
