"""Sampler names users know (k-diffusion, ComfyUI, A1111) resolve to registered difflab samplers
whose keywords they accept, on grids for_denoiser knows."""
import math

import pytest
import torch

from difflab.core import Denoiser, VPDiscrete, grids
from difflab.oracle import GaussianMixture
from difflab.samplers import names

F64 = torch.float64
GM = GaussianMixture.random(3, 2, seed=0)
FRAME = VPDiscrete.from_name("linear", 1000)
DENOISER = Denoiser(GM.network(FRAME, "eps"), FRAME, "eps")


@pytest.mark.parametrize("name", sorted(names.NAMES))
def test_every_name_resolves_to_a_registered_sampler_that_runs(name):
    fn, kwargs, grid = names.resolve(name)
    registry = names.registry()
    assert fn is registry[names.NAMES[name][0]]
    assert grid in grids.GRIDS
    sigmas = grids.for_denoiser(DENOISER, 6, grid=grid)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=F64) * math.sqrt(1 + float(sigmas[0]) ** 2)
    g = torch.Generator().manual_seed(1)
    out = fn(DENOISER, x, sigmas, noise=lambda: torch.randn(4, 3, generator=g, dtype=F64), **kwargs)
    assert out.shape == x.shape and bool(torch.isfinite(out).all())
    assert float(out.abs().max()) < 10  # a sample of the data (|x0| of a few units), not noise at sigma 157


def test_names_match_case_and_spacing_and_return_fresh_kwargs():
    assert names.resolve("dpm++ 2m   KARRAS") == names.resolve("DPM++ 2M Karras")
    fn, kwargs, grid = names.resolve("DPM++ 2M Karras")
    assert fn is names.registry()["dpmpp_2m"] and grid == "karras" and kwargs == {"lower_order_final": False}
    kwargs["order"] = 99  # the caller's copy, not the table's
    assert names.resolve("DPM++ 2M Karras")[1] == {"lower_order_final": False}


@pytest.mark.parametrize("name,sampler,grid", [
    ("euler", "euler", "default"), ("euler_ancestral", "euler_ancestral", "default"),
    ("Euler a", "euler_ancestral", "uniform_time"), ("heun", "heun", "default"), ("lms", "lms", "default"),
    ("LMS Karras", "lms", "karras"), ("dpm_2", "dpm_2", "default"), ("DPM2 Karras", "dpm_2", "karras"),
    ("dpmpp_2m", "dpmpp_2m", "default"), ("DPM++ 2M", "dpmpp_2m", "karras"),
    ("DPM++ 2M SDE Karras", "dpmpp_2m_sde", "karras"), ("DPM++ 2M SDE", "dpmpp_2m_sde", "exponential"),
    ("DPM++ 3M SDE", "dpmpp_3m_sde", "exponential"), ("DPM++ 3M SDE Exponential", "dpmpp_3m_sde", "exponential"),
    ("DPM++ 2S a", "dpmpp_2s_ancestral", "karras"), ("UniPC", "unipc", "uniform_time"),
    ("uni_pc_bh2", "unipc", "default"), ("DDIM", "ddim", "uniform_time"), ("DEIS", "deis", "uniform_time"),
    ("dpm_adaptive", "adaptive", "default"), ("Euler Polyexponential", "euler", "polyexponential"),
    ("lcm", "lcm", "default"), ("LCM", "lcm", "uniform_time"), ("LCM Karras", "lcm", "karras"),
])
def test_the_names_people_type(name, sampler, grid):
    fn, _, g = names.resolve(name)
    assert fn is names.registry()[sampler] and g == grid


def test_variants_carry_their_options():
    assert names.resolve("uni_pc")[1] == {"order": 3, "variant": "bh1"}
    assert names.resolve("uni_pc_bh2")[1] == {"order": 3, "variant": "bh2"}
    assert names.resolve("DPM++ 2M SDE Heun")[1]["solver_type"] == "heun"
    assert names.resolve("LMS")[1] == {"order": 4}


def test_difflab_names_pass_through_and_unknown_names_raise():
    for name, fn in names.registry().items():
        assert names.resolve(name)[0] is fn
    assert names.resolve("dpm_solver_3") == (names.registry()["dpm_solver_3"], {}, "default")
    with pytest.raises(ValueError, match=r"DPM\+\+ 2M Karras.*dpmpp_3m"):
        names.resolve("DPM++ 9M Turbo")
    with pytest.raises(ValueError, match="unknown"):
        names.resolve("")
