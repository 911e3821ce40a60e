"""The inference grids added to difflab.core.grids: uniform time, polyexponential, user-given, leap
and optimized, and for_denoiser's names for them."""
import math

import pytest
import torch
from diffusers import EulerDiscreteScheduler

from difflab.core import EDM, VE, Denoiser, Flow, VPContinuous, VPDiscrete, grids, schedules
from difflab.oracle import GaussianMixture, rmse_to_exact
from difflab.samplers.unipc import sample_unipc

F64 = torch.float64
close = torch.testing.assert_close


def assert_grid(sig, n, first=None, last_positive=None):
    """A sampling grid: n levels then 0, float64, strictly decreasing, with the given ends."""
    assert sig.shape == (n + 1,) and sig.dtype == F64
    assert sig[-1] == 0 and bool((sig[:-1] > 0).all())
    assert bool((sig.diff() < 0).all()), sig
    if first is not None:
        assert math.isclose(float(sig[0]), first, rel_tol=1e-12)
    if last_positive is not None:
        assert math.isclose(float(sig[-2]), last_positive, rel_tol=1e-12)


FRAMES = [VPDiscrete.from_name("linear", 1000), VPDiscrete.from_name("scaled_linear", 1000), VPContinuous("cosine"),
          VPContinuous("linear", time_scale=1000), VE(time="sigma"), EDM(), Flow(), Flow(time_scale=1000)]


@pytest.mark.parametrize("frame", FRAMES, ids=lambda f: type(f).__name__)
@pytest.mark.parametrize("n", [1, 2, 7, 25])
def test_uniform_time_is_uniform_in_the_frames_time(frame, n):
    sig = grids.uniform_time_sigmas(frame, n)
    assert_grid(sig, n)
    assert math.isclose(float(sig[0]), frame.sigma_max, rel_tol=1e-9)
    if n > 1:
        assert math.isclose(float(sig[-2]), frame.sigma_min, rel_tol=1e-6)
        t = frame.time(sig[:-1])
        close(t.diff(), torch.full((n - 1,), float(t[1] - t[0]), dtype=F64), rtol=1e-6, atol=1e-9 * frame_time_scale(frame))


def frame_time_scale(frame):
    return float(frame.time(torch.tensor(frame.sigma_max, dtype=F64)).abs()) + 1


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # diffusers' np.array(tensor)
def test_uniform_time_of_a_discrete_model_is_diffusers_linspace():
    frame = VPDiscrete.from_name("linear", 1000)
    sched = EulerDiscreteScheduler(timestep_spacing="linspace")
    sched.alphas_cumprod = frame.alpha_bars.clone()  # diffusers' own are float32 products
    sched.set_timesteps(4)  # t = 999, 666, 333, 0: integers, where log- and linear interpolation agree
    close(grids.uniform_time_sigmas(frame, 4), sched.sigmas.to(F64), rtol=1e-6, atol=0)  # diffusers keeps float32 sigmas
    # in between, the step index interpolates log sigma (k-diffusion), not sigma (diffusers)
    sig = grids.uniform_time_sigmas(frame, 3)  # t = 999, 499.5, 0
    mid = (frame.sigmas[499].log() + frame.sigmas[500].log()).div(2).exp()
    close(sig[1], mid, rtol=1e-12, atol=0)


def test_uniform_time_of_edm_is_the_exponential_grid_and_bounds_are_checked():
    frame = EDM()
    close(grids.uniform_time_sigmas(frame, 9), grids.exponential_sigmas(9, frame.sigma_min, frame.sigma_max), rtol=1e-12, atol=0)
    frame = VPContinuous("cosine")
    sig = grids.uniform_time_sigmas(frame, 5, t_max=0.8, t_min=0.2)
    close(frame.time(sig[:-1]), torch.linspace(0.8, 0.2, 5, dtype=F64), rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="t_min"):
        grids.uniform_time_sigmas(frame, 5, t_max=0.2, t_min=0.8)
    with pytest.raises(ValueError, match="steps"):
        grids.uniform_time_sigmas(frame, 0)


@pytest.mark.parametrize("n,rho", [(1, 1.0), (10, 1.0), (10, 2.0), (10, 0.5), (40, 3.0)])
def test_polyexponential_is_k_diffusions_formula(n, rho):
    sig = grids.polyexponential_sigmas(n, 0.03, 80.0, rho)
    assert_grid(sig, n, first=80.0, last_positive=0.03 if n > 1 else None)
    ramp = torch.linspace(1, 0, n, dtype=F64) ** rho  # k-diffusion's get_sigmas_polyexponential
    close(sig[:-1], torch.exp(ramp * (math.log(80.0) - math.log(0.03)) + math.log(0.03)), rtol=1e-12, atol=0)
    if rho == 1.0:
        close(sig, grids.exponential_sigmas(n, 0.03, 80.0), rtol=1e-12, atol=0)
    if rho > 1:  # more levels at low noise than the exponential grid
        assert bool((sig[1:-2] < grids.exponential_sigmas(n, 0.03, 80.0)[1:-2]).all())


def test_custom_sigmas_are_validated_and_end_in_zero():
    close(grids.custom_sigmas([10.0, 3.0, 1.0]), torch.tensor([10.0, 3.0, 1.0, 0.0], dtype=F64), rtol=0, atol=0)
    close(grids.custom_sigmas(torch.tensor([10.0, 1.0, 0.0])), torch.tensor([10.0, 1.0, 0.0], dtype=F64), rtol=0, atol=0)
    close(grids.custom_sigmas([10.0, 1.0], final=None), torch.tensor([10.0, 1.0], dtype=F64), rtol=0, atol=0)
    assert grids.custom_sigmas(torch.tensor([5.0, 2.0], dtype=torch.float32)).dtype == F64
    for bad in ([1.0, 2.0], [2.0, 2.0], [2.0, float("nan")], [2.0, -1.0], [], [[2.0, 1.0]]):
        with pytest.raises(ValueError, match="sigmas"):
            grids.custom_sigmas(bad)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 10, 33])
def test_leap_grid_jumps_then_is_uniform_in_log_sigma(n):
    sig = grids.leap_sigmas(n, 0.02, 157.0, 2.0)
    assert_grid(sig, n, first=157.0, last_positive=0.02 if n > 1 else 157.0)
    if n > 2:
        assert math.isclose(float(sig[1]), 2.0, rel_tol=1e-12)
        steps = sig[1:-1].log().diff()
        close(steps, torch.full_like(steps, math.log(0.02 / 2.0) / (n - 2)), rtol=1e-10, atol=0)
    with pytest.raises(ValueError, match="sigma_leap"):
        grids.leap_sigmas(5, 0.02, 157.0, 200.0)


@pytest.mark.parametrize("n", [1, 2, 4, 5, 7, 10, 15, 20, 35, 50, 100])
def test_optimized_grid_shape_ends_and_table(n):
    sig = grids.optimized_sigmas(n, 157.4)
    assert_grid(sig, n, first=157.4)
    if n in grids.OPTIMIZED:
        leap, sigma_min = grids.OPTIMIZED[n]
        close(sig, grids.leap_sigmas(n, sigma_min, 157.4, leap), rtol=0, atol=0)
    # between tuned sizes the parameters move monotonically (log-linear in n)
    keys = sorted(grids.OPTIMIZED)
    if keys[0] < n < keys[-1] and n not in grids.OPTIMIZED:
        lo = max(k for k in keys if k < n)
        hi = min(k for k in keys if k > n)
        for j in (0, 1):
            a, b = grids.OPTIMIZED[lo][j], grids.OPTIMIZED[hi][j]
            value = float(sig[1]) if j == 0 else float(sig[-2])
            assert min(a, b) - 1e-12 <= value <= max(a, b) + 1e-12


def test_optimized_grid_stays_within_the_models_levels():
    sig = grids.optimized_sigmas(50, 14.6, sigma_min=0.029)  # Stable Diffusion's range
    assert_grid(sig, 50, first=14.6, last_positive=0.029)
    assert math.isclose(float(sig[1]), grids.OPTIMIZED[50][0], rel_tol=1e-12)
    sig = grids.optimized_sigmas(10, 157.0, sigma_min=3.0)  # the leap target is below the model's range
    assert_grid(sig, 10, first=157.0, last_positive=3.0)
    close(sig, grids.exponential_sigmas(10, 3.0, 157.0), rtol=0, atol=0)


def test_optimized_grid_below_its_leap_is_exponential():
    sig = grids.optimized_sigmas(10, 1.0)  # a model whose sigma_max is below every tuned leap
    assert_grid(sig, 10, first=1.0)
    close(sig[:-1].log().diff(), torch.full((9,), float(sig[1].log() - sig[0].log()), dtype=F64), rtol=1e-10, atol=0)


def test_optimized_grid_beats_the_standard_grids_on_a_held_out_mixture():
    """The tuned grid's claim, on a mixture it was not tuned on (seed 9), with the solver it was tuned for."""
    gm = GaussianMixture.random(16, 4, seed=9, mean_scale=0.25)
    frame = VPDiscrete.from_name("linear", 1000)
    denoiser = Denoiser(gm.network(frame, "eps"), frame, "eps")
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0), dtype=F64) * math.sqrt(1 + frame.sigma_max**2)
    exact = gm.exact_ode_solution(x, (frame.sigma_max, 0.0), rtol=1e-8, atol=1e-8)
    errors = {g: rmse_to_exact(sample_unipc(denoiser, x, grids.for_denoiser(denoiser, 5, grid=g), order=3), exact)
              for g in ("optimized", "karras", "exponential", "uniform_time", "timesteps")}
    assert errors["optimized"] < 0.8 * min(v for k, v in errors.items() if k != "optimized"), errors


# ----------------------------------------------------------------------------
# for_denoiser

@pytest.mark.parametrize("grid", [g for g in grids.GRIDS if g not in ("timesteps", "lcm")])  # discrete models only
@pytest.mark.parametrize("frame", [VPDiscrete.from_name("linear", 1000), VPContinuous("cosine"), EDM(), Flow()],
                         ids=lambda f: type(f).__name__)
def test_for_denoiser_every_grid_every_frame(grid, frame):
    denoiser = Denoiser(lambda x, t: x, frame, "eps")
    sig = grids.for_denoiser(denoiser, 8, grid=grid)
    assert_grid(sig, 8)
    if grid in ("karras", "exponential", "log_snr", "polyexponential", "uniform_time"):
        assert math.isclose(float(sig[0]), frame.sigma_max, rel_tol=1e-6)
        assert math.isclose(float(sig[-2]), frame.sigma_min, rel_tol=1e-6)
    if grid == "optimized":
        assert math.isclose(float(sig[0]), frame.sigma_max, rel_tol=1e-12)


def test_for_denoiser_names_map_to_their_functions():
    frame = VPDiscrete.from_name("linear", 1000)
    d = Denoiser(lambda x, t: x, frame, "eps")
    lo, hi = frame.sigma_min, frame.sigma_max
    close(grids.for_denoiser(d, 6, "log_snr"), grids.exponential_sigmas(6, lo, hi), rtol=0, atol=0)
    close(grids.for_denoiser(d, 6, "polyexponential", poly_rho=2.0), grids.polyexponential_sigmas(6, lo, hi, 2.0), rtol=0, atol=0)
    close(grids.for_denoiser(d, 6, "uniform_time"), grids.uniform_time_sigmas(frame, 6), rtol=0, atol=0)
    close(grids.for_denoiser(d, 6, "optimized"), grids.optimized_sigmas(6, hi, lo), rtol=0, atol=0)
    close(grids.for_denoiser(d, 6, "karras", rho=3.0), grids.karras_sigmas(6, lo, hi, 3.0), rtol=0, atol=0)
    close(grids.for_denoiser(d, 6), grids.timestep_sigmas(frame, grids.discrete_timesteps(1000, 6, "trailing")), rtol=0, atol=0)
    with pytest.raises(ValueError, match="optimized"):
        grids.for_denoiser(d, 6, "align_your_steps")
    with pytest.raises(ValueError, match="VPDiscrete"):
        grids.for_denoiser(Denoiser(lambda x, t: x, EDM(), "eps"), 6, "timesteps")
    assert schedules.flow_t(grids.for_denoiser(Denoiser(lambda x, t: x, Flow(), "flow"), 4, "uniform_time")[:-1]).diff().std() < 1e-9
