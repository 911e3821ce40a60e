"""DPM-Solver++ SDE samplers and the Brownian tree: diffusers parity, the data distribution they
reach, the tree's Brownian properties, and per-sample determinism."""
import inspect
import math
import textwrap

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler
from diffusers.schedulers import scheduling_dpmsolver_multistep
from scipy import stats
from test_samplers import from_list, noise_list
from test_samplers_dpm import F64, T, diffusers_steps

from difflab.core import SampleNoise, grids
from difflab.oracle import GaussianMixture
from difflab.samplers.brownian import BrownianTreeNoise
from difflab.samplers.dpm_solver import sample_dpm_multistep, sample_dpmpp_2m, sample_dpmpp_2s_ancestral, sample_dpmpp_3m
from difflab.samplers.sde import SAMPLERS, sample_dpmpp_2m_sde, sample_dpmpp_3m_sde

# diffusers warns about its own deprecations (and numpy 2 ones when given float64 schedules)
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers.*"),
              pytest.mark.filterwarnings("ignore::FutureWarning:diffusers.*")]

MIX = GaussianMixture([0.3, 0.7], [[-2.0], [1.5]], [0.5**2, 0.3**2])


# ----------------------------------------------------------------------------
# Parity with diffusers' sde-dpmsolver++

@pytest.mark.parametrize("solver_type,prediction,spacing,steps", [("midpoint", "epsilon", "linspace", 10),
                                                                  ("heun", "v_prediction", "trailing", 12),
                                                                  ("midpoint", "epsilon", "leading", 20)])
def test_2m_sde_matches_diffusers(monkeypatch, solver_type, prediction, spacing, steps):
    sched = DPMSolverMultistepScheduler(num_train_timesteps=T, solver_order=2, algorithm_type="sde-dpmsolver++",
                                        solver_type=solver_type, prediction_type=prediction, timestep_spacing=spacing)
    draws = noise_list(steps, (4, 2, 3, 3))  # diffusers draws on every step, difflab not on the step to 0
    errors, ours_noise = diffusers_steps(sched, lambda *a, **k: sample_dpmpp_2m_sde(*a, solver_type=solver_type, **k),
                                         steps, prediction, monkeypatch, draws=draws)
    assert max(errors) < 1e-10, errors
    assert ours_noise.taken == steps - 1


def test_3m_sde_matches_diffusers_once_its_d2_weight_has_the_expansions_sign(monkeypatch):
    """diffusers 0.42 weights D2 of the third-order SDE step by (1 - e^-2h - 2h)/(2h)^2 - 1/2
    (about -1); the expansion, k-diffusion and the ODE step at eta -> 0 have + 1/2 (about h/3).
    With that one sign changed, diffusers and difflab agree to float precision."""
    src = textwrap.dedent(inspect.getsource(DPMSolverMultistepScheduler.multistep_dpm_solver_third_order_update))
    theirs = "(1.0 - torch.exp(-2.0 * h) - 2.0 * h) / (2.0 * h) ** 2 - 0.5"
    assert theirs in src

    def run(patched):
        sched = DPMSolverMultistepScheduler(num_train_timesteps=T, solver_order=3, algorithm_type="sde-dpmsolver++")
        if patched:
            namespace = dict(vars(scheduling_dpmsolver_multistep))
            exec(src.replace(theirs, theirs.replace("- 0.5", "+ 0.5")), namespace)
            monkeypatch.setattr(sched, "multistep_dpm_solver_third_order_update",
                                namespace["multistep_dpm_solver_third_order_update"].__get__(sched))
        return diffusers_steps(sched, sample_dpmpp_3m_sde, 10, "epsilon", monkeypatch, draws=noise_list(10, (4, 2, 3, 3)))[0]

    assert max(run(patched=True)) < 1e-10
    assert max(run(patched=False)) > 1e-2


# ----------------------------------------------------------------------------
# The distribution they reach

def assert_is_the_mixture(out):
    n, mean, var = len(out), MIX.mean.item(), MIX.covariance.item()
    assert abs(out.mean().item() - mean) < 4 * (var / n) ** 0.5
    assert abs(out.var().item() / var - 1) < 0.06
    assert abs((out > 0).double().mean().item() - 0.7) < 0.03  # the mode weights
    w, m, sd = MIX.weights.numpy(), MIX.means[:, 0].numpy(), MIX.covs[:, 0, 0].sqrt().numpy()
    assert stats.kstest(out.numpy(), lambda v: (w * stats.norm.cdf((v[:, None] - m) / sd)).sum(1)).pvalue > 1e-3
    assert stats.kstest(out.numpy(), lambda v: stats.norm.cdf((v - mean) / var**0.5)).pvalue < 1e-6  # power


@pytest.mark.parametrize("name,kw", [("dpmpp_2m_sde", {}), ("dpmpp_2m_sde", {"solver_type": "heun"}), ("dpmpp_3m_sde", {}),
                                     ("dpmpp_2m_sde", {"eta": 0.5})])
def test_sde_samplers_reach_the_gaussian_mixture(name, kw):
    n, sigma_max = 4000, 80.0
    g = torch.Generator().manual_seed(0)
    x = MIX.sample(n, g) + sigma_max * torch.randn(n, 1, generator=g, dtype=F64)  # the exact marginal at sigma_max
    out = SAMPLERS[name](MIX.denoiser, x, grids.karras_sigmas(60, 0.002, sigma_max),
                         noise=lambda: torch.randn(n, 1, generator=g, dtype=F64), **kw)
    assert_is_the_mixture(out[:, 0])


def test_starting_mid_grid_from_noised_data_reaches_the_mixture():
    """img2img: x = x0 + sigma_k eps is the exact marginal at sigma_k, so the rest of the grid
    (history restarted) must still give the data distribution."""
    n = 4000
    g = torch.Generator().manual_seed(1)
    sigmas = grids.karras_sigmas(60, 0.002, 80.0)
    k = int((sigmas > 1.0).sum())
    x = MIX.sample(n, g) + sigmas[k] * torch.randn(n, 1, generator=g, dtype=F64)
    out = sample_dpmpp_2m_sde(MIX.denoiser, x, sigmas[k:], noise=lambda: torch.randn(n, 1, generator=g, dtype=F64))
    assert_is_the_mixture(out[:, 0])


# ----------------------------------------------------------------------------
# Contract: eta = 0, the final step, per-sample noise

def test_eta_zero_is_the_ode_sampler_and_draws_no_noise():
    x = 10 * torch.randn(16, 1, generator=torch.Generator().manual_seed(2), dtype=F64)
    sigmas = grids.karras_sigmas(12, 0.01, 10.0)
    none = from_list([])
    assert torch.equal(sample_dpmpp_2m_sde(MIX.denoiser, x, sigmas, eta=0.0, noise=none), sample_dpmpp_2m(MIX.denoiser, x, sigmas))
    assert torch.equal(sample_dpmpp_3m_sde(MIX.denoiser, x, sigmas, eta=0.0, noise=none), sample_dpmpp_3m(MIX.denoiser, x, sigmas))
    assert torch.equal(sample_dpmpp_2m_sde(MIX.denoiser, x, sigmas, eta=0.0, solver_type="heun", noise=none),
                       sample_dpmpp_2m(MIX.denoiser, x, sigmas, solver_type="heun"))
    assert none.taken == 0
    assert not torch.allclose(sample_dpmpp_2m_sde(MIX.denoiser, x, sigmas, s_noise=0.0), sample_dpmpp_2m(MIX.denoiser, x, sigmas))


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_final_step_returns_the_denoised_estimate_without_noise(name):
    x = 3 * torch.randn(8, 1, generator=torch.Generator().manual_seed(4), dtype=F64)
    draws = from_list(noise_list(5, (8, 1)))
    steps = []
    SAMPLERS[name](MIX.denoiser, x, grids.karras_sigmas(5, 0.01, 3.0), noise=draws, callback=steps.append)
    assert draws.taken == 4 and torch.equal(steps[-1]["x"], steps[-1]["denoised"])
    assert torch.equal(SAMPLERS[name](MIX.denoiser, x, torch.tensor([3.0, 0.0]), noise=from_list([])), MIX.denoiser(x, 3.0))


@pytest.mark.parametrize("kind", ["sample_noise", "brownian_tree"])
def test_batch_size_invariance(kind):
    sigmas = grids.karras_sigmas(15, 0.01, 20.0)

    def run(batch, start, seed=7):
        x = SampleNoise.for_run(seed + 100, batch, (2,), start=start, dtype=F64)() * sigmas[0]
        if kind == "sample_noise":
            noise = SampleNoise.for_run(seed, batch, (2,), start=start, dtype=F64)
        else:
            noise = BrownianTreeNoise.for_run(seed, batch, (2,), float(sigmas[-2]), float(sigmas[0]), start=start, dtype=F64)
        gm = GaussianMixture([0.5, 0.5], [[-1.0, 0.0], [1.0, 1.0]], [0.1, 0.2])
        return sample_dpmpp_2m_sde(gm.denoiser, x, sigmas, noise=noise)

    big = run(6, 0)
    assert torch.equal(big, run(6, 0)) and not torch.equal(big, run(6, 0, seed=8))
    torch.testing.assert_close(run(1, 2)[0], big[2], rtol=0, atol=1e-12)
    torch.testing.assert_close(run(3, 1), big[1:4], rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------
# The Brownian tree

def test_brownian_increments_have_variance_t_minus_s_and_are_independent():
    n = 1000
    tree = BrownianTreeNoise((n, 1), 0.01, 10.0, range(n))
    w = {t: tree.W(t)[:, 0] for t in (0.5, 2.0, 2.1, 10.0, 0.01)}
    assert torch.equal(w[0.01], torch.zeros(n))
    pairs = [(0.5, 2.0), (2.0, 2.1), (0.01, 10.0), (0.01, 0.5)]
    increments = [w[t] - w[s] for s, t in pairs]
    for (s, t), inc in zip(pairs, increments):
        assert abs(inc.var().item() / (t - s) - 1) < 0.2, (s, t, inc.var().item())
        assert abs(inc.mean().item()) < 4 * math.sqrt((t - s) / n)
    corr = torch.corrcoef(torch.stack(increments[:2] + [increments[3]]))
    assert (corr - torch.eye(3, dtype=F64)).abs().max() < 0.12, corr  # disjoint increments: uncorrelated
    z = tree(2.0, 0.5)  # the samplers' call: the increment scaled to unit variance
    assert z.dtype == torch.float32 and z.shape == (n, 1)
    torch.testing.assert_close(z.double()[:, 0], (w[0.5] - w[2.0]) / 1.5**0.5, rtol=1e-6, atol=1e-6)


def test_brownian_increments_of_a_refined_grid_sum_to_the_coarse_increment():
    tree = BrownianTreeNoise((3, 2), 0.002, 80.0, [11, 12, 13], dtype=F64)
    coarse = grids.karras_sigmas(6, 0.002, 80.0)[:-1]
    for s, t in zip(coarse[:-1].tolist(), coarse[1:].tolist()):
        fine = torch.linspace(s, t, 6, dtype=F64).tolist()
        total = sum(tree.increment(a, b) for a, b in zip(fine[:-1], fine[1:]))
        torch.testing.assert_close(total, tree.increment(s, t), rtol=0, atol=1e-12)
        scaled = sum(tree(a, b) * abs(b - a) ** 0.5 for a, b in zip(fine[:-1], fine[1:]))
        torch.testing.assert_close(scaled / abs(t - s) ** 0.5, tree(s, t), rtol=0, atol=1e-10)


def test_brownian_tree_is_a_fixed_function_of_time_and_seed():
    seeds = [5, 6, 7]
    a = BrownianTreeNoise((3, 4), 0.01, 10.0, seeds)
    b = BrownianTreeNoise((3, 4), 0.01, 10.0, seeds)
    for t in (3.0, 0.02, 9.5):  # a different query order gives the same values
        a.W(t)
    assert torch.equal(a.W(1.234), b.W(1.234)) and torch.equal(a.W(3.0), b.W(3.0))
    single = BrownianTreeNoise((1, 4), 0.01, 10.0, [6])
    assert torch.equal(single.W(1.234)[0], a.W(1.234)[1])  # sample 1 does not depend on its batch
    run = BrownianTreeNoise.for_run(3, 4, (4,), 0.01, 10.0)
    assert torch.equal(BrownianTreeNoise.for_run(3, 2, (4,), 0.01, 10.0, start=2).W(0.7), run.W(0.7)[2:])
    assert not torch.equal(a.W(1.234)[0], a.W(1.234)[1])
    with pytest.raises(ValueError, match="outside"):
        a.W(11.0)
    with pytest.raises(ValueError, match="different"):
        a(1.0, 1.0)
    with pytest.raises(ValueError, match="seed"):
        BrownianTreeNoise((2, 4), 0.01, 10.0, [1])


def test_sde_solutions_converge_as_the_brownian_grid_is_refined():
    """With one Brownian path the 2M SDE solutions of refined grids converge to one another
    (strong convergence); independent noise per step gives unrelated samples."""
    x = 20 * torch.randn(8, 1, generator=torch.Generator().manual_seed(3), dtype=F64)

    def solve(n, noise):
        return sample_dpmpp_2m_sde(MIX.denoiser, x, grids.karras_sigmas(n, 0.01, 20.0), noise=noise)

    tree = lambda: BrownianTreeNoise.for_run(9, 8, (1,), 0.01, 20.0, dtype=F64)  # noqa: E731
    reference = solve(512, tree())
    errors = [(solve(n, tree()) - reference).abs().max().item() for n in (32, 64, 128)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.25 * errors[0], errors
    g = torch.Generator().manual_seed(9)
    independent = (solve(128, lambda: torch.randn(8, 1, generator=g, dtype=F64)) - reference).abs().max().item()
    assert independent > 10 * errors[2], (independent, errors)


def test_ancestral_sampler_accepts_the_brownian_tree():
    x = 20 * torch.randn(4, 1, generator=torch.Generator().manual_seed(3), dtype=F64)
    sigmas = grids.karras_sigmas(10, 0.01, 20.0)
    tree = BrownianTreeNoise.for_run(1, 4, (1,), 0.01, 20.0, dtype=F64)
    a = sample_dpmpp_2s_ancestral(MIX.denoiser, x, sigmas, noise=tree)
    assert torch.equal(a, sample_dpmpp_2s_ancestral(MIX.denoiser, x, sigmas, noise=tree))
    assert not torch.allclose(a, sample_dpmpp_2s_ancestral(MIX.denoiser, x, sigmas, eta=0.0))
    assert torch.equal(sample_dpm_multistep(MIX.denoiser, x, sigmas, eta=1.0, noise=tree),
                       sample_dpmpp_2m_sde(MIX.denoiser, x, sigmas, noise=tree))
