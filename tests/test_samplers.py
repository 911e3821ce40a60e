"""Samplers against diffusers step by step, against closed-form truth, and on their edge cases."""
import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.schedulers import scheduling_ddpm
from scipy import stats

from difflab.core import Denoiser, SampleNoise, VPDiscrete, append_dims, grids, schedules
from difflab.oracle import GaussianMixture, single_gaussian_ode
from difflab.samplers import SAMPLERS, get_sampler, sample_ddim, sample_ddpm

F64 = torch.float64


class SmoothNet:
    """A deterministic stand-in network: a fixed random linear map of x_in, modulated by t."""

    def __init__(self, shape, seed=0):
        g = torch.Generator().manual_seed(seed)
        d = math.prod(shape)
        self.W = torch.randn(d, d, generator=g, dtype=F64) / d**0.5
        self.b = torch.randn(shape, generator=g, dtype=F64)

    def __call__(self, x_in, t):
        u = append_dims(torch.as_tensor(t, dtype=F64).expand(x_in.shape[0]) / 1000, x_in.ndim)
        lin = (x_in.reshape(x_in.shape[0], -1) @ self.W).reshape(x_in.shape)
        return lin * torch.cos(u) + 0.3 * torch.sin(3 * u) * self.b


def noise_list(n, shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=F64) for _ in range(n)]


def from_list(draws):
    """A ``noise`` callable handing out ``draws`` in order, counting how many were taken."""
    it = iter(draws)

    def noise():
        noise.taken += 1
        return next(it)

    noise.taken = 0
    return noise


# ----------------------------------------------------------------------------
# Parity with diffusers, every step, float64

PARITY = [  # sampler, training steps, steps, spacing, steps_offset, prediction, option
    ("ddpm", 1000, 50, "leading", 0, "epsilon", "fixed_small"),
    ("ddpm", 1000, 50, "leading", 0, "epsilon", "fixed_large"),
    ("ddpm", 1000, 50, "leading", 0, "v_prediction", "fixed_small"),
    ("ddpm", 100, 100, "leading", 0, "epsilon", "fixed_small"),  # every training step: Algorithm 2 as written
    ("ddim", 1000, 50, "leading", 0, "epsilon", 0.0),
    ("ddim", 1000, 50, "leading", 0, "epsilon", 1.0),
    ("ddim", 1000, 20, "leading", 1, "epsilon", 0.5),
    ("ddim", 1000, 10, "trailing", 0, "epsilon", 0.0),
    ("ddim", 1000, 10, "trailing", 0, "v_prediction", 1.0),
    ("ddim", 1000, 50, "leading", 0, "v_prediction", 0.0),
]


@pytest.mark.parametrize("sampler,T,steps,spacing,offset,prediction,option", PARITY)
def test_matches_diffusers_step_by_step(monkeypatch, sampler, T, steps, spacing, offset, prediction, option):
    shape = (2, 3, 3)
    ab = schedules.discrete_alpha_bars("linear", T)
    net = SmoothNet(shape)
    x_vp = torch.randn((4,) + shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    draws = noise_list(steps, (4,) + shape)

    # diffusers, with its schedule replaced by the same float64 alpha_bar
    kw = dict(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=offset, prediction_type=prediction,
              clip_sample=False)
    if sampler == "ddpm":
        sched = DDPMScheduler(variance_type=option, **kw)
        sched.one = torch.tensor(1.0, dtype=F64)
        theirs_noise = from_list(draws)
        monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *a, **k: theirs_noise())
    else:
        sched = DDIMScheduler(**kw)
        sched.final_alpha_cumprod = torch.tensor(1.0, dtype=F64)
    sched.alphas_cumprod = ab.clone()
    sched.set_timesteps(steps)
    theirs, sample = [], x_vp
    for i, t in enumerate(sched.timesteps):
        extra = {} if sampler == "ddpm" else dict(eta=option, variance_noise=draws[i] if option > 0 else None)
        out = sched.step(net(sample, t), t, sample, **extra)
        sample = out.prev_sample
        a_prev = ab[sched.timesteps[i + 1]] if i + 1 < len(sched.timesteps) else torch.tensor(1.0, dtype=F64)
        theirs.append((sample / a_prev.sqrt(), out.pred_original_sample))  # VP -> canonical frame

    # difflab: the same net wrapped once, on the grid of the same timesteps
    frame = VPDiscrete(ab)
    ts = grids.discrete_timesteps(T, steps, spacing, steps_offset=offset)
    assert ts.tolist() == sched.timesteps.tolist()
    sigmas = grids.timestep_sigmas(frame, ts)
    denoiser = Denoiser(net, frame, {"epsilon": "eps", "v_prediction": "v"}[prediction])
    ours, ours_noise = [], from_list(draws)
    x = x_vp / ab[ts[0]].sqrt()
    record = lambda info: ours.append((info["x"], info["denoised"]))  # noqa: E731
    if sampler == "ddpm":
        out = sample_ddpm(denoiser, x, sigmas, variance=option, noise=ours_noise, callback=record)
    else:
        out = sample_ddim(denoiser, x, sigmas, eta=option, noise=ours_noise, callback=record)

    assert len(ours) == len(theirs) == steps
    for i, ((x_ours, d_ours), (x_theirs, d_theirs)) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(d_ours, d_theirs, rtol=1e-8, atol=1e-10, msg=lambda m: f"step {i}: {m}")
        torch.testing.assert_close(x_ours, x_theirs, rtol=1e-8, atol=1e-10, msg=lambda m: f"step {i}: {m}")
    assert torch.equal(out, ours[-1][0])
    if sampler == "ddpm" or option > 0:
        assert ours_noise.taken == steps - 1  # no noise on the final step
    if sampler == "ddpm":
        assert theirs_noise.taken == steps - 1


# ----------------------------------------------------------------------------
# Closed-form truth

def test_oracle_denoiser_is_tweedie_and_log_prob_is_scipy():
    weights, means = [0.2, 0.5, 0.3], [[-1.0, 0.5], [1.0, 1.0], [0.0, -2.0]]
    covs = torch.tensor([[[0.3, 0.1], [0.1, 0.2]], [[0.1, 0.0], [0.0, 0.4]], [[0.5, -0.2], [-0.2, 0.3]]], dtype=F64)
    gm = GaussianMixture(weights, means, covs)
    g = torch.Generator().manual_seed(6)
    x0 = gm.sample(20_000, g)
    torch.testing.assert_close(x0.mean(0), gm.mean, rtol=0, atol=0.03)
    torch.testing.assert_close(x0.T.cov(), gm.covariance, rtol=0, atol=0.05)
    ref = sum(w * stats.multivariate_normal(m, c.numpy()).pdf(x0[:50].numpy()) for w, m, c in zip(weights, means, covs))
    torch.testing.assert_close(gm.log_prob(x0[:50]), torch.as_tensor(ref).log(), rtol=1e-10, atol=1e-10)
    # Tweedie: E[x0 | x] = x + sigma^2 grad log p_sigma(x), p_sigma the mixture with covariances + sigma^2 I
    for sigma in (0.05, 1.0, 20.0):
        x = (x0[:50] + sigma * torch.randn(50, 2, generator=g, dtype=F64)).requires_grad_()
        noisy = GaussianMixture(weights, means, covs + sigma**2 * torch.eye(2, dtype=F64))
        (grad,) = torch.autograd.grad(noisy.log_prob(x).sum(), x)
        torch.testing.assert_close(gm.denoiser(x.detach(), sigma), x.detach() + sigma**2 * grad, rtol=1e-9, atol=1e-9)
    assert gm.denoiser(x0[:6].reshape(6, 1, 2, 1), 1.0).shape == (6, 1, 2, 1)  # (B, ...) flattened to (B, d)


def test_ddim_converges_to_the_exact_ode_solution_at_first_order():
    d, s, sigma_min, sigma_max = 4, 0.5, 0.002, 80.0
    mu = torch.linspace(-1, 2, d, dtype=F64)
    gm = GaussianMixture([1.0], mu[None], [s**2])
    x = sigma_max * torch.randn(64, d, generator=torch.Generator().manual_seed(0), dtype=F64)
    exact = single_gaussian_ode(x, sigma_max, sigma_min, mu, s)
    errors = []
    for n in (8, 16, 32, 64):
        sigmas = grids.karras_sigmas(n, sigma_min, sigma_max)[:-1]  # stop at sigma_min
        errors.append((sample_ddim(gm.denoiser, x, sigmas) - exact).pow(2).mean().sqrt().item())
    orders = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    assert all(0.8 < p < 1.3 for p in orders), (errors, orders)
    assert errors[-1] < 0.03, errors


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_ddpm_reaches_the_gaussian_mixture(variance):
    gm = GaussianMixture([0.3, 0.7], [[-2.0], [1.5]], [0.5**2, 0.3**2])
    n, sigma_max = 4000, 80.0
    g = torch.Generator().manual_seed(0)
    x = gm.sample(n, g) + sigma_max * torch.randn(n, 1, generator=g, dtype=F64)  # the exact marginal at sigma_max
    noise = lambda: torch.randn(n, 1, generator=g, dtype=F64)  # noqa: E731
    out = sample_ddpm(gm.denoiser, x, grids.karras_sigmas(200, 0.002, sigma_max), variance=variance, noise=noise)[:, 0]
    mean, var = gm.mean.item(), gm.covariance.item()
    assert abs(out.mean().item() - mean) < 4 * (var / n) ** 0.5
    assert abs(out.var().item() / var - 1) < 0.05
    assert abs((out > 0).double().mean().item() - 0.7) < 0.03  # the mode weights
    w, m, sd = gm.weights.numpy(), gm.means[:, 0].numpy(), gm.covs[:, 0, 0].sqrt().numpy()
    cdf = lambda v: (w * stats.norm.cdf((v[:, None] - m) / sd)).sum(1)  # noqa: E731
    assert stats.kstest(out.numpy(), cdf).pvalue > 1e-3
    # the test has power: a Gaussian with the same mean and variance is rejected
    assert stats.kstest(out.numpy(), lambda v: stats.norm.cdf((v - mean) / var**0.5)).pvalue < 1e-6


def test_ddim_eta_one_is_ddpm_fixed_small():
    gm = GaussianMixture([0.5, 0.5], [[-1.0, 0.0], [1.0, 1.0]], [0.1, 0.2])
    x = 10 * torch.randn(16, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    sigmas = grids.karras_sigmas(12, 0.01, 10.0)
    draws = noise_list(12, (16, 2))
    a = sample_ddim(gm.denoiser, x, sigmas, eta=1.0, noise=from_list(draws))
    b = sample_ddpm(gm.denoiser, x, sigmas, noise=from_list(draws))
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------
# Edge cases

# Multistep samplers keep a history: their last step to 0 uses it (so it is not D alone) and a
# sliced grid restarts the history (so a mid-grid start is a new trajectory, not the same one).
MULTISTEP = {"lms", "deis", "unipc", "dpm_multistep_2", "dpm_multistep_3", "dpm_singlestep", "dpmpp_2m", "dpmpp_3m",
             "dpmpp_2m_sde", "dpmpp_3m_sde"}


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_step_to_zero_returns_the_denoised_estimate(name):
    gm = GaussianMixture([0.5, 0.5], [[-1.0, 0.0], [1.0, 1.0]], [0.1, 0.2])
    x = 3 * torch.randn(8, 2, generator=torch.Generator().manual_seed(4), dtype=F64)
    out = get_sampler(name)(gm.denoiser, x, torch.tensor([3.0, 0.0]))
    assert torch.equal(out, gm.denoiser(x, 3.0))
    steps = []
    get_sampler(name)(gm.denoiser, x, grids.karras_sigmas(5, 0.01, 3.0), callback=steps.append)
    assert [s["i"] for s in steps] == list(range(5)) and steps[-1]["sigma_next"] == 0.0
    if name not in MULTISTEP:
        assert torch.equal(steps[-1]["x"], steps[-1]["denoised"])


@pytest.mark.parametrize("name", sorted(set(SAMPLERS) - MULTISTEP))
def test_starting_mid_grid_continues_the_same_trajectory(name):
    gm = GaussianMixture([0.5, 0.5], [[-1.0, 0.0], [1.0, 1.0]], [0.1, 0.2])
    x = 20 * torch.randn(8, 2, generator=torch.Generator().manual_seed(5), dtype=F64)
    sigmas = grids.karras_sigmas(10, 0.01, 20.0)
    draws, k = noise_list(10, (8, 2)), 4
    states = []
    full = get_sampler(name)(gm.denoiser, x, sigmas, noise=from_list(draws), callback=states.append)
    x_k = states[k - 1]["x"]  # the state at sigmas[k]
    # img2img-style: start from sigmas[k:] (stochastic samplers draw one noise per step but the last)
    rest = get_sampler(name)(gm.denoiser, x_k, sigmas[k:], noise=from_list(draws[k:]))
    torch.testing.assert_close(rest, full, rtol=0, atol=1e-14)


def test_same_seed_same_result_and_batch_size_invariance():
    gm = GaussianMixture([0.5, 0.5], [[-1.0, 0.0], [1.0, 1.0]], [0.1, 0.2])
    sigmas = grids.karras_sigmas(15, 0.01, 20.0)

    def run(batch, start, seed=7):
        noise = SampleNoise.for_run(seed, batch, (2,), start=start, dtype=F64)
        return sample_ddpm(gm.denoiser, noise() * sigmas[0], sigmas, noise=noise)

    big = run(8, 0)
    assert torch.equal(big, run(8, 0))
    assert not torch.equal(big, run(8, 0, seed=8))
    torch.testing.assert_close(run(1, 2)[0], big[2], rtol=0, atol=1e-12)
    torch.testing.assert_close(run(3, 1), big[1:4], rtol=0, atol=1e-12)
    torch.manual_seed(0)  # noise=None draws from torch's global generator
    a = sample_ddpm(gm.denoiser, big, sigmas[5:])
    torch.manual_seed(0)
    assert torch.equal(a, sample_ddpm(gm.denoiser, big, sigmas[5:]))


def test_extra_args_reach_the_denoiser_and_progress_bar_runs():
    seen = []

    def denoiser(x, sigma, *, class_labels):
        assert sigma.shape == (x.shape[0],) and sigma.dtype == x.dtype
        seen.append(class_labels)
        return torch.zeros_like(x)

    labels = torch.tensor([1, 2])
    for name in SAMPLERS:
        get_sampler(name)(denoiser, torch.ones(2, 3), torch.tensor([2.0, 1.0, 0.0]),
                          extra_args={"class_labels": labels}, progress=True)
    assert len(seen) >= 2 * len(SAMPLERS) and all(v is labels for v in seen)


def test_float32_stays_float32():
    gm = GaussianMixture([1.0], [[0.0, 0.0]], [1.0])
    x = torch.randn(4, 2)
    for name in SAMPLERS:
        assert get_sampler(name)(gm.denoiser, x, grids.karras_sigmas(3, 0.1, 1.0)).dtype == torch.float32


def test_bad_names_and_grids_raise():
    with pytest.raises(ValueError, match="ddim.*ddpm"):
        get_sampler("euler_a")
    x = torch.zeros(2, 3)
    D = lambda x, sigma: x  # noqa: E731
    for name in SAMPLERS:
        for bad in ([1.0, 2.0, 0.0], [2.0, 2.0, 0.0], [[2.0, 0.0]], [2.0, float("nan"), 0.0], [2.0, -1.0], []):
            with pytest.raises(ValueError, match="sigmas"):
                get_sampler(name)(D, x, torch.tensor(bad))
    with pytest.raises(ValueError, match="eta"):
        sample_ddim(D, x, torch.tensor([1.0, 0.0]), eta=1.5)
    with pytest.raises(ValueError, match="fixed_small"):
        sample_ddpm(D, x, torch.tensor([1.0, 0.0]), variance="learned_range")
    with pytest.raises(ValueError, match="x0_and_v"):
        sample_ddpm(D, x, torch.tensor([1.0, 0.0]), variance="learned")


def test_every_sampler_accepts_the_shared_keywords():
    """The contract of samplers/common.py: noise, extra_args, callback and progress are accepted by all
    (deterministic samplers simply never call noise)."""
    import inspect

    for name, fn in SAMPLERS.items():
        params = inspect.signature(fn).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            continue  # a thin wrapper that forwards everything to a sampler checked here too
        missing = {"noise", "extra_args", "callback", "progress"} - set(params)
        assert not missing, f"{name} lacks {missing}"
