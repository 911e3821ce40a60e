"""Euler, Heun, DPM-2, ancestral Euler and LMS: diffusers parity step by step, convergence order on
the closed-form ODE, the stationary distribution of the stochastic ones, and edge cases."""
import math

import pytest
import torch
from diffusers import (EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler,
                       LMSDiscreteScheduler)
from diffusers.schedulers import scheduling_euler_ancestral_discrete
from scipy import integrate, stats
from test_samplers import SmoothNet, from_list, noise_list

from difflab.core import Denoiser, SampleNoise, VPDiscrete, grids, schedules
from difflab.oracle import GaussianMixture, single_gaussian_ode
from difflab.samplers import sample_ddim
from difflab.samplers.euler import SAMPLERS as EULER_SAMPLERS
from difflab.samplers.euler import sample_euler, sample_euler_ancestral, sample_heun
from difflab.samplers.lms import SAMPLERS as LMS_SAMPLERS
from difflab.samplers.lms import lms_coefficients, sample_lms

F64 = torch.float64
ALL = {**EULER_SAMPLERS, **LMS_SAMPLERS}
DETERMINISTIC = ("euler", "heun", "dpm_2")


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# ----------------------------------------------------------------------------
# Parity with diffusers' k-diffusion-style schedulers, every step, float64 model.
#
# Their `sample` is our canonical x (x = x0 + sigma eps; scale_model_input divides by
# sqrt(sigma^2 + 1)) and their `sigmas` are our grid. They hand the model a *timestep*, ours is
# VPDiscrete.time(sigma), which interpolates the step index linearly in log sigma. The two agree
# when the timesteps are integers (spacing "leading"/"trailing", or "linspace" when n - 1 divides
# T - 1) and with use_karras_sigmas, whose timesteps come from the same log-sigma interpolation
# (_sigma_to_t). They do not agree for fractional "linspace" timesteps, where diffusers
# interpolates sigma linearly in t (interpolation_type="linear"), nor with
# interpolation_type="log_linear", whose sigmas are not even those of its timesteps.

class TimeSensitiveNet(SmoothNet):
    """SmoothNet with 20x its dependence on t, so that a model time off by a small fraction of a
    training step shows well above the 1e-5 tolerance."""

    def __call__(self, x_in, t):
        return super().__call__(x_in, 20 * torch.as_tensor(t, dtype=F64))


V = "v_prediction"
PARITY = [  # scheduler, sampler, steps, scheduler config
    (EulerDiscreteScheduler, "euler", 10, dict(timestep_spacing="trailing")),
    (EulerDiscreteScheduler, "euler", 25, dict(timestep_spacing="leading", steps_offset=1, prediction_type=V)),
    (EulerDiscreteScheduler, "euler", 10, dict(timestep_spacing="linspace", interpolation_type="linear")),  # 999/9
    (EulerDiscreteScheduler, "euler", 20, dict(use_karras_sigmas=True)),
    (EulerDiscreteScheduler, "euler", 20, dict(use_karras_sigmas=True, prediction_type=V)),
    (HeunDiscreteScheduler, "heun", 10, dict(timestep_spacing="trailing")),
    (HeunDiscreteScheduler, "heun", 15, dict(use_karras_sigmas=True, prediction_type=V)),
    (EulerAncestralDiscreteScheduler, "euler_ancestral", 20, dict(timestep_spacing="trailing")),
    (EulerAncestralDiscreteScheduler, "euler_ancestral", 20, dict(timestep_spacing="leading", prediction_type=V)),
    (LMSDiscreteScheduler, "lms", 20, dict(timestep_spacing="trailing")),
    (LMSDiscreteScheduler, "lms", 25, dict(use_karras_sigmas=True, prediction_type=V)),
]


def run_diffusers(sched, net, x):
    """The pipeline loop of a k-diffusion-style scheduler; (prev_sample, pred_original) per call."""
    out, sample = [], x
    for t in sched.timesteps:
        o = sched.step(net(sched.scale_model_input(sample, t), t), t, sample)
        sample = o.prev_sample
        out.append((sample, o.pred_original_sample))
    return out


@pytest.mark.parametrize("scheduler,name,steps,config", PARITY, ids=lambda v: getattr(v, "__name__", None))
def test_matches_diffusers_step_by_step(monkeypatch, scheduler, name, steps, config):
    T, shape = 1000, (2, 3, 3)
    ab = schedules.discrete_alpha_bars("linear", T)
    net = TimeSensitiveNet(shape)
    draws = noise_list(steps, (4,) + shape)
    if name == "euler_ancestral":
        theirs_noise = from_list(draws)
        monkeypatch.setattr(scheduling_euler_ancestral_discrete, "randn_tensor", lambda *a, **k: theirs_noise())

    sched = scheduler(num_train_timesteps=T, **config)
    sched.alphas_cumprod = ab.clone()  # the same float64 schedule; their sigmas still end up float32
    sched.set_timesteps(steps)
    sigmas = torch.unique_consecutive(sched.sigmas).to(F64)  # Heun repeats each inner level
    assert len(sigmas) == steps + 1 and sigmas[-1] == 0
    x = sigmas[0] * torch.randn((4,) + shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    theirs = run_diffusers(sched, net, x)
    if name == "heun":  # calls 2i (predictor, which also gives x0_hat) and 2i + 1 (corrector) make step i
        theirs = [(theirs[min(2 * i + 1, len(theirs) - 1)][0], theirs[2 * i][1]) for i in range(steps)]

    prediction = {"epsilon": "eps", "v_prediction": "v"}[config.get("prediction_type", "epsilon")]
    denoiser = Denoiser(net, VPDiscrete(ab), prediction)
    ours, ours_noise = [], from_list(draws)
    record = lambda info: ours.append((info["x"], info["denoised"]))  # noqa: E731
    out = ALL[name](denoiser, x, sigmas, noise=ours_noise, callback=record)

    assert len(ours) == len(theirs) == steps
    errors = [max(rel_err(xo, xt), rel_err(do, dt)) for (xo, do), (xt, dt) in zip(ours, theirs)]
    assert max(errors) < 1e-5, errors
    assert torch.equal(out, ours[-1][0])
    if name == "euler_ancestral":
        assert ours_noise.taken == steps - 1 and theirs_noise.taken == steps  # neither uses noise on the last step


def test_lms_coefficients_are_the_adams_bashforth_weights():
    # uniform grid: the classical Adams-Bashforth weights (newest first), times h
    h = -0.5
    nodes = [3.0, 3.5, 4.0, 4.5]
    expected = {1: [1], 2: [3 / 2, -1 / 2], 3: [23 / 12, -16 / 12, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}
    for k, w in expected.items():
        torch.testing.assert_close(torch.tensor(lms_coefficients(nodes[:k], nodes[0] + h), dtype=F64),
                                   h * torch.tensor(w, dtype=F64), rtol=1e-13, atol=1e-13)
    # a Karras grid down to 0: the integrals of the Lagrange basis, as scipy's quadrature finds them
    s = grids.karras_sigmas(6, 0.01, 80.0).tolist()
    for i in range(1, 6):
        k = min(i + 1, 4)
        nodes = s[i - k + 1:i + 1][::-1]

        def basis(tau, j):
            return math.prod((tau - nodes[m]) / (nodes[j] - nodes[m]) for m in range(k) if m != j)

        ref = [integrate.quad(basis, s[i], s[i + 1], args=(j,), epsabs=0, epsrel=1e-13)[0] for j in range(k)]
        ours = torch.tensor(lms_coefficients(nodes, s[i + 1]))
        torch.testing.assert_close(ours, torch.tensor(ref), rtol=1e-10, atol=1e-12)
        assert math.isclose(sum(lms_coefficients(nodes, s[i + 1])), s[i + 1] - s[i], rel_tol=1e-12)  # constants exactly


# ----------------------------------------------------------------------------
# Convergence order on the closed-form probability-flow ODE of one Gaussian

ORDERS = {  # sampler: (steps, band for log2(error ratio) per doubling)
    "euler": ((8, 16, 32, 64), (0.8, 1.3)),
    "heun": ((8, 16, 32, 64), (1.8, 2.6)),
    "dpm_2": ((8, 16, 32, 64), (1.8, 2.6)),
    "lms": ((16, 32, 64, 128), (2.5, 4.5)),
}


@pytest.mark.parametrize("name", sorted(ORDERS))
def test_convergence_order_on_the_exact_ode(name):
    d, s, sigma_min, sigma_max = 4, 0.5, 0.002, 80.0
    mu = torch.linspace(-1, 2, d, dtype=F64)
    gm = GaussianMixture([1.0], mu[None], [s**2])
    x = sigma_max * torch.randn(64, d, generator=torch.Generator().manual_seed(0), dtype=F64)
    exact = single_gaussian_ode(x, sigma_max, sigma_min, mu, s)
    ns, (lo, hi) = ORDERS[name]
    errors = []
    for n in ns:
        out = ALL[name](gm.denoiser, x, grids.karras_sigmas(n, sigma_min, sigma_max)[:-1])  # stop at sigma_min
        errors.append((out - exact).pow(2).mean().sqrt().item())
    orders = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    assert all(lo < p < hi for p in orders), (errors, orders)


def test_lms_order_one_is_euler_and_higher_orders_differ():
    gm = GaussianMixture([0.5, 0.5], [[-1.0, 0.0], [1.0, 1.0]], [0.1, 0.2])
    x = 20 * torch.randn(8, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    sigmas = grids.karras_sigmas(10, 0.01, 20.0)
    assert torch.equal(sample_lms(gm.denoiser, x, sigmas, order=1), sample_euler(gm.denoiser, x, sigmas))
    assert rel_err(sample_lms(gm.denoiser, x, sigmas, order=2), sample_euler(gm.denoiser, x, sigmas)) > 1e-3


# ----------------------------------------------------------------------------
# Stochastic samplers reach the data distribution

def check_mixture(out, gm, n):
    mean, var = gm.mean.item(), gm.covariance.item()
    assert abs(out.mean().item() - mean) < 4 * (var / n) ** 0.5
    assert abs(out.var().item() / var - 1) < 0.05
    assert abs((out > 0).double().mean().item() - 0.7) < 0.03  # the mode weights
    w, m, sd = gm.weights.numpy(), gm.means[:, 0].numpy(), gm.covs[:, 0, 0].sqrt().numpy()
    assert stats.kstest(out.numpy(), lambda v: (w * stats.norm.cdf((v[:, None] - m) / sd)).sum(1)).pvalue > 1e-3
    # the test has power: a Gaussian with the same mean and variance is rejected
    assert stats.kstest(out.numpy(), lambda v: stats.norm.cdf((v - mean) / var**0.5)).pvalue < 1e-6


@pytest.mark.parametrize("name,kwargs", [("euler_ancestral", {}), ("heun", dict(s_churn=40.0)),
                                         ("euler", dict(s_churn=10.0))])
def test_stochastic_samplers_reach_the_gaussian_mixture(name, kwargs):
    gm = GaussianMixture([0.3, 0.7], [[-2.0], [1.5]], [0.5**2, 0.3**2])
    n, sigma_max = 4000, 80.0
    g = torch.Generator().manual_seed(0)
    x = gm.sample(n, g) + sigma_max * torch.randn(n, 1, generator=g, dtype=F64)  # the exact marginal at sigma_max
    noise = lambda: torch.randn(n, 1, generator=g, dtype=F64)  # noqa: E731
    # EDM's churn needs gamma = S_churn / N -> 0 to converge: the ODE step from t_hat = (1 + gamma) t_i
    # does not shrink otherwise; the first-order samplers need more steps for KS at n = 4000
    steps = 100 if name == "heun" else 200
    out = ALL[name](gm.denoiser, x, grids.karras_sigmas(steps, 0.002, sigma_max), noise=noise, **kwargs)[:, 0]
    check_mixture(out, gm, n)


# ----------------------------------------------------------------------------
# Edge cases

@pytest.mark.parametrize("name", sorted(ALL))
def test_step_to_zero(name):
    gm = GaussianMixture([0.5, 0.5], [[-1.0, 0.0], [1.0, 1.0]], [0.1, 0.2])
    x = 3 * torch.randn(8, 2, generator=torch.Generator().manual_seed(4), dtype=F64)
    assert torch.equal(ALL[name](gm.denoiser, x, torch.tensor([3.0, 0.0])), gm.denoiser(x, 3.0))
    steps = []
    ALL[name](gm.denoiser, x, grids.karras_sigmas(5, 0.01, 3.0), callback=steps.append)
    assert [s["i"] for s in steps] == list(range(5)) and steps[-1]["sigma_next"] == 0.0
    if name == "lms":  # a full 4th-order step to 0, as k-diffusion and diffusers take it
        assert 0 < rel_err(steps[-1]["x"], steps[-1]["denoised"]) < 0.05
    else:  # Heun and DPM-2 finish with an Euler step, which lands on D(x; sigma) exactly
        assert torch.equal(steps[-1]["x"], steps[-1]["denoised"])


@pytest.mark.parametrize("name", [*DETERMINISTIC, "euler_ancestral"])
def test_starting_mid_grid_continues_the_same_trajectory(name):
    gm = GaussianMixture([0.5, 0.5], [[-1.0, 0.0], [1.0, 1.0]], [0.1, 0.2])
    x = 20 * torch.randn(8, 2, generator=torch.Generator().manual_seed(5), dtype=F64)
    sigmas = grids.karras_sigmas(10, 0.01, 20.0)
    draws, k = noise_list(10, (8, 2)), 4
    states = []
    full = ALL[name](gm.denoiser, x, sigmas, noise=from_list(draws), callback=states.append)
    rest = ALL[name](gm.denoiser, states[k - 1]["x"], sigmas[k:], noise=from_list(draws[k:]))
    torch.testing.assert_close(rest, full, rtol=0, atol=1e-14)


def test_lms_mid_grid_restarts_its_history_and_stays_accurate():
    d, s = 2, 0.5
    mu = torch.tensor([0.5, -1.0], dtype=F64)
    gm = GaussianMixture([1.0], mu[None], [s**2])
    x = 20 * torch.randn(8, d, generator=torch.Generator().manual_seed(5), dtype=F64)
    sigmas = grids.karras_sigmas(40, 0.01, 20.0)[:-1]
    k = 10
    x_k = single_gaussian_ode(x, 20.0, float(sigmas[k]), mu, s)
    exact = single_gaussian_ode(x, 20.0, 0.01, mu, s)
    err = (sample_lms(gm.denoiser, x_k, sigmas[k:]) - exact).abs().max().item()
    assert err < 1e-3 * exact.abs().max().item()


def test_euler_ancestral_same_seed_and_batch_size_invariance():
    gm = GaussianMixture([0.5, 0.5], [[-1.0, 0.0], [1.0, 1.0]], [0.1, 0.2])
    sigmas = grids.karras_sigmas(15, 0.01, 20.0)

    def run(batch, start, seed=7):
        noise = SampleNoise.for_run(seed, batch, (2,), start=start, dtype=F64)
        return sample_euler_ancestral(gm.denoiser, noise() * sigmas[0], sigmas, noise=noise)

    big = run(8, 0)
    assert torch.equal(big, run(8, 0))
    assert not torch.allclose(big, run(8, 0, seed=8))
    torch.testing.assert_close(run(1, 3)[0], big[3], rtol=0, atol=1e-12)
    torch.testing.assert_close(run(3, 2), big[2:5], rtol=0, atol=1e-12)


def test_euler_ancestral_eta_zero_is_euler_and_eta_scales_the_noise():
    gm = GaussianMixture([0.5, 0.5], [[-1.0, 0.0], [1.0, 1.0]], [0.1, 0.2])
    x = 10 * torch.randn(16, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    sigmas = grids.karras_sigmas(12, 0.01, 10.0)
    never = from_list([])
    euler = sample_euler(gm.denoiser, x, sigmas)
    assert torch.equal(sample_euler_ancestral(gm.denoiser, x, sigmas, eta=0.0, noise=never), euler)
    assert never.taken == 0
    # eta = 1 is DDIM's eta = 1 (DDPM's posterior variance), step for step
    draws = noise_list(12, (16, 2))
    a = sample_euler_ancestral(gm.denoiser, x, sigmas, noise=from_list(draws))
    ddim = sample_ddim(gm.denoiser, x, sigmas, eta=1.0, noise=from_list(draws))
    torch.testing.assert_close(a, ddim, rtol=1e-12, atol=1e-12)
    # s_noise = 0 keeps the deterministic part only: the step down to sigma_down, no noise added
    b = sample_euler_ancestral(gm.denoiser, x, sigmas, s_noise=0.0, noise=from_list(draws))
    assert not torch.allclose(a, b) and not torch.allclose(b, euler)


@pytest.mark.parametrize("name", ["euler", "heun", "dpm_2"])
def test_churn(name):
    gm = GaussianMixture([0.5, 0.5], [[-1.0, 0.0], [1.0, 1.0]], [0.1, 0.2])
    x = 10 * torch.randn(16, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    sigmas = grids.karras_sigmas(12, 0.01, 10.0)
    plain = ALL[name](gm.denoiser, x, sigmas, noise=from_list([]))
    assert torch.equal(ALL[name](gm.denoiser, x, sigmas, s_churn=0.0, noise=from_list([])), plain)
    # churn outside [s_tmin, s_tmax] is no churn and draws nothing
    assert torch.equal(ALL[name](gm.denoiser, x, sigmas, s_churn=5.0, s_tmin=20.0, noise=from_list([])), plain)
    # gamma = min(S_churn / N, sqrt(2) - 1) inside the window, one draw per churned step (EDM Algorithm 2)
    for s_churn, gamma in ((6.0, 0.5), (3.0, 0.25)):
        gamma = min(gamma, 2**0.5 - 1)
        infos, noise = [], from_list(noise_list(12, (16, 2)))
        out = ALL[name](gm.denoiser, x, sigmas, s_churn=s_churn, s_tmin=0.1, s_tmax=5.0, noise=noise,
                        callback=infos.append)
        inside = [0.1 <= info["sigma"] <= 5.0 for info in infos]
        assert noise.taken == sum(inside) > 0
        for info, churned in zip(infos, inside):
            assert info["sigma_hat"] == pytest.approx(info["sigma"] * (1 + gamma if churned else 1), rel=1e-15)
        assert not torch.allclose(out, plain)


def test_contract_dtype_extra_args_and_bad_input():
    gm = GaussianMixture([1.0], [[0.0, 0.0]], [1.0])
    for name, sampler in ALL.items():
        assert sampler(gm.denoiser, torch.randn(4, 2), grids.karras_sigmas(3, 0.1, 1.0)).dtype == torch.float32, name
        seen = []

        def denoiser(x, sigma, *, class_labels):
            assert sigma.shape == (x.shape[0],) and sigma.dtype == x.dtype
            seen.append(class_labels)
            return torch.zeros_like(x)

        sampler(denoiser, torch.ones(2, 3), torch.tensor([2.0, 1.0, 0.0]), extra_args={"class_labels": 7},
                progress=True)
        assert seen and all(v == 7 for v in seen)
        for bad in ([1.0, 2.0, 0.0], [2.0, 2.0, 0.0], [2.0, float("nan"), 0.0], [2.0, -1.0], []):
            with pytest.raises(ValueError, match="sigmas"):
                sampler(gm.denoiser, torch.zeros(2, 2), torch.tensor(bad))
    with pytest.raises(ValueError, match="order"):
        sample_lms(gm.denoiser, torch.zeros(2, 2), torch.tensor([1.0, 0.0]), order=0)
    with pytest.raises(ValueError, match="eta"):
        sample_euler_ancestral(gm.denoiser, torch.zeros(2, 2), torch.tensor([1.0, 0.0]), eta=-1.0)
    with pytest.raises(ValueError, match="s_churn"):
        sample_heun(gm.denoiser, torch.zeros(2, 2), torch.tensor([1.0, 0.0]), s_churn=-1.0)


def test_which_diffusers_timesteps_match_our_model_time():
    """VPDiscrete.time interpolates the step index in log sigma: diffusers' timesteps are the same
    for integer timesteps and Karras sigmas, not for fractional "linspace" ones (linear in sigma)."""
    T, ab = 1000, schedules.discrete_alpha_bars("linear", 1000)
    frame = VPDiscrete(ab)
    gaps = {}
    for name, config in [("trailing", dict(timestep_spacing="trailing")), ("karras", dict(use_karras_sigmas=True)),
                         ("linspace", dict(timestep_spacing="linspace"))]:
        sched = EulerDiscreteScheduler(num_train_timesteps=T, **config)
        sched.alphas_cumprod = ab.clone()
        sched.set_timesteps(50)
        ours = frame.time(sched.sigmas[:-1].to(F64))
        gaps[name] = (ours - sched.timesteps.to(F64)).abs().max().item()
    assert gaps["trailing"] < 1e-4 and gaps["karras"] < 1e-4, gaps  # float32 sigmas and timesteps
    assert 1e-3 < gaps["linspace"] < 0.05, gaps  # 0.005 of a step at 50 steps: 3e-5 relative in x
