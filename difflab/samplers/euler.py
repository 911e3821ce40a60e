"""Euler, Heun and DPM-2 on the probability-flow ODE in sigma, and ancestral Euler
(Karras et al. 2022; k-diffusion's names). See :mod:`difflab.samplers.common` for the keywords
every sampler shares.

In the canonical frame x = x0 + sigma eps the probability-flow ODE is (Karras et al. 2022,
eq. 3 with s(t) = 1, sigma(t) = t, and eq. 4 for the score)::

    dx/dsigma = (x - D(x; sigma)) / sigma

:func:`ode_derivative` is that right-hand side, written once; every sampler here (and LMS, the
flow samplers and DDIM inversion) takes its steps with it. A grid that ends in 0 is finished
with one Euler step, which lands exactly on D(x; sigma) (EDM Algorithm 2 skips the
second-order correction when t_{i+1} = 0).
"""
from __future__ import annotations

import math

import torch

from .common import ancestral_step, grid_steps, noise_source, ode_derivative, prepare


def euler_step(x: torch.Tensor, sigma: float, sigma_next: float, denoised: torch.Tensor) -> torch.Tensor:
    """One Euler step of the ODE from sigma to sigma_next: x + (sigma_next - sigma) d
    (the first-order step of EDM Algorithm 2). The step to sigma_next = 0 returns D(x; sigma) itself, which
    it equals in exact arithmetic."""
    if sigma_next == 0:
        return denoised
    return x + (sigma_next - sigma) * ode_derivative(x, sigma, denoised)


def churn(x: torch.Tensor, sigma: float, steps: int, draw, s_churn: float = 0.0, s_tmin: float = 0.0,
          s_tmax: float = math.inf, s_noise: float = 1.0) -> tuple[torch.Tensor, float]:
    """EDM's stochastic "churn" (Karras et al. 2022, Algorithm 2, the noise increase): raise the noise
    level from t_i to t_hat = (1 + gamma_i) t_i by adding fresh noise, with
    gamma_i = min(S_churn / N, sqrt(2) - 1) if S_tmin <= t_i <= S_tmax else 0 and
    x_hat = x + sqrt(t_hat^2 - t_i^2) S_noise eps. ``steps`` is N, the grid's number of steps.
    Returns (x_hat, t_hat); with gamma = 0 it returns (x, sigma) untouched and draws nothing."""
    gamma = min(s_churn / steps, 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
    if gamma <= 0:
        return x, sigma
    sigma_hat = sigma * (1 + gamma)
    return x + math.sqrt(sigma_hat**2 - sigma**2) * s_noise * draw(), sigma_hat


def _check_churn(s_churn: float, s_noise: float) -> None:
    if s_churn < 0:
        raise ValueError(f"s_churn={s_churn} must be >= 0 (0: deterministic)")
    if s_noise < 0:
        raise ValueError(f"s_noise={s_noise} must be >= 0")


def heun_step(model, x: torch.Tensor, sigma: float, sigma_next: float, denoised: torch.Tensor) -> torch.Tensor:
    """Heun's step (Karras et al. 2022, Algorithm 2, lines 5-8) from sigma to sigma_next > 0 given
    denoised = D(x; sigma): the Euler predictor x' = x + (sigma_next - sigma) d, then the trapezoidal
    correction with d' = (x' - D(x'; sigma_next)) / sigma_next."""
    d = ode_derivative(x, sigma, denoised)
    x_2 = x + (sigma_next - sigma) * d
    d_2 = ode_derivative(x_2, sigma_next, model(x_2, sigma_next))
    return x + (sigma_next - sigma) * (d + d_2) / 2


def dpm_2_step(model, x: torch.Tensor, sigma: float, sigma_next: float, denoised: torch.Tensor) -> torch.Tensor:
    """k-diffusion's DPM-2 step from sigma to sigma_next > 0 given denoised = D(x; sigma): the
    explicit midpoint method with the midpoint s = sqrt(sigma sigma_next) taken in log sigma."""
    sigma_mid = math.exp((math.log(sigma) + math.log(sigma_next)) / 2)
    x_2 = x + (sigma_mid - sigma) * ode_derivative(x, sigma, denoised)
    d_2 = ode_derivative(x_2, sigma_mid, model(x_2, sigma_mid))
    return x + (sigma_next - sigma) * d_2


def _sample_churned(step, denoiser, x, sigmas, *, s_churn, s_tmin, s_tmax, s_noise, noise, extra_args, callback,
                    progress):
    """The loop of EDM's Algorithm 2 (Karras et al. 2022) shared by Euler, Heun and DPM-2: churn to
    t_hat, denoised = D(x_hat; t_hat), then ``step(model, x_hat, t_hat, t_{i+1}, denoised)``; the step
    to t_{i+1} = 0 is Euler's, which lands on ``denoised``."""
    _check_churn(s_churn, s_noise)
    sigmas, model = prepare(denoiser, x, sigmas, extra_args)
    draw = noise_source(noise, x)
    steps = len(sigmas) - 1
    for i, sigma, sigma_next in grid_steps(sigmas, progress):
        x, sigma_hat = churn(x, sigma, steps, draw, s_churn, s_tmin, s_tmax, s_noise)
        denoised = model(x, sigma_hat)
        x = denoised if sigma_next == 0 else step(model, x, sigma_hat, sigma_next, denoised)
        if callback is not None:
            callback(dict(i=i, x=x, sigma=sigma, sigma_hat=sigma_hat, sigma_next=sigma_next, denoised=denoised))
    return x


@torch.no_grad()
def sample_euler(denoiser, x: torch.Tensor, sigmas, *, s_churn: float = 0.0, s_tmin: float = 0.0,
                 s_tmax: float = math.inf, s_noise: float = 1.0, noise=None, extra_args: dict | None = None,
                 callback=None, progress: bool = False) -> torch.Tensor:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 2 without the
    second-order correction), with optional churn (:func:`churn`).

    Per step: x_hat, t_hat = churn(x, t_i); d = (x_hat - D(x_hat; t_hat)) / t_hat;
    x_{i+1} = x_hat + (t_{i+1} - t_hat) d. First order, one denoiser call per step. Without
    churn it is deterministic DDIM (Song et al. 2021) in the canonical frame.
    """
    euler = lambda model, *args: euler_step(*args)  # noqa: E731  (no second denoiser call)
    return _sample_churned(euler, denoiser, x, sigmas, s_churn=s_churn,
                           s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise, noise=noise, extra_args=extra_args,
                           callback=callback, progress=progress)


@torch.no_grad()
def sample_heun(denoiser, x: torch.Tensor, sigmas, *, s_churn: float = 0.0, s_tmin: float = 0.0,
                s_tmax: float = math.inf, s_noise: float = 1.0, noise=None, extra_args: dict | None = None,
                callback=None, progress: bool = False) -> torch.Tensor:
    """Heun's 2nd-order method (Karras et al. 2022, Algorithm 2), with optional churn.

    Per step: x_hat, t_hat = churn(x, t_i); d_i = (x_hat - D(x_hat; t_hat)) / t_hat; the Euler
    predictor x' = x_hat + (t_{i+1} - t_hat) d_i; then, if t_{i+1} != 0, the trapezoidal
    correction d'_i = (x' - D(x'; t_{i+1})) / t_{i+1} and
    x_{i+1} = x_hat + (t_{i+1} - t_hat) (d_i + d'_i) / 2 (:func:`heun_step`). Two denoiser calls
    per step, one on the final step to 0 (which stays Euler, as in the paper).
    """
    return _sample_churned(heun_step, denoiser, x, sigmas, s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax,
                           s_noise=s_noise, noise=noise, extra_args=extra_args, callback=callback, progress=progress)


@torch.no_grad()
def sample_dpm_2(denoiser, x: torch.Tensor, sigmas, *, s_churn: float = 0.0, s_tmin: float = 0.0,
                 s_tmax: float = math.inf, s_noise: float = 1.0, noise=None, extra_args: dict | None = None,
                 callback=None, progress: bool = False) -> torch.Tensor:
    """k-diffusion's DPM-2, inspired by DPM-Solver-2 (Lu et al. 2022, Algorithm 1 with r = 1/2):
    the explicit midpoint method on dx/dsigma with the midpoint taken in log sigma, plus optional
    churn (Karras et al. 2022, Algorithm 2).

    Per step: x_hat, t_hat = churn(x, t_i); d = (x_hat - D(x_hat; t_hat)) / t_hat;
    s = sqrt(t_hat t_{i+1}) (the midpoint of log t); u = x_hat + (s - t_hat) d;
    x_{i+1} = x_hat + (t_{i+1} - t_hat) (u - D(u; s)) / s (:func:`dpm_2_step`). Two denoiser calls
    per step, one on the final step to 0 (Euler).
    """
    return _sample_churned(dpm_2_step, denoiser, x, sigmas, s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax,
                           s_noise=s_noise, noise=noise, extra_args=extra_args, callback=callback, progress=progress)


@torch.no_grad()
def sample_euler_ancestral(denoiser, x: torch.Tensor, sigmas, *, eta: float = 1.0, s_noise: float = 1.0, noise=None,
                           extra_args: dict | None = None, callback=None, progress: bool = False) -> torch.Tensor:
    """Ancestral Euler (k-diffusion's ``sample_euler_ancestral``): an Euler step of the ODE down
    to sigma_down, then fresh noise of std sigma_up, with sigma_down^2 + sigma_up^2 = sigma_next^2
    (:func:`difflab.samplers.common.ancestral_step`; eta = 1 is the DDPM posterior variance of
    Ho et al. 2020, eq. 7, eta = 0 is :func:`sample_euler`).

    x_{i+1} = x + (sigma_down - t_i) (x - D(x; t_i)) / t_i + s_noise sigma_up z. One denoiser
    call and one noise draw per step (none on the step to 0). Stochastic; first order.
    """
    if eta < 0:
        raise ValueError(f"eta={eta} must be >= 0 (0: deterministic Euler, 1: DDPM's variance)")
    if s_noise < 0:
        raise ValueError(f"s_noise={s_noise} must be >= 0")
    sigmas, model = prepare(denoiser, x, sigmas, extra_args)
    draw = noise_source(noise, x)
    for i, sigma, sigma_next in grid_steps(sigmas, progress):
        denoised = model(x, sigma)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = euler_step(x, sigma, sigma_down, denoised)
        if sigma_up > 0:
            x = x + s_noise * sigma_up * draw()
        if callback is not None:
            callback(dict(i=i, x=x, sigma=sigma, sigma_next=sigma_next, denoised=denoised))
    return x


SAMPLERS = {"euler": sample_euler, "heun": sample_heun, "euler_ancestral": sample_euler_ancestral,
            "dpm_2": sample_dpm_2}
