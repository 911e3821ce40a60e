"""Flow-matching Euler and Heun: the same probability-flow ODE integrated in the rectified-flow
frame x_t = (1 - t) x0 + t eps (Liu et al. 2023; Lipman et al. 2023; Esser et al. 2024).

The canonical sample maps to the flow frame by t = sigma / (1 + sigma) and x_t = (1 - t) x
(:func:`difflab.core.schedules.flow_t`), and the ODE there is dx_t/dt = u with the velocity
u = (x_t - x0_hat) / t = eps_hat - x0_hat (Liu et al. 2023, eq. 1). Any denoiser works (flow,
eps or v models all reach the sampler as D(x, sigma)); the samplers return the canonical x at
the grid's last sigma. See :mod:`difflab.samplers.common` for the shared keywords.

Frames and orders: a first-order step is the same in every frame whose (alpha, sigma) are those
of the forward process, so ``flow_euler`` is exactly DDIM / ``euler`` (x_{t'} = (1 - t') x0_hat
+ t' eps_hat, i.e. x' = x0_hat + sigma' eps_hat). The second-order corrector is not: ``flow_heun``
averages velocities in t, ``heun`` derivatives in sigma, and the two differ at O(h^3) per step.
"""
from __future__ import annotations

import torch
from tqdm.auto import trange

from ..core.schedules import flow_t
from .common import check_sigmas
from .common import ode_derivative


def _flow_setup(sigmas, extra_args, x):
    sigmas = check_sigmas(sigmas)
    return sigmas, flow_t(sigmas).tolist(), ({} if extra_args is None else extra_args), x.new_ones(x.shape[0])


@torch.no_grad()
def sample_flow_euler(denoiser, x: torch.Tensor, sigmas, *, noise=None, extra_args: dict | None = None,
                      callback=None, progress: bool = False) -> torch.Tensor:
    """Flow-matching Euler: Euler's method on dx_t/dt = u (Liu et al. 2023, eq. 1; Esser et al. 2024):
    x_{t_{i+1}} = x_{t_i} + (t_{i+1} - t_i) u, u = (x_{t_i} - D(x; sigma_i)) / t_i, in the flow
    frame t = sigma / (1 + sigma), x_t = (1 - t) x. One denoiser call per step; first order;
    deterministic. Equal to DDIM / :func:`difflab.samplers.euler.sample_euler` in exact arithmetic.
    """
    sigmas, ts, extra_args, s_in = _flow_setup(sigmas, extra_args, x)
    for i in trange(len(ts) - 1, disable=not progress):
        sigma, sigma_next, t, t_next = float(sigmas[i]), float(sigmas[i + 1]), ts[i], ts[i + 1]
        denoised = denoiser(x, sigma * s_in, **extra_args)
        if sigma_next == 0:
            x = denoised  # t_{i+1} = 0: x_0 = x_t - t u = x0_hat, exactly
        else:
            x_t = (1 - t) * x
            x_t = x_t + (t_next - t) * ode_derivative(x_t, t, denoised)
            x = x_t / (1 - t_next)
        if callback is not None:
            callback(dict(i=i, x=x, sigma=sigma, sigma_next=sigma_next, denoised=denoised))
    return x


@torch.no_grad()
def sample_flow_heun(denoiser, x: torch.Tensor, sigmas, *, noise=None, extra_args: dict | None = None,
                     callback=None, progress: bool = False) -> torch.Tensor:
    """Flow-matching Heun: Heun's method on dx_t/dt = u (Liu et al. 2023, eq. 1), as diffusers'
    FlowMatchHeunDiscreteScheduler: predictor x' = x_t + (t_{i+1} - t_i) u_i,
    corrector u' = (x' - D(x' / (1 - t_{i+1}); sigma_{i+1})) / t_{i+1} and
    x_{t_{i+1}} = x_t + (t_{i+1} - t_i) (u_i + u') / 2. Two denoiser calls per step, one on the
    final step to t = 0 (Euler, as EDM Algorithm 2). Second order; deterministic.
    """
    sigmas, ts, extra_args, s_in = _flow_setup(sigmas, extra_args, x)
    for i in trange(len(ts) - 1, disable=not progress):
        sigma, sigma_next, t, t_next = float(sigmas[i]), float(sigmas[i + 1]), ts[i], ts[i + 1]
        denoised = denoiser(x, sigma * s_in, **extra_args)
        if sigma_next == 0:
            x = denoised
        else:
            x_t = (1 - t) * x
            u = ode_derivative(x_t, t, denoised)
            x_t2 = x_t + (t_next - t) * u
            u_2 = ode_derivative(x_t2, t_next, denoiser(x_t2 / (1 - t_next), sigma_next * s_in, **extra_args))
            x = (x_t + (t_next - t) * (u + u_2) / 2) / (1 - t_next)
        if callback is not None:
            callback(dict(i=i, x=x, sigma=sigma, sigma_next=sigma_next, denoised=denoised))
    return x


SAMPLERS = {"flow_euler": sample_flow_euler, "flow_heun": sample_flow_heun}
