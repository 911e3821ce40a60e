"""Joint image + depth: channel inpainting on an exact model, and the pipeline's contracts on a tiny U-Net."""
import pytest
import torch

from difflab.core import Denoiser
from difflab.io.spec import build_denoiser, build_frame, make_spec
from difflab.nn.unet import UNetConfig
from difflab.oracle import GaussianMixture
from difflab.pipelines.image_depth import (complete_channels, depth_from_image, generate_image_depth, image_from_depth,
                                           join)

DIFFUSION = {"frame": "vp_discrete", "schedule": "cosine", "T": 1000, "prediction": "eps"}


def _two_scenes() -> tuple[Denoiser, torch.Tensor]:
    """An exact model of two 2x2 'scenes' (4 channels) whose image decides the depth: the means
    (2, 4, 2, 2) and the Gaussian mixture's exact denoiser."""
    means = torch.zeros(2, 4, 2, 2)
    means[0, :3], means[0, 3] = 0.5, -0.8
    means[1, :3], means[1, 3] = -0.5, 0.8
    means[:, 0, 0, 0] += torch.tensor([0.2, -0.1])  # not constant over pixels
    mixture = GaussianMixture([0.5, 0.5], means.reshape(2, -1), torch.full((2,), 1e-4))
    frame = build_frame(DIFFUSION)
    return Denoiser(mixture.network(frame, "eps"), frame, "eps"), means


@pytest.mark.parametrize("which", [0, 1])
def test_depth_from_image_and_image_from_depth_recover_the_other_channels(which):
    denoiser, means = _two_scenes()
    image, depth = means[which:which + 1, :3], means[which:which + 1, 3:]
    got = depth_from_image(denoiser, image, steps=20, progress=False)
    assert torch.allclose(got, depth, atol=0.05)
    made = image_from_depth(denoiser, depth, steps=20, progress=False)
    assert torch.allclose(made, image, atol=0.05)


def _tiny(num_classes=3):
    config = UNetConfig(in_channels=4, model_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
                        num_heads=2, groups=4, num_classes=num_classes)
    denoiser = build_denoiser(make_spec("unet", config, DIFFUSION), seed=0)
    with torch.no_grad():  # an untrained U-Net outputs 0: give its last layer weights so samples vary
        torch.manual_seed(1)
        denoiser.net.out[-1].weight.normal_(0, 0.05)
    return denoiser.eval()


def test_known_channels_are_kept_exactly_and_batch_size_does_not_change_samples():
    denoiser = _tiny()
    g = torch.Generator().manual_seed(0)
    known = join(torch.rand(3, 3, 8, 8, generator=g) * 2 - 1, torch.zeros(3, 1, 8, 8))
    a = complete_channels(denoiser, known, [3], labels=[0, 1, 2], steps=3, seed=5, batch_size=1, progress=False)
    b = complete_channels(denoiser, known, [3], labels=[0, 1, 2], steps=3, seed=5, batch_size=3, progress=False)
    assert torch.equal(a[:, :3], known[:, :3])
    assert torch.allclose(a, b, atol=1e-5)
    assert a[:, 3].abs().sum() > 0
    images, depth = generate_image_depth(denoiser, [0, 2], size=8, steps=2, progress=False)
    assert images.shape == (2, 3, 8, 8) and depth.shape == (2, 1, 8, 8)


@pytest.mark.parametrize("call, phrase", [
    (lambda d: complete_channels(d, torch.zeros(1, 3, 8, 8), [2]), "channels"),
    (lambda d: complete_channels(d, torch.zeros(1, 4, 8, 8), [4]), "fill"),
    (lambda d: complete_channels(d, torch.zeros(2, 4, 8, 8), [3], labels=[0]), "one entry per sample"),
    (lambda d: complete_channels(d, torch.zeros(1, 4, 8, 8), [3], guidance_scale=2.0), "class labels"),
    (lambda d: depth_from_image(d, torch.zeros(1, 1, 8, 8)), "images must be"),
    (lambda d: image_from_depth(d, torch.zeros(1, 3, 8, 8)), "depth must be"),
])
def test_bad_inputs_are_named(call, phrase):
    with pytest.raises(ValueError, match=phrase):
        call(_tiny())
