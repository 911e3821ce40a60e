"""Inference grids: the decreasing noise levels a sampler walks through.

A grid is a 1-D tensor of canonical sigmas, decreasing, ending in 0 (or in the last level when
``final`` says so), exactly as in k-diffusion: any grid works with any sampler. Grids are for
*sampling*; the noise levels drawn in *training* live in :mod:`difflab.core.noise_levels`.
"""
from __future__ import annotations

import math

import torch

SPACINGS = ("leading", "trailing", "linspace")


def discrete_timesteps(T: int, n: int, spacing: str = "leading", steps_offset: int = 0) -> torch.Tensor:
    """``n`` of a discrete model's ``T`` training steps, largest first.

    ``leading`` (DDIM's original, Song et al. 2021 appendix C.2: 0, T/n, 2T/n, ... plus
    ``steps_offset``), ``trailing`` (T-1, T-1-T/n, ...; Lin et al. 2024, Table 2, always starts at
    the last step) or ``linspace`` (round(linspace(0, T-1, n))). Same values as diffusers'
    ``timestep_spacing`` of the same name.
    """
    if spacing not in SPACINGS:
        raise ValueError(f"spacing={spacing!r} is unknown; choose one of {list(SPACINGS)}")
    if not 1 <= n <= T:
        raise ValueError(f"steps={n} must be between 1 and the model's {T} training steps")
    if spacing == "leading":
        ts = torch.arange(n, dtype=torch.float64) * (T // n)
        ts = ts.round() + steps_offset
    elif spacing == "trailing":
        ts = torch.arange(T, 0, -T / n, dtype=torch.float64).round() - 1
        return ts.long()
    else:
        ts = torch.linspace(0, T - 1, n, dtype=torch.float64).round()
    return ts.long().flip(0)


def timestep_sigmas(frame, timesteps: torch.Tensor, final: float | None = 0.0) -> torch.Tensor:
    """Sigmas of a discrete frame at ``timesteps``, followed by ``final`` (0 = step to the clean
    sample, like diffusers' ``set_alpha_to_one=True``; ``None`` = stop at the last timestep)."""
    sigmas = frame.sigmas[timesteps.long()]
    if final is not None:
        sigmas = torch.cat([sigmas, sigmas.new_tensor([final])])
    return sigmas


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """EDM's grid sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,
    then 0 (Karras et al. 2022, eq. 5)."""
    _check(n, sigma_min, sigma_max)
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return torch.cat([(hi + ramp * (lo - hi)) ** rho, torch.zeros(1, dtype=torch.float64)])


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Uniform in log sigma, i.e. uniform in log-SNR (Lu et al. 2022, DPM-Solver section 3.3), then 0."""
    _check(n, sigma_min, sigma_max)
    s = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp()
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)])


def flow_sigmas(n: int, shift: float = 1.0, t_max: float = 1.0, t_min: float | None = None) -> torch.Tensor:
    """Flow-matching grid: t uniform from ``t_max`` to ``t_min`` (default 1/n), time-shifted
    t' = shift t / (1 + (shift - 1) t) (Esser et al. 2024, SD3, eq. 23), as canonical sigmas
    t'/(1 - t'), then 0. t = 1 is clamped to the largest finite sigma (see core.denoiser)."""
    from .denoiser import SIGMA_MAX_FINITE

    t_min = 1.0 / n if t_min is None else t_min
    t = torch.linspace(t_max, t_min, n, dtype=torch.float64)
    t = shift * t / (1 + (shift - 1) * t)
    sig = (t / (1 - t)).clamp(max=SIGMA_MAX_FINITE)
    return torch.cat([sig, torch.zeros(1, dtype=torch.float64)])


def _check(n: int, sigma_min: float, sigma_max: float) -> None:
    if n < 1:
        raise ValueError(f"steps={n} must be at least 1")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")


GRIDS = ("default", "timesteps", "karras", "exponential", "flow")


def for_denoiser(denoiser, steps: int, grid: str = "default", spacing: str = "trailing", rho: float = 7.0) -> torch.Tensor:
    """The sampling grid ``grid`` with ``steps`` levels for a wrapped model, ending in 0.

    ``default`` picks the natural grid of the model's frame: its training timesteps for a
    discrete VP model (``spacing`` trailing by default, as Lin et al. 2024 recommend), the
    shifted-uniform flow grid for a flow model, Karras et al.'s rho=7 grid otherwise.
    """
    from .denoiser import Flow, VPDiscrete

    if grid not in GRIDS:
        raise ValueError(f"grid={grid!r} is unknown; choose one of {list(GRIDS)}")
    frame = denoiser.frame
    if grid == "default":
        grid = "timesteps" if isinstance(frame, VPDiscrete) else "flow" if isinstance(frame, Flow) else "karras"
    if grid == "timesteps":
        if not isinstance(frame, VPDiscrete):
            raise ValueError("grid='timesteps' needs a discrete-time model (VPDiscrete frame)")
        return timestep_sigmas(frame, discrete_timesteps(frame.T, steps, spacing))
    if grid == "flow":
        return flow_sigmas(steps)
    if grid == "karras":
        return karras_sigmas(steps, frame.sigma_min, frame.sigma_max, rho)
    return exponential_sigmas(steps, frame.sigma_min, frame.sigma_max)
