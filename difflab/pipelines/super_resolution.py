"""Super-resolution: a low-resolution image in, a sample at ``factor`` times its size out (SR3,
Saharia et al. 2022, Section 2; the network is :class:`difflab.nn.SRUNet`, conditioned through
``low_res=`` / ``low_res_sigma=``), with cascaded diffusion's noise-conditioning augmentation at a
level the caller picks (Ho et al. 2022, Section 4.1)."""
from __future__ import annotations

import math

import torch

from ..core import SampleNoise, noise_augment, sample_seed
from .class_to_image import check_labels
from .common import denoise, net_config, run_options, sample_device, sampling_grid
from .options import CLASS_DEFAULTS, SampleOptions, resolve


def augmentation_noise(seed: int, start: int, b: int, shape) -> SampleNoise:
    """The augmentation noise of samples start .. start+b-1 of a run seeded ``seed``: each sample's
    own generator, a stream apart from its sampling noise (seeded ``sample_seed(sample_seed(seed, i), 1)``),
    so neither the batch size nor the sampler's draws change it."""
    return SampleNoise([sample_seed(sample_seed(seed, start + i), 1) for i in range(b)], shape)


def truncate_grid(sigmas: torch.Tensor, stop_sigma: float) -> torch.Tensor:
    """The levels of a decreasing grid above ``stop_sigma``, then ``stop_sigma``: a sampler run on
    it stops at x0 + stop_sigma eps, CDM's truncated conditioning augmentation (Ho et al. 2022,
    Section 4.1: the low-resolution sample is taken from the reverse process at step s). 0 keeps
    the grid."""
    if not (math.isfinite(stop_sigma) and stop_sigma >= 0):
        raise ValueError(f"stop_sigma={stop_sigma!r} must be a finite number >= 0")
    if stop_sigma == 0:
        return sigmas
    above = sigmas[sigmas > stop_sigma]
    if not len(above):
        raise ValueError(f"stop_sigma={stop_sigma} is above the grid's largest level {float(sigmas[0]):.4g}")
    return torch.cat([above, torch.tensor([stop_sigma], dtype=sigmas.dtype)])


def stage_grid(denoiser, opts: SampleOptions, stop_sigma: float):
    """``(null class, device, sigmas, prior std at sigmas[0])`` of one stage: the options' grid for
    ``denoiser``, truncated at ``stop_sigma`` (:func:`truncate_grid`)."""
    null_class = getattr(net_config(denoiser), "num_classes", None)
    _, device = sample_device(denoiser, opts)
    sigmas = truncate_grid(sampling_grid(denoiser, opts.steps, opts.grid, opts.spacing, opts.steps_offset), stop_sigma)
    sigmas = sigmas.to(device, torch.float32)
    return null_class, device, sigmas, float(denoiser.prior_std(sigmas[0].double()))


def check_levels(aug_sigma, n: int, name: str = "aug_sigma") -> torch.Tensor:
    """``aug_sigma`` (a number or n numbers, each finite and >= 0) as a float32 (n,) tensor."""
    s = torch.as_tensor(aug_sigma, dtype=torch.float32).reshape(-1)
    if len(s) == 1:
        s = s.expand(n)
    if len(s) != n or not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
        raise ValueError(f"{name} must be a finite number >= 0 or {n} of them (one per image), got {aug_sigma!r}")
    return s.clone()


@torch.no_grad()
def super_resolve(denoiser, low_res: torch.Tensor, labels=None, *, aug_sigma=0.0, noised: bool = False,
                  stop_sigma: float = 0.0, options: SampleOptions | None = None, **overrides) -> torch.Tensor:
    """Sample images ``factor`` times the size of ``low_res`` (N, C, h, w) in [-1, 1], conditioned on it.

    ``aug_sigma``: the noise-conditioning augmentation level s (a number or (N,)): ``low_res`` is
    noised by :func:`difflab.core.noise_augment` at s and the network is told s (CDM's
    non-truncated augmentation; 0 = clean). ``noised=True``: ``low_res`` already sits at level s in
    the canonical frame, ``x + s eps`` (a stage below stopped at sigma = s: CDM's truncated
    augmentation), and is only brought to the variance-preserving scale. ``labels`` guide a
    class-conditional network as in :func:`difflab.pipelines.generate`. ``stop_sigma`` > 0 stops
    the sampler at that level (:func:`truncate_grid`) and returns the unclamped ``x0 + stop_sigma
    eps`` for a truncated stage above. Options as there; sample i
    draws its starting noise and its augmentation noise from generators of its own. Returns
    (N, C, factor h, factor w) clamped to [-1, 1] on the CPU.
    """
    # 1. Check inputs.
    opts = resolve(options, CLASS_DEFAULTS, overrides)
    factor = getattr(net_config(denoiser), "factor", None)
    if factor is None:
        raise ValueError("super_resolve needs a super-resolution network (an SRUNet: its config has a factor)")
    low_res = torch.as_tensor(low_res)
    if low_res.ndim != 4 or low_res.shape[1] != net_config(denoiser).in_channels:
        raise ValueError(f"low_res must be (N, {net_config(denoiser).in_channels}, h, w) images, got shape {tuple(low_res.shape)}")
    n, (c, h, w) = len(low_res), low_res.shape[1:]
    labels, _ = check_labels(denoiser, labels, n) if labels is not None else (None, n)
    if labels is not None and len(labels) != n:
        raise ValueError(f"labels has {len(labels)} entries for {n} low-res images")
    levels = check_levels(aug_sigma, n)
    # 2. Build the grid.
    null_class, device, sigmas, prior = stage_grid(denoiser, opts, stop_sigma)

    def sample_batch(start, b, noise):
        # 3. Starting noise, then the conditioning image at its level (own noise stream).
        x = noise() * prior
        s, z = levels[start:start + b], low_res[start:start + b].float()
        if noised:
            z = z / (1 + s**2).sqrt().reshape(-1, 1, 1, 1)
        else:
            z = noise_augment(z, s, augmentation_noise(opts.seed, start, b, (c, h, w))())
        cond = {"low_res": z.to(device), "low_res_sigma": s.to(device)}
        uncond = None
        if labels is not None:
            uncond = {**cond, "class_labels": torch.full((b,), null_class, dtype=torch.long, device=device)}
            cond["class_labels"] = labels[start:start + b].to(device)
        # 4. Guidance and the sampler.
        out = denoise(denoiser, x, sigmas, opts, noise, cond, uncond)
        return out if stop_sigma > 0 else out.clamp(-1, 1)

    # 5. Return in the data range.
    return run_options(n, (c, h * factor, w * factor), sample_batch, opts, device=device,
                       desc=f"super-resolving x{factor} ({opts.sampler}, {opts.steps} steps)")


def rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    """Root-mean-square difference of two image batches (e.g. a downsampled output and its input)."""
    return math.sqrt(float(((a.float() - b.float()) ** 2).mean()))


__all__ = ["super_resolve", "augmentation_noise", "check_levels", "truncate_grid", "rmse"]
