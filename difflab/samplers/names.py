"""The sampler names users know, mapped to difflab's functions, keywords and grids.

k-diffusion's function names (``dpmpp_2m``, also ComfyUI's ``KSampler`` names) and AUTOMATIC1111's
menu names ("DPM++ 2M Karras") all resolve here to ``(function, kwargs, grid)``: call the
function on a grid from :func:`difflab.core.grids.for_denoiser` with that grid name::

    from difflab.core import grids
    from difflab.samplers.names import resolve

    fn, kwargs, grid = resolve("DPM++ 2M Karras")
    sigmas = grids.for_denoiser(denoiser, 25, grid=grid)
    x = fn(denoiser, torch.randn(shape) * denoiser.prior_std(sigmas[0]), sigmas, **kwargs)

The grids follow each tool: a bare k-diffusion name keeps difflab's ``"default"`` grid (k-diffusion
leaves the grid to the caller); an A1111 name without a scheduler suffix uses what A1111 >= 1.9's
"Automatic" scheduler picks for it (``samplers_k_diffusion`` in ``modules/sd_samplers_kdiffusion.py``:
Karras for DPM++ 2M, DPM++ 2S a and DPM2, exponential for the DPM++ SDE samplers, the model's own
uniform-in-time grid otherwise; its "discard the next-to-last sigma" for DPM2 and DPM++ 3M SDE is
not reproduced); the suffixes " Karras", " Exponential",
" Polyexponential" and " Uniform" pick that grid. Names are matched exactly first ("euler" is
k-diffusion's, "Euler" A1111's), then without regard to case.
The diffusers scheduler that corresponds to each name is tabled in ``docs/samplers.md``.
"""
from __future__ import annotations

from . import SAMPLERS

# name -> (difflab sampler, its keyword arguments, grid name for difflab.core.grids.for_denoiser)
KDIFFUSION = {  # k-diffusion's sample_* functions and ComfyUI's sampler names
    "euler": ("euler", {}, "default"),
    "euler_ancestral": ("euler_ancestral", {}, "default"),
    "euler_a": ("euler_ancestral", {}, "default"),
    "heun": ("heun", {}, "default"),
    "dpm_2": ("dpm_2", {}, "default"),
    "lms": ("lms", {"order": 4}, "default"),
    "dpm_adaptive": ("adaptive", {}, "default"),
    "dpmpp_2s_ancestral": ("dpmpp_2s_ancestral", {}, "default"),
    "dpmpp_2m": ("dpmpp_2m", {"lower_order_final": False}, "default"),
    "dpmpp_3m": ("dpmpp_3m", {"lower_order_final": False}, "default"),
    "dpmpp_2m_sde": ("dpmpp_2m_sde", {"lower_order_final": False}, "default"),
    "dpmpp_2m_sde_heun": ("dpmpp_2m_sde", {"solver_type": "heun", "lower_order_final": False}, "default"),
    "dpmpp_3m_sde": ("dpmpp_3m_sde", {"lower_order_final": False}, "default"),
    "ddim": ("ddim", {}, "default"),
    "ddpm": ("ddpm", {}, "default"),
    "uni_pc": ("unipc", {"order": 3, "variant": "bh1"}, "default"),
    "uni_pc_bh2": ("unipc", {"order": 3, "variant": "bh2"}, "default"),
    "deis": ("deis", {"order": 3}, "default"),
    "lcm": ("lcm", {}, "default"),
}

# AUTOMATIC1111's menu names without a scheduler suffix: the k-diffusion sampler each runs, and the
# grid its "Automatic" scheduler picks
A1111_SAMPLERS = (
    ("Euler", "euler", "uniform_time"),
    ("Euler a", "euler_ancestral", "uniform_time"),
    ("Heun", "heun", "uniform_time"),
    ("LMS", "lms", "uniform_time"),
    ("DPM2", "dpm_2", "karras"),
    ("DPM adaptive", "dpm_adaptive", "uniform_time"),
    ("DPM++ 2S a", "dpmpp_2s_ancestral", "karras"),
    ("DPM++ 2M", "dpmpp_2m", "karras"),
    ("DPM++ 2M SDE", "dpmpp_2m_sde", "exponential"),
    ("DPM++ 2M SDE Heun", "dpmpp_2m_sde_heun", "exponential"),
    ("DPM++ 3M SDE", "dpmpp_3m_sde", "exponential"),
    ("DDIM", "ddim", "uniform_time"),
    ("UniPC", "uni_pc", "uniform_time"),
    ("DEIS", "deis", "uniform_time"),
    ("LCM", "lcm", "uniform_time"),
)
A1111 = {name: (*KDIFFUSION[k][:2], grid) for name, k, grid in A1111_SAMPLERS}
GRID_SUFFIXES = {"Karras": "karras", "Exponential": "exponential", "Polyexponential": "polyexponential",
                 "Uniform": "uniform_time"}

NAMES = {
    **KDIFFUSION,
    **A1111,
    **{f"{name} {suffix}": (sampler, kwargs, grid) for name, (sampler, kwargs, _) in A1111.items()
       for suffix, grid in GRID_SUFFIXES.items()},
}


def registry() -> dict:
    """Every registered difflab sampler by name: :data:`difflab.samplers.SAMPLERS` (the adaptive solver included)."""
    return dict(SAMPLERS)


def resolve(name: str):
    """``(function, kwargs, grid)`` for a k-diffusion, ComfyUI or A1111 sampler name (any case), or a
    difflab sampler name itself (with no keywords and the ``"default"`` grid). Raises ValueError
    listing the valid names otherwise."""
    samplers = registry()
    key = " ".join(str(name).split())
    folded = {k.lower(): v for k, v in NAMES.items()}
    if key in NAMES or key.lower() in folded:
        sampler, kwargs, grid = NAMES[key] if key in NAMES else folded[key.lower()]
    elif name in samplers:
        sampler, kwargs, grid = name, {}, "default"
    else:
        raise ValueError(f"sampler name {name!r} is unknown; choose one of {sorted(NAMES)} "
                         f"or a difflab sampler: {sorted(samplers)}")
    return samplers[sampler], dict(kwargs), grid
