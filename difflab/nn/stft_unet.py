"""A waveform denoiser that works in the STFT domain: the diffusion variable stays the raw
waveform (B, 1, L), the network looks at it as a complex spectrogram. After the complex-STFT
score models for speech (Welker et al. 2022, "Speech enhancement with score-based generative
models in the complex STFT domain"; Richter et al. 2023, SGMSE+), here for unconditional /
class-conditional waveform diffusion.

A network, not a denoiser: ``net(x_in, t, class_labels=None)`` maps a (B, 1, L) mono waveform at
network scale and a (B,) float time to the raw prediction, shaped like ``x_in``:

1. the STFT of ``x_in`` (:func:`difflab.core.audio.stft`: periodic Hann window of ``n_fft``,
   hop ``hop``, centred frames), scaled so unit white noise has unit magnitude per bin: X,
   (B, n_fft // 2 + 1, 1 + L // hop);
2. real, imaginary and (``log_magnitude``) log(|X|^2 + 1e-4) / 4 as a (B, 2 or 3, F, T) image,
   zero-padded in F and T up to multiples of the U-Net's downsampling factor;
3. the ADM U-Net of :mod:`difflab.nn.unet` (its time and class embedding, null class for
   classifier-free guidance), cropped back to (F, T);
4. with ``mask``: the output's four channels are a complex mask M and a complex residual R, and
   the prediction's spectrogram is M * X + R; without: two channels, the spectrogram itself;
5. the inverse STFT (:func:`difflab.core.audio.istft`; with n_fft = 4 hop the Hann window
   overlap-adds exactly, so a network that outputs X gives ``x_in`` back to rounding).

Why a mask: a tone of any pitch is one horizontal line of that image, and removing the noise
around it is a multiplication by a mask that is ~1 on the line and ~0 elsewhere, which a
2-D conv net with a multiplicative path to its input can output at any noise level (for
v-prediction the mask is (alpha - x0 gain) / sigma, still a mask times X); the residual R
covers what is not a filtering of the input (the high-noise end, where the prediction is
mostly the class's mean). The zero-initialised output conv makes an untrained net output 0.

``class_prior``, ``sample_rate`` and ``sample_length`` mean what they mean for DiffWave and the
WaveUNet: the buffer ``class_gain`` (num_classes + 1, n_fft // 2 + 1, 1 + sample_length // hop)
holds each class's RMS STFT magnitude, set from data
(:func:`difflab.pipelines.audio.class_prior_gain`), and the pipelines whiten the training clips
by it and colour the samples. ``n_fft`` and ``hop`` are both the network's STFT and that prior's.
A clip that is not mono, or not longer than n_fft // 2, is a ValueError naming the shape.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import JSONConfig
from ..core.audio import hann, istft, stft
from .layers import check_class_labels, check_mono
from .unet import UNet, UNetConfig


@dataclass(frozen=True)
class StftUNetConfig(JSONConfig):
    """Everything that shapes a StftUNet; JSON-safe for checkpoints."""

    in_channels: int = 1              # mono (the waveform's channels)
    model_channels: int = 32          # the U-Net's width at level 0
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    attention_levels: tuple[int, ...] = ()  # levels with self-attention (the middle always has one)
    num_heads: int = 1
    groups: int = 8                   # GroupNorm groups (lowered to a divisor of the width where needed)
    mask: bool = True                 # predict M * X + R (complex mask and residual) rather than the spectrogram
    log_magnitude: bool = True        # a third input channel, log(|X|^2 + 1e-4) / 4
    num_classes: int | None = None    # class-conditional when set; label num_classes is the null class
    sample_rate: int = 8000           # the rate the model was trained at (Hz)
    sample_length: int = 4032         # the clip length it was trained at (samples): one sample's shape
    class_prior: bool = False         # class-conditional: diffuses clips filtered by 1 / its class's mean STFT magnitude
    n_fft: int = 256                  # the network's STFT size (and the class prior's)
    hop: int = 64                     # its hop; n_fft = 4 hop inverts exactly with the Hann window

    def __post_init__(self):
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        object.__setattr__(self, "attention_levels", tuple(self.attention_levels))

        def count(v):
            return isinstance(v, int) and not isinstance(v, bool) and v >= 1
        names = ("in_channels", "model_channels", "num_res_blocks", "num_heads", "groups", "sample_rate", "sample_length",
                 "n_fft", "hop")
        bad = [f"{k}={getattr(self, k)!r}" for k in names if not count(getattr(self, k))]
        bad += [] if self.num_classes is None or count(self.num_classes) else [f"num_classes={self.num_classes!r}"]
        bad += [] if self.channel_mult and all(count(m) for m in self.channel_mult) else [f"channel_mult={self.channel_mult}"]
        if bad:
            raise ValueError(f"StftUNetConfig sizes must be positive integers: {', '.join(bad)}")
        if self.in_channels != 1:
            raise ValueError(f"StftUNetConfig in_channels={self.in_channels}: the network takes mono waveforms (1)")
        if self.hop > self.n_fft // 2:
            raise ValueError(f"StftUNetConfig hop={self.hop} must be at most n_fft // 2 = {self.n_fft // 2} "
                             "(the Hann window's overlap-add needs it to invert)")
        if self.sample_length <= self.n_fft // 2:
            raise ValueError(f"StftUNetConfig sample_length={self.sample_length} must exceed n_fft // 2 = {self.n_fft // 2}")
        if self.class_prior and self.num_classes is None:
            raise ValueError("StftUNetConfig.class_prior=True needs a class-conditional network (num_classes set)")
        self.unet_config()   # the U-Net's own checks (attention levels, heads)

    def unet_config(self) -> UNetConfig:
        """The 2-D U-Net on the spectrogram image."""
        return UNetConfig(in_channels=3 if self.log_magnitude else 2, out_channels=4 if self.mask else 2,
                          model_channels=self.model_channels, channel_mult=self.channel_mult,
                          num_res_blocks=self.num_res_blocks, attention_levels=self.attention_levels,
                          num_heads=self.num_heads, num_classes=self.num_classes, groups=self.groups)

    @property
    def null_class(self) -> int | None:
        return self.num_classes

    @property
    def n_mels(self) -> None:
        """Never a vocoder (the audio pipelines ask)."""
        return None


class StftUNet(nn.Module):
    """The STFT-domain waveform denoiser; see the module docstring."""

    def __init__(self, config: StftUNetConfig = StftUNetConfig()):
        super().__init__()
        self.config = c = config
        self.unet = UNet(c.unet_config())
        window = hann(c.n_fft, torch.float64)
        # core.audio.stft divides by the window's sum; times this, unit white noise has unit magnitude per bin
        self.scale = float(window.sum() / window.pow(2).sum().sqrt())
        if c.class_prior:  # row k: class k's STFT magnitude envelope, row num_classes: all classes'; set from data
            self.register_buffer("class_gain", torch.ones(c.num_classes + 1, c.n_fft // 2 + 1, 1 + c.sample_length // c.hop))

    def check_inputs(self, x: torch.Tensor, class_labels) -> None:
        c = self.config
        check_mono(x, 1, "StftUNet")
        if x.shape[-1] <= c.n_fft // 2:
            raise ValueError(f"StftUNet needs clips longer than n_fft // 2 = {c.n_fft // 2} samples, got {x.shape[-1]}")
        check_class_labels(class_labels, x.shape[0], c.num_classes, "StftUNet")

    def spectrogram(self, x: torch.Tensor) -> torch.Tensor:
        """The complex STFT (B, n_fft // 2 + 1, 1 + L // hop) of (B, 1, L) clips, unit white noise at unit magnitude."""
        return stft(x, self.config.n_fft, self.config.hop) * self.scale

    def waveform(self, spec: torch.Tensor, length: int) -> torch.Tensor:
        """The inverse of :meth:`spectrogram`: (B, 1, length) clips."""
        return istft(spec / self.scale, self.config.n_fft, self.config.hop, length)[:, None]

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        c = self.config
        self.check_inputs(x, class_labels)
        t = torch.as_tensor(t, device=x.device).float().reshape(-1).expand(x.shape[0])
        spec = self.spectrogram(x.float())
        image = [spec.real, spec.imag] + ([torch.log(spec.real ** 2 + spec.imag ** 2 + 1e-4) / 4] if c.log_magnitude else [])
        image = torch.stack(image, dim=1)
        n_freqs, frames = image.shape[-2:]
        f = self.unet.config.downsample_factor
        image = F.pad(image, (0, -frames % f, 0, -n_freqs % f))
        out = self.unet(image.to(x.dtype), t, class_labels=class_labels)[..., :n_freqs, :frames].float()
        pred = torch.complex(out[:, 0], out[:, 1])
        if c.mask:
            pred = pred * spec + torch.complex(out[:, 2], out[:, 3])
        return self.waveform(pred, x.shape[-1]).to(x.dtype)


__all__ = ["StftUNet", "StftUNetConfig"]
