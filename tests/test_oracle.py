"""The closed-form oracle: exact networks in every frame, the exact ODE solution, the metrics, and
the adaptive reference solver it is built on."""
import math

import pytest
import torch

from difflab.core import EDM, VE, Denoiser, Flow, VPContinuous, VPDiscrete
from difflab.oracle import GaussianMixture, rmse_to_exact, single_gaussian_ode
from difflab.samplers.adaptive import sample_adaptive, solve_ode

F64 = torch.float64

FRAMES = [
    VPDiscrete.from_name("linear", 1000),
    VPDiscrete.from_name("scaled_linear", 1000),
    VPContinuous("cosine"),
    VPContinuous("linear", time_scale=1000),
    VE(),
    VE(time="sigma"),
    EDM(),
    Flow(),
    Flow(time_scale=1000),
]
PREDICTIONS = ["eps", "x0", "v", "score", "flow"]
CASES = [(f, p) for f in FRAMES for p in PREDICTIONS] + [(EDM(), "edm"), (EDM(sigma_data=1.0), "edm")]  # F needs EDM's frame


@pytest.mark.parametrize("frame,prediction", CASES, ids=lambda v: v if isinstance(v, str) else type(v).__name__)
def test_exact_network_reproduces_the_exact_denoiser(frame, prediction):
    gm = GaussianMixture.random(6, 3, seed=0)
    denoiser = Denoiser(gm.network(frame, prediction), frame, prediction)
    g = torch.Generator().manual_seed(1)
    x0 = gm.sample(8, g)
    for sigma in (0.03, 0.4, 2.0, 25.0):
        if not frame.sigma_min < sigma < frame.sigma_max:
            continue  # outside the model's levels its time is clamped (scaled_linear: 0.029 to 14.6)
        x = x0 + sigma * torch.randn(8, 6, generator=g, dtype=F64)
        torch.testing.assert_close(denoiser(x, sigma), gm.denoiser(x, sigma), rtol=1e-9, atol=1e-9 * (1 + sigma))
    # per-sample sigmas and (B, ...) shapes go through as well
    sigma = torch.tensor([0.1, 1.0, 5.0, 0.5], dtype=F64)
    x = x0[:4].reshape(4, 2, 3) + sigma[:, None, None] * torch.randn(4, 2, 3, generator=g, dtype=F64)
    torch.testing.assert_close(denoiser(x, sigma), gm.denoiser(x, sigma), rtol=1e-9, atol=1e-8)


def test_network_outputs_what_the_frame_expects():
    """The eps network's output is the true noise posterior mean, seen from the network side:
    for a one-point 'mixture' (tiny variance) it recovers the eps that made x_in."""
    frame = VPDiscrete.from_name("linear", 1000)
    gm = GaussianMixture([1.0], [[0.3, -0.2]], [1e-12])
    eps = torch.randn(5, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
    t = torch.tensor([10.0, 200.0, 500.0, 800.0, 999.0], dtype=F64)
    ab = frame.alpha_bars[t.long()]
    x_in = ab.sqrt()[:, None] * gm.means + (1 - ab).sqrt()[:, None] * eps
    torch.testing.assert_close(gm.network(frame, "eps")(x_in, t), eps, rtol=1e-8, atol=1e-8)
    # diffusers drives it with a 0-d integer timestep
    torch.testing.assert_close(gm.network(frame, "eps")(x_in[2:3], torch.tensor(500)), eps[2:3], rtol=1e-8, atol=1e-8)


def test_denoiser_handles_different_sigmas_in_one_batch():
    gm = GaussianMixture.random(4, 3, seed=3)
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    sigma = torch.tensor([0.01, 0.1, 0.5, 1.0, 3.0, 100.0], dtype=F64)
    together = gm.denoiser(x, sigma)
    one_by_one = torch.cat([gm.denoiser(x[i:i + 1], sigma[i]) for i in range(6)])
    torch.testing.assert_close(together, one_by_one, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------
# The exact ODE solution

@pytest.mark.parametrize("sigma_end", [0.0, 0.05, 2.0])
def test_exact_ode_solution_is_the_single_gaussian_closed_form(sigma_end):
    d, s, sigma_max = 3, 0.4, 80.0
    mu = torch.tensor([0.5, -1.0, 2.0], dtype=F64)
    gm = GaussianMixture([1.0], mu[None], [s**2])
    x = sigma_max * torch.randn(16, d, generator=torch.Generator().manual_seed(0), dtype=F64)
    exact = single_gaussian_ode(x, sigma_max, sigma_end, mu, s)
    out = gm.exact_ode_solution(x, (sigma_max, sigma_end))
    assert rmse_to_exact(out, exact) < 3e-10  # rtol = atol = 1e-10 on |x| of a few units
    grid = torch.tensor([sigma_max, 10.0, 1.0, sigma_end], dtype=F64) if sigma_end else torch.tensor([sigma_max, 1.0, 0.0])
    assert rmse_to_exact(gm.exact_ode_solution(x, grid), exact) < 3e-10  # a grid: only its ends count


def test_exact_ode_solution_of_a_mixture_is_consistent_and_lands_on_the_data():
    gm = GaussianMixture.random(4, 3, seed=1, mean_scale=1.0)
    x = 80 * torch.randn(32, 4, generator=torch.Generator().manual_seed(1), dtype=F64)
    direct = gm.exact_ode_solution(x, (80.0, 0.0))
    halfway = gm.exact_ode_solution(x, (80.0, 1.0))
    assert rmse_to_exact(gm.exact_ode_solution(halfway, (1.0, 0.0)), direct) < 1e-8  # the flow composes
    back = gm.exact_ode_solution(direct, (1e-7, 80.0))  # and is invertible (integrated upwards)
    assert rmse_to_exact(back, x) < 1e-5 * 80
    # from the exact marginal at sigma_max the solution is distributed as the data
    g = torch.Generator().manual_seed(2)
    x_marg = gm.sample(4000, g) + 80 * torch.randn(4000, 4, generator=g, dtype=F64)
    out = gm.exact_ode_solution(x_marg, (80.0, 0.0), rtol=1e-6, atol=1e-6)
    assert gm.frechet_to_truth(out) < 0.05
    assert abs(gm.mean_nll(out) - gm.mean_nll(gm.sample(4000, g))) < 0.15


def test_exact_ode_solution_rejects_bad_sigmas():
    gm = GaussianMixture([1.0], [[0.0]], [1.0])
    with pytest.raises(ValueError, match="sigmas"):
        gm.exact_ode_solution(torch.zeros(2, 1, dtype=F64), (5.0,))


# ----------------------------------------------------------------------------
# Metrics

def test_rmse_to_exact():
    a = torch.zeros(4, 3, dtype=F64)
    assert rmse_to_exact(a, a) == 0.0
    assert math.isclose(rmse_to_exact(a + 2.0, a), 2.0)
    b = a.clone()
    b[0, 0] = 12.0  # one coordinate of twelve
    assert math.isclose(rmse_to_exact(b, a), 12 / math.sqrt(12))
    with pytest.raises(ValueError, match="shapes"):
        rmse_to_exact(a, a[:2])


def test_frechet_to_truth_small_for_true_samples_and_larger_for_shifted_ones():
    gm = GaussianMixture.random(3, 4, seed=2, mean_scale=1.0)
    g = torch.Generator().manual_seed(0)
    true = gm.sample(20_000, g)
    fd_true = gm.frechet_to_truth(true)
    assert 0 <= fd_true < 0.01
    assert gm.frechet_to_truth(true + 0.3) > fd_true + 0.25  # |shift|^2 = 0.27
    assert gm.frechet_to_truth(true * 0.7) > fd_true + 0.05  # too narrow
    torch.testing.assert_close(gm.frechet_to_truth(true.reshape(-1, 3, 1)), fd_true)  # (B, ...) is flattened


def test_mean_nll_of_true_samples_is_the_entropy():
    # one Gaussian: entropy = d/2 log(2 pi e) + 1/2 log det Sigma
    cov = torch.tensor([[0.5, 0.1], [0.1, 0.2]], dtype=F64)
    gm = GaussianMixture([1.0], [[1.0, -1.0]], cov[None])
    g = torch.Generator().manual_seed(0)
    entropy = math.log(2 * math.pi * math.e) + 0.5 * math.log(torch.linalg.det(cov).item())
    assert abs(gm.mean_nll(gm.sample(50_000, g)) - entropy) < 0.02
    # well-separated components: entropy = H(w) + sum_k w_k H_k
    w = torch.tensor([0.3, 0.7], dtype=F64)
    far = GaussianMixture(w, [[-20.0, 0.0], [20.0, 0.0]], [0.5, 2.0])
    h = -(w * w.log()).sum().item() + sum(wk * (math.log(2 * math.pi * math.e) + math.log(v)) for wk, v in zip(w.tolist(), [0.5, 2.0]))
    assert abs(far.mean_nll(far.sample(50_000, g)) - h) < 0.03
    # samples from the wrong density score worse
    assert far.mean_nll(far.sample(5000, g) * 1.5) > h + 0.5


def test_random_mixture_is_reproducible_and_valid():
    a, b = GaussianMixture.random(8, 5, seed=4), GaussianMixture.random(8, 5, seed=4)
    assert torch.equal(a.means, b.means) and torch.equal(a.covs, b.covs)
    assert not torch.equal(a.means, GaussianMixture.random(8, 5, seed=5).means)
    stds = a.eigvals.sqrt()
    assert 0.05 - 1e-9 <= stds.min() and stds.max() <= 0.5 + 1e-9
    torch.testing.assert_close(a.covs, a.covs.transpose(-1, -2), rtol=0, atol=0)
    assert math.isclose(a.weights.sum().item(), 1.0)


def test_noisy_marginal_is_the_mixture_convolved_with_noise():
    gm = GaussianMixture.random(2, 2, seed=0)
    g = torch.Generator().manual_seed(0)
    x = gm.sample(40_000, g) + 0.7 * torch.randn(40_000, 2, generator=g, dtype=F64)
    noisy = gm.noisy(0.7)
    torch.testing.assert_close(x.T.cov(), noisy.covariance, rtol=0, atol=0.02)
    assert abs(noisy.mean_nll(x) - noisy.mean_nll(noisy.sample(40_000, g))) < 0.03


# ----------------------------------------------------------------------------
# The adaptive reference solver

def test_adaptive_converges_to_the_closed_form_as_rtol_shrinks_and_counts_nfe():
    d, s, sigma_max, sigma_min = 4, 0.5, 80.0, 0.002
    mu = torch.linspace(-1, 2, d, dtype=F64)
    gm = GaussianMixture([1.0], mu[None], [s**2])
    calls = []
    counted = lambda x, sigma: calls.append(1) or gm.denoiser(x, sigma)  # noqa: E731
    x = sigma_max * torch.randn(32, d, generator=torch.Generator().manual_seed(0), dtype=F64)
    exact = single_gaussian_ode(x, sigma_max, sigma_min, mu, s)
    errors, nfes = [], []
    for rtol in (1e-3, 1e-5, 1e-7, 1e-9):
        calls.clear()
        out, info = sample_adaptive(counted, x, torch.tensor([sigma_max, sigma_min]), rtol=rtol, atol=rtol,
                                    return_info=True)
        assert info["nfe"] == len(calls) and info["accepted"] > 0
        errors.append(rmse_to_exact(out, exact))
        nfes.append(info["nfe"])
    assert all(b < a / 20 for a, b in zip(errors, errors[1:])), errors  # ~100x tighter each time
    assert errors[-1] < 1e-9 and errors[0] < 1e-2
    assert nfes == sorted(nfes) and nfes[-1] > 3 * nfes[0]
    assert torch.is_tensor(sample_adaptive(gm.denoiser, x, torch.tensor([sigma_max, 1.0])))  # plain x by default


def test_adaptive_grid_points_are_outputs_and_a_restart_continues_the_trajectory():
    gm = GaussianMixture.random(3, 2, seed=0)
    x = 20 * torch.randn(8, 3, generator=torch.Generator().manual_seed(5), dtype=F64)
    sigmas = torch.tensor([20.0, 5.0, 1.0, 0.2, 0.02, 0.0], dtype=F64)
    states = []
    full = sample_adaptive(gm.denoiser, x, sigmas, rtol=1e-6, atol=1e-6, callback=states.append)
    assert [s["i"] for s in states] == list(range(5)) and [s["sigma_next"] for s in states] == sigmas[1:].tolist()
    assert torch.equal(full, states[-1]["x"]) and torch.equal(states[-1]["x"], states[-1]["denoised"])
    for k, state in enumerate(states[:-1]):  # each intermediate output is the ODE solution there
        exact = gm.exact_ode_solution(x, (20.0, float(sigmas[k + 1])))
        assert rmse_to_exact(state["x"], exact) < 1e-5
    rest = sample_adaptive(gm.denoiser, states[1]["x"], sigmas[2:], rtol=1e-6, atol=1e-6)
    assert torch.equal(rest, full)
    # the step to 0 is the denoised estimate at the last level
    assert torch.equal(sample_adaptive(gm.denoiser, x, torch.tensor([20.0, 0.0])), gm.denoiser(x, 20.0))


def test_adaptive_float32_and_bad_arguments():
    gm = GaussianMixture([1.0], [[0.0, 1.0]], [0.25])
    out = sample_adaptive(gm.denoiser, 10 * torch.randn(4, 2), torch.tensor([10.0, 0.1, 0.0]), rtol=1e-4, atol=1e-4)
    assert out.dtype == torch.float32 and bool(torch.isfinite(out).all())
    with pytest.raises(ValueError, match="rtol"):
        sample_adaptive(gm.denoiser, torch.zeros(2, 2), torch.tensor([1.0, 0.0]), rtol=0)
    with pytest.raises(ValueError, match="sigmas"):
        sample_adaptive(gm.denoiser, torch.zeros(2, 2), torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="positive"):
        solve_ode(gm.denoiser, torch.zeros(2, 2), 1.0, 0.0)
    x = torch.ones(3, 2, dtype=F64)
    assert solve_ode(gm.denoiser, x, 2.0, 2.0)[0] is x
    with pytest.raises(RuntimeError, match="max_nfe"):
        sample_adaptive(gm.denoiser, torch.ones(2, 2), torch.tensor([10.0, 0.01]), rtol=1e-10, atol=1e-10, max_nfe=50)
