"""Any data rank: samplers, guidance, per-sample noise, losses, EMA and checkpoints see (B, ...) tensors.

The closed-form oracle (difflab/oracle.py) is rank-agnostic: its denoiser flattens each sample, so a
sampler run on (B, C, L), (B, C, F, H, W) or (B, N, 3) must give, element for element, what it gives
on the flattened (B, d) input. Any sampler that assumed 4-D images would fail or differ here. The last
tests define a rank of their own (6-D) and a network for it, and train and sample with no change to
difflab/.
"""
import math

import pytest
import torch
from torch import nn

from difflab.core import Denoiser, Flow, SampleNoise, VPDiscrete, append_dims, grids
from difflab.guidance import (ClassifierFreeGuidance, ClassifierGuidance, MaskChannels, RewardGuidance,
                              SafetyGuidance, sample_repaint)
from difflab.io.checkpoint import load_checkpoint, save_checkpoint
from difflab.oracle import GaussianMixture
from difflab.samplers import SAMPLERS, sample_ddpm
from difflab.train import EMA, TrainConfig, train
from difflab.train.losses import diffusion_loss
from difflab.train.vlb import hybrid_loss

F64 = torch.float64
B = 3
RANKS = {  # per-sample shape, each with 8 elements except the point set
    "sequence": (2, 4),          # (B, C, L): audio, motion, actions
    "video": (1, 2, 2, 2),       # (B, C, F, H, W)
    "points": (4, 3),            # (B, N, 3): point sets
}
FLOW_SAMPLERS = {"flow_euler", "flow_heun"}


def mixture(shape) -> GaussianMixture:
    return GaussianMixture.random(dim=math.prod(shape), components=3, seed=0)


def oracle(shape, flow: bool = False) -> Denoiser:
    """The mixture's exact denoiser through a network of a real frame (eps on VPDiscrete; flow on Flow)."""
    frame, prediction = (Flow(), "flow") if flow else (VPDiscrete.from_name("linear"), "eps")
    return Denoiser(mixture(shape).network(frame, prediction), frame, prediction)


def grid(denoiser: Denoiser, steps: int = 4) -> torch.Tensor:
    return grids.for_denoiser(denoiser, steps)


def draws(n, shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn((B, *shape), generator=g, dtype=F64) for _ in range(n)]


def noise_from(tensors, shape):
    """A ``noise()`` callable handing out ``tensors`` reshaped to (B, *shape), in order."""
    it = iter(tensors)
    return lambda: next(it).reshape(B, *shape)


def start(denoiser, sigmas, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((B, *shape), generator=g, dtype=F64) * denoiser.prior_std(sigmas[0])


def flat(shape):
    return (math.prod(shape),)


# ----------------------------------------------------------------------------
# Every sampler, every rank: same shape, finite, and the flattened run's numbers

@pytest.mark.parametrize("rank", sorted(RANKS))
@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_on_every_rank_equals_the_flattened_run(name, rank):
    shape = RANKS[rank]
    denoiser = oracle(shape, flow=name in FLOW_SAMPLERS)
    sigmas = grid(denoiser)
    x = start(denoiser, sigmas, shape)
    z = draws(2 * len(sigmas), shape)  # enough for any stochastic sampler (at most 2 draws a step here)
    out = SAMPLERS[name](denoiser, x, sigmas, noise=noise_from(z, shape))
    assert out.shape == x.shape and out.dtype == F64 and bool(torch.isfinite(out).all())
    ref = SAMPLERS[name](denoiser, x.reshape(B, -1), sigmas, noise=noise_from(z, flat(shape)))
    torch.testing.assert_close(out.reshape(B, -1), ref, rtol=0, atol=1e-10)


class LearnedVariance(nn.Module):
    """The oracle's eps output plus raw variance values r = tanh(x_in) in the last C channels (dim 1)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x_in, t, **cond):
        return torch.cat([self.net(x_in, t), torch.tanh(x_in)], dim=1)


def learned_variance_oracle(shape) -> Denoiser:
    frame = VPDiscrete.from_name("linear")
    return Denoiser(LearnedVariance(mixture(shape).network(frame, "eps")), frame, "eps", learned_variance=True)


@pytest.mark.parametrize("rank", sorted(RANKS))
def test_ddpm_learned_variance_on_every_rank(rank):
    shape = RANKS[rank]
    denoiser, denoiser_flat = learned_variance_oracle(shape), learned_variance_oracle(flat(shape))
    sigmas = grid(denoiser)
    x, z = start(denoiser, sigmas, shape), draws(len(sigmas), shape)
    out = sample_ddpm(denoiser, x, sigmas, variance="learned", noise=noise_from(z, shape))
    ref = sample_ddpm(denoiser_flat, x.reshape(B, -1), sigmas, variance="learned", noise=noise_from(z, flat(shape)))
    assert out.shape == x.shape
    torch.testing.assert_close(out.reshape(B, -1), ref, rtol=0, atol=1e-10)


# ----------------------------------------------------------------------------
# Guidance wrappers

class Labelled(nn.Module):
    """The oracle network, its output shifted by 0.1 * class label: a conditional model for CFG."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x_in, t, *, class_labels):
        return self.net(x_in, t) + 0.1 * append_dims(class_labels.to(x_in.dtype), x_in.ndim)


def linear_classifier(d, classes=3, seed=3):
    """logits = flatten(x) W + sigma: a rank-agnostic classifier(x, sigma) -> (B, K)."""
    W = torch.randn(d, classes, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return lambda x, sigma: x.reshape(x.shape[0], -1) @ W + sigma[:, None]


def guided_wrappers(shape):
    frame = VPDiscrete.from_name("linear")
    base = Denoiser(mixture(shape).network(frame, "eps"), frame, "eps")
    conditional = Denoiser(Labelled(mixture(shape).network(frame, "eps")), frame, "eps")
    clf = linear_classifier(math.prod(shape))
    labels = torch.tensor([0, 1, 2])
    return {
        "cfg": (ClassifierFreeGuidance(conditional, 3.0, {"class_labels": 3}, guidance_rescale=0.5),
                {"class_labels": labels}),
        "classifier": (ClassifierGuidance(base, clf, 2.0), {"class_labels": labels}),
        "safety": (SafetyGuidance(base, clf, unwanted_class=1, scale=1.0), {}),
        "reward": (RewardGuidance(base, lambda x0: -(x0**2).flatten(1).sum(1), 0.5), {}),
    }


@pytest.mark.parametrize("rank", sorted(RANKS))
def test_guidance_wrappers_on_every_rank(rank):
    shape = RANKS[rank]
    shaped, flattened = guided_wrappers(shape), guided_wrappers(flat(shape))
    sigmas = grid(shaped["cfg"][0].denoiser)
    x = start(shaped["cfg"][0].denoiser, sigmas, shape)
    for name, (guided, cond) in shaped.items():
        out = SAMPLERS["dpmpp_2m"](guided, x, sigmas, extra_args=dict(cond))
        assert out.shape == x.shape and bool(torch.isfinite(out).all()), name
        ref = SAMPLERS["dpmpp_2m"](flattened[name][0], x.reshape(B, -1), sigmas, extra_args=dict(cond))
        torch.testing.assert_close(out.reshape(B, -1), ref, rtol=0, atol=1e-10, msg=name)


@pytest.mark.parametrize("rank", sorted(RANKS))
def test_inpainting_wrappers_on_every_rank(rank):
    shape = RANKS[rank]
    denoiser = oracle(shape)
    sigmas = grid(denoiser)
    x = start(denoiser, sigmas, shape)
    known = mixture(shape).sample(B, torch.Generator().manual_seed(5)).reshape(B, *shape)
    mask = (torch.arange(math.prod(shape)) % 2).reshape(1, *shape)  # fill every other element
    out = sample_repaint(denoiser, x, sigmas, known=known, mask=mask, sampler=SAMPLERS["euler_ancestral"],
                         resample=2, noise=noise_from(draws(40, shape), shape))
    assert out.shape == x.shape and bool(torch.isfinite(out).all())
    torch.testing.assert_close(out[mask.expand_as(out) == 0], known[mask.expand_as(known) == 0], rtol=0, atol=0)

    # a mask-channel model: the network sees concat(x_in, extra) along dim 1 and ignores the extra
    frame = VPDiscrete.from_name("linear")
    net = mixture(shape).network(frame, "eps")
    channel_model = MaskChannels(Denoiser(lambda x_in, t: net(x_in[:, :shape[0]], t), frame, "eps"))
    extra = torch.ones(B, 1, *shape[1:], dtype=F64)
    out = SAMPLERS["heun"](channel_model, x, sigmas, extra_args={"mask_channels": extra})
    torch.testing.assert_close(out, SAMPLERS["heun"](denoiser, x, sigmas), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------
# Per-sample noise

@pytest.mark.parametrize("rank", sorted(RANKS) + ["toy"])
def test_sample_noise_is_per_sample_on_every_rank(rank):
    shape = RANKS.get(rank, (2, 2, 2, 2, 2))
    big = SampleNoise.for_run(7, 6, shape)()
    assert big.shape == (6, *shape)
    torch.testing.assert_close(SampleNoise.for_run(7, 1, shape, start=4)()[0], big[4], rtol=0, atol=0)
    torch.testing.assert_close(SampleNoise.for_run(7, 3, shape, start=1)(), big[1:4], rtol=0, atol=0)
    assert not torch.equal(SampleNoise.for_run(8, 6, shape)(), big)


# ----------------------------------------------------------------------------
# Losses, EMA, checkpoints

@pytest.mark.parametrize("rank", sorted(RANKS))
def test_losses_are_per_example_on_every_rank(rank):
    shape = RANKS[rank]
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn((B, *shape), generator=g, dtype=F64)
    noise = torch.randn((B, *shape), generator=g, dtype=F64)
    denoiser = oracle(shape)
    sigma = denoiser.frame.sigmas[torch.tensor([10, 400, 900])]
    loss = diffusion_loss(denoiser, x0, sigma, noise, weighting="min_snr")
    ref = diffusion_loss(oracle(flat(shape)), x0.reshape(B, -1), sigma, noise.reshape(B, -1), weighting="min_snr")
    assert loss.shape == (B,)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
    hybrid = hybrid_loss(learned_variance_oracle(shape), x0.clamp(-1, 1), sigma, noise)
    hybrid_ref = hybrid_loss(learned_variance_oracle(flat(shape)), x0.clamp(-1, 1).reshape(B, -1), sigma,
                             noise.reshape(B, -1))
    assert hybrid.shape == (B,) and bool(torch.isfinite(hybrid).all())
    torch.testing.assert_close(hybrid, hybrid_ref, rtol=1e-12, atol=0)


class RankNets(nn.Module):
    """Parameters and buffers of ranks 1 to 5: a 1-D and a 3-D convolution and a point-set table."""

    def __init__(self):
        super().__init__()
        self.conv1d = nn.Conv1d(2, 3, 3)
        self.conv3d = nn.Conv3d(1, 2, (1, 2, 2))
        self.points = nn.Parameter(torch.randn(4, 3))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))


def test_ema_and_checkpoint_round_trip_any_rank(tmp_path):
    torch.manual_seed(0)
    net = RankNets()
    ema = EMA(net, decay=0.5, warmup=False)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
        net.count += 1
    ema.update(net)
    for k, v in net.state_dict().items():
        expected = v if not v.is_floating_point() else 0.5 * before[k] + 0.5 * v
        torch.testing.assert_close(ema.state_dict()[k], expected, rtol=0, atol=1e-6)
    fresh = RankNets()
    ema.copy_to(fresh)
    assert fresh.conv3d.weight.shape == (2, 1, 1, 2, 2)

    tensors = {f"ema.{k}": v for k, v in ema.state_dict().items()}
    tensors.update({f"x.{rank}": torch.randn(B, *shape) for rank, shape in RANKS.items()})
    tensors["x.toy"] = torch.randn(B, 2, 2, 2, 2, 2, dtype=F64)
    path = save_checkpoint(tmp_path / "ranks", tensors, {"ranks": {k: list(v) for k, v in RANKS.items()}})
    loaded, meta = load_checkpoint(path)
    assert meta["ranks"]["video"] == [1, 2, 2, 2] and sorted(loaded) == sorted(tensors)
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k


# ----------------------------------------------------------------------------
# A rank difflab has never seen, defined here: 6-D samples, a network for them, training and sampling

TOY = (2, 2, 2, 2, 2)  # (B, 2, 2, 2, 2, 2)


class ElementwiseMLP(nn.Module):
    """net(x_in, t): an MLP applied to every element with the (log) time, so it works on any rank."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2, width), nn.SiLU(), nn.Linear(width, 1))

    def forward(self, x_in, t, **cond):
        t = torch.as_tensor(t, dtype=x_in.dtype, device=x_in.device).expand(x_in.shape[0])
        h = x_in.reshape(x_in.shape[0], -1, 1)
        feats = torch.cat([h, (t.log1p() / 7)[:, None, None].expand_as(h)], dim=-1)
        return self.mlp(feats).reshape(x_in.shape)


def test_a_new_rank_needs_no_edit_in_difflab(tmp_path):
    torch.manual_seed(0)
    denoiser = Denoiser(ElementwiseMLP(), VPDiscrete.from_name("linear"), "eps")
    data = torch.randn(16, *TOY).clamp(-1, 1)
    config = TrainConfig(steps=2, batch_size=4, lr=1e-3, checkpoint_every=0, log_every=1, progress=False)
    state = train(denoiser, data, config, tmp_path / "run")
    assert state.step == 2 and all(math.isfinite(e["loss"]) for e in state.history)
    tensors, _ = load_checkpoint(tmp_path / "run")
    assert any(k.startswith("ema.") for k in tensors)

    sigmas = grid(denoiser, 3)
    x = SampleNoise.for_run(0, B, TOY)() * float(denoiser.prior_std(sigmas[0]))
    with torch.no_grad():
        for name in ("euler", "heun", "dpmpp_2m", "unipc", "ddpm", "dpmpp_2m_sde"):
            out = SAMPLERS[name](denoiser, x, sigmas, noise=SampleNoise.for_run(1, B, TOY))
            assert out.shape == (B, *TOY) and bool(torch.isfinite(out).all()), name

    # and the oracle on the same rank gives the flattened run's numbers
    gm_denoiser = oracle(TOY)
    sigmas = grid(gm_denoiser)
    x = start(gm_denoiser, sigmas, TOY)
    for name in ("dpm_solver_3", "lms", "deis"):
        out = SAMPLERS[name](gm_denoiser, x, sigmas)
        torch.testing.assert_close(out.reshape(B, -1), SAMPLERS[name](gm_denoiser, x.reshape(B, -1), sigmas),
                                   rtol=0, atol=1e-10)


# ----------------------------------------------------------------------------
# One number per sample: (B,) tensors, the smallest rank

def test_scalar_samples_every_sampler_and_the_loss():
    denoiser = oracle((1,))
    sigmas = grid(denoiser)
    x = start(denoiser, sigmas, ())
    z = draws(2 * len(sigmas), ())
    for name, sampler in SAMPLERS.items():
        out = sampler(denoiser, x, sigmas, noise=noise_from(z, ()))
        assert out.shape == (B,), name
        ref = sampler(denoiser, x[:, None], sigmas, noise=noise_from(z, (1,)))
        torch.testing.assert_close(out, ref[:, 0], rtol=0, atol=1e-10, msg=name)
    loss = diffusion_loss(denoiser, x, denoiser.frame.sigmas[torch.tensor([1, 2, 3])], z[0])
    assert loss.shape == (B,)
    with pytest.raises(ValueError, match=r"\(B, C, \.\.\.\)"):
        Denoiser(lambda x_in, t: torch.cat([x_in, x_in]), VPDiscrete.from_name("linear"), "eps",
                 learned_variance=True)(x, 1.0)
