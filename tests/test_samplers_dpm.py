"""DPM-Solver, DPM-Solver++ and DEIS: against diffusers step by step, against closed-form and
reference ODE solutions (orders of convergence), against each other, and on their edge cases.

The diffusers harness here (:func:`diffusers_steps`) is shared by the UniPC and SDE tests."""
import math
import sys
import types

import numpy as np
import pytest
import torch
from diffusers import DEISMultistepScheduler, DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler
from scipy.integrate import solve_ivp
from test_samplers import SmoothNet, from_list, noise_list

from difflab.core import Denoiser, VPDiscrete, grids, schedules
from difflab.oracle import GaussianMixture, single_gaussian_ode
from difflab.samplers import dpm_solver, sample_ddim
from difflab.samplers.deis import SAMPLERS as DEIS_SAMPLERS, deis_coefficients, sample_deis
from difflab.samplers.dpm_solver import (sample_dpm_multistep, sample_dpm_singlestep, sample_dpm_solver,
                                         singlestep_orders)

F64 = torch.float64
# diffusers warns about its own deprecations (and numpy 2 ones when given float64 schedules)
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers.*"),
              pytest.mark.filterwarnings("ignore::FutureWarning:diffusers.*")]
T = 1000
SHAPE = (2, 3, 3)
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v"}
SAMPLERS = {**dpm_solver.SAMPLERS, **DEIS_SAMPLERS}


# ----------------------------------------------------------------------------
# The diffusers harness

class Float64Torch(types.ModuleType):
    """``torch`` as a diffusers scheduler module sees it, with ``float32`` meaning float64:
    DPMSolverMultistepScheduler.step casts the sample to float32, which would cap the comparison
    at ~1e-7 (measured: 1.3e-7 relative without this, ~1e-15 with it)."""

    def __getattr__(self, name):
        return torch.float64 if name == "float32" else getattr(torch, name)


def diffusers_steps(sched, sampler, steps, prediction, monkeypatch, draws=None):
    """Run diffusers' ``sched`` and difflab's ``sampler(denoiser, x, sigmas, **kw)`` from the same
    VP noise on the same grid, in float64; return (relative error of each step, the difflab
    noise source) with x compared in the canonical frame (x_vp / alpha, alpha = 1/sqrt(1 + s^2)).
    ``draws``: the noise of each step, handed to diffusers' ``randn_tensor`` and to difflab."""
    ab = schedules.discrete_alpha_bars("linear", T)
    net, frame = SmoothNet(SHAPE), VPDiscrete(ab)
    sched.alphas_cumprod = ab.clone()
    sched.set_timesteps(steps)
    last = 0.0 if float(sched.sigmas[-1]) == 0 else float(frame.sigmas[0])
    sigmas = grids.timestep_sigmas(frame, sched.timesteps, final=last)
    torch.testing.assert_close(sched.sigmas.to(F64), sigmas, rtol=1e-6, atol=0)  # same grid (theirs in float32)
    sched.sigmas = sigmas.clone()  # ... now in float64 too
    module = sys.modules[type(sched).__module__]
    monkeypatch.setattr(module, "torch", Float64Torch("torch"))
    if draws is not None:
        theirs_noise = from_list(draws)
        monkeypatch.setattr(module, "randn_tensor", lambda *a, **k: theirs_noise())
    x_vp = torch.randn((4,) + SHAPE, generator=torch.Generator().manual_seed(2), dtype=F64)
    theirs, sample = [], x_vp
    for i, t in enumerate(sched.timesteps):
        sample = sched.step(net(sample, t), t, sample).prev_sample
        theirs.append(sample * (1 + sigmas[i + 1] ** 2).sqrt())
    monkeypatch.undo()
    ours, ours_noise = [], from_list(draws or [])
    kw = {} if draws is None else {"noise": ours_noise}
    out = sampler(Denoiser(net, frame, PREDICTIONS[prediction]), x_vp * (1 + sigmas[0] ** 2).sqrt(), sigmas,
                  callback=lambda info: ours.append(info["x"]), **kw)
    assert len(ours) == len(theirs) == steps and torch.equal(out, ours[-1])
    return [((a - b).abs().max() / b.abs().max()).item() for a, b in zip(ours, theirs)], ours_noise


MULTISTEP = [  # algorithm, order, solver_type, prediction, spacing, steps
    ("dpmsolver++", 2, "midpoint", "epsilon", "linspace", 10),
    ("dpmsolver++", 2, "heun", "v_prediction", "trailing", 12),
    ("dpmsolver++", 3, "midpoint", "epsilon", "leading", 20),  # >= 15 steps: no lower-order final steps
    ("dpmsolver++", 3, "heun", "v_prediction", "linspace", 8),
    ("dpmsolver", 2, "midpoint", "epsilon", "linspace", 10),  # noise prediction: final sigma = sigma_min
    ("dpmsolver", 2, "heun", "epsilon", "trailing", 16),
    ("dpmsolver", 3, "midpoint", "v_prediction", "linspace", 12),
]


@pytest.mark.parametrize("algorithm,order,solver_type,prediction,spacing,steps", MULTISTEP)
def test_multistep_matches_diffusers(monkeypatch, algorithm, order, solver_type, prediction, spacing, steps):
    sched = DPMSolverMultistepScheduler(num_train_timesteps=T, solver_order=order, algorithm_type=algorithm,
                                        solver_type=solver_type, prediction_type=prediction, timestep_spacing=spacing,
                                        final_sigmas_type="zero" if algorithm == "dpmsolver++" else "sigma_min")

    def sampler(*a, **k):
        return sample_dpm_multistep(*a, order=order, predict_x0=algorithm == "dpmsolver++", solver_type=solver_type, **k)

    errors, _ = diffusers_steps(sched, sampler, steps, prediction, monkeypatch)
    assert max(errors) < 1e-10, errors


SINGLESTEP = [  # order, solver_type, algorithm, prediction, steps, lower_order_final
    (2, "midpoint", "dpmsolver++", "epsilon", 10, True),
    (2, "heun", "dpmsolver++", "v_prediction", 9, True),
    (3, "midpoint", "dpmsolver++", "epsilon", 11, True),
    (3, "heun", "dpmsolver++", "epsilon", 12, True),
    (3, "midpoint", "dpmsolver", "epsilon", 12, False),  # final sigma_min: four whole [1, 2, 3] blocks
    (3, "heun", "dpmsolver", "v_prediction", 10, True),
]


@pytest.mark.parametrize("order,solver_type,algorithm,prediction,steps,lower_order_final", SINGLESTEP)
def test_singlestep_matches_diffusers(monkeypatch, order, solver_type, algorithm, prediction, steps, lower_order_final):
    sched = DPMSolverSinglestepScheduler(num_train_timesteps=T, solver_order=order, algorithm_type=algorithm,
                                         solver_type=solver_type, prediction_type=prediction,
                                         lower_order_final=lower_order_final,
                                         final_sigmas_type="zero" if algorithm == "dpmsolver++" else "sigma_min")

    def sampler(*a, **k):
        return sample_dpm_singlestep(*a, order=order, predict_x0=algorithm == "dpmsolver++", solver_type=solver_type,
                                     lower_order_final=lower_order_final, **k)

    errors, _ = diffusers_steps(sched, sampler, steps, prediction, monkeypatch)
    assert max(errors) < 1e-10, errors
    final_zero = algorithm == "dpmsolver++"
    assert sched.order_list == singlestep_orders(steps, order, sched.config.lower_order_final, final_zero)


@pytest.mark.parametrize("order,prediction,spacing,steps", [(1, "epsilon", "linspace", 10),
                                                            (2, "v_prediction", "trailing", 12),
                                                            (3, "epsilon", "leading", 20), (3, "epsilon", "linspace", 8)])
def test_deis_matches_diffusers(monkeypatch, order, prediction, spacing, steps):
    sched = DEISMultistepScheduler(num_train_timesteps=T, solver_order=order, prediction_type=prediction,
                                   timestep_spacing=spacing)
    errors, _ = diffusers_steps(sched, lambda *a, **k: sample_deis(*a, order=order, **k), steps, prediction,
                                monkeypatch)
    assert max(errors) < 1e-10, errors


def test_deis_coefficients_integrate_the_lagrange_polynomials():
    rhos, rho_t = [2.0, 3.0, 5.0], 1.2
    nodes, weights = np.polynomial.legendre.leggauss(20)  # Gauss-Legendre on [rho_t, rho_s0]
    rho = (rho_t - rhos[0]) / 2 * nodes + (rho_t + rhos[0]) / 2
    for k in (1, 2, 3):
        u = np.log(rhos[:k])
        for j, c in enumerate(deis_coefficients(rho_t, rhos[:k])):
            l_j = np.prod([(np.log(rho) - u[m]) / (u[j] - u[m]) for m in range(k) if m != j], axis=0)
            assert c == pytest.approx((weights * l_j).sum() * (rho_t - rhos[0]) / 2, rel=1e-12, abs=1e-14)
    assert deis_coefficients(rho_t, rhos[:1]) == pytest.approx([rho_t - rhos[0]])  # order 1: DDIM


# ----------------------------------------------------------------------------
# Orders of convergence against exact ODE solutions

def exact_gaussian(sigma_max, sigma_min=0.002):
    d, s = 4, 0.5
    mu = torch.linspace(-1, 2, d, dtype=F64)
    gm = GaussianMixture([1.0], mu[None], [s**2])
    x80 = 80.0 * torch.randn(32, d, generator=torch.Generator().manual_seed(0), dtype=F64)
    x = single_gaussian_ode(x80, 80.0, sigma_max, mu, s)  # the exact state when starting mid-way
    return gm.denoiser, x, single_gaussian_ode(x, sigma_max, sigma_min, mu, s)


def mixture_reference(sigma_max=80.0, sigma_min=0.002, seed=1):
    """A two-component mixture (non-linear denoiser) and its ODE solution from DOP853 at rtol 1e-12
    in lambda = -log sigma, where the ODE is dx/dlambda = D(x, e^-lambda) - x."""
    gm = GaussianMixture([0.3, 0.7], [[-1.0, 0.5], [1.5, -0.5]], [0.2**2, 0.3**2])
    x = sigma_max * torch.randn(16, 2, generator=torch.Generator().manual_seed(seed), dtype=F64)

    def rhs(lam, y):
        xt = torch.from_numpy(y).reshape(x.shape)
        return (gm.denoiser(xt, math.exp(-lam)) - xt).reshape(-1).numpy()

    sol = solve_ivp(rhs, (-math.log(sigma_max), -math.log(sigma_min)), x.reshape(-1).numpy(), method="DOP853",
                    rtol=1e-12, atol=1e-12)
    return gm.denoiser, x, torch.from_numpy(sol.y[:, -1]).reshape(x.shape)


MIXTURE = mixture_reference()


def orders(sampler, denoiser, x, exact, sigma_max, ns, sigma_min=0.002, **kw):
    """Errors (RMSE) on grids uniform in lambda from sigma_max to sigma_min, and the observed orders."""
    errors = [(sampler(denoiser, x, grids.exponential_sigmas(n + 1, sigma_min, sigma_max)[:-1], **kw) - exact)
              .pow(2).mean().sqrt().item() for n in ns]
    return errors, [math.log2(a / b) for a, b in zip(errors, errors[1:])]


ODE_ORDERS = [  # name, keywords, expected order band
    ("dpm_solver_1", {}, (0.8, 1.3)),
    ("dpm_solver_2", {}, (1.7, 2.4)),
    ("dpm_solver_3", {}, (2.5, 4.5)),
    ("dpmpp_2s", {}, (1.7, 2.4)),
    ("dpm_multistep_2", {}, (1.7, 2.4)),
    ("dpm_multistep_3", {"taylor_d2": True}, (2.5, 4.5)),
    ("dpmpp_2m", {}, (1.7, 2.4)),
    ("dpmpp_2m", {"solver_type": "heun"}, (1.7, 2.4)),
    ("dpmpp_3m", {"taylor_d2": True}, (2.5, 4.5)),
    ("deis", {"order": 1}, (0.8, 1.3)),
    ("deis", {"order": 2}, (1.7, 2.4)),
    ("deis", {"order": 3}, (2.5, 4.5)),
]


@pytest.mark.parametrize("name,kw,band", ODE_ORDERS)
def test_order_of_convergence_on_the_gaussian(name, kw, band):
    denoiser, x, exact = exact_gaussian(80.0)
    errors, p = orders(SAMPLERS[name], denoiser, x, exact, 80.0, (16, 32, 64), **kw)
    assert all(band[0] < q < band[1] for q in p), (errors, p)


@pytest.mark.parametrize("name,kw,band", ODE_ORDERS)
def test_order_of_convergence_on_a_gaussian_mixture(name, kw, band):
    denoiser, x, exact = MIXTURE
    errors, p = orders(SAMPLERS[name], denoiser, x, exact, 80.0, (32, 64, 128), **kw)
    assert band[0] < p[-1] < band[1], (errors, p)  # the last doubling: past the pre-asymptotic range



@pytest.mark.parametrize("name", ["dpm_multistep_3", "dpmpp_3m"])
def test_reference_third_order_multistep_is_second_order(name):
    """D2 = (D1_0 - D1_1)/(r0 + r1) estimates h^2 m''/2 but the reference formula (diffusers,
    k-diffusion, Lu et al.'s code) weights it as h^2 m'': the method converges at order 2."""
    denoiser, x, exact = exact_gaussian(80.0)
    errors, p = orders(SAMPLERS[name], denoiser, x, exact, 80.0, (64, 128, 256))
    taylor, _ = orders(SAMPLERS[name], denoiser, x, exact, 80.0, (64, 128, 256), taylor_d2=True)
    assert all(1.8 < q < 2.3 for q in p), (errors, p)
    assert errors[-1] > 50 * taylor[-1], (errors, taylor)


@pytest.mark.parametrize("name,kw,band", [
    ("dpm_solver_3", {}, (2.5, 4.5)), ("dpmpp_2m", {}, (1.7, 2.4)),
    # third-order multistep restarts with a first-order step; mid-way its local error O(h^2) is
    # no longer negligible, so a mid-grid start is globally second order
    ("dpmpp_3m", {"taylor_d2": True}, (1.7, 2.6)), ("deis", {"order": 3}, (1.7, 2.6))])
def test_starting_mid_grid_from_the_exact_state(name, kw, band):
    denoiser, x, exact = exact_gaussian(2.0)
    errors, p = orders(SAMPLERS[name], denoiser, x, exact, 2.0, (16, 32, 64), **kw)
    assert all(band[0] < q < band[1] for q in p), (errors, p)
    assert errors[-1] < 1e-3


# ----------------------------------------------------------------------------
# The solvers against each other

def test_deis_is_the_exponential_integrator_with_the_same_polynomial():
    """DEIS's Lagrange polynomial in log rho = lambda-polynomial DPM-Solver with the phi weights:
    order 2 = heun-type multistep DPM-Solver-2, order 3 = multistep DPM-Solver-3 with the Taylor
    D2 weight (an independent check of ``taylor_d2``) and heun-type warm-up and final steps."""
    denoiser, x, _ = MIXTURE
    sigmas = grids.karras_sigmas(12, 0.01, 80.0)
    torch.testing.assert_close(sample_deis(denoiser, x, sigmas, order=2),
                               sample_dpm_multistep(denoiser, x, sigmas, order=2, predict_x0=False, solver_type="heun"),
                               rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sample_deis(denoiser, x, sigmas, order=3),
                               sample_dpm_multistep(denoiser, x, sigmas, order=3, predict_x0=False, solver_type="heun",
                                                    taylor_d2=True), rtol=1e-10, atol=1e-10)
    assert not torch.allclose(sample_deis(denoiser, x, sigmas, order=3),
                              sample_dpm_multistep(denoiser, x, sigmas, order=3, predict_x0=False, solver_type="heun"),
                              rtol=1e-6)


def test_first_order_solvers_are_ddim():
    denoiser, x, _ = MIXTURE
    sigmas = grids.karras_sigmas(10, 0.01, 80.0)
    ddim = sample_ddim(denoiser, x, sigmas)
    for out in (SAMPLERS["dpm_solver_1"](denoiser, x, sigmas), sample_deis(denoiser, x, sigmas, order=1),
                sample_dpm_multistep(denoiser, x, sigmas, order=1, predict_x0=True),
                sample_dpm_multistep(denoiser, x, sigmas, order=1, predict_x0=False)):
        torch.testing.assert_close(out, ddim, rtol=1e-12, atol=1e-12)


def test_dpmpp_2s_is_k_diffusions_step():
    """k-diffusion's sample_dpmpp_2s_ancestral at eta=0: u = (s_1/s) x - expm1(-h/2) D(x, s),
    x_next = (s_next/s) x - expm1(-h) D(u, s_1), s_1 = sqrt(s s_next) (lambda midpoint)."""
    denoiser, x, _ = MIXTURE
    s, s_next = 3.0, 0.7
    h = math.log(s / s_next)
    s1 = math.sqrt(s * s_next)
    u = (s1 / s) * x - math.expm1(-h / 2) * denoiser(x, s)
    ref = (s_next / s) * x - math.expm1(-h) * denoiser(u, s1)
    out = SAMPLERS["dpmpp_2s"](denoiser, x, torch.tensor([s, s_next], dtype=F64))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_grid_stages_with_lambda_points_are_the_papers_dpm_solver_3():
    """diffusers' pattern (grid points as stages) on a grid holding the lambda_s + h/3, + 2h/3
    points of a coarse grid is Algorithm 2 on the coarse grid (solver_type='dpmsolver')."""
    denoiser, x, _ = MIXTURE
    coarse = grids.exponential_sigmas(5, 0.01, 40.0)[:-1] ** 1.3 / 40.0**0.3  # not uniform in lambda
    lam = -coarse.log()
    fine = torch.stack([lam[:-1], lam[:-1] + (lam[1:] - lam[:-1]) / 3, lam[:-1] + 2 * (lam[1:] - lam[:-1]) / 3], 1)
    fine = torch.cat([(-fine.reshape(-1)).exp(), coarse[-1:]])
    states = []
    paper = sample_dpm_solver(denoiser, x, coarse, order=3, callback=lambda d: states.append(d["x"]))
    steps = []
    grid = sample_dpm_singlestep(denoiser, x, fine, order=3, predict_x0=False, solver_type="dpmsolver",
                                 lower_order_final=False, callback=lambda d: steps.append(d["x"]))
    torch.testing.assert_close(grid, paper, rtol=1e-12, atol=1e-12)
    for k, state in enumerate(states):
        torch.testing.assert_close(steps[3 * k + 2], state, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------
# Edge cases and the contract

def test_step_to_zero_nfe_and_callbacks():
    gm = GaussianMixture([0.5, 0.5], [[-1.0, 0.0], [1.0, 1.0]], [0.1, 0.2])
    x = 3 * torch.randn(8, 2, generator=torch.Generator().manual_seed(4), dtype=F64)
    nfe = {"dpm_solver_2": 2, "dpm_solver_3": 3, "dpmpp_2s": 2, "dpmpp_2s_ancestral": 2}
    for name, sampler in SAMPLERS.items():
        assert torch.equal(sampler(gm.denoiser, x, torch.tensor([3.0, 0.0])), gm.denoiser(x, 3.0)), name
        calls, steps = [], []

        def counted(x_, sigma):
            calls.append(sigma)
            return gm.denoiser(x_, sigma)

        sampler(counted, x, grids.karras_sigmas(5, 0.01, 3.0), callback=steps.append)
        assert len(calls) == 4 * nfe.get(name, 1) + 1, name  # the step to 0 is one evaluation
        assert [s["i"] for s in steps] == list(range(5)) and steps[-1]["sigma_next"] == 0.0
        assert torch.equal(steps[-1]["x"], steps[-1]["denoised"]), name


def test_single_step_samplers_continue_the_same_trajectory_mid_grid():
    gm = GaussianMixture([0.5, 0.5], [[-1.0, 0.0], [1.0, 1.0]], [0.1, 0.2])
    x = 20 * torch.randn(8, 2, generator=torch.Generator().manual_seed(5), dtype=F64)
    sigmas, draws, k = grids.karras_sigmas(10, 0.01, 20.0), noise_list(10, (8, 2)), 4
    for name in ("dpm_solver_1", "dpm_solver_2", "dpm_solver_3", "dpmpp_2s", "dpmpp_2s_ancestral"):
        states = []
        full = SAMPLERS[name](gm.denoiser, x, sigmas, noise=from_list(draws), callback=states.append)
        rest = SAMPLERS[name](gm.denoiser, states[k - 1]["x"], sigmas[k:], noise=from_list(draws[k:]))
        torch.testing.assert_close(rest, full, rtol=0, atol=1e-14)


def test_multistep_restarts_with_a_first_order_step():
    gm = GaussianMixture([0.5, 0.5], [[-1.0, 0.0], [1.0, 1.0]], [0.1, 0.2])
    x = 2 * torch.randn(8, 2, generator=torch.Generator().manual_seed(6), dtype=F64)
    sigmas = torch.tensor([2.0, 1.0, 0.5, 0.25], dtype=F64)
    for name in ("dpmpp_2m", "dpmpp_3m", "dpm_multistep_2", "dpm_multistep_3", "deis"):
        steps = []
        SAMPLERS[name](gm.denoiser, x, sigmas, callback=steps.append)
        torch.testing.assert_close(steps[0]["x"], sample_ddim(gm.denoiser, x, sigmas[:2]), rtol=1e-12, atol=1e-12)
        assert not torch.allclose(steps[1]["x"], sample_ddim(gm.denoiser, steps[0]["x"], sigmas[1:3]), rtol=1e-6)


def test_lower_order_final_follows_diffusers_rule():
    # 10 steps: the last step first order, the one before second order; 15 steps: untouched
    assert [dpm_solver.step_order(3, i, 10, True) for i in range(10)] == [1, 2, 3, 3, 3, 3, 3, 3, 2, 1]
    assert [dpm_solver.step_order(3, i, 15, True) for i in range(15)] == [1, 2] + [3] * 13
    assert [dpm_solver.step_order(2, i, 5, False) for i in range(5)] == [1, 2, 2, 2, 2]
    assert singlestep_orders(9, 3, True, True) == [1, 2, 3, 1, 2, 3, 1, 2, 1]
    assert singlestep_orders(8, 2, True, False) == [1, 2, 1, 2, 1, 2, 1, 1]


def test_float32_extra_args_and_bad_arguments():
    gm = GaussianMixture([1.0], [[0.0, 0.0]], [1.0])
    x = torch.randn(4, 2)
    seen = []

    def denoiser(x_, sigma, *, class_labels):
        assert sigma.shape == (x_.shape[0],) and sigma.dtype == x_.dtype
        seen.append(class_labels)
        return gm.denoiser(x_, sigma)

    for name, sampler in SAMPLERS.items():
        out = sampler(denoiser, x, grids.karras_sigmas(4, 0.1, 1.0), extra_args={"class_labels": 7}, progress=True)
        assert out.dtype == torch.float32 and torch.isfinite(out).all(), name
        for bad in ([1.0, 2.0, 0.0], [2.0, 2.0, 0.0], [2.0, float("nan"), 0.0], [2.0, -1.0], []):
            with pytest.raises(ValueError, match="sigmas"):
                sampler(gm.denoiser, x, torch.tensor(bad))
    assert set(seen) == {7}
    D, grid = gm.denoiser, torch.tensor([1.0, 0.0])
    for call, match in [(lambda: sample_dpm_multistep(D, x, grid, order=4), "order"),
                        (lambda: sample_dpm_multistep(D, x, grid, solver_type="bh2"), "solver_type"),
                        (lambda: sample_dpm_multistep(D, x, grid, predict_x0=False, eta=1.0), "data prediction"),
                        (lambda: sample_dpm_solver(D, x, grid, order=3, r=(0.7, 0.3)), "r="),
                        (lambda: sample_dpm_solver(D, x, grid, solver_type="euler"), "solver_type"),
                        (lambda: sample_dpm_singlestep(D, x, torch.tensor([3.0, 2.0, 1.0, 0.5]), order=2,
                                                       lower_order_final=False), "multiple"),
                        (lambda: sample_deis(D, x, grid, order=4), "order")]:
        with pytest.raises(ValueError, match=match):
            call()
