"""Noise-conditioning augmentation at training time (Ho et al. 2022, "Cascaded Diffusion Models",
Section 4.1 and Algorithm 1): each example's conditioning image is noised to a level drawn at
random, and the model is told the level, so that at sampling time it can be given a noised
low-resolution sample (from the stage below) at a level the user picks. A draw-time hook of
:class:`difflab.train.DiffusionObjective` (``augment=``)."""
from __future__ import annotations

import torch

from ..core import noise_augment


class NoiseConditioningAugmentation:
    """``(batch, generator) -> batch``: ``batch[key]`` replaced by :func:`difflab.core.noise_augment`
    of it at a level s ~ Uniform(0, ``sigma_max``) per example (with probability ``p_clean``, s = 0:
    some clean inputs, so the model also serves unaugmented conditioning), and ``batch[level_key]``
    = s (float32, (B,)). Draws, in order: the levels, the clean mask, then the noise."""

    def __init__(self, key: str = "low_res", level_key: str = "low_res_sigma", sigma_max: float = 1.0,
                 p_clean: float = 0.0):
        if not sigma_max >= 0:
            raise ValueError(f"sigma_max={sigma_max} must be >= 0")
        if not 0 <= p_clean <= 1:
            raise ValueError(f"p_clean={p_clean} must be in [0, 1]")
        self.key, self.level_key, self.sigma_max, self.p_clean = key, level_key, float(sigma_max), float(p_clean)

    def __call__(self, batch: dict, generator: torch.Generator) -> dict:
        if self.key not in batch:
            raise ValueError(f"noise-conditioning augmentation of {self.key!r}: the batch has no such key "
                             f"(it has {sorted(batch)}); pass it as per-example conditioning")
        x = batch[self.key]
        s = self.sigma_max * torch.rand(len(x), generator=generator)
        s = torch.where(torch.rand(len(x), generator=generator) < self.p_clean, torch.zeros_like(s), s)
        noise = torch.randn(x.shape, generator=generator).to(x.device, torch.float32)
        return {**batch, self.key: noise_augment(x.float(), s.to(x.device), noise), self.level_key: s.to(x.device)}


__all__ = ["NoiseConditioningAugmentation"]
