"""Class-conditional (or unconditional) generation: labels in, images out."""
from __future__ import annotations

import torch

from .common import denoise, run_options, sample_device, sampling_grid
from .options import CLASS_DEFAULTS, SampleOptions, resolve


def check_labels(denoiser, labels, num_samples: int | None) -> tuple[torch.Tensor | None, int]:
    """``(labels as a (N,) long tensor or None, N)``; a ValueError for labels outside the model's
    classes, labels for an unconditional model, or neither labels nor ``num_samples`` >= 1."""
    num_classes = getattr(getattr(denoiser.net, "config", None), "num_classes", None)
    if labels is None:
        if num_samples is None or num_samples < 1:
            raise ValueError("give labels, or num_samples >= 1 for unconditional generation")
        return None, num_samples
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if num_classes is None:
        raise ValueError("labels were given but the model is unconditional (its config has no num_classes)")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if len(bad):
        raise ValueError(f"class labels must be in [0, {num_classes - 1}], got {bad.tolist()}")
    return labels, len(labels)


@torch.no_grad()
def generate(denoiser, labels=None, *, num_samples: int | None = None, shape: tuple[int, ...],
             null_class: int | None = None, options: SampleOptions | None = None, clamp: bool = True,
             **overrides) -> torch.Tensor:
    """Generate images for class ``labels`` (a sequence of ints) or ``num_samples`` unconditional
    images, with classifier-free guidance towards the labels (Ho & Salimans 2022, eq. 6; the
    unconditional branch sees ``null_class``, default the model's ``num_classes``).

    ``options``: a :class:`~difflab.pipelines.options.SampleOptions` (default: DDIM, 50 steps,
    no guidance, batches of 64); keyword ``overrides`` replace its fields (``sampler=``, ``steps=``,
    ``guidance_scale=``, ``seed=``, ``batch_size=``, ``device=``, ...), any other keyword goes to
    the sampler (``eta=``, ...). Sample i is drawn from its own generator seeded by (``seed``, i),
    so it is the same image whatever ``batch_size`` is. Returns (N, *shape) in the model's data
    range, clamped to [-1, 1] (``clamp=False``: as sampled, e.g. latents), on the CPU.
    """
    # 1. Check inputs.
    opts = resolve(options, CLASS_DEFAULTS, overrides)
    labels, n = check_labels(denoiser, labels, num_samples)
    if opts.guidance_scale != 1.0 and labels is None:
        raise ValueError("guidance_scale != 1 needs class labels to guide towards")
    null_class = getattr(getattr(denoiser.net, "config", None), "num_classes", None) if null_class is None else null_class
    _, device = sample_device(denoiser, opts)

    # 2. Build the grid.
    sigmas = sampling_grid(denoiser, opts.steps, opts.grid, opts.spacing, opts.steps_offset).to(device, torch.float32)
    prior = float(denoiser.prior_std(sigmas[0].double()))

    def sample_batch(start, b, noise):
        # 3-4. Per-sample noise (sample i has its own generator), scaled to the prior at the first level.
        x = noise() * prior
        # 5-6. Guidance (the unconditional branch sees the null class), then the sampler.
        cond = uncond = None
        if labels is not None:
            cond = {"class_labels": labels[start:start + b].to(device)}
            uncond = {"class_labels": torch.full((b,), null_class, dtype=torch.long, device=device)}
        x = denoise(denoiser, x, sigmas, opts, noise, cond, uncond)
        return x.clamp(-1, 1) if clamp else x

    # 7. Return in the data range.
    return run_options(n, shape, sample_batch, opts, device=device,
                       desc=f"sampling ({opts.sampler}, {opts.steps} steps)")
