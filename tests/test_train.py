"""Training: per-example losses and their weightings, EMA, and the loop (exact resume,
divergence detection, bf16, gradient accumulation), all on tiny nets on the CPU."""
import math

import pytest
import torch
from torch import nn

from difflab.core import EDM, VE, Denoiser, Flow, VPContinuous, VPDiscrete
from difflab.io import load_checkpoint
from difflab.train import (EMA, DiffusionObjective, SigmaBinnedLoss, TrainConfig, TrainingDivergedError, default_noise_level,
                           diffusion_loss, draw_batch, draw_sigmas, loss_by_sigma_bins, loss_weight, train)
from difflab.train.loop import accumulate_gradients, batch_indices, lr_at


class TinyNet(nn.Module):
    """An MLP with the U-Net's call signature net(x_in, t, class_labels=None)."""

    def __init__(self, dim=2, hidden=32, num_classes=None, t_scale=1.0, dropout=0.0):
        super().__init__()
        self.t_scale, self.make_nan, self.last_dtype = t_scale, False, None
        self.config = type("Cfg", (), {"num_classes": num_classes})()
        self.inp = nn.Linear(dim + 3, hidden)
        self.mid = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)
        self.emb = nn.Embedding(num_classes + 1, hidden) if num_classes else None
        self.labels_seen = []

    def forward(self, x, t, class_labels=None):
        t = t.to(x.dtype)[:, None] / self.t_scale
        h = self.inp(torch.cat([x.flatten(1), t, (3 * t).sin(), (3 * t).cos()], 1))
        self.last_dtype = h.dtype
        if self.emb is not None and class_labels is not None:
            self.labels_seen.append(class_labels.clone())
            h = h + self.emb(class_labels)
        h = self.mid(self.drop(nn.functional.silu(h)))
        y = self.out(nn.functional.silu(h)).reshape(x.shape)
        return y * float("nan") if self.make_nan else y


def vp(T=100):
    return VPDiscrete.from_name("linear", T)


def quiet(**kw):
    return TrainConfig(**{"progress": False, "log_every": 0, **kw})


# ----------------------------------------------------------------------------------------------
# Losses


@pytest.mark.parametrize("prediction,frame", [("eps", vp()), ("v", vp()), ("x0", VPContinuous()), ("flow", Flow()),
                                              ("score", VE()), ("edm", EDM())])
@pytest.mark.parametrize("weighting", ["simple", "min_snr", "edm"])
def test_loss_is_per_example(prediction, frame, weighting):
    torch.manual_seed(0)
    d = Denoiser(TinyNet(dim=16, t_scale=100.0), frame, prediction)
    x0, noise = torch.randn(5, 1, 4, 4), torch.randn(5, 1, 4, 4)
    sigma = draw_sigmas(frame, 5, torch.Generator().manual_seed(0)).float()
    loss = diffusion_loss(d, x0, sigma, noise, weighting=weighting)
    assert loss.shape == (5,) and torch.isfinite(loss).all() and (loss > 0).all()
    # one example alone gets the same loss: nothing mixes across the batch
    assert torch.allclose(diffusion_loss(d, x0[2:3], sigma[2:3], noise[2:3], weighting=weighting), loss[2:3], rtol=1e-5)


class Oracle(nn.Module):
    """Outputs whatever target it was told."""

    def forward(self, x_in, t):
        return self.target


@pytest.mark.parametrize("prediction,frame", [("eps", vp()), ("v", vp()), ("x0", vp()), ("flow", Flow()),
                                              ("score", VE()), ("edm", EDM())])
def test_loss_is_zero_for_the_exact_target(prediction, frame):
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64), torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.05, 0.5, 2.0, 20.0], dtype=torch.float64)
    d = Denoiser(Oracle(), frame, prediction)
    d.net.target = d.target(x0, noise, sigma)
    for weighting in ("simple", "min_snr", "edm"):
        assert diffusion_loss(d, x0, sigma, noise, weighting=weighting).abs().max() < 1e-20
    d.net.target = d.net.target + 0.1
    assert (diffusion_loss(d, x0, sigma, noise) > 1e-3).all()


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_simple_loss_matches_ddpm_formulas(prediction):
    """Ho et al. 2020 eq. 14 (eps) and Salimans & Ho 2022 (v) written with alpha_bar directly."""
    torch.manual_seed(0)
    frame = vp(1000)
    net = TinyNet(dim=6, t_scale=1000.0).double()
    d = Denoiser(net, frame, prediction)
    t = torch.tensor([0, 10, 500, 999])
    ab = frame.alpha_bars[t]
    x0, eps = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    x_t = ab.sqrt()[:, None] * x0 + (1 - ab).sqrt()[:, None] * eps
    target = eps if prediction == "eps" else ab.sqrt()[:, None] * eps - (1 - ab).sqrt()[:, None] * x0
    expected = (net(x_t, t.double()) - target).square().mean(1)
    got = diffusion_loss(d, x0, frame.sigmas[t], eps)
    assert torch.allclose(got, expected, rtol=1e-9, atol=1e-12)


def test_min_snr_weights_are_the_papers():
    """Hang et al. 2023: min(SNR, g)/SNR for eps, min(SNR, g)/(SNR + 1) for v, min(SNR, g) for x0."""
    sigma = torch.logspace(-2, 2, 41, dtype=torch.float64)
    alpha, sigma_in = 1 / (1 + sigma**2).sqrt(), sigma / (1 + sigma**2).sqrt()  # the VP frame
    snr, g = 1 / sigma**2, 5.0
    expected = {"eps": snr.clamp(max=g) / snr, "v": snr.clamp(max=g) / (snr + 1), "x0": snr.clamp(max=g)}
    for prediction, w in expected.items():
        assert torch.allclose(loss_weight("min_snr", prediction, alpha, sigma_in, min_snr_gamma=g), w, rtol=1e-12), prediction
    # and diffusion_loss applies it per example on top of the simple loss
    torch.manual_seed(0)
    d = Denoiser(TinyNet(dim=2, t_scale=100.0).double(), vp(), "eps")
    x0, noise, s = torch.randn(6, 2, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64), d.frame.sigmas[[0, 5, 20, 50, 80, 99]]
    ratio = diffusion_loss(d, x0, s, noise, weighting="min_snr") / diffusion_loss(d, x0, s, noise)
    assert torch.allclose(ratio, (1 / s**2).clamp(max=5.0) * s**2, rtol=1e-10)


def test_edm_weighting_is_one_on_F():
    """Karras et al. 2022 eq. 8: lambda(sigma) c_out(sigma)^2 = 1, so the EDM loss is the plain MSE on F."""
    frame = EDM(sigma_data=0.5)
    sigma = torch.logspace(-3, 2, 51, dtype=torch.float64)
    alpha = frame.scale(sigma)
    w = loss_weight("edm", "edm", alpha, alpha * sigma, sigma_data=0.5)
    assert torch.allclose(w, torch.ones_like(w), rtol=1e-12)
    # on another parameterization it is lambda(sigma) k^2: for x0 prediction lambda itself
    w_x0 = loss_weight("edm", "x0", alpha, alpha * sigma, sigma_data=0.5)
    assert torch.allclose(w_x0, (sigma**2 + 0.25) / (sigma * 0.5) ** 2, rtol=1e-12)
    torch.manual_seed(0)
    d = Denoiser(TinyNet(dim=3), frame, "edm")
    x0, noise, s = torch.randn(8, 3), torch.randn(8, 3), draw_sigmas(frame, 8, torch.Generator().manual_seed(0)).float()
    assert torch.allclose(diffusion_loss(d, x0, s, noise, weighting="edm"), diffusion_loss(d, x0, s, noise), rtol=1e-5)


def test_noise_levels_follow_the_frame():
    assert default_noise_level(vp()) == "discrete_uniform"
    assert default_noise_level(VPContinuous()) == "continuous_uniform"
    assert default_noise_level(Flow()) == "logit_normal"
    assert default_noise_level(EDM()) == default_noise_level(VE()) == "log_normal"
    s = draw_sigmas(vp(), 1000, torch.Generator().manual_seed(0))
    assert set(s.tolist()) <= set(vp().sigmas.tolist())
    with pytest.raises(ValueError, match="unknown"):
        draw_sigmas(vp(), 3, None, "nope")


def test_loss_by_sigma_bins():
    sigma = torch.tensor([0.005, 0.05, 0.06, 0.5, 5.0, 50.0, 500.0, 0.01])
    losses = torch.tensor([1.0, 2.0, 4.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    assert loss_by_sigma_bins(sigma, losses) == {"<=0.01": 4.0, "0.01-0.1": 3.0, "0.1-1": 3.0, "1-10": 4.0,
                                                 "10-100": 5.0, ">100": 6.0}
    acc = SigmaBinnedLoss(edges=(1.0,))
    acc.add(sigma, losses)
    acc.add(torch.tensor([2.0]), torch.tensor([10.0]))
    assert acc.means() == {"<=1": (1 + 2 + 4 + 3 + 7) / 5, ">1": (4 + 5 + 6 + 10) / 4}


# ----------------------------------------------------------------------------------------------
# EMA


def test_ema_of_a_constant_model_is_constant():
    torch.manual_seed(0)
    net = nn.Linear(4, 3)
    ema = EMA(net, decay=0.999)
    for _ in range(20):
        ema.update(net)
    for k, v in net.state_dict().items():
        assert torch.equal(ema.state_dict()[k], v)


def test_ema_decay_warmup_values_and_state():
    net = nn.Linear(1, 1, bias=False)
    ema = EMA(net, decay=0.9)
    assert ema.decay_at(0) == 0.1 and ema.decay_at(8) == 0.5 and ema.decay_at(1000) == 0.9
    assert EMA(net, decay=0.9, warmup=False).decay_at(0) == 0.9
    with torch.no_grad():
        net.weight.fill_(0.0)
    ema = EMA(net, decay=0.9)
    expected = 0.0
    for t, value in enumerate([1.0, 2.0, 4.0, 8.0]):
        with torch.no_grad():
            net.weight.fill_(value)
        ema.update(net)
        d = min(0.9, (1 + t) / (10 + t))
        expected = d * expected + (1 - d) * value
        assert math.isclose(float(ema.state_dict()["weight"]), expected, rel_tol=1e-6)
    other = EMA(net, decay=0.9)
    other.load_state_dict(ema.state_dict(), num_updates=ema.num_updates)
    fresh = nn.Linear(1, 1, bias=False)
    other.copy_to(fresh)
    assert math.isclose(float(fresh.weight.detach()), expected, rel_tol=1e-6) and other.num_updates == 4
    with pytest.raises(ValueError, match="missing"):
        other.load_state_dict({})


# ----------------------------------------------------------------------------------------------
# The loop


def _labelled_data(n=24, dim=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g).clamp(-1, 1), torch.randint(0, 3, (n,), generator=g)


def _state_tensors(net, state):
    out = {f"model.{k}": v for k, v in net.state_dict().items()}
    out.update({f"ema.{k}": v for k, v in state.ema.state_dict().items()})
    for i, s in state.optimizer.state_dict()["state"].items():
        out.update({f"optim.{i}.{k}": v for k, v in s.items()})
    return out


def test_resume_is_bit_identical(tmp_path):
    data = _labelled_data()
    cfg = lambda steps: quiet(steps=steps, batch_size=8, lr=1e-2, warmup_steps=2, ema_decay=0.9, cfg_dropout=0.3,  # noqa: E731
                              weight_decay=0.01, checkpoint_every=100, seed=7)
    make = lambda: Denoiser(TinyNet(num_classes=3, t_scale=100.0, dropout=0.2), vp(), "v")  # noqa: E731

    torch.manual_seed(0)
    a = make()
    torch.manual_seed(0)
    b = make()
    rng_before = torch.get_rng_state()
    straight = train(a, data, cfg(6), tmp_path / "a")
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG is untouched
    train(b, data, cfg(3), tmp_path / "b")
    torch.manual_seed(123)  # a net with other initial weights: everything must come from the checkpoint
    c = make()
    resumed = train(c, data, cfg(6), tmp_path / "b")
    assert straight.step == resumed.step == 6 and resumed.ema.num_updates == 6
    sa, sc = _state_tensors(a.net, straight), _state_tensors(c.net, resumed)
    assert sa.keys() == sc.keys()
    for k in sa:
        assert torch.equal(sa[k], sc[k]), k
    ta, ma = load_checkpoint(tmp_path / "a")
    tc, mc = load_checkpoint(tmp_path / "b")
    assert ma["step"] == mc["step"] == 6 and ta.keys() == tc.keys()
    assert all(torch.equal(ta[k], tc[k]) for k in ta)
    # the run really used labels, label dropout (null class 3) and dropout
    seen = torch.cat(a.net.labels_seen)
    assert (seen == 3).any() and (seen < 3).any()
    assert a.net.drop.p > 0


def test_divergence_stops_before_the_bad_update(tmp_path):
    torch.manual_seed(0)
    d = Denoiser(TinyNet(t_scale=100.0), vp(), "eps")
    good = {}

    def callback(info):
        if info["step"] == 4:
            good.update({k: v.clone() for k, v in d.net.state_dict().items()})
            d.net.make_nan = True

    with pytest.raises(TrainingDivergedError, match="step 5") as info:
        train(d, _labelled_data()[0], quiet(steps=10, batch_size=8, lr=1e-2, checkpoint_every=2), tmp_path, callback=callback)
    assert info.value.step == 5 and "checkpoint.safetensors" in str(info.value)
    tensors, meta = load_checkpoint(tmp_path)
    assert meta["step"] == 4
    for k, v in good.items():
        assert torch.equal(tensors[f"model.{k}"], v) and torch.isfinite(v).all()
        assert torch.equal(d.net.state_dict()[k], v)  # the NaN step changed nothing


def test_data_with_nan_diverges_at_the_first_step(tmp_path):
    images = torch.randn(8, 2)
    images[3, 1] = float("nan")
    d = Denoiser(TinyNet(t_scale=100.0), vp(), "eps")
    with pytest.raises(TrainingDivergedError, match="step 1.*no checkpoint"):
        train(d, images, quiet(steps=3, batch_size=8), tmp_path)
    assert not (tmp_path / "checkpoint.safetensors").exists()


def _mixture(n, g):
    centers = torch.tensor([[0.6, 0.6], [-0.6, -0.6], [0.6, -0.6]])
    return centers[torch.randint(0, 3, (n,), generator=g)] + 0.05 * torch.randn(n, 2, generator=g)


def _eval_loss(d, g):
    x0, noise = _mixture(512, g), torch.randn(512, 2, generator=g)
    sigma = draw_sigmas(d.frame, 512, g).float()
    with torch.no_grad():
        return float(diffusion_loss(d, x0, sigma, noise).mean())


def test_bf16_on_cpu_learns_a_gaussian_mixture(tmp_path):
    torch.manual_seed(0)
    d = Denoiser(TinyNet(hidden=64), Flow(), "flow")
    before = _eval_loss(d, torch.Generator().manual_seed(1))
    state = train(d, _mixture(2048, torch.Generator().manual_seed(0)), quiet(steps=200, batch_size=64, lr=3e-3, grad_clip=1.0,
                                                                             precision="bf16", log_every=40), tmp_path)
    after = _eval_loss(d, torch.Generator().manual_seed(1))
    assert d.net.last_dtype == torch.float32  # evaluation ran outside autocast ...
    assert after < 0.75 * before, (before, after)
    assert [e["step"] for e in state.history] == [40, 80, 120, 160, 200] and state.history[-1]["loss_by_sigma"]
    assert (tmp_path / "log.jsonl").read_text().count("\n") == 5
    # ... and training inside it
    d.net.last_dtype = None
    train(d, _mixture(64, torch.Generator()), quiet(steps=1, batch_size=8, precision="bf16"), tmp_path / "again")
    assert d.net.last_dtype == torch.bfloat16


def test_fp16_on_cpu_is_refused(tmp_path):
    d = Denoiser(TinyNet(), Flow(), "flow")
    with pytest.raises(ValueError, match="fp16.*CUDA"):
        train(d, torch.randn(8, 2), quiet(steps=1, batch_size=4, precision="fp16"), tmp_path)


def test_gradient_accumulation_equals_the_full_batch(tmp_path):
    data = _labelled_data(n=32)
    frame = vp()
    one, two = quiet(batch_size=8, grad_accum=1), quiet(batch_size=8, grad_accum=2)
    b1, b2 = draw_batch(*data, frame, one, 3), draw_batch(*data, frame, two, 3)
    assert all(torch.equal(b1[k], b2[k]) for k in b1)  # the draws do not depend on grad_accum
    torch.manual_seed(0)
    d1 = Denoiser(TinyNet(num_classes=3, t_scale=100.0), frame, "eps")
    d2 = Denoiser(TinyNet(num_classes=3, t_scale=100.0), frame, "eps")
    d2.load_state_dict(d1.state_dict())
    (l1, _), (l2, _) = accumulate_gradients(DiffusionObjective(d1), b1, one), accumulate_gradients(DiffusionObjective(d2), b2, two)
    assert torch.allclose(l1, l2, atol=1e-6)
    for p1, p2 in zip(d1.parameters(), d2.parameters()):
        assert torch.allclose(p1.grad, p2.grad, atol=1e-6)
    # and whole runs agree
    s1 = train(d1, data, quiet(steps=3, batch_size=8, grad_accum=1, lr=1e-3), tmp_path / "one")
    s2 = train(d2, data, quiet(steps=3, batch_size=8, grad_accum=2, lr=1e-3), tmp_path / "two")
    for p1, p2 in zip(d1.parameters(), d2.parameters()):
        assert torch.allclose(p1, p2, atol=1e-6)
    assert s1.step == s2.step == 3


def test_cfg_dropout_needs_a_null_class(tmp_path):
    images, labels = _labelled_data()
    d = Denoiser(TinyNet(num_classes=None, t_scale=100.0), vp(), "eps")
    with pytest.raises(ValueError, match="null class"):
        train(d, (images, labels), quiet(steps=1, batch_size=4, cfg_dropout=0.5), tmp_path)
    cfg = quiet(batch_size=400, cfg_dropout=0.25)
    many = (torch.zeros(400, 2), torch.zeros(400, dtype=torch.long))
    y = draw_batch(*many, vp(), cfg, 0, null_class=9)["class_labels"]
    assert set(y.tolist()) == {0, 9} and 0.18 < (y == 9).float().mean() < 0.32


def test_data_order_and_lr_warmup():
    seen = torch.cat([batch_indices(10, 4, step, seed=0) for step in range(5)])  # 2 epochs of 10
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:].tolist()) == list(range(10))
    assert not torch.equal(seen[:10], seen[10:])
    cfg = quiet(lr=1.0, warmup_steps=4)
    assert [lr_at(cfg, s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_config_validation():
    with pytest.raises(ValueError, match="multiple of grad_accum"):
        TrainConfig(batch_size=6, grad_accum=4)
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp8")
    with pytest.raises(ValueError, match="weighting"):
        TrainConfig(weighting="p2")
    cfg = TrainConfig(betas=(0.8, 0.9))
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
