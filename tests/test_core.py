"""The core against its formulas and against diffusers: schedules, conversions, frames, grids, rng."""
import itertools
import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr as diffusers_rescale_zero_terminal_snr

from difflab.core import (EDM, VE, Denoiser, Flow, SampleNoise, VPContinuous, VPDiscrete, append_dims, grids, params,
                          q_posterior, q_sample, schedules, ve_posterior)

F64 = torch.float64


def close(a, b, rtol=1e-10, atol=1e-10):
    torch.testing.assert_close(torch.as_tensor(a, dtype=F64), torch.as_tensor(b, dtype=F64), rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------
# Schedules

def test_linear_and_scaled_linear_endpoints():
    b = schedules.betas_linear(1000)
    assert b.dtype == F64 and len(b) == 1000
    close(b[[0, -1]], [1e-4, 0.02], atol=1e-15)
    close(schedules.alpha_bars_from_betas(b), torch.cumprod(1 - b, 0), atol=1e-15)
    b = schedules.betas_scaled_linear(1000)
    close(b[[0, -1]], [0.00085, 0.012], atol=1e-15)
    close(b.sqrt().diff(), torch.full((999,), (0.012**0.5 - 0.00085**0.5) / 999, dtype=F64), atol=1e-14)


def test_cosine_alpha_bar_matches_its_formula_where_unclipped():
    T, s = 1000, 0.008
    betas = schedules.betas_cosine(T, s)
    ab = schedules.alpha_bars_from_betas(betas)
    t = torch.arange(1, T + 1, dtype=F64)  # alpha_bar[i] is the level after step i + 1
    formula = torch.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2
    unclipped = torch.cumprod((betas < 0.999).to(torch.int64), 0).bool()
    assert unclipped.sum() > 990 and not unclipped[-1]  # the last beta is clipped
    close(ab[unclipped], formula[unclipped], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name,theirs", [("linear", "linear"), ("scaled_linear", "scaled_linear"),
                                         ("cosine", "squaredcos_cap_v2"), ("sigmoid", "sigmoid")])
def test_discrete_schedules_match_diffusers(name, theirs):
    ours = schedules.discrete_alpha_bars(name, 1000)
    # diffusers' defaults are DDPM's 1e-4..0.02 for every schedule; ours for scaled_linear are SD's
    ends = dict(beta_start=0.00085, beta_end=0.012) if name == "scaled_linear" else {}
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule=theirs, **ends)
    # diffusers computes in float32: its cumulative product drifts by ~1e-6 over 1000 steps
    close(ours, sched.alphas_cumprod.double(), rtol=0, atol=1e-5)
    # its float32 betas, multiplied out in float64, agree to float32 rounding
    close(ours, torch.cumprod(1 - sched.betas.double(), 0), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "cosine"])
def test_zero_terminal_snr(name):
    plain = schedules.discrete_alpha_bars(name, 1000)
    ab = schedules.discrete_alpha_bars(name, 1000, zero_terminal_snr=True)
    assert ab[-1].item() == 0.0
    close(ab[0], plain[0], rtol=1e-12, atol=0)
    assert bool((ab.diff() < 0).all())
    makers = {"linear": schedules.betas_linear, "scaled_linear": schedules.betas_scaled_linear,
              "cosine": schedules.betas_cosine}
    betas = makers[name](1000)
    close(schedules.rescale_zero_terminal_snr(betas), diffusers_rescale_zero_terminal_snr(betas.clone()), atol=1e-12)


@pytest.mark.parametrize("name", ["scaled_linear", "cosine", "linear", "sigmoid"])
def test_vp_discrete_clamps_the_zero_snr_level_to_a_finite_sigma(name):
    ab = schedules.discrete_alpha_bars(name, 1000, zero_terminal_snr=True)
    frame = VPDiscrete(ab)
    assert math.isfinite(frame.sigma_max) and frame.sigma_max >= (2.0**24 - 1) ** 0.5 - 1e-6
    assert bool((frame.sigmas.diff() > 0).all())
    close(frame.sigmas[:-1], schedules.sigma_from_alpha_bar(ab[:-1]))  # only the infinite level is clamped


# ----------------------------------------------------------------------------
# Forward process and posterior

def test_q_sample_exact_with_given_noise_and_empirical_moments():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 3, 4, generator=g, dtype=F64)
    eps = torch.randn(5, 3, 4, generator=g, dtype=F64)
    ab = torch.rand(5, generator=g, dtype=F64)
    close(q_sample(x0, ab, eps), ab.sqrt()[:, None, None] * x0 + (1 - ab).sqrt()[:, None, None] * eps, atol=1e-15)
    # many draws of one x0 at one level: mean sqrt(ab) x0, variance 1 - ab (Ho et al. 2020, eq. 4)
    n, ab = 200_000, 0.3
    x0 = torch.full((n, 1), 2.0, dtype=F64)
    xt = q_sample(x0, ab, torch.randn(n, 1, generator=g, dtype=F64))
    assert abs(xt.mean().item() - ab**0.5 * 2.0) < 5 * ((1 - ab) / n) ** 0.5
    assert abs(xt.var().item() - (1 - ab)) < 5 * (1 - ab) * (2 / n) ** 0.5


def test_q_posterior_equals_ve_posterior_in_the_canonical_frame():
    g = torch.Generator().manual_seed(1)
    ab = schedules.discrete_alpha_bars("linear", 1000)
    for t, t_prev in [(999, 998), (500, 400), (100, 0), (10, 9)]:
        x0 = torch.randn(4, 6, generator=g, dtype=F64)
        xt = torch.randn(4, 6, generator=g, dtype=F64)
        mean, var = q_posterior(x0, xt, ab[t], ab[t_prev])
        s, s_prev = schedules.sigma_from_alpha_bar(ab[t]), schedules.sigma_from_alpha_bar(ab[t_prev])
        mean_ve, var_ve = ve_posterior(x0, xt / ab[t].sqrt(), s, s_prev)
        close(mean / ab[t_prev].sqrt(), mean_ve, rtol=1e-10, atol=1e-12)
        close(var / ab[t_prev], var_ve, rtol=1e-10, atol=1e-15)


# ----------------------------------------------------------------------------
# Parameterizations

def _levels(kind, B, g):
    """(alpha, sigma) of shape (B, 1) for a VP, VE or flow frame."""
    u = torch.rand(B, 1, generator=g, dtype=F64) * 0.98 + 0.01
    if kind == "vp":
        return u.sqrt(), (1 - u).sqrt()
    if kind == "ve":
        return torch.ones_like(u), 80 * u
    return 1 - u, u


@pytest.mark.parametrize("kind", ["vp", "ve", "flow"])
def test_every_prediction_pair_converts_and_round_trips(kind):
    g = torch.Generator().manual_seed(2)
    B = 16
    alpha, sigma = _levels(kind, B, g)
    x0, eps = torch.randn(B, 5, generator=g, dtype=F64), torch.randn(B, 5, generator=g, dtype=F64)
    x = alpha * x0 + sigma * eps
    target = {p: params.from_x0_eps(x0, eps, p, alpha, sigma) for p in params.PREDICTIONS}
    for p in params.PREDICTIONS:
        got_x0, got_eps = params.to_x0_eps(target[p], p, x, alpha, sigma)
        close(got_x0, x0), close(got_eps, eps)
    for src, dst in itertools.permutations(params.PREDICTIONS, 2):
        there = params.convert(target[src], src, dst, x, alpha, sigma)
        close(there, target[dst])
        close(params.convert(there, dst, src, x, alpha, sigma), target[src])


@pytest.mark.parametrize("kind", ["vp", "ve", "flow"])
def test_x0_error_scale_is_the_x0_change_per_prediction_change(kind):
    g = torch.Generator().manual_seed(3)
    alpha, sigma = _levels(kind, 8, g)
    x = torch.randn(8, 4, generator=g, dtype=F64)
    pred = torch.randn(8, 4, generator=g, dtype=F64)
    delta = 1e-3 * torch.randn(8, 4, generator=g, dtype=F64)
    for p in params.PREDICTIONS:
        x0_a, _ = params.to_x0_eps(pred, p, x, alpha, sigma)
        x0_b, _ = params.to_x0_eps(pred + delta, p, x, alpha, sigma)
        k = params.x0_error_scale(p, alpha, sigma)
        close((x0_b - x0_a).abs(), (k * delta).abs().expand_as(delta), rtol=1e-7, atol=1e-15)


# ----------------------------------------------------------------------------
# Frames and the denoiser: a "network" that knows the answer gives x0 back exactly

def _check_denoiser(frame, prediction, sigma, x_in, t, target, x0, eps):
    """Wrap a fake net that checks its input and time and outputs ``target``; D must return x0."""
    seen = []

    def net(x_in_got, t_got):
        close(x_in_got, x_in, rtol=1e-10, atol=1e-10)
        close(t_got, t, rtol=1e-9, atol=1e-9)
        seen.append(True)
        return target

    D = Denoiser(net, frame, prediction)
    x = x0 + append_dims(sigma, x0.ndim) * eps
    close(D(x, sigma), x0, rtol=1e-9, atol=1e-9)
    assert seen


def _data(B=6, g=None):
    g = g or torch.Generator().manual_seed(4)
    return torch.randn(B, 2, 3, 3, generator=g, dtype=F64), torch.randn(B, 2, 3, 3, generator=g, dtype=F64)


def col(v):
    return v[:, None, None, None]


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_denoiser_vp_discrete(prediction):
    x0, eps = _data()
    frame = VPDiscrete.from_name("linear", 1000)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    ab = col(frame.alpha_bars[t])
    x_in = ab.sqrt() * x0 + (1 - ab).sqrt() * eps  # Ho et al. 2020, eq. 4
    target = {"eps": eps, "x0": x0, "v": ab.sqrt() * eps - (1 - ab).sqrt() * x0}[prediction]
    _check_denoiser(frame, prediction, frame.sigmas[t], x_in, t.to(F64), target, x0, eps)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "sigmoid"])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_denoiser_vp_continuous(schedule, prediction):
    x0, eps = _data()
    frame = VPContinuous(schedule)
    t = torch.tensor([0.01, 0.1, 0.3, 0.5, 0.8, 0.95], dtype=F64)
    ab = col(schedules.CONTINUOUS_SCHEDULES[schedule](t))
    x_in = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    target = eps if prediction == "eps" else ab.sqrt() * eps - (1 - ab).sqrt() * x0
    _check_denoiser(frame, prediction, frame.sigma(t), x_in, t, target, x0, eps)


@pytest.mark.parametrize("prediction", ["x0", "eps", "score"])
def test_denoiser_ve(prediction):
    x0, eps = _data()
    sigma = torch.tensor([0.002, 0.1, 1.0, 5.0, 20.0, 80.0], dtype=F64)
    target = {"x0": x0, "eps": eps, "score": -eps / col(sigma)}[prediction]
    _check_denoiser(VE(), prediction, sigma, x0 + col(sigma) * eps, sigma.log() / 4, target, x0, eps)
    _check_denoiser(VE(time="sigma"), prediction, sigma, x0 + col(sigma) * eps, sigma, target, x0, eps)


def test_denoiser_edm():
    x0, eps = _data()
    sd = 0.5
    sigma = torch.tensor([0.002, 0.1, 1.0, 5.0, 20.0, 80.0], dtype=F64)
    x = x0 + col(sigma) * eps
    # Karras et al. 2022, Table 1: c_skip, c_out, c_in, c_noise
    c_skip, c_out = sd**2 / (sigma**2 + sd**2), sigma * sd / (sigma**2 + sd**2).sqrt()
    c_in = 1 / (sigma**2 + sd**2).sqrt()
    F = (x0 - col(c_skip) * x) / col(c_out)
    _check_denoiser(EDM(sd), "edm", sigma, col(c_in) * x, sigma.log() / 4, F, x0, eps)


def test_denoiser_flow():
    x0, eps = _data()
    t = torch.tensor([0.001, 0.1, 0.4, 0.6, 0.9, 0.999], dtype=F64)
    x_in = (1 - col(t)) * x0 + col(t) * eps  # Liu et al. 2023, eq. 1
    frame = Flow(time_scale=1000)
    _check_denoiser(frame, "flow", t / (1 - t), x_in, 1000 * t, eps - x0, x0, eps)


FRAME_TIMES = [
    (VPDiscrete.from_name("linear", 1000), torch.tensor([0.0, 0.5, 1.0, 17.25, 500.0, 998.9, 999.0], dtype=F64)),
    (VPDiscrete.from_name("cosine", 1000, zero_terminal_snr=True), torch.tensor([0.0, 3.5, 700.0, 999.0], dtype=F64)),
    (VPContinuous("cosine"), torch.linspace(0.01, 0.99, 9, dtype=F64)),
    (VPContinuous("linear"), torch.linspace(0.01, 0.99, 9, dtype=F64)),
    (VPContinuous("sigmoid", time_scale=1000), torch.linspace(10, 990, 9, dtype=F64)),
    (VE(), torch.linspace(-1.5, 1.1, 9, dtype=F64)),
    (VE(time="sigma"), torch.linspace(0.01, 80, 9, dtype=F64)),
    (EDM(), torch.linspace(-1.5, 1.1, 9, dtype=F64)),
    (Flow(time_scale=1000), torch.linspace(1, 999, 9, dtype=F64)),
]


@pytest.mark.parametrize("frame,t", FRAME_TIMES, ids=lambda v: type(v).__name__ if not torch.is_tensor(v) else "")
def test_frame_time_inverts_sigma(frame, t):
    sigma = frame.sigma(t)
    assert bool((sigma.diff() > 0).all())
    close(frame.time(sigma), t, rtol=1e-8, atol=1e-8)


# ----------------------------------------------------------------------------
# Grids

@pytest.mark.parametrize("spacing,offset", [("leading", 0), ("leading", 1), ("trailing", 0), ("linspace", 0)])
@pytest.mark.parametrize("n", [1, 7, 10, 50, 333, 1000])
def test_discrete_timesteps_match_diffusers(spacing, offset, n):
    sched = DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing, steps_offset=offset)
    sched.set_timesteps(n)
    ours = grids.discrete_timesteps(1000, n, spacing, steps_offset=offset)
    assert ours.tolist() == sched.timesteps.tolist()


def test_timestep_sigmas_are_the_frame_sigmas_then_final():
    frame = VPDiscrete.from_name("linear", 1000)
    ts = grids.discrete_timesteps(1000, 10)
    sig = grids.timestep_sigmas(frame, ts)
    close(sig[:-1], schedules.sigma_from_alpha_bar(frame.alpha_bars[ts]))
    assert sig[-1] == 0 and len(grids.timestep_sigmas(frame, ts, final=None)) == 10


def test_karras_sigmas_endpoints_and_monotonicity():
    sig = grids.karras_sigmas(18, 0.002, 80.0)
    assert len(sig) == 19 and sig[-1] == 0
    close(sig[[0, -2]], [80.0, 0.002], rtol=1e-12, atol=0)
    assert bool((sig.diff() < 0).all())
    # rho = 1 spaces sigma uniformly
    close(grids.karras_sigmas(5, 1.0, 5.0, rho=1.0), [5.0, 4.0, 3.0, 2.0, 1.0, 0.0])


# ----------------------------------------------------------------------------
# Per-sample randomness

def test_sample_noise_is_independent_of_batch_size_and_offset():
    big = SampleNoise.for_run(123, 8, (2, 3))
    small = SampleNoise.for_run(123, 1, (2, 3), start=5)
    pair = SampleNoise.for_run(123, 2, (2, 3), start=4)
    for _ in range(3):  # every draw, not only the first
        a, b, c = big(), small(), pair()
        assert a.shape == (8, 2, 3) and b.shape == (1, 2, 3)
        assert torch.equal(a[5], b[0]) and torch.equal(a[4:6], c)
        assert not torch.equal(a[4], a[5])
    assert not torch.equal(SampleNoise.for_run(124, 1, (4,))(), SampleNoise.for_run(123, 1, (4,))())


# ----------------------------------------------------------------------------
# Bad inputs

def test_bad_inputs_raise_value_error():
    frame = VPDiscrete.from_name("linear", 1000)
    with pytest.raises(ValueError, match="linear"):
        schedules.discrete_alpha_bars("quadratic", 1000)
    with pytest.raises(ValueError, match="eps"):
        Denoiser(lambda x, t: x, frame, "noise")
    with pytest.raises(ValueError, match="EDM"):
        Denoiser(lambda x, t: x, frame, "edm")
    with pytest.raises(ValueError, match="1000"):
        grids.discrete_timesteps(1000, 1001)
    with pytest.raises(ValueError, match="spacing"):
        grids.discrete_timesteps(1000, 10, "uniform")
    with pytest.raises(ValueError):
        VPContinuous("quadratic")
    with pytest.raises(ValueError):
        grids.karras_sigmas(10, 80.0, 0.002)
    with pytest.raises(ValueError, match="sigma"):
        Denoiser(lambda x, t: x, frame, "eps")(torch.zeros(4, 3), torch.ones(3))
