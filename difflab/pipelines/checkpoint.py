"""Sampling a training checkpoint: the one place ``difflab sample`` and ``difflab eval`` (and
Python users) turn a checkpoint into images.

Usage::

    images = sample_checkpoint("runs/digits", labels=[0, 1, 2], steps=20)        # one per label
    images = sample_checkpoint("runs/digits", labels="balanced", num=1000)        # labels i mod K (eval)

A checkpoint may name how it samples best (a distilled student: ``difflab distill`` writes its
sampler, steps, grid and guidance scale under ``"sampling"`` in the metadata); those are the
defaults that ``options`` and keyword overrides replace.
"""
from __future__ import annotations

import torch

from ..io.spec import NETWORKS, checkpoint_spec, kinds_with_output, load_denoiser, sample_shape
from .audio import generate_waveform
from .class_to_image import generate
from .options import CLASS_DEFAULTS, SampleOptions, resolve


def check_image_kind(kind: str, what: str = "this") -> None:
    """A ValueError, naming the kind and the kinds that render, when the samples of network kind
    ``kind`` are not images (a PNG grid or an image metric cannot show them)."""
    output = NETWORKS[kind].output
    if output != "image":
        raise ValueError(f"network kind {kind!r} makes {output} samples, not images: {what} renders only the kinds "
                         f"{', '.join(kinds_with_output('image'))}")


SAMPLED_OUTPUTS = ("image", "audio")  # the outputs sample_checkpoint draws: images, and clips (N, 1, L)


def check_sampled_kind(kind: str, meta: dict, what: str = "this") -> None:
    """A ValueError when network kind ``kind`` does not sample from noise and labels alone: its
    samples are neither images nor audio, or it is a vocoder (its config has ``n_mels``: it needs a
    mel spectrogram, :func:`difflab.pipelines.audio.vocode`)."""
    if NETWORKS[kind].output not in SAMPLED_OUTPUTS:
        check_image_kind(kind, what)
    config = ((meta.get("spec") or {}).get("network") or {}).get("config") or {}
    if config.get("n_mels") is not None:
        raise ValueError(f"this {kind} checkpoint is a vocoder: it turns mel spectrograms into audio "
                         "(difflab.pipelines.audio.vocode) and cannot sample from class labels alone")


SAMPLING_KEYS = ("sampler", "steps", "grid", "guidance_scale", "sampler_kwargs")


def sampling_defaults(meta: dict) -> SampleOptions:
    """:data:`CLASS_DEFAULTS` with the checkpoint's own ``"sampling"`` entries (a grid given as a
    list of sigmas becomes a tensor)."""
    sampling = dict(meta.get("sampling") or {})
    unknown = sorted(set(sampling) - set(SAMPLING_KEYS))
    if unknown:
        raise ValueError(f"checkpoint metadata 'sampling' has unknown keys {unknown}; valid: {', '.join(SAMPLING_KEYS)}")
    if isinstance(sampling.get("grid"), list):
        sampling["grid"] = torch.tensor(sampling["grid"], dtype=torch.float64)
    return CLASS_DEFAULTS.replace(**sampling)


def sample_checkpoint(path, *, labels=None, num: int | None = None, options: SampleOptions | None = None,
                      weights: str = "ema", **overrides) -> torch.Tensor:
    """Images (N, C, H, W) in [-1, 1] sampled from a training checkpoint whose network kind makes
    images (:data:`difflab.io.spec.NETWORKS`), through :func:`~difflab.pipelines.generate`; clips
    (N, 1, L) from one whose kind makes audio (a class-conditional or unconditional DiffWave).

    ``labels``: class labels, one image each; None: ``num`` images without labels (a
    class-conditional model samples its null class); ``"balanced"``: ``num`` images with labels
    i mod K for a class-conditional model (classes interleaved, as evaluation wants), without
    labels and guidance for an unconditional one. ``options``/``overrides``: the sampling
    options (:class:`~difflab.pipelines.options.SampleOptions`; ``device`` also loads the weights
    there, default CPU). ``weights``: ``"ema"`` or ``"model"``. The shape of a sample comes from
    the network kind and the checkpoint's metadata (its training image size).
    """
    # 1. Check inputs, then the checkpoint's kind and sampling defaults from its metadata alone.
    kind, meta = checkpoint_spec(path)
    opts = resolve(options, sampling_defaults(meta), overrides)
    if labels is None or isinstance(labels, str):
        if labels not in (None, "balanced"):
            raise ValueError(f"labels={labels!r}: give class labels, None or 'balanced'")
        if num is None or num < 1:
            raise ValueError(f"num={num} must be a positive number of images when labels is {labels!r}")
    check_sampled_kind(kind, meta, "sample_checkpoint")
    # 2. Load the denoiser (on the options' device).
    device = "cpu" if opts.device is None else opts.device
    denoiser, meta = load_denoiser(path, weights=weights, device=device)
    shape = sample_shape(meta["spec"], meta)
    # 3. Labels: as given, none, or class-balanced.
    if isinstance(labels, str):
        num_classes = getattr(getattr(denoiser.net, "config", None), "num_classes", None)
        labels = torch.arange(num) % num_classes if num_classes else None
        if labels is None:
            opts = opts.replace(guidance_scale=1.0)
    # 4. Sample (a DiffWave through its pipeline: a class prior colours its samples).
    if NETWORKS[kind].output == "audio":
        return generate_waveform(denoiser, labels, num_samples=num if labels is None else None, null_class=meta.get("null_class"),
                                 options=opts.replace(device=device))
    return generate(denoiser, labels, num_samples=num if labels is None else None, shape=shape,
                    null_class=meta.get("null_class"), options=opts.replace(device=device))


__all__ = ["sample_checkpoint", "check_image_kind", "check_sampled_kind", "SAMPLED_OUTPUTS", "sampling_defaults", "SAMPLING_KEYS"]
