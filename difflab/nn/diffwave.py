"""DiffWave (Kong et al. 2021): a non-causal dilated-convolution residual network on raw audio.

A network, not a denoiser: ``net(x_in, t, class_labels=None, mel=None)`` maps a (B, 1, L) mono
waveform at network scale and a (B,) float time to the raw prediction. Layout (Kong et al. 2021,
Section 3 and Figure 2):

- a 1x1 conv lifts the waveform to ``residual_channels`` C (then ReLU);
- ``layers`` residual layers, layer i with dilation ``2 ** (i % dilation_cycle)``: the diffusion
  step embedding (sinusoidal, then Linear-SiLU-Linear; plus a class embedding when
  ``num_classes`` is set, row ``num_classes`` being the null class of classifier-free guidance)
  projected to C is added to the input; a bidirectional dilated conv of kernel 3 (C -> 2C) plus
  the projected conditioner (the upsampled mel, 1x1 conv n_mels -> 2C) goes through the gated
  unit tanh(a) * sigmoid(b); a 1x1 conv splits the result into a residual (added to the input,
  times 1/sqrt(2)) and a skip;
- the skips, summed and scaled by 1/sqrt(layers), go through 1x1 conv-ReLU-1x1 conv (the last
  zero-initialised, so an untrained net outputs exactly 0).

As a vocoder (``n_mels`` set) the mel spectrogram (B, n_mels, 1 + L // hop) of
:func:`difflab.core.audio.mel_spectrogram` is upsampled to the waveform's rate by transposed 2-D
convolutions over (mel bin, frame) whose time strides multiply to ``hop`` (each followed by leaky
ReLU 0.4, as in DiffWave), then shifted by hop / 2 so frame k sits on its centre sample k * hop.
With ``envelope_prior`` the network's data is the clip divided by the mel's amplitude envelope
(:func:`difflab.core.audio.mel_envelope`): diffusion under PriorGrad's N(0, diag(envelope^2))
prior (Lee et al. 2022) written in whitened coordinates; with ``spectral_prior`` the clip filtered
by 1 / the mel's per-bin STFT envelope (:func:`difflab.core.audio.mel_spectral_envelope`):
SpecGrad's time-frequency prior (Koizumi et al. 2022), so the network's residual noise ends up
shaped like the mel (quiet where the mel is quiet, in time and in frequency). The network is the
same; the pipelines (:func:`difflab.pipelines.audio.vocode`) whiten the training clips and colour
the samples.

With ``class_prior`` a class-conditional DiffWave does the same with a prior per class instead of
per mel: the buffer ``class_gain`` (num_classes + 1, n_fft // 2 + 1, 1 + sample_length // hop)
holds each class's root-mean-square STFT magnitude over its training clips (the last row: all
classes'), set from data (:func:`difflab.pipelines.audio.class_prior_gain`); the network diffuses
the clip filtered by 1 / its class's row, so its noise starts, and its residual ends, shaped like
the class on average in time and frequency (PriorGrad's data-dependent prior, Lee et al. 2022,
taken to the class level; SpecGrad's time-frequency filter, Koizumi et al. 2022).

The config records ``sample_rate`` and the clip length trained on (``sample_length``); a clip
shorter than the receptive field, or with more than one channel, is a ValueError naming the shape.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import JSONConfig
from .layers import TimestepMLP, check_class_labels, check_mono, timestep_embedding, zero_


@dataclass(frozen=True)
class DiffWaveConfig(JSONConfig):
    """Everything that shapes a DiffWave; JSON-safe for checkpoints."""

    in_channels: int = 1            # mono: the only channel count DiffWave takes
    out_channels: int | None = None  # None = in_channels (2 with a learned variance)
    residual_channels: int = 32     # C
    layers: int = 10
    dilation_cycle: int = 10        # layer i has dilation 2 ** (i % dilation_cycle)
    num_classes: int | None = None  # class-conditional when set; label num_classes is the null class
    n_mels: int | None = None       # a vocoder when set: conditioned on a (B, n_mels, 1 + L // hop) mel spectrogram
    hop: int = 64                   # STFT hop of that spectrogram: the mel upsampling factor
    upsample_strides: tuple[int, ...] = (8, 8)  # the transposed convs' time strides; their product is hop
    sample_rate: int = 8000         # the rate the model was trained at (Hz)
    sample_length: int = 4032       # the clip length it was trained at (samples): one sample's shape
    envelope_prior: bool = False    # a vocoder that diffuses the clip divided by its mel envelope (PriorGrad)
    spectral_prior: bool = False    # a vocoder that diffuses the clip filtered by 1 / its mel's STFT envelope (SpecGrad)
    n_fft: int = 256                # STFT size of the mel (the spectral prior's filter)
    mel_floor: float = 1e-4         # the log-mel floor of the mel images it is conditioned on
    class_prior: bool = False       # class-conditional: diffuses clips filtered by 1 / its class's mean STFT magnitude

    def __post_init__(self):
        object.__setattr__(self, "upsample_strides", tuple(self.upsample_strides))

        def count(v):
            return isinstance(v, int) and not isinstance(v, bool) and v >= 1
        names = ("in_channels", "residual_channels", "layers", "dilation_cycle", "hop", "n_fft", "sample_rate",
                 "sample_length")
        bad = [f"{k}={getattr(self, k)!r}" for k in names if not count(getattr(self, k))]
        bad += [f"{k}={getattr(self, k)!r}" for k in ("out_channels", "num_classes", "n_mels")
                if getattr(self, k) is not None and not count(getattr(self, k))]
        bad += [] if all(count(s) for s in self.upsample_strides) else [f"upsample_strides={self.upsample_strides}"]
        if bad:
            raise ValueError(f"DiffWaveConfig sizes must be positive integers: {', '.join(bad)}")
        for prior in ("envelope_prior", "spectral_prior"):
            if getattr(self, prior) and self.n_mels is None:
                raise ValueError(f"DiffWaveConfig.{prior}=True needs a vocoder (n_mels set)")
        if self.class_prior and (self.num_classes is None or self.n_mels is not None):
            raise ValueError("DiffWaveConfig.class_prior=True needs a class-conditional DiffWave (num_classes set) "
                             "that is not a vocoder (n_mels None)")
        if self.envelope_prior and self.spectral_prior:
            raise ValueError("DiffWaveConfig: choose one of envelope_prior=True and spectral_prior=True, not both")
        if self.spectral_prior and self.hop > self.n_fft:
            raise ValueError(f"DiffWaveConfig.hop={self.hop} must be <= n_fft={self.n_fft}")
        if not self.mel_floor > 0:
            raise ValueError(f"DiffWaveConfig.mel_floor={self.mel_floor!r} must be positive")
        if self.n_mels is not None and math.prod(self.upsample_strides) != self.hop:
            raise ValueError(f"DiffWaveConfig.upsample_strides={self.upsample_strides} multiply to "
                             f"{math.prod(self.upsample_strides)}, not hop={self.hop}")

    @property
    def null_class(self) -> int | None:
        return self.num_classes

    @property
    def receptive_field(self) -> int:
        """Samples one output sees: 1 + 2 * (sum of the dilations), kernel 3 in every layer."""
        return 1 + 2 * sum(2 ** (i % self.dilation_cycle) for i in range(self.layers))


def check_sample_rate(config: DiffWaveConfig, sample_rate: int, name: str = "sample_rate") -> None:
    """A ValueError when audio at ``sample_rate`` Hz meets a model trained at ``config.sample_rate``."""
    if int(sample_rate) != config.sample_rate:
        raise ValueError(f"{name}={sample_rate} Hz, but this model was trained at {config.sample_rate} Hz: "
                         f"resample the audio to {config.sample_rate} Hz first")


def dilated_conv(conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` for a kernel-3 conv of dilation d and padding d. When d > 1 divides L it runs as
    an undilated conv over the d interleaved subsequences (the same sum, a faster kernel on CPU)."""
    d = conv.dilation[0]
    b, ch, length = x.shape
    if d == 1 or length % d:
        return conv(x)
    folded = x.reshape(b, ch, length // d, d).permute(0, 3, 1, 2).reshape(b * d, ch, length // d)
    y = F.conv1d(folded, conv.weight, conv.bias, padding=1)
    return y.reshape(b, d, -1, length // d).permute(0, 2, 3, 1).reshape(b, -1, length)


class ResidualLayer(nn.Module):
    """One DiffWave residual layer (Kong et al. 2021, Figure 2)."""

    def __init__(self, channels: int, dilation: int, emb_dim: int, n_mels: int | None):
        super().__init__()
        self.step = nn.Linear(emb_dim, channels)
        self.dilated = nn.Conv1d(channels, 2 * channels, 3, padding=dilation, dilation=dilation)
        self.cond = nn.Conv1d(n_mels, 2 * channels, 1) if n_mels is not None else None
        self.out = nn.Conv1d(channels, 2 * channels, 1)

    def forward(self, h, emb, cond):
        y = dilated_conv(self.dilated, h + self.step(emb)[:, :, None])
        if self.cond is not None:
            y = y + self.cond(cond)
        a, b = y.chunk(2, dim=1)
        residual, skip = self.out(torch.tanh(a) * torch.sigmoid(b)).chunk(2, dim=1)
        return (h + residual) / math.sqrt(2.0), skip


class MelUpsampler(nn.Module):
    """(B, n_mels, frames) -> (B, n_mels, frames * hop): transposed 2-D convs of kernel (3, 2s),
    stride (1, s), each followed by leaky ReLU 0.4 (DiffWave's spectrogram upsampler)."""

    def __init__(self, strides: tuple[int, ...]):
        super().__init__()
        self.convs = nn.ModuleList(nn.ConvTranspose2d(1, 1, (3, 2 * s), stride=(1, s), padding=(1, s // 2))
                                   for s in strides)
        self.strides = strides

    def forward(self, mel):
        h = mel[:, None]
        for conv, s in zip(self.convs, self.strides):
            frames = h.shape[-1]
            h = F.leaky_relu(conv(h), 0.4)[..., :frames * s]
        return h[:, 0]


class DiffWave(nn.Module):
    """DiffWave; see the module docstring."""

    def __init__(self, config: DiffWaveConfig):
        super().__init__()
        self.config = c = config
        ch, emb_dim = c.residual_channels, 4 * c.residual_channels
        self.input = nn.Conv1d(c.in_channels, ch, 1)
        self.time_embed = TimestepMLP(128, emb_dim)
        self.label_embed = nn.Embedding(c.num_classes + 1, emb_dim) if c.num_classes is not None else None
        self.upsampler = MelUpsampler(c.upsample_strides) if c.n_mels is not None else None
        self.residual = nn.ModuleList(ResidualLayer(ch, 2 ** (i % c.dilation_cycle), emb_dim, c.n_mels)
                                      for i in range(c.layers))
        self.skip = nn.Conv1d(ch, ch, 1)
        self.output = zero_(nn.Conv1d(ch, c.out_channels or c.in_channels, 1))
        if c.class_prior:  # row k: class k's STFT magnitude envelope, row num_classes: all classes'; set from data
            self.register_buffer("class_gain", torch.ones(c.num_classes + 1, c.n_fft // 2 + 1, 1 + c.sample_length // c.hop))

    def check_inputs(self, x: torch.Tensor, class_labels, mel) -> None:
        c = self.config
        check_mono(x, c.in_channels, "DiffWave")
        if x.shape[-1] < c.receptive_field:
            raise ValueError(f"a clip of {x.shape[-1]} samples is shorter than this DiffWave's receptive field "
                             f"({c.receptive_field} samples, {c.layers} layers, dilation cycle {c.dilation_cycle})")
        check_class_labels(class_labels, x.shape[0], c.num_classes, "DiffWave")
        if (mel is None) != (c.n_mels is None):
            raise ValueError("this DiffWave is a vocoder: pass mel=(B, n_mels, frames)" if mel is None
                             else "mel given, but this DiffWave is not a vocoder (config.n_mels is None)")
        frames = 1 + x.shape[-1] // c.hop
        if mel is not None and tuple(mel.shape) != (x.shape[0], c.n_mels, frames):
            raise ValueError(f"mel must be (B, n_mels, 1 + L // hop) = {(x.shape[0], c.n_mels, frames)} for a clip of "
                             f"{x.shape[-1]} samples, got shape {tuple(mel.shape)}")

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None,
                mel: torch.Tensor | None = None) -> torch.Tensor:
        self.check_inputs(x, class_labels, mel)
        length = x.shape[-1]
        emb = self.time_embed(timestep_embedding(t, 128).to(x.dtype))
        if self.label_embed is not None:
            labels = class_labels if class_labels is not None else torch.full((x.shape[0],), self.config.num_classes,
                                                                               dtype=torch.long, device=x.device)
            emb = emb + self.label_embed(labels)
        cond = None
        if mel is not None:
            half = self.config.hop // 2
            up = self.upsampler(mel.to(x.dtype))
            up = F.pad(up, (0, max(0, half + length - up.shape[-1])), mode="replicate")
            cond = up[..., half:half + length]
        h = F.relu(self.input(x))
        skips = 0.0
        for layer in self.residual:
            h, skip = layer(h, emb, cond)
            skips = skips + skip
        h = F.relu(self.skip(skips / math.sqrt(len(self.residual))))
        return self.output(h)


__all__ = ["DiffWave", "DiffWaveConfig", "check_sample_rate"]
