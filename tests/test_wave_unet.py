"""The 1-D waveform U-Net (network kind "wave_unet"): shapes, bad inputs, per-sample determinism
and the class prior through the audio pipelines and a checkpoint."""
from __future__ import annotations

import math

import pytest
import torch

from difflab.data.audio import SAMPLE_RATE
from difflab.io.spec import build_denoiser, load_denoiser, make_spec, sample_shape
from difflab.nn.wave_unet import WaveUNet, WaveUNetConfig
from difflab.pipelines import sample_checkpoint
from difflab.pipelines.audio import class_prior_gain, generate_waveform, waveform_data
from difflab.train import TrainConfig, train
from test_audio import perturbed  # the same seeded weight noise as DiffWave's tests

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
    config = tiny(num_classes=2, class_prior=True)
    spec = make_spec("wave_unet", config, DIFFUSION)
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
    with pytest.raises(ValueError, match="8000 Hz"):
        generate_waveform(den, [0], sample_rate=22050, **kw)
    cfg = TrainConfig(steps=2, batch_size=2, checkpoint_every=0, log_every=0, progress=False, ema_decay=None)
    train(den, (waveform_data(den, waves, labels), labels), cfg, tmp_path, spec=spec)
    loaded, meta = load_denoiser(tmp_path, weights="model")
    assert sample_shape(meta["spec"], meta) == (1, 256)
    torch.testing.assert_close(loaded.net.class_gain, den.net.class_gain)
    torch.testing.assert_close(sample_checkpoint(tmp_path, labels=[0, 1], weights="model", **kw),
                               generate_waveform(den, [0, 1], **kw))
