"""Consistency models, LCM and TCD: the boundary condition of the consistency function, the
samplers against diffusers' CMStochasticIterativeScheduler, LCMScheduler and TCDScheduler step by
step (float64, the same network and the same noise), their grids, and how they relate to each other."""
import math

import pytest
import torch
from diffusers import CMStochasticIterativeScheduler, LCMScheduler, TCDScheduler
from diffusers.schedulers import scheduling_consistency_models, scheduling_lcm, scheduling_tcd
from test_samplers import SmoothNet, from_list, noise_list

from difflab.core import EDM, ConsistencyFunction, Denoiser, VPContinuous, VPDiscrete, grids, schedules
from difflab.core.consistency import cm_scalings, lcm_scalings
from difflab.samplers import SAMPLERS, sample_ddim
from difflab.guidance import ClassifierFreeGuidance
from difflab.samplers.consistency import sample_consistency, sample_lcm, sample_tcd, tcd_sigma, wrapped

F64 = torch.float64
SHAPE = (2, 3, 3)
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v"}
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers.*"),
              pytest.mark.filterwarnings("ignore::FutureWarning:diffusers.*")]


class Wild:
    """A network whose output is huge and unrelated to its input: the boundary must not see it."""

    def __call__(self, x_in, t):
        return 1e6 * torch.sin(7 * x_in + t.reshape(-1, *[1] * (x_in.ndim - 1)))


# ----------------------------------------------------------------------------
# The consistency function

@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("sigma_min", [0.002, 0.01])
def test_boundary_condition_holds_bit_exactly(dtype, sigma_min):
    frame = EDM(sigma_min=sigma_min)
    x = torch.randn(5, *SHAPE, generator=torch.Generator().manual_seed(0), dtype=dtype)
    for f in (ConsistencyFunction(Wild(), frame), ConsistencyFunction(Denoiser(Wild(), frame, "eps"))):
        assert f.sigma_min == sigma_min
        assert torch.equal(f(x, sigma_min), x)
        assert torch.equal(f(x, torch.full((5,), sigma_min, dtype=dtype)), x)
    c_skip, c_out = cm_scalings(torch.tensor(sigma_min, dtype=dtype), sigma_min)
    assert float(c_skip) == 1.0 and float(c_out) == 0.0


def test_cm_scalings_leave_the_skip_as_sigma_grows():
    sigma = torch.logspace(-2, math.log10(80), 50, dtype=F64)
    c_skip, c_out = cm_scalings(sigma, 0.002, 0.5)
    assert bool((c_skip.diff() < 0).all()) and float(c_skip[-1]) < 4e-5  # 0.25 / 80^2
    torch.testing.assert_close(c_out[-1], torch.tensor(0.5 * (80 - 0.002) / math.hypot(80, 0.5), dtype=F64),
                               rtol=1e-14, atol=0)
    # F is the raw network on the EDM frame's input and time (Song et al. 2023, eq. 5 with c_in, c_noise)
    net, frame = SmoothNet((4,)), EDM()
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1), dtype=F64)
    s = torch.tensor([0.1, 1.0, 20.0], dtype=F64)
    c_skip, c_out = cm_scalings(s)
    expected = c_skip[:, None] * x + c_out[:, None] * net(x / (s**2 + 0.25).sqrt()[:, None], s.log() / 4)
    torch.testing.assert_close(ConsistencyFunction(net, frame)(x, s), expected, rtol=1e-14, atol=0)


def test_lcm_form_is_diffusers_scalings_on_the_vp_input():
    frame = VPDiscrete.from_name("scaled_linear", 1000)
    sched = LCMScheduler()
    for t in (0, 1, 259, 999):
        ours = lcm_scalings(torch.tensor(float(t), dtype=F64))
        assert [float(v) for v in ours] == pytest.approx(sched.get_scalings_for_boundary_condition_discrete(t), rel=1e-14)
    f = ConsistencyFunction(Denoiser(Wild(), frame, "eps"), form="lcm")
    x = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(0), dtype=F64)
    sigma_0 = frame.sigma_min  # t = 0: LCM's boundary, on the network's VP input
    assert f.sigma_min == sigma_0 and torch.equal(f(x, sigma_0), frame.scale(torch.tensor(sigma_0, dtype=F64)) * x)
    c_skip, _ = lcm_scalings(torch.tensor(999.0))
    assert float(c_skip) < 3e-9
    with pytest.raises(ValueError, match="VP frame"):
        ConsistencyFunction(Denoiser(Wild(), EDM(), "eps"), form="lcm")
    with pytest.raises(ValueError, match="form"):
        ConsistencyFunction(Wild(), EDM(), form="ect")
    assert ConsistencyFunction(Denoiser(Wild(), VPContinuous(), "eps"), form="lcm").frame is not None


def test_a_consistency_function_is_a_denoiser_for_grids_and_samplers():
    f = ConsistencyFunction(SmoothNet((4,)), EDM(sigma_max=80.0))
    sigmas = grids.for_denoiser(f, 3)  # the EDM frame's Karras grid
    torch.testing.assert_close(sigmas, grids.karras_sigmas(3, 0.002, 80.0), rtol=0, atol=0)
    assert float(f.prior_std(sigmas[0])) == 80.0 and f.sigma_max == 80.0
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(0), dtype=F64) * 80
    for name in ("consistency", "lcm", "euler", "dpmpp_2m"):
        out = SAMPLERS[name](f, x, sigmas, noise=from_list(noise_list(4, (2, 4))))
        assert out.shape == x.shape and bool(torch.isfinite(out).all()), name


# ----------------------------------------------------------------------------
# Grids: LCM's skipping-step timesteps

@pytest.mark.parametrize("T,original", [(1000, 50), (1000, 20), (1000, 1000), (500, 50), (37, 7)])
def test_lcm_timesteps_equal_diffusers(T, original):
    for n in sorted({n for n in (1, 2, 3, 4, 5, 7, 8, original // 2 or 1, original) if n <= original}):
        sched = LCMScheduler(num_train_timesteps=T, original_inference_steps=original)
        sched.set_timesteps(n)
        assert grids.lcm_timesteps(T, n, original).tolist() == sched.timesteps.tolist(), n
        tcd = TCDScheduler(num_train_timesteps=T, original_inference_steps=original)
        tcd.set_timesteps(n)
        assert tcd.timesteps.tolist() == sched.timesteps.tolist()
    assert grids.lcm_timesteps(1000, 4).tolist() == [999, 759, 499, 259]


def test_tcd_with_explicit_original_steps_picks_from_every_step():
    for n in (1, 3, 4, 6, 10):
        sched = TCDScheduler()
        sched.set_timesteps(n, original_inference_steps=50)  # passed explicitly: every training step
        assert grids.lcm_timesteps(1000, n, original_steps=1000).tolist() == sched.timesteps.tolist()


def test_lcm_grid_by_name():
    frame = VPDiscrete.from_name("scaled_linear", 1000)
    d = Denoiser(Wild(), frame, "eps")
    sig = grids.for_denoiser(d, 4, "lcm")
    torch.testing.assert_close(sig, grids.timestep_sigmas(frame, torch.tensor([999, 759, 499, 259])), rtol=0, atol=0)
    assert sig[-1] == 0 and bool((sig.diff() < 0).all())
    torch.testing.assert_close(grids.for_denoiser(d, 2, "lcm", original_steps=10),
                               grids.timestep_sigmas(frame, torch.tensor([999, 499])), rtol=0, atol=0)
    with pytest.raises(ValueError, match="VPDiscrete"):
        grids.for_denoiser(Denoiser(Wild(), EDM(), "eps"), 4, "lcm")
    with pytest.raises(ValueError, match="original_steps"):
        grids.lcm_timesteps(1000, 51)


# ----------------------------------------------------------------------------
# Parity with diffusers, every step, float64

def vp_run(sched, module, prediction, steps, draws, monkeypatch, *, eta=None):
    """diffusers' scheduler on SmoothNet from fixed VP noise, float64 schedule, the noise of ``draws``:
    returns (x_vp at the start, [(prev_sample, second output, model output)] per step)."""
    ab = schedules.discrete_alpha_bars("scaled_linear", 1000)
    sched.alphas_cumprod = ab.clone()
    sched.set_timesteps(steps)
    theirs_noise = from_list(draws)
    monkeypatch.setattr(module, "randn_tensor", lambda *a, **k: theirs_noise())
    x_vp = torch.randn((4,) + SHAPE, generator=torch.Generator().manual_seed(2), dtype=F64)
    net, sample, out = SmoothNet(SHAPE), x_vp, []
    for t in sched.timesteps.tolist():  # Python ints: LCMScheduler's c_skip, c_out of a tensor t are float32 (1e-9)
        eps = net(sample, t)
        step = sched.step(eps, t, sample, **({} if eta is None else {"eta": eta}))
        out.append((step.prev_sample, step[1], eps))
        sample = step.prev_sample
    monkeypatch.undo()
    return x_vp, out, theirs_noise.taken


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [1, 4, 6])
def test_lcm_equals_diffusers_lcm_scheduler(monkeypatch, prediction, steps):
    draws = noise_list(steps, (4,) + SHAPE)
    x_vp, theirs, taken = vp_run(LCMScheduler(prediction_type=prediction), scheduling_lcm, prediction, steps, draws,
                                 monkeypatch)
    frame = VPDiscrete(schedules.discrete_alpha_bars("scaled_linear", 1000))
    f = ConsistencyFunction(Denoiser(SmoothNet(SHAPE), frame, PREDICTIONS[prediction]), form="lcm")
    sigmas = grids.for_denoiser(f, steps, "lcm")
    ours, noise = [], from_list(draws)
    out = sample_lcm(f, x_vp * math.sqrt(1 + sigmas[0] ** 2), sigmas, noise=noise, callback=ours.append)
    assert noise.taken == taken == steps - 1 and torch.equal(out, ours[-1]["x"])
    for i, (info, (prev, denoised, _)) in enumerate(zip(ours, theirs)):
        s_next = float(sigmas[i + 1])
        torch.testing.assert_close(info["x"], prev * math.sqrt(1 + s_next**2), rtol=1e-10, atol=1e-10)  # VP -> canonical
        torch.testing.assert_close(info["denoised"], denoised, rtol=1e-10, atol=1e-10)


def test_lcm_in_float32_matches_diffusers_float64_run(monkeypatch):
    draws = noise_list(4, (4,) + SHAPE)
    x_vp, theirs, _ = vp_run(LCMScheduler(), scheduling_lcm, "epsilon", 4, draws, monkeypatch)
    frame = VPDiscrete(schedules.discrete_alpha_bars("scaled_linear", 1000))
    net = SmoothNet(SHAPE)
    f = ConsistencyFunction(Denoiser(lambda x_in, t: net(x_in.double(), t).float(), frame, "eps"), form="lcm")
    sigmas = grids.for_denoiser(f, 4, "lcm")
    out = sample_lcm(f, (x_vp * math.sqrt(1 + sigmas[0] ** 2)).float(), sigmas,
                     noise=from_list([z.float() for z in draws]))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), theirs[-1][0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gamma", [0.3, 0.7, 0.0])
@pytest.mark.parametrize("steps", [2, 4])
def test_tcd_equals_diffusers_tcd_scheduler(monkeypatch, gamma, steps):
    draws = noise_list(steps, (4,) + SHAPE)
    x_vp, theirs, taken = vp_run(TCDScheduler(), scheduling_tcd, "epsilon", steps, draws, monkeypatch, eta=gamma)
    ab = schedules.discrete_alpha_bars("scaled_linear", 1000)
    frame = VPDiscrete(ab)
    denoiser = Denoiser(SmoothNet(SHAPE), frame, "eps")  # TCD steps with the model's plain x0 estimate
    sigmas = grids.for_denoiser(denoiser, steps, "lcm")
    ours, noise = [], from_list(draws)
    sample_tcd(denoiser, x_vp * math.sqrt(1 + sigmas[0] ** 2), sigmas, gamma=gamma, noise=noise, callback=ours.append)
    assert noise.taken == taken == (steps - 1 if gamma > 0 else 0)
    for info, (prev, _, _) in zip(ours[:-1], theirs[:-1]):
        torch.testing.assert_close(info["x"], prev * math.sqrt(1 + info["sigma_next"] ** 2), rtol=1e-10, atol=1e-10)
    # the last step: ours lands on x0_hat (sigma 0); diffusers stops at its first training step, s = 0,
    # i.e. sqrt(ab_0) x0_hat + sqrt(1 - ab_0) eps_hat with the same x0_hat and eps_hat
    prev, _, eps = theirs[-1]
    torch.testing.assert_close(ab[0].sqrt() * ours[-1]["x"] + (1 - ab[0]).sqrt() * eps, prev, rtol=1e-10, atol=1e-10)


def test_tcd_gamma_ends_are_ddim_and_lcm():
    frame = VPDiscrete.from_name("scaled_linear", 1000)
    denoiser = Denoiser(SmoothNet(SHAPE), frame, "eps")
    sigmas = grids.for_denoiser(denoiser, 5, "lcm")
    x = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(3), dtype=F64) * float(denoiser.prior_std(sigmas[0]))
    torch.testing.assert_close(sample_tcd(denoiser, x, sigmas, gamma=0.0), sample_ddim(denoiser, x, sigmas),
                               rtol=1e-12, atol=1e-12)
    draws = noise_list(4, (4,) + SHAPE)
    torch.testing.assert_close(sample_tcd(denoiser, x, sigmas, gamma=1.0, noise=from_list(draws)),
                               sample_lcm(denoiser, x, sigmas, noise=from_list(draws)), rtol=1e-12, atol=1e-12)
    # s = (1 - gamma) t_next, floored to a training step
    assert tcd_sigma(frame, float(frame.sigmas[259]), 0.3) == float(frame.sigmas[181])
    assert tcd_sigma(frame, float(frame.sigmas[1]), 0.3) == 0.0 and tcd_sigma(frame, 0.0, 0.3) == 0.0
    with pytest.raises(ValueError, match="gamma"):
        sample_tcd(denoiser, x, sigmas, gamma=1.5)
    # the frame is found through wrappers; a frameless function's time is sigma itself
    guided = ClassifierFreeGuidance(ConsistencyFunction(denoiser, form="lcm", sigma_min=0.01), 2.0, {})
    assert wrapped(guided, "frame") is frame and wrapped(guided, "sigma_min") == 0.01
    assert wrapped(lambda x, s: x, "frame") is None and tcd_sigma(None, 2.0, 0.25) == 1.5


@pytest.mark.parametrize("timesteps", [None, [22, 0], [39, 30, 10, 0]])
def test_multistep_consistency_sampling_equals_diffusers_cm_scheduler(monkeypatch, timesteps):
    sched = CMStochasticIterativeScheduler(num_train_timesteps=40, sigma_min=0.002, sigma_max=80.0, clip_denoised=False)
    sched.set_timesteps(num_inference_steps=4 if timesteps is None else None, timesteps=timesteps)
    ramp = torch.tensor(sched.timesteps.tolist(), dtype=F64)  # 250 log(sigma): back to float64 sigmas
    sigmas = torch.cat([(ramp / 250).exp(), torch.zeros(1, dtype=F64)])
    torch.testing.assert_close(sigmas[:-1], sched.sigmas[:-1].to(F64), rtol=1e-6, atol=0)  # theirs in float32
    sched.sigmas = torch.cat([sigmas[:-1], torch.tensor([0.002], dtype=F64)])  # ... now float64 too
    steps = len(sigmas) - 1
    draws = noise_list(steps, (4,) + SHAPE)
    theirs_noise = from_list(draws)
    monkeypatch.setattr(scheduling_consistency_models, "randn_tensor", lambda *a, **k: theirs_noise())
    net = SmoothNet(SHAPE)  # a CM network: F(c_in x, 250 log sigma)
    x = torch.randn((4,) + SHAPE, generator=torch.Generator().manual_seed(2), dtype=F64) * 80.0
    theirs, sample = [], x
    for t in sched.timesteps:
        sample = sched.step(net(sched.scale_model_input(sample, t), t), t, sample).prev_sample
        theirs.append(sample)
    monkeypatch.undo()

    f = ConsistencyFunction(lambda x_in, t: net(x_in, 1000 * t), EDM(sigma_data=0.5, sigma_min=0.002, sigma_max=80.0))
    ours, noise = [], from_list(draws)
    out = sample_consistency(f, x, sigmas, noise=noise, callback=ours.append)
    assert noise.taken == steps - 1 and torch.equal(out, ours[-1]["x"])
    for info, prev in zip(ours, theirs):
        torch.testing.assert_close(info["x"], prev, rtol=1e-10, atol=1e-10)
    # one step from sigma_max is f itself
    torch.testing.assert_close(sample_consistency(f, x, [80.0, 0.0]), f(x, 80.0), rtol=0, atol=0)


def test_consistency_noise_scale_and_defaults():
    seen = []
    f = lambda x, s: torch.zeros_like(x)  # noqa: E731  (x0_hat = 0: the sample is the noise alone)
    x = torch.ones(3, 2, dtype=F64)
    z = [torch.ones(3, 2, dtype=F64)] * 3
    out = sample_consistency(f, x, [5.0, 2.0, 0.5, 0.0], sigma_min=1.0, noise=from_list(z), callback=seen.append)
    assert [float(i["x"][0, 0]) for i in seen] == pytest.approx([math.sqrt(3.0), 0.0, 0.0])  # sqrt(2^2 - 1); 0.5 < sigma_min
    assert torch.equal(out, torch.zeros(3, 2, dtype=F64))
    out = sample_lcm(f, x, [5.0, 2.0, 0.0], noise=from_list(z), callback=seen.append)
    assert float(seen[-2]["x"][0, 0]) == 2.0
    with pytest.raises(ValueError, match="sigma_min"):
        sample_consistency(f, x, [5.0, 0.0], sigma_min=-1.0)
