"""The STFT-domain waveform denoiser (network kind "stft_unet"): the exact STFT round trip, shapes,
bad inputs, per-sample determinism, a training step and the class prior through a checkpoint."""
from __future__ import annotations

import math

import pytest
import torch

from difflab.data.audio import SAMPLE_RATE
from difflab.io.spec import build_denoiser, load_denoiser, make_spec, sample_shape
from difflab.nn.stft_unet import StftUNet, StftUNetConfig
from difflab.pipelines import sample_checkpoint
from difflab.pipelines.audio import class_prior_gain, generate_waveform, waveform_data
from difflab.train import TrainConfig, train
from test_audio import perturbed  # the same seeded weight noise as DiffWave's tests

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
    config = tiny(num_classes=2, class_prior=True)
    spec = make_spec("stft_unet", config, DIFFUSION)
    den = build_denoiser(spec, seed=0)
    t = torch.arange(256) / SAMPLE_RATE
    waves = (0.5 * torch.sin(2 * math.pi * torch.tensor([500.0, 520.0, 2000.0, 2100.0])[:, None] * t))[:, None]
    labels = torch.tensor([0, 0, 1, 1])
    den.net.class_gain.copy_(class_prior_gain(config, waves, labels))
    perturbed(den.net)
    kw = dict(steps=3, guidance_scale=1.5, seed=7, progress=False)
    a = generate_waveform(den, [0, 1, 1], batch_size=3, **kw)
    assert a.shape == (3, 1, 256) and a.abs().sum() > 0
    torch.testing.assert_close(a, generate_waveform(den, [0, 1, 1], batch_size=1, **kw), rtol=0, atol=1e-5)
    before = [p.detach().clone() for p in den.net.parameters()]
    cfg = TrainConfig(steps=2, batch_size=2, checkpoint_every=0, log_every=0, progress=False, ema_decay=None)
    train(den, (waveform_data(den, waves, labels), labels), cfg, tmp_path, spec=spec)
    assert any(not torch.equal(p, q) for p, q in zip(before, den.net.parameters()))   # a training step moved the weights
    assert all(torch.isfinite(p).all() for p in den.net.parameters())
    loaded, meta = load_denoiser(tmp_path, weights="model")
    assert sample_shape(meta["spec"], meta) == (1, 256)
    torch.testing.assert_close(loaded.net.class_gain, den.net.class_gain)
    torch.testing.assert_close(sample_checkpoint(tmp_path, labels=[0, 1], weights="model", **kw),
                               generate_waveform(den, [0, 1], **kw))
