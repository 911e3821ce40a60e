"""Cascaded diffusion (Ho et al. 2022, "Cascaded Diffusion Models for High Fidelity Image
Generation", Section 3 and Algorithm 2): a base model samples at low resolution and each
super-resolution stage (:func:`~difflab.pipelines.super_resolution.super_resolve`) samples the next
resolution conditioned on the stage below, whose output is first noised at a level s the user
picks (noise-conditioning augmentation, Section 4.1), either after full sampling
(``truncated=False``: the sample is noised with fresh Gaussian noise) or by stopping the stage below
at sigma = s (``truncated=True``: its partly denoised x0 + s eps is passed up as it is).

::

    images = cascade(base, [sr_x2], labels=[3, 7], shape=(1, 8, 8), aug_sigma=0.2, steps=25)
"""
from __future__ import annotations

import torch

from ..core import sample_seed
from .class_to_image import check_labels
from .common import denoise, net_config, run_options
from .options import CLASS_DEFAULTS, SampleOptions, resolve
from .super_resolution import check_levels, stage_grid, super_resolve


def stage_options(options, n_stages: int, overrides: dict) -> list[SampleOptions]:
    """One :class:`SampleOptions` per stage: ``options`` (one for all, or a list of one per
    stage) with the keyword ``overrides`` applied to each; stage k > 0 samples with the seed
    ``sample_seed(seed, k)`` so no two stages share their noise."""
    items = list(options) if isinstance(options, (list, tuple)) else [options] * n_stages
    if len(items) != n_stages:
        raise ValueError(f"options has {len(items)} entries for {n_stages} stages (the base and the "
                         f"{n_stages - 1} super-resolution stages): give one, or one per stage")
    opts = [resolve(o, CLASS_DEFAULTS, overrides) for o in items]
    return [o if k == 0 else o.replace(seed=sample_seed(o.seed, k)) for k, o in enumerate(opts)]


def base_stage(denoiser, labels, n: int, shape, opts: SampleOptions, stop_sigma: float) -> torch.Tensor:
    """Stage 1: class-conditional samples of the base model (classifier-free guidance towards
    ``labels``, Ho & Salimans 2022), stopped at ``stop_sigma`` (unclamped) when it is > 0."""
    null_class, device, sigmas, prior = stage_grid(denoiser, opts, stop_sigma)

    def sample_batch(start, b, noise):
        cond = uncond = None
        if labels is not None:
            cond = {"class_labels": labels[start:start + b].to(device)}
            uncond = {"class_labels": torch.full((b,), null_class, dtype=torch.long, device=device)}
        out = denoise(denoiser, noise() * prior, sigmas, opts, noise, cond, uncond)
        return out if stop_sigma > 0 else out.clamp(-1, 1)

    return run_options(n, shape, sample_batch, opts, device=device, desc=f"base stage ({opts.sampler}, {opts.steps} steps)")


@torch.no_grad()
def cascade(base, stages, labels=None, *, num_samples: int | None = None, shape: tuple[int, ...], aug_sigma=0.0,
            truncated: bool = False, options=None, return_all: bool = False, **overrides):
    """Sample ``base`` at ``shape`` (C, h, w), then each super-resolution denoiser of ``stages`` in
    turn; ``labels`` (or ``num_samples`` unconditional images) go to every class-conditional stage.

    ``aug_sigma``: the augmentation level of each super-resolution stage's input (a number for all,
    or one per stage); ``truncated`` picks truncated or non-truncated augmentation (module
    docstring). ``options``: a :class:`SampleOptions` for every stage or a list of one per stage
    (base first); keyword ``overrides`` apply to all. Returns the last stage's images (N, C, H, W)
    in [-1, 1], or with ``return_all`` a list of every stage's images (clamped).
    """
    # 1. Check inputs.
    stages = list(stages)
    if not stages or any(getattr(net_config(s), "factor", None) is None for s in stages):
        raise ValueError("stages must be a non-empty list of super-resolution denoisers (SRUNet networks)")
    levels = check_levels(aug_sigma, len(stages), "aug_sigma (one per super-resolution stage)").tolist()
    opts = stage_options(options, 1 + len(stages), overrides)
    labels, n = check_labels(base, labels, num_samples)

    # 2. The base stage, stopped at the first stage's level when truncated.
    x = base_stage(base, labels, n, tuple(shape), opts[0], levels[0] if truncated else 0.0)
    outputs = [x.clamp(-1, 1)]

    # 3. Each super-resolution stage, conditioned on the stage below at its level.
    for k, stage in enumerate(stages):
        stop = levels[k + 1] if truncated and k + 1 < len(stages) else 0.0
        stage_labels = labels if getattr(net_config(stage), "num_classes", None) is not None else None
        x = super_resolve(stage, x, stage_labels, aug_sigma=levels[k], noised=truncated, stop_sigma=stop, options=opts[k + 1])
        outputs.append(x.clamp(-1, 1))

    # 4. Return.
    return outputs if return_all else outputs[-1]


__all__ = ["cascade", "base_stage", "stage_options"]
