"""What every sampler shares: the contract, the setup (grid check, bound denoiser, step iterator), the noise source, the ancestral split.

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

from ..progress import progress_range
from ..core.denoiser import FLOW_SIGMA_ONE, SIGMA_MAX_FINITE
from ..core.grids import check_sigmas  # the grid check lives with the grids; samplers re-export it


def check_sample(x) -> None:
    """A ValueError unless ``x`` is a floating (B, ...) tensor: samplers see a batch along dim 0."""
    if not torch.is_tensor(x) or x.ndim < 1 or not x.is_floating_point():
        got = f"a {x.dtype} tensor of shape {tuple(x.shape)}" if torch.is_tensor(x) else f"a {type(x).__name__}"
        raise ValueError(f"x must be a floating-point (B, ...) tensor with the batch along dim 0, got {got}")


def prepare(denoiser, x: torch.Tensor, sigmas, extra_args: dict | None = None, exact_flow_one: bool = False):
    """``(sigmas, model)``: the checked grid (:func:`check_sigmas`) and the denoiser as
    ``model(x, sigma) = denoiser(x, sigma * ones(B), **extra_args)``, i.e. with the conditioning
    bound and a Python-float sigma broadcast over the batch of ``x`` (checked: :func:`check_sample`).
    Flow's exact t = 1 (``FLOW_SIGMA_ONE`` = 2**53, and anything above) is refused unless
    ``exact_flow_one`` (the flow samplers, which step from it exactly; others would lose x0 to rounding)."""
    sigmas = check_sigmas(sigmas)
    if not exact_flow_one and float(sigmas[0]) >= FLOW_SIGMA_ONE:
        raise ValueError(f"sigmas[0]={float(sigmas[0]):.6g} is flow's exact t = 1 (FLOW_SIGMA_ONE = 2**53), which only the "
                         "flow samplers 'flow_euler' and 'flow_heun' step from; use grids.flow_sigmas(..., exact_one=False) "
                         f"(first level {SIGMA_MAX_FINITE:.6g}) with other samplers")
    check_sample(x)
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones(x.shape[0])
    return sigmas, lambda x_, sigma: denoiser(x_, sigma * s_in, **extra_args)


def grid_steps(sigmas: torch.Tensor, progress: bool = False):
    """``(i, sigma_i, sigma_{i+1})`` for each step of a checked grid, the levels as Python floats,
    under a tqdm progress bar when ``progress``."""
    for i in progress_range(len(sigmas) - 1, disable=not progress):
        yield i, float(sigmas[i]), float(sigmas[i + 1])


def noise_source(noise: Callable[[], torch.Tensor] | None, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """The sampler's source of fresh standard-normal noise, returned in the dtype and device of ``x``."""
    if noise is None:
        return lambda: torch.randn_like(x)
    return lambda: noise().to(x.device, x.dtype)


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step from ``sigma`` to ``sigma_next`` into a deterministic part down to
    ``sigma_down`` and fresh noise of std ``sigma_up``, with sigma_down^2 + sigma_up^2 = sigma_next^2
    and sigma_up = eta * sqrt(s_n^2 (sigma^2 - s_n^2) / sigma^2): eta = 1 is the DDPM posterior
    variance (Ho et al. 2020, eq. 7), eta = 0 the deterministic step (Song et al. 2021, eq. 16)."""
    if sigma_next == 0:
        return 0.0, 0.0
    sigma_up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - sigma_up**2), sigma_up


def ode_derivative(x: torch.Tensor, sigma: float, denoised: torch.Tensor) -> torch.Tensor:
    """d = dx/dsigma = (x - D(x; sigma)) / sigma (Karras et al. 2022, eq. 3-4), which is also
    the noise estimate eps_hat of x = x0 + sigma eps."""
    return (x - denoised) / sigma
