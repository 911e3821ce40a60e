"""Super-resolution (SR3) and cascaded diffusion (CDM): the SRUNet network kind, noise-conditioning
augmentation at draw time, the super-resolution and cascade pipelines, the 4x4 digits."""
import math

import pytest
import torch
import torch.nn.functional as F

from difflab.core import noise_augment
from difflab.data import load_digits
from difflab.io.spec import build_denoiser, load_denoiser, make_spec, sample_shape
from difflab.nn import SRUNet, SRUNetConfig, UNetConfig
from difflab.pipelines import cascade, generate, super_resolve
from difflab.pipelines.super_resolution import augmentation_noise, truncate_grid
from difflab.train import DiffusionObjective, NoiseConditioningAugmentation, TrainConfig, train

BACKBONE = UNetConfig(in_channels=1, model_channels=8, channel_mult=(1,), num_res_blocks=1, attention_levels=(),
                      num_heads=1, groups=4, num_classes=10)
DIFFUSION = {"frame": "vp_discrete", "schedule": "cosine", "T": 100, "prediction": "v"}
SR_SPEC = make_spec("sr_unet", SRUNetConfig(unet=BACKBONE.to_dict(), factor=2), DIFFUSION)
BASE_SPEC = make_spec("unet", BACKBONE, DIFFUSION)


def randomized(denoiser, seed=1):
    """Every weight drawn afresh (the zero-initialised last layers too), so every input matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in denoiser.net.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return denoiser.eval()


def test_sr_network_conditions_on_the_low_res_image_and_its_level():
    net = SRUNet(SRUNetConfig(unet=BACKBONE.to_dict(), factor=2))
    x, lo, t = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 4, 4), torch.full((3,), 0.5)
    assert net(x, t, low_res=lo).shape == (3, 1, 8, 8)
    assert torch.equal(net(x, t, low_res=lo), torch.zeros(3, 1, 8, 8))  # zero-initialised output
    net = randomized(build_denoiser(SR_SPEC, seed=0)).net
    a = net(x, t, low_res=lo, low_res_sigma=0.0)
    assert not torch.allclose(a, net(x, t, low_res=lo, low_res_sigma=1.0))  # the level is embedded
    assert not torch.allclose(a, net(x, t, low_res=lo.flip(-1)))  # the image is concatenated
    assert torch.equal(a, net(x, t, low_res=lo, low_res_sigma=torch.zeros(3)))
    with pytest.raises(ValueError, match="low_res="):
        net(x, t)
    with pytest.raises(ValueError, match="low_res must be"):
        net(x, t, low_res=torch.randn(3, 1, 8, 8))
    with pytest.raises(ValueError, match="low_res_sigma"):
        net(x, t, low_res=lo, low_res_sigma=-1.0)
    with pytest.raises(ValueError, match="factor"):
        SRUNetConfig(factor=1)
    with pytest.raises(ValueError, match="upsample"):
        SRUNetConfig(upsample="lanczos")
    assert sample_shape(SR_SPEC, {"metadata": {"size": 16}}) == (1, 16, 16)


def test_noise_conditioning_augmentation_closed_form():
    x = torch.randn(6, 1, 4, 4)
    aug = NoiseConditioningAugmentation(sigma_max=2.0, p_clean=0.5)
    out = aug({"x0": torch.zeros(6, 1, 8, 8), "low_res": x}, torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)  # the same draws by hand, in the documented order
    s = 2.0 * torch.rand(6, generator=g)
    s = torch.where(torch.rand(6, generator=g) < 0.5, torch.zeros_like(s), s)
    eps = torch.randn(x.shape, generator=g)
    assert torch.equal(out["low_res_sigma"], s) and (s == 0).any() and (s > 0).any()
    assert torch.allclose(out["low_res"], (x + s.reshape(-1, 1, 1, 1) * eps) / (1 + s**2).sqrt().reshape(-1, 1, 1, 1))
    assert torch.equal(noise_augment(x, 0.0, eps), x)
    clean = NoiseConditioningAugmentation(p_clean=1.0)({"low_res": x}, torch.Generator())
    assert torch.equal(clean["low_res"], x) and not clean["low_res_sigma"].any()
    with pytest.raises(ValueError, match="no such key"):
        aug({"x0": x}, torch.Generator())
    with pytest.raises(ValueError, match="augment"):
        DiffusionObjective(build_denoiser(SR_SPEC, seed=0), augment="noise")


def sr_data(n=24):
    hi, labels = load_digits(8, split="train")
    return hi[:n], labels[:n], {"low_res": F.avg_pool2d(hi[:n], 2)}


def test_sr_trains_through_the_one_loop_resumes_bit_exactly_and_round_trips(tmp_path):
    """The augmentation draws come from the step's generator: a resumed run equals a straight one."""
    cfg = lambda steps: TrainConfig(steps=steps, batch_size=8, lr=1e-2, ema_decay=0.9, checkpoint_every=2,  # noqa: E731
                                    log_every=1, progress=False)
    aug = NoiseConditioningAugmentation(sigma_max=1.0)
    straight = build_denoiser(SR_SPEC, seed=0)
    train(straight, sr_data(), cfg(4), tmp_path / "a", spec=SR_SPEC, augment=aug, metadata={"size": 8})
    resumed = build_denoiser(SR_SPEC, seed=0)
    train(resumed, sr_data(), cfg(2), tmp_path / "b", spec=SR_SPEC, augment=aug, metadata={"size": 8})
    train(build_denoiser(SR_SPEC, seed=3), sr_data(), cfg(4), tmp_path / "b", spec=SR_SPEC, augment=aug, metadata={"size": 8})
    a, meta = load_denoiser(tmp_path / "a")
    b, _ = load_denoiser(tmp_path / "b")
    for (k, va), vb in zip(a.net.state_dict().items(), b.net.state_dict().values()):
        assert torch.equal(va, vb), k
    assert meta["spec"] == SR_SPEC and any(v.abs().sum() > 0 for v in a.net.level_embed[-1].parameters())
    lo = F.avg_pool2d(sr_data()[0][:2], 2)
    out = super_resolve(a, lo, [0, 1], aug_sigma=0.3, steps=3, progress=False)
    assert out.shape == (2, 1, 8, 8) and out.abs().max() <= 1


def test_super_resolve_is_per_sample_and_truncation_stops_the_grid():
    sr = randomized(build_denoiser(SR_SPEC, seed=0))
    lo = torch.rand(5, 1, 4, 4) * 2 - 1
    kw = dict(steps=4, progress=False, seed=7)
    a = super_resolve(sr, lo, aug_sigma=0.5, batch_size=5, **kw)
    b = super_resolve(sr, lo, aug_sigma=0.5, batch_size=2, **kw)
    assert a.shape == (5, 1, 8, 8) and torch.allclose(a, b, atol=1e-5)  # the batch size never changes a sample
    assert not torch.equal(a, super_resolve(sr, lo, aug_sigma=0.0, **kw))
    grid = torch.tensor([10.0, 3.0, 1.0, 0.3, 0.0], dtype=torch.float64)
    assert truncate_grid(grid, 0.5).tolist() == [10.0, 3.0, 1.0, 0.5] and torch.equal(truncate_grid(grid, 0.0), grid)
    # noised=True: the input already is x + s eps (a truncated stage); it is only rescaled, so
    # giving it the pipeline's own augmentation noise reproduces the non-truncated call
    eps = augmentation_noise(7, 0, 5, (1, 4, 4))()
    c = super_resolve(sr, lo + 0.5 * eps, aug_sigma=0.5, noised=True, batch_size=5, **kw)
    assert torch.allclose(c, a, atol=1e-6)
    with pytest.raises(ValueError, match="aug_sigma"):
        super_resolve(sr, lo, aug_sigma=-0.1, **kw)
    with pytest.raises(ValueError, match="low_res must be"):
        super_resolve(sr, torch.zeros(2, 3, 4, 4), **kw)
    with pytest.raises(ValueError, match="SRUNet"):
        super_resolve(build_denoiser(BASE_SPEC, seed=0), lo, **kw)
    with pytest.raises(ValueError, match="stop_sigma"):
        truncate_grid(grid, 20.0)


def test_cascade_chains_the_base_and_the_sr_stage():
    base, sr = randomized(build_denoiser(BASE_SPEC, seed=0), 2), randomized(build_denoiser(SR_SPEC, seed=0), 3)
    kw = dict(shape=(1, 4, 4), steps=4, progress=False, seed=1)
    low, high = cascade(base, [sr], [1, 2, 3], aug_sigma=0.2, return_all=True, **kw)
    assert low.shape == (3, 1, 4, 4) and high.shape == (3, 1, 8, 8)
    # the base stage is generate's sampling; the SR stage is super_resolve at stage 1's seed
    assert torch.equal(low, generate(base, [1, 2, 3], shape=(1, 4, 4), steps=4, progress=False, seed=1))
    truncated = cascade(base, [sr], [1, 2, 3], aug_sigma=0.2, truncated=True, **kw)
    assert truncated.shape == (3, 1, 8, 8) and not torch.equal(truncated, high)
    with pytest.raises(ValueError, match="stages"):
        cascade(base, [base], [1], **kw)
    with pytest.raises(ValueError, match="options has"):
        cascade(base, [sr], [1], options=[None, None, None], **kw)
    with pytest.raises(ValueError, match="aug_sigma"):
        cascade(base, [sr], [1], aug_sigma=[0.1, 0.2], **kw)


def test_digits_at_4x4_are_area_averages():
    lo, labels = load_digits(4, split="test")
    hi, same = load_digits(8, split="test")
    assert lo.shape == (len(hi), 1, 4, 4) and torch.equal(labels, same)
    assert torch.allclose(lo, F.avg_pool2d(hi, 2)) and math.isclose(float(lo.mean()), float(hi.mean()), rel_tol=1e-5)
    with pytest.raises(ValueError, match="size=3"):
        load_digits(3)
