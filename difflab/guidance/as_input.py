"""Guidance as an input: the sampling side of guided distillation (Meng et al. 2023, section 4.1).

A distilled student whose network takes the guidance scale w as an input
(:class:`difflab.nn.GuidanceEmbedding`) already gives the guided x0_hat in one evaluation; it is
not combined with an unconditional branch. :class:`GuidanceInput` is the denoiser -> denoiser
wrapper that hands it w, where classifier-free guidance would have run two branches.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def takes_guidance_scale(denoiser) -> bool:
    """Whether the denoiser's network takes the guidance scale as an input."""
    return bool(getattr(getattr(denoiser, "net", None), "takes_guidance_scale", False))


class GuidanceInput(nn.Module):
    """``D(x, sigma, **cond) = denoiser(x, sigma, guidance_scale=scale, **cond)``: one evaluation."""

    def __init__(self, denoiser, scale: float):
        super().__init__()
        if not (isinstance(scale, (int, float)) and math.isfinite(scale)):
            raise ValueError(f"guidance scale={scale!r} must be a finite number (1 = conditional)")
        self.denoiser, self.scale = denoiser, float(scale)

    def forward(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        return self.denoiser(x, sigma, guidance_scale=self.scale, **cond)


__all__ = ["GuidanceInput", "takes_guidance_scale"]
