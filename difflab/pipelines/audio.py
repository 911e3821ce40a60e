"""Audio generation: class labels in, mono clips out, by four routes over one front end.

- **waveform**: a class-conditional DiffWave (Kong et al. 2021) samples the clip directly
  (:func:`generate_waveform`);
- **spectrogram**: a class-conditional U-Net samples the log-mel as a 1-channel image
  (:func:`generate_mel`, Riffusion-style), then a decoder makes it sound: Griffin-Lim
  (:func:`griffin_lim_decode`) or a DiffWave vocoder conditioned on the mel (:func:`vocode`);
- **latent**: the same, with the U-Net in the latent space of a small KL autoencoder of the mels
  (:func:`generate_latent_mel`, AudioLDM-style).

Every route draws sample i from its own generator seeded by (``seed``, i), so clip i is the same
whatever the batch size.
"""
from __future__ import annotations

import math

import torch

from ..core.audio import (AudioFrontEnd, hann, image_to_mel, mel_consistency, mel_envelope, mel_griffin_lim,
                          mel_spectral_envelope, stft, stft_filter)
from ..core.rng import sample_seed
from ..nn.diffwave import DiffWaveConfig, check_sample_rate
from ..nn.stft_unet import StftUNetConfig
from ..nn.wave_unet import WaveUNetConfig
from .class_to_image import generate
from .common import denoise, run_options, sample_device, sampling_grid
from .options import CLASS_DEFAULTS, SampleOptions, resolve


def diffwave_config(denoiser):
    """The config of a denoiser's waveform network (a DiffWave, a WaveUNet or a StftUNet: all record
    ``sample_rate``, ``sample_length``, ``class_prior``, ``n_fft``, ``hop`` and ``n_mels``), or a
    ValueError naming what the network is."""
    config = getattr(denoiser.net, "config", None)
    if not isinstance(config, (DiffWaveConfig, WaveUNetConfig, StftUNetConfig)):
        raise ValueError(f"an audio route needs a DiffWave, WaveUNet or StftUNet network, got {type(denoiser.net).__name__}")
    return config


# The class prior's floor, relative to its largest entry: bins no clip of a class reaches are not
# amplified by more than 1 / CLASS_PRIOR_FLOOR when whitened.
CLASS_PRIOR_FLOOR = 1e-4


def class_prior_gain(config: DiffWaveConfig, waves: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The class prior of a DiffWave with ``class_prior`` (its buffer ``class_gain``): row k the
    root-mean-square STFT magnitude (n_fft // 2 + 1, frames) of the clips ``waves`` (N, 1,
    sample_length) of class k over (window RMS / window sum), so unit white noise filtered by it
    has about that magnitude; the last row all clips'; floored at :data:`CLASS_PRIOR_FLOOR` of the
    largest entry. Every class needs a clip."""
    if not config.class_prior:
        raise ValueError("this DiffWave has no class prior (config.class_prior is False)")
    if waves.ndim != 3 or tuple(waves.shape[1:]) != (1, config.sample_length):
        raise ValueError(f"waves must be (N, 1, {config.sample_length}) clips, got shape {tuple(waves.shape)}")
    labels = torch.as_tensor(labels)
    missing = sorted(set(range(config.num_classes)) - set(labels.tolist()))
    if missing:
        raise ValueError(f"the class prior needs clips of every class; none of classes {missing}")
    window = hann(config.n_fft, torch.float64)
    white = float(window.pow(2).sum().sqrt() / window.sum())
    power = stft(waves.double(), config.n_fft, config.hop).abs().pow(2)
    rows = [power[labels == k].mean(0) for k in range(config.num_classes)] + [power.mean(0)]
    gain = torch.stack(rows).sqrt() / white
    return gain.clamp_min(CLASS_PRIOR_FLOOR * float(gain.max())).float()


def class_prior_rows(denoiser, labels, n: int) -> torch.Tensor:
    """The class prior's filters (n, n_freqs, frames) for ``labels`` (None: the all-classes row)."""
    gain = denoiser.net.class_gain
    rows = torch.full((n,), gain.shape[0] - 1, dtype=torch.long) if labels is None else torch.as_tensor(labels).long()
    return gain[rows.to(gain.device)].double()


def waveform_data(denoiser, waves: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """What a class-conditional DiffWave trains on: the clips (N, 1, L) themselves, or with
    ``class_prior`` filtered by 1 / their class's row of ``class_gain`` (its whitened coordinates;
    whiten whole clips, then crop)."""
    config = diffwave_config(denoiser)
    if not config.class_prior:
        return waves
    return stft_filter(waves.double(), 1.0 / class_prior_rows(denoiser, labels, len(waves)).cpu(), config.n_fft,
                       config.hop).to(waves.dtype)


def waveform_output(denoiser, samples: torch.Tensor, labels) -> torch.Tensor:
    """The inverse of :func:`waveform_data`: samples (N, 1, L) in the prior's whitened coordinates
    coloured by their class's row (``labels`` None: the all-classes row), clamped to [-1, 1]."""
    config = diffwave_config(denoiser)
    if config.class_prior:
        rows = class_prior_rows(denoiser, labels, len(samples)).to(samples.device)
        samples = stft_filter(samples.double(), rows, config.n_fft, config.hop).to(samples.dtype)
    return samples.clamp(-1, 1)


@torch.no_grad()
def generate_waveform(denoiser, labels=None, *, num_samples: int | None = None, sample_rate: int | None = None,
                      options: SampleOptions | None = None, **overrides) -> torch.Tensor:
    """Clips (N, 1, sample_length) in [-1, 1] from a (class-conditional) DiffWave, with
    classifier-free guidance towards ``labels`` (:func:`difflab.pipelines.generate` on waveforms),
    coloured by the class prior when the config has one (:func:`waveform_output`);
    ``sample_rate``, when given, must be the model's."""
    config = diffwave_config(denoiser)
    if config.n_mels is not None:
        raise ValueError("this DiffWave is a vocoder (it needs a mel spectrogram): use vocode()")
    if sample_rate is not None:
        check_sample_rate(config, sample_rate)
    x = generate(denoiser, labels, num_samples=num_samples, shape=(config.in_channels, config.sample_length),
                 options=options, clamp=False, **overrides)
    return waveform_output(denoiser, x, None if labels is None else torch.as_tensor(labels))


@torch.no_grad()
def generate_mel(denoiser, labels=None, *, front_end: AudioFrontEnd, length: int, num_samples: int | None = None,
                 options: SampleOptions | None = None, **overrides) -> torch.Tensor:
    """Log-mel images (N, 1, n_mels, 1 + length // hop) in [-1, 1] (:func:`difflab.core.audio.mel_image`'s
    scale) from an image network trained on them, for clips of ``length`` samples."""
    return generate(denoiser, labels, num_samples=num_samples, shape=(1, front_end.n_mels, front_end.frames(length)),
                    options=options, **overrides)


@torch.no_grad()
def generate_latent_mel(denoiser, vae, labels=None, *, front_end: AudioFrontEnd, length: int,
                        num_samples: int | None = None, options: SampleOptions | None = None,
                        **overrides) -> torch.Tensor:
    """Log-mel images (N, 1, n_mels, 1 + length // hop) in [-1, 1] by latent diffusion
    (AudioLDM-style, Liu et al. 2023): a (class-conditional) network samples the scaled latents
    of a KL autoencoder of the mel images (:class:`difflab.nn.vae.AutoencoderKL`, factor f), the
    autoencoder decodes them. n_mels and the frame count must be multiples of f."""
    f, frames = vae.downsample_factor, front_end.frames(length)
    if front_end.n_mels % f or frames % f:
        raise ValueError(f"the mel image ({front_end.n_mels} x {frames}) must be a multiple of the autoencoder's "
                         f"downsampling factor {f} in both dimensions")
    shape = (vae.config.latent_channels, front_end.n_mels // f, frames // f)
    latents = generate(denoiser, labels, num_samples=num_samples, shape=shape, options=options, clamp=False, **overrides)
    dtype = next(vae.parameters()).dtype
    return torch.cat([vae.decode_latents(z.to(dtype)) for z in latents.split(64)]).float().clamp(-1, 1)


def griffin_lim_decode(images: torch.Tensor, front_end: AudioFrontEnd, length: int, *, iters: int = 64,
                       seed: int = 0, batch_size: int = 64) -> torch.Tensor:
    """Clips (N, 1, length) from log-mel images: mel -> linear magnitude -> fast Griffin-Lim, the
    starting phases of clip i drawn from its own generator (``seed``, i); peaks above 1 clipped."""
    out = []
    n_freqs, frames = front_end.n_freqs, images.shape[-1]
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size].float()
        phase = torch.stack([torch.rand((n_freqs, frames), generator=torch.Generator().manual_seed(sample_seed(seed, start + i)))
                             for i in range(len(chunk))]) * (2 * math.pi)
        out.append(mel_griffin_lim(image_to_mel(chunk, front_end), front_end, length, iters=iters, phase=phase))
    return torch.cat(out)[:, None].clamp(-1, 1)


def vocoder_front_end(config: DiffWaveConfig) -> AudioFrontEnd:
    """The front end of the log-mel images a vocoder is conditioned on (its rate, STFT, mel bins, floor)."""
    return AudioFrontEnd(sample_rate=config.sample_rate, n_fft=config.n_fft, hop=config.hop, n_mels=config.n_mels,
                         floor=config.mel_floor)


def vocoder_envelope(config: DiffWaveConfig, images: torch.Tensor, length: int) -> torch.Tensor:
    """The amplitude envelope (N, 1, length) a vocoder with ``envelope_prior`` divides its clips
    by, from the log-mel images (N, 1, n_mels, frames) it is conditioned on; ones without the prior."""
    if not config.envelope_prior:
        return torch.ones(len(images), 1, length, dtype=images.dtype, device=images.device)
    mel = image_to_mel(images, vocoder_front_end(config))
    return mel_envelope(mel, config.hop, length)[:, None]


# The spectral prior's filter is the mel's STFT envelope over (window RMS / window sum): unit white
# noise filtered by it has about the envelope as STFT magnitude, and the whitened clips about unit
# standard deviation (0.95 on the demo's data).
SPECTRAL_GAIN = 1.0


def vocoder_spectral_gain(config: DiffWaveConfig, images: torch.Tensor) -> torch.Tensor:
    """The spectral prior's filter (N, n_fft // 2 + 1, frames) from log-mel images (N, 1, n_mels,
    frames): :func:`difflab.core.audio.mel_spectral_envelope` scaled by :data:`SPECTRAL_GAIN` over
    the window's RMS-to-sum ratio."""
    fe = vocoder_front_end(config)
    window = hann(config.n_fft, torch.float64)
    white = float(window.pow(2).sum().sqrt() / window.sum())      # a unit white noise's STFT magnitude
    return mel_spectral_envelope(image_to_mel(images, fe), fe) * (SPECTRAL_GAIN / white)


def vocoder_data(config: DiffWaveConfig, waves: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """What a vocoder trains on, the prior's whitened coordinates: clips (N, 1, L) over
    :func:`vocoder_envelope` of their log-mel images (N, 1, n_mels, 1 + L // hop) with
    ``envelope_prior``; filtered by 1 / :func:`vocoder_spectral_gain` with ``spectral_prior``;
    the clips themselves otherwise. Whiten whole clips, then crop: the filter reaches n_fft / 2
    samples either side."""
    if config.spectral_prior:
        return stft_filter(waves, 1.0 / vocoder_spectral_gain(config, images), config.n_fft, config.hop).to(waves.dtype)
    return waves / vocoder_envelope(config, images, waves.shape[-1])


def vocoder_output(config: DiffWaveConfig, samples: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`vocoder_data`: a vocoder's samples (N, 1, L), in its prior's whitened
    coordinates, as clips, coloured by the prior of the mel images (N, 1, n_mels, frames)."""
    if config.spectral_prior:
        return stft_filter(samples, vocoder_spectral_gain(config, images), config.n_fft, config.hop).to(samples.dtype)
    return samples * vocoder_envelope(config, images, samples.shape[-1])


@torch.no_grad()
def vocode(denoiser, images: torch.Tensor, *, sample_rate: int | None = None, options: SampleOptions | None = None,
           mel_consistency_iters: int = 0, **overrides) -> torch.Tensor:
    """Clips (N, 1, sample_length) from log-mel images (N, 1, n_mels, frames) by a DiffWave
    vocoder (``config.n_mels`` set): its reverse process conditioned on ``mel=`` (Kong et al.
    2021, Section 3.1), through :func:`vocoder_output` (PriorGrad's or SpecGrad's prior, when the
    config says so), then ``mel_consistency_iters`` Richardson-Lucy updates that make each clip's
    mel match the one it was given, its phases and in-band detail kept
    (:func:`difflab.core.audio.mel_consistency`; 0: none); no guidance. ``sample_rate``, when
    given, must be the model's."""
    # 1. Check inputs.
    config = diffwave_config(denoiser)
    if config.n_mels is None:
        raise ValueError("this DiffWave is not a vocoder (config.n_mels is None): use generate_waveform()")
    if sample_rate is not None:
        check_sample_rate(config, sample_rate)
    opts = resolve(options, CLASS_DEFAULTS, overrides)
    if opts.guidance_scale != 1.0:
        raise ValueError(f"guidance_scale={opts.guidance_scale}: a vocoder is conditioned on the mel, not guided; use 1")
    if not isinstance(mel_consistency_iters, int) or isinstance(mel_consistency_iters, bool) or mel_consistency_iters < 0:
        raise ValueError(f"mel_consistency_iters={mel_consistency_iters!r} must be an int >= 0")
    frames = 1 + config.sample_length // config.hop
    if images.ndim != 4 or tuple(images.shape[1:]) != (1, config.n_mels, frames):
        raise ValueError(f"images must be (N, 1, n_mels, frames) = (N, 1, {config.n_mels}, {frames}) log-mel images for "
                         f"this vocoder's {config.sample_length}-sample clips, got shape {tuple(images.shape)}")
    _, device = sample_device(denoiser, opts)
    # 2. The grid; 3-5. per-sample noise, the mel as the condition, the sampler.
    sigmas = sampling_grid(denoiser, opts.steps, opts.grid, opts.spacing, opts.steps_offset).to(device, torch.float32)
    prior = float(denoiser.prior_std(sigmas[0].double()))

    def sample_batch(start, b, noise):
        chunk = images[start:start + b].to(device, torch.float32)
        x = denoise(denoiser, noise() * prior, sigmas, opts, noise, {"mel": chunk[:, 0]})
        clip = vocoder_output(config, x, chunk)
        if mel_consistency_iters:
            fe = vocoder_front_end(config)
            clip = mel_consistency(clip, image_to_mel(chunk, fe), fe, mel_consistency_iters)
        return clip.clamp(-1, 1)

    return run_options(len(images), (config.in_channels, config.sample_length), sample_batch, opts, device=device,
                       desc=f"vocoding ({opts.sampler}, {opts.steps} steps)")


__all__ = ["generate_waveform", "class_prior_gain", "waveform_data", "waveform_output", "generate_mel", "generate_latent_mel",
           "griffin_lim_decode", "vocode", "diffwave_config", "vocoder_envelope", "vocoder_spectral_gain", "vocoder_data", "vocoder_output", "vocoder_front_end"]
