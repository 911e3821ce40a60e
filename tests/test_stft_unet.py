"""The STFT-domain waveform denoiser (network kind "stft_unet"): the exact STFT round trip, shapes,
bad inputs, per-sample determinism, a training step and the class prior through a checkpoint."""
from __future__ import annotations


import pytest
import torch

from difflab.nn.stft_unet import StftUNet, StftUNetConfig
from test_audio import check_class_prior_network, perturbed  # shared with DiffWave's tests

DIFFUSION = {"frame": "vp_discrete", "schedule": "cosine", "T": 1000, "prediction": "v"}


def tiny(**kw) -> StftUNetConfig:
    return StftUNetConfig(**{"model_channels": 8, "channel_mult": (1, 2), "groups": 4, "sample_length": 256, "n_fft": 64,
                             "hop": 16, **kw})


def test_stft_round_trip_is_exact_and_a_unit_mask_gives_the_input_back():
    net = StftUNet(tiny())
    x = torch.randn(3, 1, 256)
    spec = net.spectrogram(x)
    assert spec.shape == (3, 33, 17)
    assert abs(float(spec.abs().pow(2).mean()) - 1) < 0.15            # unit white noise: unit power per bin
    torch.testing.assert_close(net.waveform(spec, 256), x, rtol=0, atol=1e-5)
    t = torch.tensor([3.0, 300.0, 900.0])
    assert net(x, t).abs().max() == 0                                  # zero-initialised output: an untrained net outputs 0
    with torch.no_grad():
        net.unet.out[-1].bias[0] = 1.0                                 # mask = 1, residual = 0: the identity
    torch.testing.assert_close(net(x, t), x, rtol=0, atol=1e-5)
    plain = StftUNet(tiny(mask=False, log_magnitude=False))
    assert plain.unet.config.in_channels == 2 and plain.unet.config.out_channels == 2
    with torch.no_grad():
        plain.unet.out[-1].weight.zero_()
    assert plain(x, t).abs().max() == 0


def test_stft_unet_shapes_and_bad_inputs():
    net = perturbed(StftUNet(tiny(num_classes=3)))
    x, t = torch.randn(2, 1, 256), torch.tensor([10.0, 500.0])
    assert net(x, t, class_labels=torch.tensor([0, 3])).shape == (2, 1, 256)
    assert net(torch.randn(2, 1, 300), t).shape == (2, 1, 300)         # any length: the image is padded, then cropped
    with pytest.raises(ValueError, match="stereo"):
        net(torch.randn(2, 2, 256), t)
    with pytest.raises(ValueError, match="longer than n_fft // 2"):
        net(torch.randn(2, 1, 20), t)
    with pytest.raises(ValueError, match=r"class_labels must be in \[0, 3\]"):
        net(x, t, class_labels=torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="unconditional"):
        StftUNet(tiny())(x, t, class_labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="hop=40 must be at most"):
        tiny(hop=40)
    with pytest.raises(ValueError, match="class_prior=True needs"):
        tiny(class_prior=True)
    with pytest.raises(ValueError, match="attention_levels"):
        tiny(attention_levels=(5,))


def test_stft_unet_samples_do_not_depend_on_batch_size_train_and_load_from_a_checkpoint(tmp_path):
    check_class_prior_network("stft_unet", tiny(num_classes=2, class_prior=True), tmp_path, DIFFUSION)
