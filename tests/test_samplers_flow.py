"""Flow-matching Euler and Heun: diffusers parity step by step, the relation to the sigma-frame
samplers, convergence order on the closed-form ODE, any parameterization, edge cases."""
import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler
from test_samplers import SmoothNet, from_list
from test_samplers_euler import TimeSensitiveNet, rel_err

from difflab.core import Denoiser, Flow, VPContinuous, append_dims, grids, params, schedules
from difflab.core.denoiser import FLOW_SIGMA_ONE, SIGMA_MAX_FINITE
from difflab.oracle import GaussianMixture, single_gaussian_ode
from difflab.samplers import sample_ddim
from difflab.samplers.euler import sample_euler, sample_heun
from difflab.samplers.flow import SAMPLERS, sample_flow_euler, sample_flow_heun

F64 = torch.float64
SCHEDULERS = {"flow_euler": FlowMatchEulerDiscreteScheduler, "flow_heun": FlowMatchHeunDiscreteScheduler}


# ----------------------------------------------------------------------------
# Parity with diffusers' flow-matching schedulers, every step, float64 velocity model.
#
# diffusers' `sigmas` are flow times t in [0, 1] and its `sample` is x_t = (1 - t) x0 + t eps;
# ours are canonical sigma = t / (1 - t) and x = x_t / (1 - t). Their grid starts at t = 1; ours
# cannot (sigma = inf) and clamps it to sigma = 4096, i.e. t = 4096/4097 = 1 - 2.4e-4 (see
# core.denoiser). That first level is the only difference: from a grid that starts below 1 the
# two agree to float32 rounding (diffusers upcasts the sample to float32 in `step`).

def flow_run(name, net, shift, t_max, steps, x_t, exact_one=False):
    sched = SCHEDULERS[name](num_train_timesteps=1000, shift=shift)
    sched.sigma_max = t_max  # the top of the grid; set_timesteps spaces t from it down to sigma_min
    sched.set_timesteps(steps)
    theirs, sample = [], x_t
    for t in sched.timesteps:
        sample = sched.step(net(sample, t), t, sample).prev_sample
        theirs.append(sample)
    if name == "flow_heun":  # calls 2i (predictor) and 2i + 1 (corrector) make step i; the last is Euler
        theirs = [theirs[min(2 * i + 1, len(theirs) - 1)] for i in range(steps)]
    ts = torch.unique_consecutive(sched.sigmas).to(F64)
    sigmas = schedules.flow_sigma(ts).clamp(max=SIGMA_MAX_FINITE)  # t = 1 -> the largest finite sigma
    if exact_one and ts[0] == 1:
        sigmas[0] = FLOW_SIGMA_ONE  # ... or held exactly, as the flow samplers can
    denoiser = Denoiser(net, Flow(time_scale=1000), "flow")
    ours = []
    SAMPLERS[name](denoiser, x_t * (1 + sigmas[0]), sigmas,
                   callback=lambda info: ours.append(info["x"] / (1 + info["sigma_next"])))  # canonical -> x_t
    assert len(ours) == len(theirs) == steps
    return [rel_err(a, b) for a, b in zip(ours, theirs)]


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_matches_diffusers_step_by_step(name, shift):
    shape = (2, 3, 3)
    x_t = torch.randn((4,) + shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    errors = flow_run(name, TimeSensitiveNet(shape), shift, 0.9, 10, x_t)
    assert max(errors) < 1e-5, errors


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_from_t_one_the_only_difference_is_the_clamped_first_level(name):
    shape = (2, 3, 3)
    x_t = torch.randn((4,) + shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    errors = flow_run(name, SmoothNet(shape), 1.0, 1.0, 10, x_t)
    # The first step starts from t = 1 - 1/4097 instead of 1: O(2.4e-4) relative, made once and
    # carried along (later steps add nothing of their own).
    assert 1e-5 < errors[0] < 1e-3 and max(errors) < 1.5 * errors[0], errors


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_from_exact_t_one_matches_diffusers_step_by_step(name):
    """FLOW_SIGMA_ONE = 2**53: t = s / (1 + s) is exactly 1, x * 2**53 / (1 + 2**53) is exactly x,
    so the flow samplers start where diffusers does and agree to rounding from the first step."""
    assert schedules.flow_t(torch.tensor(FLOW_SIGMA_ONE, dtype=F64)) == 1.0
    shape = (2, 3, 3)
    x_t = torch.randn((4,) + shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    errors = flow_run(name, SmoothNet(shape), 1.0, 1.0, 10, x_t, exact_one=True)
    assert max(errors) < 1e-5, errors
    # a grid from t = 1 exactly, for the flow samplers only
    exact = grids.flow_sigmas(10, shift=3.0, exact_one=True)
    assert exact[0] == FLOW_SIGMA_ONE and torch.equal(exact[1:], grids.flow_sigmas(10, shift=3.0)[1:])
    with pytest.raises(ValueError, match="flow_euler"):
        sample_euler(SmoothNet(shape), x_t * FLOW_SIGMA_ONE, exact)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_sigmas_is_diffusers_grid(shift):
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    sched.set_timesteps(12)
    ours = grids.flow_sigmas(12, shift=shift, t_min=sched.sigma_min)  # diffusers' t_min is its shifted 1/1000
    assert ours[0] == SIGMA_MAX_FINITE and ours[-1] == 0 and sched.sigmas[0] == 1
    torch.testing.assert_close(schedules.flow_t(ours[1:-1]), sched.sigmas[1:-1].to(F64), rtol=2e-7, atol=0)


# ----------------------------------------------------------------------------
# Relation to the sigma-frame samplers

def test_flow_euler_is_euler_and_ddim_but_flow_heun_is_not_heun():
    gm = GaussianMixture([0.5, 0.5], [[-1.0, 0.0], [1.0, 1.0]], [0.1, 0.2])
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    for sigmas in (grids.karras_sigmas(10, 0.01, 20.0), grids.flow_sigmas(10, shift=3.0)):
        x_start = x * float(sigmas[0])
        flow = sample_flow_euler(gm.denoiser, x_start, sigmas)
        assert rel_err(flow, sample_euler(gm.denoiser, x_start, sigmas)) < 1e-12
        assert rel_err(flow, sample_ddim(gm.denoiser, x_start, sigmas)) < 1e-12
        # first-order steps coincide across frames; the trapezoidal corrector does not
        assert rel_err(sample_flow_heun(gm.denoiser, x_start, sigmas), sample_heun(gm.denoiser, x_start, sigmas)) > 1e-3


CONVERGENCE = {"flow_euler": (0.8, 1.3), "flow_heun": (1.6, 2.5)}  # flow_heun: 1.70 at 8 -> 16 steps


@pytest.mark.parametrize("grid", ["t_uniform", "karras"])
@pytest.mark.parametrize("name", sorted(CONVERGENCE))
def test_convergence_order_on_the_exact_ode(name, grid):
    d, s = 4, 0.5
    mu = torch.linspace(-1, 2, d, dtype=F64)
    gm = GaussianMixture([1.0], mu[None], [s**2])
    z = torch.randn(64, d, generator=torch.Generator().manual_seed(0), dtype=F64)
    errors = []
    for n in (8, 16, 32, 64):
        if grid == "t_uniform":  # the flow grid without its clamped t = 1 and its final 0
            sigmas = schedules.flow_sigma(torch.linspace(0.99, 0.01, n + 1, dtype=F64))
        else:
            sigmas = grids.karras_sigmas(n, 0.002, 80.0)[:-1]
        x = z * float(sigmas[0])
        exact = single_gaussian_ode(x, float(sigmas[0]), float(sigmas[-1]), mu, s)
        errors.append((SAMPLERS[name](gm.denoiser, x, sigmas) - exact).pow(2).mean().sqrt().item())
    orders = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    lo, hi = CONVERGENCE[name]
    assert all(lo < p < hi for p in orders), (errors, orders)


def oracle_net(gm, frame, prediction):
    """A network that outputs the exact ``prediction`` of data ``gm`` in ``frame``'s own scale."""

    def net(x_in, t):
        sigma = frame.sigma(t).to(x_in.dtype)
        alpha = append_dims(frame.scale(sigma), x_in.ndim)
        sigma_in = alpha * append_dims(sigma, x_in.ndim)
        x = x_in / alpha
        x0 = gm.denoiser(x, sigma)
        return params.from_x0_eps(x0, (x_in - alpha * x0) / sigma_in, prediction, alpha, sigma_in)

    return net


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_any_parameterization_gives_the_same_samples(name):
    gm = GaussianMixture([0.5, 0.5], [[-1.0, 0.0], [1.0, 1.0]], [0.1, 0.2])
    sigmas = grids.flow_sigmas(12, shift=3.0)
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(3), dtype=F64) * float(sigmas[0] + 1)
    reference = SAMPLERS[name](gm.denoiser, x, sigmas)
    for frame, prediction in [(Flow(time_scale=1000), "flow"), (Flow(), "eps"), (Flow(), "v"), (Flow(), "x0"),
                              (VPContinuous("cosine"), "v"), (VPContinuous("cosine"), "eps")]:
        out = SAMPLERS[name](Denoiser(oracle_net(gm, frame, prediction), frame, prediction), x, sigmas)
        assert rel_err(out, reference) < 1e-8, (type(frame).__name__, prediction)


# ----------------------------------------------------------------------------
# Edge cases

@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_step_to_zero_and_mid_grid(name):
    gm = GaussianMixture([0.5, 0.5], [[-1.0, 0.0], [1.0, 1.0]], [0.1, 0.2])
    x = 3 * torch.randn(8, 2, generator=torch.Generator().manual_seed(4), dtype=F64)
    assert torch.equal(SAMPLERS[name](gm.denoiser, x, torch.tensor([3.0, 0.0])), gm.denoiser(x, 3.0))
    sigmas = grids.flow_sigmas(10, shift=3.0)
    x = x * float(sigmas[0])
    states = []
    full = SAMPLERS[name](gm.denoiser, x, sigmas, callback=states.append)
    assert [s["i"] for s in states] == list(range(10)) and torch.equal(states[-1]["x"], states[-1]["denoised"])
    rest = SAMPLERS[name](gm.denoiser, states[3]["x"], sigmas[4:])
    torch.testing.assert_close(rest, full, rtol=0, atol=1e-14)


def test_contract_dtype_extra_args_and_bad_input():
    gm = GaussianMixture([1.0], [[0.0, 0.0]], [1.0])
    for name, sampler in SAMPLERS.items():
        sigmas = grids.flow_sigmas(4)
        out = sampler(gm.denoiser, torch.randn(4, 2) * float(sigmas[0]), sigmas)
        assert out.dtype == torch.float32 and bool(torch.isfinite(out).all()), name
        seen = []

        def denoiser(x, sigma, *, class_labels):
            assert sigma.shape == (x.shape[0],) and sigma.dtype == x.dtype
            seen.append(class_labels)
            return torch.zeros_like(x)

        never = from_list([])
        sampler(denoiser, torch.ones(2, 3), torch.tensor([2.0, 1.0, 0.0]), noise=never,
                extra_args={"class_labels": 7}, progress=True)
        assert seen and all(v == 7 for v in seen) and never.taken == 0
        for bad in ([1.0, 2.0, 0.0], [2.0, 2.0, 0.0], [2.0, float("inf"), 0.0], [2.0, -1.0], []):
            with pytest.raises(ValueError, match="sigmas"):
                sampler(gm.denoiser, torch.zeros(2, 2), torch.tensor(bad))
