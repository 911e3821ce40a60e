"""The class-to-image pipeline: per-sample determinism, guidance, input checks."""
import dataclasses

import pytest
import torch

from difflab.core import Denoiser, VPDiscrete
from difflab.nn.unet import PRESETS, UNet
from difflab.pipelines import generate


def make_denoiser(num_classes=10):
    torch.manual_seed(0)
    net = UNet(dataclasses.replace(PRESETS["tiny"], in_channels=1, num_classes=num_classes))
    # zero-initialized layers (the output conv) get weights so that samples depend on the net
    for p in net.parameters():
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.05)
    return Denoiser(net, VPDiscrete.from_name("cosine", 1000), prediction="v").eval()


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_same_seed_same_images_at_batch_size_1_and_8(sampler):
    d = make_denoiser()
    labels = [0, 1, 2, 3, 4, 5, 6, 7]
    kw = dict(shape=(1, 8, 8), sampler=sampler, steps=6, guidance_scale=2.0, seed=123, progress=False)
    big = generate(d, labels, batch_size=8, **kw)
    small = generate(d, labels, batch_size=1, **kw)
    odd = generate(d, labels, batch_size=3, **kw)
    torch.testing.assert_close(big, small, rtol=0, atol=1e-5)
    torch.testing.assert_close(big, odd, rtol=0, atol=1e-5)
    # and a different seed gives different images
    other = generate(d, labels, batch_size=8, **{**kw, "seed": 124})
    assert (other - big).abs().max() > 1e-2


def test_guidance_scale_one_is_the_plain_conditional_model_and_guidance_changes_samples():
    d = make_denoiser()
    kw = dict(shape=(1, 8, 8), sampler="ddim", steps=5, seed=0, progress=False)
    plain = generate(d, [3, 7], guidance_scale=1.0, **kw)
    guided = generate(d, [3, 7], guidance_scale=3.0, **kw)
    assert plain.shape == (2, 1, 8, 8) and plain.abs().max() <= 1
    assert (plain - guided).abs().max() > 1e-3


def test_unconditional_generation_needs_num_samples():
    d = make_denoiser(num_classes=None)
    out = generate(d, num_samples=3, shape=(1, 8, 8), steps=3, progress=False)
    assert out.shape == (3, 1, 8, 8)
    with pytest.raises(ValueError, match="num_samples"):
        generate(d, shape=(1, 8, 8), steps=3, progress=False)


@pytest.mark.parametrize("labels,match", [([0, 10], r"\[0, 9\]"), ([-1], r"\[0, 9\]")])
def test_bad_class_labels_are_rejected_early(labels, match):
    with pytest.raises(ValueError, match=match):
        generate(make_denoiser(), labels, shape=(1, 8, 8), steps=3, progress=False)


def test_unknown_sampler_and_grid_are_rejected():
    d = make_denoiser()
    with pytest.raises(ValueError, match="sampler='nope' is unknown"):
        generate(d, [1], shape=(1, 8, 8), sampler="nope", progress=False)
    with pytest.raises(ValueError, match="grid='nope' is unknown"):
        generate(d, [1], shape=(1, 8, 8), grid="nope", progress=False)
