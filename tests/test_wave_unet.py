"""The 1-D waveform U-Net (network kind "wave_unet"): shapes, bad inputs, per-sample determinism
and the class prior through the audio pipelines and a checkpoint."""
from __future__ import annotations


import pytest
import torch

from difflab.nn.wave_unet import WaveUNet, WaveUNetConfig
from test_audio import check_class_prior_network, perturbed  # shared with DiffWave's tests

DIFFUSION = {"frame": "vp_discrete", "schedule": "cosine", "T": 1000, "prediction": "v"}


def tiny(**kw) -> WaveUNetConfig:
    return WaveUNetConfig(**{"model_channels": 4, "channel_mult": (1, 2, 4), "factors": (4, 4), "num_heads": 2,
                             "sample_length": 256, "n_fft": 64, "hop": 16, **kw})


def test_wave_unet_shapes_and_bad_inputs():
    net = perturbed(WaveUNet(tiny(num_classes=3)))
    x, t = torch.randn(2, 1, 256), torch.tensor([10.0, 500.0])
    assert net(x, t, class_labels=torch.tensor([0, 3])).shape == (2, 1, 256)
    assert net(torch.randn(2, 1, 512), t).shape == (2, 1, 512)        # fully convolutional: any multiple of 16
    assert WaveUNet(tiny())(x, t).abs().max() == 0                      # zero-initialised output: an untrained net outputs 0
    gated = perturbed(WaveUNet(tiny(num_classes=3, gated=True)))
    assert gated(x, t, class_labels=torch.tensor([0, 3])).shape == (2, 1, 256)
    with pytest.raises(ValueError, match="stereo"):
        net(torch.randn(2, 2, 256), t)
    with pytest.raises(ValueError, match="multiple of 16"):
        net(torch.randn(2, 1, 250), t)
    with pytest.raises(ValueError, match=r"class_labels must be in \[0, 3\]"):
        net(x, t, class_labels=torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="unconditional"):
        WaveUNet(tiny())(x, t, class_labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="one factor between each pair"):
        tiny(factors=(4,))
    with pytest.raises(ValueError, match="multiple of 16"):
        tiny(sample_length=200)
    with pytest.raises(ValueError, match="class_prior=True needs"):
        tiny(class_prior=True)


def test_wave_unet_samples_do_not_depend_on_batch_size_and_load_from_a_checkpoint(tmp_path):
    check_class_prior_network("wave_unet", tiny(num_classes=2, class_prior=True), tmp_path, DIFFUSION)
