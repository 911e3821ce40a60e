"""Ancestral DDPM sampling (Ho et al. 2020) in the canonical frame.

See :mod:`difflab.samplers.common` for the keywords every sampler shares.
"""
from __future__ import annotations

import math

import torch

from ..core.denoiser import learned_log_variance
from ..core.forward import ve_posterior
from .common import grid_steps, noise_source, prepare

VARIANCES = ("fixed_small", "fixed_large", "learned")


@torch.no_grad()
def sample_ddpm(denoiser, x: torch.Tensor, sigmas, *, variance: str = "fixed_small", noise=None,
                extra_args: dict | None = None, callback=None, progress: bool = False) -> torch.Tensor:
    """Ancestral sampling (Ho et al. 2020, Algorithm 2) on any decreasing grid, x = x0 + sigma eps.

    Each step draws x_next ~ N(mu, var) with mu the posterior mean of q(x_next | x, x0_hat),
    x0_hat = D(x, sigma) (eq. 7, in canonical form: :func:`difflab.core.forward.ve_posterior`):
    ``mu = x0_hat + (s_n / sigma)^2 (x - x0_hat)``. ``variance`` picks sigma_t^2 (section 3.2):

    - ``"fixed_small"``: the posterior variance beta~_t, canonically ``s_n^2 (sigma^2 - s_n^2) / sigma^2``;
    - ``"fixed_large"``: beta_t = 1 - ab_t / ab_prev of the VP process, canonically
      ``(sigma^2 - s_n^2)(1 + s_n^2) / (1 + sigma^2)`` (beta_t / ab_prev with ab = 1 / (1 + sigma^2);
      VP-specific: for other frames it is simply a larger variance);
    - ``"learned"``: exp(v log beta_t + (1 - v) log beta~_t) between the two above, v per element
      from ``denoiser.x0_and_v`` (improved DDPM; Nichol & Dhariwal 2021, eq. 15; a
      ``Denoiser(..., learned_variance=True)``). On a grid that skips steps beta_t and beta~_t are
      the respaced ones of consecutive grid levels (section 4), as in diffusers' ``"learned_range"``.

    No noise is added on the step to sigma = 0, which returns x0_hat (Algorithm 2, "z = 0 if t = 1").
    With a sub-sampled grid the betas are those of the skipped steps, as in diffusers' DDPMScheduler.
    """
    if variance not in VARIANCES:
        raise ValueError(f"variance={variance!r} is unknown; choose one of {list(VARIANCES)}")
    if variance == "learned" and (not callable(getattr(denoiser, "x0_and_v", None))
                                  or getattr(denoiser, "learned_variance", True) is False):
        raise ValueError("variance='learned' needs a denoiser with x0_and_v (Denoiser(..., learned_variance=True)); "
                         "for other denoisers use 'fixed_small' or 'fixed_large'")
    learned = variance == "learned"
    sigmas, model = prepare(denoiser.x0_and_v if learned else denoiser, x, sigmas, extra_args)
    draw = noise_source(noise, x)
    for i, sigma, sigma_next in grid_steps(sigmas, progress):
        denoised, v = model(x, sigma) if learned else (model(x, sigma), None)
        x, beta_tilde = ve_posterior(denoised, x, sigma, sigma_next)  # canonical beta~_t, i.e. / ab_prev
        beta = (sigma**2 - sigma_next**2) * (1 + sigma_next**2) / (1 + sigma**2)  # canonical beta_t
        if sigma_next > 0:
            if learned:
                std = (0.5 * learned_log_variance(v, beta, beta_tilde)).exp()
            else:
                std = math.sqrt(beta if variance == "fixed_large" else beta_tilde)
            x = x + std * draw()
        if callback is not None:
            callback(dict(i=i, x=x, sigma=sigma, sigma_next=sigma_next, denoised=denoised))
    return x
