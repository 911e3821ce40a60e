"""Few-step samplers of consistency models: multistep consistency sampling, LCM and TCD.
See :mod:`difflab.samplers.common` for the keywords every sampler shares.

All three alternate a jump to the clean estimate with a return to the next noise level; they
differ only in how they return (canonical frame x = x0 + sigma eps, x0_hat = D(x; sigma_i))::

    consistency (Song et al. 2023, Alg. 1)   x_{i+1} = x0_hat + sqrt(sigma_{i+1}^2 - sigma_min^2) z
    lcm         (Luo et al. 2023, Alg. 1)    x_{i+1} = x0_hat + sigma_{i+1} z
    tcd         (Zheng et al. 2024, SSS)     x_s = x0_hat + sigma_s eps_hat,  s = (1 - gamma) t_{i+1}
                                             x_{i+1} = x_s + sqrt(sigma_{i+1}^2 - sigma_s^2) z

with z fresh noise and eps_hat = (x - x0_hat) / sigma_i. The step to sigma = 0 returns x0_hat.
The denoiser is usually a consistency function (:class:`difflab.core.consistency.ConsistencyFunction`,
which applies the boundary condition, as diffusers' LCM and CM schedulers do inside their step);
TCD, like diffusers' ``TCDScheduler``, takes the model's plain x0 estimate. Any denoiser works with
any of them: LCM sampling of an ordinary diffusion model is k-diffusion's ``sample_lcm``.
"""
from __future__ import annotations

import math

import torch

from ..core.denoiser import VPDiscrete
from .common import grid_steps, noise_source, prepare


def _sample_jumps(jump, denoiser, x, sigmas, *, noise, extra_args, callback, progress):
    """The loop all three share: x0_hat = D(x; sigma_i), then ``jump(x, sigma_i, sigma_{i+1}, x0_hat, draw)``
    to the next level, or x0_hat itself when sigma_{i+1} = 0."""
    sigmas, model = prepare(denoiser, x, sigmas, extra_args)
    draw = noise_source(noise, x)
    for i, sigma, sigma_next in grid_steps(sigmas, progress):
        denoised = model(x, sigma)
        x = denoised if sigma_next == 0 else jump(x, sigma, sigma_next, denoised, draw)
        if callback is not None:
            callback(dict(i=i, x=x, sigma=sigma, sigma_next=sigma_next, denoised=denoised))
    return x


def wrapped(denoiser, name: str):
    """``denoiser.<name>``, or that of the denoiser a wrapper holds as ``.denoiser`` (guidance,
    consistency functions), the outermost first; None when no layer has it (a plain function)."""
    for _ in range(16):
        if denoiser is None or getattr(denoiser, name, None) is not None:
            return getattr(denoiser, name, None)
        denoiser = getattr(denoiser, "denoiser", None)
    return None


@torch.no_grad()
def sample_consistency(denoiser, x: torch.Tensor, sigmas, *, sigma_min: float | None = None, noise=None,
                       extra_args: dict | None = None, callback=None, progress: bool = False) -> torch.Tensor:
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1).

    x <- f(x, sigma_i); then, unless sigma_{i+1} = 0, x <- x + sqrt(sigma_{i+1}^2 - sigma_min^2) z:
    the consistency function lands at sigma_min (its boundary epsilon), so the fresh noise brings
    the sample from sigma_min to sigma_{i+1}. ``sigma_min``: default the denoiser's own
    (``ConsistencyFunction.sigma_min``, found through wrappers: :func:`wrapped`), 0 for a plain
    function; levels below it add no noise (as diffusers clamps). On ``[sigma_max, 0]`` it is
    one-step generation, f(x, sigma_max).
    """
    sigma_min = float((wrapped(denoiser, "sigma_min") or 0.0) if sigma_min is None else sigma_min)
    if not sigma_min >= 0:
        raise ValueError(f"sigma_min={sigma_min} must be >= 0")

    def jump(x, sigma, sigma_next, denoised, draw):
        return denoised + math.sqrt(max(sigma_next**2 - sigma_min**2, 0.0)) * draw()

    return _sample_jumps(jump, denoiser, x, sigmas, noise=noise, extra_args=extra_args, callback=callback,
                         progress=progress)


@torch.no_grad()
def sample_lcm(denoiser, x: torch.Tensor, sigmas, *, noise=None, extra_args: dict | None = None, callback=None,
               progress: bool = False) -> torch.Tensor:
    """Multistep latent consistency sampling (Luo et al. 2023, Algorithm 1): x0_hat = f(x, sigma_i),
    then forward-noise it to the next level with fresh noise, x_{i+1} = x0_hat + sigma_{i+1} z
    (in a VP frame sqrt(ab_next) x0_hat + sqrt(1 - ab_next) z, diffusers' ``LCMScheduler.step``).
    With ``ConsistencyFunction(denoiser, form="lcm")`` on :func:`difflab.core.grids.lcm_timesteps`
    it is diffusers' LCM pipeline; on a plain denoiser it is k-diffusion's ``sample_lcm``."""

    def jump(x, sigma, sigma_next, denoised, draw):
        return denoised + sigma_next * draw()

    return _sample_jumps(jump, denoiser, x, sigmas, noise=noise, extra_args=extra_args, callback=callback,
                         progress=progress)


def tcd_sigma(frame, sigma_next: float, gamma: float) -> float:
    """sigma_s of TCD's intermediate level s = (1 - gamma) t_next, in the frame's time t (Zheng et al.
    2024, Strategic Stochastic Sampling); ``frame=None``: the canonical frame's own time t = sigma
    (Karras et al. 2022's sigma(t) = t), sigma_s = (1 - gamma) sigma_next. A discrete frame floors s to a
    training step, as diffusers' ``TCDScheduler`` does; s = 0 is the clean sample, sigma_s = 0 (the
    paper's alpha(0) = 1; diffusers uses its first training step there, which a grid ending in 0 never
    reaches before its last step). gamma = 0 gives sigma_next itself (a DDIM step), gamma = 1 gives 0 (LCM)."""
    if gamma == 0 or sigma_next == 0:
        return sigma_next
    if frame is None:
        return (1 - gamma) * sigma_next
    s = (1 - gamma) * float(frame.time(torch.tensor(sigma_next, dtype=torch.float64)))
    if isinstance(frame, VPDiscrete):
        s = math.floor(s)
        return float(frame.sigmas[s]) if s > 0 else 0.0
    return float(frame.sigma(torch.tensor(s, dtype=torch.float64))) if s > 0 else 0.0


@torch.no_grad()
def sample_tcd(denoiser, x: torch.Tensor, sigmas, *, gamma: float = 0.3, frame=None, noise=None,
               extra_args: dict | None = None, callback=None, progress: bool = False) -> torch.Tensor:
    """TCD's strategic stochastic sampling (Zheng et al. 2024, "Trajectory Consistency Distillation",
    Strategic Stochastic Sampling): a deterministic DDIM jump from sigma_i to the intermediate level
    s = (1 - gamma) t_{i+1} (:func:`tcd_sigma`), x_s = x0_hat + sigma_s eps_hat, then forward noise
    from s to t_{i+1}, x_{i+1} = x_s + sqrt(sigma_{i+1}^2 - sigma_s^2) z.

    ``gamma`` in [0, 1] (diffusers' ``eta``): 0 is deterministic DDIM (no noise drawn), 1 is
    :func:`sample_lcm`. ``frame``: whose time t is scaled (default the denoiser's, or the wrapped
    denoiser's, :func:`wrapped`; t = sigma for a frameless function). The step to
    sigma = 0 returns x0_hat. Equals diffusers' ``TCDScheduler`` on its timesteps, except that its
    last step stops at its first training step.
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma={gamma} must be in [0, 1] (0: deterministic DDIM, 1: LCM)")
    frame = wrapped(denoiser, "frame") if frame is None else frame

    def jump(x, sigma, sigma_next, denoised, draw):
        sigma_s = tcd_sigma(frame, sigma_next, gamma)
        x_s = denoised + sigma_s * (x - denoised) / sigma
        return x_s + math.sqrt(sigma_next**2 - sigma_s**2) * draw() if sigma_s < sigma_next else x_s

    return _sample_jumps(jump, denoiser, x, sigmas, noise=noise, extra_args=extra_args, callback=callback,
                         progress=progress)


SAMPLERS = {"consistency": sample_consistency, "lcm": sample_lcm, "tcd": sample_tcd}
