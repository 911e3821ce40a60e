"""Samplers: plain functions ``sample_x(denoiser, x, sigmas, *, noise=None, extra_args=None,
callback=None, progress=False, ...) -> x`` over a denoiser and an explicit grid of sigmas.

Usage::

    from difflab.core import grids
    from difflab.samplers import get_sampler

    sigmas = grids.karras_sigmas(50, denoiser.sigma_min, denoiser.sigma_max)
    x = torch.randn(shape) * denoiser.prior_std(sigmas[0])
    sample = get_sampler("ddim")(denoiser, x, sigmas, extra_args={"class_labels": y})
"""
from . import adaptive, consistency, deis, dpm_solver, euler, flow, lms, sde, unipc
from .brownian import BrownianTreeNoise
from .common import ancestral_step, check_sigmas, ode_derivative
from .ddim import sample_ddim
from .ddpm import sample_ddpm
from .fit_grid import fit_sigmas
from .inversion import invert_ddim, invert_ddpm

# One plain dict: each family module exports its own SAMPLERS and they are merged here.
SAMPLERS = {
    "ddim": sample_ddim, "ddpm": sample_ddpm,
    **euler.SAMPLERS, **lms.SAMPLERS, **flow.SAMPLERS,
    **dpm_solver.SAMPLERS, **sde.SAMPLERS, **unipc.SAMPLERS, **deis.SAMPLERS, **adaptive.SAMPLERS,
    **consistency.SAMPLERS,
}


# The samplers that take ``eta`` (the scale of the fresh noise per step; 0 = deterministic), so a
# command can refuse --eta for the others before any work (tests/test_options.py checks it). TCD's
# stochasticity is its own keyword, ``gamma`` (the paper's symbol; diffusers calls it eta).
ETA_SAMPLERS = ("ddim", "euler_ancestral", "dpmpp_2s", "dpmpp_2s_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde")


def get_sampler(name: str):
    """The sampler function registered under ``name`` in :data:`SAMPLERS`."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler={name!r} is unknown; choose one of {sorted(SAMPLERS)}")
    return SAMPLERS[name]


__all__ = ["SAMPLERS", "ETA_SAMPLERS", "get_sampler", "sample_ddim", "sample_ddpm", "check_sigmas", "ancestral_step", "ode_derivative", "invert_ddim", "invert_ddpm", "BrownianTreeNoise", "fit_sigmas"]
