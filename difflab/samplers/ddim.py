"""DDIM (Song et al. 2021) in the canonical frame, and the grid check every sampler shares.

A sampler is a plain function ``(denoiser, x, sigmas, *, ...) -> x``: ``x`` is the canonical
noisy sample at ``sigmas[0]`` (``x = x0 + sigma * eps``; start from
``noise * denoiser.prior_std(sigmas[0])``) and the result is the sample at ``sigmas[-1]``.
``sigmas`` is any strictly decreasing grid, usually ending in 0 (see :mod:`difflab.core.grids`);
slice it (``sigmas[k:]``) to start mid-way, as img2img does.

Shared keywords:

- ``extra_args``: a dict passed to the denoiser as ``**extra_args`` at every step (the
  conditioning: ``class_labels=``, ``context=``), as in k-diffusion.
- ``noise``: a callable returning a standard-normal tensor shaped like ``x``
  (:class:`difflab.core.SampleNoise` makes each sample independent of the batch it is in);
  ``None`` means ``torch.randn_like(x)``. Deterministic samplers never call it.
- ``callback``: called after every step with ``dict(i=, x=, sigma=, sigma_next=, denoised=)``,
  where ``x`` is the new sample at ``sigma_next`` and ``denoised`` the estimate made at ``sigma``
  (``sigma`` and ``sigma_next`` are Python floats).
- ``progress``: show a tqdm progress bar.

The arithmetic runs in the dtype of ``x`` (float32 in practice, float64 in the tests); the
step coefficients are computed in float64 from the grid.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from tqdm.auto import trange


def check_sigmas(sigmas) -> torch.Tensor:
    """Validate a sampling grid (1-D, finite, non-negative, strictly decreasing) and return it as
    a float64 CPU tensor."""
    sigmas = torch.as_tensor(sigmas).detach().to("cpu", torch.float64)
    if sigmas.ndim != 1 or len(sigmas) < 1:
        raise ValueError(f"sigmas must be a non-empty 1-D tensor, got shape {tuple(sigmas.shape)}")
    if not bool(torch.isfinite(sigmas).all()):
        raise ValueError(f"sigmas must be finite, got {sigmas.tolist()}")
    if bool((sigmas < 0).any()):
        raise ValueError(f"sigmas must be non-negative, got {sigmas.tolist()}")
    if not bool((sigmas[1:] < sigmas[:-1]).all()):
        raise ValueError(f"sigmas must be strictly decreasing (largest noise level first), got {sigmas.tolist()}")
    return sigmas


def noise_source(noise: Callable[[], torch.Tensor] | None, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """The sampler's source of fresh standard-normal noise, returned in the dtype and device of ``x``."""
    if noise is None:
        return lambda: torch.randn_like(x)
    return lambda: noise().to(x.device, x.dtype)


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
    sigmas = check_sigmas(sigmas)
    extra_args = {} if extra_args is None else extra_args
    draw = noise_source(noise, x)
    s_in = x.new_ones(x.shape[0])
    for i in trange(len(sigmas) - 1, disable=not progress):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoiser(x, sigma * s_in, **extra_args)
        if sigma_next == 0:
            x = denoised
        else:
            eps = (x - denoised) / sigma
            sigma_up = eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
            sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
            x = denoised + sigma_down * eps
            if sigma_up > 0:
                x = x + sigma_up * draw()
        if callback is not None:
            callback(dict(i=i, x=x, sigma=sigma, sigma_next=sigma_next, denoised=denoised))
    return x
