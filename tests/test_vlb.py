"""Improved DDPM: the VLB terms, the hybrid loss and learned-variance DDPM sampling
(Nichol & Dhariwal 2021), against closed forms, torch.distributions and diffusers."""
import math

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.schedulers import scheduling_ddpm
from torch import nn

from difflab.core import VE, Denoiser, VPDiscrete, append_dims, grids, q_posterior, schedules
from difflab.core.denoiser import learned_log_variance
from difflab.io import load_checkpoint
from difflab.samplers import sample_ddpm
from difflab.train import TrainConfig, diffusion_loss, train
from difflab.train.vlb import (discretized_gaussian_log_likelihood, hybrid_loss, hybrid_terms, normal_kl, step_variances,
                               training_steps, vlb_loss, vlb_terms)

F64 = torch.float64


class ExactNet(nn.Module):
    """An x0-predicting learned-variance network built from a canonical denoiser D(x, sigma):
    outputs cat([D(x, sigma), raw]) along dim 1, raw a constant in [-1, 1]."""

    def __init__(self, frame, denoise, raw):
        super().__init__()
        self.frame, self.denoise, self.raw = frame, denoise, raw

    def forward(self, x_in, t):
        sigma = self.frame.sigma(t).to(x_in.dtype)
        x = x_in * append_dims((1 + sigma**2).sqrt(), x_in.ndim)
        return torch.cat([self.denoise(x, sigma), torch.full_like(x_in, self.raw)], 1)


class SmoothNet2C:
    """A deterministic float64 stand-in network with 2C output channels: a fixed random linear map
    of x_in modulated by t; the last C channels are squashed into (-1, 1) with tanh."""

    def __init__(self, shape, seed=0, raw=None):
        g = torch.Generator().manual_seed(seed)
        d = math.prod(shape)
        self.shape, self.raw = shape, raw
        self.W = torch.randn(d, 2 * d, generator=g, dtype=F64) / d**0.5
        self.b = torch.randn((2 * shape[0],) + tuple(shape[1:]), generator=g, dtype=F64)

    def __call__(self, x_in, t):
        u = append_dims(torch.as_tensor(t, dtype=F64).expand(x_in.shape[0]) / 1000, x_in.ndim)
        lin = (x_in.reshape(x_in.shape[0], -1) @ self.W).reshape((x_in.shape[0], 2 * self.shape[0]) + self.shape[1:])
        out = lin * torch.cos(u) + 0.3 * torch.sin(3 * u) * self.b
        mean, raw = out.chunk(2, dim=1)
        raw = torch.tanh(raw) if self.raw is None else torch.full_like(raw, self.raw)
        return torch.cat([mean, raw], 1)


class MLP(nn.Module):
    """A tiny MLP net(x_in, t) for (B, d) data, output (B, 2d): mean channels then raw v."""

    def __init__(self, dim=2, hidden=64, T=100):
        super().__init__()
        self.T = T
        self.inp = nn.Linear(dim + 2, hidden)
        self.mid = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, 2 * dim)

    def forward(self, x_in, t):
        u = t.to(x_in.dtype)[:, None] / self.T
        h = nn.functional.silu(self.inp(torch.cat([x_in, (3 * u).sin(), (3 * u).cos()], 1)))
        return self.out(nn.functional.silu(self.mid(h)))


def vp(T=100, name="linear"):
    return VPDiscrete.from_name(name, T)


# ----------------------------------------------------------------------------------------------
# The densities


def test_normal_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(50, generator=g, dtype=F64), torch.randn(50, generator=g, dtype=F64)
    lv1, lv2 = 2 * torch.randn(50, generator=g, dtype=F64), 2 * torch.randn(50, generator=g, dtype=F64)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * lv1).exp()),
                                            torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), ref, rtol=1e-12, atol=1e-12)
    assert float(normal_kl(m1, lv1, m1, lv1).abs().max()) == 0.0


@pytest.mark.parametrize("mean,scale", [(0.3, 0.01), (0.999, 1e-3), (-0.5, 2.0), (3.0, 0.1), (-0.2, 1e-4), (0.0, 30.0)])
def test_decoder_probabilities_sum_to_one_over_the_256_bins(mean, scale):
    x = torch.linspace(-1, 1, 256, dtype=F64)
    logp = discretized_gaussian_log_likelihood(x, torch.full_like(x, mean), math.log(scale))
    assert torch.isfinite(logp).all() and (logp <= 0).all()
    assert abs(float(logp.exp().sum()) - 1) < 1e-12
    # each bin is the Gaussian mass over [x - 1/255, x + 1/255], the end bins reaching to -inf and +inf
    normal = torch.distributions.Normal(torch.tensor(mean, dtype=F64), torch.tensor(scale, dtype=F64))
    hi = normal.cdf(torch.where(x > 0.999, torch.full_like(x, math.inf), x + 1 / 255))
    lo = normal.cdf(torch.where(x < -0.999, torch.full_like(x, -math.inf), x - 1 / 255))
    torch.testing.assert_close(logp.exp(), hi - lo, rtol=1e-9, atol=1e-15)


def test_decoder_far_tail_stays_finite_and_accurate():
    x = torch.tensor([0.0, 0.5, -1.0], dtype=F64)
    logp = discretized_gaussian_log_likelihood(x, torch.full_like(x, 0.9), math.log(0.01))
    # the mass of a bin 40-90 standard deviations out: log of a difference of tiny cdfs
    std = torch.distributions.Normal(0.0, 1.0)
    assert torch.isfinite(logp).all() and (logp < -700).all()
    z = (x - 0.9) / 0.01
    approx = -0.5 * (z + 1 / 2.55) ** 2 - torch.log(-(z + 1 / 2.55)) - 0.5 * math.log(2 * math.pi)  # Mills' ratio
    torch.testing.assert_close(logp[2], approx[2], rtol=1e-3, atol=0)
    assert float(std.cdf(torch.tensor(-40.0))) == 0.0  # the naive difference of cdfs would give log 0


# ----------------------------------------------------------------------------------------------
# Learned variance in the denoiser


def test_learned_variance_hits_beta_at_v1_and_beta_tilde_at_v0():
    beta, beta_tilde = torch.tensor(0.02, dtype=F64), torch.tensor(0.013, dtype=F64)
    v = torch.tensor([0.0, 1.0, 0.5], dtype=F64)
    log_var = learned_log_variance(v, beta, beta_tilde)
    torch.testing.assert_close(log_var.exp(), torch.stack([beta_tilde, beta, (beta * beta_tilde).sqrt()]), rtol=1e-14, atol=0)
    # through the denoiser: raw output -1 is v = 0, +1 is v = 1, and the frame's betas are DDPM's
    frame = vp()
    beta_t, beta_tilde_t = step_variances(frame)
    torch.testing.assert_close(beta_t, schedules.betas_linear(100).to(F64), rtol=1e-10, atol=0)
    ab = frame.alpha_bars
    torch.testing.assert_close(beta_tilde_t[1:], (1 - ab[:-1]) / (1 - ab[1:]) * beta_t[1:], rtol=1e-12, atol=0)
    assert beta_tilde_t[0] == beta_tilde_t[1]  # beta~_0 = 0, clipped as in the paper's code
    for raw, want in [(-1.0, 0.0), (1.0, 1.0), (0.0, 0.5)]:
        d = Denoiser(ExactNet(frame, lambda x, s: 0.5 * x, raw), frame, "x0", learned_variance=True)
        x = torch.randn(3, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
        x0, v = d.x0_and_v(x, frame.sigmas[40])
        assert torch.equal(v, torch.full_like(x, want))
        torch.testing.assert_close(x0, 0.5 * x, rtol=1e-12, atol=0)
        assert torch.equal(d(x, frame.sigmas[40]), x0)  # the contract is unchanged: forward returns x0 only
        out, x_in, alpha, sigma_in = d.net_output(x, frame.sigmas[40])
        assert out.shape == x.shape == d.target(x, x, frame.sigmas[40]).shape


def test_learned_variance_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="VPDiscrete"):
        Denoiser(nn.Identity(), VE(), "eps", learned_variance=True)
    frame = vp()
    bad = Denoiser(lambda x_in, t: torch.cat([x_in, x_in, x_in], 1), frame, "eps", learned_variance=True)
    with pytest.raises(ValueError, match="2C = 4 channels"):
        bad(torch.zeros(2, 2), 1.0)
    plain = Denoiser(lambda x_in, t: x_in, frame, "eps")
    with pytest.raises(ValueError, match="learned_variance=True"):
        plain.x0_and_v(torch.zeros(2, 2), 1.0)
    with pytest.raises(ValueError, match="x0_and_v"):
        sample_ddpm(plain, torch.zeros(2, 2), grids.timestep_sigmas(frame, torch.tensor([50, 0])), variance="learned")
    with pytest.raises(ValueError, match="learned-variance denoiser"):
        vlb_loss(plain, torch.zeros(2, 2), frame.sigmas[3], torch.zeros(2, 2))
    good = Denoiser(MLP(), frame, "eps", learned_variance=True)
    with pytest.raises(ValueError, match="training steps"):
        hybrid_loss(good, torch.zeros(2, 2), torch.tensor([0.5, 1.0]), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="loss="):
        TrainConfig(loss="vlb")


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_float32_sigmas_map_back_to_their_training_steps(name):
    frame = vp(1000, name)
    t = torch.arange(1000)
    assert torch.equal(training_steps(frame, frame.sigmas.float()), t)
    assert torch.equal(training_steps(frame, frame.sigmas), t)


# ----------------------------------------------------------------------------------------------
# The VLB terms on exact models


def test_kl_is_zero_when_the_model_is_the_true_posterior():
    """One data point y: the exact denoiser is y itself, so with v = 0 (Sigma = beta~) the model's
    p(x_{t-1} | x_t) is exactly q(x_{t-1} | x_t, x0) and every KL term vanishes."""
    frame, g = vp(), torch.Generator().manual_seed(0)
    y = torch.tensor([[0.3, -0.7, 0.1]], dtype=F64)
    t = torch.arange(1, 100, 7)
    x0, noise = y.expand(len(t), 3), torch.randn(len(t), 3, generator=g, dtype=F64)
    exact = Denoiser(ExactNet(frame, lambda x, s: y.expand_as(x), -1.0), frame, "x0", learned_variance=True)
    kl = vlb_loss(exact, x0, frame.sigmas[t], noise)
    assert kl.shape == (len(t),) and float(kl.abs().max()) < 1e-12
    # a wrong variance (v = 1: beta_t) or a wrong mean gives a positive KL ...
    large = Denoiser(ExactNet(frame, lambda x, s: y.expand_as(x), 1.0), frame, "x0", learned_variance=True)
    assert (vlb_loss(large, x0, frame.sigmas[t], noise) > 1e-5).all()
    off = Denoiser(ExactNet(frame, lambda x, s: y.expand_as(x) + 0.01, -1.0), frame, "x0", learned_variance=True)
    assert (vlb_loss(off, x0, frame.sigmas[t], noise) > 0).all()
    # ... equal to the closed form 0.5 log(beta/beta~) + beta~/(2 beta) - 1/2 nats for v = 1
    beta, beta_tilde = step_variances(frame)
    want = (0.5 * (beta / beta_tilde).log() + 0.5 * beta_tilde / beta - 0.5)[t] / math.log(2)
    torch.testing.assert_close(vlb_loss(large, x0, frame.sigmas[t], noise), want, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("raw", [-1.0, 0.0, 1.0])
def test_expected_kl_on_standard_gaussian_data_is_closed_form(raw):
    """x0 ~ N(0, I): the true reverse p(x_{t-1} | x_t) is N(mu(x_t, E[x0 | x_t]), beta_t I), and with
    the exact x0_hat and a variance Sigma, E KL = (log(Sigma / beta~) + beta / Sigma - 1) / 2 per
    dimension: the mean parameterization and the KL checked together (a Monte Carlo over 40000 dims)."""
    frame, g = vp(), torch.Generator().manual_seed(1)
    t = torch.tensor([1, 3, 10, 30])
    x0 = torch.randn(len(t), 40000, generator=g, dtype=F64)
    noise = torch.randn(len(t), 40000, generator=g, dtype=F64)
    d = Denoiser(ExactNet(frame, lambda x, s: x / append_dims(1 + s**2, x.ndim), raw), frame, "x0", learned_variance=True)
    got = vlb_loss(d, x0, frame.sigmas[t], noise)
    beta, beta_tilde = (b[t] for b in step_variances(frame))
    v = (raw + 1) / 2
    var = (v * beta.log() + (1 - v) * beta_tilde.log()).exp()
    want = 0.5 * ((var / beta_tilde).log() + beta / var - 1) / math.log(2)
    torch.testing.assert_close(got, want, rtol=0.03, atol=1e-4)
    if raw == 1.0:  # Sigma = beta_t is the true reverse variance: the minimum, 0.5 log(beta / beta~)
        torch.testing.assert_close(want, 0.5 * (beta / beta_tilde).log() / math.log(2))


def test_vlb_terms_use_the_decoder_at_t0_and_the_kl_after():
    frame = vp()
    x0 = torch.tensor([[-1.0, 0.0 + 1 / 255, 1.0]], dtype=F64).expand(2, 3)
    x_t = torch.zeros(2, 3, dtype=F64)
    v = torch.full((2, 3), 0.25, dtype=F64)
    got = vlb_terms(frame, torch.tensor([0, 5]), x0, x_t, x0 + 0.003, v)
    beta, beta_tilde = step_variances(frame)
    logvar0 = 0.25 * beta[0].log() + 0.75 * beta_tilde[0].log()
    nll = -discretized_gaussian_log_likelihood(x0[0], x0[0] + 0.003, 0.5 * logvar0).mean() / math.log(2)
    ab = frame.alpha_bars
    true_mean, _ = q_posterior(x0[1], x_t[1], ab[5], ab[4])
    model_mean, _ = q_posterior(x0[1] + 0.003, x_t[1], ab[5], ab[4])
    logvar5 = 0.25 * beta[5].log() + 0.75 * beta_tilde[5].log()
    kl = normal_kl(true_mean, beta_tilde[5].log(), model_mean, logvar5).mean() / math.log(2)
    torch.testing.assert_close(got, torch.stack([nll, kl]), rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------------------------
# The hybrid loss


def _mlp_denoiser(prediction="eps", seed=0):
    torch.manual_seed(seed)
    return Denoiser(MLP().double(), vp(), prediction, learned_variance=True)


def _batch(d, n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(n, 2, generator=g, dtype=F64) * 2 - 1
    sigma = d.frame.sigmas[torch.randint(0, d.frame.T, (n,), generator=g)]
    return x0, sigma, torch.randn(n, 2, generator=g, dtype=F64)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_hybrid_with_lambda_zero_is_the_simple_loss(prediction):
    d = _mlp_denoiser(prediction)
    x0, sigma, noise = _batch(d)
    simple = diffusion_loss(d, x0, sigma, noise)
    assert torch.equal(hybrid_loss(d, x0, sigma, noise, vlb_weight=0.0), simple)
    s, vlb = hybrid_terms(d, x0, sigma, noise)
    assert torch.equal(s, simple) and (vlb > 0).all()
    torch.testing.assert_close(hybrid_loss(d, x0, sigma, noise), simple + 0.001 * 100 * vlb, rtol=1e-14, atol=0)
    torch.testing.assert_close(vlb, vlb_loss(d, x0, sigma, noise), rtol=1e-14, atol=0)
    weighted = diffusion_loss(d, x0, sigma, noise, weighting="min_snr")
    assert torch.equal(hybrid_loss(d, x0, sigma, noise, vlb_weight=0.0, weighting="min_snr"), weighted)


def test_vlb_term_trains_only_the_variance():
    """Eq. 16's stop-gradient: the vlb term reaches the variance outputs only, the simple term the
    mean outputs only; without the stop-gradient (vlb_loss) the mean rows get a gradient too."""
    d = _mlp_denoiser()
    x0, sigma, noise = _batch(d)
    last = d.net.out.weight

    def grad(loss):
        d.net.zero_grad()
        loss.sum().backward()
        return last.grad[:2].abs().max().item(), last.grad[2:].abs().max().item()

    mean_g, var_g = grad(hybrid_terms(d, x0, sigma, noise)[1])
    assert mean_g == 0.0 and var_g > 1e-6
    mean_g, var_g = grad(hybrid_terms(d, x0, sigma, noise)[0])
    assert mean_g > 1e-6 and var_g == 0.0
    mean_g, var_g = grad(vlb_loss(d, x0, sigma, noise))
    assert mean_g > 1e-6 and var_g > 1e-6


# ----------------------------------------------------------------------------------------------
# DDPM with learned variance


@pytest.mark.parametrize("raw,fixed", [(-1.0, "fixed_small"), (1.0, "fixed_large")])
def test_ddpm_learned_at_the_ends_is_fixed_small_and_fixed_large(raw, fixed):
    shape, frame = (2, 3), vp(1000)
    sigmas = grids.timestep_sigmas(frame, grids.discrete_timesteps(1000, 12, "trailing"))  # skips steps: respaced betas
    x = torch.randn((3,) + shape, generator=torch.Generator().manual_seed(2), dtype=F64) * frame.prior_std(sigmas[0])
    net = SmoothNet2C(shape, raw=raw)
    learned = Denoiser(net, frame, "eps", learned_variance=True)
    plain = Denoiser(lambda x_in, t: net(x_in, t)[:, :2], frame, "eps")
    g = torch.Generator().manual_seed(3)
    draws = [torch.randn(x.shape, generator=g, dtype=F64) for _ in range(12)]
    a = sample_ddpm(learned, x, sigmas, variance="learned", noise=iter(draws).__next__)
    b = sample_ddpm(plain, x, sigmas, variance=fixed, noise=iter(draws).__next__)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    other = "fixed_large" if fixed == "fixed_small" else "fixed_small"
    assert not torch.allclose(a, sample_ddpm(plain, x, sigmas, variance=other, noise=iter(draws).__next__), atol=1e-3)


@pytest.mark.parametrize("T,steps,spacing,prediction", [(1000, 50, "leading", "epsilon"), (1000, 20, "leading", "v_prediction"),
                                                        (100, 100, "leading", "epsilon")])
def test_learned_ddpm_matches_diffusers_learned_range_step_by_step(monkeypatch, T, steps, spacing, prediction):
    """Leading spacing only: with trailing spacing diffusers' last step (t = T/steps - 1 > 0) adds
    noise of variance exp(v log beta + (1 - v) log 1e-20) on the step to the clean sample; difflab
    adds none there (Algorithm 2)."""
    shape = (2, 3, 3)
    ab = schedules.discrete_alpha_bars("linear", T)
    net = SmoothNet2C(shape)
    x_vp = torch.randn((4,) + shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    g = torch.Generator().manual_seed(1)
    draws = [torch.randn((4,) + shape, generator=g, dtype=F64) for _ in range(steps)]

    sched = DDPMScheduler(num_train_timesteps=T, timestep_spacing=spacing, prediction_type=prediction, clip_sample=False,
                          variance_type="learned_range")
    sched.one = torch.tensor(1.0, dtype=F64)
    sched.alphas_cumprod = ab.clone()
    sched.set_timesteps(steps)
    theirs_draws = iter(draws)
    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *a, **k: next(theirs_draws))
    theirs, sample = [], x_vp
    for i, t in enumerate(sched.timesteps):
        out = sched.step(net(sample, t), t, sample)
        sample = out.prev_sample
        a_prev = ab[sched.timesteps[i + 1]] if i + 1 < len(sched.timesteps) else torch.tensor(1.0, dtype=F64)
        theirs.append((sample / a_prev.sqrt(), out.pred_original_sample))

    frame = VPDiscrete(ab)
    ts = grids.discrete_timesteps(T, steps, spacing)
    assert ts.tolist() == sched.timesteps.tolist()
    sigmas = grids.timestep_sigmas(frame, ts)
    d = Denoiser(net, frame, {"epsilon": "eps", "v_prediction": "v"}[prediction], learned_variance=True)
    ours, ours_draws = [], iter(draws)
    out = sample_ddpm(d, x_vp / ab[ts[0]].sqrt(), sigmas, variance="learned", noise=lambda: next(ours_draws),
                      callback=lambda info: ours.append((info["x"], info["denoised"])))
    assert len(ours) == len(theirs) == steps
    for i, ((x_ours, d_ours), (x_theirs, d_theirs)) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(d_ours, d_theirs, rtol=1e-8, atol=1e-10, msg=lambda m: f"step {i}: {m}")
        torch.testing.assert_close(x_ours, x_theirs, rtol=1e-8, atol=1e-10, msg=lambda m: f"step {i}: {m}")
    assert torch.equal(out, ours[-1][0])
    assert next(ours_draws, None) is draws[steps - 1]  # steps - 1 draws used: none on the final step


# ----------------------------------------------------------------------------------------------
# Training with the hybrid loss


def _two_moons(n, g):
    """Points on two arcs in [-1, 1]^2, quantized to the 256 levels the decoder assumes."""
    u = torch.rand(n, generator=g) * math.pi
    which = torch.randint(0, 2, (n,), generator=g)
    x = torch.stack([torch.cos(u) - 0.5 * which, torch.sin(u) * (1 - 2 * which) + 0.25 * which], 1) * 0.6
    x = x + 0.03 * torch.randn(n, 2, generator=g)
    return ((x.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


def _eval_terms(d, g):
    x0 = _two_moons(2000, g)
    t = torch.arange(2000) % d.frame.T
    with torch.no_grad():
        simple, vlb = hybrid_terms(d, x0, d.frame.sigmas[t].float(), torch.randn(2000, 2, generator=g))
    return float(simple.mean()), float(vlb.mean())


def _trained(loss, tmp_path):
    torch.manual_seed(0)
    d = Denoiser(MLP(hidden=64), vp(), "eps", learned_variance=True)
    cfg = TrainConfig(steps=300, batch_size=128, lr=3e-3, loss=loss, vlb_weight=0.001, progress=False, log_every=0,
                      checkpoint_every=0)
    state = train(d, _two_moons(4096, torch.Generator().manual_seed(0)), cfg, tmp_path / loss)
    assert state.step == 300
    return d


def test_hybrid_training_lowers_both_terms(tmp_path):
    """A tiny MLP on 2-D data, T = 100: the hybrid loss lowers L_simple and L_vlb, and L_vlb ends
    lower than after training on L_simple alone from the same start (which leaves v untrained)."""
    torch.manual_seed(0)
    simple0, vlb0 = _eval_terms(Denoiser(MLP(hidden=64), vp(), "eps", learned_variance=True), torch.Generator().manual_seed(1))
    simple1, vlb1 = _eval_terms(_trained("hybrid", tmp_path), torch.Generator().manual_seed(1))
    simple_mse, vlb_mse = _eval_terms(_trained("mse", tmp_path), torch.Generator().manual_seed(1))
    # measured: simple 1.015 -> 0.455, vlb 0.1026 -> 0.0823 bits/dim; 0.0869 after mse training
    assert simple1 < 0.6 * simple0, (simple0, simple1)
    assert vlb1 < 0.9 * vlb0, (vlb0, vlb1)
    assert vlb1 < 0.97 * vlb_mse, (vlb_mse, vlb1)
    assert abs(simple1 - simple_mse) < 0.02 * simple_mse  # lambda = 0.001 leaves L_simple's training almost alone
    meta = load_checkpoint(tmp_path / "hybrid")[1]
    assert meta["train_config"]["loss"] == "hybrid" and meta["train_config"]["vlb_weight"] == 0.001


def test_a_spec_with_learned_variance_rebuilds_a_two_output_network():
    from difflab.io.spec import build_denoiser

    spec = {"unet": {"in_channels": 1, "model_channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1},
            "diffusion": {"frame": "vp_discrete", "schedule": "linear", "T": 100, "prediction": "eps",
                          "learned_variance": True}}
    d = build_denoiser(spec)
    assert d.learned_variance and d.net.config.out_channels == 2
    x0, v = d.x0_and_v(torch.randn(2, 1, 8, 8), torch.tensor([1.0, 3.0]))
    assert x0.shape == v.shape == (2, 1, 8, 8)
