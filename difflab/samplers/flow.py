"""Flow-matching Euler and Heun: the same probability-flow ODE integrated in the rectified-flow
frame x_t = (1 - t) x0 + t eps (Liu et al. 2023; Lipman et al. 2023; Esser et al. 2024).

The canonical sample maps to the flow frame by t = sigma / (1 + sigma) and x_t = (1 - t) x
= x / (1 + sigma) (:func:`difflab.core.schedules.flow_t`); a grid may start at flow's exact
t = 1, ``FLOW_SIGMA_ONE`` (:mod:`difflab.core.denoiser`), as diffusers' flow schedulers do, and the ODE there is dx_t/dt = u with the velocity
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

from ..core.schedules import flow_t
from .common import grid_steps, ode_derivative, prepare


def flow_euler_step(model, x_t: torch.Tensor, t: float, t_next: float, sigma_next: float,
                    denoised: torch.Tensor) -> torch.Tensor:
    """Euler's step on dx_t/dt = u in the flow frame: x_t + (t_next - t) u, u = (x_t - x0_hat) / t."""
    return x_t + (t_next - t) * ode_derivative(x_t, t, denoised)


def flow_heun_step(model, x_t: torch.Tensor, t: float, t_next: float, sigma_next: float,
                   denoised: torch.Tensor) -> torch.Tensor:
    """Heun's step on dx_t/dt = u in the flow frame: the Euler predictor x' = x_t + (t_next - t) u,
    then u' = (x' - D(x' / (1 - t_next); sigma_next)) / t_next and x_t + (t_next - t) (u + u') / 2."""
    u = ode_derivative(x_t, t, denoised)
    x_t2 = x_t + (t_next - t) * u
    u_2 = ode_derivative(x_t2, t_next, model(x_t2 / (1 - t_next), sigma_next))
    return x_t + (t_next - t) * (u + u_2) / 2


def _sample_flow(step, denoiser, x, sigmas, extra_args, callback, progress):
    """The loop of the flow samplers: map x to the flow frame, x_t = (1 - t) x, take
    ``step(model, x_t, t, t_next, sigma_next, denoised)`` and map back, x = x_t / (1 - t_next).
    The step to t = 0 returns the denoised estimate: x_0 = x_t - t u = x0_hat, exactly."""
    sigmas, model = prepare(denoiser, x, sigmas, extra_args, exact_flow_one=True)
    ts = flow_t(sigmas).tolist()
    for i, sigma, sigma_next in grid_steps(sigmas, progress):
        t, t_next = ts[i], ts[i + 1]
        denoised = model(x, sigma)
        # x_t = (1 - t) x written as x / (1 + sigma): exact at FLOW_SIGMA_ONE, where 1 - t is 0
        x = denoised if sigma_next == 0 else step(model, x / (1 + sigma), t, t_next, sigma_next, denoised) / (1 - t_next)
        if callback is not None:
            callback(dict(i=i, x=x, sigma=sigma, sigma_next=sigma_next, denoised=denoised))
    return x


@torch.no_grad()
def sample_flow_euler(denoiser, x: torch.Tensor, sigmas, *, noise=None, extra_args: dict | None = None,
                      callback=None, progress: bool = False) -> torch.Tensor:
    """Flow-matching Euler: Euler's method on dx_t/dt = u (Liu et al. 2023, eq. 1; Esser et al. 2024):
    x_{t_{i+1}} = x_{t_i} + (t_{i+1} - t_i) u, u = (x_{t_i} - D(x; sigma_i)) / t_i, in the flow
    frame t = sigma / (1 + sigma), x_t = (1 - t) x. One denoiser call per step; first order;
    deterministic. Equal to DDIM / :func:`difflab.samplers.euler.sample_euler` in exact arithmetic.
    """
    return _sample_flow(flow_euler_step, denoiser, x, sigmas, extra_args, callback, progress)


@torch.no_grad()
def sample_flow_heun(denoiser, x: torch.Tensor, sigmas, *, noise=None, extra_args: dict | None = None,
                     callback=None, progress: bool = False) -> torch.Tensor:
    """Flow-matching Heun: Heun's method on dx_t/dt = u (Liu et al. 2023, eq. 1), as diffusers'
    FlowMatchHeunDiscreteScheduler: predictor x' = x_t + (t_{i+1} - t_i) u_i,
    corrector u' = (x' - D(x' / (1 - t_{i+1}); sigma_{i+1})) / t_{i+1} and
    x_{t_{i+1}} = x_t + (t_{i+1} - t_i) (u_i + u') / 2 (:func:`flow_heun_step`). Two denoiser
    calls per step, one on the final step to t = 0 (Euler, as EDM Algorithm 2). Second order;
    deterministic.
    """
    return _sample_flow(flow_heun_step, denoiser, x, sigmas, extra_args, callback, progress)


SAMPLERS = {"flow_euler": sample_flow_euler, "flow_heun": sample_flow_heun}
