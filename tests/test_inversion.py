"""DDIM inversion: parity with diffusers' DDIMInverseScheduler, and round trips through the exact
denoiser of one Gaussian that close as the steps increase."""
import math

import pytest
import torch
from diffusers import DDIMInverseScheduler
from test_samplers_euler import TimeSensitiveNet, rel_err

from difflab.core import Denoiser, VPDiscrete, grids, schedules
from difflab.oracle import GaussianMixture, single_gaussian_ode
from difflab.samplers import sample_ddim
from difflab.samplers.inversion import invert_ddim

F64 = torch.float64
PREDICTION = {"epsilon": "eps", "v_prediction": "v"}


def diffusers_inverse(T, steps, spacing, prediction, ab):
    sched = DDIMInverseScheduler(num_train_timesteps=T, clip_sample=False, timestep_spacing=spacing,
                                 prediction_type=prediction, set_alpha_to_one=True)
    sched.alphas_cumprod = ab.clone()
    sched.initial_alpha_cumprod = torch.tensor(1.0, dtype=F64)
    sched.set_timesteps(steps)
    return sched


# diffusers' step(model_output, t, sample) takes `sample` from the level t - T/steps (alpha = 1 before
# the first timestep) to the level t, in the VP frame. Which timestep the caller feeds the network
# is up to the caller: its inversion pipelines use t (the *next* level); invert_ddim evaluates D at
# the *current* level, so the loop below feeds the network the previous timestep, and the first
# timestep on the first step, where the sample is clean.

@pytest.mark.parametrize("steps", [50, 10])
def test_matches_diffusers_step_by_step(steps):
    T, shape = 1000, (2, 3, 3)
    ab = schedules.discrete_alpha_bars("linear", T)
    net = TimeSensitiveNet(shape)
    x0 = torch.randn((4,) + shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    sched = diffusers_inverse(T, steps, "leading", "epsilon", ab)
    theirs, sample = [], x0
    for k, t in enumerate(sched.timesteps):
        sample = sched.step(net(sample, sched.timesteps[max(k - 1, 0)]), t, sample).prev_sample
        theirs.append(sample / ab[t].sqrt())  # VP -> canonical

    sigmas = grids.timestep_sigmas(VPDiscrete(ab), grids.discrete_timesteps(T, steps, "leading"))  # the sampling grid
    ours = []
    out = invert_ddim(Denoiser(net, VPDiscrete(ab), "eps"), x0, sigmas, callback=ours.append)
    assert [info["sigma"] for info in ours] == sigmas.flip(0)[:-1].tolist()
    errors = [rel_err(info["x"], x) for info, x in zip(ours, theirs)]
    # The first step differs by O(sigma_0^2) = 1e-4 in the network's input (diffusers feeds the
    # clean sample as is, D(x0; sigma_0) feeds x0 / sqrt(1 + sigma_0^2)), times sigma_0 in x.
    assert len(errors) == steps and max(errors) < 1e-5, errors
    assert torch.equal(out, ours[-1]["x"])


@pytest.mark.parametrize("spacing,prediction", [("leading", "v_prediction"), ("trailing", "v_prediction"),
                                                ("trailing", "epsilon")])
def test_each_step_matches_diffusers_from_the_same_state(spacing, prediction):
    # Every step after the first, taken from our state, is diffusers' step. The first step (from
    # the clean sample, alpha = 1 for diffusers, sigma = 0 for us) is a convention: diffusers uses
    # the raw network output at t_0 as eps, we use (x0 - D(x0; sigma_0)) / sigma_0. They differ by
    # O(sigma_0^2) relative: 1e-4 for "leading" (t_0 = 0), 0.1 for "trailing" (t_0 = T/steps - 1).
    T, steps, shape = 1000, 10, (2, 3, 3)
    ab = schedules.discrete_alpha_bars("linear", T)
    net = TimeSensitiveNet(shape)
    x0 = torch.randn((4,) + shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    sched = diffusers_inverse(T, steps, spacing, prediction, ab)
    frame = VPDiscrete(ab)
    sigmas = grids.timestep_sigmas(frame, grids.discrete_timesteps(T, steps, spacing))
    ours = []
    invert_ddim(Denoiser(net, frame, PREDICTION[prediction]), x0, sigmas, callback=ours.append)
    t0 = sched.timesteps[0]
    first = sched.step(net(x0, t0), t0, x0).prev_sample / ab[t0].sqrt()
    assert rel_err(ours[0]["x"], first) < 2 * float(sigmas[-2]) ** 2
    for k in range(1, steps):
        t_prev, t = sched.timesteps[k - 1], sched.timesteps[k]
        x_vp = ours[k - 1]["x"] * ab[t_prev].sqrt()
        theirs = sched.step(net(x_vp, t_prev), t, x_vp).prev_sample / ab[t].sqrt()
        assert rel_err(ours[k]["x"], theirs) < 1e-12, k


# ----------------------------------------------------------------------------
# Round trips through the exact denoiser of N(mu, s^2 I)

def gaussian():
    mu = torch.tensor([0.5, -1.0, 2.0], dtype=F64)
    return mu, 0.5, GaussianMixture([1.0], mu[None], [0.5**2])


def test_invert_then_sample_reconstructs_the_input_as_steps_increase():
    mu, s, gm = gaussian()
    x0 = gm.sample(64, torch.Generator().manual_seed(1))
    errors = []
    for n in (8, 16, 32, 64, 128):
        sigmas = grids.karras_sigmas(n, 0.002, 80.0)  # ends in 0: x0 is a clean sample
        latent = invert_ddim(gm.denoiser, x0, sigmas)
        errors.append((sample_ddim(gm.denoiser, latent, sigmas) - x0).pow(2).mean().sqrt().item())
    orders = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    assert all(0.7 < p < 1.3 for p in orders), (errors, orders)  # exact only as steps -> infinity
    assert errors[-1] < 0.03 * x0.std().item(), errors


def test_the_latent_converges_to_the_exact_ode_solution_at_first_order():
    mu, s, gm = gaussian()
    sigma_min, sigma_max = 0.002, 80.0
    x0 = gm.sample(64, torch.Generator().manual_seed(1))
    exact = single_gaussian_ode(x0, sigma_min, sigma_max, mu, s)
    errors = []
    for n in (8, 16, 32, 64):
        latent = invert_ddim(gm.denoiser, x0, grids.karras_sigmas(n, sigma_min, sigma_max)[:-1])  # from sigma_min
        errors.append((latent - exact).pow(2).mean().sqrt().item() / sigma_max)
    orders = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    assert all(0.8 < p < 1.3 for p in orders), (errors, orders)


def test_one_step_inverts_one_ddim_step_exactly_when_d_is_constant():
    # With D independent of x the ODE's Euler steps are exact in both directions.
    x0 = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    target = torch.tensor([0.3, -0.7], dtype=F64)
    D = lambda x, sigma: target.expand_as(x)  # noqa: E731
    sigmas = torch.tensor([4.0, 1.5, 0.5], dtype=F64)
    latent = invert_ddim(D, x0, sigmas)
    torch.testing.assert_close(latent, target + 4.0 / 0.5 * (x0 - target), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(sample_ddim(D, latent, sigmas), x0, rtol=1e-14, atol=1e-14)


def test_edge_cases():
    mu, s, gm = gaussian()
    x0 = gm.sample(4, torch.Generator().manual_seed(1))
    assert torch.equal(invert_ddim(gm.denoiser, x0, torch.tensor([3.0])), x0)  # a one-level grid: nothing to do
    infos = []
    seen = []

    def denoiser(x, sigma, *, class_labels):
        seen.append(class_labels)
        return gm.denoiser(x, sigma)

    out = invert_ddim(denoiser, x0.float(), grids.karras_sigmas(4, 0.01, 10.0), extra_args={"class_labels": 3},
                      callback=infos.append, progress=True)
    assert out.dtype == torch.float32 and seen == [3] * 4
    assert [i["sigma"] for i in infos] == sorted(i["sigma"] for i in infos)
    assert infos[-1]["sigma_next"] == pytest.approx(10.0)
    assert torch.equal(infos[0]["denoised"], x0.float())  # at sigma = 0 the sample is its own estimate
    for bad in ([1.0, 2.0, 0.0], [2.0, 2.0, 0.0], [2.0, float("nan"), 0.0], []):
        with pytest.raises(ValueError, match="sigmas"):
            invert_ddim(gm.denoiser, x0, torch.tensor(bad))
